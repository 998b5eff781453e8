"""A Vicuna-style SentencePiece tokenizer loads and tokenizes as LLaVA-1.5 trained.

Vicuna-7B-v1.5 ships ``tokenizer.model`` with ``tokenizer_config.json`` (LlamaTokenizer, ``legacy: false``)
and ``special_tokens_map.json``, no ``tokenizer.json``. A tiny SentencePiece BPE model with Llama's options
is trained here, saved that way, loaded through the project's loader, and a conversation's ids and labels
are compared with LLaVA-1.5's algorithm computed with sentencepiece directly.
"""

import re
import sys

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, LlamaForCausalLM

from llava_sgg.data import IGNORE_INDEX, check_tokenizer, encode_conversation, move_image_to_front
from llava_sgg.model import tiny
from llava_sgg.model.builder import ModelConfig, ModelError, build_llava, load_tokenizer
from llava_sgg.train.config import ConfigError, build_run_config

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
# The placeholder after the question, as in some of LLaVA's data: both sides move it to the front.
TURNS = [("What is in the image?\n<image>", "A cat on a red sofa."), ("What color is the sofa?", "It is red."),
         ("How many cats are there?", "There is one cat.")]
CORPUS = [SYSTEM, "USER: What is in the image? ASSISTANT: A cat on a red sofa.", "USER: ASSISTANT: USER",
          "What color is the sofa? It is red. How many cats are there? There is one cat."]
IMAGE_TOKEN_INDEX = -200  # official llava/constants.py: the image's place in input_ids


@pytest.fixture(scope="module")
def vicuna(tmp_path_factory):
    """A folder laid out as lmsys/vicuna-7b-v1.5 (a tiny decoder, SentencePiece files only) and its model."""
    folder = tmp_path_factory.mktemp("vicuna")
    proto = tiny.write_vicuna_style_tokenizer(folder, CORPUS * 20, 400)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    LlamaForCausalLM(tiny.tiny_text_config(vocab_size=sp.get_piece_size())).save_pretrained(folder)
    return folder, sp


# LLaVA-1.5's tokenization (haotian-liu/LLaVA at the 1.5 release, transformers 4.31, slow LlamaTokenizer),
# with sentencepiece alone. `sp_tokenize` is LlamaTokenizer(legacy=True)(text).input_ids: BOS, then the
# text between special tokens encoded piece by piece, each piece with SentencePiece's dummy "▁" prefix.
# (With Vicuna's legacy=false, 4.31 also cut the "▁" off the first piece after each </s>: not reproduced.)

def sp_tokenize(sp, text: str) -> list[int]:
    ids = [sp.bos_id()]
    for part in re.split("(</s>)", text):
        ids += [sp.eos_id()] if part == "</s>" else sp.encode(part)
    return ids


def official_image_tokenize(sp, prompt: str) -> list[int]:
    """mm_utils.tokenizer_image_token: each side of <image> tokenized alone, later BOSes dropped."""
    first, *rest = [sp_tokenize(sp, chunk) for chunk in prompt.split("<image>")]
    return first + [i for chunk in rest for i in [IMAGE_TOKEN_INDEX] + chunk[1:]]


def official_v1(sp, turns) -> tuple[list[int], list[int]]:
    """train.preprocess_v1: the whole prompt tokenized, then each round's instruction masked by token counts."""
    prompt = SYSTEM + " " + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in turns)
    ids = official_image_tokenize(sp, prompt)
    labels = [IGNORE_INDEX] + ids[1:]
    position = 1  # after BOS
    for round_text in prompt.split("</s>")[:-1]:
        instruction = round_text.split(" ASSISTANT: ")[0] + " ASSISTANT: "
        # A round's own BOS stands for the </s> that ends it; "- 2" drops BOS and the trailing "▁".
        instruction_len = len(official_image_tokenize(sp, instruction)) - 2
        labels[position:position + instruction_len] = [IGNORE_INDEX] * instruction_len
        position += len(official_image_tokenize(sp, round_text))
    assert position == len(ids)  # else official LLaVA masks the whole sample ("tokenization mismatch")
    return ids, labels


def official_plain(sp, caption: str) -> tuple[list[int], list[int]]:
    """train.preprocess_plain: <image> + caption + "\\n", the image's two positions (BOS, image) masked."""
    ids = official_image_tokenize(sp, "<image>" + caption + "\n")
    return ids, [IGNORE_INDEX] * 2 + ids[2:]


