"""GQA: LLaVA's conversion to the official predictions file, and the official exact-match accuracy."""

import argparse
import json

import pytest

from llava_sgg.evaluation import gqa
from llava_sgg.evaluation.answers import AnswerFileError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def question(answer, structural, semantic, balanced=True):
    return {"imageId": "n1", "question": "?", "answer": answer, "isBalanced": balanced,
            "types": {"structural": structural, "semantic": semantic, "detailed": "x"}}


QUESTIONS = {  # testdev_balanced_questions.json
    "201307251": question("yes", "verify", "rel"),
    "201640614": question("table", "query", "cat"),
    "20968078": question("left", "query", "rel"),
    "202218649": question("no", "logical", "obj"),
    "20968079": question("white", "query", "attr"),
    "999": question("red", "query", "attr", balanced=False),  # not balanced: needs no prediction
}
ANSWERS = [
    ("201307251", "Yes."),  # -> "yes": right
    ("201640614", "Table"),  # -> "table": right
    ("20968078", "Left. "),  # only trailing periods go -> "left. ": wrong
    ("202218649", "no.."),  # -> "no": right
    ("20968079", "White color"),  # wrong
]


def test_gqa_accuracy_as_llava_reports_it(tmp_path):
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(QUESTIONS))
    write_jsonl(tmp_path / "answers.jsonl", [{"question_id": q, "prompt": "?", "text": t, "answer_id": "a",
                                              "model_id": "m", "metadata": {}} for q, t in ANSWERS])
    parser = argparse.ArgumentParser()
    gqa.add_arguments(parser)
    args = parser.parse_args(["--answers", str(tmp_path / "answers.jsonl"),
                              "--questions", str(tmp_path / "testdev_balanced_questions.json")])
    metrics = gqa.run(args)

    assert json.loads((tmp_path / "answers_predictions.json").read_text()) == [
        {"questionId": "201307251", "prediction": "yes"}, {"questionId": "201640614", "prediction": "table"},
        {"questionId": "20968078", "prediction": "left. "}, {"questionId": "202218649", "prediction": "no"},
        {"questionId": "20968079", "prediction": "white color"}]
    assert metrics["questions"] == 5
    assert metrics["accuracy"] == pytest.approx(60.0)  # 3 of 5
    assert metrics["binary"] == pytest.approx(100.0)  # verify + logical: 2 of 2
    assert metrics["open"] == pytest.approx(100 / 3)  # query: 1 of 3
    assert metrics["per_structural_type"] == pytest.approx({"logical": 100.0, "query": 100 / 3, "verify": 100.0})
    assert metrics["per_semantic_type"] == pytest.approx({"attr": 0.0, "cat": 100.0, "obj": 100.0, "rel": 50.0})
    assert json.loads((tmp_path / "answers_metrics.json").read_text())["accuracy"] == pytest.approx(60.0)


def test_gqa_prediction_strips_trailing_periods_and_lowercases():
    assert gqa.gqa_prediction("Yes...") == "yes"
    assert gqa.gqa_prediction("St. Louis") == "st. louis"


def test_missing_balanced_prediction_is_an_error_naming_it():
    predictions = [{"questionId": q, "prediction": gqa.gqa_prediction(t)} for q, t in ANSWERS[:3]]
    with pytest.raises(AnswerFileError, match=r"2 of 5 question ids have no answer: '202218649', '20968079'"):
        gqa.score_gqa(predictions, QUESTIONS)


def test_unknown_and_duplicated_predictions_are_errors():
    predictions = [{"questionId": q, "prediction": "yes"} for q, _ in ANSWERS]
    with pytest.raises(AnswerFileError, match="not in the questions: 'nope'"):
        gqa.score_gqa(predictions + [{"questionId": "nope", "prediction": "yes"}], QUESTIONS)
    with pytest.raises(AnswerFileError, match="duplicated questionId"):
        gqa.score_gqa(predictions + predictions[:1], QUESTIONS)
