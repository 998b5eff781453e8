"""VQA accuracy (VQAv2, VizWiz, TextVQA), the EvalAI upload files, and the shared answer normalisation.

Expected numbers are worked out by hand in the comments, never recomputed with the code under test.
"""

import argparse
import json

import pytest

from llava_sgg.evaluation import vqa
from llava_sgg.evaluation.answers import AnswerFileError, read_jsonl
from llava_sgg.evaluation.normalize import evalai_answer, vqa_normalize


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def answer(question_id, text, prompt=""):
    return {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m",
            "metadata": {}}


def humans(*pairs):
    """10 VQAv2-style human answers from (answer, count) pairs."""
    out = [{"answer": text, "answer_confidence": "yes"} for text, count in pairs for _ in range(count)]
    return [dict(a, answer_id=i + 1) for i, a in enumerate(out)]


def test_textvqa_accuracy_as_llava_reports_it(tmp_path):
    # TextVQA_0.5.1_val.json; two questions share image img1, as in the real file.
    annotations = {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
        {"question_id": 1001, "image_id": "img1", "question": "What is the brand of this camera?",
         "answers": ["Dakota"] * 2 + ["dakota digital"] * 8, "set_name": "val"},
        {"question_id": 1002, "image_id": "img1", "question": "How much does it cost?",
         "answers": ["10,000"] * 3 + ["10000"] + ["$10,000"] * 6, "set_name": "val"},
        {"question_id": 1003, "image_id": "img2", "question": "what does the sign say?",
         "answers": ["stop"] * 10, "set_name": "val"},
    ]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(annotations))
    # LLaVA's answers carry the image id as question_id and the question inside the prompt (3 formats).
    write_jsonl(tmp_path / "answers.jsonl", [
        answer("img1", "DAKOTA.", "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL\n"
                                  "Answer the question using a single word or phrase."),
        answer("img1", "10000", "How much does it cost?\nAnswer the question using a single word or phrase."),
        answer("img2", "Stop sign", "OCR tokens: STOP Question: What does the sign say? Short answer:"),
    ])
    parser = argparse.ArgumentParser()
    vqa.add_arguments(parser, "textvqa")
    args = parser.parse_args(["--answers", str(tmp_path / "answers.jsonl"),
                              "--annotations", str(tmp_path / "TextVQA_0.5.1_val.json")])
    metrics = vqa.run(args)
    # "dakota" matches 2 humans -> 0.6; "10000" matches "10,000" x3 and "10000" -> 4 -> 1.0; "stop sign" -> 0.
    assert metrics["questions"] == 3
    assert metrics["accuracy"] == pytest.approx(100 * 1.6 / 3)
    written = json.loads((tmp_path / "answers_metrics.json").read_text())
    assert written["accuracy"] == pytest.approx(53.333333)


def test_leave_one_out_accuracy_by_hand():
    others = ["cat"] * 10
    # k humans match: subsets without a matching human keep k, the k others keep k-1.
    assert vqa.leave_one_out_accuracy("dog", ["dog"] * 1 + others[:9]) == pytest.approx(0.3)  # 9*(1/3)/10
    assert vqa.leave_one_out_accuracy("dog", ["dog"] * 2 + others[:8]) == pytest.approx(0.6)  # (8*2/3+2*1/3)/10
    assert vqa.leave_one_out_accuracy("dog", ["dog"] * 3 + others[:7]) == pytest.approx(0.9)  # (7*1+3*2/3)/10
    assert vqa.leave_one_out_accuracy("dog", ["dog"] * 4 + others[:6]) == 1.0
    assert vqa.leave_one_out_accuracy("dog", others) == 0.0


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"),
    ("a dog.", "dog"),
    ("None", "0"),
    ("it's", "it's"),  # no map entry: "it's" and "its" stay different answers
    ("its", "its"),
    ("dont", "don't"),
    ("10,000", "10000"),  # a comma between digits: punctuation deleted, not spaced
    ("red,blue", "red blue"),
    ("t-shirt", "t shirt"),
    ("t - shirt", "t shirt"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("3.5.", "3.5"),
    ("yes!", "yes"),
    ("The Eiffel Tower", "eiffel tower"),
    ("a" + "." * 40, "a" + "." * 8),  # sub(..., re.UNICODE) removes at most 32 periods
])
def test_vqa_normalize(raw, normalised):
    assert vqa_normalize(raw) == normalised


@pytest.mark.parametrize("raw, processed", [
    ("Two", "2"),
    ("red,blue", "redblue"),  # EvalAIAnswerProcessor drops every comma before punctuation handling
    ("10,000", "10000"),
    ("The man's hat?", "man 's hat"),
    ("Yes.\n", "yes"),
    ("It's a can of Coke.", "it 's can of coke"),
])
def test_evalai_answer(raw, processed):
    assert evalai_answer(raw) == processed