def expand_image(ids, labels, image_id: int, n: int):
    """Official ids with the one image index -> ``n`` copies of the placeholder token, as the processor does."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        out_ids += [image_id] * n if token == IMAGE_TOKEN_INDEX else [token]
        out_labels += [IGNORE_INDEX] * n if token == IMAGE_TOKEN_INDEX else [label]
    return out_ids, out_labels


def encode(turns, tokenizer, n: int = 4, template: str = "vicuna_v1"):
    return encode_conversation(move_image_to_front(turns), tokenizer, model_max_length=2048, num_image_tokens=n,
                               template=template)


def test_a_vicuna_folder_loads_and_tokenizes_a_conversation_as_llava_v1_5(vicuna):
    folder, sp = vicuna
    model, processor = build_llava(ModelConfig(vision_tower="tiny", language_model=str(folder)))
    tokenizer = processor.tokenizer
    image_id = check_tokenizer(tokenizer)
    n = model.config.image_seq_length
    encoded = encode(TURNS, tokenizer, n)
    assert (encoded.input_ids, encoded.labels) == expand_image(*official_v1(sp, move_image_to_front(TURNS)),
                                                               image_id, n)
    # The placeholder is a real token of the tokenizer, followed by "▁" and "\n" as official LLaVA has them.
    after_image = encoded.input_ids.index(image_id) + n
    assert sp.id_to_piece(encoded.input_ids[after_image:after_image + 2]) == ["▁", "<0x0A>"]


def test_stage_1_captions_tokenize_as_llava_v1_5(vicuna):
    folder, sp = vicuna
    tokenizer = build_llava(ModelConfig(vision_tower="tiny", language_model=str(folder)))[1].tokenizer
    encoded = encode([("<image>", "A cat on a red sofa.")], tokenizer, template="plain")
    assert (encoded.input_ids, encoded.labels) == expand_image(*official_plain(sp, "A cat on a red sofa."),
                                                               check_tokenizer(tokenizer), 4)


@pytest.mark.parametrize("setting", [False, None])  # None: the tokenizer's own, Vicuna-v1.5's legacy=false
def test_tokenizer_legacy_false_drops_the_prefix_after_image_and_eos_but_trains_the_same_answers(vicuna, setting):
    folder, sp = vicuna
    legacy = build_llava(ModelConfig(vision_tower="tiny", language_model=str(folder)))[1].tokenizer
    other = build_llava(ModelConfig(vision_tower="tiny", language_model=str(folder),
                                    tokenizer_legacy=setting))[1].tokenizer
    assert (legacy.legacy, other.legacy) == (True, False)
    image_id = check_tokenizer(other)
    got, expected = encode(TURNS, other), encode(TURNS, legacy)
    # Without the prefix: "\n" straight after the image, and "USER" after each </s> without its "▁".
    after_image = got.input_ids.index(image_id) + 4
    assert sp.id_to_piece(got.input_ids[after_image]) == "<0x0A>"
    after_eos = [got.input_ids[i + 1] for i, token in enumerate(got.input_ids[:-1]) if token == sp.eos_id()]
    assert after_eos and not any(sp.id_to_piece(token).startswith("▁") for token in after_eos)
    assert got.input_ids != expected.input_ids
    assert [t for t in got.labels if t != IGNORE_INDEX] == [t for t in expected.labels if t != IGNORE_INDEX]


def test_the_setting_survives_saving_and_reloading_the_tokenizer(vicuna, tmp_path):
    # transformers 5 does not save `legacy` itself and reloads a Llama tokenizer with legacy=False.
    folder, _ = vicuna
    tokenizer = build_llava(ModelConfig(vision_tower="tiny", language_model=str(folder)))[1].tokenizer
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert encode(TURNS, reloaded).input_ids == encode(TURNS, tokenizer).input_ids


def test_tokenizer_legacy_is_true_false_or_null():
    with pytest.raises(ModelError, match="tokenizer_legacy must be true, false or null; got 'yes'"):
        ModelConfig(tokenizer_legacy="yes")
    with pytest.raises(ConfigError, match="model: tokenizer_legacy must be true, false or null; got 1"):
        build_run_config({"model": {"tokenizer_legacy": 1}})
    assert build_run_config({"model": {"tokenizer_legacy": None}}).model.tokenizer_legacy is None


def test_tokenizers_without_the_setting_load_as_they_are(tmp_path):
    tiny.tiny_tokenizer().save_pretrained(tmp_path)  # byte-level BPE: no "▁" prefix to add or drop
    tokenizer = load_tokenizer(ModelConfig(language_model=str(tmp_path), tokenizer_legacy=True))
    assert not hasattr(tokenizer, "legacy")


@pytest.mark.parametrize("module, package", [("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")])
def test_a_tokenizer_model_without_sentencepiece_is_a_clear_error(vicuna, monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    with pytest.raises(ModelError, match=f"SentencePiece tokenizer.model and no tokenizer.json; reading it needs "
                                         f"{package}: pip install sentencepiece protobuf"):
        load_tokenizer(ModelConfig(language_model=str(vicuna[0])))
