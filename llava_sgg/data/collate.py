"""Batching LLaVA samples for ``LlavaForConditionalGeneration``."""

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
    """

    pad_token_id: int

    def __post_init__(self):
        if not isinstance(self.pad_token_id, int):
            raise ValueError(f"pad_token_id must be an integer, got {self.pad_token_id!r} "
                             "(a Llama tokenizer has none by default: set tokenizer.pad_token first)")

    def __call__(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(x["input_ids"]) for x in instances)
        input_ids = torch.full((len(instances), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(instances), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(instances), width), dtype=torch.long)
        for row, x in enumerate(instances):
            n = len(x["input_ids"])
            input_ids[row, :n] = x["input_ids"]
            labels[row, :n] = x["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [x["pixel_values"] for x in instances if "pixel_values" in x]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch
