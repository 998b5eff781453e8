"""Startup at scale (issue 21): tokenization batched and equal to one call per sample, the data checks'
cache reused by another dataset and invalidated by any change, and no dependency noise at startup."""

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from llava_sgg.data import DataError, LlavaSFTDataset, encode_conversation, move_image_to_front
from llava_sgg.data import dataset as dataset_module
from llava_sgg.data import image as image_module
from llava_sgg.data.tokenization import conversation_lengths, encode_conversations, reachability_problems
from llava_sgg.model.tiny import tiny_tokenizer
from test_data_dataset import SAMPLES, processor, write_data
from test_data_tokenization import llama_style_tokenizer

ROOT = Path(__file__).resolve().parent.parent
LONG = " ".join(["The digit 3 is left of 7."] * 30)

# (human, gpt) turns, as LlavaSFTDataset passes them: with an image, after move_image_to_front.
CONVERSATIONS = [
    [("<image>\nWhat is in the image?", "The digit 3 is left of 7.")],
    [("<image>\nWhat is in the image?", "seven"), ("how many digits are there", "two"), ("and now?", "Yes")],
    [("how many digits are there", "Answer the question using a single word or phrase.")],  # text-only
    [("<image>\n" + LONG, "two")],  # long question: truncated, or its answer truncated away
    [("<image>\nWhat is it?", LONG), ("more?", "no")],  # answer cut by truncation
    [("What   is\n\nin  the image?", "  The digit\t3 \n is left of 7.  ")],  # runs of whitespace
    [("Qu'est-ce que c'est ? 数字", "Ein Bild — 7 ✓ 🙂")],  # characters outside the tokenizer's corpus
    [("stop</s> here", "two")],  # a special token's string in a question
    [("<image>\nWhat?", "an <image> in the answer")],
    [("What is it?", "seven")] * 6,  # many rounds
    [("<image>\nWhat is in the image?", "")],  # an empty answer: only its EOS is trained
]


def reference(conversations, tokenizer, **kwargs):
    out = []
    for turns in conversations:
        try:
            out.append(encode_conversation(turns, tokenizer, **kwargs))
        except DataError as e:
            out.append(e)
    return out


def same(expected, got):
    assert len(expected) == len(got)
    for i, (e, g) in enumerate(zip(expected, got)):
        if isinstance(e, DataError):
            assert isinstance(g, DataError) and str(g) == str(e), i
        else:
            assert (g.input_ids, g.labels, g.full_length) == (e.input_ids, e.labels, e.full_length), i


@pytest.mark.parametrize("make_tokenizer", [tiny_tokenizer, llama_style_tokenizer], ids=["byte_level", "llama_style"])
@pytest.mark.parametrize("model_max_length", [512, 100, 80])
def test_batched_encoding_gives_the_ids_labels_and_errors_of_one_call_per_conversation(make_tokenizer,
                                                                                      model_max_length):
    tokenizer = make_tokenizer()
    kwargs = {"model_max_length": model_max_length, "num_image_tokens": 4}
    expected = reference(CONVERSATIONS, tokenizer, **kwargs)
    assert any(isinstance(e, DataError) for e in expected) and any(not isinstance(e, DataError) for e in expected)
    for batch_size in (1, 4, 1024):  # conversations alone, batches cut anywhere, all at once
        same(expected, encode_conversations(CONVERSATIONS, tokenizer, batch_size=batch_size, **kwargs))
    found = conversation_lengths(CONVERSATIONS, tokenizer, batch_size=4, **kwargs)
    for i, e in enumerate(expected):
        if isinstance(e, DataError):
            assert found.problems[i] == str(e)
        else:
            assert (found.lengths[i], found.full_lengths[i]) == (len(e.input_ids), e.full_length)


def test_batched_encoding_with_the_plain_template():
    tokenizer = tiny_tokenizer()
    conversations = [[("<image>", "a red square")], [("<image>\nignored question", LONG)],
                     [("<image>", "one"), ("again", "two")],  # plain takes one turn: an error
                     [("no image", "caption")]]
    kwargs = {"model_max_length": 40, "num_image_tokens": 16, "template": "plain"}
    same(reference(conversations, tokenizer, **kwargs), encode_conversations(conversations, tokenizer, **kwargs))


def test_batched_encoding_of_a_dataset_file(tmp_path):
    """Every sample of a file as the dataset reads it, through the Llama-style tokenizer."""
    samples = [{"id": i, "image": "coco/000000033471.jpg",
                "conversations": [{"from": "human", "value": f"Question {i}?\n<image>"},
                                  {"from": "gpt", "value": f"Answer {i} " * (i % 7 + 1)}]} for i in range(40)]
    path, _ = write_data(tmp_path, samples + SAMPLES[1:2])
    from llava_sgg.data import load_llava_json

    turns = [move_image_to_front(s.turns) if s.image else s.turns for s in load_llava_json(path)]
    tokenizer = llama_style_tokenizer()
    kwargs = {"model_max_length": 64, "num_image_tokens": 8}
    same(reference(turns, tokenizer, **kwargs), encode_conversations(turns, tokenizer, batch_size=16, **kwargs))


