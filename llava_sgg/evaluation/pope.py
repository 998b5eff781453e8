"""POPE as LLaVA's `eval_pope.py`, per category (adversarial, popular, random).

An answer is "no" when its first sentence (text before the first '.'), with
commas removed and split on single spaces, contains the word "No", "not" or
"no"; anything else is "yes" ("NO" and "Nope" are yes, as in the official
script). A label is positive unless it is "no"; labels other than yes / no are
reported as errors here.

The official script pairs the k-th answer of a category with the k-th line of
`coco_pope_<category>.json` by position. This module does the same, taking the
category's questions in question-file order and their answers by question_id,
and checks that each pair shows the same image and question (when both files
have them), so a reordered file is an error instead of a wrong number.

Metrics are fractions, like the official printout; LLaVA-1.5's POPE number is
the mean F1 over the three categories (`f1_average`). Where the official script
would divide by zero (no "yes" predicted, ...) the metric is 0.0.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .answers import AnswerFileError, answer_texts, format_ids, match_ids, metrics_path, read_jsonl, write_metrics

PREFIX, SUFFIX = "coco_pope_", ".json"


def pope_answer(text: str) -> str:
    """'yes' or 'no' for one answer text, as eval_pope.py."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of yes / no predictions ("yes" is positive)."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(1 for p, y in pairs if p == "yes" and y == "yes")
    fp = sum(1 for p, y in pairs if p == "yes" and y == "no")
    tn = sum(1 for p, y in pairs if p == "no" and y == "no")
    fn = sum(1 for p, y in pairs if p == "no" and y == "yes")
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "questions": len(pairs), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": _ratio(tp + tn, len(pairs)), "precision": precision, "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(predictions.count("yes"), len(pairs)),
    }


def _pair_problems(category: str, questions: list[dict], labels: list[dict]) -> list[str]:
    """Why the k-th question and the k-th label line of a category are not the same question."""
    if len(questions) != len(labels):
        return [f"{category}: {len(questions)} questions but {len(labels)} labels"]
    mismatched = []
    for question, label in zip(questions, labels):
        image, labelled_image = question.get("image"), label.get("image")
        asked, labelled = question.get("text"), label.get("text")
        # LLaVA's question text may append an instruction after the label file's question.
        if (image is not None and labelled_image is not None and image != labelled_image) or (
                asked is not None and labelled is not None and not asked.strip().startswith(labelled.strip())):
            mismatched.append(question["question_id"])
    if mismatched:
        return [f"{category}: {len(mismatched)} question(s) differ from the label line at their position: "
                + format_ids(mismatched)]
    return []


def score_pope(answers: dict, questions: dict, labels: dict[str, list[dict]], *, source: str = "answers") -> dict:
    """`answers` and `questions` {question_id: record} (questions carry `category`), `labels` {category: lines}."""
    match_ids(answers, questions, path=source)
    texts = answer_texts(answers, path=source)
    by_category: dict[str, list[dict]] = {}
    for question in questions.values():
        by_category.setdefault(question.get("category"), []).append(question)
    problems = []
    unlabelled = [c for c in by_category if c not in labels]
    if unlabelled:
        problems.append(f"question categories with no {PREFIX}<category>{SUFFIX}: {format_ids(unlabelled)}")
    unasked = [c for c in labels if c not in by_category]
    if unasked:
        problems.append(f"label files with no question of their category: {format_ids(unasked)}")
    for category, lines in labels.items():
        bad = [line.get("question_id") for line in lines if line.get("label") not in ("yes", "no")]
        if bad:
            problems.append(f"{category}: {len(bad)} label(s) neither 'yes' nor 'no': {format_ids(bad)}")
        if category in by_category:
            problems += _pair_problems(category, by_category[category], lines)
    if problems:
        raise AnswerFileError("POPE questions / labels: " + "; ".join(problems))

    categories = {}
    for category in sorted(labels):
        predictions = [pope_answer(texts[q["question_id"]]) for q in by_category[category]]
        categories[category] = binary_metrics(predictions, [line["label"] for line in labels[category]])
    f1 = [metrics["f1"] for metrics in categories.values()]
    return {"benchmark": "pope", "categories": categories, "f1_average": sum(f1) / len(f1),
            "accuracy_average": sum(m["accuracy"] for m in categories.values()) / len(categories)}


def format_table(metrics: dict) -> str:
    """One row per category, as eval_pope.py prints them (fractions), then the mean F1."""
    columns = ("questions", "tp", "fp", "tn", "fn", "accuracy", "precision", "recall", "f1", "yes_ratio")
    width = max(len("category"), *(len(c) for c in metrics["categories"]))
    rows = [f"{'category':<{width}}  " + "  ".join(f"{c:>9}" for c in columns)]
    for category, values in metrics["categories"].items():
        cells = (f"{values[c]:>9.4f}" if isinstance(values[c], float) else f"{values[c]:>9}" for c in columns)
        rows.append(f"{category:<{width}}  " + "  ".join(cells))
    rows.append(f"F1 average over {len(metrics['categories'])} categories: {metrics['f1_average']:.4f}")
    return "\n".join(rows)


def read_labels(annotation_dir: str | Path) -> dict[str, list[dict]]:
    """{category: label lines in file order} from the `coco_pope_<category>.json` files of a folder."""
    folder = Path(annotation_dir)
    if not folder.is_dir():
        raise AnswerFileError(f"{folder} is not a folder")
    files = sorted(folder.glob(f"{PREFIX}*{SUFFIX}"))
    if not files:
        raise AnswerFileError(f"{folder}: no {PREFIX}<category>{SUFFIX} files")
    return {path.name[len(PREFIX):-len(SUFFIX)]: list(read_jsonl(path).values()) for path in files}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `llava-sgg score pope`."""
    parser.add_argument("--answers", required=True, help="LLaVA answers jsonl")
    parser.add_argument("--questions", required=True, help="llava_pope_test.jsonl (question_id, category)")
    parser.add_argument("--annotation-dir", required=True, help="folder of coco_pope_<category>.json label files")
    parser.add_argument("--output", help="metrics JSON (default: <answers>_metrics.json)")


def run(args: argparse.Namespace) -> dict:
    """Score one answers file, print the metrics and write them as JSON."""
    metrics = score_pope(read_jsonl(args.answers), read_jsonl(args.questions), read_labels(args.annotation_dir),
                         source=args.answers)
    print(format_table(metrics))
    write_metrics(metrics, metrics_path(args.answers, args.output))
    return metrics
