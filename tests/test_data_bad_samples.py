"""data.bad_samples: skip: train on the rest of a file with missing, empty, corrupt or malformed samples,
each one listed with its reason; error (the default) names the option; too much bad data is refused."""

import json
import logging

import pytest
from PIL import Image

from llava_sgg.cli import main
from llava_sgg.data import DataError, LlavaSFTDataset
from llava_sgg.model.tiny import tiny_tokenizer
from llava_sgg.train.config import ConfigError, build_run_config, load_run_config
from llava_sgg.train.run import _skipped_samples_file
from test_data_dataset import IMAGES, SAMPLES, processor, with_turns, write_data
from train_fixtures import make_dataset, make_parts, tiny_config_file


def image_sample(i, image):
    return {"id": f"img{i}", "image": image,
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}]}


def broken_file(tmp_path, name="llava.json"):
    """SAMPLES (all good) plus one bad sample of each kind; returns (data path, image folder)."""
    samples = SAMPLES + [
        image_sample(1, "missing.jpg"),
        image_sample(2, "empty.jpg"),
        image_sample(3, "html.jpg"),
        image_sample(4, "truncated.jpg"),
        with_turns([("gpt", "a"), ("human", "q")], id="turns"),  # malformed: starts with gpt
        {**SAMPLES[1], "id": "000000033471"},  # duplicate id: the later one goes
        with_turns([("human", "q"), ("gpt", "stop</s> here")], id="special"),  # fails tokenization
    ]
    path, folder = write_data(tmp_path, samples, images=IMAGES, name=name)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "html.jpg").write_text("<html>404 Not Found</html>")
    Image.effect_noise((64, 40), 60).convert("RGB").save(folder / "truncated.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "truncated.jpg").read_bytes()[:-400])
    return path, folder


def skipping(path, folder, **kwargs):
    kwargs = {"num_image_tokens": 16, "model_max_length": 256, "bad_samples": "skip", **kwargs}
    return LlavaSFTDataset(path, folder, tiny_tokenizer(), processor(), **kwargs)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_skip_lists_every_bad_sample_with_its_reason_and_keeps_the_rest(tmp_path, caplog):
    path, folder = broken_file(tmp_path)
    listed = tmp_path / "out" / "skipped_samples.jsonl"
    with caplog.at_level(logging.WARNING):
        ds = skipping(path, folder, max_bad_fraction=1.0, skipped_samples_file=listed)

    assert [s.id for s in ds.samples] == ["000000033471", "sharegpt_1", 7]
    assert [ds[i]["id"] for i in range(len(ds))] == ["000000033471", "sharegpt_1", 7]  # every image loads
    assert len(ds.lengths) == len(ds.modality_lengths) == 3
    entries = {e["id"]: e for e in read_jsonl(listed)}
    assert {i: e["reason"] for i, e in entries.items()} == {
        "turns": "invalid_sample", "000000033471": "duplicate_id", "img1": "missing_image",
        "img2": "empty_image", "img3": "unreadable_image", "img4": "unreadable_image", "special": "tokenization"}
    assert entries["img1"] == {"id": "img1", "where": f"{path}[3]", "image": "missing.jpg", "reason": "missing_image",
                               "detail": f"image not found: {folder / 'missing.jpg'}"}
    assert entries["000000033471"]["where"] == f"{path}[8]"
    assert entries["000000033471"]["detail"] == f"duplicate id; first used at {path}[0]"
    assert entries["turns"]["detail"].startswith("turn 1 is from 'gpt' where 'human' was expected")
    assert "truncated" in entries["img4"]["detail"]  # found by decoding, which the skip mode does up front
    assert "special token '</s>'" in entries["special"]["detail"]
    assert (f"7 of 10 samples (70.00%) are bad: unreadable_image 2, invalid_sample 1, duplicate_id 1, "
            f"missing_image 1, empty_image 1, tokenization 1; skipping them and training on the other 3; "
            f"each is listed in {listed}") in caplog.text


def test_a_bad_json_lines_line_is_skipped_but_a_broken_json_list_is_an_error(tmp_path):
    path, folder = write_data(tmp_path, name="llava.jsonl")
    path.write_text(path.read_text() + '{"id": "cut", "conversations": [\n')
    ds = skipping(path, folder, max_bad_fraction=0.5, skipped_samples_file=tmp_path / "skipped.jsonl")
    assert len(ds) == 3
    assert read_jsonl(tmp_path / "skipped.jsonl") == [
        {"id": None, "where": f"{path}:4", "image": None, "reason": "invalid_json",
         "detail": "invalid JSON at column 33: Expecting value"}]

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(SAMPLES)[:-1])
    with pytest.raises(DataError, match=r"broken\.json:\d+:\d+: invalid JSON"):
        skipping(broken, folder)


