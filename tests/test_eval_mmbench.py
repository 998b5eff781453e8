"""MMBench / MMBench-CN scoring: circular accuracy, option parsing, the submission table, bad input."""

import argparse
import base64
import csv
import io
import json
import os

import pytest
from PIL import Image

from llava_sgg.evaluation.answers import AnswerFileError
from llava_sgg.evaluation.mmbench import (add_arguments, mmbench_questions, parse_option, read_mmbench_tsv, run,
                                          score_mmbench, submission_table, write_submission)

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
           "comment", "split", "image"]


def png_base64(size=4) -> str:
    image = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, rows, columns=COLUMNS):
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(column, "") for column in columns])
    return path


def write_rows(tmp_path, rows, columns=COLUMNS):
    return read_mmbench_tsv(write_tsv(tmp_path / "questions.tsv", rows, columns))


def write_answers(path, answers):
    path.write_text("".join(json.dumps(answer) + "\n" for answer in answers))
    return path


# Question 0 has 4 options, question 1 three (D empty), question 2 two (C empty, D "nan" as pandas reads it).
ROWS = [
    dict(index=0, question="Which animal barks?", A="cat", B="dog", C="bird", D="fish", answer="B",
         category="object", **{"l2-category": "perception"}, split="dev"),
    dict(index=1, question="What colour is the sky?", hint="A clear day.", A="red", B="green", C="blue", answer="C",
         category="colour", **{"l2-category": "perception"}, split="dev"),
    dict(index=2, question="Is there a cat?", A="yes", B="no", D="nan", answer="A",
         category="colour", **{"l2-category": "reasoning"}, split="dev"),
]


def llava_answer(index, round_id, text, n_options):
    """One line of LLaVA's model_vqa_mmbench.py --all-rounds: options rotated left once per round."""
    letters = ["A", "B", "C", "D"][:n_options]
    return {"question_id": index, "round_id": round_id, "prompt": "...", "text": text,
            "options": ["..."] * n_options, "option_char": letters[round_id:] + letters[:round_id],
            "answer_id": f"{index}-{round_id}", "model_id": "llava-v1.5-7b", "metadata": {}}


# In round r the letter at position k shows option (k + r) % n, so the right letters are:
# question 0 (dog, option B): B, A, D, C; question 1 (blue, option C): C, B, A; question 2 (yes, option A): A, B.
ALL_ROUNDS = [
    llava_answer(0, 0, "B", 4), llava_answer(0, 1, "A", 4), llava_answer(0, 2, "D. fish", 4),
    llava_answer(0, 3, "A", 4),  # wrong in the last rotation only
    llava_answer(1, 0, "The answer is blue.", 3),  # option text, no letter
    llava_answer(1, 1, "B", 3), llava_answer(1, 2, "(A)", 3),
    llava_answer(2, 0, "Sorry, it is hard to tell.", 2),  # unparseable
    llava_answer(2, 1, "B", 2),
]


@pytest.fixture
def tsv(tmp_path):
    rows = [dict(row, image=png_base64()) for row in ROWS]
    rows[0]["image"] = png_base64(200)  # ~160 KB of base64: past the csv module's default field limit
    return write_tsv(tmp_path / "mmbench_dev.tsv", rows)


def test_score_a_run_with_all_rounds(tsv, tmp_path):
    (tmp_path / "answers").mkdir()
    answers = write_answers(tmp_path / "answers" / "llava.jsonl", ALL_ROUNDS)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    metrics = run(parser.parse_args(["--questions", str(tsv), "--answers", str(answers)]))

    # Circularly only question 1 is right in every rotation; in round 0 questions 0 and 1 are right.
    assert metrics["circular"] is True
    assert metrics["questions"] == 3 and metrics["answers"] == 9
    assert metrics["circular_accuracy"] == pytest.approx(100 / 3)
    assert metrics["single_round_accuracy"] == pytest.approx(200 / 3)
    assert metrics["per_category"] == {
        "colour": {"questions": 2, "circular_accuracy": 50.0, "single_round_accuracy": 50.0},
        "object": {"questions": 1, "circular_accuracy": 0.0, "single_round_accuracy": 100.0}}
    assert metrics["per_l2_category"] == {
        "perception": {"questions": 2, "circular_accuracy": 50.0, "single_round_accuracy": 100.0},
        "reasoning": {"questions": 1, "circular_accuracy": 0.0, "single_round_accuracy": 0.0}}
    assert metrics["unparseable"] == 1 and metrics["unparseable_ids"] == [[2, 0]]
    assert "count as wrong" in metrics["note"]
    assert json.loads((tmp_path / "answers" / "llava_metrics.json").read_text()) == metrics