@pytest.mark.parametrize("make_tokenizer", [tiny_tokenizer, llama_style_tokenizer], ids=["byte_level", "llama_style"])
def test_the_fast_check_refuses_exactly_what_encoding_in_full_refuses(make_tokenizer):
    """data.check=fast tokenizes only the text before each first answer; at every model_max_length, from
    limits that cut every answer to limits that cut none, it must refuse the conversations (and with the
    messages) that encode_conversation refuses, given a tokenizer whose label masks check out."""
    tokenizer = make_tokenizer()
    conversations = CONVERSATIONS + [[("<image>\n" + LONG[:k], "yes")] for k in range(0, len(LONG), 61)]
    for model_max_length in range(4, 420, 17):
        for num_image_tokens in (1, 24):
            kwargs = {"model_max_length": model_max_length, "num_image_tokens": num_image_tokens}
            expected = {i: str(e) for i, e in enumerate(reference(conversations, tokenizer, **kwargs))
                        if isinstance(e, DataError)}
            assert all("special token" in m or "truncated away" in m for m in expected.values())
            assert reachability_problems(conversations, tokenizer, batch_size=7, **kwargs) == expected, kwargs


def test_the_fast_check_with_the_plain_template():
    tokenizer = tiny_tokenizer()
    conversations = [[("<image>", "a red square")], [("<image>\nignored question", LONG)],
                     [("<image>", "one"), ("again", "two")], [("no image", "caption")]]
    for model_max_length in (8, 17, 18, 40):
        kwargs = {"model_max_length": model_max_length, "num_image_tokens": 16, "template": "plain"}
        expected = {i: str(e) for i, e in enumerate(reference(conversations, tokenizer, **kwargs))
                    if isinstance(e, DataError)}
        assert reachability_problems(conversations, tokenizer, **kwargs) == expected


def test_the_shifted_offsets_of_a_broken_tokenizer_give_the_same_errors_batched():
    tokenizer = tiny_tokenizer()

    class ShiftedOffsets(type(tokenizer)):
        def __call__(self, text, *args, **kwargs):
            enc = super().__call__(text, *args, **kwargs)
            shift = lambda offsets: [(s + 1, e + 1) if e > s else (s, e) for s, e in offsets]  # noqa: E731
            enc["offset_mapping"] = (shift(enc["offset_mapping"]) if isinstance(text, str)
                                     else [shift(o) for o in enc["offset_mapping"]])
            return enc

    tokenizer.__class__ = ShiftedOffsets
    kwargs = {"model_max_length": 512, "num_image_tokens": 16}
    expected = reference(CONVERSATIONS, tokenizer, **kwargs)
    assert sum("label mask mismatch" in str(e) for e in expected) >= 5
    same(expected, encode_conversations(CONVERSATIONS, tokenizer, **kwargs))


# --- the cache ---

class Spy:
    """Counts the conversations the dataset tokenizes and the images it decodes."""

    def __init__(self, monkeypatch):
        self.tokenized, self.decoded = 0, []
        tokenize, decode = dataset_module.conversation_lengths, image_module.image_problem

        def counting_tokenize(conversations, *args, **kwargs):
            self.tokenized += len(conversations)
            return tokenize(conversations, *args, **kwargs)

        def counting_decode(path, **kwargs):
            self.decoded.append(Path(path).name)
            return decode(path, **kwargs)

        monkeypatch.setattr(dataset_module, "conversation_lengths", counting_tokenize)
        monkeypatch.setattr(image_module, "image_problem", counting_decode)

    def reset(self):
        self.tokenized, self.decoded = 0, []


def build(path, folder, cache, tokenizer=None, **kwargs):
    kwargs = {"num_image_tokens": 16, "model_max_length": 256, "check": "full", **kwargs}  # the cached check
    return LlavaSFTDataset(path, folder, tokenizer or tiny_tokenizer(), processor(), cache_dir=cache, **kwargs)


def test_another_dataset_of_the_same_file_reads_the_cache(tmp_path, monkeypatch):
    path, folder = write_data(tmp_path)
    spy, cache = Spy(monkeypatch), tmp_path / "cache"
    first = build(path, folder, cache)
    assert spy.tokenized == 3 and sorted(spy.decoded) == ["000000033471.jpg", "7.png"]
    spy.reset()
    second = build(path, folder, cache)  # another rank, or the next run
    assert spy.tokenized == 0 and spy.decoded == []
    assert second.lengths == first.lengths and second.modality_lengths == first.modality_lengths
    assert [second[i]["input_ids"].tolist() for i in range(3)] == [first[i]["input_ids"].tolist() for i in range(3)]
    assert sorted(p.suffix for p in (cache / "tokenized").iterdir()) == [".lock", ".safetensors"]


