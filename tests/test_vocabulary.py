"""Vocabulary trimming: the trimmed decoder computes, on the corpus, what the original computes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from llava_sgg.model.tiny import tiny_text_config, tiny_tokenizer
from llava_sgg.model.vocabulary import kept_token_ids, trim_vocabulary

TEXTS = ["Is there a 5 in the image?\nAnswer the question using a single word or phrase. ASSISTANT: Yes</s>",
         "What digit is in the top left? ASSISTANT: 7</s>", "3, 7 in the bottom right"]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def source(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab") / "tiny"
    torch.manual_seed(0)
    config = tiny_text_config()
    config.tie_word_embeddings = request.param
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_trimmed_decoder_gives_the_same_tokens_and_logits_on_the_corpus(source):
    target = trim_vocabulary(source, TEXTS, source.parent / "cache")
    marker = json.loads((target / "llava_sgg_vocabulary.json").read_text())
    kept = marker["kept_ids"]
    assert marker["vocab_size"] == len(kept) < marker["of_vocab_size"]
    original_tok, trimmed_tok = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(target)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    trimmed = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    assert trimmed.get_input_embeddings().weight.shape[0] == len(kept)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert kept[getattr(trimmed.config, name)] == getattr(original.config, name)
    for text in TEXTS:
        old, new = original_tok(text)["input_ids"], trimmed_tok(text)["input_ids"]
        assert [kept[i] for i in new] == old
        assert trimmed_tok.decode(new) == original_tok.decode(old)
        with torch.no_grad():
            full = original(torch.tensor([old])).logits[0]
            cut = trimmed(torch.tensor([new])).logits[0]
        # The trimmed head is the original's rows for the kept tokens: the same logits, column by column.
        assert torch.allclose(cut, full[:, kept], atol=1e-5)
    # Any other text still tokenizes (every single-character token is kept) and decodes back.
    other = "Zebra #42 quickly!"
    assert trimmed_tok.decode(trimmed_tok(other, add_special_tokens=False)["input_ids"]) == other
    # Cached: a second call returns the folder without rewriting it.
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert trim_vocabulary(source, TEXTS, source.parent / "cache") == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp


def test_kept_ids_close_over_merges_and_keep_specials():
    tokenizer_json = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5},
                                "merges": [["a", "b"], ["ab", "c"], ["b", "c"]]},
                      "added_tokens": [{"id": 6, "content": "<s>"}]}
    # "abc" needs "ab" and "c" (and "ab" needs "a", "b"); "bc" is not used; single characters always stay.
    assert kept_token_ids(tokenizer_json, [4]) == [0, 1, 2, 3, 4, 6]
    with pytest.raises(ValueError, match="byte-level BPE"):
        kept_token_ids({"model": {"type": "WordPiece", "vocab": {}}}, [])