def test_the_official_tsv_holds_rotations_as_rows_a_million_apart(tmp_path):
    rows = [dict(index=5, question="Day or night?", A="sun", B="moon", answer="A", category="time"),
            dict(index=1_000_005, question="Day or night?", A="moon", B="sun", answer="B", category="time"),
            dict(index=6, question="Up?", A="up", B="down", answer="A", category="space"),
            dict(index=1_000_006, question="Up?", A="down", B="up", answer="B", category="space")]
    answers = [{"question_id": 5, "text": "A"}, {"question_id": 1_000_005, "text": "A"},  # second rotation wrong
               {"question_id": 6, "text": "A"}, {"question_id": 1_000_006, "text": "up"}]
    metrics = score_mmbench(write_rows(tmp_path, rows), answers)
    assert metrics["questions"] == 2 and metrics["rows"] == 4
    assert metrics["circular_accuracy"] == 50.0
    assert metrics["single_round_accuracy"] == 100.0
    assert metrics["per_category"]["time"]["circular_accuracy"] == 0.0


def test_one_round_only_reports_no_circular_accuracy(tsv):
    answers = [llava_answer(0, 0, "B", 4), llava_answer(1, 0, "C", 3), llava_answer(2, 0, "B", 2)]
    metrics = score_mmbench(read_mmbench_tsv(tsv), answers, benchmark="mmbench_cn")
    assert metrics["benchmark"] == "mmbench_cn"
    assert metrics["circular"] is False and metrics["circular_accuracy"] is None
    assert metrics["single_round_accuracy"] == pytest.approx(200 / 3)
    assert metrics["per_split"] == {"dev": {"questions": 3, "circular_accuracy": None,
                                            "single_round_accuracy": pytest.approx(200 / 3)}}


@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    (" C\n", "C"),
    ("B. dog", "B"),
    ("C) bird", "C"),
    ("D: fish", "D"),
    ("The answer is (C).", "C"),  # exactly one option letter as a token
    ("A. Neither B nor C", None),  # several letters and no option text: VLMEvalKit would ask GPT
    ("A. Neither B nor C: a bird", "C"),  # ... or the one option text settles it
    ("dog", "B"),  # the text of exactly one option
    ("I think it is a dog", "B"),  # "I" is no option letter, "a" is lower case
    ("A or B", None),  # two letters, no option text
    ("cat or dog", None),  # two option texts
    ("E", None),  # not an option
    ("b", None),  # lower case is not a letter answer
    ("Cannot determine the answer: A", None),  # a refusal, whatever follows
    ("Z", None),
    ("It could be a dog, though the long explanation goes on and on and on", None),  # too long for option text
])
def test_parse_option(text, expected):
    assert parse_option(text, {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}) == expected


def test_option_text_matching_works_in_chinese():
    assert parse_option("答案是狗", {"A": "猫", "B": "狗"}) == "B"


def test_the_submission_table_is_llavas(tsv):
    answers = [llava_answer(0, 0, "B", 4), llava_answer(1, 0, "blue", 3), llava_answer(2, 0, "Hard to tell.", 2)]
    header, table = submission_table(read_mmbench_tsv(tsv), answers)
    # hint, category, source, image, comment, l2-category dropped; prediction inserted as column 7.
    assert header == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert [row[header.index("prediction")] for row in table] == ["B", "C", "Hard to tell."]
    assert table[2][:4] == ["2", "Is there a cat?", "yes", "no"]


