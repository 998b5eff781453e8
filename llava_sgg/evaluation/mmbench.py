"""MMBench and MMBench-CN: circular accuracy, per category, and the test-set submission table.

Inputs are the official TSV (index, question, hint, A-D, answer, category,
l2-category, split, image as base64, ...) and the answers jsonl of LLaVA's
``model_vqa_mmbench.py``: {"question_id": index, "round_id"/"round_idx", "text",
"options", "option_char", "answer_id", ...}. MMBench-CN is the same code on the
Chinese TSV.

The official protocol (LLaVA's mmbench.sh, the MMBench evaluation server,
VLMEvalKit) answers every row of the TSV once. The TSV already holds
CircularEval's copies: row ``i + k * 1e6`` is question ``i`` with its options
shifted and its own ``answer`` letter, and a question counts correct circularly
only if every row of its group (``index % 1e6``) is answered right. That is the
circular accuracy of the MMBench leaderboard and of LLaVA-1.5's MMBench column.

``--rotate-options`` (the official script's ``--all-rounds``) asks each row once
per rotation instead: in round ``r`` the letter at position ``k`` shows the row's
option ``(k + r) % n``, so a predicted letter is mapped back to the row's own
lettering before it is compared, and every answer of the group must be right.
On the official TSV a question then needs n x n right answers for n x the
compute: not the published protocol (``ROTATION_CAVEAT``). On a TSV with one row
per question (the demo's) it is the MMBench paper's CircularEval.

Single-round accuracy scores round 0 of the main rows (``index < 1e6``) alone.
Options and hints are absent exactly where LLaVA's answering script finds them
absent (``is_missing``), so the letters scored are the letters the model saw.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from .answers import (AnswerFileError, format_ids, format_metrics, metrics_path, read_jsonl_records,
                      write_metrics)
from .prompts import OPTION_LETTERS

__all__ = ["ROTATION_CAVEAT", "MMBenchQuestion", "is_missing", "read_mmbench_tsv",
           "mmbench_questions", "parse_option", "score_mmbench", "submission_table", "write_submission",
           "add_arguments", "run"]

CIRCULAR_OFFSET = 1_000_000  # rotation k of question i is row i + k * 1e6 in the official TSV
# pandas.read_table's default NA strings: LLaVA and VLMEvalKit read the TSV with pandas, so an
# option or hint spelled exactly like one of these (quoted or not) is NaN to them; LLaVA stops
# listing options at it and leaves such a hint out.
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                       "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
# ... and LLaVA's is_none also drops strings that are "nan" or "none" in any case ("NONE", "NaN").
LLAVA_NONE = ("nan", "none")
ROTATION_CAVEAT = ("answers of --rotate-options (each row asked once per rotation of its options): on the "
                   "official TSV, which already holds the rotated copies, a question needs n x n right answers, "
                   "so this circular accuracy is not comparable to published MMBench numbers; answer each row "
                   "once (the default) for those")
# Columns LLaVA's convert_mmbench_for_submission.py drops before inserting `prediction` as column 7.
NOT_SUBMITTED = ("hint", "category", "source", "image", "comment", "l2-category")
SUBMISSION_PREDICTION_COLUMN = 6
# VLMEvalKit's can_infer_option: these answers refuse, and count as wrong whatever else they say.
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
UNPARSEABLE_NOTE = ("unparseable answers (no option letter or option text found by VLMEvalKit's rules, "
                    "no GPT fallback) count as wrong")


@dataclass(frozen=True)
class MMBenchQuestion:
    index: int
    options: tuple[str, ...]  # option texts in the row's own order: A, B, ...
    answer: str | None  # None on the test split
    category: str | None
    l2_category: str | None
    split: str | None
    question: str = ""
    hint: str | None = None  # None where LLaVA leaves the hint out
    hidden: tuple[str, ...] = ()  # letters with a text LLaVA does not show (after a pandas-NA option)

    @property
    def rounds(self) -> int:
        """Rotations of --rotate-options; a row with no option shown is still asked once."""
        return max(1, len(self.options))

    @property
    def main_index(self) -> int:
        return self.index % CIRCULAR_OFFSET


@dataclass(frozen=True)
class _Judged:
    index: int
    round: int
    text: str
    shown_letter: str | None  # the letter as displayed in this round; None when unparseable
    letter: str | None  # mapped back to the row's own lettering
    correct: bool | None  # None without ground truth


def is_missing(value) -> bool:
    """Whether LLaVA's model_vqa_mmbench.py finds this TSV cell absent: pandas' NA strings, then its is_none."""
    return value is None or value in PANDAS_NA or value.lower() in LLAVA_NONE


@contextmanager
def _large_csv_fields():
    # Base64 images are far longer than the csv module's default 128 KiB field limit.
    previous = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def read_mmbench_tsv(path) -> list[dict[str, str]]:
    """The rows of an MMBench TSV as ``{column: text}``; ragged rows are errors naming their lines."""
    path = Path(path)
    if not path.is_file():
        raise AnswerFileError(f"{path} does not exist")
    rows, ragged = [], []
    with _large_csv_fields(), path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if not reader.fieldnames:
            raise AnswerFileError(f"{path}: empty file, no header")
        for row in reader:
            if None in row or None in row.values():
                ragged.append(reader.line_num)
                continue
            rows.append(row)
    if ragged:
        raise AnswerFileError(f"{path}: {len(ragged)} row(s) with a different number of fields than the header, "
                              f"ending on line(s) {format_ids(ragged)}")
    for column in ("index", "question", "A", "B"):
        if column not in reader.fieldnames:
            raise AnswerFileError(f"{path}: no {column!r} column (columns: {', '.join(reader.fieldnames)})")
    return rows


def _options(row: dict[str, str]) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """LLaVA's get_options: (options A, B, ... up to the first absent one, letters with a text after it, malformed).

    A text after the stop is not shown by LLaVA either. When the stop is a text pandas reads
    as NA ("None" as a counting answer) that is the official data as LLaVA and the MMBench
    server see it, and followed; when it is an empty cell with a real option after it, the
    TSV is malformed.
    """
    cells = [row.get(letter) for letter in OPTION_LETTERS]
    stop = next((k for k, value in enumerate(cells) if is_missing(value)), len(cells))
    hidden = tuple(letter for letter, value in zip(OPTION_LETTERS[stop:], cells[stop:]) if value)
    empty_stop = stop < len(cells) and not cells[stop]
    malformed = empty_stop and any(not is_missing(value) for value in cells[stop:])
    return tuple(cells[:stop]), hidden, malformed


def mmbench_questions(rows: list[dict[str, str]], *, source="questions") -> dict[int, MMBenchQuestion]:
    """{index: question} from TSV rows; bad indices, options and answer letters are errors naming the rows.

    Options, hint and question are as LLaVA's answering script reads them (``is_missing``).
    Option texts it does not show (``MMBenchQuestion.hidden``) are kept out as it does;
    a question whose answer is among them can only be answered wrong, as officially.
    """
    questions, problems = {}, defaultdict(list)
    for row in rows:
        try:
            index = int(row["index"])
        except ValueError:
            problems["index is not an integer"].append(row["index"])
            continue
        if index in questions:
            problems["duplicated index"].append(index)
            continue
        options, hidden, malformed = _options(row)
        if malformed:
            problems["an option after an empty one"].append(index)
        elif len(options) < 2 and not hidden:
            problems["fewer than 2 options"].append(index)
        if is_missing(row.get("question")):
            problems["no question"].append(index)
        answer = row.get("answer")
        answer = None if is_missing(answer) else answer.strip()
        if answer is not None and answer not in OPTION_LETTERS[:len(options)] + hidden:
            problems["answer letter not among the row's options"].append(index)
        hint = row.get("hint")
        questions[index] = MMBenchQuestion(
            index=index, options=options, answer=answer,
            category=None if is_missing(row.get("category")) else row["category"],
            l2_category=None if is_missing(row.get("l2-category")) else row["l2-category"],
            split=None if is_missing(row.get("split")) else row["split"],
            question=row.get("question") or "", hint=None if is_missing(hint) else hint, hidden=hidden)
    orphans = [i for i in questions if i >= CIRCULAR_OFFSET and i % CIRCULAR_OFFSET not in questions]
    if orphans:
        problems[f"rotated row without its main row (index % {CIRCULAR_OFFSET})"].extend(orphans)
    with_answer = sum(q.answer is not None for q in questions.values())
    if 0 < with_answer < len(questions):
        problems["no answer while other rows have one"].extend(i for i, q in questions.items() if q.answer is None)
    if problems:
        raise AnswerFileError(f"{source}: " + "; ".join(f"{len(ids)} row(s) with {what}: {format_ids(ids)}"
                                                       for what, ids in problems.items()))
    return questions


def parse_option(text: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text answer picks among ``options`` ({letter: option text}), or None.

    VLMEvalKit's ``can_infer`` (vlmeval/utils/matching_util.py) as it stood from March 2024
    (c6bdffd3) to August 2025 (c3371551); from January 2024 (bc4b28be) it differed only in
    knowing the first two of the four refusals. The server's ChatGPT step is not run.

    1. ``can_infer_option``: an answer containing one of ``REFUSALS`` picks nothing ('Z').
       Otherwise, with ``.()[],:;!*#{}`` blanked and the rest split on whitespace, exactly one
       option letter among the tokens is the answer ("B", "B. dog", "(B)", "Answer: B", but also
       the article in "A dog"), wherever it stands. No letter but a token "Z" picks nothing.
       Two or more letters ("A or B") go on to step 2, as does an answer containing
       "Failed to obtain answer via API", which skips step 1.
    2. ``can_infer_text``: exactly one option whose lower-cased text is inside the lower-cased
       answer, however long the answer.

    ``options`` are the options LLaVA showed in this round; VLMEvalKit passes every option cell
    of the row that pandas does not read as NaN, so on rows with hidden options
    (``MMBenchQuestion.hidden``) it also knows the letters after the gap.

    Where VLMEvalKit of other dates reads differently: before bc4b28be (January 2024) the
    letters were always A-E, whatever the row's options; since c3371551 (August 2025) the letter
    must also be among the last 4 tokens ("B is right because ..." is no letter) and step 2 is
    skipped for an answer longer than twice its option texts together; since a67ace50 "answer
    is B" is read even when other letters are named. The MMBench server and VLMEvalKit's
    default then ask ChatGPT to match what these rules leave (several letters, neither a letter
    nor a single option text); here that is unparseable and wrong. Answers of a bare letter, as
    the option-letter instruction asks, read the same under every version.
    """
    if "Failed to obtain answer via API" not in text:
        if any(refusal in text for refusal in REFUSALS):
            return None
        tokens = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
        named = [letter for letter in options if letter in tokens]
        if len(named) == 1:
            return named[0]
        if not named and "Z" in tokens:  # VLMEvalKit's explicit "none of these"
            return None
    lowered = text.lower()
    matched = [letter for letter, option in options.items() if option.lower() in lowered]
    return matched[0] if len(matched) == 1 else None