def test_more_bad_samples_than_max_bad_fraction_are_refused_after_listing_them(tmp_path):
    path, folder = broken_file(tmp_path)
    listed = tmp_path / "skipped_samples.jsonl"
    with pytest.raises(DataError) as info:
        skipping(path, folder, skipped_samples_file=listed)  # the default: 1%
    message = str(info.value)
    assert message.startswith(f"{path}: 7 of 10 samples (70.00%) are bad: unreadable_image 2, ")
    assert f"each is listed in {listed}. That is more than data.max_bad_fraction=0.01 (1.00%)" in message
    assert "raise data.max_bad_fraction to train on the rest" in message
    assert len(read_jsonl(listed)) == 7 and len(info.value.problems) == 7
    # At the limit it trains: 7 of 10 is not more than 0.7.
    assert len(skipping(path, folder, max_bad_fraction=0.7)) == 3
    with pytest.raises(DataError, match=r"1 of 1 samples \(100.00%\) are bad: missing_image 1; no sample is left"):
        skipping(*write_data(tmp_path, [image_sample(1, "missing.jpg")], images={}, name="one.json"),
                 max_bad_fraction=1.0)


def test_skip_with_nothing_bad_writes_an_empty_list(tmp_path):
    listed = tmp_path / "skipped_samples.jsonl"
    assert len(skipping(*write_data(tmp_path), max_bad_fraction=0.0, skipped_samples_file=listed)) == 3
    assert listed.read_text() == ""


@pytest.mark.parametrize("damage, expected", [
    (lambda path, folder: path.write_text(json.dumps(SAMPLES + [with_turns([("human", "q")], id="x")])),
     "the last turn (turn 1) is from 'human'"),
    (lambda path, folder: (folder / "ocr/7.png").unlink(), "image not found"),
    (lambda path, folder: (folder / "ocr/7.png").write_bytes(b""), "image is empty (0 bytes"),
    (lambda path, folder: path.write_text(json.dumps(SAMPLES + [with_turns([("human", "q"), ("gpt", "a</s>")])])),
     "special token '</s>'"),
])
def test_the_error_mode_names_the_option_that_skips(tmp_path, damage, expected):
    path, folder = write_data(tmp_path)
    damage(path, folder)
    with pytest.raises(DataError) as info:
        LlavaSFTDataset(path, folder, tiny_tokenizer(), processor(), num_image_tokens=16, model_max_length=256)
    assert expected in str(info.value)
    assert str(info.value).splitlines()[-1].startswith("Set data.bad_samples=skip to train on the rest")


def test_config_keys_are_validated_naming_the_file(tmp_path):
    cfg = build_run_config({"data": {"bad_samples": "skip", "max_bad_fraction": 0.05}})
    assert (cfg.data.bad_samples, cfg.data.max_bad_fraction) == ("skip", 0.05)
    assert (build_run_config({}).data.bad_samples, build_run_config({}).data.max_bad_fraction) == ("error", 0.01)
    bad = tmp_path / "bad.yaml"
    for text, expected in [("bad_samples: drop", "data.bad_samples must be one of error, skip; got 'drop'"),
                           ("max_bad_fraction: 5", r"data.max_bad_fraction must be a number in \[0, 1\]"),
                           ("max_bad_fraction: yes", r"data.max_bad_fraction must be a number in \[0, 1\]"),
                           ("max_bad_samples: 3", "unknown key data.max_bad_samples")]:
        bad.write_text(f"data:\n  {text}\n")
        with pytest.raises(ConfigError, match=rf"bad\.yaml: {expected}"):
            load_run_config([str(bad)])


def test_only_global_rank_0_writes_the_list(monkeypatch):
    cfg = build_run_config({"data": {"bad_samples": "skip"}, "train": {"output_dir": "runs/x"}})
    monkeypatch.setenv("RANK", "0")
    assert str(_skipped_samples_file(cfg)) == "runs/x/skipped_samples.jsonl"
    monkeypatch.setenv("RANK", "3")
    assert _skipped_samples_file(cfg) is None
    monkeypatch.delenv("RANK")
    assert _skipped_samples_file(build_run_config({})) is None  # the error mode writes nothing


def test_llava_sgg_train_refuses_bad_data_then_skips_it_and_trains_on_the_rest(tmp_path, capsys):
    parts, data = make_parts(tmp_path), make_dataset(tmp_path)
    images = tmp_path / "images"
    (images / "img0.png").unlink()
    (images / "img2.png").write_bytes(b"")
    (images / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    config = tiny_config_file(tmp_path, parts, data)
    args = ["train", "--config", str(config), "--set", "train.max_steps=1"]

    assert main(args) == 2
    error = capsys.readouterr().err
    assert "(6 samples; bad: missing_image 1, empty_image 1, unreadable_image 1): 3 problems:" in error
    assert "Set data.bad_samples=skip to train on the rest" in error

    assert main(args + ["--set", "data.bad_samples=skip", "--set", "data.max_bad_fraction=0.5"]) == 0
    output = tmp_path / "out"
    assert {e["id"]: e["reason"] for e in read_jsonl(output / "skipped_samples.jsonl")} == {
        "sample-0": "missing_image", "sample-2": "empty_image", "sample-3": "unreadable_image"}
    assert json.loads((output / "loss_history.json").read_text())[0]["step"] == 1
