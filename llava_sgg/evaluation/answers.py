"""Reading question and answer files (LLaVA's jsonl formats), with every problem reported.

An answers file with malformed lines, duplicated ids, or ids missing against
the questions is reported with counts and the offending ids, never scored
silently as right or wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

SHOWN = 10  # ids listed in an error message before "..."


class AnswerFileError(ValueError):
    """An answers / questions / annotations file that cannot be scored as it is."""


def format_ids(ids: Iterable) -> str:
    """The first SHOWN ids of a list, for an error message."""
    ids = list(ids)
    listed = ", ".join(map(repr, ids[:SHOWN]))
    return listed + (f", ... ({len(ids) - SHOWN} more)" if len(ids) > SHOWN else "")


def _parse_jsonl(path: Path, required: tuple[str, ...],
                 strings: tuple[str, ...] = ()) -> tuple[list[tuple[int, dict]], list[str]]:
    """(numbered records, problems): (line number, record) for every line that is a JSON object with the
    required keys and a string under each of ``strings``, and what is wrong with the rest."""
    if not path.is_file():
        raise AnswerFileError(f"{path} does not exist")
    records, problems = [], []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"line {line_number}: not JSON ({error.msg})")
                continue
            absent = [key for key in required if not isinstance(record, dict) or key not in record]
            if absent:
                problems.append(f"line {line_number}: no {', '.join(map(repr, absent))}")
                continue
            # A null or a number is no model output (LLaVA writes the decoded string): refused, not
            # scored as the string "None" or "2".
            wrong = [f"{key!r} is {json.dumps(record[key])}, not a string" for key in strings
                     if key in record and not isinstance(record[key], str)]
            if wrong:
                named = f" (question_id {record['question_id']!r})" if "question_id" in record else ""
                problems.append(f"line {line_number}{named}: {', '.join(wrong)}")
                continue
            records.append((line_number, record))
    return records, problems


def _raise(path: Path, problems: list[str]) -> None:
    if problems:
        raise AnswerFileError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems[:SHOWN]))


def read_jsonl(path: str | os.PathLike, *, id_key: str = "question_id") -> dict:
    """{id: record} from a jsonl file; malformed lines and duplicated ids are errors naming lines and ids."""
    path = Path(path)
    lines, problems = _parse_jsonl(path, (id_key,))
    records, duplicates = {}, []
    for _, record in lines:
        key = record[id_key]
        if key in records:
            duplicates.append(key)
        records[key] = record
    if duplicates:
        problems.append(f"{len(duplicates)} duplicated {id_key}(s): {format_ids(duplicates)}")
    _raise(path, problems)
    return records


def read_jsonl_records(path: str | os.PathLike, *, required: tuple[str, ...] = ("question_id",),
                       strings: tuple[str, ...] = ()) -> list[dict]:
    """Records of a jsonl file in order, ids not necessarily unique (LLaVA's TextVQA answers use the image id).

    A record without a key of ``required``, or with something other than a string under a key of
    ``strings`` (an answer's ``"text": null``), is an error naming its line and question_id.
    """
    return [record for _, record in read_jsonl_numbered(path, required=required, strings=strings)]


def read_jsonl_numbered(path: str | os.PathLike, *, required: tuple[str, ...] = ("question_id",),
                        strings: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """`read_jsonl_records` with each record's line number in the file, for error messages."""
    path = Path(path)
    records, problems = _parse_jsonl(path, required, strings)
    _raise(path, problems)
    return records


def read_json(path: str | os.PathLike):
    """A whole JSON file (annotations, problems.json, ...); missing or malformed is an AnswerFileError."""
    path = Path(path)
    if not path.is_file():
        raise AnswerFileError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AnswerFileError(f"{path}: not JSON ({error.msg}, line {error.lineno})") from None


def match_ids(answers: dict, expected: Iterable, *, path: str | os.PathLike, allow_extra: bool = False) -> None:
    """Every expected id must be answered (and, unless allowed, nothing else)."""
    expected = list(expected)
    expected_set = set(expected)
    missing = [key for key in expected if key not in answers]
    extra = [key for key in answers if key not in expected_set]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} question ids have no answer: {format_ids(missing)}")
    if extra and not allow_extra:
        problems.append(f"{len(extra)} answer ids are not in the questions: {format_ids(extra)}")
    if problems:
        raise AnswerFileError(f"{path}: " + "; ".join(problems))


def answer_texts(answers: dict, *, path: str | os.PathLike) -> dict:
    """{id: text} of an answers dict (LLaVA's `text` field); records without a string `text` are errors."""
    bad = [key for key, record in answers.items() if not isinstance(record.get("text"), str)]
    if bad:
        raise AnswerFileError(f"{path}: {len(bad)} answer(s) without a text string: {format_ids(bad)}")
    return {key: record["text"] for key, record in answers.items()}


def write_metrics(metrics: dict, path: str | os.PathLike) -> Path:
    """Write a scorer's metrics as JSON (next to printing them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=1, sort_keys=False))
    return path


def metrics_path(answers: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Where a scorer writes its metrics: `output`, else `<answers stem>_metrics.json` next to the answers."""
    if output is not None:
        return Path(output)
    answers = Path(answers)
    return answers.with_name(answers.stem + "_metrics.json")


def format_metrics(metrics: dict, *, digits: int = 2) -> str:
    """A two-column table of a scorer's metrics; nested dicts become dotted names, lists are counted."""
    rows = []

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, float):
            rows.append((prefix, f"{value:.{digits}f}"))
        elif isinstance(value, (list, tuple)):
            rows.append((prefix, f"[{len(value)} items]"))
        else:
            rows.append((prefix, str(value)))

    add("", metrics)
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
