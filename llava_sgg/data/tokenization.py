"""From (human, gpt) turns to ``input_ids`` and ``labels``, with the label mask checked.

Official LLaVA (``preprocess_v1``) masks by re-tokenizing pieces of each round
and counting tokens with ``- 2`` corrections tuned to the Llama tokenizer; when
the counts disagree it prints a warning and masks the whole sample, which then
trains at loss 0. Here the full text is tokenized once with offsets, a token is
labelled when its characters lie in a trained span (the space after
"ASSISTANT:", the answer and its EOS), and the labelled tokens are decoded back
and compared with the spans: a disagreement is a :class:`DataError`, never a
silently empty sample.

:func:`encode_conversations` and :func:`conversation_lengths` do the same for many
conversations at once: one batched call of the fast tokenizer (parallel in Rust),
the label spans located and checked with array operations, and the labelled
tokens of all answers decoded in one batch. Their results are those of
:func:`encode_conversation`, which any conversation these checks do not pass
outright goes through, so that its error is exactly the one-at-a-time error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from .conversation import ConversationTemplate, get_template, render_conversation
from .errors import DataError

__all__ = ["IGNORE_INDEX", "ConversationLengths", "EncodedConversation", "check_tokenizer", "conversation_lengths",
           "encode_conversation", "encode_conversations", "move_image_to_front", "reachability_problems",
           "special_token_problem", "tokenization_fingerprint"]

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's default ignore_index, as official LLaVA and HF use


def move_image_to_front(turns: Sequence[tuple[str, str]], image_token: str = "<image>") -> list[tuple[str, str]]:
    """Official ``preprocess_multimodal``: the placeholder opens the first human turn as ``"<image>\\n" + rest``.

    The turn that held the placeholder loses it and is stripped, as officially;
    the loader has already checked there is exactly one, in a human turn.
    Official code keeps the placeholder in whichever turn held it; LLaVA-1.5's
    data always has it in the first, and the first is where this puts it.
    """
    out = []
    for k, (human, gpt) in enumerate(turns):
        if image_token in human:
            human = human.replace(image_token, "").strip()
        if k == 0:
            human = (image_token + "\n" + human).strip()
        out.append((human, gpt))
    return out


def check_tokenizer(tokenizer, image_token: str = "<image>") -> int:
    """Check the tokenizer can be used here and return the image token's id (a ``ValueError`` otherwise).

    It must be a fast tokenizer (offsets are needed), its EOS must tokenize to the
    EOS id (else answers would never teach the model to stop), and the image
    placeholder must be one token of its vocabulary (HF ``LlavaForConditionalGeneration``
    finds image positions by ``config.image_token_id``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; offsets are needed for label masking "
                         "(load it with use_fast=True)")
    eos = tokenizer.eos_token
    if eos is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; answers end with it")
    if tokenizer("x" + eos, add_special_tokens=False)["input_ids"][-1:] != [tokenizer.eos_token_id]:
        raise ValueError(f"the tokenizer splits its EOS string {eos!r} into pieces; it must be a special token")
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if ids != [token_id] or (token_id == tokenizer.unk_token_id and image_token != tokenizer.unk_token):
        raise ValueError(f"the image placeholder {image_token!r} is not a single token of this tokenizer "
                         f"(it tokenizes to {ids}); add it with tokenizer.add_special_tokens("
                         f"{{'additional_special_tokens': [{image_token!r}]}}) and resize the model's embeddings")
    return token_id


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids and labels (``IGNORE_INDEX`` where not trained) after image expansion and truncation."""

    input_ids: list[int]
    labels: list[int]
    full_length: int  # before truncation to model_max_length

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _span_owners(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each token, the index of the trained span its characters lie in, or -1.

    A token straddling a span's edge belongs to neither side (and fails the
    decode check); tokens the tokenizer adds (BOS) have empty offsets.
    """
    owners = []
    k = 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] < end:
            k += 1
        inside = start < end and k < len(spans) and spans[k][0] <= start and end <= spans[k][1]
        owners.append(k if inside else -1)
    return owners


