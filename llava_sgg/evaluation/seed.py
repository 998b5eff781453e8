"""SEED-Bench: LLaVA's convert_seed_for_submission.py scoring (image, video, overall) and upload file.

Ground truth is the official ``SEED-Bench.json``: ``{"question_type": {name: id}, "questions":
[{"question_id", "question_type_id", "answer", "data_type": "image"|"video", ...}]}``: 9 image
dimensions (question types 1-9, Scene Understanding ... Text Understanding) and 3 video ones
(10-12, Action Recognition, Action Prediction, Procedure Understanding). LLaVA answers the video
questions from one frame, the middle one, which its ``llava-seed-bench.jsonl`` names as an image
path like any other question; so its SEED column (58.6 for LLaVA-1.5-7B) is the overall accuracy
over both parts, and SEED-IMG the image part alone.

As LLaVA computes them: accuracy per question type over all questions, and image, video and
overall accuracy each pooled over their questions (right answers / questions, not a mean of the
per-type accuracies). An answer is right only when its text *is* the answer letter, so "A." or
"(A)" count wrong (they are listed under ``not_a_letter``). Question ids are compared as
strings, as LLaVA's int/str fallback effectively does. Unlike LLaVA's script, which counts an
unanswered question wrong, every question must be answered (``image_only`` scores the image
part alone, without video or overall accuracy).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from .answers import (AnswerFileError, answer_texts, format_ids, format_metrics, match_ids, metrics_path, read_json,
                      read_jsonl, write_metrics)
from .prompts import OPTION_LETTERS

__all__ = ["seed_image_questions", "score_seed", "seed_upload_records", "add_arguments", "run"]


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
        elif question.get("answer") not in OPTION_LETTERS:
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


def _accuracy(hits: list[bool]) -> float | None:
    return 100.0 * sum(hits) / len(hits) if hits else None


def score_seed(annotation: dict, answers: dict, *, source: str = "answers", image_only: bool = False) -> dict:
    """Accuracy per question type, on images, on videos and overall (percent), as LLaVA computes it.

    ``answers`` is ``{question_id: record}`` (ids as numbers or strings). Every question must
    be answered (with ``image_only``, every image question; answers to video questions are
    then counted and left out); ids that are not in the annotation are errors.
    """
    questions, type_names = _validate(annotation, source="SEED-Bench.json")
    texts = answer_texts(_by_string_id(answers, source=source), path=source)
    unknown = [key for key in texts if key not in questions]
    if unknown:
        raise AnswerFileError(f"{source}: {len(unknown)} answer ids are not in SEED-Bench.json: {format_ids(unknown)} "
                              "(is SEED-Bench.json the version the question file was made from?)")
    scored = [key for key, question in questions.items() if not image_only or question["data_type"] == "image"]
    missing = [key for key in scored if key not in texts]
    if missing:
        video = sum(questions[key]["data_type"] == "video" for key in missing)
        raise AnswerFileError(
            f"{source}: {len(missing)} of {len(scored)} questions of SEED-Bench.json have no answer: "
            f"{format_ids(missing)}"
            + (f"; {video} of them are video questions, which LLaVA answers from their middle frame "
               "(llava-seed-bench.jsonl names it); --image-only scores the image part alone" if video else ""))
    hits = {key: texts[key] == questions[key]["answer"] for key in scored}
    per_type = defaultdict(list)
    for key in scored:
        per_type[questions[key]["question_type_id"]].append(hits[key])
    part = {data_type: [hits[key] for key in scored if questions[key]["data_type"] == data_type]
            for data_type in ("image", "video")}
    not_a_letter = [key for key in scored if texts[key] not in OPTION_LETTERS]
    metrics = {
        "benchmark": "seed",
        "questions": len(scored),
        "image_questions": len(part["image"]),
        "video_questions": len(part["video"]),
        "overall_accuracy": None if image_only else _accuracy(list(hits.values())),
        "image_accuracy": _accuracy(part["image"]),
        "video_accuracy": None if image_only else _accuracy(part["video"]),
        "per_type": {type_names[type_id]: {"questions": len(per_type[type_id]),
                                           "accuracy": _accuracy(per_type[type_id])}
                     for type_id in sorted(per_type)},
        "not_a_letter": len(not_a_letter),
        "not_a_letter_ids": not_a_letter,
        "note": "an answer is right only when its text is exactly the answer letter (LLaVA); others count wrong",
    }
    if image_only:
        metrics["video_answers_ignored"] = sum(questions[key]["data_type"] == "video" for key in texts)
        metrics["note"] += "; image part only (--image-only): not LLaVA-1.5's SEED column, which is overall"
    return metrics


def seed_upload_records(annotation: dict, answers: dict, *, source: str = "answers",
                        image_only: bool = False) -> list[dict]:
    """LLaVA's upload file: ``{"question_id", "prediction"}`` for every question, in the annotation's order.

    The ids keep the annotation's spelling; the prediction is the answer text as generated.
    With ``image_only``, the image questions alone. An unanswered question is an error.
    """
    questions, _ = _validate(annotation, source="SEED-Bench.json")
    texts = answer_texts(_by_string_id(answers, source=source), path=source)
    wanted = [key for key, question in questions.items() if not image_only or question["data_type"] == "image"]
    match_ids(texts, wanted, path=source, allow_extra=True)
    return [{"question_id": questions[key]["question_id"], "prediction": texts[key]} for key in wanted]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotation", required=True, metavar="JSON", help="the official SEED-Bench.json")
    parser.add_argument("--answers", required=True, metavar="JSONL", help="LLaVA's answers on llava-seed-bench.jsonl")
    parser.add_argument("--questions", metavar="JSONL",
                        help="the question file the answers came from; if given, each of its questions must be "
                             "answered and nothing else")
    parser.add_argument("--output", metavar="JSON", help="metrics file (default: <answers>_metrics.json)")
    parser.add_argument("--upload", metavar="JSONL",
                        help="the leaderboard upload file (default: <answers>_upload.jsonl next to the answers)")
    parser.add_argument("--image-only", action="store_true",
                        help="score the image questions alone (SEED-IMG), without the video part LLaVA-1.5's "
                             "SEED column includes; video answers, if any, are left out of the metrics and the upload")


def run(args: argparse.Namespace) -> dict:
    """Score, print the table, write the metrics JSON and the upload jsonl."""
    answers_path = Path(args.answers)
    annotation = read_json(args.annotation)
    answers = read_jsonl(answers_path)
    if args.questions is not None:
        asked = _by_string_id(read_jsonl(args.questions), source=args.questions)
        match_ids(_by_string_id(answers, source=str(answers_path)), asked, path=answers_path)
    metrics = score_seed(annotation, answers, source=str(answers_path), image_only=args.image_only)
    print(format_metrics(metrics))
    if metrics["not_a_letter"]:
        print(f"{metrics['not_a_letter']} answer(s) not a bare letter A-D, counted wrong: "
              + format_ids(metrics["not_a_letter_ids"]))
    upload = Path(args.upload) if args.upload else answers_path.with_name(answers_path.stem + "_upload.jsonl")
    upload.parent.mkdir(parents=True, exist_ok=True)
    records = seed_upload_records(annotation, answers, source=str(answers_path), image_only=args.image_only)
    upload.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    print(f"wrote {upload} ({len(records)} predictions)")
    print(f"wrote {write_metrics(metrics, metrics_path(answers_path, args.output))}")
    return metrics
