"""ScienceQA-IMG as LLaVA's eval_science_qa.py, on problems.json + pid_splits.json."""

import argparse
import json

import pytest

from llava_sgg.evaluation import sqa
from llava_sgg.evaluation.answers import AnswerFileError


def problem(answer, n_choices, image):
    return {"question": "?", "choices": [f"c{i}" for i in range(n_choices)], "answer": answer, "hint": "",
            "image": image, "task": "closed choice", "split": "test"}


PROBLEMS = {  # problems.json
    "1": problem(0, 3, "image.png"),
    "2": problem(1, 2, "image.png"),
    "3": problem(2, 3, "image.png"),
    "4": problem(0, 4, "image.png"),
    "5": problem(1, 2, None),
    "6": problem(0, 2, "image.png"),
    "7": problem(0, 2, None),  # train split: needs no answer
}
SPLITS = {"train": ["7"], "test": ["1", "2", "3", "4", "5", "6"]}
ANSWERS = {
    "1": "A",  # right
    "2": "B. blue",  # "<letter>. " -> B: right
    "3": "The answer is C.",  # right
    "4": "I think D",  # FAILED: wrong
    "5": "The answer is E.",  # E, past the 2 choices: wrong, not FAILED
    "6": "A.",  # neither a letter nor "A. ...": FAILED
}


def write_sqa(tmp_path, answers=ANSWERS):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps(SPLITS))
    (tmp_path / "answers.jsonl").write_text("".join(
        json.dumps({"question_id": pid, "prompt": "<image>\n?", "text": text, "answer_id": "a", "model_id": "m",
                    "metadata": {}}) + "\n" for pid, text in answers.items()))


def parse(tmp_path):
    parser = argparse.ArgumentParser()
    sqa.add_arguments(parser)
    return parser.parse_args(["--answers", str(tmp_path / "answers.jsonl"), "--base-dir", str(tmp_path)])


def test_sqa_accuracy_as_llava_reports_it(tmp_path):
    write_sqa(tmp_path)
    metrics = sqa.run(parse(tmp_path))
    assert (metrics["questions"], metrics["correct"]) == (6, 3)
    assert metrics["accuracy"] == pytest.approx(50.0)
    assert (metrics["img_questions"], metrics["img_correct"]) == (5, 3)  # problem 5 has no image
    assert metrics["img_accuracy"] == pytest.approx(60.0)
    assert (metrics["failed"], metrics["failed_ids"]) == (2, ["4", "6"])
    assert json.loads((tmp_path / "answers_metrics.json").read_text())["img_accuracy"] == pytest.approx(60.0)


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("E", "E"), ("C. It is a cat", "C"), ("The answer is B.", "B"), ("So The answer is D!", "D"),
    ("The answer is B", "FAILED"),  # the regex needs one character after the letter
    ("The answer is A. The answer is B.", "FAILED"),  # two matches
    (" A", "FAILED"), ("a", "FAILED"), ("F", "FAILED"), ("", "FAILED"),
])
def test_parse_option(text, letter):
    assert sqa.parse_option(text) == letter


def test_missing_answer_is_an_error_naming_it(tmp_path):
    write_sqa(tmp_path, {pid: text for pid, text in ANSWERS.items() if pid != "5"})
    with pytest.raises(AnswerFileError, match="1 of 6 question ids have no answer: '5'"):
        sqa.run(parse(tmp_path))


def test_problem_whose_answer_is_not_an_option_is_an_error():
    problems = dict(PROBLEMS, **{"2": problem(2, 2, None)})
    with pytest.raises(AnswerFileError, match="answer is not one of its options ABCDE: '2'"):
        sqa.score_sqa({pid: {"text": text} for pid, text in ANSWERS.items()}, problems, SPLITS["test"])
