"""POPE as LLaVA's eval_pope.py: yes/no parsing, per-category metrics worked out by hand, file checks."""

import argparse
import json

import pytest

from llava_sgg.evaluation import pope
from llava_sgg.evaluation.answers import AnswerFileError

# (category, image, question, label, answer text, parsed) in question-file order.
ROWS = [
    ("adversarial", "img1", "dog", "yes", "Yes, there is a dog in the image.", "yes"),  # TP
    ("adversarial", "img1", "cat", "no", "No, there is not.", "no"),  # TN
    ("random", "img2", "person", "yes", "Yes", "yes"),  # TP
    ("adversarial", "img2", "car", "no", "There is no car.", "no"),  # TN
    ("adversarial", "img3", "bus", "yes", "Yes.", "yes"),  # TP
    ("random", "img2", "bowl", "no", "Yes, there is. No doubt.", "yes"),  # FP: only the first sentence counts
    ("adversarial", "img3", "tree", "no", "NO", "yes"),  # FP: "NO" is not one of No / not / no
    ("random", "img3", "kite", "no", "no", "no"),  # TN
    ("adversarial", "img4", "kite", "yes", "I do not think so, but maybe.", "no"),  # FN
    ("random", "img4", "cup", "yes", "Nope", "yes"),  # TP
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_pope(tmp_path, rows=ROWS):
    """llava_pope_test.jsonl, coco/coco_pope_<category>.json (own ids from 1) and the answers."""
    questions, answers, labels = [], [], {}
    for qid, (category, image, thing, label, text, _) in enumerate(rows, start=1):
        asked = f"Is there a {thing} in the image?"
        questions.append({"question_id": qid, "image": f"{image}.jpg", "category": category,
                          "text": asked + "\nAnswer the question using a single word or phrase."})
        answers.append({"question_id": qid, "prompt": asked, "text": text, "answer_id": "a", "model_id": "m",
                        "metadata": {}})
        lines = labels.setdefault(category, [])
        lines.append({"question_id": len(lines) + 1, "image": f"{image}.jpg", "text": asked, "label": label})
    (tmp_path / "coco").mkdir(exist_ok=True)
    for category, lines in labels.items():
        write_jsonl(tmp_path / "coco" / f"coco_pope_{category}.json", lines)
    write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    write_jsonl(tmp_path / "answers.jsonl", answers)


def parse(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    pope.add_arguments(parser)
    return parser.parse_args(["--answers", str(tmp_path / "answers.jsonl"),
                              "--questions", str(tmp_path / "llava_pope_test.jsonl"),
                              "--annotation-dir", str(tmp_path / "coco"), *extra])


def test_pope_per_category_metrics_as_llava_reports_them(tmp_path):
    write_pope(tmp_path)
    metrics = pope.run(parse(tmp_path))
    adversarial, random = metrics["categories"]["adversarial"], metrics["categories"]["random"]
    # adversarial: TP 2, FP 1, TN 2, FN 1 -> acc 4/6, precision 2/3, recall 2/3, F1 2/3, yes 3/6
    assert (adversarial["tp"], adversarial["fp"], adversarial["tn"], adversarial["fn"]) == (2, 1, 2, 1)
    assert adversarial["accuracy"] == pytest.approx(4 / 6)
    assert adversarial["precision"] == pytest.approx(2 / 3)
    assert adversarial["recall"] == pytest.approx(2 / 3)
    assert adversarial["f1"] == pytest.approx(2 / 3)
    assert adversarial["yes_ratio"] == pytest.approx(0.5)
    # random: TP 2, FP 1, TN 1, FN 0 -> acc 3/4, precision 2/3, recall 1, F1 2*(2/3)/(5/3) = 0.8, yes 3/4
    assert (random["tp"], random["fp"], random["tn"], random["fn"]) == (2, 1, 1, 0)
    assert random["accuracy"] == pytest.approx(0.75)
    assert random["precision"] == pytest.approx(2 / 3)
    assert random["recall"] == pytest.approx(1.0)
    assert random["f1"] == pytest.approx(0.8)
    assert random["yes_ratio"] == pytest.approx(0.75)
    assert metrics["f1_average"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert json.loads((tmp_path / "answers_metrics.json").read_text())["f1_average"] == pytest.approx(0.733333)


@pytest.mark.parametrize("text, parsed", [(row[4], row[5]) for row in ROWS] + [
    ("No", "no"), ("not sure", "no"), ("", "yes"), ("Yes.\nNo", "yes"), ("no\n", "yes")])
def test_pope_answer(text, parsed):
    assert pope.pope_answer(text) == parsed


def test_no_yes_predicted_gives_zero_instead_of_dividing_by_zero():
    metrics = pope.binary_metrics(["no", "no"], ["yes", "no"])
    assert (metrics["precision"], metrics["recall"], metrics["f1"], metrics["accuracy"]) == (0.0, 0.0, 0.0, 0.5)


def test_missing_answer_is_an_error_naming_it(tmp_path):
    write_pope(tmp_path)
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    (tmp_path / "answers.jsonl").write_text("\n".join(lines[:6] + lines[7:]) + "\n")
    with pytest.raises(AnswerFileError, match="1 of 10 question ids have no answer: 7"):
        pope.run(parse(tmp_path))


def test_label_file_out_of_question_order_is_an_error(tmp_path):
    write_pope(tmp_path)
    path = tmp_path / "coco" / "coco_pope_random.json"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[1], lines[0]] + lines[2:]) + "\n")
    with pytest.raises(AnswerFileError, match="random: 2 question.* differ from the label line"):
        pope.run(parse(tmp_path))


def test_category_without_label_file_and_odd_labels_are_errors(tmp_path):
    write_pope(tmp_path)
    (tmp_path / "coco" / "coco_pope_random.json").unlink()
    with pytest.raises(AnswerFileError, match="categories with no coco_pope_<category>.json: 'random'"):
        pope.run(parse(tmp_path))
    write_pope(tmp_path, [row[:3] + ("Yes",) + row[4:] if row[0] == "random" and row[3] == "yes" else row
                          for row in ROWS])
    with pytest.raises(AnswerFileError, match="random: 2 label.* neither 'yes' nor 'no'"):
        pope.run(parse(tmp_path))