def test_ranks_that_start_together_wait_for_the_first_and_read_what_it_wrote(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    path, folder = write_data(tmp_path)
    spy, cache = Spy(monkeypatch), tmp_path / "cache"
    tokenize = dataset_module.conversation_lengths

    def slow_tokenize(*args, **kwargs):  # long enough for the other rank to arrive while this one works
        time.sleep(0.5)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "conversation_lengths", slow_tokenize)
    with ThreadPoolExecutor(2) as ranks:
        built = list(ranks.map(lambda _: build(path, folder, cache), range(2)))
    assert spy.tokenized == 3 and sorted(spy.decoded) == ["000000033471.jpg", "7.png"]  # once, not once a rank
    assert built[0].lengths == built[1].lengths


def test_the_cache_follows_every_change(tmp_path, monkeypatch):
    path, folder = write_data(tmp_path)
    spy, cache = Spy(monkeypatch), tmp_path / "cache"
    lengths = build(path, folder, cache).lengths

    samples = json.loads(path.read_text())
    samples[1]["conversations"][1]["value"] = "A longer answer than before, by several words."
    path.write_text(json.dumps(samples))
    spy.reset()
    edited = build(path, folder, cache)
    assert spy.tokenized == 1 and spy.decoded == []  # the edited sample alone
    assert edited.lengths[1] > lengths[1] and edited.lengths[0::2] == lengths[0::2]

    for change in ({"model_max_length": 100}, {"num_image_tokens": 8}, {"tokenizer": llama_style_tokenizer()}):
        spy.reset()
        build(path, folder, cache, **change)
        assert spy.tokenized == 3, change

    image = folder / "ocr/7.png"
    Image.new("RGB", (30, 50), (0, 0, 255)).save(image)  # rewritten: another size or modification time
    spy.reset()
    build(path, folder, cache)
    assert spy.tokenized == 0 and spy.decoded == ["7.png"]


def test_an_image_broken_after_a_good_check_is_found_again(tmp_path):
    path, folder = write_data(tmp_path)
    build(path, folder, tmp_path / "cache")
    image = folder / "coco/000000033471.jpg"
    Image.effect_noise((64, 40), 60).convert("RGB").save(image)
    image.write_bytes(image.read_bytes()[:-400])
    with pytest.raises(DataError, match=r"\(id '000000033471'\): cannot read image .*: image file is truncated"):
        build(path, folder, tmp_path / "cache")


def test_problems_are_cached_and_raised_again(tmp_path, monkeypatch):
    samples = SAMPLES + [{"id": "special", "conversations": [{"from": "human", "value": "q"},
                                                             {"from": "gpt", "value": "stop</s> here"}]}]
    path, folder = write_data(tmp_path, samples)
    spy, cache = Spy(monkeypatch), tmp_path / "cache"
    with pytest.raises(DataError) as first:
        build(path, folder, cache)
    spy.reset()
    with pytest.raises(DataError) as second:
        build(path, folder, cache)
    assert spy.tokenized == 0 and str(second.value) == str(first.value)
    assert "(id 'special'): answer 1 contains the tokenizer's special token '</s>'" in str(second.value)


def test_a_damaged_cache_is_recomputed_with_a_warning(tmp_path, caplog):
    path, folder = write_data(tmp_path)
    cache = tmp_path / "cache"
    lengths = build(path, folder, cache).lengths
    files = sorted(cache.rglob("*.safetensors"))
    for file in files:
        file.write_bytes(file.read_bytes()[:20])
    with caplog.at_level(logging.WARNING):
        assert build(path, folder, cache).lengths == lengths
    warned = {r.args[0] for r in caplog.records if r.msg.startswith("ignoring the unreadable cache file")}
    assert sorted(warned) == files
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build(path, folder, cache)
    assert caplog.text == ""  # rewritten whole


def test_without_a_cache_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_SGG_CACHE", str(tmp_path / "default"))
    path, folder = write_data(tmp_path)
    build(path, folder, False)
    assert not (tmp_path / "default").exists()
    build(path, folder, None)  # None: the default folder
    assert {p.name for p in (tmp_path / "default" / "data-checks").iterdir()} == {"tokenized", "images"}


# --- quiet startup ---

LORA_STEP = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from llava_sgg.train.run import train
from train_fixtures import make_dataset, make_parts, tiny_run
root = Path({root!r})
train(tiny_run(make_parts(root), make_dataset(root), root / "out", mode="lora", gradient_checkpointing=True))
"""


@pytest.mark.slow  # two Python processes
def test_no_dependency_noise_at_import_or_in_a_lora_step(tmp_path):
    """bitsandbytes' hint to trust remote code (on CPUs with AVX512-BF16) and transformers' FutureWarning on
    `is_gradient_checkpointing` (read by peft) contradict the README; neither reaches the user."""
    imported = subprocess.run([sys.executable, "-c", "import llava_sgg.train.run"], capture_output=True, text=True,
                              cwd=ROOT)
    assert imported.returncode == 0 and imported.stderr == ""
    step = subprocess.run([sys.executable, "-c", LORA_STEP.format(tests=str(ROOT / "tests"), root=str(tmp_path))],
                          capture_output=True, text=True, cwd=ROOT)
    assert step.returncode == 0, step.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    for noise in ("trust_remote_code", "gemm_4bit_forward", "is_gradient_checkpointing", "FutureWarning"):
        assert noise not in step.stderr
