"""LlavaSFTDataset and load_llava_json: use, and every way a data file can be wrong."""

import json
import re

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from llava_sgg.data import (DataCollatorForLlava, DataError, LlavaSFTDataset, ModalityLengthGroupedSampler,
                            load_image, load_llava_json)
from llava_sgg.model.tiny import tiny_tokenizer

SAMPLES = [
    {"id": "000000033471", "image": "coco/000000033471.jpg",
     "conversations": [{"from": "human", "value": "What is in the image?\n<image>"},
                       {"from": "gpt", "value": "The digit 3 is left of 7."},
                       {"from": "human", "value": "how many digits are there"},
                       {"from": "gpt", "value": "two"}]},
    {"id": "sharegpt_1",
     "conversations": [{"from": "human", "value": "how many digits are there"},
                       {"from": "gpt", "value": "Answer the question using a single word or phrase."}]},
    {"id": 7, "image": "ocr/7.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat is in the image?"},
                       {"from": "gpt", "value": "seven"}]},
]
IMAGES = {"coco/000000033471.jpg": (64, 40), "ocr/7.png": (30, 50)}


def processor():
    return CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})


def write_data(tmp_path, samples=SAMPLES, images=IMAGES, name="llava.json"):
    """A LLaVA data file and its image folder under tmp_path; returns (data path, image folder)."""
    folder = tmp_path / "images"
    for rel, size in images.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (200, 30, 30)).save(folder / rel)
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    else:
        path.write_text(json.dumps(samples, indent=1))
    return path, folder


def dataset(path, folder, tokenizer=None, **kwargs):
    kwargs = {"num_image_tokens": 16, "model_max_length": 256, **kwargs}
    return LlavaSFTDataset(path, folder, tokenizer or tiny_tokenizer(), processor(), **kwargs)


def test_build_a_dataset_from_llava_json_and_batch_it(tmp_path):
    path, folder = write_data(tmp_path)
    tokenizer = tiny_tokenizer()
    ds = LlavaSFTDataset(path, folder, tokenizer, processor(), num_image_tokens=16, model_max_length=256)

    item = ds[0]
    assert item["id"] == "000000033471"
    assert item["input_ids"].dtype == torch.long and item["labels"].shape == item["input_ids"].shape
    assert item["pixel_values"].shape == (3, 56, 56) and item["pixel_values"].dtype == torch.float32
    assert (item["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum() == 16
    assert "pixel_values" not in ds[1]

    sampler = ModalityLengthGroupedSampler(ds.modality_lengths, batch_size=2, seed=0)
    batch = DataCollatorForLlava(tokenizer.pad_token_id)([ds[i] for i in list(sampler)[:2]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 2


def test_jsonl_reads_the_same_samples(tmp_path):
    path, folder = write_data(tmp_path, name="llava.jsonl")
    path.write_text(path.read_text() + "\n")  # a trailing blank line is allowed
    from_jsonl = dataset(path, folder)
    from_json = dataset(*write_data(tmp_path / "j"))
    assert len(from_jsonl) == 3 and [s.where for s in from_jsonl.samples][-1] == f"{path}:3"
    assert torch.equal(from_jsonl[2]["input_ids"], from_json[2]["input_ids"])


def test_full_check_lengths_count_tokens_and_modality_lengths_sign_text_only_samples(tmp_path):
    ds = dataset(*write_data(tmp_path), check="full")
    assert ds.lengths == [len(ds[i]["input_ids"]) for i in range(3)]
    assert ds.modality_lengths == [ds.lengths[0], -ds.lengths[1], ds.lengths[2]]


def test_fast_check_lengths_are_official_word_counts(tmp_path):
    ds = dataset(*write_data(tmp_path))
    # Official LLaVA: len(value.split()) summed over the turns; here plus the image tokens for an image.
    words = [sum(len(v.split()) for turn in s.turns for v in turn) for s in ds.samples]
    assert ds.lengths[1] == words[1] == 5 + 9 and ds.lengths[2] == 16 + 6 + 1
    assert ds.lengths[0] == words[0] + ds.num_image_tokens
    assert ds.modality_lengths[1] < 0 < ds.modality_lengths[0]


# --- errors: each names the file, the line or index, and the sample id ---

def bad(tmp_path, samples, name="llava.json", **kwargs):
    with pytest.raises(DataError) as info:
        dataset(*write_data(tmp_path, samples, images=IMAGES, name=name), **kwargs)
    return str(info.value)


def with_turns(turns, **fields):
    return {"id": "s1", "conversations": [{"from": r, "value": v} for r, v in turns], **fields}


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, "conversations": []}\n]\n')
    with pytest.raises(DataError, match=r"broken\.json:3:14: invalid JSON: Expecting property name"):
        load_llava_json(path)


def test_json_lines_in_a_json_file_suggest_jsonl(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(json.dumps(SAMPLES[1]) + "\n" + json.dumps(SAMPLES[1]) + "\n")
    with pytest.raises(DataError, match=r"lines\.json:2:1: invalid JSON: Extra data.*\.jsonl"):
        load_llava_json(path)


def test_jsonl_reports_every_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(SAMPLES[1]), '{"id": "x", "conversations": [', json.dumps({**SAMPLES[1], "id": "y"}), "nope"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_llava_json(path)
    message = str(info.value)
    assert "2 problems" in message
    assert f"{path}:2: invalid JSON" in message and f"{path}:4: invalid JSON" in message


def test_top_level_must_be_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"data": SAMPLES}))
    with pytest.raises(DataError, match="top level must be a list"):
        load_llava_json(path)


