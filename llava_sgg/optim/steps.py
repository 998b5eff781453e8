"""Per-parameter steps of the base optimizers, split where SGG needs to step in.

Each base optimizer's update is split into ``moments`` (what the base
optimizer does to its state), ``statistic`` (the tensor SGG clusters) and
``apply`` (the parameter update, with an optional per-element scale). With
``scale=None``, or a scale of ones, ``moments`` followed by ``apply`` is the
base optimizer's step, operation for operation, so SGG equals it bit for bit
until a scale moves away from 1.

SGG cannot reuse the base classes' ``step`` because it must multiply the
adaptive part of the step (and nothing else: not the decoupled weight decay,
not LAMB's trust ratio) between the moment update and the parameter update.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .dtensor import is_dtensor

__all__ = ["AdamSteps", "AdafactorSteps", "LambSteps", "cpu_parts", "create_state"]

# On a CPU the Adam update of a large tensor runs in parts of this many elements. Whole, each
# temporary (the denominator, the scaled moment, the gathered scales) of a tensor above glibc's
# mmap threshold (32 MB at most) is mapped fresh and page-faulted on every step, which costs several
# times the arithmetic. In parts the temporaries come from the reused heap and stay in cache.
# Elementwise work, so bit for bit the same.
CPU_PART = 2**20


# The per-element scale as each ``apply`` takes it: a function of a part of p's flat view (None: all
# of p) returning that part's scale, or None where p has none; None instead of the function: unscaled.
ScaleOf = Callable[[slice | None], Tensor | None]


def cpu_parts(p: Tensor) -> list[slice] | None:
    """Slices of ``p``'s flat view to run its elementwise update in, or None to run it whole."""
    if p.device.type != "cpu" or p.numel() <= CPU_PART or not p.is_contiguous() or is_dtensor(p):
        return None
    return [slice(start, min(start + CPU_PART, p.numel())) for start in range(0, p.numel(), CPU_PART)]


def _adam_update(p: Tensor, exp_avg: Tensor, second: Tensor, scale: Tensor | None, step_size: float,
                 bias_correction2_sqrt: float, eps: float) -> None:
    denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
    if scale is not None:
        exp_avg = exp_avg * scale
    p.addcdiv_(exp_avg, denom, value=-step_size)


def _scalar(x) -> float:
    return float(x) if isinstance(x, Tensor) else x


def first_moment(group: dict, p: Tensor, state: dict) -> Tensor:
    """The statistic SGG clusters for Adam-like optimizers: exp_avg, not bias-corrected."""
    return state["exp_avg"]


class AdamSteps:
    """torch.optim.Adam / AdamW, mirroring ``torch.optim.adam._single_tensor_adam``."""

    @staticmethod
    def check_group(group: dict) -> None:
        for flag in ("capturable", "differentiable"):
            if group.get(flag):
                raise ValueError(f"SGG supports Adam/AdamW with {flag}=False only (got {flag}=True)")

    @staticmethod
    def init_state(group: dict, p: Tensor, state: dict) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @classmethod
    def moments(cls, group: dict, p: Tensor, state: dict, decoupled: bool) -> None:
        if not state:
            cls.init_state(group, p, state)
        grad = -p.grad if group["maximize"] else p.grad
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        lr, weight_decay = _scalar(group["lr"]), group["weight_decay"]
        state["step"] += 1
        if weight_decay != 0:
            if decoupled:
                p.mul_(1 - lr * weight_decay)  # decoupled decay: never scaled by SGG
            else:
                grad = grad.add(p, alpha=weight_decay)
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    statistic = staticmethod(first_moment)

    @staticmethod
    def apply(group: dict, p: Tensor, state: dict, scale: ScaleOf | None) -> None:
        """The update; on a CPU in parts, each part's scale made alone (never the whole tensor of scales)."""
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        step = float(state["step"])
        constants = (_scalar(group["lr"]) / (1 - beta1**step), (1 - beta2**step) ** 0.5, group["eps"])
        second = state["exp_avg_sq"]
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], second, out=state["max_exp_avg_sq"])
            second = state["max_exp_avg_sq"]
        parts = cpu_parts(p)
        if parts is None:
            _adam_update(p, state["exp_avg"], second, None if scale is None else scale(None), *constants)
            return
        flat = [t.view(-1) for t in (p, state["exp_avg"], second)]
        for part in parts:
            _adam_update(*(t[part] for t in flat), None if scale is None else scale(part), *constants)


