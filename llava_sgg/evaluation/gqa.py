"""GQA accuracy as LLaVA reports it: `convert_gqa_for_eval.py`, then the official GQA `eval.py`.

The conversion turns each answer into {"questionId": question_id, "prediction":
text.rstrip('.').lower()} (only trailing periods go; spaces stay). The official
evaluator compares a prediction with the annotation's `answer` by plain string
equality, over the questions with `isBalanced` (all of testdev_balanced), and
splits the accuracy into binary / open (open: structural type "query") and per
structural and semantic type. Validity, plausibility and distribution need
files that GQA v1.2 testdev lacks (LLaVA patches them out) and are not computed.

Question ids are compared as strings, as they are keys of the official
questions JSON. Accuracies are percentages, like the official printout.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from .answers import (AnswerFileError, answer_texts, format_ids, format_metrics, match_ids, metrics_path, read_json,
                      read_jsonl, write_metrics)


def gqa_prediction(text: str) -> str:
    """The prediction `convert_gqa_for_eval.py` writes for one answer text."""
    return text.rstrip(".").lower()


def convert_gqa_for_eval(answers: dict, *, source: str = "answers") -> list[dict]:
    """The official evaluator's predictions file, [{"questionId", "prediction"}], in answer order."""
    texts = answer_texts(answers, path=source)
    return [{"questionId": qid, "prediction": gqa_prediction(text)} for qid, text in texts.items()]


def _percent(scores: list[float]) -> float:
    if not scores:
        raise AnswerFileError("no balanced questions to score")
    return 100.0 * sum(scores) / len(scores)


def score_gqa(predictions: list[dict], questions: dict, *, source: str = "predictions") -> dict:
    """Accuracy of a predictions file against the official questions {questionId: {"answer", "types", ...}}."""
    by_id, duplicates = {}, []
    for prediction in predictions:
        key = str(prediction["questionId"])
        if key in by_id:
            duplicates.append(key)
        by_id[key] = prediction["prediction"]
    if duplicates:
        raise AnswerFileError(f"{source}: {len(duplicates)} duplicated questionId(s): {format_ids(duplicates)}")
    balanced = [qid for qid, question in questions.items() if question.get("isBalanced", True)]
    no_answer = [qid for qid in balanced if "answer" not in questions[qid]]
    if no_answer:
        raise AnswerFileError(f"questions: {len(no_answer)} question(s) without an answer: {format_ids(no_answer)}")
    # The official eval.py asks a prediction for every balanced question and ignores the others.
    match_ids(by_id, balanced, path=source, allow_extra=True)
    unknown = [qid for qid in by_id if qid not in questions]
    if unknown:
        raise AnswerFileError(f"{source}: {len(unknown)} questionId(s) are not in the questions: {format_ids(unknown)}")

    scores = {qid: float(by_id[qid] == questions[qid]["answer"]) for qid in balanced}
    metrics = {"benchmark": "gqa", "questions": len(scores), "accuracy": _percent(list(scores.values()))}
    if all({"structural", "semantic"} <= set(questions[qid].get("types") or ()) for qid in balanced):
        kinds = defaultdict(list)
        structural, semantic = defaultdict(list), defaultdict(list)
        for qid, score in scores.items():
            types = questions[qid]["types"]
            kinds["open" if types["structural"] == "query" else "binary"].append(score)
            structural[types["structural"]].append(score)
            semantic[types["semantic"]].append(score)
        for kind in ("binary", "open"):
            metrics[kind] = _percent(kinds[kind]) if kinds[kind] else 0.0  # eval.py's avg([]) is 0
        metrics["per_structural_type"] = {t: _percent(s) for t, s in sorted(structural.items())}
        metrics["per_semantic_type"] = {t: _percent(s) for t, s in sorted(semantic.items())}
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `llava-sgg score gqa`."""
    parser.add_argument("--answers", required=True, help="LLaVA answers jsonl (llava_gqa_testdev_balanced)")
    parser.add_argument("--questions", required=True, help="official testdev_balanced_questions.json")
    parser.add_argument("--predictions", help="where to write the official evaluator's predictions file "
                        "(default: <answers>_predictions.json)")
    parser.add_argument("--output", help="metrics JSON (default: <answers>_metrics.json)")


def run(args: argparse.Namespace) -> dict:
    """Convert the answers to the official predictions file, score it, print and write the metrics."""
    predictions = convert_gqa_for_eval(read_jsonl(args.answers), source=args.answers)
    answers_path = Path(args.answers)
    predictions_path = (Path(args.predictions) if args.predictions
                        else answers_path.with_name(answers_path.stem + "_predictions.json"))
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    predictions_path.write_text(json.dumps(predictions))
    questions = read_json(args.questions)
    if not isinstance(questions, dict):
        raise AnswerFileError(f"{args.questions}: expected {{questionId: question}}")
    metrics = score_gqa(predictions, questions, source=args.answers)
    metrics["predictions"] = str(predictions_path)
    print(format_metrics(metrics))
    write_metrics(metrics, metrics_path(args.answers, args.output))
    return metrics