@pytest.mark.parametrize("sample, expected", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, r"\[0\]: missing 'id'"),
    ({"id": "s1"}, r"\[0\] \(id 's1'\): missing 'conversations'"),
    ({"id": "s1", "conversations": []}, r"\(id 's1'\): 'conversations' must be a non-empty list"),
    ({"id": "s1", "conversations": [{"from": "human"}]},
     r"\(id 's1'\): turn 1 must be an object with 'from' and 'value'"),
    ({"id": True, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     r"'id' must be a non-empty string or an integer, got True"),
    (with_turns([("human", "q"), ("gpt", "a")], image=None), r"\(id 's1'\): 'image' must be a path"),
    (with_turns([("human", "q"), ("gpt", 3)]), r"\(id 's1'\): turn 2 \(gpt\): 'value' must be a string"),
    (with_turns([("human", "q"), ("gpt", "  ")]), r"\(id 's1'\): turn 2 \(gpt\) is empty"),
    (with_turns([("gpt", "a"), ("human", "q")]), r"\(id 's1'\): turn 1 is from 'gpt' where 'human' was expected"),
    (with_turns([("human", "q"), ("human", "q2"), ("gpt", "a")]),
     r"\(id 's1'\): turn 2 is from 'human' where 'gpt' was expected: turns must alternate"),
    (with_turns([("human", "q"), ("system", "s")]), r"turn 2: 'from' must be 'human' or 'gpt', got 'system'"),
    (with_turns([("human", "q"), ("gpt", "a"), ("human", "q2")]),
     r"\(id 's1'\): the last turn \(turn 3\) is from 'human'"),
    (with_turns([("human", "q"), ("gpt", "a")], image="ocr/7.png"),
     r"\(id 's1'\): has an image but 0 '<image>' placeholders"),
    (with_turns([("human", "<image> q <image>"), ("gpt", "a")], image="ocr/7.png"),
     r"\(id 's1'\): has an image but 2 '<image>' placeholders; exactly one"),
    (with_turns([("human", "<image>\nq"), ("gpt", "a")]),
     r"\(id 's1'\): has 1 '<image>' placeholder\(s\) but no 'image'"),
    (with_turns([("human", "q"), ("gpt", "<image> a")], image="ocr/7.png"),
     r"\(id 's1'\): turn 2 \(gpt\) contains '<image>'; the placeholder belongs in a human turn"),
    ("not an object", r"\[0\]: a sample must be a JSON object, got str"),
])
def test_structural_problems_name_file_index_and_id(tmp_path, sample, expected):
    message = bad(tmp_path, [sample])
    assert str(tmp_path / "llava.json") in message
    assert re.search(expected, message), message


def test_jsonl_problems_name_the_line(tmp_path):
    samples = [SAMPLES[1], with_turns([("gpt", "a"), ("human", "q")])]
    message = bad(tmp_path, samples, name="llava.jsonl")
    assert f"{tmp_path / 'llava.jsonl'}:2 (id 's1'): turn 1 is from 'gpt'" in message


def test_every_problem_is_reported_at_once(tmp_path):
    samples = [with_turns([("gpt", "a"), ("human", "q")], id=f"bad{i}") for i in range(25)] + [SAMPLES[1]]
    with pytest.raises(DataError) as info:
        load_llava_json(write_data(tmp_path, samples, images={})[0])
    message = str(info.value)
    assert "(26 samples): 25 problems (first 20 shown)" in message
    assert "'bad19'" in message and "'bad20'" not in message
    assert len(info.value.problems) == 25


