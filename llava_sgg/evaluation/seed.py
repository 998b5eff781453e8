"""SEED-Bench, image part: LLaVA's convert_seed_for_submission.py scoring and upload file.

Ground truth is the official ``SEED-Bench.json``: ``{"question_type": {name: id}, "questions":
[{"question_id", "question_type_id", "answer", "data_type": "image"|"video", ...}]}``. The 9
image dimensions are question types 1-9 (Scene Understanding ... Text Understanding).
Answers are LLaVA's jsonl on ``llava-seed-bench.jsonl``, asked to reply with the option's
letter; as in LLaVA an answer is right only when its text *is* the answer letter, so
"A." or "(A)" count wrong (they are listed under ``not_a_letter``). Question ids are
compared as strings, as LLaVA's int/str fallback effectively does.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from .answers import (AnswerFileError, answer_texts, format_ids, format_metrics, match_ids, metrics_path, read_json,
                      read_jsonl, write_metrics)

__all__ = ["LETTERS", "seed_image_questions", "score_seed", "seed_upload_records", "add_arguments", "run"]

LETTERS = ("A", "B", "C", "D")


def _by_string_id(records: dict, *, source) -> dict:
    # LLaVA's question files and SEED-Bench.json disagree on int vs string ids.
    result = {}
    for key, value in records.items():
        if str(key) in result:
            raise AnswerFileError(f"{source}: question_id {key!r} appears both as a number and as a string")
        result[str(key)] = value
    return result


def _validate(annotation: dict, *, source) -> tuple[dict[str, dict], dict[int, str]]:
    """({question_id: question}, {type id: type name}) of a SEED-Bench.json, problems named."""
    if not isinstance(annotation, dict) or not isinstance(annotation.get("questions"), list) \
            or not isinstance(annotation.get("question_type"), dict):
        raise AnswerFileError(f"{source}: not SEED-Bench.json ({{'questions': [...], 'question_type': {{...}}}})")
    type_names = {type_id: name for name, type_id in annotation["question_type"].items()}
    questions, problems = {}, defaultdict(list)
    for position, question in enumerate(annotation["questions"]):
        if not isinstance(question, dict) or "question_id" not in question:
            problems["no question_id"].append(f"questions[{position}]")
            continue
        question_id = str(question["question_id"])
        if question_id in questions:
            problems["a duplicated question_id"].append(question_id)
        elif question.get("answer") not in LETTERS:
            problems["an answer that is not A-D"].append(question_id)
        elif question.get("question_type_id") not in type_names:
            problems["a question_type_id not in question_type"].append(question_id)
        elif question.get("data_type") not in ("image", "video"):
            problems["a data_type neither image nor video"].append(question_id)
        questions[question_id] = question
    if problems:
        raise AnswerFileError(f"{source}: " + "; ".join(f"{len(ids)} question(s) with {what}: {format_ids(ids)}"
                                                       for what, ids in problems.items()))
    return questions, type_names


def seed_image_questions(annotation: dict, *, source: str = "SEED-Bench.json") -> dict[str, dict]:
    """{question_id (str): question} of the image part, in the annotation's order."""
    questions, _ = _validate(annotation, source=source)
    return {key: question for key, question in questions.items() if question["data_type"] == "image"}


def score_seed(annotation: dict, answers: dict, *, source: str = "answers") -> dict:
    """Accuracy per image question type and over the image part (percent), as LLaVA computes it.

    ``answers`` is ``{question_id: record}`` (ids as numbers or strings). Every image question
    must be answered; answers to video questions are counted and left out; ids that are not
    in the annotation are errors.
    """
    questions, type_names = _validate(annotation, source="SEED-Bench.json")
    texts = answer_texts(_by_string_id(answers, source=source), path=source)
    image = [key for key, question in questions.items() if question["data_type"] == "image"]
    unknown = [key for key in texts if key not in questions]
    if unknown:
        raise AnswerFileError(f"{source}: {len(unknown)} answer ids are not in SEED-Bench.json: {format_ids(unknown)}")
    match_ids(texts, image, path=source, allow_extra=True)
    per_type = defaultdict(list)
    for key in image:
        per_type[questions[key]["question_type_id"]].append(texts[key] == questions[key]["answer"])
    not_a_letter = [key for key in image if texts[key] not in LETTERS]
    hits = [hit for type_hits in per_type.values() for hit in type_hits]
    return {
        "benchmark": "seed",
        "questions": len(image),
        "image_accuracy": 100.0 * sum(hits) / len(hits),
        "per_type": {type_names[type_id]: {"questions": len(per_type[type_id]),
                                           "accuracy": 100.0 * sum(per_type[type_id]) / len(per_type[type_id])}
                     for type_id in sorted(per_type)},
        "video_answers_ignored": sum(questions[key]["data_type"] == "video" for key in texts),
        "not_a_letter": len(not_a_letter),
        "not_a_letter_ids": not_a_letter,
        "note": "an answer is right only when its text is exactly the answer letter (LLaVA); others count wrong",
    }


def seed_upload_records(annotation: dict, answers: dict, *, source: str = "answers") -> list[dict]:
    """LLaVA's upload file: ``{"question_id", "prediction"}`` for every answered question, in the annotation's order.

    The ids keep the annotation's spelling; the prediction is the answer text as generated.
    """
    questions, _ = _validate(annotation, source="SEED-Bench.json")
    texts = answer_texts(_by_string_id(answers, source=source), path=source)
    return [{"question_id": question["question_id"], "prediction": texts[key]}
            for key, question in questions.items() if key in texts]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotation", required=True, metavar="JSON", help="the official SEED-Bench.json")
    parser.add_argument("--answers", required=True, metavar="JSONL", help="LLaVA's answers on llava-seed-bench.jsonl")
    parser.add_argument("--questions", metavar="JSONL",
                        help="the question file the answers came from; if given, each of its questions must be "
                             "answered and nothing else")
    parser.add_argument("--output", metavar="JSON", help="metrics file (default: <answers>_metrics.json)")
    parser.add_argument("--upload", metavar="JSONL",
                        help="the leaderboard upload file (default: <answers>_upload.jsonl next to the answers)")


def run(args: argparse.Namespace) -> dict:
    """Score the image part, print the table, write the metrics JSON and the upload jsonl."""
    answers_path = Path(args.answers)
    annotation = read_json(args.annotation)
    answers = read_jsonl(answers_path)
    if args.questions is not None:
        asked = _by_string_id(read_jsonl(args.questions), source=args.questions)
        match_ids(_by_string_id(answers, source=str(answers_path)), asked, path=answers_path)
    metrics = score_seed(annotation, answers, source=str(answers_path))
    print(format_metrics(metrics))
    if metrics["not_a_letter"]:
        print(f"{metrics['not_a_letter']} answer(s) not a bare letter A-D, counted wrong: "
              + format_ids(metrics["not_a_letter_ids"]))
    upload = Path(args.upload) if args.upload else answers_path.with_name(answers_path.stem + "_upload.jsonl")
    upload.parent.mkdir(parents=True, exist_ok=True)
    records = seed_upload_records(annotation, answers, source=str(answers_path))
    upload.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    print(f"wrote {upload} ({len(records)} predictions)")
    print(f"wrote {write_metrics(metrics, metrics_path(answers_path, args.output))}")
    return metrics
