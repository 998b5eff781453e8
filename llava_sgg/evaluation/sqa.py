"""ScienceQA (IMG) as LLaVA's `eval_science_qa.py`, on the official `problems.json` + `pid_splits.json`.

The predicted letter is the answer text itself when it is one of the options
A-E, else its first letter when the text starts "<letter>. ", else the single
match of the regex `The answer is ([A-Z]).` ('.' any character; zero or two
matches fail). Anything else is FAILED: counted wrong, as in the official
script, and listed in the metrics (`failed`, `failed_ids`). A letter past the
problem's choices is wrong but not FAILED, as in the official script.

Accuracy is over the whole split; IMG accuracy over its problems with an
image. The official script tells those apart by '<image>' in the answer's
prompt, which LLaVA's model_vqa_science.py writes exactly for problems with an
image; this module reads the problem's `image` field, which needs no prompt.
Unlike the official script (which scores a missing answer as FAILED), an
unanswered problem is an error. Accuracies are percentages.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from .answers import (AnswerFileError, answer_texts, format_ids, format_metrics, match_ids, metrics_path, read_json,
                      read_jsonl, write_metrics)

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_option(text: str, options: Sequence[str] = OPTIONS) -> str:
    """The letter eval_science_qa.py reads from an answer text, or FAILED."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def _percent(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else 0.0


def score_sqa(answers: dict, problems: dict, split_ids: Sequence[str], *, options: Sequence[str] = OPTIONS,
              source: str = "answers") -> dict:
    """`answers` {problem id: record}, `problems` problems.json, `split_ids` pid_splits.json[split]."""
    absent = [pid for pid in split_ids if pid not in problems]
    if absent:
        raise AnswerFileError(f"problems: {len(absent)} split id(s) not in problems.json: {format_ids(absent)}")
    bad = [pid for pid in split_ids
           if not isinstance(problems[pid].get("answer"), int)
           or not 0 <= problems[pid]["answer"] < min(len(problems[pid].get("choices", [])), len(options))]
    if bad:
        raise AnswerFileError(f"problems: {len(bad)} problem(s) whose answer is not one of its options "
                              f"{''.join(options)}: {format_ids(bad)}")
    match_ids(answers, split_ids, path=source)
    texts = answer_texts(answers, path=source)

    correct, img_total, img_correct, failed = 0, 0, 0, []
    for pid in split_ids:
        problem = problems[pid]
        letter = parse_option(texts[pid], options)
        if letter == FAILED:
            failed.append(pid)
        choices = options[:len(problem["choices"])]
        right = letter in choices and options.index(letter) == problem["answer"]
        correct += right
        if problem.get("image"):
            img_total += 1
            img_correct += right
    return {
        "benchmark": "sqa", "questions": len(split_ids), "correct": correct,
        "accuracy": _percent(correct, len(split_ids)),
        "img_questions": img_total, "img_correct": img_correct, "img_accuracy": _percent(img_correct, img_total),
        "failed": len(failed), "failed_ids": failed,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `llava-sgg score sqa`."""
    parser.add_argument("--answers", required=True, help="LLaVA answers jsonl (model_vqa_science output)")
    parser.add_argument("--base-dir", required=True, help="folder with ScienceQA's problems.json and pid_splits.json")
    parser.add_argument("--split", default="test", help="split of pid_splits.json (default: test)")
    parser.add_argument("--output", help="metrics JSON (default: <answers>_metrics.json)")


def run(args: argparse.Namespace) -> dict:
    """Score one answers file, print the metrics and write them as JSON."""
    base = Path(args.base_dir)
    problems = read_json(base / "problems.json")
    splits = read_json(base / "pid_splits.json")
    if not isinstance(splits, dict) or args.split not in splits:
        raise AnswerFileError(f"{base / 'pid_splits.json'}: no split {args.split!r}")
    metrics = score_sqa(read_jsonl(args.answers), problems, splits[args.split], source=args.answers)
    print(format_metrics({k: v for k, v in metrics.items() if k != "failed_ids"}))
    if metrics["failed"]:
        print(f"{metrics['failed']} answer(s) with no option letter (counted wrong): "
              + format_ids(metrics["failed_ids"]))
    write_metrics(metrics, metrics_path(args.answers, args.output))
    return metrics
