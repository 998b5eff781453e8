"""MMBench / MMBench-CN: the official protocol (each TSV row once, circular accuracy over the TSV's copies),
the explicit rotation mode, pandas' NA strings, option parsing, the submission table, bad input."""

import argparse
import base64
import csv
import io
import json
import os

import pytest
from PIL import Image

from llava_sgg.evaluation.answers import AnswerFileError
from llava_sgg.evaluation.generate import mmbench_prompts
from llava_sgg.evaluation.mmbench import (ROTATION_CAVEAT, add_arguments, is_missing, mmbench_questions, parse_option,
                                          read_mmbench_tsv, run, score_mmbench, submission_table, write_submission)
from llava_sgg.evaluation.prompts import OPTION_LETTER

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
    """One line of LLaVA's model_vqa_mmbench.py (--all-rounds for round_id > 0): options rotated left once per round."""
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


# The official protocol on a TSV that holds CircularEval's copies: row i + k * 1e6 is question i with its
# options shifted left k places and its own answer letter. Each row is answered once.
OFFICIAL_ROWS = [
    dict(index=0, question="Which animal barks?", A="cat", B="dog", C="bird", D="fish", answer="B", category="object"),
    dict(index=1_000_000, question="Which animal barks?", A="dog", B="bird", C="fish", D="cat", answer="A",
         category="object"),
    dict(index=2_000_000, question="Which animal barks?", A="bird", B="fish", C="cat", D="dog", answer="D",
         category="object"),
    dict(index=3_000_000, question="Which animal barks?", A="fish", B="cat", C="dog", D="bird", answer="C",
         category="object"),
    dict(index=1, question="Sky colour?", A="red", B="green", C="blue", answer="C", category="colour"),
    dict(index=1_000_001, question="Sky colour?", A="green", B="blue", C="red", answer="B", category="colour"),
    dict(index=2_000_001, question="Sky colour?", A="blue", B="red", C="green", answer="A", category="colour"),
    dict(index=2, question="A cat?", A="yes", B="no", answer="A", category="colour"),
    dict(index=1_000_002, question="A cat?", A="no", B="yes", answer="B", category="colour"),
    dict(index=3, question="A dog?", A="yes", B="no", answer="A", category="object"),
    dict(index=1_000_003, question="A dog?", A="no", B="yes", answer="B", category="object"),
]
OFFICIAL_ANSWERS = {  # question_id -> the model's text, each row once (round 0)
    0: "B", 1_000_000: "A", 2_000_000: "D. dog", 3_000_000: "C",  # question 0: all 4 right
    1: "C", 1_000_001: "blue", 2_000_001: "B",  # question 1: the last copy wrong
    2: "B", 1_000_002: "B",  # question 2: its main row wrong, its copy right
    3: "(A)", 1_000_003: "B",  # question 3: both right
}


def test_the_official_protocol_answers_each_row_once_and_scores_the_tsv_copies(tmp_path):
    rows = [dict(row, image=png_base64()) for row in OFFICIAL_ROWS]
    tsv = write_tsv(tmp_path / "mmbench_dev_20230712.tsv", rows)

    prompts = mmbench_prompts(tsv)  # what `llava-sgg answer-mmbench` asks by default
    assert [p.question_id for p in prompts] == [row["index"] for row in OFFICIAL_ROWS]
    assert {p.record["round_id"] for p in prompts} == {0}
    assert prompts[1].text == f"Which animal barks?\nA. dog\nB. bird\nC. fish\nD. cat\n{OPTION_LETTER}"

    answers = [{"question_id": p.question_id, **p.record, "prompt": p.text, "text": OFFICIAL_ANSWERS[p.question_id]}
               for p in prompts]
    metrics = score_mmbench(read_mmbench_tsv(tsv), answers)
    # By hand: circularly questions 0 and 3 are right (2 of 4); their main rows alone 0, 1 and 3 (3 of 4).
    # object = questions 0 and 3: 100 / 100; colour = questions 1 and 2: circular 0, main rows 1 of 2.
    assert metrics["protocol"] == "official" and "caveat" not in metrics
    assert metrics["questions"] == 4 and metrics["rows"] == 11 and metrics["circular_copies"] == 7
    assert metrics["answers"] == 11 and metrics["circular"] is True
    assert metrics["circular_accuracy"] == 50.0
    assert metrics["single_round_accuracy"] == 75.0
    assert metrics["per_category"] == {
        "colour": {"questions": 2, "circular_accuracy": 0.0, "single_round_accuracy": 50.0},
        "object": {"questions": 2, "circular_accuracy": 100.0, "single_round_accuracy": 100.0}}
    assert metrics["unparseable"] == 0


