"""MME: LLaVA answers -> the official eval_tool files -> calculation.py's acc, acc+ and scores."""

import argparse
import json

import pytest
from PIL import Image

from llava_sgg.evaluation.answers import AnswerFileError
from llava_sgg.evaluation.mme import (add_arguments, convert_answers_to_mme, parse_pred_ans, read_mme_ground_truth,
                                      read_mme_results, run, score_mme)

SUFFIX = " Please answer yes or no."
LLAVA = " Answer the question using a single word or phrase."

# subtask -> image -> [(question, ground truth, LLaVA's answer)]
EXISTENCE = {  # an images/ + questions_answers_YN/ subtask
    "000000006040.jpg": [("Is there a train in this image?", "Yes", "Yes"),  # right
                         ("Is there a bed in this image?", "No", "No")],  # right: image right twice
    "000000018918.jpg": [("Is there a dog in this image?", "Yes", "Yes, there is a dog."),  # right ("yes" in 4 chars)
                         ("Is there a cat in this image? ", "No", "Not really")],  # right ("no" in "not "), 2 spaces
    "000000061418.jpg": [("Is there a car in this image?", "No", "No"),  # right
                         ("Is there a bus in this image?", "Yes", "I think so")],  # 'other': wrong
}
CODE_REASONING = {  # images and question files side by side
    "0020.png": [("Is a python code shown in the picture?", "Yes", "yes"),  # right
                 ("Is a C++ code shown in the picture?", "No", "Yes")],  # wrong
    "0021.png": [("Will the code print 3?", "No", "no"), ("Will the code print 5?", "Yes", "yes")],  # both right
}


def make_mme(root, subtask, images, *, qa_folder):
    image_dir = root / subtask / ("images" if qa_folder else "")
    text_dir = root / subtask / ("questions_answers_YN" if qa_folder else "")
    image_dir.mkdir(parents=True, exist_ok=True)
    text_dir.mkdir(parents=True, exist_ok=True)
    for name, questions in images.items():
        Image.new("RGB", (4, 4)).save(image_dir / name)
        stem = name.rsplit(".", 1)[0]
        (text_dir / f"{stem}.txt").write_text("".join(f"{q}{SUFFIX}\t{gt}\n" for q, gt, _ in questions))


def llava_answers(subtasks):
    """LLaVA's model_vqa_loader answers on llava_mme.jsonl: the short-answer prompt, ids shared by an image."""
    return [{"question_id": f"{subtask}/{name}", "prompt": " ".join(question.split()) + LLAVA, "text": text,
             "answer_id": f"{subtask}-{name}-{i}", "model_id": "llava-v1.5-7b", "metadata": {}}
            for subtask, images in subtasks.items() for name, questions in images.items()
            for i, (question, _, text) in enumerate(questions)]