def test_vqav2_val_accuracy_and_its_types(tmp_path):
    annotations = {"annotations": [
        {"question_id": 1, "image_id": 9, "answer_type": "number", "question_type": "how many",
         "multiple_choice_answer": "3", "answers": humans(("2", 2), ("3", 8))},
        {"question_id": 2, "image_id": 9, "answer_type": "yes/no", "question_type": "is the",
         "multiple_choice_answer": "yes", "answers": humans(("yes", 10))},
        {"question_id": 3, "image_id": 9, "answer_type": "other", "question_type": "what is",
         "multiple_choice_answer": "t-shirt", "answers": humans(("t-shirt", 10))},
        {"question_id": 4, "image_id": 9, "answer_type": "other", "question_type": "what is",
         "multiple_choice_answer": "cat",
         "answers": humans(("dog", 1), ("Dog", 1), ("a dog", 1), ("dogs", 1), ("cat", 5), ("puppy", 1))},
    ]}
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    write_jsonl(tmp_path / "answers.jsonl", [answer(1, "Two"), answer(2, "Yes."), answer(3, "T-shirt"),
                                             answer(4, "A dog.")])
    metrics = vqa.score_vqav2(read_jsonl(tmp_path / "answers.jsonl"), annotations["annotations"])
    # 1: "2" matches 2 humans -> 0.6.  2: all humans "yes" -> compared raw, "yes" -> 1.0.
    # 3: all humans "t-shirt" -> compared raw with the processed "t shirt" -> 0 (vqaEval quirk).
    # 4: humans disagree -> normalised: dog, dog, dog, dogs, ... -> 3 matches -> 0.9.
    assert metrics["accuracy"] == pytest.approx(100 * 2.5 / 4)
    assert metrics["per_answer_type"] == pytest.approx({"number": 60.0, "other": 45.0, "yes/no": 100.0})
    assert metrics["per_question_type"] == pytest.approx({"how many": 60.0, "is the": 100.0, "what is": 45.0})


def test_vizwiz_val_compares_with_raw_human_answers(tmp_path):
    def annotation(image, answer_type, *pairs):
        return {"image": image, "question": "?", "answer_type": answer_type, "answerable": 1,
                "answers": [{"answer": t, "answer_confidence": "yes"} for t, n in pairs for _ in range(n)]}

    annotations = [annotation("VizWiz_val_00000000.jpg", "other", ("unanswerable", 4), ("Coca Cola", 3), ("coke", 3)),
                   annotation("VizWiz_val_00000001.jpg", "other", ("Coca Cola", 3), ("coca cola", 2), ("soda", 5)),
                   annotation("VizWiz_val_00000002.jpg", "number", ("2", 1), ("two", 9))]
    questions = {i: {"question_id": i, "image": f"VizWiz_val_0000000{i}.jpg", "text": "?"} for i in range(3)}
    answers = {0: answer(0, "Unanswerable."), 1: answer(1, "Coca Cola"), 2: answer(2, "two")}
    metrics = vqa.score_vizwiz(answers, questions, annotations)
    # 0: 4 humans -> 1.0.  1: "coca cola" matches only the 2 lowercase humans -> 0.6.
    # 2: prediction "2", humans raw: one "2" -> 0.3 (the nine "two" are never normalised).
    assert metrics["accuracy"] == pytest.approx(100 * 1.9 / 3)
    assert metrics["per_answer_type"] == pytest.approx({"number": 30.0, "other": 80.0})


def test_textvqa_by_question_id_and_unknown_prompt(tmp_path):
    data = [{"question_id": 7, "image_id": "img", "question": "Q?", "answers": ["yes"] * 3 + ["no"] * 7}]
    answers = [answer(7, "Yes")]
    assert vqa.score_textvqa(answers, data, match="question_id")["accuracy"] == pytest.approx(90.0)
    with pytest.raises(AnswerFileError, match="no TextVQA question"):
        vqa.score_textvqa([answer("img", "yes", "Q?")], data)  # one line: not a LLaVA prompt format


def test_textvqa_missing_answer_names_image_and_question():
    data = [{"question_id": 1, "image_id": "img1", "question": "A?", "answers": ["x"] * 10},
            {"question_id": 2, "image_id": "img2", "question": "B?", "answers": ["y"] * 10}]
    with pytest.raises(AnswerFileError, match=r"1 of 2 .* no answer: \('img2', 'b\?'\)"):
        vqa.score_textvqa([answer("img1", "x", "A?\nAnswer the question using a single word or phrase.")], data)


def test_textvqa_duplicated_and_unknown_answers_are_told_apart(tmp_path):
    data = [{"question_id": 1, "image_id": "img1", "question": "A?", "answers": ["x"] * 10},
            {"question_id": 2, "image_id": "img2", "question": "B?", "answers": ["y"] * 10}]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))
    suffix = "\nAnswer the question using a single word or phrase."
    # Line 2 is blank: the lines named are the file's own.
    (tmp_path / "answers.jsonl").write_text(
        json.dumps(answer("img1", "x", "A?" + suffix)) + "\n\n"
        + json.dumps(answer("img2", "y", "B?" + suffix)) + "\n"
        + json.dumps(answer("img1", "x", "A?" + suffix)) + "\n"  # the same question again
        + json.dumps(answer("img3", "z", "C?" + suffix)) + "\n")  # no such question
    parser = argparse.ArgumentParser()
    vqa.add_arguments(parser, "textvqa")
    args = parser.parse_args(["--answers", str(tmp_path / "answers.jsonl"),
                              "--annotations", str(tmp_path / "TextVQA_0.5.1_val.json")])
    with pytest.raises(AnswerFileError) as error:
        vqa.run(args)
    message = str(error.value)
    assert "1 answer(s) with no (image_id, question) in the annotations: \"line 5: ('img3', 'c?')\"" in message
    assert "1 (image_id, question) pair(s) answered more often than annotated: \"('img1', 'a?') on lines 1, 4\"" \
        in message
    assert "have no answer" not in message

    # Without the unknown one, the duplicate alone.
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    (tmp_path / "answers.jsonl").write_text("\n".join(lines[:4]) + "\n")
    with pytest.raises(AnswerFileError, match=r"answered more often than annotated") as error:
        vqa.run(args)
    assert "in the annotations" not in str(error.value)


