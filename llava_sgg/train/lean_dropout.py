"""LoRA dropout that keeps no mask and no dropped copy for the backward pass (``train.lean_lora_dropout``).

peft computes a LoRA branch as ``lora_B(lora_A(dropout(x)))``. For the backward pass autograd keeps,
per adapted Linear, the dropout's mask and the dropped input that ``lora_A`` multiplied: about three
bytes per element of the input, for each of a Llama layer's seven Linears (q, k and v each keep their
own, though they read one input). In a 7B decoder that is about half of what a layer keeps for its
backward pass (docs/training.md), so it decides how many layers `checkpoint_layers: auto` can keep
instead of recompute.

Here the dropout and ``lora_A`` are one autograd function that keeps only the input (one tensor,
shared by the Linears that read it) and the random generator's state from before the mask was drawn;
the backward pass restores that state, draws the same mask again and puts the generator back as it
was. It is the same function of the same distribution as peft's: each element kept with probability
``1 - p`` and scaled by ``1 / (1 - p)``, a fresh mask per Linear and step; the masks are other draws
than peft's ``nn.Dropout`` would make, and the dropped input is computed in the input's dtype, as
autocast would round it anyway. torch.utils.checkpoint restores the generator before it recomputes a
layer, so a recomputed forward draws the masks of the first one.

No library provides this: peft's LoRA layers apply ``nn.Dropout`` as a separate module, and Unsloth's
fused LoRA kernels support no dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    raise NotImplementedError(f"train.lean_lora_dropout: no default generator for {device.type} tensors")


def _keep_mask(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """1 where an element is kept, 0 where dropped, in ``x``'s dtype: the same draws for the same generator state."""
    return torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: autocast's, else the inputs' promotion."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


class DropoutLinearFunction(torch.autograd.Function):
    """``F.linear(dropout(x, p), weight)``, keeping ``x`` and the generator's state instead of the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        generator = _generator(x.device)
        ctx.state = generator.get_state()
        # (x * keep) is exact; the Python scale then rounds once per element, as nn.Dropout does. A scale
        # multiplied into the mask first would be rounded to x's dtype: 1/0.95 is 1.0547 in bf16.
        dropped = x * _keep_mask(x, p, generator) * (1.0 / (1.0 - p))
        dtype = _compute_dtype(x, weight)
        ctx.p, ctx.dtype = p, dtype
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(dropped.to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        generator = _generator(x.device)
        now = generator.get_state()
        generator.set_state(ctx.state)
        try:
            keep = _keep_mask(x, ctx.p, generator)
        finally:
            generator.set_state(now)  # the forward's later draws stay as they were
        scale = 1.0 / (1.0 - ctx.p)
        grad_out = grad_out.to(ctx.dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(ctx.dtype)).to(x.dtype) * keep * scale
        if ctx.needs_input_grad[1]:
            dropped = (x * keep * scale).to(ctx.dtype)  # the forward's expression: the same values
            grad_weight = (grad_out.reshape(-1, grad_out.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1]))
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None


class DropoutLoraA(nn.Linear):
    """peft's ``lora_A`` Linear with the branch's dropout inside (same weight, same state-dict key)."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(x)
        return DropoutLinearFunction.apply(x, self.weight, self.p)


def use_lean_lora_dropout(model: nn.Module) -> int:
    """Move every peft LoRA Linear's dropout into its ``lora_A`` (in place); returns how many were moved.

    Each layer's input is no longer cast to the adapter's dtype first (peft's ``cast_input_dtype``): the
    input itself is what the backward pass keeps, one tensor for all the Linears that read it, where a
    cast would keep a copy per Linear. Under autocast the product is computed in autocast's dtype either way.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    moved = 0
    for module in model.modules():
        if type(module) is not LoraLinear:  # QLoRA's and DoRA's layers compute their branches otherwise
            continue
        for name, dropout in module.lora_dropout.items():
            variant = getattr(module, "lora_variant", {}).get(name) or module.use_dora.get(name)
            if not isinstance(dropout, nn.Dropout) or dropout.p == 0 or variant:
                continue
            lora_a = module.lora_A[name]
            lora_a.__class__ = DropoutLoraA  # same parameters and buffers: only forward changes
            lora_a.p = float(dropout.p)
            module.lora_dropout[name] = nn.Identity()
            module.cast_input_dtype_enabled = False
            moved += 1
    return moved