def test_duplicate_ids_are_an_error(tmp_path):
    samples = [SAMPLES[1], {**SAMPLES[2], "id": "sharegpt_1"}]
    message = bad(tmp_path, samples)
    assert "[1] (id 'sharegpt_1'): duplicate id; first used at" in message and "llava.json[0]" in message


@pytest.mark.parametrize("name, text", [("empty.json", "[]"), ("empty.jsonl", "\n\n")])
def test_an_empty_dataset_is_an_error(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=f"{name}: no samples"):
        load_llava_json(tmp_path / name)


def test_missing_images_are_all_listed(tmp_path):
    path, folder = write_data(tmp_path, images={})
    with pytest.raises(DataError) as info:
        dataset(path, folder)
    message = str(info.value)
    assert "llava.json (3 samples; bad: missing_image 2): 2 problems:" in message
    assert f"(id '000000033471'): image not found: {folder / 'coco/000000033471.jpg'}" in message
    assert f"(id 7): image not found: {folder / 'ocr/7.png'}" in message
    assert message.endswith("Set data.bad_samples=skip to train on the rest (each sample left out is then "
                            "listed with its reason in skipped_samples.jsonl in train.output_dir)")


def test_empty_and_corrupt_images_are_found_before_training(tmp_path):
    path, folder = write_data(tmp_path)
    (folder / "ocr/7.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "coco/000000033471.jpg").write_bytes(b"")
    message = bad_images(path, folder)
    assert f"(id 7): cannot read image {folder / 'ocr/7.png'}" in message
    assert "(id '000000033471'): image is empty (0 bytes" in message


def bad_images(path, folder, **kwargs):
    with pytest.raises(DataError) as info:
        dataset(path, folder, **kwargs)
    return str(info.value)


def image_sample(i, image):
    return {"id": f"img{i}", "image": image,
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}]}


def truncated_jpeg(path):
    """A JPEG with a valid header whose scan is cut short (an interrupted download): its end marker is missing."""
    Image.effect_noise((64, 40), 60).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:-400])


def test_every_problem_of_the_file_is_listed_in_one_error_before_training(tmp_path):
    samples = SAMPLES + [image_sample(1, "missing.jpg"), image_sample(2, "empty.jpg"), image_sample(3, "cut.jpg"),
                         with_turns([("gpt", "a"), ("human", "q")], id="turns"),
                         with_turns([("human", "q"), ("gpt", "stop</s> here")], id="special")]
    path, folder = write_data(tmp_path, samples)
    (folder / "empty.jpg").write_bytes(b"")
    truncated_jpeg(folder / "cut.jpg")
    lines = bad_images(path, folder).splitlines()
    assert lines[0] == (f"{path} (8 samples; bad: invalid_sample 1, missing_image 1, empty_image 1, "
                        "unreadable_image 1, tokenization 1): 5 problems:")
    # The file's problems first, then the images', then tokenization's, each in file order.
    assert lines[1].startswith(f"  {path}[6] (id 'turns'): turn 1 is from 'gpt'")
    assert lines[2] == f"  {path}[3] (id 'img1'): image not found: {folder / 'missing.jpg'}"
    assert lines[3].startswith(f"  {path}[4] (id 'img2'): image is empty (0 bytes")
    assert lines[4].startswith(f"  {path}[5] (id 'img3'): cannot read image {folder / 'cut.jpg'}: image file is "
                               "truncated")
    assert lines[5] == f"  {path}[7] (id 'special'): answer 1 contains the tokenizer's special token '</s>'"
    assert lines[6].startswith("Set data.bad_samples=skip to train on the rest")


def test_a_truncated_jpeg_is_refused_before_training(tmp_path):
    path, folder = write_data(tmp_path)
    truncated_jpeg(folder / "coco/000000033471.jpg")
    message = bad_images(path, folder)
    assert "(3 samples; bad: unreadable_image 1): 1 problem:" in message
    assert f"(id '000000033471'): cannot read image {folder / 'coco/000000033471.jpg'}: image file is truncated" \
        in message


def test_an_image_that_breaks_after_the_check_names_the_sample_and_path_when_read(tmp_path):
    path, folder = write_data(tmp_path)
    ds = dataset(path, folder)
    image = folder / "coco/000000033471.jpg"
    truncated_jpeg(image)
    with pytest.raises(DataError, match=rf"llava\.json\[0\] \(id '000000033471'\): cannot read image {image}: "
                                        r".*truncated.*set data\.bad_samples=skip"):
        ds[0]