def test_textvqa_answer_text_that_is_not_a_string_names_its_line(tmp_path):
    data = [{"question_id": 1, "image_id": "img1", "question": "A?", "answers": ["x"] * 10}]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))
    write_jsonl(tmp_path / "answers.jsonl", [answer("img1", None, "A?\nAnswer briefly.")])
    parser = argparse.ArgumentParser()
    vqa.add_arguments(parser, "textvqa")
    with pytest.raises(AnswerFileError, match=r"line 1 \(question_id 'img1'\): 'text' is null, not a string"):
        vqa.run(parser.parse_args(["--answers", str(tmp_path / "answers.jsonl"),
                                   "--annotations", str(tmp_path / "TextVQA_0.5.1_val.json")]))


def test_missing_and_extra_ids_are_errors_naming_them():
    annotations = [{"question_id": q, "answers": humans(("yes", 10))} for q in (1, 2, 3, 4)]
    with pytest.raises(AnswerFileError, match=r"2 of 4 question ids have no answer: 3, 4"):
        vqa.score_vqav2({1: answer(1, "yes"), 2: answer(2, "yes")}, annotations)
    with pytest.raises(AnswerFileError, match=r"answer ids are not in the questions: 5"):
        vqa.score_vqav2({q: answer(q, "yes") for q in (1, 2, 3, 4, 5)}, annotations)


def test_annotations_without_ten_answers_are_errors():
    with pytest.raises(AnswerFileError, match="without 10 human answer"):
        vqa.score_vqav2({1: answer(1, "yes")}, [{"question_id": 1, "answers": humans(("yes", 9))}])


def test_malformed_and_duplicated_answer_lines_are_errors(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps(answer(1, "yes")) + "\n{not json\n" + json.dumps(answer(1, "no")) + "\n")
    with pytest.raises(AnswerFileError, match=r"line 2: not JSON.*1 duplicated question_id\(s\): 1"):
        read_jsonl(path)


def test_vqav2_upload_covers_all_test_questions(tmp_path):
    write_jsonl(tmp_path / "test2015.jsonl", [{"question_id": q, "image": "x.jpg", "text": "?"}
                                              for q in (10, 11, 12, 13)])
    write_jsonl(tmp_path / "test-dev2015.jsonl", [{"question_id": q, "image": "x.jpg", "text": "?"} for q in (10, 12)])
    write_jsonl(tmp_path / "answers.jsonl", [answer(10, "Two"), answer(12, "A red car.")])
    parser = argparse.ArgumentParser()
    vqa.add_arguments(parser, "vqav2")
    args = parser.parse_args(["--answers", str(tmp_path / "answers.jsonl"),
                              "--questions", str(tmp_path / "test-dev2015.jsonl"),
                              "--test-questions", str(tmp_path / "test2015.jsonl"),
                              "--upload", str(tmp_path / "upload" / "vqav2.json")])
    metrics = vqa.run(args)
    assert json.loads((tmp_path / "upload" / "vqav2.json").read_text()) == [
        {"question_id": 10, "answer": "2"}, {"question_id": 11, "answer": ""},
        {"question_id": 12, "answer": "red car"}, {"question_id": 13, "answer": ""}]
    assert (metrics["questions"], metrics["answered"], metrics["blank"]) == (4, 2, 2)


def test_vqav2_upload_refuses_an_unanswered_split_question():
    with pytest.raises(AnswerFileError, match="1 of 2 question ids have no answer: 12"):
        vqa.convert_vqav2_for_submission({10: answer(10, "2")}, [10, 11, 12], [10, 12])


def test_vizwiz_upload_is_image_and_processed_answer():
    questions = {0: {"question_id": 0, "image": "VizWiz_test_00000000.jpg"},
                 1: {"question_id": 1, "image": "VizWiz_test_00000001.jpg"}}
    upload = vqa.convert_vizwiz_for_submission({0: answer(0, "Unanswerable"), 1: answer(1, "It's a can of Coke.")},
                                               questions)
    assert upload == [{"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
                      {"image": "VizWiz_test_00000001.jpg", "answer": "it 's can of coke"}]
    with pytest.raises(AnswerFileError, match="no answer: 1"):
        vqa.convert_vizwiz_for_submission({0: answer(0, "yes")}, questions)
