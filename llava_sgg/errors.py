"""Foreseeable errors reported as one line that names the file they concern.

json, YAML, safetensors and torch.load say what is wrong but not in which file: a truncated
``trainer_state.json`` reads "Expecting ',' delimiter: line 86 column 18". The project's own
readers wrap their reads in :func:`reading`; for a library reading on our behalf (Trainer's resume,
``from_pretrained``) :func:`describe` takes the file from the frame that was reading it. The CLI
prints what :func:`describe` returns and a traceback only for what it does not recognise.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import traceback

__all__ = ["FileError", "describe", "reading"]


class FileError(ValueError):
    """A file that cannot be read as what it should be; the message starts with its path."""


@contextlib.contextmanager
def reading(path: str | os.PathLike):
    """Re-raise a read or parse error about ``path`` as a :class:`FileError` naming it."""
    try:
        yield
    except FileError:
        raise
    except Exception as error:
        message = _file_problem(error, os.fspath(path))
        if message is None:
            raise
        raise FileError(message) from error


def describe(error: BaseException) -> str | None:
    """The message to print for a foreseeable error, naming its file; None for an unforeseen one."""
    if isinstance(error, ValueError) and not isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
        return str(error)  # ConfigError, DataError, ModelError, FileError: their messages name file and key
    if isinstance(error, OSError) and error.filename is not None:
        return _file_problem(error, os.fspath(error.filename))
    if isinstance(error, OSError):
        return str(error)  # e.g. transformers' "Can't load the configuration of '...'"
    return _file_problem(error, _file_in_traceback(error))


def _file_problem(error: BaseException, path: str | None) -> str | None:
    """"<path>: <what is wrong>" for the error types that mean a bad or unreadable file, else None."""
    where = path or "(file not known)"
    if isinstance(error, json.JSONDecodeError):
        return f"{where}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}"
    if isinstance(error, UnicodeDecodeError):
        return f"{where}: not UTF-8 text (byte {error.start})"
    if isinstance(error, OSError):
        detail = error.strerror or str(error)
        return f"{error.filename or where}: {detail}" + (f" (and {error.filename2})" if error.filename2 else "")
    import yaml

    if isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        return f"{where}{line}: not valid YAML ({getattr(error, 'problem', None) or error})"
    if type(error).__name__ == "SafetensorError":  # safetensors' Rust error, e.g. "header too small"
        return f"{where}: not a readable safetensors file ({error})"
    if isinstance(error, (pickle.UnpicklingError, EOFError)) or (
            isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error)):
        detail = str(error) or "it ends before its data does"
        return f"{where}: not a readable torch.save file, truncated or not written completely? ({detail})"
    return None


def _file_in_traceback(error: BaseException) -> str | None:
    """The file the innermost frame of the error's traceback holds a path to (the one being read)."""
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, os.PathLike) or (isinstance(value, str) and 0 < len(value) < 4096
                                                  and "\n" not in value):
                if os.path.isfile(value):
                    return os.fspath(value)
    return None
