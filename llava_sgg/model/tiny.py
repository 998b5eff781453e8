"""Tiny model parts built from configuration alone, for tests and offline smoke runs.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in
memory on a fixed text, and every network is randomly initialised from a config.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from ..evaluation.prompts import SHORT_ANSWER

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT: What is in the image? "
    f"{SHORT_ANSWER} The digit 3 is left of 7. Yes No zero one two three "
    "four five six seven eight nine how many digits are there"
)


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A Llama-like fast tokenizer (<s> prepended, </s> as EOS, <image> special) with ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=[IMAGE_TOKEN],
                                   model_max_length=2048, padding_side="right")


def tiny_vision_config(image_size: int = 56, patch_size: int = 14) -> CLIPVisionConfig:
    """A 3-layer CLIP ViT (16 patches of 14 px at 56 px); LLaVA takes layer -2."""
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                            image_size=image_size, patch_size=patch_size, projection_dim=32)


def tiny_text_config(vocab_size: int = 400) -> LlamaConfig:
    """A 2-layer Llama decoder."""
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)


def write_vicuna_style_tokenizer(folder, sentences, vocab_size: int, num_threads: int = 1) -> bytes:
    """Train a SentencePiece BPE on ``sentences`` with Llama's trainer options (byte fallback, ids
    unk/bos/eos 0/1/2, no normalization, dummy prefix, split digits) and save it in ``folder`` as
    lmsys/vicuna-7b-v1.5 ships its tokenizer: tokenizer.model and its JSON files, no tokenizer.json
    (no Vicuna tokenizer can be downloaded here). Returns the model's bytes."""
    import io
    import json
    from pathlib import Path

    import sentencepiece as spm

    folder = Path(folder)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2, num_threads=num_threads)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False,
        "model_max_length": 4096, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        **{k: {"__type": "AddedToken", "content": v, **token} for k, v in specials.items()}}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": "<unk>", **{k: {"content": v, **token} for k, v in specials.items()}}))
    return model.getvalue()