def _round_of(record: dict) -> object:
    # LLaVA's model_vqa_mmbench.py writes "round_id"; "round_idx" is accepted as well.
    return record.get("round_id", record.get("round_idx", 0))


def _question_index(value) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _judge(questions: dict[int, MMBenchQuestion], answers, *, source) -> dict[tuple[int, int], _Judged]:
    answers = list(answers)
    problems = defaultdict(list)
    records = {}
    for record in answers:
        index = _question_index(record.get("question_id"))
        if index is None or index not in questions:
            problems["question_id not in the TSV"].append(record.get("question_id"))
            continue
        n = len(questions[index].options)
        round_ = _round_of(record)
        if isinstance(round_, bool) or not isinstance(round_, int) or not 0 <= round_ < questions[index].rounds:
            problems["round not an integer in 0..n_options-1"].append(f"{index} round {round_!r}")
            continue
        if (index, round_) in records:
            problems["duplicated (question_id, round)"].append(f"{index} round {round_}")
            continue
        if not isinstance(record.get("text"), str):  # a null or a number is no model output
            problems["no 'text' string"].append(f"{index} round {round_}: {record.get('text')!r}")
            continue
        shown = [OPTION_LETTERS[(k + round_) % n] for k in range(n)]
        option_char = record.get("option_char")
        if option_char is not None and list(option_char) != shown:
            problems["option_char not the rotation of the TSV's options for its round"].append(
                f"{index} round {round_}")
            continue
        if record.get("options") is not None and len(record["options"]) != n:
            problems["a number of options different from the TSV's"].append(f"{index} round {round_}")
            continue
        records[index, round_] = record
    rotated = any(round_ > 0 for _, round_ in records)
    expected = [(index, round_) for index, question in questions.items()
                for round_ in (range(question.rounds) if rotated else (0,))]
    missing = [f"{index} round {round_}" if rotated else index
               for index, round_ in expected if (index, round_) not in records]
    if missing:
        problems["no answer" + (" (answers of --rotate-options need every round)" if rotated else "")] = missing
    if problems:
        raise AnswerFileError(f"{source}: " + "; ".join(f"{len(ids)} answer(s) with {what}: {format_ids(ids)}"
                                                       for what, ids in problems.items()))

    judged = {}
    for (index, round_), record in sorted(records.items()):
        question = questions[index]
        n = len(question.options)
        shown = {OPTION_LETTERS[k]: question.options[(k + round_) % n] for k in range(n)}
        shown_letter = parse_option(record["text"], shown)
        letter = None if shown_letter is None else OPTION_LETTERS[(OPTION_LETTERS.index(shown_letter) + round_) % n]
        correct = None if question.answer is None else letter == question.answer
        judged[index, round_] = _Judged(index, round_, record["text"], shown_letter, letter, correct)
    return judged


