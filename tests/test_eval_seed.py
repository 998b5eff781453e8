"""SEED-Bench as LLaVA scores it: accuracy per question type, on images, on videos (answered from their
middle frame) and overall, and the upload file."""

import argparse
import json

import pytest
from PIL import Image

from llava_sgg.evaluation.answers import AnswerFileError
from llava_sgg.evaluation.generate import question_prompts
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
                  question("v_1", 10, "B", data_type="video"), question("v_2", 10, "C", data_type="video"),
                  question("v_3", 11, "D", data_type="video"), question("v_4", 12, "A", data_type="video")],
}
# LLaVA's question file writes some ids as numbers; SEED-Bench.json spells them as strings.
ANSWERS = {101669: "A", "101670": "B", 101671: "A.", "101672": "D", "101673": "C",
           "v_1": "B", "v_2": "A", "v_3": "D", "v_4": "(A)"}
VIDEO = ("v_1", "v_2", "v_3", "v_4")


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

    # By hand. Images: 101669, 101670 and 101672 right ("A." is not the letter, 101673 is wrong): 3 of 5.
    # Videos: v_1 and v_3 right (v_2 wrong, "(A)" not the letter): 2 of 4. Overall, pooled as LLaVA's
    # total: 5 of 9 = 55.56 (not the mean of the two parts, 55.0, nor of the six types, 52.78).
    assert metrics["questions"] == 9 and metrics["image_questions"] == 5 and metrics["video_questions"] == 4
    assert metrics["image_accuracy"] == 60.0
    assert metrics["video_accuracy"] == 50.0
    assert metrics["overall_accuracy"] == pytest.approx(500 / 9)
    assert metrics["per_type"] == {"Scene Understanding": {"questions": 3, "accuracy": pytest.approx(200 / 3)},
                                   "Instance Identity": {"questions": 1, "accuracy": 0.0},
                                   "Text Understanding": {"questions": 1, "accuracy": 100.0},
                                   "Action Recognition": {"questions": 2, "accuracy": 50.0},
                                   "Action Prediction": {"questions": 1, "accuracy": 100.0},
                                   "Procedure Understanding": {"questions": 1, "accuracy": 0.0}}
    assert metrics["not_a_letter"] == 2 and metrics["not_a_letter_ids"] == ["101671", "v_4"]
    assert json.loads((tmp_path / "llava-v1.5-7b_metrics.json").read_text()) == metrics
    upload = [json.loads(line) for line in (tmp_path / "llava-v1.5-7b_upload.jsonl").read_text().splitlines()]
    assert upload == [{"question_id": "101669", "prediction": "A"}, {"question_id": "101670", "prediction": "B"},
                      {"question_id": "101671", "prediction": "A."}, {"question_id": "101672", "prediction": "D"},
                      {"question_id": "101673", "prediction": "C"}, {"question_id": "v_1", "prediction": "B"},
                      {"question_id": "v_2", "prediction": "A"}, {"question_id": "v_3", "prediction": "D"},
                      {"question_id": "v_4", "prediction": "(A)"}]


def test_image_questions_only():
    assert list(seed_image_questions(ANNOTATION)) == ["101669", "101670", "101671", "101672", "101673"]


def test_video_answers_are_needed_unless_the_image_part_is_scored_alone():
    texts = {key: text for key, text in ANSWERS.items() if key not in VIDEO}
    with pytest.raises(AnswerFileError, match=r"4 of 9 questions .* no answer: 'v_1', 'v_2', 'v_3', 'v_4'; "
                                              r"4 of them are video questions, .*middle frame.*--image-only"):
        score_seed(ANNOTATION, llava_answers(texts))
    metrics = score_seed(ANNOTATION, llava_answers(texts), image_only=True)
    assert metrics["image_accuracy"] == 60.0 and metrics["video_accuracy"] is None
    assert metrics["overall_accuracy"] is None and metrics["video_answers_ignored"] == 0
    assert "image part only" in metrics["note"]
    assert len(seed_upload_records(ANNOTATION, llava_answers(texts), image_only=True)) == 5
    assert score_seed(ANNOTATION, llava_answers(ANSWERS), image_only=True)["video_answers_ignored"] == 4


def test_missing_unknown_and_doubled_ids_are_named():
    texts = {key: text for key, text in ANSWERS.items() if key != "101672"}
    with pytest.raises(AnswerFileError, match=r"1 of 9 questions of SEED-Bench.json have no answer: '101672'$"):
        score_seed(ANNOTATION, llava_answers(texts))
    with pytest.raises(AnswerFileError, match=r"1 of 9 question ids have no answer: '101672'"):
        seed_upload_records(ANNOTATION, llava_answers(texts))
    with pytest.raises(AnswerFileError, match=r"not in SEED-Bench.json: '999' \(is SEED-Bench.json the version"):
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


def test_video_questions_are_answered_from_their_extracted_frame(tmp_path):
    # LLaVA's llava-seed-bench.jsonl names a video question's middle frame as its image.
    for folder in ("SEED-Bench-image", "SEED-Bench-video-image"):
        (tmp_path / folder).mkdir()
    Image.new("RGB", (8, 6), (0, 0, 255)).save(tmp_path / "SEED-Bench-image" / "1454426_2591111986.jpg")
    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "SEED-Bench-video-image" / "v_1.png")
    lines = [{"image": "SEED-Bench-image/1454426_2591111986.jpg", "text": "How many?\nA. 1\nB. 2",
              "question_id": 101669},
             {"image": "SEED-Bench-video-image/v_1.png", "text": "What happens?\nA. x\nB. y", "question_id": "v_1"}]
    question_file = tmp_path / "llava-seed-bench.jsonl"
    question_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    prompts = question_prompts(question_file, tmp_path)
    assert [p.question_id for p in prompts] == [101669, "v_1"]
    assert prompts[1].image.getpixel((0, 0)) == (255, 0, 0)

    # Frames not extracted: every missing one is named, before any image is loaded.
    lines += [{"image": f"SEED-Bench-video-image/v_{i}.png", "text": "?", "question_id": f"v_{i}"} for i in (2, 3)]
    question_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(AnswerFileError, match=r"llava-seed-bench.jsonl: 2 question\(s\) name an image that is not a "
                                              r"file under .*: 'v_2: .*SEED-Bench-video-image/v_2.png', 'v_3: "):
        question_prompts(question_file, tmp_path)
