"""SGG: Scaling with Gradient Grouping (Li et al., ACL 2025, arXiv 2506.01049).

The wrapper is bookkeeping: it counts steps, decides when to re-cluster, keeps
each layer's cluster ids (or thresholds) and scales, and hands tensors to the
pure functions in :mod:`.functional` (what the clusters and scales are) and
:mod:`.steps` (how the base optimizer's step is scaled). docs/sgg.md explains
the algorithm and every decision.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed as D
from . import functional as F
from . import fused as fused_steps
from .lamb import Lamb
from .steps import AdafactorSteps, AdamSteps, LambSteps

__all__ = ["SGG"]

CLUSTER_ON = ("abs", "signed")
ASSIGNMENTS = ("frozen", "dynamic")
BACKENDS = ("torch", "sklearn")
MAX_CLUSTERS = 256  # frozen ids are stored as uint8


def _steps_for(optimizer: Optimizer):
    """The split step of a known base optimizer, or None for the generic path."""
    kind = type(optimizer)
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        return AdamSteps
    if kind is Lamb:
        return LambSteps
    hf = sys.modules.get("transformers.optimization")
    if hf is not None and kind is getattr(hf, "Adafactor", None):
        return AdafactorSteps
    return None


def _eligible(p: Tensor) -> bool:
    # Appendix A: only matrices (and higher) are grouped; norms and biases never.
    return p.requires_grad and p.ndim >= 2


def _decoupled_weight_decay(adamw: bool, group: dict) -> bool:
    return group.get("decoupled_weight_decay", adamw)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(n_clusters, recluster_interval, beta3, scale_bounds, eps, cluster_on, assignment, backend,
              exact_limit, sample_size, fused, seed=0) -> tuple[float, float]:
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

    ``param_groups`` and ``state`` are the base optimizer's own objects, so LR
    schedulers, gradient clipping and checkpointing see a normal optimizer.
    """

    def __init__(self, optimizer: Optimizer, n_clusters: int = 3, recluster_interval: int = 500,
                 beta3: float = 0.99, scale_bounds: tuple[float, float] = (0.1, 10.0), eps: float = 1e-8, *,
                 cluster_on: str = "abs", assignment: str = "frozen", backend: str = "torch",
                 exact_limit: int = 2**22, sample_size: int = 2**20, seed: int = 0, fused: bool = True):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"SGG wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, SGG):
            raise TypeError("SGG cannot wrap another SGG")
        self.scale_bounds = _validate(n_clusters, recluster_interval, beta3, scale_bounds, eps, cluster_on,
                                      assignment, backend, exact_limit, sample_size, fused, seed)
        self.n_clusters, self.recluster_interval, self.beta3, self.eps = n_clusters, recluster_interval, beta3, eps
        self.cluster_on, self.assignment, self.backend = cluster_on, assignment, backend
        self.exact_limit, self.sample_size, self.seed = exact_limit, sample_size, seed
        self.fused = fused
        self.optimizer = optimizer
        self._steps = _steps_for(optimizer)
        for group in optimizer.param_groups:
            self._check_group(group)
        self._wrapping = True
        # Optimizer.__init__ installs the hooks and step accounting that LR
        # schedulers rely on; the groups and state are then the base's own.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._wrapping = False
        self.param_groups, self.state, self.defaults = optimizer.param_groups, optimizer.state, optimizer.defaults
        self._layers: dict[Tensor, dict[str, Tensor]] = {}  # under FSDP2: ids of this rank's shard
        self._placeholders: set[Tensor] = set()  # layers made by distributed.prepare_state_for_load
        self._sgg_step = 0
        self.global_mda: float | None = None
        # The fused AdamW step's launches (fused.AdamPlan), kept between re-clusterings. Dropped
        # wherever ids, scales or state are replaced: _recluster, load_state_dict, add_param_group
        # (and distributed's load templates); a moved gradient or parameter is caught by its check.
        self._adam_plan: fused_steps.AdamPlan | None = None

    # ----------------------------------------------------------------- public API
    def cluster_ids(self, p: Tensor) -> Tensor | None:
        """Cluster id of every element of ``p`` (LongTensor shaped like ``p``).

        None before the first re-clustering of ``p`` or when ``p`` is not grouped.
        For a sharded (DTensor) ``p`` a DTensor laid out like ``p``: ``.full_tensor()`` gives all ids.
        """
        layer = self._layers.get(p)
        if layer is None or not _eligible(p) or p in self._placeholders:
            return None
        if self.assignment == "frozen":
            return D.like(layer["cluster_ids"].long(), p)
        statistic = self._current_statistic(p)
        if statistic is None:
            return None
        ids = F.assign_clusters(self._clustered_value(D.local(statistic).float()), layer["thresholds"])
        return D.like(ids.long(), p)

    def cluster_scales(self, p: Tensor) -> Tensor | None:
        """The ``n_clusters`` scales of ``p`` (ones until its first re-clustering); None if not grouped."""
        if not _eligible(p):
            return None
        layer = self._layers.get(p)
        if layer is None:
            return torch.ones(self.n_clusters, device=p.device)
        return layer["cluster_scales"].clone()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sgg_step += 1
        recluster = self.n_clusters > 1 and self._sgg_step % self.recluster_interval == 0
        if not recluster and self.global_mda is None:
            self.optimizer.step()  # every scale is still 1: this *is* the SGG step
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

    def __repr__(self) -> str:
        return (f"SGG(n_clusters={self.n_clusters}, recluster_interval={self.recluster_interval}, "
                f"beta3={self.beta3}, scale_bounds={self.scale_bounds}, eps={self.eps}, "
                f"cluster_on={self.cluster_on!r}, assignment={self.assignment!r}, backend={self.backend!r})"
                f" wrapping {self.optimizer!r}")

    # ------------------------------------------------------------------ internals
    def _check_group(self, group: dict) -> None:
        if self._steps is not None:
            self._steps.check_group(group)
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError("SGG does not support complex parameters")

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

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
            ids = F.assign_clusters(self._clustered_value(values.float()), layer["thresholds"])
        # index_select: half the time of advanced indexing on a CPU, the same values.
        scales = layer["cluster_scales"].index_select(0, ids.reshape(-1).int()).view(ids.shape)
        return scales if part is not None else D.like(scales, p)

    def _scale_source(self, p: Tensor) -> fused_steps.ScaleSource | None:
        layer = self._layers.get(p) if _eligible(p) else None
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
        statistics = {p: partial(steps.statistic, group, p, self.state[p]) for group, p in active if _eligible(p)}
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
        active = [p for g in self.param_groups for p in g["params"] if p.grad is not None and _eligible(p)]
        before = {p: p.detach().clone() for p in active}
        self.optimizer.step()

        def statistic(p: Tensor) -> Tensor:
            state = self.state.get(p, {})
            for key in ("exp_avg", "momentum_buffer"):
                if isinstance(state.get(key), Tensor):
                    return state[key]
            return p - before[p]

        statistics = {p: partial(statistic, p) for p in active}
        if recluster:
            self._recluster(statistics)
        for p in active:
            scale = self._element_scale(p, statistics[p])
            if scale is not None:
                p.copy_(before[p] + (p - before[p]) * scale)

    def _fit_thresholds(self, rows: Tensor) -> Tensor:
        """[L, K-1] thresholds for sorted work rows [L, n]."""
        signed = self.cluster_on == "signed"
        if self.backend == "sklearn":
            return torch.stack([F.kmeans_1d_sklearn(row if signed else row.abs(), self.n_clusters) for row in rows])
        return F.kmeans_1d_rows(rows, self.n_clusters, signed=signed)

    # Rows of one work size are stacked and sorted together, at most this many values at a time.
    ROWS_BATCH_ELEMENTS = 2**27

    def _recluster(self, statistics: dict[Tensor, Callable[[], Tensor]]) -> None:
        """Algorithm 1's re-clustering step over every eligible layer stepped now.

        Each layer's work set (all its values, or a uniform sample above
        ``exact_limit``) is a row; rows of one size are sorted together and
        clustered, and their group medians found, in one batch
        (:func:`.functional.kmeans_1d_rows`, :func:`.functional.rows_cluster_mda`).
        Every element then gets its id in one pass, and the model-wide median is
        exact over all elements (:func:`.functional.deviation_median`).
        """
        self._adam_plan = None  # new ids, thresholds and scale tensors
        if not statistics:
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
        by_size: dict[tuple[torch.device, int], list[int]] = {}
        for i, x in enumerate(values):
            size = numels[i] if numels[i] <= self.exact_limit else self.sample_size
            by_size.setdefault((x.device, size), []).append(i)
        thresholds, mda, counts = [None] * len(params), [None] * len(params), [None] * len(params)
        for (_, size), members in by_size.items():
            per_batch = max(1, self.ROWS_BATCH_ELEMENTS // size)
            for start in range(0, len(members), per_batch):
                batch = members[start:start + per_batch]
                whole = {i: self._whole(stats[i]) for i in batch} if sharded else {i: values[i] for i in batch}
                if sharded:
                    for i in batch:
                        means[i] = whole[i].mean()
                rows = self._sorted_rows([whole[i] for i in batch], batch, size)
                fitted = self._fit_thresholds(rows)
                medians, sizes = F.rows_cluster_mda(rows, torch.stack([means[i] for i in batch]), fitted,
                                                    signed=signed)
                for i, layer_thresholds, layer_mda, layer_sizes in zip(batch, fitted.unbind(0), medians.unbind(0),
                                                                       sizes.unbind(0)):
                    thresholds[i], mda[i], counts[i] = layer_thresholds, layer_mda, layer_sizes
                    if sharded and numels[i] > self.exact_limit:  # sizes of the whole layer
                        ids = F.assign_ids(whole[i], layer_thresholds, signed=signed)
                        counts[i] = F.cluster_sizes(ids, self.n_clusters)
                del whole, rows
        if sharded:
            pieces = [D.histogram_piece(x, v) for x, v in zip(stats, values)]  # views: no second copy
            global_mda = F.deviation_median(pieces, means, total=sum(numels), reduce=D.histogram_reduce)
        else:
            global_mda = F.deviation_median(values, means)
        # Ids of every layer (frozen), and the whole-layer sizes of sampled layers, in one launch per device.
        sampled = [numels[i] > self.exact_limit and not sharded for i in range(len(params))]
        ids = [None] * len(params)
        needs_ids = [i for i in range(len(params)) if self.assignment == "frozen" or sampled[i]]
        for members in self._by_device(needs_ids, values).values():
            # With dynamic ids only the sizes of sampled layers are wanted: no ids are written.
            found, sizes = F.assign_ids_many([values[i] for i in members], torch.stack([thresholds[i] for i in members]),
                                             signed=signed, sizes=[sampled[i] for i in members],
                                             ids=self.assignment == "frozen")
            for i, layer_ids, layer_sizes in zip(members, found, sizes):
                ids[i] = layer_ids
                if sampled[i]:  # sizes of the whole layer, not of its sample
                    counts[i] = layer_sizes
        # Eq. 6-7 for all layers of a device at once: [L, K] tensors, a few launches instead of ~10 per layer.
        for device, members in self._by_device(range(len(params)), values).items():
            old = [self._layers.get(params[i], {}).get("cluster_scales") for i in members]
            previous = torch.stack([torch.ones(self.n_clusters, device=device) if s is None else s for s in old])
            target = F.target_scales(global_mda.to(device), torch.stack([mda[i] for i in members]), self.scale_bounds,
                                     self.eps)
            updated = F.ema_scales(previous, target, torch.stack([counts[i] for i in members]), self.beta3)
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
        sorting the rows of a stacked batch first copied the batch and made int64 indices for all of
        it (1.5 GB for 32 rows of 4 Mi); here one row's indices are made, and reused.
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
