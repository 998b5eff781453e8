"""Conversation templates: the exact text a LLaVA model is trained and prompted on.

Rendering reproduces official LLaVA's ``Conversation.get_prompt()`` for
``SeparatorStyle.TWO`` (``llava/conversation.py``, template ``conv_vicuna_v1``):

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

__all__ = ["ConversationTemplate", "RenderedConversation", "TEMPLATES", "VICUNA_V1", "get_template",
           "render_conversation", "render_prompt"]


@dataclass(frozen=True)
class ConversationTemplate:
    """A two-separator chat template (official ``SeparatorStyle.TWO``).

    ``sep`` follows the system prompt and every user turn; ``sep2`` follows every
    answer. ``sep2=None`` means "the tokenizer's EOS string": official vicuna_v1
    hard-codes ``"</s>"``, which is right only for Llama/Vicuna tokenizers, and the
    answer must end in the token the model is taught to stop on.
    """

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None

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

# name -> template. A new template is one more entry (and, if it is not of the
# TWO style, its own rendering); nothing is found by name matching.
TEMPLATES: dict[str, ConversationTemplate] = {VICUNA_V1.name: VICUNA_V1}


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


def render_conversation(turns: Sequence[tuple[str, str]], *, eos: str | None = None,
                        template: str | ConversationTemplate = "vicuna_v1") -> RenderedConversation:
    """Render (human, gpt) turns as training text, with one trained span per answer.

    A span runs from just after ``"ASSISTANT:"`` to the end of the answer's
    ``sep2`` (``" " + answer + "</s>"``): official ``preprocess_v1`` masks the
    instruction up to and including ``"ASSISTANT:"`` and trains the rest of the
    round, the answer tokens and ``</s>``. ``render_prompt(q, history=turns[:k])``
    followed by span ``k``'s text is the training text up to the span's end.
    """
    tpl = get_template(template)
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
                  template: str | ConversationTemplate = "vicuna_v1") -> str:
    """The generation prompt: earlier (human, gpt) turns, then ``question``, ending with ``"ASSISTANT:"``.

    As official ``get_prompt()`` with a last message of ``None``; the model's
    first generated token carries the space (Vicuna's ``"▁Yes"``), as in training.
    ``eos`` is needed only when there is history.
    """
    tpl = get_template(template)
    user, assistant = tpl.roles
    text = render_conversation(history, eos=eos, template=tpl).text if history else tpl.system + tpl.sep
    return f"{text}{user}: {question}{tpl.sep}{assistant}:"
