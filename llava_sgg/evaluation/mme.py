r"""MME: LLaVA's convert_answer_to_mme.py and the official eval_tool/calculation.py.

MME has 14 subtasks, 10 of perception and 4 of cognition; every image has two
yes/no questions. Per subtask ``acc`` is the percentage of questions answered
right, ``acc+`` the percentage of images with both answered right, and the score
is ``acc + acc+``; the perception and cognition totals are the sums of their
subtasks' scores (2000 and 800 at most).

Inputs:

* the official folder ``MME_Benchmark_release_version``: ``<subtask>/questions_answers_YN/<image stem>.txt``
  when the subtask has an ``images/`` folder, else ``<subtask>/<image stem>.txt`` beside the
  images; each line ``question<TAB>Yes|No``;
* LLaVA's answers jsonl (``model_vqa_loader.py`` on ``llava_mme.jsonl``): ``question_id`` is
  ``<subtask>/<image name>`` and is shared by the image's two questions, so an answer is tied
  to its question by ``prompt``, as convert_answer_to_mme.py does. The question file itself
  adds nothing to that (its ids are the same non-unique ones) and is not read.

`convert_answers_to_mme` / `write_mme_results` produce the ``<subtask>.txt`` files of the
official eval_tool as convert_answer_to_mme.py writes them: one line
``<image stem>.txt<TAB>question<TAB>gt<TAB>prediction`` per question. The first field is the
name of the image's question file, not of the image (the converter's
``question_id.split('/')[-1].split('.')[0] + '.txt'``; calculation.py never reads it); the
question is MME's wording, with its suffix; lines come in the answers' order, so an image's two
questions are consecutive as calculation.py needs (it pairs lines 1-2, 3-4, ...), and where the
answers keep an image's questions apart (LLaVA's never do) they are brought together.
`read_mme_results` reads such files back, from here or elsewhere, and `score_mme` scores them
as calculation.py does.

Tabs and line breaks in an answer. The converter writes the answer as is, and calculation.py
reads the file with ``readlines()`` in text mode, where CR, LF and CR LF all end a line, then
``split("\t")`` into exactly 4 fields: an answer holding any of them breaks its line and the
official run stops (or, in copies that catch the error, pairs the wrong lines). LLaVA's
model_vqa_loader.py ``strip()``s every answer, so this only arises inside an answer or from
another tool. MME's eval_tool readme asks for such newlines to be deleted ("For each question,
your response can only be in one line"), so every CR, LF and TAB of an answer is deleted here,
nothing else changed: "\r\nyes" is written "yes" and scored yes, "\tno" is "no". Other spaces
are kept, as officially: "   yes" reads "   y" in its first 4 characters and is 'other' there too.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict
from pathlib import Path

from .answers import (AnswerFileError, format_ids, format_metrics, metrics_path, read_jsonl_records,
                      write_metrics)
from .prompts import MME_SUFFIX, SHORT_ANSWER

__all__ = ["PERCEPTION", "COGNITION", "SUBTASKS", "parse_pred_ans", "eval_tool_prediction", "read_mme_ground_truth",
           "convert_answers_to_mme", "write_mme_results", "read_mme_results", "score_mme", "add_arguments", "run"]

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION

Row = tuple[str, str, str, str]  # image, question, ground truth, prediction


def parse_pred_ans(prediction: str) -> str:
    """calculation.py's parse_pred_ans on the lower-cased prediction: 'yes', 'no' or 'other'.

    Exactly "yes"/"no", else "yes" within the first 4 characters, else "no" within them
    (so "Not sure" reads as "no", as it does officially). calculation.py applies nothing
    else: no strip (its field still ends in the line's newline, which changes no label) and
    no punctuation removal.
    """
    prediction = prediction.lower()
    if prediction in ("yes", "no"):
        return prediction
    if "yes" in prediction[:4]:
        return "yes"
    if "no" in prediction[:4]:
        return "no"
    return "other"


def _question_key(question: str) -> str:
    # LLaVA asks with SHORT_ANSWER where MME's files have MME_SUFFIX (convert_answer_to_mme.py swaps
    # them back). Both suffixes dropped and spaces collapsed: some MME questions carry two spaces before
    # "Please answer yes or no.", which LLaVA's converter retries by hand.
    return " ".join(question.replace(SHORT_ANSWER, " ").replace(MME_SUFFIX, " ").split())


def _qa_folder(subtask_dir: Path) -> Path:
    return subtask_dir / "questions_answers_YN" if (subtask_dir / "images").is_dir() else subtask_dir


def read_mme_ground_truth(root) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """{subtask: {image stem: [(question, "Yes"|"No"), ...]}} of the official subtasks found under ``root``.

    Malformed lines, answers other than yes/no, and images without exactly two questions
    are errors naming the files; subtasks absent from ``root`` are simply not returned.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnswerFileError(f"{root} is not a folder (the MME_Benchmark_release_version folder)")
    truth, problems = {}, []
    for subtask in SUBTASKS:
        if not (root / subtask).is_dir():
            continue
        folder = _qa_folder(root / subtask)
        images = {}
        for path in sorted(folder.glob("*.txt")):
            pairs = []
            for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no"):
                    problems.append(f"{path}:{line_number} is not 'question<TAB>Yes|No'")
                    continue
                pairs.append((fields[0], fields[1].strip()))
            if len(pairs) != 2:
                problems.append(f"{path} has {len(pairs)} question(s), not 2")
            images[path.stem] = pairs
        if not images:
            problems.append(f"{folder} has no question files")
        truth[subtask] = images
    if problems:
        raise AnswerFileError(f"{root}: {len(problems)} problem(s): " + "; ".join(problems[:10]))
    if not truth:
        raise AnswerFileError(f"{root} has none of the MME subtask folders ({', '.join(SUBTASKS)})")
    return truth


def eval_tool_prediction(text: str) -> str:
    """An answer as one eval_tool field: CR, LF and TAB deleted, as MME's readme asks (module docstring)."""
    return re.sub(r"[\t\r\n]", "", text)


def convert_answers_to_mme(answers, truth: dict, *, source: str = "answers") -> dict[str, list[Row]]:
    """{subtask: rows} for every subtask in ``truth``, each image's two questions on consecutive rows.

    ``answers`` are LLaVA records with ``question_id`` ``<subtask>/<image>``, ``prompt`` and
    ``text``. Unknown subtasks, images or questions, two answers to one question, and
    questions left unanswered are errors naming them.
    """
    problems = defaultdict(list)
    lookup = {}  # (subtask, image stem, question key) -> the question as the ground truth words it
    for subtask, images in truth.items():
        for stem, pairs in images.items():
            for question, _ in pairs:
                key = (subtask, stem, _question_key(question))
                if key in lookup:
                    problems["ground-truth questions alike but for spaces and suffixes"].append(f"{subtask}/{stem}")
                lookup[key] = question
    found = {}
    image_keys = defaultdict(list)  # (subtask, stem) -> its question keys, in the answers' order
    for record in answers:
        question_id = str(record.get("question_id"))
        subtask, _, image = question_id.partition("/")
        image = image.rsplit("/", 1)[-1]  # "<subtask>/images/<name>" too
        if subtask not in SUBTASKS:
            problems["a subtask that is not MME's"].append(question_id)
            continue
        if subtask not in truth:
            problems["a subtask missing from the ground-truth folder"].append(question_id)
            continue
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("text"), str):
            problems["no 'prompt' or 'text' string"].append(question_id)
            continue
        stem = os.path.splitext(image)[0]
        key = (subtask, stem, _question_key(record["prompt"]))
        if key not in lookup:
            problems["a question not in the ground truth"].append(f"{question_id}: {record['prompt']!r}")
            continue
        if key in found:
            problems["a second answer to one question"].append(f"{question_id}: {record['prompt']!r}")
            continue
        found[key] = record["text"]
        image_keys[subtask, stem].append(key)
    missing = [f"{key[0]}/{key[1]}: {question!r}" for key, question in lookup.items() if key not in found]
    if missing:
        problems["no answer (every question of a subtask must be answered)"] = missing
    if problems:
        raise AnswerFileError(f"{source}: " + "; ".join(f"{len(ids)} answer(s) with {what}: {format_ids(ids)}"
                                                       for what, ids in problems.items()))
    results = {subtask: [] for subtask in truth}
    for (subtask, stem), keys in image_keys.items():  # images in the order of their first answer
        gts = dict(truth[subtask][stem])
        for key in keys:
            question = lookup[key]
            results[subtask].append((f"{stem}.txt", question, gts[question], eval_tool_prediction(found[key])))
    return results


