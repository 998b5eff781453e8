"""Trim a decoder's vocabulary to the tokens a corpus uses (vocabulary trimming, as done for mT5).

A byte-level BPE tokenizer keeps, of its merges, only those whose two parts and result are all
kept; the embedding rows (and an untied LM head) are gathered to match. Kept are: the tokens the
corpus tokenizes into, every token a kept token can be merged from (so BPE reaches it by the same
merges), every single-character token (the byte alphabet, so any text still tokenizes) and the
special tokens. On the corpus the trimmed tokenizer gives exactly the original tokens, renumbered:
BPE applies, at each step, the lowest-ranked applicable merge, and every merge the original applies
on a corpus word builds toward a kept token, so it is kept and is still the lowest-ranked
applicable one. :func:`trim_vocabulary` checks this on every text anyway.

No library does this for HF fast tokenizers with a model: tokenizers can train a new vocabulary but
not restrict an existing one, so it is written here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = ["kept_token_ids", "trim_vocabulary", "trimmed_tokenizer_json"]


def _bpe(tokenizer_json: dict) -> dict:
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise ValueError("vocabulary trimming supports plain byte-level BPE tokenizers only, got model "
                         f"{ {k: v for k, v in model.items() if k not in ('vocab', 'merges')} }")
    return model


def _merge_pairs(merges: Sequence) -> list[tuple[str, str]]:
    # tokenizers writes merges as ["a", "b"] lists (newer) or "a b" strings (older files).
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def kept_token_ids(tokenizer_json: dict, used_ids: Iterable[int]) -> list[int]:
    """Sorted ids to keep: ``used_ids``, what they are merged from (to a fixed point), single characters, specials."""
    model = _bpe(tokenizer_json)
    vocab: dict[str, int] = model["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    kept = {by_id[i] for i in used_ids if i in by_id}
    kept |= {token for token in vocab if len(token) == 1}
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merge_pairs(model["merges"]):
        producers.setdefault(a + b, []).append((a, b))
    todo = list(kept)
    while todo:
        for a, b in producers.get(todo.pop(), ()):
            for part in (a, b):
                if part not in kept and part in vocab:
                    kept.add(part)
                    todo.append(part)
    special = {t["id"] for t in tokenizer_json.get("added_tokens", [])}
    return sorted({vocab[t] for t in kept} | special)


def trimmed_tokenizer_json(tokenizer_json: dict, keep: Sequence[int]) -> dict:
    """``tokenizer_json`` with only the ids in ``keep`` (sorted), renumbered 0.. in that order."""
    model = _bpe(tokenizer_json)
    new_id = {old: new for new, old in enumerate(keep)}
    vocab = {token: new_id[i] for token, i in model["vocab"].items() if i in new_id}
    merges = [[a, b] for a, b in _merge_pairs(model["merges"]) if a in vocab and b in vocab and a + b in vocab]
    out = json.loads(json.dumps(tokenizer_json))
    out["model"]["vocab"], out["model"]["merges"] = vocab, merges
    for added in out.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    _renumber_post_processor(out.get("post_processor"), new_id)
    return out


def _renumber_post_processor(processor, new_id: dict[int, int]) -> None:
    """Template post-processors name their special tokens' ids; renumber them in place."""
    if not isinstance(processor, dict):
        return
    for spec in (processor.get("special_tokens") or {}).values():
        spec["ids"] = [new_id[i] for i in spec.get("ids", [])]
    for inner in processor.get("processors", []) or []:
        _renumber_post_processor(inner, new_id)


def _renumber_token_ids(config, new_id: dict[int, int]) -> None:
    """Renumber a model or generation config's special token ids (an id or a list of ids) in place."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            setattr(config, name, new_id[value])
        elif isinstance(value, list):
            setattr(config, name, [new_id[v] for v in value if v in new_id])


def trim_vocabulary(source: str | Path, texts: Sequence[str], cache: str | Path) -> Path:
    """A copy of the causal LM at ``source`` whose vocabulary holds what ``texts`` need; cached under ``cache``.

    The folder is named after ``source`` and a hash of the kept ids, and is complete once its
    ``llava_sgg_vocabulary.json`` exists. Raises if a text does not tokenize to the same tokens.
    """
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    source = Path(source)
    original = AutoTokenizer.from_pretrained(source)
    if not getattr(original, "is_fast", False):
        raise ValueError(f"{source}: vocabulary trimming needs a fast tokenizer (tokenizer.json)")
    tokenizer_json = json.loads(original.backend_tokenizer.to_str())
    encodings = [original(text, add_special_tokens=True)["input_ids"] for text in texts]
    keep = kept_token_ids(tokenizer_json, {i for ids in encodings for i in ids})
    digest = hashlib.sha256(json.dumps(keep).encode()).hexdigest()[:10]
    target = Path(cache) / f"{source.name}-vocab{len(keep)}-{digest}"
    marker = target / "llava_sgg_vocabulary.json"
    if marker.is_file():
        return target

    new_id = {old: new for new, old in enumerate(keep)}
    trimmed = Tokenizer.from_str(json.dumps(trimmed_tokenizer_json(tokenizer_json, keep)))
    specials = {name: getattr(original, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                if getattr(original, name, None) is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trimmed, model_max_length=original.model_max_length,
                                        padding_side=original.padding_side, **specials)
    for text, ids in zip(texts, encodings):
        got = tokenizer(text, add_special_tokens=True)["input_ids"]
        if got != [new_id[i] for i in ids]:
            raise RuntimeError(f"trimmed tokenizer of {source} tokenizes {text[:80]!r}... differently")

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    index = torch.tensor(keep)
    with torch.no_grad():
        rows = model.get_input_embeddings().weight[index].clone()
        head = model.get_output_embeddings()
        tied = head is None or head.weight is model.get_input_embeddings().weight
        head_rows = None if tied else head.weight[index].clone()
        model.resize_token_embeddings(len(keep), mean_resizing=False)
        model.get_input_embeddings().weight.copy_(rows)
        if head_rows is not None:
            model.get_output_embeddings().weight.copy_(head_rows)
    for config in (model.config, getattr(model, "generation_config", None)):
        _renumber_token_ids(config, new_id)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    marker.write_text(json.dumps({"source": str(source), "vocab_size": len(keep),
                                  "of_vocab_size": len(tokenizer_json["model"]["vocab"]),
                                  "kept_ids": keep}, indent=1))
    return target