def test_pandas_na_strings_are_missing_exactly_as_llava_reads_them():
    pandas = pytest.importorskip("pandas")

    def llava_is_none(value):  # model_vqa_mmbench.py's is_none, on what pandas.read_table returns
        return value is None or (isinstance(value, float) and value != value) or \
            (isinstance(value, str) and value.lower() in ("nan", "none"))

    cells = ["NA", "N/A", "n/a", "null", "NULL", "None", "none", "NONE", "nan", "NaN", "-nan", "#N/A", "<NA>", "",
             " NA", "NA ", "Na", "Null", "nil", "0", "None of these", "dog"]
    table = "\t".join(f"c{i}" for i in range(len(cells))) + "\n" + "\t".join(cells) + "\n"
    read = pandas.read_table(io.StringIO(table), dtype=object).iloc[0].tolist()
    assert [is_missing(cell) for cell in cells] == [llava_is_none(value) for value in read]
    # Spelled out: pandas' NA strings and LLaVA's "nan"/"none" in any case; nothing padded or merely similar.
    assert [cell for cell in cells if is_missing(cell)] == cells[:14]


def test_options_and_hints_that_pandas_reads_as_missing(tmp_path):
    rows = [
        # The hint "NA" is left out; option C "None" (a count of zero) is NaN to pandas: LLaVA shows A and B only.
        dict(index=0, question="How many cats?", hint="NA", A="1", B="2", C="None", D="3", answer="B"),
        # "N/A" as a hint is left out too; " NA" is not an NA string (pandas matches whole cells) and stays.
        dict(index=1, question="Colour?", hint="N/A", A="red", B="blue", answer="A"),
        dict(index=2, question="Size?", hint=" NA", A="big", B="small", answer="B"),
        # The right option is one LLaVA never shows: the question can only be answered wrong.
        dict(index=3, question="How many dogs?", hint="null", A="2", B="NULL", C="1", answer="B"),
    ]
    tsv = write_tsv(tmp_path / "mmbench.tsv", [dict(row, image=png_base64()) for row in rows])
    prompts = {p.question_id: p.text for p in mmbench_prompts(tsv)}
    assert prompts[0] == f"How many cats?\nA. 1\nB. 2\n{OPTION_LETTER}"
    assert prompts[1] == f"Colour?\nA. red\nB. blue\n{OPTION_LETTER}"
    assert prompts[2] == f" NA\nSize?\nA. big\nB. small\n{OPTION_LETTER}"
    assert prompts[3] == f"How many dogs?\nA. 2\n{OPTION_LETTER}"
    # Rotation rotates the options shown: two rounds for two options, one for question 3's single one.
    assert [p.question_id for p in mmbench_prompts(tsv, rotate_options=True)] == [0, 0, 1, 1, 2, 2, 3]

    questions = mmbench_questions(read_mmbench_tsv(tsv))
    assert questions[0].options == ("1", "2") and questions[0].hidden == ("C", "D") and questions[0].hint is None
    assert questions[2].hint == " NA" and questions[3].hidden == ("B", "C")
    answers = [{"question_id": 0, "text": "B"}, {"question_id": 1, "text": "A"}, {"question_id": 2, "text": "A"},
               {"question_id": 3, "text": "B"}]  # "B" is no option LLaVA showed for question 3
    metrics = score_mmbench(read_mmbench_tsv(tsv), answers)
    assert metrics["single_round_accuracy"] == 50.0  # questions 0 and 1 right, 2 and 3 wrong
    assert metrics["rows_with_hidden_options"] == 2 and metrics["rows_with_hidden_options_ids"] == [0, 3]
    assert metrics["unparseable_ids"] == [[3, 0]] and "pandas reads as missing" in metrics["note"]