def write_mme_results(results: dict[str, list[Row]], folder) -> list[Path]:
    """Write ``<folder>/<subtask>.txt`` files for the official eval_tool (calculation.py --results_dir)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for subtask, rows in results.items():
        path = folder / f"{subtask}.txt"
        path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
        written.append(path)
    return written


def read_mme_results(folder) -> dict[str, list[Row]]:
    """The ``<subtask>.txt`` files of an eval_tool results folder; lines without 4 fields are errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AnswerFileError(f"{folder} is not a folder")
    results, problems = {}, []
    for subtask in SUBTASKS:
        path = folder / f"{subtask}.txt"
        if not path.is_file():
            continue
        rows = []
        for line_number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            line = line.rstrip("\r")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != 4:
                problems.append(f"{path.name}:{line_number} has {len(fields)} tab-separated fields, not 4")
                continue
            rows.append(tuple(fields))
        results[subtask] = rows
    if problems:
        raise AnswerFileError(f"{folder}: {len(problems)} problem(s): " + "; ".join(problems[:10]))
    if not results:
        raise AnswerFileError(f"{folder} has none of the files {', '.join(s + '.txt' for s in SUBTASKS)}")
    return results


def _score_subtask(subtask: str, rows: list[Row]) -> dict:
    problems = []
    if len(rows) % 2:
        problems.append(f"{len(rows)} lines, not pairs")
    bad_gt = [f"line {i + 1}" for i, row in enumerate(rows) if row[2].lower() not in ("yes", "no")]
    if bad_gt:
        problems.append(f"ground truth not yes/no on {format_ids(bad_gt)}")
    unpaired = [f"lines {i + 1}-{i + 2}" for i in range(0, len(rows) - 1, 2) if rows[i][0] != rows[i + 1][0]]
    if unpaired:
        problems.append(f"consecutive lines of different images on {format_ids(unpaired)}")
    if problems:
        raise AnswerFileError(f"{subtask}: " + "; ".join(problems))
    hits = [row[2].lower() == parse_pred_ans(row[3]) for row in rows]
    both = [hits[i] and hits[i + 1] for i in range(0, len(rows), 2)]
    acc = 100.0 * sum(hits) / len(hits)
    acc_plus = 100.0 * sum(both) / len(both)
    return {"questions": len(rows), "images": len(both), "acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
            "other": sum(parse_pred_ans(row[3]) == "other" for row in rows)}


