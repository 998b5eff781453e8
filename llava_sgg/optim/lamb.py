"""LAMB: layer-wise adaptive moments (You et al., ICLR 2020).

Written here because neither torch nor transformers ships LAMB, and timm's
version has no clamp of the weight norm (the paper's setting: clamp value 10).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from . import fused
from .steps import LambSteps

__all__ = ["Lamb"]


class Lamb(Optimizer):
    """LAMB with bias correction and the trust ratio clamp(||w||, 0, clamp_value) / ||r||.

    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w;  w <- w - lr * trust * r.
    ``clamp_value=None`` leaves the weight norm unclamped.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, clamp_value: float | None = 10.0):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps} (must be > 0)")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
        if clamp_value is not None and not (clamp_value > 0 and not math.isnan(clamp_value)):
            raise ValueError(f"Invalid clamp_value: {clamp_value} (must be > 0 or None)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, clamp_value=clamp_value)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused_items: dict[torch.device, list] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if fused.supports(LambSteps, group, p):  # a CUDA device with Triton: two passes per tensor
                    fused_items.setdefault(p.device, []).append((group, p, state, None))
                    continue
                LambSteps.moments(group, p, state)
                LambSteps.apply(group, p, state, scale=None)
        for items in fused_items.values():
            fused.fused_steps(LambSteps, items, decoupled=None)
        return loss