@pytest.fixture
def mme_root(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    make_mme(root, "existence", EXISTENCE, qa_folder=True)
    make_mme(root, "code_reasoning", CODE_REASONING, qa_folder=False)
    return root


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_score_llava_answers_against_the_mme_folder(mme_root, tmp_path):
    answers = write_jsonl(tmp_path / "llava-v1.5-7b.jsonl",
                          llava_answers({"existence": EXISTENCE, "code_reasoning": CODE_REASONING}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    metrics = run(parser.parse_args(["--answers", str(answers), "--mme-root", str(mme_root)]))

    existence = metrics["subtasks"]["existence"]  # 5 of 6 questions, 2 of 3 images
    assert existence["questions"] == 6 and existence["images"] == 3 and existence["other"] == 1
    assert existence["acc"] == pytest.approx(500 / 6)
    assert existence["acc_plus"] == pytest.approx(200 / 3)
    assert existence["score"] == pytest.approx(150.0)
    code = metrics["subtasks"]["code_reasoning"]  # 3 of 4 questions, 1 of 2 images
    assert (code["acc"], code["acc_plus"], code["score"]) == (75.0, 50.0, 125.0)
    assert metrics["perception"] == pytest.approx(150.0) and metrics["cognition"] == 125.0
    assert len(metrics["missing_subtasks"]) == 12 and "OCR" in metrics["missing_subtasks"]
    assert json.loads((tmp_path / "llava-v1.5-7b_metrics.json").read_text()) == metrics

    # The files for the official eval_tool: image, question as MME words it, gt, prediction; pairs together.
    lines = (tmp_path / "llava-v1.5-7b_mme" / "existence.txt").read_text().splitlines()
    assert lines[2:4] == ["000000018918.jpg\tIs there a dog in this image? Please answer yes or no.\tYes\t"
                          "Yes, there is a dog.",
                          "000000018918.jpg\tIs there a cat in this image?  Please answer yes or no.\tNo\tNot really"]
    again = run(parser.parse_args(["--results", str(tmp_path / "llava-v1.5-7b_mme")]))
    assert again == metrics
    assert (tmp_path / "llava-v1.5-7b_mme" / "metrics.json").is_file()


@pytest.mark.parametrize("prediction, label", [
    ("yes", "yes"), ("No", "no"), ("Yes, it is.", "yes"), ("no.", "no"), (" yes", "yes"), ("nope", "no"),
    ("Not sure", "no"),  # the official rule reads "no" in "not "
    ("There is a dog", "other"), ("I think yes", "other"), ("", "other"),
])
def test_parse_pred_ans_is_calculation_py(prediction, label):
    assert parse_pred_ans(prediction) == label


def test_score_official_result_files_of_another_tool(tmp_path):
    # As MME's eval_tool expects them: the two questions of an image on consecutive lines.
    (tmp_path / "color.txt").write_text(
        "1.jpg\tIs it red? Please answer yes or no.\tYes\tYes\n"
        "1.jpg\tIs it blue? Please answer yes or no.\tNo\tYes\n"
        "2.jpg\tIs it green? Please answer yes or no.\tYes\tyes\n"
        "2.jpg\tIs it white? Please answer yes or no.\tNo\tNo")  # no final newline
    metrics = score_mme(read_mme_results(tmp_path))
    assert metrics["subtasks"]["color"]["acc"] == 75.0 and metrics["subtasks"]["color"]["acc_plus"] == 50.0
    assert metrics["perception"] == 125.0 and metrics["cognition"] is None


def test_missing_extra_and_duplicated_answers_are_named(mme_root):
    truth = read_mme_ground_truth(mme_root)
    answers = llava_answers({"existence": EXISTENCE, "code_reasoning": CODE_REASONING})
    with pytest.raises(AnswerFileError, match=r"no answer.*existence/000000061418: 'Is there a bus in this image\?"):
        convert_answers_to_mme(answers[:-5] + answers[-4:], truth)  # the bus question left out
    with pytest.raises(AnswerFileError, match="a second answer to one question"):
        convert_answers_to_mme(answers + [dict(answers[0], answer_id="again")], truth)
    with pytest.raises(AnswerFileError, match=r"not in the ground truth: \"code_reasoning/0020.png: 'Is it Java\?"):
        convert_answers_to_mme(answers + [dict(answers[-1], question_id="code_reasoning/0020.png",
                                               prompt="Is it Java?")], truth)
    with pytest.raises(AnswerFileError, match="not MME's: 'mmvet/1.jpg'"):
        convert_answers_to_mme(answers + [dict(answers[0], question_id="mmvet/1.jpg")], truth)
    with pytest.raises(AnswerFileError, match="missing from the ground-truth folder: 'OCR/1.jpg'"):
        convert_answers_to_mme(answers + [dict(answers[0], question_id="OCR/1.jpg")], truth)


def test_bad_ground_truth_and_result_files_are_named(mme_root, tmp_path):
    (mme_root / "code_reasoning" / "0022.txt").write_text("Is it code? Please answer yes or no.\tMaybe\n")
    with pytest.raises(AnswerFileError) as error:
        read_mme_ground_truth(mme_root)
    assert "0022.txt:1 is not 'question<TAB>Yes|No'" in str(error.value)
    assert "0022.txt has 0 question(s), not 2" in str(error.value)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "count.txt").write_text("1.jpg\tHow many? Please answer yes or no.\tYes\n")
    with pytest.raises(AnswerFileError, match="count.txt:1 has 3 tab-separated fields, not 4"):
        read_mme_results(tmp_path / "results")
    (tmp_path / "results" / "count.txt").write_text("1.jpg\tq\tYes\tYes\n2.jpg\tq\tNo\tNo\n")
    with pytest.raises(AnswerFileError, match="consecutive lines of different images on 'lines 1-2'"):
        score_mme(read_mme_results(tmp_path / "results"))


def test_answers_need_the_ground_truth_folder(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(AnswerFileError, match="--mme-root"):
        run(parser.parse_args(["--answers", str(write_jsonl(tmp_path / "a.jsonl", []))]))
