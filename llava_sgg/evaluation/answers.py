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


def _ids(ids: Iterable) -> str:
    ids = list(ids)
    listed = ", ".join(map(repr, ids[:SHOWN]))
    return listed + (f", ... ({len(ids) - SHOWN} more)" if len(ids) > SHOWN else "")


def read_jsonl(path: str | os.PathLike, *, id_key: str = "question_id") -> dict:
    """{id: record} from a jsonl file; malformed lines and duplicated ids are errors naming lines and ids."""
    path = Path(path)
    if not path.is_file():
        raise AnswerFileError(f"{path} does not exist")
    records, problems, duplicates = {}, [], []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"line {line_number}: not JSON ({error.msg})")
                continue
            if not isinstance(record, dict) or id_key not in record:
                problems.append(f"line {line_number}: no {id_key!r}")
                continue
            key = record[id_key]
            if key in records:
                duplicates.append(key)
            records[key] = record
    if duplicates:
        problems.append(f"{len(duplicates)} duplicated {id_key}(s): {_ids(duplicates)}")
    if problems:
        raise AnswerFileError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems[:SHOWN]))
    return records


def match_ids(answers: dict, expected: Iterable, *, path: str | os.PathLike, allow_extra: bool = False) -> None:
    """Every expected id must be answered (and, unless allowed, nothing else)."""
    expected = list(expected)
    expected_set = set(expected)
    missing = [key for key in expected if key not in answers]
    extra = [key for key in answers if key not in expected_set]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} question ids have no answer: {_ids(missing)}")
    if extra and not allow_extra:
        problems.append(f"{len(extra)} answer ids are not in the questions: {_ids(extra)}")
    if problems:
        raise AnswerFileError(f"{path}: " + "; ".join(problems))


def write_metrics(metrics: dict, path: str | os.PathLike) -> Path:
    """Write a scorer's metrics as JSON (next to printing them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=1, sort_keys=False))
    return path