def scan_damaged_jpeg(path):
    """A JPEG with a block of its scan zeroed that still ends with its end marker, and that does not load."""
    Image.effect_noise((160, 120), 40).convert("RGB").save(path, quality=90)
    data = path.read_bytes()
    for start in range(600, len(data) - 1500, 97):
        path.write_bytes(data[:start] + bytes(1000) + data[start + 1000:])
        try:
            load_image(path)
        except OSError:
            return
    raise AssertionError("no damaged copy fails to load")


def test_a_jpeg_damaged_inside_its_scans_is_found_by_a_full_check_or_when_drawn(tmp_path):
    path, folder = write_data(tmp_path)
    image = folder / "coco/000000033471.jpg"
    scan_damaged_jpeg(image)
    assert "(3 samples; bad: unreadable_image 1): 1 problem:" in bad_images(path, folder, check="full")
    ds = dataset(path, folder)  # the fast check passes it: its header and end marker are intact
    with pytest.raises(DataError, match=rf"llava\.json\[0\] \(id '000000033471'\): cannot read image {image}"):
        ds[0]


def test_a_sample_whose_answers_are_all_truncated_is_an_error(tmp_path):
    # The image samples' first answers start at token 82, the text-only one's at 64.
    message = bad(tmp_path, SAMPLES, model_max_length=70)
    assert "(3 samples; bad: tokenization 2): 2 problems:" in message
    assert ("llava.json[0] (id '000000033471'): all answers are truncated away: the sample needs 110 tokens "
            "(16 of them image tokens) and model_max_length is 70; raise model_max_length") in message
    assert "llava.json[2] (id 7): all answers are truncated away" in message
    assert "(id 'sharegpt_1')" not in message  # truncated inside its answer, which is still trained


def test_a_label_mask_that_does_not_decode_to_the_answer_is_an_error(tmp_path):
    tokenizer = tiny_tokenizer()

    class ShiftedOffsets(type(tokenizer)):
        """Offsets one character late, as some converted sentencepiece tokenizers report them."""

        def __call__(self, text, *args, **kwargs):
            enc = super().__call__(text, *args, **kwargs)
            if "offset_mapping" in enc:
                shift = lambda offsets: [(s + 1, e + 1) if e > s else (s, e) for s, e in offsets]  # noqa: E731
                enc["offset_mapping"] = (shift(enc["offset_mapping"]) if isinstance(text, str)
                                         else [shift(offsets) for offsets in enc["offset_mapping"]])
            return enc

    tokenizer.__class__ = ShiftedOffsets
    message = bad(tmp_path, SAMPLES, tokenizer=tokenizer, check="full")
    assert "(3 samples; bad: tokenization 3): 3 problems:" in message
    assert "llava.json[1] (id 'sharegpt_1'): label mask mismatch in answer 1" in message
    # A fast check leaves the decode check to the batch that draws the sample, which names it.
    ds = dataset(*write_data(tmp_path / "fast", SAMPLES, images=IMAGES), tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"llava\.json\[1\] \(id 'sharegpt_1'\): label mask mismatch in answer 1"):
        ds[1]


def test_special_token_strings_in_the_text_are_an_error(tmp_path):
    samples = [with_turns([("human", "q"), ("gpt", "stop</s> here")])]
    message = bad(tmp_path, samples)
    assert "(id 's1'): answer 1 contains the tokenizer's special token '</s>'" in message


def test_configuration_errors_are_value_errors(tmp_path):
    path, folder = write_data(tmp_path)
    with pytest.raises(ValueError, match="unknown conversation template 'llama_3'; known: plain, vicuna_v1"):
        dataset(path, folder, template="llama_3")
    with pytest.raises(ValueError, match="unknown image_aspect_ratio 'square'; choose one of: pad, resize, crop"):
        dataset(path, folder, image_aspect_ratio="square")
    with pytest.raises(ValueError, match="'<img>' is not a single token"):
        dataset(path, folder, image_token="<img>")
    with pytest.raises(ValueError, match="pass image_folder and image_processor"):
        LlavaSFTDataset(path, None, tiny_tokenizer(), None, num_image_tokens=16, model_max_length=256)


def test_files_json_reads_read_the_same_with_or_without_orjson(tmp_path, monkeypatch):
    from llava_sgg.data import dataset as module

    samples = [dict(SAMPLES[1], score=float("nan")), dict(SAMPLES[1], id="big", n=2 ** 70),
               dict(SAMPLES[1], id="surrogate", note="\ud800")]  # what orjson refuses and json takes
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(samples))
    fast = load_llava_json(path)
    monkeypatch.setattr(module, "orjson", None)
    assert load_llava_json(path) == fast and [s.id for s in fast] == ["sharegpt_1", "big", "surrogate"]
