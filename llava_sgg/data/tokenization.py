"""From (human, gpt) turns to ``input_ids`` and ``labels``, with the label mask checked.

Official LLaVA (``preprocess_v1``) masks by re-tokenizing pieces of each round
and counting tokens with ``- 2`` corrections tuned to the Llama tokenizer; when
the counts disagree it prints a warning and masks the whole sample, which then
trains at loss 0. Here the full text is tokenized once with offsets, a token is
labelled when its characters lie in a trained span (the space after
"ASSISTANT:", the answer and its EOS), and the labelled tokens are decoded back
and compared with the spans: a disagreement is a :class:`DataError`, never a
silently empty sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .conversation import ConversationTemplate, render_conversation
from .errors import DataError

__all__ = ["IGNORE_INDEX", "EncodedConversation", "check_tokenizer", "encode_conversation", "move_image_to_front"]

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
    # A special token's string in the data would be tokenized as that token: an
    # "</s>" inside an answer teaches the model to stop there. The placeholder is
    # allowed in questions only.
    specials = [t for t in tokenizer.all_special_tokens if t and t != image_token]
    for k, (human, gpt) in enumerate(turns):
        for role, value, forbidden in (("question", human, specials), ("answer", gpt, specials + [image_token])):
            found = [t for t in forbidden if t in value]
            if found:
                raise DataError(f"{role} {k + 1} contains the tokenizer's special token {found[0]!r}")

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

    input_ids, labels = [], []
    for token, owner in zip(ids, owners):
        if token == image_id:
            input_ids += [image_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
        else:
            input_ids.append(token)
            labels.append(token if owner >= 0 else IGNORE_INDEX)

    full_length = len(input_ids)
    input_ids, labels = input_ids[:model_max_length], labels[:model_max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"all answers are truncated away: the sample needs {full_length} tokens "
                        f"({num_image_tokens if n_placeholders else 0} of them image tokens) and model_max_length "
                        f"is {model_max_length}; raise model_max_length or shorten the sample")
    return EncodedConversation(input_ids, labels, full_length)