def score_mme(results: dict[str, list[Row]]) -> dict:
    """calculation.py's metrics of ``{subtask: rows}``: per subtask and the perception / cognition totals.

    Subtasks not in ``results`` are listed under ``missing_subtasks``; the totals then
    sum only those present and are not comparable with published numbers.
    """
    unknown = [subtask for subtask in results if subtask not in SUBTASKS]
    if unknown:
        raise AnswerFileError(f"not MME subtasks: {format_ids(unknown)}")
    empty = [subtask for subtask, rows in results.items() if not rows]
    if empty:
        raise AnswerFileError(f"subtasks without any answer: {format_ids(empty)}")
    subtasks = {subtask: _score_subtask(subtask, results[subtask]) for subtask in SUBTASKS if subtask in results}
    metrics = {"benchmark": "mme"}
    for name, group in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [subtask for subtask in group if subtask in subtasks]
        metrics[name] = sum(subtasks[subtask]["score"] for subtask in present) if present else None
    metrics["missing_subtasks"] = [subtask for subtask in SUBTASKS if subtask not in subtasks]
    metrics["other"] = sum(values["other"] for values in subtasks.values())
    metrics["subtasks"] = subtasks
    metrics["note"] = ("score = acc + acc+ (percent); an answer is 'other' (wrong) unless it is yes/no "
                       "or has yes/no in its first 4 characters")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--answers", metavar="JSONL", help="LLaVA's answers on llava_mme.jsonl")
    source.add_argument("--results", metavar="DIR",
                        help="score an existing eval_tool results folder (<subtask>.txt files) instead")
    parser.add_argument("--mme-root", metavar="DIR",
                        help="the official MME_Benchmark_release_version folder (ground truth; needed with --answers)")
    parser.add_argument("--results-dir", metavar="DIR",
                        help="where to write the <subtask>.txt files (default: <answers>_mme/ next to the answers)")
    parser.add_argument("--output", metavar="JSON",
                        help="metrics file (default: <answers>_metrics.json, or <results>/metrics.json)")


def run(args: argparse.Namespace) -> dict:
    """Convert (with --answers) or read (--results) the eval_tool files, score, print and write the metrics."""
    if args.answers is not None:
        if args.mme_root is None:
            raise AnswerFileError("--answers needs --mme-root, the MME folder with the ground truth")
        answers_path = Path(args.answers)
        answers = read_jsonl_records(answers_path, required=("question_id", "prompt", "text"),
                                     strings=("prompt", "text"))
        results = convert_answers_to_mme(answers, read_mme_ground_truth(args.mme_root), source=str(answers_path))
        folder = Path(args.results_dir) if args.results_dir else answers_path.with_name(answers_path.stem + "_mme")
        write_mme_results(results, folder)
        print(f"wrote the eval_tool files to {folder}")
        output = metrics_path(answers_path, args.output)
    else:
        results = read_mme_results(args.results)
        output = Path(args.output) if args.output else Path(args.results) / "metrics.json"
    metrics = score_mme(results)
    print(format_metrics(metrics))
    if metrics["missing_subtasks"]:
        print(f"totals over {len(SUBTASKS) - len(metrics['missing_subtasks'])} of {len(SUBTASKS)} subtasks, "
              f"not comparable with published MME numbers; missing: {', '.join(metrics['missing_subtasks'])}")
    print(f"wrote {write_metrics(metrics, output)}")
    return metrics
