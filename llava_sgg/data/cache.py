"""Data checks that are slow to redo, kept on disk and reused by every rank and every later run.

A 665k-sample file takes minutes to tokenize and its images minutes to decode; every rank of every
run used to do both again. Two kinds of results are kept, each as a safetensors file (arrays, and
strings as UTF-8 bytes; nothing is unpickled):

- ``tokenized/``: per data file, tokenizer and settings, the tokenized length or the problem of each
  sample, keyed by the sample's content, so that a file with a few samples fixed re-tokenizes those alone;
- ``images/``: per image folder, the images that decoded, with their size and modification time.

A lock file beside each makes the ranks of a node take turns: the first computes and writes (with
all the node's CPUs, the others being idle), the others wait and read. The folder is ``data-checks``
in ``$LLAVA_SGG_CACHE``, else in ``$XDG_CACHE_HOME/llava-sgg``, else in ``~/.cache/llava-sgg`` (where
the demo keeps its files). A cache that cannot be read or written is a warning, never an error: the
results are then computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["default_cache_dir", "digest", "load", "locked", "save", "text_array", "text_of"]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    if os.environ.get("LLAVA_SGG_CACHE"):
        return Path(os.environ["LLAVA_SGG_CACHE"]) / "data-checks"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-sgg" / "data-checks"


def digest(value) -> str:
    """SHA-256 of a JSON-serialisable value (keys sorted), hex."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def locked(path: Path):
    """Hold ``path``'s lock file; without one (read-only folder) go on unlocked."""
    from filelock import FileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as e:
        logger.warning("cannot lock %s (%s); going on without the lock", path, e)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    """(arrays, metadata) of a cache file, or None when it is absent or unreadable."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, whatever the damage
        logger.warning("ignoring the unreadable cache file %s (%s)", path, e)
        return None


def save(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write atomically (a reader sees the old file or the new one, never a part)."""
    from safetensors.numpy import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        logger.warning("cannot write the cache file %s (%s); the next run computes it again", path, e)


def text_array(strings: list[str]) -> np.ndarray:
    """Strings as one uint8 array (a JSON list in UTF-8), for a safetensors file."""
    return np.frombuffer(json.dumps(strings).encode(), np.uint8)


def text_of(array: np.ndarray) -> list[str]:
    return json.loads(array.tobytes().decode())