def _check_labels(text: str, spans, ids: Sequence[int], owners: Sequence[int], tokenizer) -> None:
    """Every trained span must be one run of labelled tokens that decodes back to the span's text.

    The comparison collapses whitespace runs and trims both ends: a span starts
    with the space after "ASSISTANT:", which Llama's tokenizer folds into the
    answer's first token ("▁Yes") and its decoder then drops; every other
    character must match.
    """
    positions_of: list[list[int]] = [[] for _ in spans]
    for i, owner in enumerate(owners):
        if owner >= 0:
            positions_of[owner].append(i)
    for k, ((a, b), positions) in enumerate(zip(spans, positions_of)):
        expected = text[a:b]
        if not positions:
            raise DataError(f"answer {k + 1} got no labelled tokens (expected {expected[:80]!r}); "
                            "the tokenizer's offsets do not cover it")
        if positions[-1] - positions[0] + 1 != len(positions):
            raise DataError(f"answer {k + 1} is labelled in pieces (tokens {positions[0]}..{positions[-1]} "
                            f"with gaps); the tokenizer's offsets are inconsistent")
        got = tokenizer.decode([ids[i] for i in positions], skip_special_tokens=False,
                               clean_up_tokenization_spaces=False)
        if _normalise(got) != _normalise(expected):
            raise DataError(f"label mask mismatch in answer {k + 1}: the labelled tokens decode to "
                            f"{got[:120]!r}, the answer is {expected[:120]!r}")


def special_token_problem(turns: Sequence[tuple[str, str]], specials: Sequence[str],
                          image_token: str = "<image>") -> str | None:
    """The problem :func:`encode_conversation` raises when a turn holds a special token's string, else None.

    Such a string would be tokenized as that token: an "</s>" inside an answer
    teaches the model to stop there. The placeholder is allowed in questions only.
    ``specials`` are the tokenizer's special tokens other than the placeholder.
    """
    for k, (human, gpt) in enumerate(turns):
        for role, value, forbidden in (("question", human, specials), ("answer", gpt, [*specials, image_token])):
            found = [t for t in forbidden if t in value]
            if found:
                return f"{role} {k + 1} contains the tokenizer's special token {found[0]!r}"
    return None


