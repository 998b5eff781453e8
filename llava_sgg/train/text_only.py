"""Text-only batches run the image path too, on a blank image, with no effect on the loss.

Official LLaVA gives every sample of a multimodal dataset an image (zeros where the sample has
none) and puts a zero-length slice of the image features into each text-only sample's
embeddings, so the vision tower and the connector are in every step's graph. Without that:

- under FSDP2, the ranks all-gather different layers when one rank's batch holds an image and
  another's does not (LLaVA's modality-length grouping makes whole batches text-only on purpose):
  the collectives no longer match and the run dies;
- under DDP with gradient checkpointing (Trainer then leaves ``find_unused_parameters`` off), the
  connector's gradient is missing on one rank and DDP's reducer stops the run;
- in one process, a text-only step gives the connector no gradient (``None``): AdamW skips it,
  where official LLaVA steps it with a zero gradient (its moments decay and it moves).

:func:`run_image_path_always` reproduces LLaVA's arrangement without changing the samples: in
training, a forward without ``pixel_values`` runs the tower and the connector on one blank image
where an image batch runs them (after embedding the tokens, before the decoder layers) and adds
``0 *`` the mean of the features to the decoder's input embeddings. The loss and the logits are
unchanged; the connector (and a trained tower) gets a zero gradient, and every rank runs the same
layers in the same order, forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn


class _ImagePathAlways:
    def __init__(self, llava: nn.Module):
        self.llava, self.blank = llava, False
        llava.register_forward_pre_hook(self._before, with_kwargs=True)
        llava.language_model.register_forward_pre_hook(self._into_embeddings, with_kwargs=True)

    def _before(self, module, args, kwargs):
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        self.blank = pixel_values is None and module.training and torch.is_grad_enabled()

    def _into_embeddings(self, module, args, kwargs):
        # Here, not in _before: an image batch embeds the tokens (under FSDP2 a unit of its own) before it
        # runs the tower, and a blank image must run the sharded layers in that same order.
        embeddings = kwargs.get("inputs_embeds")
        if not self.blank or embeddings is None:
            return None
        self.blank = False
        zero = blank_image_features(self.llava, embeddings.device).float().mean() * 0.0
        kwargs["inputs_embeds"] = embeddings + zero.to(embeddings.dtype)
        return args, kwargs


def blank_image_features(llava: nn.Module, device: torch.device) -> torch.Tensor:
    """The connector's output for one all-zero image: ``LlavaModel.get_image_features``, as an image batch runs it."""
    side = llava.config.vision_config.image_size
    pixels = torch.zeros(1, 3, side, side, device=device)  # float32, as the collator's pixel_values
    out = llava.get_image_features(pixel_values=pixels)
    # transformers 5 returns an output whose pooler_output lists each image's features; 4.x a tensor.
    features = getattr(out, "pooler_output", out)
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def run_image_path_always(llava: nn.Module) -> bool:
    """Install the blank-image forward (module docstring) on ``llava``, a ``LlavaModel`` (the ``.model`` of
    LlavaForConditionalGeneration, under a PEFT wrapper or not).

    Nothing is installed where neither the tower nor the connector trains. Returns whether it was.
    """
    trained = any(p.requires_grad for part in (llava.vision_tower, llava.multi_modal_projector)
                  for p in part.parameters())
    if trained:
        _ImagePathAlways(llava)
    return trained
