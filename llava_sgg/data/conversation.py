"""Conversation templates: the exact text a LLaVA model is trained and prompted on.

Two styles, as official LLaVA (``llava/conversation.py``): ``plain`` (template
``conv_llava_plain``, stage-1 feature alignment) is the image followed by its
caption and ``"\n"``, the question dropped and only the caption and ``"\n"``
trained (official ``preprocess_plain``). ``two`` reproduces ``Conversation.get_prompt()``
for ``SeparatorStyle.TWO`` (template ``conv_vicuna_v1``, stage-2 instruction tuning):

    system + sep + "USER: " + q1 + sep + "ASSISTANT: " + a1 + sep2 + "USER: " + q2 + ... + sep2

Training text and generation prompt come from the same two functions, so they
cannot drift apart. Besides the text, :func:`render_conversation` returns the
character spans that are trained: everything after each ``"ASSISTANT:"`` up to
and including the ``sep2`` that ends the answer, i.e. the space, the answer and
its ``</s>``. That is what official ``preprocess_v1`` leaves unmasked (it masks
up to and including ``"ASSISTANT:"``; Vicuna's tokenizer folds the space into the
answer's first token), and exactly what the model must generate after
:func:`render_prompt`. Tokenization turns the spans into labels through the
tokenizer's offsets instead of re-counting tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ConversationTemplate", "PLAIN", "RenderedConversation", "TEMPLATES", "VICUNA_V1", "get_template",
           "render_conversation", "render_prompt"]


@dataclass(frozen=True)
class ConversationTemplate:
    """A chat template: ``style`` "two" (official ``SeparatorStyle.TWO``) or "plain".

    In "two", ``sep`` follows the system prompt and every user turn; ``sep2`` follows
    every answer. ``sep2=None`` means "the tokenizer's EOS string": official vicuna_v1
    hard-codes ``"</s>"``, which is right only for Llama/Vicuna tokenizers, and the
    answer must end in the token the model is taught to stop on. In "plain", ``sep``
    ends the caption and nothing else is used.
    """

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None
    style: str = "two"

    def answer_end(self, eos: str | None) -> str:
        sep2 = self.sep2 if self.sep2 is not None else eos
        if not sep2:
            raise ValueError(f"template {self.name!r} ends answers with the tokenizer's EOS; "
                             "pass eos=tokenizer.eos_token")
        return sep2


VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2=None,
)

PLAIN = ConversationTemplate(name="plain", system="", roles=("", ""), sep="\n", sep2=None, style="plain")

# name -> template. A new template is one more entry (and, if it is of neither
# style, its own rendering); nothing is found by name matching.
TEMPLATES: dict[str, ConversationTemplate] = {t.name: t for t in (VICUNA_V1, PLAIN)}


def get_template(template: str | ConversationTemplate) -> ConversationTemplate:
    """The template called ``template`` (or ``template`` itself); unknown names list the known ones."""
    if isinstance(template, ConversationTemplate):
        return template
    try:
        return TEMPLATES[template]
    except (KeyError, TypeError):
        raise ValueError(f"unknown conversation template {template!r}; known: {', '.join(sorted(TEMPLATES))}") from None


@dataclass(frozen=True)
class RenderedConversation:
    """The rendered text and its trained character spans, ``[start, end)``, one per answer."""

    text: str
    trained_spans: tuple[tuple[int, int], ...]


def _render_plain(turns: Sequence[tuple[str, str]], tpl: ConversationTemplate, image_token: str) -> RenderedConversation:
    # Official preprocess_plain: one (human, gpt) pair; the human message becomes
    # the bare placeholder and "placeholder + caption + sep" is the whole text.
    if len(turns) != 1 or image_token not in turns[0][0]:
        raise ValueError(f"template {tpl.name!r} takes one (question, caption) turn whose question holds "
                         f"{image_token!r}; got {len(turns)} turn(s)")
    text = image_token + turns[0][1] + tpl.sep
    return RenderedConversation(text, ((len(image_token), len(text)),))


def render_conversation(turns: Sequence[tuple[str, str]], *, eos: str | None = None,
                        template: str | ConversationTemplate = "vicuna_v1",
                        image_token: str = "<image>") -> RenderedConversation:
    """Render (human, gpt) turns as training text, with one trained span per answer.

    A span runs from just after ``"ASSISTANT:"`` to the end of the answer's
    ``sep2`` (``" " + answer + "</s>"``): official ``preprocess_v1`` masks the
    instruction up to and including ``"ASSISTANT:"`` and trains the rest of the
    round, the answer tokens and ``</s>``. ``render_prompt(q, history=turns[:k])``
    followed by span ``k``'s text is the training text up to the span's end.
    """
    tpl = get_template(template)
    if tpl.style == "plain":
        return _render_plain(turns, tpl, image_token)
    end = tpl.answer_end(eos)
    user, assistant = tpl.roles
    text = tpl.system + tpl.sep
    spans = []
    for human, gpt in turns:
        text += f"{user}: {human}{tpl.sep}{assistant}:"
        start = len(text)
        text += f" {gpt}{end}"
        spans.append((start, len(text)))
    return RenderedConversation(text, tuple(spans))


def render_prompt(question: str, *, history: Sequence[tuple[str, str]] = (), eos: str | None = None,
                  template: str | ConversationTemplate = "vicuna_v1", image_token: str = "<image>") -> str:
    """The generation prompt: earlier (human, gpt) turns, then ``question``, ending with ``"ASSISTANT:"``.

    As official ``get_prompt()`` with a last message of ``None``; the model's
    first generated token carries the space (Vicuna's ``"▁Yes"``), as in training.
    ``eos`` is needed only when there is history.
    """
    tpl = get_template(template)
    if tpl.style == "plain":  # official plain prompts are the image alone
        if history or image_token not in question:
            raise ValueError(f"template {tpl.name!r} prompts with the image alone: no history, and the "
                             f"question must hold {image_token!r}")
        return image_token
    user, assistant = tpl.roles
    text = render_conversation(history, eos=eos, template=tpl).text if history else tpl.system + tpl.sep
    return f"{text}{user}: {question}{tpl.sep}{assistant}:"