def encode_conversation(turns: Sequence[tuple[str, str]], tokenizer, *, model_max_length: int,
                        num_image_tokens: int = 0, image_token: str = "<image>",
                        template: str | ConversationTemplate = "vicuna_v1") -> EncodedConversation:
    """Render, tokenize, label, expand the image placeholder and truncate one conversation.

    ``turns`` are (human, gpt) pairs, already through :func:`move_image_to_front`
    if the sample has an image. Labels are the token ids of each trained span
    (the space after "ASSISTANT:", the answer, its EOS) and ``IGNORE_INDEX``
    elsewhere (BOS, system prompt, user turns, "ASSISTANT:").
    The one image placeholder token becomes ``num_image_tokens`` copies (the
    vision tower's patch count, 576 for CLIP ViT-L/14 at 336 px), labelled
    ``IGNORE_INDEX``, as HF ``LlavaProcessor`` expands it. Truncation to
    ``model_max_length`` comes after expansion. Raises :class:`DataError` (without
    the sample's id; the caller adds it) for special-token strings in the text,
    a label mask that does not decode back to the answers, or a sample whose
    answers are all truncated away. The tokenizer is trusted to have passed
    :func:`check_tokenizer` (the dataset checks it once).
    """
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    specials = [t for t in tokenizer.all_special_tokens if t and t != image_token]
    problem = special_token_problem(turns, specials, image_token)
    if problem is not None:
        raise DataError(problem)

    try:
        rendered = render_conversation(turns, eos=tokenizer.eos_token, template=template, image_token=image_token)
    except ValueError as e:  # a sample the template cannot render (plain: one captioned turn)
        raise DataError(str(e)) from e
    enc = tokenizer(rendered.text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    owners = _span_owners(offsets, rendered.trained_spans)
    _check_labels(rendered.text, rendered.trained_spans, ids, owners, tokenizer)

    n_placeholders = rendered.text.count(image_token)
    if ids.count(image_id) != n_placeholders:
        raise DataError(f"the text has {n_placeholders} {image_token!r} placeholder(s) but tokenizes to "
                        f"{ids.count(image_id)} image tokens")
    if n_placeholders and num_image_tokens < 1:
        raise ValueError("the conversation has an image; pass num_image_tokens (the vision tower's patch count)")

    encoded = _expand_and_truncate(ids, [owner >= 0 for owner in owners], image_id, num_image_tokens,
                                   model_max_length)
    if all(label == IGNORE_INDEX for label in encoded.labels):
        raise DataError(f"all answers are truncated away: the sample needs {encoded.full_length} tokens "
                        f"({num_image_tokens if n_placeholders else 0} of them image tokens) and model_max_length "
                        f"is {model_max_length}; raise model_max_length or shorten the sample")
    return encoded


def _expand_and_truncate(ids: Sequence[int], trained: Sequence[bool], image_id: int, num_image_tokens: int,
                         model_max_length: int) -> EncodedConversation:
    """Labels from the trained mask, the image token expanded to ``num_image_tokens`` untrained copies, truncated."""
    input_ids, labels = [], []
    for token, is_trained in zip(ids, trained):
        if token == image_id:
            input_ids += [image_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
        else:
            input_ids.append(token)
            labels.append(token if is_trained else IGNORE_INDEX)
    return EncodedConversation(input_ids[:model_max_length], labels[:model_max_length], len(input_ids))


def tokenization_fingerprint(tokenizer, **settings) -> str:
    """A digest of everything :func:`conversation_lengths`' results depend on besides the text: the
    tokenizer (its class, its whole ``tokenizer.json``, its special tokens), the keyword arguments,
    the versions of transformers and tokenizers, and the code of this module and of the templates."""
    import tokenizers
    import transformers

    from . import conversation

    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
    value = {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "backend": sha256(backend.encode()),
        "special_tokens": [tokenizer.eos_token, tokenizer.bos_token, list(tokenizer.all_special_tokens)],
        "settings": {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in settings.items()},
        "versions": [transformers.__version__, tokenizers.__version__],
        "code": [sha256(Path(m.__file__).read_bytes()) for m in (sys.modules[__name__], conversation)],
    }
    return sha256(json.dumps(value, sort_keys=True, default=str).encode())


@dataclass(frozen=True)
class ConversationLengths:
    """What :func:`conversation_lengths` finds, one entry per conversation (by its index).

    ``lengths[i]`` is ``len(encode_conversation(...).input_ids)`` (image tokens expanded,
    truncated to ``model_max_length``) and ``full_lengths[i]`` its ``full_length``; both
    are 0 where ``problems`` holds the message of the :class:`DataError` it raises.
    """

    lengths: np.ndarray  # int32
    full_lengths: np.ndarray  # int32
    problems: dict[int, str]


def encode_conversations(conversations: Sequence[Sequence[tuple[str, str]]], tokenizer, *, model_max_length: int,
                         num_image_tokens: int = 0, image_token: str = "<image>",
                         template: str | ConversationTemplate = "vicuna_v1",
                         batch_size: int = 1024) -> list[EncodedConversation | DataError]:
    """:func:`encode_conversation` of each conversation, batched: the same ids and labels, and for a
    conversation it refuses, the same :class:`DataError`, returned in its place instead of raised."""
    out = []
    for chunk in _encoded_chunks(conversations, tokenizer, model_max_length, num_image_tokens, image_token,
                                 template, batch_size):
        for j in range(len(chunk.conversations)):
            if j in chunk.reference:
                out.append(chunk.reference[j])
            else:
                k = chunk.batched[j]
                a, b = chunk.starts[k], chunk.starts[k + 1]
                out.append(_expand_and_truncate(chunk.ids[a:b].tolist(), chunk.trained[a:b].tolist(), chunk.image_id,
                                                num_image_tokens, model_max_length))
    return out


def conversation_lengths(conversations: Sequence[Sequence[tuple[str, str]]], tokenizer, *, model_max_length: int,
                         num_image_tokens: int = 0, image_token: str = "<image>",
                         template: str | ConversationTemplate = "vicuna_v1", batch_size: int = 1024,
                         progress: Callable[[int], object] | None = None) -> ConversationLengths:
    """Tokenized length of each conversation, or the problem that refuses it, as :func:`encode_conversation`
    gives them, without building the ids and labels: the check a dataset makes of every sample.

    ``progress`` is called with the number of conversations done after each batch.
    """
    n = len(conversations)
    lengths, full_lengths, problems = np.zeros(n, np.int32), np.zeros(n, np.int32), {}
    done = 0
    for chunk in _encoded_chunks(conversations, tokenizer, model_max_length, num_image_tokens, image_token,
                                 template, batch_size):
        indices = np.arange(done, done + len(chunk.conversations))
        batched = indices[chunk.batched >= 0]
        lengths[batched], full_lengths[batched] = chunk.lengths, chunk.full_lengths
        for j, result in chunk.reference.items():
            if isinstance(result, DataError):
                problems[done + j] = str(result)
            else:
                lengths[done + j], full_lengths[done + j] = len(result.input_ids), result.full_length
        done += len(chunk.conversations)
        if progress is not None:
            progress(len(chunk.conversations))
    return ConversationLengths(lengths, full_lengths, problems)


# Tokens a conversation may gain or lose where its first answer meets the text before it (a
# merge across the edge) and after the placeholder expands; a conversation whose first answer
# starts this close to model_max_length is encoded in full instead of trusted.
_REACH_MARGIN = 8


def _token_bound(text: str, normalize: Callable[[str], str] | None, added: int) -> int:
    """At least as many tokens as any BPE, unigram, WordPiece or byte-level tokenizer makes of ``text``.

    Every token covers at least one character of the normalized, pre-tokenized text, or is one
    byte of a character the vocabulary lacks (byte fallback): so no more tokens than that text's
    UTF-8 bytes. Normalizing is applied (NFKC may expand a character); pre-tokenizing may write a
    space as "▁" (2 bytes more) and prepend a "▁" to each word (3 more), counted per space plus one.
    ``added``: the tokens the post-processor adds (BOS).
    """
    if normalize is not None:
        text = normalize(text)
    return len(text.encode("utf-8", "surrogatepass")) + 5 * (text.count(" ") + 1) + added


def reachability_problems(conversations: Sequence[Sequence[tuple[str, str]]], tokenizer, *, model_max_length: int,
                          num_image_tokens: int = 0, image_token: str = "<image>",
                          template: str | ConversationTemplate = "vicuna_v1", batch_size: int = 4096,
                          progress: Callable[[int], object] | None = None) -> dict[int, str]:
    """``{index: problem}`` for the conversations :func:`encode_conversation` refuses for a special token's
    string in the text or for all answers truncated away: the checks ``data.check: fast`` makes before
    training, without tokenizing whole conversations.

    Only the text before each first answer is tokenized (in batches): when the first answer starts
    well inside ``model_max_length``, its first token is trained and the conversation cannot lose
    all its answers. The few that start near or past the limit, and any the template cannot render
    from its first turn alone, are encoded in full by :func:`conversation_lengths`, so that their
    problem is the one a full check reports. What this leaves to the batch that draws a sample is
    the label mask's decode check (:func:`encode_conversation` raises it there, naming the sample).
    """
    template = get_template(template)
    specials = [t for t in tokenizer.all_special_tokens if t and t != image_token]
    specials_re = re.compile("|".join(map(re.escape, specials))) if specials else None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalize = backend.normalizer.normalize_str if backend is not None and backend.normalizer else None
    added = tokenizer.num_special_tokens_to_add()
    problems, exact = {}, []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        prefixes, owners = [], []
        for j, turns in enumerate(chunk):
            # One regex over the joined turns is cheap; a hit gets special_token_problem's exact message.
            suspect = ((specials_re is not None and specials_re.search("\x00".join(chain.from_iterable(turns))))
                       or any(image_token in gpt for _, gpt in turns))
            problem = special_token_problem(turns, specials, image_token) if suspect else None
            if problem is not None:
                problems[start + j] = problem
                continue
            try:  # (plain renders one turn or refuses)
                rendered = render_conversation(turns if template.style == "plain" else turns[:1],
                                               eos=tokenizer.eos_token, template=template, image_token=image_token)
            except ValueError:
                exact.append(start + j)  # the template refuses it: the full encode says how
                continue
            prefixes.append(rendered.text[:rendered.trained_spans[0][0]])
            owners.append(start + j)
        # Most prefixes are short enough that a bound on their token count settles them; the others are
        # tokenized, and those that end near the limit encoded in full.
        budget = model_max_length - _REACH_MARGIN
        counted = []
        for i, prefix in zip(owners, prefixes):
            images = prefix.count(image_token) * (num_image_tokens - 1)
            if _token_bound(prefix, normalize, added) + images < budget:
                continue
            counted.append((i, prefix, images))
        if counted:
            encoded = tokenizer([prefix for _, prefix, _ in counted], add_special_tokens=True, verbose=False)
            for (i, _, images), ids in zip(counted, encoded["input_ids"]):
                if len(ids) + images >= budget:
                    exact.append(i)
        if progress is not None:
            progress(len(chunk))
    if exact:
        found = conversation_lengths([conversations[i] for i in exact], tokenizer, model_max_length=model_max_length,
                                     num_image_tokens=num_image_tokens, image_token=image_token, template=template)
        problems.update({exact[j]: message for j, message in found.problems.items()})
    return dict(sorted(problems.items()))


@dataclass
class _Chunk:
    """One batch: conversation ``j`` is either in ``reference`` (encoded one at a time) or batched as
    ``batched[j]``-th, its tokens at ``starts[k]:starts[k + 1]`` of ``ids`` and ``trained``."""

    conversations: Sequence
    reference: dict[int, EncodedConversation | DataError]
    batched: np.ndarray  # j -> k, or -1
    starts: np.ndarray
    ids: np.ndarray
    trained: np.ndarray  # bool: labelled (an answer's token, never the image token)
    lengths: np.ndarray  # per batched conversation, after expansion and truncation
    full_lengths: np.ndarray
    image_id: int


def _encoded_chunks(conversations, tokenizer, model_max_length, num_image_tokens, image_token, template, batch_size):
    template = get_template(template)
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    specials = [t for t in tokenizer.all_special_tokens if t and t != image_token]
    specials_re = re.compile("|".join(map(re.escape, specials))) if specials else None
    decode = _batch_decoder(tokenizer)
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        yield _encode_chunk(chunk, tokenizer, template=template, image_token=image_token, image_id=image_id,
                            specials_re=specials_re, decode=decode, num_image_tokens=num_image_tokens,
                            model_max_length=model_max_length)


def _batch_decoder(tokenizer) -> Callable[[list[list[int]]], list[str]]:
    """``tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)`` of many sequences.

    That decode is the backend's ``decode`` for a transformers fast tokenizer, so its ``decode_batch``
    (parallel in Rust) gives the same strings; a tokenizer class that decodes its own way is called as is.
    """
    from transformers import PreTrainedTokenizerFast

    cls = type(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and cls._decode is PreTrainedTokenizerFast._decode
            and cls.decode is PreTrainedTokenizerFast.decode):
        return lambda sequences: backend.decode_batch(sequences, skip_special_tokens=False) if sequences else []
    return lambda sequences: [tokenizer.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                              for s in sequences]


def _flat(nested, rows: int, width: int = 1) -> np.ndarray:
    """Lists of ints (``width`` 1) or of ``width``-tuples, concatenated into one int64 array of ``rows`` rows."""
    values = chain.from_iterable(nested)
    if width > 1:
        values = chain.from_iterable(values)
    array = np.fromiter(values, np.int64, rows * width)
    return array if width == 1 else array.reshape(rows, width)


def _encode_chunk(conversations, tokenizer, *, template, image_token, image_id, specials_re, decode,
                  num_image_tokens, model_max_length) -> _Chunk:
    """encode_conversation's checks and lengths for a batch, as array operations over all its tokens.

    A conversation any check does not pass outright (special-token strings, a template it does not
    fit, labelled tokens that are missing, in pieces or decode to other text, an image-token count
    that differs from the placeholders', every answer truncated away) is encoded by
    encode_conversation itself, which raises the exact error (such conversations are rare).
    """
    reference_ids, texts, spans, batched_ids = [], [], [], []
    eos = tokenizer.eos_token
    for j, turns in enumerate(conversations):
        # A superset of encode_conversation's special-token check: any special string anywhere.
        if ((specials_re is not None and specials_re.search("\x00".join(chain.from_iterable(turns))))
                or any(image_token in answer for _, answer in turns)):
            reference_ids.append(j)
            continue
        try:
            rendered = render_conversation(turns, eos=eos, template=template, image_token=image_token)
        except ValueError:
            reference_ids.append(j)
            continue
        batched_ids.append(j)
        texts.append(rendered.text)
        spans.append(rendered.trained_spans)

    n = len(texts)
    ok = np.ones(n, bool)
    ids = np.zeros(0, np.int64)
    starts = np.zeros(n + 1, np.int64)
    trained = np.zeros(0, bool)
    lengths = full_lengths = np.zeros(n, np.int32)
    if n:
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)
        id_lists = enc["input_ids"]
        counts = np.fromiter(map(len, id_lists), np.int64, n)
        starts[1:] = np.cumsum(counts)
        total = int(starts[-1])
        ids = _flat(id_lists, total)
        offsets = _flat(enc["offset_mapping"], total, 2)
        token_of = np.repeat(np.arange(n), counts)  # conversation of each token

        span_counts = np.fromiter(map(len, spans), np.int64, n)
        span_starts = np.zeros(n + 1, np.int64)
        span_starts[1:] = np.cumsum(span_counts)
        n_spans = int(span_starts[-1])
        span = _flat(spans, n_spans, 2)
        span_of = np.repeat(np.arange(n), span_counts)

        # _span_owners for every token at once. Its pointer k, for a token, is the number of spans ending
        # before the largest token end so far; offsetting each conversation by `stride` keeps them apart.
        stride = max(map(len, texts)) + 2
        furthest = np.maximum.accumulate(offsets[:, 1] + token_of * stride)
        k = np.searchsorted(span[:, 1] + span_of * stride, furthest, side="left")
        kk = np.minimum(k, n_spans - 1)
        owned = ((offsets[:, 0] < offsets[:, 1]) & (k < span_starts[token_of + 1])
                 & (span[kk, 0] <= offsets[:, 0]) & (offsets[:, 1] <= span[kk, 1]))

        # _check_labels: each span one run of tokens (owners never decrease, so a span's tokens are
        # consecutive entries of `positions`) that decodes back to the span's text.
        positions = np.flatnonzero(owned)
        owner = k[positions]
        per_span = np.bincount(owner, minlength=n_spans)
        first_entry = np.searchsorted(owner, np.arange(n_spans), side="left")
        last_entry = np.searchsorted(owner, np.arange(n_spans), side="right") - 1
        if len(positions):  # (where a span has no tokens, first and last are meaningless and unused)
            first = positions[np.minimum(first_entry, len(positions) - 1)]
            last = positions[np.maximum(last_entry, 0)]
        else:
            first = last = np.zeros(n_spans, np.int64)
        span_ok = (per_span > 0) & (last - first + 1 == per_span)
        check = np.flatnonzero(span_ok)
        owners, local_first = span_of[check].tolist(), (first - starts[span_of])[check].tolist()
        local_last = (last - starts[span_of])[check].tolist()
        decoded = decode([id_lists[s][a:b + 1] for s, a, b in zip(owners, local_first, local_last)])
        span_text = zip(owners, span[check, 0].tolist(), span[check, 1].tolist())
        for m, (s, a, b), got in zip(check.tolist(), span_text, decoded):
            expected = texts[s][a:b]
            # The span starts with the space that Llama's decoder drops; otherwise compare as _check_labels.
            if got != expected and " " + got != expected and _normalise(got) != _normalise(expected):
                span_ok[m] = False
        ok &= np.bincount(span_of[~span_ok], minlength=n) == 0

        is_image = ids == image_id
        n_images = np.bincount(token_of[is_image], minlength=n)
        placeholders = np.fromiter((t.count(image_token) for t in texts), np.int64, n)
        ok &= n_images == placeholders
        if num_image_tokens < 1:
            ok &= n_images == 0  # encode_conversation raises its ValueError for these

        # Lengths after expansion, and whether any trained token survives truncation.
        extra = num_image_tokens - 1
        full = counts + n_images * extra
        trained = owned & ~is_image
        images_so_far = np.concatenate([[0], np.cumsum(is_image)])  # before each token, over the whole batch
        images_before = images_so_far[:-1] - images_so_far[starts[:-1]][token_of]
        expanded = np.arange(total) - starts[token_of] + images_before * extra
        first_trained = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(first_trained, token_of[trained], expanded[trained])
        ok &= first_trained < model_max_length
        full_lengths = full.astype(np.int32)
        lengths = np.minimum(full, model_max_length).astype(np.int32)

    reference_ids += [batched_ids[k] for k in np.flatnonzero(~ok).tolist()]
    keep = np.flatnonzero(ok)
    batched = np.full(len(conversations), -1, np.int64)
    batched[np.asarray(batched_ids, np.int64)[keep]] = np.arange(len(keep))
    if len(keep) < n:  # drop the conversations sent to the reference from the arrays
        token_keep = np.repeat(ok, np.diff(starts))
        ids, trained = ids[token_keep], trained[token_keep]
        starts = np.concatenate([[0], np.cumsum(np.diff(starts)[keep])])
        lengths, full_lengths = lengths[keep], full_lengths[keep]

    reference = {}
    for j in sorted(reference_ids):
        try:
            reference[j] = encode_conversation(conversations[j], tokenizer, model_max_length=model_max_length,
                                               num_image_tokens=num_image_tokens, image_token=image_token,
                                               template=template)
        except DataError as e:
            reference[j] = e
    return _Chunk(conversations, reference, batched, starts, ids, trained, lengths, full_lengths, image_id)