class AdafactorSteps:
    """transformers.optimization.Adafactor, mirroring its ``step``."""

    @staticmethod
    def check_group(group: dict) -> None:
        pass

    @staticmethod
    def _rms(t: Tensor) -> Tensor:
        return t.norm(2) / (t.numel() ** 0.5)

    @staticmethod
    def _grad(p: Tensor) -> Tensor:
        grad = p.grad
        return grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad

    @staticmethod
    def _lr(group: dict, state: dict) -> float:
        lr = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(state["step"]))
        scale = max(group["eps"][1], state["RMS"]) if group["scale_parameter"] else 1.0
        return scale * lr

    @classmethod
    def normalized_update(cls, group: dict, p: Tensor, state: dict) -> Tensor:
        """g / sqrt(v_hat) after RMS clipping, before the learning rate."""
        grad = cls._grad(p)
        if grad.ndim >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(grad)
        else:
            update = state["exp_avg_sq"].rsqrt().mul_(grad)
        return update.div_((cls._rms(update) / group["clip_threshold"]).clamp_(min=1.0))

    @classmethod
    def init_state(cls, group: dict, p: Tensor, state: dict) -> None:
        """transformers' state on the first step; on later steps its tensors follow the gradient's dtype."""
        grad = cls._grad(p)
        shape = grad.shape
        factored, first_moment = grad.ndim >= 2, group["beta1"] is not None
        if not state:
            state["step"] = 0
            if first_moment:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(shape[:-1]).to(grad)
                state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:]).to(grad)
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["RMS"] = 0
        else:
            for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(grad)

    @classmethod
    def moments(cls, group: dict, p: Tensor, state: dict, decoupled: bool = False) -> None:
        cls.init_state(group, p, state)
        grad = cls._grad(p)
        factored, first_moment = grad.ndim >= 2, group["beta1"] is not None
        state["step"] += 1
        state["RMS"] = cls._rms(p.float() if p.dtype in (torch.float16, torch.bfloat16) else p)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        sq = grad**2 + group["eps"][0]
        if factored:
            state["exp_avg_sq_row"].mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
            state["exp_avg_sq_col"].mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
        if first_moment:
            update = cls.normalized_update(group, p, state).mul_(cls._lr(group, state))
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])

    @classmethod
    def statistic(cls, group: dict, p: Tensor, state: dict) -> Tensor:
        # Spec decision: without a first moment the statistic is this step's
        # normalized update.
        if group["beta1"] is not None:
            return state["exp_avg"]
        return cls.normalized_update(group, p, state)

    @classmethod
    def apply(cls, group: dict, p: Tensor, state: dict, scale: ScaleOf | None) -> None:
        scale = None if scale is None else scale(None)
        lr = cls._lr(group, state)
        if group["beta1"] is not None:
            update = state["exp_avg"]
        else:
            update = cls.normalized_update(group, p, state).mul_(lr)
        if scale is not None:
            update = update * scale
        low_precision = p.dtype in (torch.float16, torch.bfloat16)
        p32 = p.float() if low_precision else p
        if group["weight_decay"] != 0:
            p32.add_(p32, alpha=-group["weight_decay"] * lr)  # not scaled by SGG
        p32.add_(-update)
        if low_precision:
            p.copy_(p32)


class LambSteps:
    """LAMB (You et al., 2020, Algorithm 2) as :class:`llava_sgg.optim.Lamb` runs it."""

    @staticmethod
    def check_group(group: dict) -> None:
        pass

    @staticmethod
    def init_state(group: dict, p: Tensor, state: dict) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @classmethod
    def moments(cls, group: dict, p: Tensor, state: dict, decoupled: bool = False) -> None:
        if not state:
            cls.init_state(group, p, state)
        beta1, beta2 = group["betas"]
        grad = p.grad
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    statistic = staticmethod(first_moment)

    @staticmethod
    def apply(group: dict, p: Tensor, state: dict, scale: ScaleOf | None) -> None:
        scale = None if scale is None else scale(None)
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        update = (state["exp_avg"] / (1 - beta1**step)).div_(denom)
        if group["weight_decay"] != 0:
            update.add_(p, alpha=group["weight_decay"])
        # Trust ratio phi(||w||) / ||r|| with phi = clamp(., 0, clamp_value),
        # computed from the *unscaled* update (spec decision: SGG's scale comes
        # after, so LAMB's per-layer norm does not cancel it).
        weight_norm = p.norm(2)
        if group["clamp_value"] is not None:
            weight_norm = weight_norm.clamp(max=group["clamp_value"])
        update_norm = update.norm(2)
        trust = torch.where(
            (weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, torch.ones_like(weight_norm)
        )
        if scale is not None:
            update.mul_(scale)
        p.add_(update * trust, alpha=-group["lr"])


def create_state(optimizer: Optimizer, steps) -> None:
    """Give every parameter of ``optimizer`` that has no state yet the state its first step creates.

    ``steps``: the optimizer's split step (:class:`AdamSteps`, :class:`AdafactorSteps`,
    :class:`LambSteps`), or None for an optimizer without one, which is refused. For loading
    a sharded checkpoint, which writes into existing state (:func:`.distributed.prepare_state_for_load`).
    Adafactor's state follows the gradient's dtype: a parameter without a gradient borrows a
    zero one for the while.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if optimizer.state.get(p):
                continue
            if steps is None or not hasattr(steps, "init_state"):
                raise NotImplementedError(f"cannot create the state of {type(optimizer).__name__} "
                                          "before its first step")
            if p.grad is None and steps is AdafactorSteps:
                p.grad = torch.zeros_like(p)
                steps.init_state(group, p, optimizer.state[p])
                p.grad = None
            else:
                steps.init_state(group, p, optimizer.state[p])
