"""VQA accuracy for VQAv2, VizWiz and TextVQA, and the VQAv2 / VizWiz upload files.

All three score a question the same way: the mean, over the 10 ways of leaving
one of the 10 human answers out, of min(1, humans among the other nine who gave
the prediction / 3). A prediction matching 2 humans scores (8 * 2/3 + 2 * 1/3) / 10
= 0.6, 3 humans 0.9, 4 or more 1.0. They differ in which strings are compared:

* VQAv2 (vqaEval.py of the VQA challenge, after LLaVA's
  `convert_vqav2_for_submission.py`): the prediction goes through LLaVA's
  EvalAIAnswerProcessor when the upload file is written; the evaluator then
  normalises the prediction and the human answers again only when the humans
  disagree. When all ten gave the same string it is compared raw, so a human
  "t-shirt" x10 never matches (the prediction became "t shirt").
* VizWiz (the VizWiz API's vqaEval.py, after `convert_vizwiz_for_submission.py`):
  the prediction is always normalised, the human answers never. (The API's
  contraction table writes ’ where VQA's writes '; after EvalAIAnswerProcessor
  that differs only for predictions typed with ’, and this module uses VQA's.)
* TextVQA (LLaVA `eval_textvqa.py` -> m4c `TextVQAAccuracyEvaluator`): the
  prediction and every human answer go through EvalAIAnswerProcessor.

TextVQA matching: LLaVA's question file puts the *image* id in `question_id`
(not unique: 5000 questions on 3166 images), and `eval_textvqa.py` finds the
annotation by (that id, the question read back from the prompt, lowercased).
`match="prompt"` (the default) does the same, and checks that every annotation
is answered exactly as often as it appears. `match="question_id"` is for
question files that carry TextVQA's own `question_id`.

VQAv2 test-dev and VizWiz test are scored only by the EvalAI servers: `run`
writes the upload file (VQAv2: [{"question_id", "answer"}] over all test2015
questions, "" for those outside the answered split, as LLaVA does; VizWiz:
[{"image", "answer"}] over every test question). Unlike LLaVA's scripts, a
malformed line or an unanswered question of the answered split is an error.

Accuracies are percentages, like the official printouts (unrounded here).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from .answers import (AnswerFileError, answer_texts, format_ids, format_metrics, match_ids, metrics_path, read_json,
                      read_jsonl, read_jsonl_numbered, write_metrics)
from .normalize import clean_whitespace, evalai_answer, vqa_normalize

BENCHMARKS = ("vqav2", "vizwiz", "textvqa")
HUMANS = 10  # human answers per question in all three datasets
TEXTVQA_MATCHES = ("prompt", "question_id")


def leave_one_out_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of min(1, matching humans / 3) (as a fraction)."""
    scores = []
    for left_out in range(len(human_answers)):
        matches = sum(1 for i, human in enumerate(human_answers) if i != left_out and human == prediction)
        scores.append(min(1, float(matches) / 3))
    return float(sum(scores)) / len(scores)


def vqav2_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One VQAv2 question: EvalAIAnswerProcessor (upload file), then vqaEval.py."""
    prediction = clean_whitespace(evalai_answer(prediction))
    humans = [clean_whitespace(answer) for answer in human_answers]
    if len(set(humans)) > 1:  # vqaEval normalises only when the humans disagree
        humans = [vqa_normalize(answer) for answer in humans]
        prediction = vqa_normalize(prediction)
    return leave_one_out_accuracy(prediction, humans)


def vizwiz_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One VizWiz question: EvalAIAnswerProcessor (upload file), then the VizWiz API (human answers raw)."""
    return leave_one_out_accuracy(vqa_normalize(clean_whitespace(evalai_answer(prediction))), list(human_answers))


def textvqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One TextVQA question: m4c TextVQAAccuracyEvaluator."""
    return leave_one_out_accuracy(evalai_answer(prediction), [evalai_answer(answer) for answer in human_answers])


def textvqa_question(prompt: str) -> str | None:
    """The question in a LLaVA TextVQA prompt, lowercased (`prompt_processor` of eval_textvqa.py); None if unknown."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        found = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = found.group(1) if found else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    return None if question is None else question.lower()


def _check_human_answers(annotations: Sequence[dict], *, key: str, source: str) -> None:
    wrong = [annotation.get(key) for annotation in annotations
             if len(annotation["answers"]) != HUMANS
             or not all(isinstance(a["answer"] if isinstance(a, dict) else a, str) for a in annotation["answers"])]
    if wrong:
        raise AnswerFileError(f"{source}: {len(wrong)} {key}(s) without {HUMANS} human answer strings: "
                              + format_ids(wrong))


