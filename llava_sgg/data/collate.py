"""Batching LLaVA samples for ``LlavaForConditionalGeneration``: padded rows, or one packed row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tokenization import IGNORE_INDEX

__all__ = ["DataCollatorForLlava"]


@dataclass(frozen=True)
class DataCollatorForLlava:
    """Right-pad ``input_ids`` (with ``pad_token_id``) and ``labels`` (with -100); stack the images.

    ``attention_mask`` comes from each sample's length, not from
    ``input_ids != pad_token_id`` as officially: with the pad token set to EOS
    (a common choice) that would hide every answer's EOS. ``pixel_values`` holds
    the images of the samples that have one, in batch order, because the model
    fills image-token positions with image features in order; it is left out
    when no sample has an image. Sample ids are not passed on (the model's
    ``forward`` does not take them).

    ``packing=True`` (the config's ``data.packing``): the same samples, in the same
    order, concatenated into one row without padding (batch dimension 1), with
    ``position_ids`` restarting at 0 for each sample and no ``attention_mask``.
    transformers reads positions that restart as sample boundaries and keeps
    attention inside each sample (causal within it) in every attention
    implementation: a block-diagonal mask for sdpa, eager and flex_attention,
    varlen kernels for flash_attention_*, provided the model is called without a
    KV cache (``use_cache=False``; ``LlavaTrainer.compute_loss`` passes it). Each
    sample's first label is set to -100: the loss shifts labels by one, so there it
    would be predicted from the previous sample's last token, where the padded
    layout has no prediction at all. Loss, trained-token count and gradients are
    then those of the padded batch.
    """

    pad_token_id: int
    packing: bool = False

    def __post_init__(self):
        if not isinstance(self.pad_token_id, int):
            raise ValueError(f"pad_token_id must be an integer, got {self.pad_token_id!r} "
                             "(a Llama tokenizer has none by default: set tokenizer.pad_token first)")

    def __call__(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = self._packed(instances) if self.packing else self._padded(instances)
        images = [x["pixel_values"] for x in instances if "pixel_values" in x]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch

    def _padded(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(x["input_ids"]) for x in instances)
        input_ids = torch.full((len(instances), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(instances), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(instances), width), dtype=torch.long)
        for row, x in enumerate(instances):
            n = len(x["input_ids"])
            input_ids[row, :n] = x["input_ids"]
            labels[row, :n] = x["labels"]
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    @staticmethod
    def _packed(instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(x["input_ids"]) for x in instances]
        if min(lengths) < 1:
            raise ValueError("a packed sample needs at least one token")
        input_ids = torch.cat([torch.as_tensor(x["input_ids"], dtype=torch.long) for x in instances])
        labels = torch.cat([torch.as_tensor(x["labels"], dtype=torch.long) for x in instances])
        position_ids = torch.cat([torch.arange(n) for n in lengths])
        labels[position_ids == 0] = IGNORE_INDEX  # no prediction across a sample boundary
        return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None]}
