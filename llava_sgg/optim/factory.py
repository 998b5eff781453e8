"""One table from optimizer name to class and defaults (in the manner of timm's factory)."""

from __future__ import annotations

import inspect
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
    "fused": "fused",
}


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed matrices, and biases and norms without decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _base_options(cls) -> set[str]:
    return {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params")}


def check_optimizer_options(name: str, options: dict) -> tuple[str, type, bool, dict]:
    """Validate an optimizer name and its options without building it.

    Returns (base name, base class, whether SGG wraps it, options with YAML lists
    turned into tuples). Used by build_optimizer and by config validation, so a
    bad key fails before any model is loaded.
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
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0):
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    # YAML has no tuples: pairs such as betas, eps and scale_bounds arrive as lists.
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return base_name, cls, wrap, options


def build_optimizer(model_or_params: nn.Module | Iterable, name: str, *, lr: float | None = None,
                    **kwargs) -> torch.optim.Optimizer:
    """Build ``name`` (one of :data:`OPTIMIZER_NAMES`) over a model or parameters.

    A model's trainable parameters are split so that biases and norm weights get
    no weight decay; parameters or param-group dicts are used as given (so a
    projector group can carry its own ``lr``). ``*_sgg`` names wrap the base in
    :class:`SGG` and also take its options (``sgg_eps`` for SGG's eps).
    """
    base_name, cls, wrap, kwargs = check_optimizer_options(name, {**kwargs, "lr": lr})
    lr = kwargs.pop("lr")
    base_keys = _base_options(cls) - {"lr"}
    base_kwargs = {**_BASES[base_name][1], **{k: v for k, v in kwargs.items() if k in base_keys}}
    if base_name == "adafactor" and lr is None and not base_kwargs["relative_step"]:
        raise ValueError("adafactor needs lr (or relative_step=True for its own schedule)")
    if lr is not None:
        base_kwargs["lr"] = lr

    if isinstance(model_or_params, nn.Module):
        params = param_groups_weight_decay(model_or_params, base_kwargs.get("weight_decay", 0.0))
    else:
        params = list(model_or_params)
    if not params:
        raise ValueError("build_optimizer got no trainable parameters")
    optimizer = cls(params, **base_kwargs)
    if not wrap:
        return optimizer
    return SGG(optimizer, **{SGG_OPTIONS[k]: v for k, v in kwargs.items() if k in SGG_OPTIONS})
