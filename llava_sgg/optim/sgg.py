"""SGG: Scaling with Gradient Grouping (Li et al., ACL 2025, arXiv 2506.01049).

The wrapper is bookkeeping: it counts steps, decides when to re-cluster, keeps
each layer's cluster ids (or thresholds) and scales, and hands tensors to pure
functions: :mod:`.functional` (the batched re-clustering: thresholds, ids and
medians of every layer; :mod:`.reference` is the same math one layer at a time),
:mod:`.scaling` (the scaling rule: how each cluster's scale moves), and
:mod:`.steps` / :mod:`.fused` (how the base optimizer's step is scaled). Which
of their paths runs, torch ops or Triton kernels, is decided per device by
:func:`.launch.kernels_for`. docs/sgg.md explains the algorithm and every decision.

Sharded training (FSDP2) reaches SGG through public methods only: the
checkpoint entry points :meth:`SGG.prepare_state_for_load`,
:meth:`SGG.checkpoint_state` and :meth:`SGG.load_checkpoint_state`
(:mod:`.distributed` offers the first for any optimizer), and
:meth:`SGG.recluster` for benchmarks.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import dtensor as D
from . import functional as F
from . import fused as fused_steps
from .lamb import Lamb
from .launch import kernels_for
from .precompile import start as start_precompile
from .reference import assign_clusters, kmeans_1d_sklearn
from .scaling import carried_kmeans_ids, mda_scales, mean_ratio_scales
from .steps import AdafactorSteps, AdamSteps, LambSteps, create_state

__all__ = ["SGG", "steps_for"]

CLUSTER_ON = ("abs", "signed")
RULES = ("mda", "mean_ratio")
SCALE_BOUNDS = (0.1, 10.0)  # the paper's clamp of every scale, and the authors' code's
AUTHORS_KMEANS_SEED = 42  # the random_state of the authors' MiniBatchKMeans (backend="sklearn", rule="mean_ratio")
ASSIGNMENTS = ("frozen", "dynamic")
BACKENDS = ("torch", "sklearn")
MAX_CLUSTERS = 256  # frozen ids are stored as uint8


def steps_for(optimizer: Optimizer):
    """The split step (:mod:`.steps`) of a known base optimizer, or None for the generic path."""
    kind = type(optimizer)
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        return AdamSteps
    if kind is Lamb:
        return LambSteps
    hf = sys.modules.get("transformers.optimization")
    if hf is not None and kind is getattr(hf, "Adafactor", None):
        return AdafactorSteps
    return None


def _eligible(p: Tensor, rule: str = "mda", n_clusters: int = 1) -> bool:
    # Appendix A: the paper groups only matrices (and higher), never norms and biases. The authors'
    # code scales every parameter with a gradient; its k-means needs at least K elements.
    if rule == "mean_ratio":
        return p.requires_grad and p.numel() >= n_clusters
    return p.requires_grad and p.ndim >= 2


def _moment_buffer(state: dict) -> Tensor | None:
    """A generic base optimizer's first moment: its exp_avg, else its momentum_buffer."""
    for key in ("exp_avg", "momentum_buffer"):
        if isinstance(state.get(key), Tensor):
            return state[key]
    return None


def _decoupled_weight_decay(adamw: bool, group: dict) -> bool:
    return group.get("decoupled_weight_decay", adamw)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(n_clusters, recluster_interval, beta3, scale_bounds, eps, cluster_on, assignment, backend,
              exact_limit, sample_size, fused, seed=0, rule="mda", mean_decay=0.95) -> tuple[float, float]:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    if isinstance(mean_decay, bool) or not isinstance(mean_decay, (int, float)) or not 0.0 <= mean_decay < 1.0:
        raise ValueError(f"mean_decay must be a number in [0, 1), got {mean_decay!r}")
    if rule == "mean_ratio" and cluster_on != "abs":
        raise ValueError("rule='mean_ratio' clusters |m|, as the authors' code does: cluster_on must be 'abs'")
    if rule == "mean_ratio" and assignment != "frozen":
        raise ValueError("rule='mean_ratio' keeps each element's cluster until the next re-clustering, as the "
                         "authors' code does: assignment must be 'frozen'")
    if not isinstance(fused, bool):
        raise ValueError(f"fused must be True or False, got {fused!r}")
    if not _is_int(n_clusters) or not 1 <= n_clusters <= MAX_CLUSTERS:
        raise ValueError(f"n_clusters must be an integer in [1, {MAX_CLUSTERS}], got {n_clusters!r}")
    if not _is_int(recluster_interval) or recluster_interval < 1:
        raise ValueError(f"recluster_interval must be an integer >= 1, got {recluster_interval!r}")
    if not isinstance(beta3, (int, float)) or not 0.0 <= beta3 < 1.0:
        raise ValueError(f"beta3 must be a number in [0, 1), got {beta3!r}")
    try:
        lower, upper = (float(b) for b in scale_bounds)
    except (TypeError, ValueError):
        raise ValueError(f"scale_bounds must be a pair (lower, upper), got {scale_bounds!r}") from None
    if not 0.0 < lower <= upper < float("inf"):
        raise ValueError(f"scale_bounds must satisfy 0 < lower <= upper < inf, got {scale_bounds!r}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    for name, value, choices in (("cluster_on", cluster_on, CLUSTER_ON), ("assignment", assignment, ASSIGNMENTS),
                                 ("backend", backend, BACKENDS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    for name, value in (("exact_limit", exact_limit), ("sample_size", sample_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return lower, upper


class SGG(Optimizer):
    """Wrap a base optimizer so that each layer's step is scaled per momentum cluster.

    Every ``recluster_interval`` steps, each eligible layer's statistic (the
    base optimizer's first moment) is split into ``n_clusters`` groups by 1-D
    k-means on its magnitude; each group's scale moves (EMA ``beta3``) toward
    the ratio of the model-wide median absolute deviation to the group's own,
    clamped to ``scale_bounds``. Every step multiplies the base optimizer's
    per-element step by its group's scale. Before the first re-clustering, and
    always with ``n_clusters=1``, SGG is the base optimizer exactly.

    ``rule="mean_ratio"`` is the authors' published rule instead (:func:`.scaling.mean_ratio_scales`):
    every parameter with a gradient is grouped, each group's mean |m| enters an EMA
    (``mean_decay``, starting at 1), the target is the layer's mean |m| over it, and
    the scale, an EMA (``beta3``) starting at 1, is clamped to ``scale_bounds``; with
    ``backend="sklearn"`` the clusters come from a MiniBatchKMeans kept per layer and
    ``partial_fit`` again at each re-clustering, as in their code. docs/sgg.md compares them.

    ``param_groups`` and ``state`` are the base optimizer's own objects, so LR
    schedulers, gradient clipping and checkpointing see a normal optimizer.
    """

    def __init__(self, optimizer: Optimizer, n_clusters: int = 3, recluster_interval: int = 500,
                 beta3: float = 0.99, scale_bounds: tuple[float, float] = SCALE_BOUNDS, eps: float = 1e-8, *,
                 cluster_on: str = "abs", assignment: str = "frozen", backend: str = "torch",
                 exact_limit: int = 2**22, sample_size: int = 2**20, seed: int = 0, fused: bool = True,
                 rule: str = "mda", mean_decay: float = 0.95, precompile: bool = True):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"SGG wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, SGG):
            raise TypeError("SGG cannot wrap another SGG")
        self.scale_bounds = _validate(n_clusters, recluster_interval, beta3, scale_bounds, eps, cluster_on,
                                      assignment, backend, exact_limit, sample_size, fused, seed, rule, mean_decay)
        self.rule, self.mean_decay = rule, float(mean_decay)
        if (rule == "mean_ratio" and backend == "sklearn"
                and any(D.is_dtensor(p) for g in optimizer.param_groups for p in g["params"])):
            # scikit-learn's estimator labels the whole layer on the host; a rank holds a shard of it.
            raise ValueError("rule='mean_ratio' with backend='sklearn' does not support sharded (FSDP2) "
                             "parameters; use backend='torch' (the default) or DDP (train.distributed: ddp)")
        self.n_clusters, self.recluster_interval, self.beta3, self.eps = n_clusters, recluster_interval, beta3, eps
        self.cluster_on, self.assignment, self.backend = cluster_on, assignment, backend
        self.exact_limit, self.sample_size, self.seed = exact_limit, sample_size, seed
        if not isinstance(precompile, bool):
            raise ValueError(f"precompile must be True or False, got {precompile!r}")
        self.fused = fused
        self.optimizer = optimizer
        self._steps = steps_for(optimizer)
        for group in optimizer.param_groups:
            self._check_group(group)
        self._wrapping = True
        # Optimizer.__init__ installs the hooks and step accounting that LR
        # schedulers rely on; the groups and state are then the base's own.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._wrapping = False
        self.param_groups, self.state, self.defaults = optimizer.param_groups, optimizer.state, optimizer.defaults
        self._layers: dict[Tensor, dict[str, Tensor]] = {}  # under FSDP2: ids of this rank's shard
        self._placeholders: set[Tensor] = set()  # layers made by _add_placeholders for a checkpoint
        self._sgg_step = 0
        self.global_mda: float | None = None
        # The fused AdamW step's launches (fused.AdamPlan), kept between re-clusterings. Dropped
        # wherever ids, scales or state are replaced: _recluster, load_state_dict, add_param_group,
        # _add_placeholders; a moved gradient or parameter is caught by its check.
        self._adam_plan: fused_steps.AdamPlan | None = None
        # On CUDA the kernels compile in background threads now, not all at once at the first re-clustering.
        self._precompile = start_precompile(self) if precompile else None

    # ----------------------------------------------------------------- public API
    def cluster_ids(self, p: Tensor) -> Tensor | None:
        """Cluster id of every element of ``p`` (LongTensor shaped like ``p``).

        None before the first re-clustering of ``p`` or when ``p`` is not grouped.
        For a sharded (DTensor) ``p`` a DTensor laid out like ``p``: ``.full_tensor()`` gives all ids.
        """
        layer = self._layers.get(p)
        if layer is None or not self._eligible(p) or p in self._placeholders:
            return None
        if self.assignment == "frozen":
            return D.like(layer["cluster_ids"].long(), p)
        statistic = self._current_statistic(p)
        if statistic is None:
            return None
        ids = assign_clusters(self._clustered_value(D.local(statistic).float()), layer["thresholds"])
        return D.like(ids.long(), p)

    def cluster_scales(self, p: Tensor) -> Tensor | None:
        """The ``n_clusters`` scales of ``p`` (ones until its first re-clustering); None if not grouped."""
        if not self._eligible(p):
            return None
        layer = self._layers.get(p)
        if layer is None:
            return torch.ones(self.n_clusters, device=p.device)
        return layer["cluster_scales"].clone()

    @property
    def reclusterings(self) -> int:
        """How many re-clusterings the steps taken so far made (a resumed run counts the earlier ones)."""
        if not self._reclusters:
            return 0
        return self._sgg_step // self.recluster_interval

    @property
    def _reclusters(self) -> bool:
        # The authors' rule rescales with one cluster too (the layer's mean over its EMA).
        return self.n_clusters > 1 or self.rule == "mean_ratio"

    def _options(self) -> dict:
        """Its settings as keyword arguments of the constructor (precompile.py builds a shadow SGG of them)."""
        return {"n_clusters": self.n_clusters, "recluster_interval": self.recluster_interval, "beta3": self.beta3,
                "scale_bounds": self.scale_bounds, "eps": self.eps, "cluster_on": self.cluster_on,
                "assignment": self.assignment, "backend": self.backend, "exact_limit": self.exact_limit,
                "sample_size": self.sample_size, "seed": self.seed, "fused": self.fused, "rule": self.rule,
                "mean_decay": self.mean_decay}

    @property
    def precompile_report(self) -> dict | None:
        """The background kernel compilation (:mod:`.precompile`): pieces, its wall time, how long the
        first re-clustering waited for it, and errors; None where none ran (no CUDA, ``precompile=False``)."""
        return None if self._precompile is None else self._precompile.report()

    @torch.no_grad()
    def summary(self) -> dict[str, float]:
        """What the last re-clustering left, as numbers to log: ``global_mda`` (rule ``mda``), and per
        cluster c the minimum, median and maximum of its scale over the grouped layers
        (``scale_min/c``, ``scale_median/c``, ``scale_max/c``) and, with frozen ids, the share of
        grouped elements in it (``share/c``; under sharding, of this rank's shards). Empty before
        the first re-clustering."""
        layers = [(p, layer) for p, layer in self._layers.items() if p not in self._placeholders]
        if not layers:
            return {}
        out = {} if self.global_mda is None else {"global_mda": self.global_mda}
        scales = torch.stack([layer["cluster_scales"].float().cpu() for _, layer in layers])  # [L, K]
        counts = torch.zeros(self.n_clusters, dtype=torch.float64)
        if self.assignment == "frozen":
            for _, layer in layers:
                counts += torch.bincount(layer["cluster_ids"].reshape(-1).long(), minlength=self.n_clusters).cpu()
        for c in range(self.n_clusters):
            column = scales[:, c]
            out.update({f"scale_min/{c}": column.min().item(), f"scale_median/{c}": column.median().item(),
                        f"scale_max/{c}": column.max().item()})
            if counts.sum() > 0:
                out[f"share/{c}"] = (counts[c] / counts.sum()).item()
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sgg_step += 1
        recluster = self._reclusters and self._sgg_step % self.recluster_interval == 0
        if recluster and self._precompile is not None:
            self._precompile.wait()
        if not recluster and len(self._layers) == len(self._placeholders):
            # No layer clustered yet (placeholders are a subset of the layers): every scale is 1,
            # so the base step *is* the SGG step.
            self.optimizer.step()
        elif self._steps is None:
            self._generic_step(recluster)
        else:
            self._split_step(recluster)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if self._wrapping:  # called by Optimizer.__init__ on the base's own groups
            return super().add_param_group(param_group)
        self._check_group(param_group)
        self._adam_plan = None
        self.optimizer.add_param_group(param_group)
        self._check_group(self.optimizer.param_groups[-1])

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus an ``"sgg"`` entry of tensors and numbers."""
        state_dict = self.optimizer.state_dict()
        params = self._all_params()
        index = {p: i for i, p in enumerate(params)}
        # Sharded ids are saved as DTensors, so torch.distributed.checkpoint can reshard them
        # onto another world size; "clustered" tells real layers from load templates.
        layers = {index[p]: {key: D.like(t, p) if key == "cluster_ids" else t for key, t in layer.items()}
                  for p, layer in self._layers.items() if p in index}
        clustered = torch.tensor([p in self._layers and p not in self._placeholders for p in params],
                                 dtype=torch.bool)
        state_dict["sgg"] = {
            "step": self._sgg_step,
            "global_mda": self.global_mda,
            "n_clusters": self.n_clusters,
            "assignment": self.assignment,
            "rule": self.rule,
            "layers": layers,
            "clustered": clustered,
        }
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        sgg = state_dict.pop("sgg", None)
        if sgg is not None:
            if sgg["n_clusters"] != self.n_clusters:
                raise ValueError(f"state dict was saved with n_clusters={sgg['n_clusters']}, "
                                 f"this SGG has n_clusters={self.n_clusters}")
            if sgg.get("rule", "mda") != self.rule:
                raise ValueError(f"state dict was saved with rule={sgg.get('rule', 'mda')!r}, "
                                 f"this SGG has rule={self.rule!r}")
            if sgg["assignment"] != self.assignment:
                raise ValueError(f"state dict was saved with assignment={sgg['assignment']!r}, "
                                 f"this SGG has assignment={self.assignment!r}")
        self.optimizer.load_state_dict(state_dict)
        self._adam_plan = None
        # The base optimizer replaces its groups and state objects on load.
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state
        if sgg is None:
            warnings.warn("state dict has no 'sgg' entry (saved by the base optimizer): "
                          "SGG starts its clustering afresh", stacklevel=2)
            self._layers, self._sgg_step, self.global_mda = {}, 0, None
            return
        params = self._all_params()
        clustered = sgg.get("clustered")
        self._layers = {
            params[int(i)]: {key: D.local(t).to(D.local(params[int(i)]).device) for key, t in layer.items()}
            for i, layer in sgg["layers"].items() if clustered is None or bool(clustered[int(i)])
        }
        self._placeholders = set()
        self._sgg_step = int(sgg["step"])
        self.global_mda = None if sgg["global_mda"] is None else float(sgg["global_mda"])

    @torch.no_grad()
    def recluster(self) -> None:
        """Re-cluster now, as a re-clustering step does, without stepping or counting a step.

        Every grouped layer with a gradient and a statistic (what the base optimizer's last
        step left in its state) gets new ids and scales, and ``global_mda`` is updated. For
        benchmarks, which time a re-clustering on its own. A layer of a generic base
        optimizer without a first moment is skipped: its statistic is its step, known only
        inside a step.
        """
        statistics = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if p.grad is None or not self._eligible(p) or not state:
                    continue
                if self._steps is not None:
                    statistics[p] = partial(self._steps.statistic, group, p, state)
                elif (moment := _moment_buffer(state)) is not None:
                    statistics[p] = lambda moment=moment: moment
        self._recluster(statistics)

    def prepare_state_for_load(self) -> None:
        """Create the state a sharded checkpoint will fill, so that ``state_dict()`` is its template.

        ``torch.distributed.checkpoint.load`` writes into an existing state dict, resharding every
        DTensor to the layout it finds there; a freshly built optimizer has no state yet. This creates
        the base optimizer's state tensors (zeros, laid out like each parameter) and SGG's per-layer
        entries, then::

            opt.prepare_state_for_load()
            sd = {"optim": opt.state_dict()}
            dcp.load(sd, checkpoint_id=path)
            opt.load_state_dict(sd["optim"])

        restores the run on any number of ranks. Layers that the checkpoint had not clustered yet
        come back unclustered (the checkpoint's ``clustered`` mask).
        """
        create_state(self.optimizer, self._steps)
        self._add_placeholders()

    def checkpoint_state(self) -> dict:
        """SGG's own ``"sgg"`` entry, with an entry for every grouped layer, for ``torch.distributed.checkpoint``.

        DCP loads into a template of fixed keys, so a checkpoint written before a layer's first
        clustering still lists it (its ``clustered`` flag is off). torch's ``get_optimizer_state_dict``,
        which accelerate uses to save FSDP optimizers, keeps only ``state`` and ``param_groups``,
        so the trainer saves this entry next to it.
        """
        added = self._add_placeholders()
        try:
            return self.state_dict()["sgg"]
        finally:
            for p in added:
                del self._layers[p]
                self._placeholders.discard(p)
            self._adam_plan = None

    def load_checkpoint_state(self, checkpoint_id) -> None:
        """Restore the entry :meth:`checkpoint_state` saved (with DCP), resharded onto this run's ranks."""
        import torch.distributed.checkpoint as dcp

        self.prepare_state_for_load()
        state = self.state_dict()
        template = {"sgg": state["sgg"]}
        dcp.load(template, checkpoint_id=str(checkpoint_id))
        state["sgg"] = template["sgg"]
        self.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"SGG(n_clusters={self.n_clusters}, recluster_interval={self.recluster_interval}, "
                f"beta3={self.beta3}, scale_bounds={self.scale_bounds}, eps={self.eps}, "
                f"cluster_on={self.cluster_on!r}, assignment={self.assignment!r}, backend={self.backend!r}, "
                f"rule={self.rule!r}" + (f", mean_decay={self.mean_decay}" if self.rule == "mean_ratio" else "") + ")"
                f" wrapping {self.optimizer!r}")

    # ------------------------------------------------------------------ internals
    def _check_group(self, group: dict) -> None:
        if self._steps is not None:
            self._steps.check_group(group)
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError("SGG does not support complex parameters")

    def _eligible(self, p: Tensor) -> bool:
        return _eligible(p, self.rule, self.n_clusters)

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _add_placeholders(self) -> list[Tensor]:
        """Entries for every grouped layer not clustered yet (scales 1: they step as unclustered), for a checkpoint."""
        added = []
        for p in self._all_params():
            if self._eligible(p) and p not in self._layers:
                device = D.local(p).device
                layer = {"cluster_scales": torch.ones(self.n_clusters, device=device)}
                if self.rule == "mean_ratio":  # the EMA of cluster means, as it starts
                    layer["cluster_means"] = torch.ones(self.n_clusters, device=device)
                if self.assignment == "frozen":
                    layer["cluster_ids"] = torch.zeros(D.local(p).shape, dtype=torch.uint8, device=device)
                else:
                    layer["thresholds"] = torch.zeros(self.n_clusters - 1, device=device)
                self._layers[p] = layer
                self._placeholders.add(p)
                added.append(p)
        if added:
            self._adam_plan = None  # its scale sources predate these layers
        return added

    def _clustered_value(self, x: Tensor) -> Tensor:
        # Spec decision: group by magnitude |x| unless cluster_on="signed".
        return x.abs() if self.cluster_on == "abs" else x

    def _decoupled(self, group: dict) -> bool:
        return _decoupled_weight_decay(isinstance(self.optimizer, torch.optim.AdamW), group)

    def _current_statistic(self, p: Tensor) -> Tensor | None:
        state = self.state.get(p)
        if not state:
            return None
        if self._steps is None:
            return state.get("exp_avg", state.get("momentum_buffer"))
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        if self._steps is AdafactorSteps and group["beta1"] is None and p.grad is None:
            return None
        return self._steps.statistic(group, p, state)

    def _element_scale(self, p: Tensor, statistic: Callable[[], Tensor], part: slice | None = None) -> Tensor | None:
        """S_l[C_l(i)] for every element i of p (of p's flat view[part], if given), or None while p has no clusters."""
        layer = self._layers.get(p)
        if layer is None:
            return None
        if self.assignment == "frozen":
            ids = layer["cluster_ids"] if part is None else layer["cluster_ids"].view(-1)[part]
        else:
            values = D.local(statistic())
            values = values if part is None else values.view(-1)[part]
            ids = assign_clusters(self._clustered_value(values.float()), layer["thresholds"])
        # index_select, not advanced indexing: faster on a CPU, the same values.
        scales = layer["cluster_scales"].index_select(0, ids.reshape(-1).int()).view(ids.shape)
        return scales if part is not None else D.like(scales, p)

    def _scale_source(self, p: Tensor) -> fused_steps.ScaleSource | None:
        layer = self._layers.get(p) if self._eligible(p) else None
        if layer is None:
            return None
        if self.assignment == "frozen":
            return fused_steps.ScaleSource(layer["cluster_scales"], ids=layer["cluster_ids"])
        return fused_steps.ScaleSource(layer["cluster_scales"], thresholds=layer["thresholds"],
                                       abs=self.cluster_on == "abs")

    def _split_step(self, recluster: bool) -> None:
        steps = self._steps
        if self.fused and not recluster and self._adam_plan is not None:
            # Between re-clusterings the fused AdamW step of the same tensors replays its plan:
            # a check of the addresses and a few launches, no walk over the tensors.
            params = self._all_params()
            if self._adam_plan.matches(params, self.state) and self._adam_plan.step(params):
                return
        self._adam_plan = None
        active = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.fused and not recluster:
            # Between re-clusterings: one fused pass per tensor where a kernel covers it.
            by_device: dict[torch.device, list] = {}
            done = set()
            for group, p in active:
                view = self._fused_view(group, p)
                if view is not None and fused_steps.supports(steps, group, view[0]):
                    by_device.setdefault(view[0].device, []).append((group, *view, self._scale_source(p)))
                    done.add(id(p))
            cacheable = (steps is AdamSteps and len(by_device) == 1 and len(done) == len(active)
                         and not any(D.is_dtensor(p) for _, p in active))
            if cacheable:  # everything on one device took the fused AdamW step: keep its plan
                params = self._all_params()
                # The plan gets a function of the group alone: a bound method would tie it back to
                # self, a cycle that only the garbage collector frees (a dropped SGG held its memory).
                decoupled = partial(_decoupled_weight_decay, isinstance(self.optimizer, torch.optim.AdamW))
                self._adam_plan = fused_steps.AdamPlan(next(iter(by_device.values())), params, self.state, decoupled)
                if self._adam_plan.step(params):
                    return
                self._adam_plan = None  # unequal step counts in one launch group: cannot happen when built
            for items in by_device.values():
                fused_steps.fused_steps(steps, items, self._decoupled)
            active = [(g, p) for g, p in active if id(p) not in done]
        for group, p in active:
            if p.grad.is_sparse:
                raise RuntimeError("SGG does not support sparse gradients")
            steps.moments(group, p, self.state[p], self._decoupled(group))
        statistics = {p: partial(steps.statistic, group, p, self.state[p]) for group, p in active if self._eligible(p)}
        if recluster:
            self._recluster(statistics)
        for group, p in active:
            scale = partial(self._element_scale, p, statistics[p]) if p in statistics else None
            steps.apply(group, p, self.state[p], scale)

    def _fused_view(self, group: dict, p: Tensor) -> tuple[Tensor, dict] | None:
        """(parameter, state) as the fused kernels take them: plain tensors.

        A DTensor parameter's AdamW step is elementwise, so its local shard (with the local
        gradient and state, views of the same storage) takes the fused step; LAMB's trust ratio
        and Adafactor's factored moments need whole-tensor reductions, so they take the
        reference path on the DTensors.
        """
        if not D.is_dtensor(p):
            return p, self.state[p]
        if self._steps is not AdamSteps or p.grad is None:
            return None
        state = self.state[p]
        if not state:
            AdamSteps.init_state(group, p, state)
        shard = p.to_local()
        shard.grad = p.grad.to_local()
        return shard, {key: D.local(value) for key, value in state.items()}

    def _generic_step(self, recluster: bool) -> None:
        # Spec: p <- p_before + S[C] * (p_after_base - p_before). The statistic
        # is the base's exp_avg, else its momentum_buffer, else the step itself.
        active = [p for g in self.param_groups for p in g["params"] if p.grad is not None and self._eligible(p)]
        before = {p: p.detach().clone() for p in active}
        self.optimizer.step()

        def statistic(p: Tensor) -> Tensor:
            moment = _moment_buffer(self.state.get(p, {}))
            return p - before[p] if moment is None else moment

        statistics = {p: partial(statistic, p) for p in active}
        if recluster:
            self._recluster(statistics)
        for p in active:
            scale = self._element_scale(p, statistics[p])
            if scale is not None:
                p.copy_(before[p] + (p - before[p]) * scale)

    def _fit_thresholds(self, rows: Tensor, kernels: bool) -> Tensor:
        """[L, K-1] thresholds for sorted work rows [L, n]."""
        signed = self.cluster_on == "signed"
        if self.backend == "sklearn":
            return torch.stack([kmeans_1d_sklearn(row if signed else row.abs(), self.n_clusters) for row in rows])
        return F.kmeans_1d_rows(rows, self.n_clusters, signed=signed, kernels=kernels)

    # Rows of one work size are stacked and sorted together, at most this many values at a time.
    ROWS_BATCH_ELEMENTS = 2**27

    def _recluster(self, statistics: dict[Tensor, Callable[[], Tensor]]) -> None:
        """Algorithm 1's re-clustering step over every eligible layer stepped now.

        Each layer's work set (all its values, or a uniform sample above
        ``exact_limit``) is a row; rows of one size are sorted together and
        clustered, and their group medians found, in one batch
        (:func:`.functional.kmeans_1d_rows`, :func:`.functional.rows_cluster_mda`).
        Every element then gets its id in one pass, and the model-wide median is
        exact over all elements (:func:`.functional.deviation_median`). The scaling
        rule (:mod:`.scaling`) then moves every layer's scales, a device at a time.
        """
        self._adam_plan = None  # new ids, thresholds and scale tensors
        if not statistics:
            return
        if self.rule == "mean_ratio":
            self._recluster_mean_ratio(statistics)
            return
        params = list(statistics)
        stats = [statistics[p]().detach() for p in params]
        # Under FSDP2 the statistics are DTensors: every rank holds a shard of each. The rows
        # below are then the full tensors, gathered a batch at a time, so thresholds, means,
        # group medians and sizes are exactly a single process's; ids are assigned to the local
        # shard, and the model-wide median sums its histograms over the ranks (docs/sgg.md).
        sharded = any(D.is_dtensor(x) for x in stats)
        values = [D.local(x).float().reshape(-1).contiguous() for x in stats]
        numels = [x.numel() for x in stats]  # of the full tensors
        means = [None if sharded else x.mean() for x in values]
        signed = self.cluster_on == "signed"
        # The one choice of path, per device: Triton kernels or torch ops, for every function below.
        kernels = {x.device: kernels_for(x.device) for x in values}
        by_size: dict[tuple[torch.device, int], list[int]] = {}
        for i, x in enumerate(values):
            size = numels[i] if numels[i] <= self.exact_limit else self.sample_size
            by_size.setdefault((x.device, size), []).append(i)
        thresholds, mda, counts = [None] * len(params), [None] * len(params), [None] * len(params)
        for (device, size), members in by_size.items():
            per_batch = max(1, self.ROWS_BATCH_ELEMENTS // size)
            for start in range(0, len(members), per_batch):
                batch = members[start:start + per_batch]
                whole = {i: self._whole(stats[i]) for i in batch} if sharded else {i: values[i] for i in batch}
                if sharded:
                    for i in batch:
                        means[i] = whole[i].mean()
                rows = self._sorted_rows([whole[i] for i in batch], batch, size)
                fitted = self._fit_thresholds(rows, kernels[device])
                medians, sizes = F.rows_cluster_mda(rows, torch.stack([means[i] for i in batch]), fitted,
                                                    signed=signed, kernels=kernels[device])
                for i, layer_thresholds, layer_mda, layer_sizes in zip(batch, fitted.unbind(0), medians.unbind(0),
                                                                       sizes.unbind(0)):
                    thresholds[i], mda[i], counts[i] = layer_thresholds, layer_mda, layer_sizes
                    if sharded and numels[i] > self.exact_limit:  # sizes of the whole layer
                        ids = F.assign_ids(whole[i], layer_thresholds, signed=signed, kernels=kernels[device])
                        counts[i] = F.cluster_sizes(ids, self.n_clusters, kernels=kernels[device])
                del whole, rows
        if sharded:
            pieces = [D.histogram_piece(x, v) for x, v in zip(stats, values)]  # views: no second copy
            global_mda = F.deviation_median(pieces, means, total=sum(numels), reduce=D.histogram_reduce,
                                            kernels=all(kernels.values()))
        else:
            global_mda = F.deviation_median(values, means, kernels=all(kernels.values()))
        # Ids of every layer (frozen), and the whole-layer sizes of sampled layers, in one launch per device.
        sampled = [numels[i] > self.exact_limit and not sharded for i in range(len(params))]
        ids = [None] * len(params)
        needs_ids = [i for i in range(len(params)) if self.assignment == "frozen" or sampled[i]]
        for device, members in self._by_device(needs_ids, values).items():
            # With dynamic ids only the sizes of sampled layers are wanted: no ids are written.
            found, sizes = F.assign_ids_many([values[i] for i in members], torch.stack([thresholds[i] for i in members]),
                                             signed=signed, sizes=[sampled[i] for i in members],
                                             ids=self.assignment == "frozen", kernels=kernels[device])
            for i, layer_ids, layer_sizes in zip(members, found, sizes):
                ids[i] = layer_ids
                if sampled[i]:  # sizes of the whole layer, not of its sample
                    counts[i] = layer_sizes
        # The scaling rule (the paper's, Eq. 6-7) for all layers of a device at once: [L, K] tensors.
        for device, members in self._by_device(range(len(params)), values).items():
            old = [self._layers.get(params[i], {}).get("cluster_scales") for i in members]
            previous = torch.stack([torch.ones(self.n_clusters, device=device) if s is None else s for s in old])
            updated = mda_scales(previous, global_mda.to(device), torch.stack([mda[i] for i in members]),
                                 torch.stack([counts[i] for i in members]), scale_bounds=self.scale_bounds,
                                 eps=self.eps, beta3=self.beta3)
            scales = [torch.empty_like(row) for row in updated]  # a tensor of its own per layer, as before
            torch._foreach_copy_(scales, list(updated.unbind(0)))
            for i, layer_scales in zip(members, scales):
                p = params[i]
                layer = self._layers.setdefault(p, {})
                self._placeholders.discard(p)
                layer["cluster_scales"] = layer_scales
                if self.assignment == "frozen":
                    layer["cluster_ids"] = ids[i].view(D.local(p).shape)
                else:
                    layer["thresholds"] = thresholds[i]
        self.global_mda = float(global_mda)

    def _recluster_mean_ratio(self, statistics: dict[Tensor, Callable[[], Tensor]]) -> None:
        """The authors' re-clustering, a layer at a time: ids from |m|, then :func:`.scaling.mean_ratio_scales`.

        Under FSDP2 a layer's statistic is a DTensor: its full |m| is all-gathered, so thresholds, cluster
        sums, sizes and the layer mean are a single process's on every rank, and each rank gives its own
        shard its ids (an element's id depends on its value and the thresholds alone).
        """
        for index, (p, statistic) in enumerate(statistics.items()):
            stat = statistic().detach()
            local = D.local(stat).float().reshape(-1).abs()
            magnitude = self._whole(stat).abs() if D.is_dtensor(stat) else local
            layer = self._layers.setdefault(p, {})
            self._placeholders.discard(p)
            if self.backend == "sklearn":  # never sharded (refused at construction)
                ids = local_ids = carried_kmeans_ids(layer, magnitude, self.n_clusters)
            else:
                # As for the paper's rule, a layer above exact_limit is fitted on a uniform sample;
                # every element then gets its id, and the means below are the whole layer's.
                row = (magnitude.sort().values[None] if magnitude.numel() <= self.exact_limit
                       else self._work_rows([magnitude], [index], self.sample_size).sort(dim=1).values)
                thresholds = F.kmeans_1d_rows(row, self.n_clusters, signed=True,
                                              kernels=kernels_for(magnitude.device))[0]
                ids = assign_clusters(magnitude, thresholds).to(torch.uint8)
                local_ids = ids if local is magnitude else assign_clusters(local, thresholds).to(torch.uint8)
            k = self.n_clusters
            counts = torch.zeros(k, device=magnitude.device).index_add_(0, ids.long(), torch.ones_like(magnitude))
            sums = torch.zeros(k, device=magnitude.device).index_add_(0, ids.long(), magnitude)
            ones = torch.ones(k, device=magnitude.device)
            layer["cluster_scales"], layer["cluster_means"] = mean_ratio_scales(
                layer.get("cluster_scales", ones), layer.get("cluster_means", ones), magnitude.mean(), sums, counts,
                mean_decay=self.mean_decay, beta3=self.beta3, scale_bounds=self.scale_bounds, eps=self.eps)
            layer["cluster_ids"] = local_ids.to(torch.uint8).view(D.local(p).shape)

    @staticmethod
    def _by_device(indices, tensors: list[Tensor]) -> dict[torch.device, list[int]]:
        groups: dict[torch.device, list[int]] = {}
        for i in indices:
            groups.setdefault(tensors[i].device, []).append(i)
        return groups

    @staticmethod
    def _whole(statistic: Tensor) -> Tensor:
        """The full statistic as one flat float32 row (an all-gather when it is sharded)."""
        return D.full(statistic).float().reshape(-1).contiguous()

    def _sorted_rows(self, xs: list[Tensor], indices: list[int], size: int) -> Tensor:
        """[len(xs), size]: :meth:`_work_rows` sorted along each row.

        Rows of whole layers are sorted straight from each layer into its row: torch sorts rows of a
        million values or more one at a time anyway (the same radix sort, so the same values), and
        sorting the rows of a stacked batch would copy the batch and make int64 indices for all of
        it; here one row's indices are made, and reused.
        """
        if any(x.numel() > self.exact_limit for x in xs):
            return self._work_rows(xs, indices, size).sort(dim=1).values
        rows = xs[0].new_empty(len(xs), size)
        order = torch.empty(size, dtype=torch.long, device=rows.device)
        for row, x in zip(rows, xs):
            torch.sort(x, out=(row, order))
        return rows

    def _work_rows(self, xs: list[Tensor], indices: list[int], size: int) -> Tensor:
        """[len(xs), size]: each layer's values, or above ``exact_limit`` a seeded uniform sample of them.

        A sample is drawn straight into its row (index_select with out=; one generator, re-seeded
        per layer, gives the same indices as a generator per layer): no copy of the batch by
        torch.stack, and fewer small ops per layer for the host to launch.
        """
        rows = xs[0].new_empty(len(xs), size)
        generator = torch.Generator(device=xs[0].device)
        for row, x, index in zip(rows, xs, indices):
            if x.numel() <= self.exact_limit:
                row.copy_(x)
                continue
            generator.manual_seed(self.seed * 1_000_003 + self._sgg_step * 7919 + index)
            torch.index_select(x, 0, torch.randint(x.numel(), (size,), generator=generator, device=x.device), out=row)
        return rows