def _accuracy(hits: list[bool]) -> float:
    return 100.0 * sum(hits) / len(hits)


def score_mmbench(rows: list[dict[str, str]], answers, *, benchmark: str = "mmbench",
                  source: str = "answers", questions_source: str = "questions") -> dict:
    """Metrics of LLaVA MMBench answers against the TSV rows (see the module docstring).

    ``answers`` are answer records (dicts); accuracies are percentages, None on a
    split without ground truth (the MMBench test set: upload ``submission_table``).
    ``protocol`` says how the answers were asked: "official" (each row once; circular
    accuracy over the TSV's copies) or "rotate_options" (with ``caveat``: not comparable
    to published numbers).
    """
    questions = mmbench_questions(rows, source=questions_source)
    judged = _judge(questions, answers, source=source)
    main = [q for q in questions.values() if q.index < CIRCULAR_OFFSET]
    group = defaultdict(list)
    for item in judged.values():
        group[item.index % CIRCULAR_OFFSET].append(item.correct)
    unparseable = [[item.index, item.round] for item in judged.values() if item.shown_letter is None]
    hidden = [q.index for q in questions.values() if q.hidden]
    rotated = any(item.round > 0 for item in judged.values())
    notes = [UNPARSEABLE_NOTE]
    metrics = {
        "benchmark": benchmark,
        "protocol": "rotate_options" if rotated else "official",
        "questions": len(main),
        "rows": len(questions),
        "circular_copies": len(questions) - len(main),  # the TSV's rows index + k * 1e6
        "answers": len(judged),
        "circular": any(len(group[q.index]) > 1 for q in main),
        "unparseable": len(unparseable),
        "unparseable_ids": unparseable,
        "rows_with_hidden_options": len(hidden),
        "rows_with_hidden_options_ids": hidden,
    }
    if rotated:
        metrics["caveat"] = ROTATION_CAVEAT
    elif not metrics["circular"]:
        notes.append("the TSV holds no circular copies (rows index + k * 1e6, as the official TSVs do): "
                     "no circular accuracy")
    if hidden:
        notes.append("rows with hidden options have an option text pandas reads as missing ('None', 'NA', ...): "
                     "as in LLaVA's script only the options before it are shown, and an answer among the "
                     "others counts wrong")
    metrics["note"] = "; ".join(notes)
    if not any(q.answer is not None for q in questions.values()):
        metrics.update(circular_accuracy=None, single_round_accuracy=None,
                       note=metrics["note"] + "; the TSV has no answers (test split): upload the submission file")
        return metrics

    def summary(subset: list[MMBenchQuestion]) -> dict:
        return {"questions": len(subset),
                "circular_accuracy": _accuracy([all(group[q.index]) for q in subset]) if metrics["circular"] else None,
                "single_round_accuracy": _accuracy([judged[q.index, 0].correct for q in subset])}

    metrics.update({key: value for key, value in summary(main).items() if key != "questions"})
    for key, attribute in (("per_category", "category"), ("per_l2_category", "l2_category"), ("per_split", "split")):
        buckets = defaultdict(list)
        for question in main:
            if getattr(question, attribute) is not None:
                buckets[getattr(question, attribute)].append(question)
        if buckets:
            metrics[key] = {name: summary(subset) for name, subset in sorted(buckets.items())}
    return metrics