def _human_answers(annotations: Sequence[dict], *, key: str, source: str) -> dict:
    """{key: [10 answer strings]}; answers given as strings (TextVQA) or {"answer": ...} (VQAv2, VizWiz)."""
    _check_human_answers(annotations, key=key, source=source)
    humans, duplicates = {}, []
    for annotation in annotations:
        if annotation[key] in humans:
            duplicates.append(annotation[key])
        humans[annotation[key]] = [a["answer"] if isinstance(a, dict) else a for a in annotation["answers"]]
    if duplicates:
        raise AnswerFileError(f"{source}: {len(duplicates)} duplicated {key}(s): {format_ids(duplicates)}")
    return humans


def _percent(scores: Sequence[float]) -> float:
    if not scores:
        raise AnswerFileError("no questions to score")
    return 100.0 * float(sum(scores)) / len(scores)


def _grouped(scores: dict, groups: dict) -> dict:
    """{group: accuracy %} over the questions of each group (vqaEval's perAnswerType / perQuestionType)."""
    members = defaultdict(list)
    for key, group in groups.items():
        members[group].append(scores[key])
    return {group: _percent(values) for group, values in sorted(members.items())}


def score_vqav2(answers: dict, annotations: Sequence[dict], *, source: str = "answers") -> dict:
    """VQAv2 accuracy (val): `answers` {question_id: answer record}, `annotations` the official annotation list."""
    humans = _human_answers(annotations, key="question_id", source="annotations")
    match_ids(answers, humans, path=source)
    texts = answer_texts(answers, path=source)
    scores = {qid: vqav2_accuracy(texts[qid], humans[qid]) for qid in humans}
    metrics = {"benchmark": "vqav2", "questions": len(scores), "accuracy": _percent(list(scores.values()))}
    for field, name in (("answer_type", "per_answer_type"), ("question_type", "per_question_type")):
        if all(field in annotation for annotation in annotations):
            metrics[name] = _grouped(scores, {a["question_id"]: a[field] for a in annotations})
    return metrics


def score_vizwiz(answers: dict, questions: dict, annotations: Sequence[dict], *, source: str = "answers") -> dict:
    """VizWiz accuracy (val): answers and questions by question_id, questions name the `image` annotated."""
    humans = _human_answers(annotations, key="image", source="annotations")
    match_ids(answers, questions, path=source)
    images = {qid: question.get("image") for qid, question in questions.items()}
    unknown = [qid for qid, image in images.items() if image not in humans]
    unasked = sorted(set(humans) - set(images.values()))
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} question(s) whose image has no annotation: {format_ids(unknown)}")
    if unasked:
        problems.append(f"{len(unasked)} annotated image(s) with no question: {format_ids(unasked)}")
    if problems:
        raise AnswerFileError("questions: " + "; ".join(problems))
    texts = answer_texts(answers, path=source)
    scores = {qid: vizwiz_accuracy(texts[qid], humans[images[qid]]) for qid in questions}
    metrics = {"benchmark": "vizwiz", "questions": len(scores), "accuracy": _percent(list(scores.values()))}
    if all("answer_type" in annotation for annotation in annotations):
        answer_types = {a["image"]: a["answer_type"] for a in annotations}
        metrics["per_answer_type"] = _grouped(scores, {qid: answer_types[images[qid]] for qid in questions})
    return metrics