def test_the_answering_side_refuses_what_the_scorer_refuses(tmp_path):
    rows = [dict(index=0, question="q", A="x", B="", C="z", answer="A", image=png_base64()),  # C after an empty B
            dict(index=1, question="NA", A="x", B="y", answer="A", image=png_base64())]  # pandas: no question
    with pytest.raises(AnswerFileError, match=r"mmbench.tsv: .*an option after an empty one: 0.*no question: 1"):
        mmbench_prompts(write_tsv(tmp_path / "mmbench.tsv", rows))
    rows = [dict(index=5, question="q", A="x", B="y", answer="A", image="bm90IGFuIGltYWdl")]  # base64 of "not an image"
    with pytest.raises(AnswerFileError, match=r"mmbench.tsv: row with index 5: the image column is not a base64 image"):
        mmbench_prompts(write_tsv(tmp_path / "mmbench.tsv", rows))
    with pytest.raises(ValueError, match="lang"):
        mmbench_prompts(write_tsv(tmp_path / "mmbench.tsv", rows), lang="fr")


def test_the_command_line_answers_each_row_once_unless_asked_to_rotate():
    from llava_sgg.cli import build_parser

    base = ["answer-mmbench", "--model", "m", "--answers-file", "a.jsonl", "--question-file", "q.tsv"]
    assert build_parser().parse_args(base).rotate_options is False
    assert build_parser().parse_args(base + ["--rotate-options"]).rotate_options is True
    assert build_parser().parse_args(base + ["--all-rounds"]).rotate_options is True  # the official script's name


@pytest.fixture
def tsv(tmp_path):
    rows = [dict(row, image=png_base64()) for row in ROWS]
    rows[0]["image"] = png_base64(200)  # ~160 KB of base64: past the csv module's default field limit
    return write_tsv(tmp_path / "mmbench_dev.tsv", rows)


def test_rotate_options_answers_are_scored_with_a_caveat(tsv, tmp_path, capsys):
    (tmp_path / "answers").mkdir()
    answers = write_answers(tmp_path / "answers" / "llava.jsonl", ALL_ROUNDS)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    metrics = run(parser.parse_args(["--questions", str(tsv), "--answers", str(answers)]))

    # Not the published protocol: the metrics and the printout say so.
    assert metrics["protocol"] == "rotate_options" and metrics["caveat"] == ROTATION_CAVEAT
    assert "not comparable to published MMBench numbers" in metrics["caveat"]
    assert "CAVEAT: " in capsys.readouterr().out
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
    assert metrics["benchmark"] == "mmbench_cn" and metrics["protocol"] == "official" and "caveat" not in metrics
    assert metrics["circular"] is False and metrics["circular_accuracy"] is None
    assert "no circular copies" in metrics["note"]
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
    ("A dog", "A"),  # the article is a letter token: VLMEvalKit reads option A too
])
def test_parse_option(text, expected):
    assert parse_option(text, {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}) == expected


@pytest.mark.parametrize("text, expected", [
    # Current VLMEvalKit (since c3371551, August 2025) leaves the next two to ChatGPT: it wants the letter among
    # the last 4 tokens (here the 1st of 10), and reads option texts only in answers at most twice as long as
    # all option texts together (2 * 14 = 28 characters).
    ("B is right because dogs bark and cats do not", "B"),
    ("It could be a dog, though the long explanation goes on and on", "B"),
    # Two letters, no option text; since a67ace50 VLMEvalKit reads "answer is B" first and gives B.
    ("The answer is B, not A", None),
    # An API failure skips the letter rule (in every version), not the option-text rule.
    ("Failed to obtain answer via API. B", None),
    ("Failed to obtain answer via API: dog", "B"),
])
def test_parse_option_is_vlmevalkits_can_infer_before_august_2025(text, expected):
    assert parse_option(text, {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}) == expected


def test_an_answer_text_that_is_not_a_string_is_an_error(tsv, tmp_path):
    answers = [llava_answer(0, 0, "B", 4), llava_answer(1, 0, None, 3), llava_answer(2, 0, 2, 2)]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(AnswerFileError) as error:
        run(parser.parse_args(["--questions", str(tsv), "--answers", str(write_answers(tmp_path / "a.jsonl", answers))]))
    assert "line 2 (question_id 1): 'text' is null, not a string" in str(error.value)
    assert "line 3 (question_id 2): 'text' is 2, not a string" in str(error.value)
    with pytest.raises(AnswerFileError, match=r"no 'text' string: '1 round 0: None', '2 round 0: 2'"):
        score_mmbench(read_mmbench_tsv(tsv), answers)


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
