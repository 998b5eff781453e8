"""MME: LLaVA answers -> the official eval_tool files -> calculation.py's acc, acc+ and scores."""

import argparse
import json

import pytest
from PIL import Image

from llava_sgg.evaluation.answers import AnswerFileError
from llava_sgg.evaluation.mme import (add_arguments, convert_answers_to_mme, parse_pred_ans, read_mme_ground_truth,
                                      read_mme_results, run, score_mme, write_mme_results)

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

    # The files for the official eval_tool: the image's question file, question as MME words it, gt, prediction.
    lines = (tmp_path / "llava-v1.5-7b_mme" / "existence.txt").read_text().splitlines()
    assert lines[2:4] == ["000000018918.txt\tIs there a dog in this image? Please answer yes or no.\tYes\t"
                          "Yes, there is a dog.",
                          "000000018918.txt\tIs there a cat in this image?  Please answer yes or no.\tNo\tNot really"]
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


def test_the_results_files_are_llavas_converter_output(mme_root, tmp_path):
    # LLaVA's llava_mme.jsonl order: subtasks and images not sorted, an image's questions in its own order.
    answers = llava_answers({"code_reasoning": CODE_REASONING, "existence": EXISTENCE})
    answers = answers[2:4] + answers[1::-1] + answers[4:]  # image 0021 first, then 0020's two questions swapped
    written = write_mme_results(convert_answers_to_mme(answers, read_mme_ground_truth(mme_root)), tmp_path / "out")
    assert sorted(path.name for path in written) == ["code_reasoning.txt", "existence.txt"]
    # convert_answer_to_mme.py: question_id "code_reasoning/0020.png" -> "0020.txt"; the answer text as it is.
    assert (tmp_path / "out" / "code_reasoning.txt").read_text() == (
        "0021.txt\tWill the code print 3? Please answer yes or no.\tNo\tno\n"
        "0021.txt\tWill the code print 5? Please answer yes or no.\tYes\tyes\n"
        "0020.txt\tIs a C++ code shown in the picture? Please answer yes or no.\tNo\tYes\n"
        "0020.txt\tIs a python code shown in the picture? Please answer yes or no.\tYes\tyes\n")

    # Answers that keep an image's questions apart are brought together, as calculation.py pairs lines 1-2, 3-4.
    apart = [answers[0], answers[2], answers[1], answers[3]] + answers[4:]
    rows = convert_answers_to_mme(apart, read_mme_ground_truth(mme_root))["code_reasoning"]
    assert [(row[0], row[3]) for row in rows] == [("0021.txt", "no"), ("0021.txt", "yes"),
                                                  ("0020.txt", "Yes"), ("0020.txt", "yes")]


@pytest.mark.parametrize("answer, field, right", [
    ("\r\nyes", "yes", True),  # CR and LF deleted, as MME's readme asks: not "  yes", which reads "  ye": other
    ("yes\n", "yes", True),
    ("Yes.", "Yes.", True),  # "yes." has "yes" in its first 4 characters
    ("\tno", "no", False),  # a tab deleted too: a fifth field would stop calculation.py
    ("No, there is no train.", "No, there is no train.", False),
    ("Yes,\nthere\tis.", "Yes,thereis.", True),
    ("   yes", "   yes", False),  # spaces kept, as officially: "   y" is 'other'
])
def test_an_answer_becomes_one_eval_tool_field(mme_root, tmp_path, answer, field, right):
    answers = llava_answers({"existence": EXISTENCE, "code_reasoning": CODE_REASONING})
    answers[0] = dict(answers[0], text=answer)  # "Is there a train in this image?", ground truth Yes
    write_mme_results(convert_answers_to_mme(answers, read_mme_ground_truth(mme_root)), tmp_path / "out")

    # As calculation.py reads it: readlines() in text mode (CR, LF, CR LF end a line), 4 tab-separated fields.
    with open(tmp_path / "out" / "existence.txt") as handle:
        lines = handle.readlines()
    assert len(lines) == 6 and all(len(line.split("\t")) == 4 for line in lines)
    assert lines[0] == f"000000006040.txt\tIs there a train in this image? Please answer yes or no.\tYes\t{field}\n"
    # existence otherwise has 4 of 5 other questions right and 2 of its other 2 images both right.
    existence = score_mme(read_mme_results(tmp_path / "out"))["subtasks"]["existence"]
    assert existence["acc"] == pytest.approx((500 if right else 400) / 6)
    assert existence["acc_plus"] == pytest.approx((200 if right else 100) / 3)


def test_an_answer_that_is_not_a_string_names_its_line(mme_root, tmp_path):
    answers = llava_answers({"existence": EXISTENCE, "code_reasoning": CODE_REASONING})
    answers[1] = dict(answers[1], text=None)
    path = write_jsonl(tmp_path / "answers.jsonl", answers)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(AnswerFileError, match=r"line 2 \(question_id 'existence/000000006040.jpg'\): "
                                              r"'text' is null, not a string"):
        run(parser.parse_args(["--answers", str(path), "--mme-root", str(mme_root)]))


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