def _textvqa_by_prompt(answers: Sequence[dict], annotations: Sequence[dict], lines: Sequence[int],
                       source: str) -> list[tuple[str, list]]:
    by_key, expected = {}, Counter()
    for annotation in annotations:
        key = (annotation["image_id"], annotation["question"].lower())
        by_key[key] = annotation["answers"]  # the last one wins, as in eval_textvqa.py's dict
        expected[key] += 1
    keys, unreadable = [], []
    for line, answer in zip(lines, answers):
        question = textvqa_question(answer.get("prompt") or "")
        if question is None:
            unreadable.append(f"line {line} ({answer['question_id']!r})")
        keys.append((answer["question_id"], question))
    if unreadable:
        raise AnswerFileError(f"{source}: {len(unreadable)} prompt(s) with no TextVQA question in LLaVA's formats: "
                              + format_ids(unreadable))
    answered = defaultdict(list)  # key -> lines of its answers
    for line, key in zip(lines, keys):
        answered[key].append(line)
    missing = expected - Counter({key: len(found) for key, found in answered.items()})
    unknown = [f"line {line}: {key}" for key, found in answered.items() if key not in expected for line in found]
    # eval_textvqa.py scores every line, so a question answered twice would count twice; here it is an error.
    repeated = [f"{key} on lines {', '.join(map(str, found))}" for key, found in answered.items()
                if key in expected and len(found) > expected[key]]
    problems = []
    if missing:
        problems.append(f"{sum(missing.values())} of {len(annotations)} (image_id, question) pairs have no answer: "
                        + format_ids(missing.elements()))
    if unknown:
        problems.append(f"{len(unknown)} answer(s) with no (image_id, question) in the annotations: "
                        + format_ids(unknown))
    if repeated:
        problems.append(f"{len(repeated)} (image_id, question) pair(s) answered more often than annotated: "
                        + format_ids(repeated))
    if problems:
        raise AnswerFileError(f"{source}: " + "; ".join(problems))
    return [(answer["text"], by_key[key]) for answer, key in zip(answers, keys)]


def _textvqa_by_question_id(answers: Sequence[dict], annotations: Sequence[dict], source: str) -> list:
    by_id, duplicates = {}, []
    for answer in answers:
        if answer["question_id"] in by_id:
            duplicates.append(answer["question_id"])
        by_id[answer["question_id"]] = answer
    if duplicates:
        raise AnswerFileError(f"{source}: {len(duplicates)} duplicated question_id(s): {format_ids(duplicates)}")
    humans = _human_answers(annotations, key="question_id", source="annotations")
    match_ids(by_id, humans, path=source)
    return [(by_id[qid]["text"], human) for qid, human in humans.items()]


def score_textvqa(answers: Sequence[dict], annotations: Sequence[dict], *, match: str = "prompt",
                  source: str = "answers", lines: Sequence[int] | None = None) -> dict:
    """TextVQA accuracy: `answers` the answer records in file order, `annotations` TextVQA_0.5.1_val.json's data.

    ``lines`` are the answers' line numbers in ``source``, for error messages (default 1, 2, ...).
    """
    if match not in TEXTVQA_MATCHES:
        raise ValueError(f"unknown TextVQA match {match!r}; known: {', '.join(TEXTVQA_MATCHES)}")
    lines = list(range(1, len(answers) + 1)) if lines is None else list(lines)
    answer_texts(dict(zip(lines, answers)), path=source)
    if match == "prompt":
        _check_human_answers(annotations, key="question_id", source="annotations")
        pairs = _textvqa_by_prompt(answers, annotations, lines, source)
    else:
        pairs = _textvqa_by_question_id(answers, annotations, source)
    scores = [textvqa_accuracy(text, human) for text, human in pairs]
    return {"benchmark": "textvqa", "questions": len(scores), "accuracy": _percent(scores)}


def convert_vqav2_for_submission(answers: dict, test_question_ids: Sequence, split_question_ids: Sequence,
                                 *, source: str = "answers") -> list[dict]:
    """EvalAI upload: every test2015 question, the answered split's through EvalAIAnswerProcessor, others ""."""
    match_ids(answers, split_question_ids, path=source)
    outside = sorted(set(split_question_ids) - set(test_question_ids), key=str)
    if outside:
        raise AnswerFileError(f"{len(outside)} question(s) of the answered split are not test questions: "
                              + format_ids(outside))
    texts = answer_texts(answers, path=source)
    return [{"question_id": qid, "answer": evalai_answer(texts[qid]) if qid in texts else ""}
            for qid in test_question_ids]


def convert_vizwiz_for_submission(answers: dict, questions: dict, *, source: str = "answers") -> list[dict]:
    """EvalAI upload: [{"image", "answer"}] for every test question, answers through EvalAIAnswerProcessor."""
    match_ids(answers, questions, path=source)
    no_image = [qid for qid, question in questions.items() if "image" not in question]
    if no_image:
        raise AnswerFileError(f"questions: {len(no_image)} question(s) without an image: {format_ids(no_image)}")
    texts = answer_texts(answers, path=source)
    return [{"image": question["image"], "answer": evalai_answer(texts[qid])} for qid, question in questions.items()]


