"""SEED-Bench image part: LLaVA's accuracy per question type and its upload file."""

import argparse
import json

import pytest

from llava_sgg.evaluation.answers import AnswerFileError
from llava_sgg.evaluation.seed import add_arguments, run, score_seed, seed_image_questions, seed_upload_records

QUESTION_TYPES = ["Scene Understanding", "Instance Identity", "Instance Attributes", "Instance Location",
                  "Instances Counting", "Spatial Relation", "Instance Interaction", "Visual Reasoning",
                  "Text Understanding", "Action Recognition", "Action Prediction", "Procedure Understanding"]


def question(question_id, type_id, answer, data_type="image"):
    return {"question_id": question_id, "question_type_id": type_id, "answer": answer, "data_type": data_type,
            "data_id": f"{question_id}.jpg", "question": "?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
            "choice_d": "d"}


ANNOTATION = {
    "question_type": {name: i for i, name in enumerate(QUESTION_TYPES, start=1)},
    "questions": [question("101669", 1, "A"), question("101670", 1, "B"), question("101671", 1, "C"),
                  question("101672", 9, "D"), question("101673", 2, "A"),
                  question("v_1", 10, "B", data_type="video")],
}
# LLaVA's question file writes some ids as numbers; SEED-Bench.json spells them as strings.
ANSWERS = {101669: "A", "101670": "B", 101671: "A.", "101672": "D", "101673": "C", "v_1": "B"}


def llava_answers(texts):
    return {key: {"question_id": key, "prompt": "...", "text": text, "answer_id": str(key), "model_id": "m",
                  "metadata": {}} for key, text in texts.items()}


def test_score_and_upload_file(tmp_path):
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(ANNOTATION))
    answers = tmp_path / "llava-v1.5-7b.jsonl"
    answers.write_text("".join(json.dumps(record) + "\n" for record in llava_answers(ANSWERS).values()))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    metrics = run(parser.parse_args(["--annotation", str(tmp_path / "SEED-Bench.json"), "--answers", str(answers)]))

    # Scene Understanding: 2 of 3 ("A." is not the letter); Instance Identity 0 of 1; Text Understanding 1 of 1.
    assert metrics["questions"] == 5
    assert metrics["image_accuracy"] == 60.0
    assert metrics["per_type"] == {"Scene Understanding": {"questions": 3, "accuracy": pytest.approx(200 / 3)},
                                   "Instance Identity": {"questions": 1, "accuracy": 0.0},
                                   "Text Understanding": {"questions": 1, "accuracy": 100.0}}
    assert metrics["not_a_letter"] == 1 and metrics["not_a_letter_ids"] == ["101671"]
    assert metrics["video_answers_ignored"] == 1
    assert json.loads((tmp_path / "llava-v1.5-7b_metrics.json").read_text()) == metrics
    upload = [json.loads(line) for line in (tmp_path / "llava-v1.5-7b_upload.jsonl").read_text().splitlines()]
    assert upload == [{"question_id": "101669", "prediction": "A"}, {"question_id": "101670", "prediction": "B"},
                      {"question_id": "101671", "prediction": "A."}, {"question_id": "101672", "prediction": "D"},
                      {"question_id": "101673", "prediction": "C"}, {"question_id": "v_1", "prediction": "B"}]


def test_image_questions_only():
    assert list(seed_image_questions(ANNOTATION)) == ["101669", "101670", "101671", "101672", "101673"]


def test_video_answers_are_not_needed():
    texts = {key: text for key, text in ANSWERS.items() if key != "v_1"}
    metrics = score_seed(ANNOTATION, llava_answers(texts))
    assert metrics["image_accuracy"] == 60.0 and metrics["video_answers_ignored"] == 0
    assert len(seed_upload_records(ANNOTATION, llava_answers(texts))) == 5


def test_missing_unknown_and_doubled_ids_are_named():
    texts = {key: text for key, text in ANSWERS.items() if key != "101672"}
    with pytest.raises(AnswerFileError, match=r"1 of 5 question ids have no answer: '101672'"):
        score_seed(ANNOTATION, llava_answers(texts))
    with pytest.raises(AnswerFileError, match=r"not in SEED-Bench.json: '999'"):
        score_seed(ANNOTATION, llava_answers(dict(ANSWERS, **{"999": "A"})))
    with pytest.raises(AnswerFileError, match="both as a number and as a string"):
        score_seed(ANNOTATION, llava_answers(dict(ANSWERS, **{"101669": "A"})))


def test_a_bad_annotation_is_named():
    bad = {"question_type": ANNOTATION["question_type"],
           "questions": ANNOTATION["questions"] + [question("7", 1, "E"), question("8", 42, "A"),
                                                   question("101669", 1, "A")]}
    with pytest.raises(AnswerFileError) as error:
        score_seed(bad, llava_answers(ANSWERS))
    message = str(error.value)
    assert "answer that is not A-D: '7'" in message
    assert "question_type_id not in question_type: '8'" in message
    assert "duplicated question_id: '101669'" in message
    with pytest.raises(AnswerFileError, match="not SEED-Bench.json"):
        score_seed({"questions": []}, {})


def test_the_question_file_must_be_answered_in_full(tmp_path):
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(ANNOTATION))
    questions = tmp_path / "llava-seed-bench.jsonl"
    questions.write_text("".join(json.dumps({"question_id": key, "text": "?", "category": "x"}) + "\n"
                                 for key in ANSWERS))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(record) + "\n"
                               for key, record in llava_answers(ANSWERS).items() if key != "v_1"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(AnswerFileError, match="have no answer: 'v_1'"):
        run(parser.parse_args(["--annotation", str(tmp_path / "SEED-Bench.json"), "--answers", str(answers),
                               "--questions", str(questions)]))