def submission_table(rows: list[dict[str, str]], answers, *, source: str = "answers",
                     questions_source: str = "questions") -> tuple[list[str], list[list[str]]]:
    """LLaVA's convert_mmbench_for_submission.py table: (header, rows).

    The TSV's columns less hint, category, source, image, comment, l2-category, with
    ``prediction`` inserted as the 7th column: the round-0 option letter, or the raw
    answer text where no letter could be parsed (so the MMBench server's own
    matching still sees it).
    """
    questions = mmbench_questions(rows, source=questions_source)
    judged = _judge(questions, answers, source=source)
    header = [column for column in rows[0] if column not in NOT_SUBMITTED] if rows else ["index"]
    position = min(SUBMISSION_PREDICTION_COLUMN, len(header))
    header.insert(position, "prediction")
    table = []
    for row in rows:
        item = judged[int(row["index"]), 0]
        values = [row[column] for column in row if column not in NOT_SUBMITTED]
        values.insert(position, item.letter if item.letter is not None else item.text)
        table.append(values)
    return header, table


def write_submission(header: list[str], table: list[list[str]], path) -> list[Path]:
    """Write the submission as TSV, and as the .xlsx LLaVA uploads when openpyxl is installed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(table)
    written = [path]
    if find_spec("openpyxl") is not None:
        from openpyxl import Workbook

        workbook = Workbook()
        sheet = workbook.active
        sheet.append(header)
        for values in table:
            sheet.append([int(value) if column == "index" else value for column, value in zip(header, values)])
        workbook.save(path.with_suffix(".xlsx"))
        written.append(path.with_suffix(".xlsx"))
    return written


def add_arguments(parser: argparse.ArgumentParser, *, benchmark: str = "mmbench") -> None:
    parser.add_argument("--questions", required=True, metavar="TSV",
                        help="the official MMBench (or MMBench-CN) TSV, e.g. mmbench_dev_20230712.tsv")
    parser.add_argument("--answers", required=True, metavar="JSONL",
                        help="answers of `llava-sgg answer-mmbench` or LLaVA's model_vqa_mmbench.py: each row "
                             "once (the official protocol), or every round of --rotate-options / --all-rounds "
                             "(scored with a caveat: not comparable to published MMBench numbers)")
    parser.add_argument("--output", metavar="JSON", help="metrics file (default: <answers>_metrics.json)")
    parser.add_argument("--submission", metavar="TSV",
                        help="write the upload table here (default for a TSV without answers: "
                             "<answers>_submission.tsv, plus .xlsx when openpyxl is installed)")
    parser.set_defaults(benchmark=benchmark)


def run(args: argparse.Namespace) -> dict:
    """Score, print a table, write the metrics JSON (and the submission table when asked or on test)."""
    answers_path = Path(args.answers)
    rows = read_mmbench_tsv(args.questions)
    # ids repeat across rounds; a text that is not a string is an error naming its line
    answers = read_jsonl_records(answers_path, required=("question_id", "text"), strings=("text",))
    metrics = score_mmbench(rows, answers, benchmark=getattr(args, "benchmark", "mmbench"), source=str(answers_path),
                            questions_source=str(args.questions))
    submission = args.submission
    if submission is None and metrics["single_round_accuracy"] is None:
        submission = answers_path.with_name(answers_path.stem + "_submission.tsv")
    print(format_metrics(metrics))
    if metrics["unparseable"]:
        print(f"{metrics['unparseable']} unparseable answer(s), counted wrong, as [question_id, round]: "
              + format_ids(metrics["unparseable_ids"]))
    if metrics["rows_with_hidden_options"]:
        print(f"{metrics['rows_with_hidden_options']} row(s) with an option text pandas reads as missing, shown "
              f"without it as LLaVA does: " + format_ids(metrics["rows_with_hidden_options_ids"]))
    if "caveat" in metrics:
        print(f"CAVEAT: {metrics['caveat']}")
    if submission is not None:
        table = submission_table(rows, answers, source=str(answers_path), questions_source=str(args.questions))
        for written in write_submission(*table, submission):
            print(f"wrote {written}")
    print(f"wrote {write_metrics(metrics, metrics_path(answers_path, args.output))}")
    return metrics