def _annotation_list(path: str, key: str) -> list[dict]:
    """Annotation records: VQAv2 {"annotations": [...]}, TextVQA {"data": [...]}, VizWiz a plain list."""
    data = read_json(path)
    records = data.get(key) if isinstance(data, dict) else data
    if not isinstance(records, list) or not all(isinstance(r, dict) and "answers" in r for r in records):
        raise AnswerFileError(f"{path}: expected a list of annotations with 'answers'"
                              + (f" under {key!r}" if isinstance(data, dict) else ""))
    return records


def add_arguments(parser: argparse.ArgumentParser, benchmark: str | None = None) -> None:
    """Arguments of `llava-sgg score vqav2|vizwiz|textvqa`; `benchmark` fixes one, else --benchmark is asked."""
    if benchmark is None:
        parser.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    else:
        parser.set_defaults(benchmark=benchmark)
    parser.add_argument("--answers", required=True, help="LLaVA answers jsonl (model_vqa_loader output)")
    parser.add_argument("--annotations", help="official annotations with 10 human answers (VQAv2 val "
                        "v2_mscoco_val2014_annotations.json, VizWiz val.json, TextVQA_0.5.1_val.json); "
                        "without it VQAv2 / VizWiz write the EvalAI upload file")
    parser.add_argument("--questions", help="LLaVA question jsonl: VizWiz (question_id -> image), "
                        "VQAv2 upload (the answered split, e.g. llava_vqav2_mscoco_test-dev2015.jsonl)")
    parser.add_argument("--test-questions", help="VQAv2 upload: all test questions (llava_vqav2_mscoco_test2015.jsonl)")
    parser.add_argument("--match", choices=TEXTVQA_MATCHES, default="prompt",
                        help="TextVQA: find annotations by (image id, question in the prompt) as LLaVA, "
                        "or by TextVQA question_id")
    parser.add_argument("--upload", help="where to write the EvalAI upload file (default: <answers>_upload.json)")
    parser.add_argument("--output", help="metrics JSON (default: <answers>_metrics.json)")


def _require(args: argparse.Namespace, *names: str) -> None:
    absent = ["--" + name.replace("_", "-") for name in names if getattr(args, name) is None]
    if absent:
        raise AnswerFileError(f"{args.benchmark}: {' and '.join(absent)} needed here")


def _submission(args: argparse.Namespace) -> dict:
    answers = read_jsonl(args.answers)
    if args.benchmark == "vqav2":
        _require(args, "questions", "test_questions")
        split = read_jsonl(args.questions)
        test = read_jsonl(args.test_questions)
        upload = convert_vqav2_for_submission(answers, list(test), list(split), source=args.answers)
    elif args.benchmark == "vizwiz":
        _require(args, "questions")
        upload = convert_vizwiz_for_submission(answers, read_jsonl(args.questions), source=args.answers)
    else:
        raise AnswerFileError("textvqa: --annotations (TextVQA_0.5.1_val.json) needed; it has no upload file")
    answers_path = Path(args.answers)
    upload_path = Path(args.upload) if args.upload else answers_path.with_name(answers_path.stem + "_upload.json")
    upload_path.parent.mkdir(parents=True, exist_ok=True)
    upload_path.write_text(json.dumps(upload))
    return {"benchmark": args.benchmark, "upload": str(upload_path), "questions": len(upload),
            "answered": len(answers), "blank": len(upload) - len(answers)}


def run(args: argparse.Namespace) -> dict:
    """Score (or convert for upload) one answers file, print the metrics and write them as JSON."""
    if args.annotations is None:
        metrics = _submission(args)
    elif args.benchmark == "vqav2":
        annotations = _annotation_list(args.annotations, "annotations")
        metrics = score_vqav2(read_jsonl(args.answers), annotations, source=args.answers)
    elif args.benchmark == "vizwiz":
        _require(args, "questions")
        metrics = score_vizwiz(read_jsonl(args.answers), read_jsonl(args.questions),
                               _annotation_list(args.annotations, "annotations"), source=args.answers)
    else:
        numbered = read_jsonl_numbered(args.answers, required=("question_id", "text"), strings=("text",))
        metrics = score_textvqa([record for _, record in numbered], _annotation_list(args.annotations, "data"),
                                match=args.match, source=args.answers, lines=[line for line, _ in numbered])
    print(format_metrics({k: v for k, v in metrics.items() if k != "per_question_type"}))  # 65 types: JSON only
    write_metrics(metrics, metrics_path(args.answers, args.output))
    return metrics