def test_a_test_split_writes_the_submission(tmp_path):
    columns = [column for column in COLUMNS if column != "answer"]
    rows = [dict(row, image=png_base64()) for row in ROWS]
    tsv = write_tsv(tmp_path / "mmbench_test.tsv", rows, columns)
    answers = write_answers(tmp_path / "test.jsonl", [llava_answer(0, 0, "A", 4), llava_answer(1, 0, "B", 3),
                                                      llava_answer(2, 0, "B", 2)])
    parser = argparse.ArgumentParser()
    add_arguments(parser, benchmark="mmbench_cn")
    metrics = run(parser.parse_args(["--questions", str(tsv), "--answers", str(answers),
                                     "--output", str(tmp_path / "out" / "m.json")]))
    assert metrics["benchmark"] == "mmbench_cn"
    assert metrics["single_round_accuracy"] is None and "submission" in metrics["note"]
    lines = (tmp_path / "test_submission.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["index", "question", "A", "B", "C", "D", "prediction", "split"]
    assert [line.split("\t")[6] for line in lines[1:]] == ["A", "B", "B"]
    assert (tmp_path / "out" / "m.json").is_file()


def test_missing_and_duplicated_answers_are_named(tsv):
    rows = read_mmbench_tsv(tsv)
    with pytest.raises(AnswerFileError, match=r"1 answer\(s\) with no answer.*: 2"):
        score_mmbench(rows, [llava_answer(0, 0, "B", 4), llava_answer(1, 0, "C", 3)])
    duplicated = dict(llava_answer(1, 0, "C", 3), answer_id="other")
    with pytest.raises(AnswerFileError, match=r"duplicated \(question_id, round\): '1 round 0'"):
        score_mmbench(rows, [llava_answer(0, 0, "B", 4), llava_answer(1, 0, "C", 3), duplicated,
                             llava_answer(2, 0, "A", 2)])
    with pytest.raises(AnswerFileError, match=r"question_id not in the TSV: 7"):
        score_mmbench(rows, [llava_answer(i, 0, "A", n) for i, n in ((0, 4), (1, 3), (2, 2))]
                      + [{"question_id": 7, "text": "A"}])


def test_all_rounds_need_every_round_of_every_question(tsv):
    rows = read_mmbench_tsv(tsv)
    with pytest.raises(AnswerFileError, match=r"every round.*'2 round 1'"):
        score_mmbench(rows, ALL_ROUNDS[:-1])
    with pytest.raises(AnswerFileError, match=r"round not an integer in 0..n_options-1: '2 round 2'"):
        score_mmbench(rows, ALL_ROUNDS + [dict(llava_answer(2, 0, "A", 2), round_id=2, option_char=None)])
    with pytest.raises(AnswerFileError, match=r"option_char not the rotation.*'1 round 1'"):
        score_mmbench(rows, ALL_ROUNDS[:5] + [dict(ALL_ROUNDS[5], option_char=["A", "B", "C"])] + ALL_ROUNDS[6:])


def test_bad_tsv_rows_are_named(tmp_path):
    rows = [dict(index=0, question="q", A="x", B="y", answer="C"),  # C is not an option
            dict(index=1, question="q", A="x", C="z", answer="A"),  # C after an empty B
            dict(index=1, question="q", A="x", B="y", answer="A"),  # duplicated index
            dict(index=2_000_009, question="q", A="x", B="y", answer="A")]  # rotation of a missing question
    with pytest.raises(AnswerFileError) as error:
        mmbench_questions(write_rows(tmp_path, rows))
    message = str(error.value)
    assert "answer letter not among the row's options: 0" in message
    assert "an option after an empty one: 1" in message
    assert "duplicated index: 1" in message
    assert "without its main row" in message and "2000009" in message


def test_malformed_answer_lines_are_reported(tsv, tmp_path):
    answers = tmp_path / "broken.jsonl"
    answers.write_text(json.dumps(llava_answer(0, 0, "B", 4)) + "\n{not json\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(AnswerFileError, match="line 2: not JSON"):
        run(parser.parse_args(["--questions", str(tsv), "--answers", str(answers)]))


def test_the_xlsx_llava_uploads_when_openpyxl_is_installed(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    written = write_submission(["index", "question", "prediction"], [["0", "q", "A"]], tmp_path / "s.tsv")
    assert written == [tmp_path / "s.tsv", tmp_path / "s.xlsx"]
    sheet = openpyxl.load_workbook(written[1]).active
    assert [[cell.value for cell in row] for row in sheet.iter_rows()] == [["index", "question", "prediction"],
                                                                            [0, "q", "A"]]
