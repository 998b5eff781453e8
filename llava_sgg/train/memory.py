"""What a run holds in GPU memory for its weights, gradients and optimizer states, and a check before the first step.

Activations, the all-gathered bf16 layers of FSDP2 and the CUDA context come on top: the
estimate is a floor, so a run it refuses could never fit, and one it passes may still not.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

GIB = 2**30
SGG_ID_BYTES = 1  # frozen cluster ids are uint8 per element of every eligible (ndim >= 2) parameter


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes held for the whole model; ``per_gpu`` divides what FSDP2 shards."""

    trainable_params: int
    frozen_bytes: int  # frozen weights in their loaded dtype (the vision tower; the decoder in LoRA modes)
    master_bytes: int  # trainable weights (fp32 masters)
    grad_bytes: int  # their gradients, in the masters' dtype
    state_bytes: int  # the base optimizer's states
    sgg_bytes: int  # SGG's cluster ids

    @property
    def total(self) -> int:
        return self.frozen_bytes + self.master_bytes + self.grad_bytes + self.state_bytes + self.sgg_bytes

    def per_gpu(self, shards: int = 1) -> int:
        return -(-self.total // shards)

    def describe(self, shards: int = 1) -> str:
        parts = (("frozen weights", self.frozen_bytes), ("fp32 master weights", self.master_bytes),
                 ("gradients", self.grad_bytes), ("optimizer states", self.state_bytes),
                 ("SGG cluster ids", self.sgg_bytes))
        return ", ".join(f"{name} {value / shards / GIB:.1f} GiB" for name, value in parts if value)


def _state_bytes(p: nn.Parameter, base: str, options: dict) -> int:
    """The base optimizer's state for one parameter, in the parameter's dtype (fp32 masters)."""
    size = p.element_size()
    if base in ("adamw", "lamb"):
        return 2 * p.numel() * size  # exp_avg, exp_avg_sq
    # transformers' Adafactor: a factored second moment (row and column vectors) for matrices,
    # a full one for vectors, and a first moment only with beta1.
    second = (p.shape[-1] + p.numel() // p.shape[-1]) * size if p.ndim >= 2 else p.numel() * size
    first = p.numel() * size if options.get("beta1") is not None else 0
    return second + first


def memory_plan(model: nn.Module, optimizer: dict) -> MemoryPlan:
    """The memory ``model`` needs to train with ``optimizer`` (a run config's optimizer section)."""
    options = dict(optimizer)
    name = options.pop("name").lower()
    base, sgg = (name.removesuffix("_sgg"), True) if name.endswith("_sgg") else (name, False)
    frozen = master = grads = states = ids = trainable = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        if not p.requires_grad:
            frozen += p.numel() * p.element_size()
            continue
        trainable += p.numel()
        master += p.numel() * p.element_size()
        grads += p.numel() * p.element_size()
        states += _state_bytes(p, base, options)
        if sgg and p.ndim >= 2 and options.get("assignment", "frozen") == "frozen":
            ids += p.numel() * SGG_ID_BYTES
    return MemoryPlan(trainable, frozen, master, grads, states, ids)


class DoesNotFitError(ValueError):
    """A run whose weights, gradients and optimizer states alone exceed a GPU's memory."""


def check_fits(plan: MemoryPlan, capacity: int, *, shards: int, mode: str) -> None:
    """Refuse, before the first step, a run whose floor exceeds one GPU's memory."""
    need = plan.per_gpu(shards)
    if need <= capacity:
        return
    how = "sharded over FSDP2's" if shards > 1 else "replicated on each of DDP's (or the one process's)"
    hint = ("train.distributed=fsdp2 under a multi-GPU launcher (configs/accelerate/fsdp2_1node.yaml) "
            "shards them, as official LLaVA's ZeRO-3 does" if shards == 1 else "more GPUs")
    raise DoesNotFitError(
        f"train.mode={mode}: {plan.trainable_params / 1e9:.2f} B trainable parameters need at least "
        f"{need / GIB:.1f} GiB per GPU ({how} GPUs: {plan.describe(shards)}; activations come on top), "
        f"but a GPU has {capacity / GIB:.1f} GiB. Use {hint}, or train.mode=lora.")
