"""One table from optimizer name to class and defaults (in the manner of timm's factory)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable

import torch
from torch import nn

from .lamb import Lamb
from .sgg import SGG

__all__ = ["OPTIMIZER_NAMES", "SGG_OPTIONS", "build_optimizer", "check_optimizer_options", "param_groups_weight_decay"]


def _adafactor():
    # Imported lazily: transformers is heavy, and only Adafactor needs it.
    from transformers.optimization import Adafactor

    return Adafactor


# name -> (class factory, defaults). Defaults are the paper's settings
# (docs/paper-recipes): AdamW eps 1e-8; Adafactor with transformers' Trainer
# semantics (external lr, no relative step, no first moment, clip 1.0);
# LAMB eps 1e-6 and weight-norm clamp 10; no weight decay anywhere.
_BASES = {
    "adamw": (lambda: torch.optim.AdamW, {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}),
    "adafactor": (_adafactor, {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None,
                               "weight_decay": 0.0, "scale_parameter": False, "relative_step": False,
                               "warmup_init": False}),
    "lamb": (lambda: Lamb, {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "clamp_value": 10.0}),
}
OPTIMIZER_NAMES = tuple(list(_BASES) + [f"{name}_sgg" for name in _BASES])

# SGG's keyword arguments as build_optimizer takes them; SGG's own eps is
# `sgg_eps` here because `eps` belongs to the base optimizer.
SGG_OPTIONS = {
    "n_clusters": "n_clusters", "recluster_interval": "recluster_interval", "beta3": "beta3",
    "scale_bounds": "scale_bounds", "sgg_eps": "eps", "cluster_on": "cluster_on", "assignment": "assignment",
    "backend": "backend", "exact_limit": "exact_limit", "sample_size": "sample_size", "seed": "seed",
    "fused": "fused", "rule": "rule", "mean_decay": "mean_decay", "precompile": "precompile",
}


def decays(name: str, p: nn.Parameter) -> bool:
    """Whether weight decay applies: to matrices, never to biases and norms (as LLaVA and timm)."""
    return p.ndim >= 2 and not name.endswith(".bias")


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed matrices, and biases and norms without decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _base_options(cls) -> set[str]:
    return {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params")}


def check_optimizer_options(name: str, options: dict) -> tuple[str, type, bool, dict]:
    """Validate an optimizer name, its option names and their values, without touching any model.

    Returns (base name, base class, whether SGG wraps it, options with YAML lists
    turned into tuples). Used by build_optimizer and by config validation, so a
    bad key or value fails before any model is loaded, with the message the
    optimizer's own constructor gives.
    """
    if not isinstance(name, str) or name.lower() not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZER_NAMES)}")
    name = name.lower()
    base_name, wrap = (name[: -len("_sgg")], True) if name.endswith("_sgg") else (name, False)
    cls = _BASES[base_name][0]()
    base_keys = _base_options(cls) - {"lr"}
    valid = base_keys | (set(SGG_OPTIONS) if wrap else set())
    unknown = sorted(set(options) - valid - {"lr"})
    if unknown:
        hint = " (SGG options need a *_sgg optimizer name)" if set(unknown) & set(SGG_OPTIONS) else ""
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for optimizer {name!r}{hint}; "
                         f"valid options: lr, {', '.join(sorted(valid))}")
    lr = options.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0):
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    # YAML has no tuples: pairs such as betas, eps and scale_bounds arrive as lists.
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    base_kwargs, sgg_kwargs = _constructor_kwargs(base_name, cls, wrap, options)
    if base_name == "adafactor":
        _check_adafactor(base_kwargs)
    betas = base_kwargs.get("betas")
    if betas is not None and not (isinstance(betas, tuple) and len(betas) == 2 and all(map(_is_number, betas))):
        raise ValueError(f"betas must be a pair of numbers (beta1, beta2), got {betas!r}")
    # The rest is what the constructors check themselves (AdamW and Lamb: lr, betas, eps, weight_decay;
    # Lamb: clamp_value; Adafactor: lr against relative_step; SGG: every option of its own). Building both
    # over a one-element matrix is instant, and a real build could not fail on a value this one passed.
    probe = torch.zeros(1, 1, requires_grad=True)
    try:
        base = cls([probe], **base_kwargs)
        if wrap:
            SGG(base, **sgg_kwargs)
    except TypeError as error:  # e.g. betas: 0.9, or a string where a number belongs
        raise ValueError(f"optimizer {name!r}: an option has a value of the wrong type ({error})") from None
    return base_name, cls, wrap, options


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _constructor_kwargs(base_name: str, cls: type, wrap: bool, options: dict) -> tuple[dict, dict]:
    """(the base class's keyword arguments, the table's defaults filled in; SGG's under its own names)."""
    base_keys = _base_options(cls) - {"lr"}
    base_kwargs = {**_BASES[base_name][1], **{k: v for k, v in options.items() if k in base_keys}}
    if base_name == "adafactor" and options.get("lr") is None and not base_kwargs["relative_step"]:
        raise ValueError("adafactor needs lr (or relative_step=True for its own schedule)")
    if options.get("lr") is not None:
        base_kwargs["lr"] = options["lr"]
    sgg_kwargs = {SGG_OPTIONS[k]: v for k, v in options.items() if k in SGG_OPTIONS} if wrap else {}
    return base_kwargs, sgg_kwargs


def _check_adafactor(kwargs: dict) -> None:
    """What transformers' Adafactor would take without a word and then step with wrongly."""
    eps = kwargs["eps"]
    if not (isinstance(eps, tuple) and len(eps) == 2 and all(_is_number(e) and e >= 0 for e in eps)):
        raise ValueError(f"adafactor's eps must be a pair (eps1, eps2) of numbers >= 0, got {eps!r}")
    beta1 = kwargs["beta1"]
    if beta1 is not None and not (_is_number(beta1) and 0 <= beta1 < 1):
        raise ValueError(f"beta1 must be null (no first moment) or a number in [0, 1), got {beta1!r}")
    # decay_rate c gives beta2_t = 1 - t^c, which approaches 1 only for c < 0.
    for key, ok, want in (("clip_threshold", lambda v: v > 0, "> 0"), ("decay_rate", lambda v: v < 0, "< 0"),
                          ("weight_decay", lambda v: v >= 0, ">= 0")):
        if not (_is_number(kwargs[key]) and ok(kwargs[key])):
            raise ValueError(f"{key} must be a number {want}, got {kwargs[key]!r}")


def _all_plain_cuda(params: list) -> bool:
    from torch.distributed.tensor import DTensor

    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return all(p.is_cuda and p.is_floating_point() and not isinstance(p, DTensor) for p in tensors)


def build_optimizer(model_or_params: nn.Module | Iterable, name: str, *, lr: float | None = None,
                    **kwargs) -> torch.optim.Optimizer:
    """Build ``name`` (one of :data:`OPTIMIZER_NAMES`) over a model or parameters.

    A model's trainable parameters are split so that biases and norm weights get
    no weight decay; parameters or param-group dicts are used as given (so a
    projector group can carry its own ``lr``). ``*_sgg`` names wrap the base in
    :class:`SGG` and also take its options (``sgg_eps`` for SGG's eps).
    """
    base_name, cls, wrap, kwargs = check_optimizer_options(name, {**kwargs, "lr": lr})
    base_kwargs, sgg_kwargs = _constructor_kwargs(base_name, cls, wrap, kwargs)

    if isinstance(model_or_params, nn.Module):
        params = param_groups_weight_decay(model_or_params, base_kwargs.get("weight_decay", 0.0))
    else:
        # param-group dicts may hold iterators (made lists here, as they are read twice) or one tensor
        params = [{**g, "params": [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])}
                  if isinstance(g, dict) else g for g in model_or_params]
    if not params:
        raise ValueError("build_optimizer got no trainable parameters")
    if base_name == "adamw" and not wrap and not {"fused", "foreach"} & set(kwargs) and _all_plain_cuda(params):
        # torch's default on CUDA is the foreach step, which holds a temporary as large as all the trained
        # weights (sqrt of exp_avg_sq) at its peak; the fused step holds none, and is transformers' own
        # default (optim="adamw_torch_fused"). FSDP2's DTensors and CPU tensors keep torch's default.
        base_kwargs["fused"] = True
    optimizer = cls(params, **base_kwargs)
    if not wrap:
        return optimizer
    return SGG(optimizer, **sgg_kwargs)
