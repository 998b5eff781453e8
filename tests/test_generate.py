"""Answer generation in LLaVA's formats on a tiny model: well-formed files, resuming, chunks, MMBench rounds."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from llava_sgg.evaluation.answers import AnswerFileError
from llava_sgg.evaluation.generate import (get_chunk, merge_answer_files, mmbench_prompts, question_prompts,
                                           write_answers)
from llava_sgg.model.builder import ModelConfig, build_llava


@pytest.fixture(scope="module")
def tiny_llava():
    return build_llava(ModelConfig(vision_tower="tiny", language_model="tiny"))


def _questions(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    lines = [{"question_id": 1, "image": "a.png", "text": "What colour?\nAnswer the question using a single word or phrase.",
              "category": "x"},
             {"question_id": 2, "text": "Say yes.", "category": "y"},
             {"question_id": 3, "image": "a.png", "text": "Is it red?", "category": "x"}]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_answers_are_written_in_llavas_format_and_resume(tiny_llava, tmp_path):
    model, processor = tiny_llava
    prompts = question_prompts(_questions(tmp_path), tmp_path)
    answers = tmp_path / "answers.jsonl"
    write_answers(model, processor, prompts, answers, model_id="tiny", batch_size=2, max_new_tokens=3,
                  progress=False)
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [1, 2, 3]
    for record in records:
        assert set(record) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert isinstance(record["text"], str) and record["model_id"] == "tiny"
    assert records[0]["prompt"].startswith("What colour?")

    answers.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))  # as if interrupted
    write_answers(model, processor, prompts, answers, model_id="tiny", batch_size=2, max_new_tokens=3,
                  progress=False)
    resumed = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == records[:2]


def test_greedy_batched_answers_equal_one_at_a_time(tiny_llava, tmp_path):
    model, processor = tiny_llava
    prompts = question_prompts(_questions(tmp_path), tmp_path)
    texts = {}
    for batch_size in (1, 3):
        path = tmp_path / f"answers{batch_size}.jsonl"
        write_answers(model, processor, prompts, path, model_id="tiny", batch_size=batch_size, max_new_tokens=4,
                      progress=False)
        texts[batch_size] = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert texts[1] == texts[3]  # left padding does not change greedy answers


def test_a_broken_answers_file_is_not_resumed_over(tiny_llava, tmp_path):
    model, processor = tiny_llava
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 1, "prompt": "x"}\nnot json\n')
    with pytest.raises(AnswerFileError, match="answers.jsonl:2"):
        write_answers(model, processor, question_prompts(_questions(tmp_path), tmp_path), answers, model_id="t",
                      progress=False)


def test_chunks_split_as_the_official_scripts_and_merge():
    items = list(range(10))
    assert [get_chunk(items, 3, k) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError):
        get_chunk(items, 3, 3)


def test_merge_rejects_a_question_answered_in_two_chunks(tmp_path):
    line = {"question_id": 1, "prompt": "q", "text": "a"}
    (tmp_path / "a.jsonl").write_text(json.dumps(line) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({**line, "question_id": 2}) + "\n")
    merged = merge_answer_files([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "all.jsonl")
    assert len(merged.read_text().splitlines()) == 2
    with pytest.raises(AnswerFileError, match="answered twice"):
        merge_answer_files([tmp_path / "a.jsonl", tmp_path / "a.jsonl"], tmp_path / "all.jsonl")


def test_mmbench_prompts_follow_the_official_layout_and_rotate(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    row = {"index": "7", "question": "Which digit?", "hint": "A scene.", "A": "3", "B": "5", "C": "9", "D": "",
           "answer": "B", "category": "c", "image": base64.b64encode(buffer.getvalue()).decode(), "split": "dev"}
    path = tmp_path / "mmbench.tsv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row), delimiter="\t")
        writer.writeheader()
        writer.writerow(row)
    prompts = mmbench_prompts(path, all_rounds=True)
    assert len(prompts) == 3  # D is empty: three options, three rotations
    assert prompts[0].text == ("A scene.\nWhich digit?\nA. 3\nB. 5\nC. 9\n"
                               "Answer with the option's letter from the given choices directly.")
    assert prompts[1].text.splitlines()[2:5] == ["A. 5", "B. 9", "C. 3"]
    assert [p.record["option_char"] for p in prompts] == [["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"]]
    assert mmbench_prompts(path, lang="cn")[0].text.endswith("请直接回答选项字母。")


def test_science_qa_prompts_as_the_single_prediction_script(tmp_path):
    from llava_sgg.evaluation.generate import science_prompts

    Image.new("RGB", (8, 8)).save(tmp_path / "1.png")
    samples = [{"id": "1", "image": "1.png", "conversations": [
                   {"from": "human", "value": "<image>\nContext: a map.\nWhich is north?\nOptions: (A) up (B) down"},
                   {"from": "gpt", "value": "A"}]},
               {"id": "2", "conversations": [{"from": "human", "value": "Which is hot?\nOptions: (A) ice (B) fire"}]}]
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps(samples))
    prompts = science_prompts(path, tmp_path)
    assert [p.question_id for p in prompts] == ["1", "2"]
    assert prompts[0].image is not None and prompts[1].image is None
    assert prompts[0].text == ("Context: a map.\nWhich is north?\nOptions: (A) up (B) down\n"
                               "Answer with the option's letter from the given choices directly.")
    path.write_text("[{")
    with pytest.raises(AnswerFileError, match="llava_test_CQM-A.json:1"):
        science_prompts(path, tmp_path)
