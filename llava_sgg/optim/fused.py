"""Fused GPU steps: each base optimizer's update with SGG's per-element scale, one pass per tensor.

:mod:`.steps` is the reference: ``moments`` then ``apply``, a dozen torch ops
per tensor. Where the kernels run (a CUDA device with Triton:
:func:`.launch.kernels_for`) the functions here do the same arithmetic in the
kernels of :mod:`.kernels`, reading every tensor once; the
cluster id of an element is read as one byte (frozen ids) or re-derived from
the K-1 thresholds inside the kernel (dynamic ids), so the scale costs at most
one extra byte per element. Anything these kernels do not cover (CPU tensors,
amsgrad, Adafactor with a first moment or on non-matrix tensors, sparse
gradients) takes the reference path, which the CPU test suite runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .launch import BLOCK, TensorTable, aligned, kernels_for, tensor_table, triton_cdiv
from .steps import AdafactorSteps, AdamSteps, LambSteps

__all__ = ["AdamPlan", "LARGE", "ScaleSource", "supports", "fused_steps"]

TILE_ROWS, TILE_COLS = 32, 128
# AdamW tensors of at least this many elements get a launch of their own (adam_tensor_kernel); the
# smaller ones of a launch group share one multi-tensor launch (adam_kernel). A 4 Mi-element fp32
# step moves 117 MB, far more time in memory traffic than a launch costs, and a launch of its own
# spares each program the multi-tensor kernel's dependent table reads.
LARGE = 1 << 22


@dataclass
class ScaleSource:
    """Where a layer's per-element scale comes from: frozen uint8 ids, or thresholds on the statistic."""

    scales: Tensor
    ids: Tensor | None = None
    thresholds: Tensor | None = None
    abs: bool = True


def supports(steps, group: dict, p: Tensor) -> bool:
    """Whether ``p`` can take the fused step of ``steps`` (else the caller runs the reference path)."""
    if not kernels_for(p.device) or p.grad is None or p.grad.is_sparse or not p.is_contiguous() \
            or not p.grad.is_contiguous():
        return False
    if steps is AdamSteps:
        return not group["amsgrad"]
    if steps is LambSteps:
        return True
    if steps is AdafactorSteps:
        return p.ndim == 2 and group["beta1"] is None
    return False


def _scale_args(source: ScaleSource | None, device) -> tuple:
    """(mode, ids, scales, thresholds, K, abs) for the kernels; unused pointers get a dummy tensor."""
    from .kernels import DYNAMIC, FROZEN, NO_SCALE

    if source is None:
        dummy = torch.empty(1, device=device)
        return NO_SCALE, dummy, dummy, dummy, 1, True
    k = source.scales.numel()
    if source.ids is not None:
        return FROZEN, source.ids, source.scales, source.scales, k, source.abs
    thresholds = source.thresholds.float() if source.thresholds.numel() else source.scales
    return DYNAMIC, source.scales, source.scales, thresholds, k, source.abs


def fused_steps(steps, items: list[tuple[dict, Tensor, dict, ScaleSource | None]], decoupled) -> AdamPlan | None:
    """One fused step of every (group, p, state, scale source) in ``items`` (all on a CUDA device).

    For AdamW, returns the step's :class:`AdamPlan` (over ``items``' parameters, in their order).
    """
    if steps is AdamSteps:
        return _adam(items, decoupled)
    if steps is LambSteps:
        _lamb(items)
    elif steps is AdafactorSteps:
        _adafactor(items)
    else:
        raise ValueError(f"no fused step for {steps!r}")
    return None


def _scalar(x) -> float:
    return float(x) if isinstance(x, Tensor) else x


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _grad_layout(p: Tensor) -> tuple | None:
    """What a plan's launches assume of ``p``'s gradient, its address aside."""
    g = p.grad
    return None if g is None else (g.dtype, g.is_contiguous())


@dataclass
class _AdamEntry:
    """One tensor of an AdamW plan: what a launch needs besides the gradient, which may move."""

    index: int  # position of p in the parameter list the plan was built over
    p: Tensor
    m: Tensor
    v: Tensor
    step: Tensor
    ids: Tensor | None
    scales: Tensor | None
    thresholds: Tensor | None  # a float32 copy where the stored thresholds are not float32

    @property
    def numel(self) -> int:
        return self.p.numel()


@dataclass
class _AdamLaunch:
    """One kernel launch: a multi-tensor launch over a table, or one large tensor (``table`` None)."""

    group: dict
    members: list[int]  # into AdamPlan.entries
    host_steps: list[int]  # into AdamPlan.host_steps, where the step counts live on the host
    mode: int
    k: int
    absolute: bool
    on_device: bool
    aligned: bool
    table: TensorTable | None
    rows: list[tuple[int, ...]] | None = None  # the table's rows: addresses of p, grad, m, v, ids, scales, ...


class AdamPlan:
    """The launches of one fused AdamW step over a fixed set of tensors: built once, replayed every step.

    Building walks every tensor in Python (its launch group, scale source, addresses; the
    device tables of the multi-tensor launches). On a model of a few hundred tensors that walk
    is host time the GPU idles through, since it comes before the first launch.
    Between re-clusterings nothing it depends on changes except, at most, the addresses of the
    gradients and the hyper-parameters (an LR schedule). Gradients move at most steps of a real
    run: Trainer frees them (``zero_grad(set_to_none=True)``) and the backward pass allocates them
    again, among activations of another batch's size. So a step from the plan compares the
    parameters' addresses, and which gradients exist with their dtypes and layout, with those it
    was built on (no launch when one differs: the caller builds a new plan); moved gradients only
    re-point its tables' gradient column, an upload of a few numbers per launch. It then reads each
    launch's hyper-parameters from its param group, and launches. The owner drops the plan whenever
    the state or the scales are replaced (re-clustering, ``load_state_dict``,
    ``add_param_group``); a base optimizer's state dict replaced as a whole is caught too, a
    single state tensor swapped by hand is not.

    Launches follow the param groups (a group's ``lr`` may change at every step), the scale
    mode, the dtypes and, for step counts kept on the host, the count; tensors of at least
    :data:`LARGE` elements get a launch each (:func:`kernels.adam_tensor_kernel`), the rest of a
    launch group one multi-tensor launch (:func:`kernels.adam_kernel`).
    """

    def __init__(self, items, params: list[Tensor], state, decoupled):
        from .kernels import DYNAMIC, FROZEN, NO_SCALE

        self.decoupled, self.state = decoupled, state
        self.ids = [id(p) for p in params]
        position = {id(p): i for i, p in enumerate(params)}
        for group, p, st, _ in items:
            if not st:
                AdamSteps.init_state(group, p, st)
        self.device_steps = [st["step"] for _, _, st, _ in items if st["step"].device.type != "cpu"]
        self.host_steps = [st["step"] for _, _, st, _ in items if st["step"].device.type == "cpu"]
        host_values = iter(torch.stack(self.host_steps).tolist() if self.host_steps else ())
        self.entries: list[_AdamEntry] = []
        groups: dict[tuple, _AdamLaunch] = {}
        host_index = 0
        for group, p, st, source in items:
            step_t, m, v = st["step"], st["exp_avg"], st["exp_avg_sq"]
            on_device = step_t.device.type != "cpu"
            count = None if on_device else next(host_values)
            ids = scales = thresholds = None
            mode, k, absolute = NO_SCALE, 1, True
            if source is not None:
                scales, k, absolute = source.scales.float(), source.scales.numel(), source.abs
                if source.ids is not None:
                    mode, ids = FROZEN, source.ids
                else:
                    mode = DYNAMIC
                    thresholds = source.thresholds.float() if source.thresholds.numel() else scales
            entry = _AdamEntry(position[id(p)], p, m, v, step_t, ids, scales, thresholds)
            self.entries.append(entry)
            is_aligned = aligned((p.data_ptr(), p.grad.data_ptr(), m.data_ptr(), v.data_ptr(), _address(ids)))
            large = p.numel() >= LARGE
            key = (id(group), mode, k, absolute, on_device, count, is_aligned, p.dtype, p.grad.dtype, m.dtype,
                   v.dtype, step_t.dtype, len(self.entries) if large else None)
            launch = groups.get(key)
            if launch is None:
                launch = groups[key] = _AdamLaunch(group, [], [], mode, k, absolute, on_device, is_aligned, None)
            launch.members.append(len(self.entries) - 1)
            if not on_device:
                launch.host_steps.append(host_index)
                host_index += 1
        self.launches = list(groups.values())
        # Addresses only: a table, a device tensor, holds no reference to the gradients, which
        # zero_grad(set_to_none=True) must be able to free.
        self.param_addresses = [p.data_ptr() for p in params]
        self.grad_layouts = [_grad_layout(p) for p in params]
        self.grad_addresses = [_address(p.grad) for p in params]
        for launch in self.launches:
            members = [self.entries[i] for i in launch.members]
            if members[0].numel >= LARGE:
                continue
            launch.rows = [(e.p.data_ptr(), e.p.grad.data_ptr(), e.m.data_ptr(), e.v.data_ptr(), _address(e.ids),
                            _address(e.scales), _address(e.thresholds), e.step.data_ptr() if launch.on_device else 0)
                           for e in members]
            launch.table = tensor_table(launch.rows, [e.numel for e in members], BLOCK, members[0].p.device)
        self.launches = [launch for launch in self.launches if launch.table is None or launch.table.programs]

    def matches(self, params: list[Tensor], state) -> bool:
        """Whether the plan still describes ``params``: the same tensors at the same addresses, with gradients
        where it had them, of the same dtypes and layout (their addresses may have moved: :meth:`step`)."""
        if state is not self.state or [id(p) for p in params] != self.ids:
            return False
        return [p.data_ptr() for p in params] == self.param_addresses \
            and [_grad_layout(p) for p in params] == self.grad_layouts

    def _repoint(self, params: list[Tensor], grads: list[int]) -> bool:
        """Point the tables' gradient column at the gradients' new addresses; False where a launch built for
        16-byte loads would get a gradient that does not allow them (the caller then builds a new plan)."""
        for launch in self.launches:
            if launch.table is None:  # a launch of its own reads the gradient from params at each step
                continue
            members = [self.entries[i] for i in launch.members]
            if launch.aligned and not aligned(grads[e.index] for e in members):
                return False
            launch.rows = [(row[0], grads[e.index], *row[2:]) for row, e in zip(launch.rows, members)]
            launch.table = tensor_table(launch.rows, [e.numel for e in members], BLOCK, members[0].p.device)
        self.grad_addresses = grads
        return True

    def step(self, params: list[Tensor]) -> bool:
        """One AdamW step of every tensor of the plan; False, with nothing done, when it no longer matches.

        ``params`` is the parameter list the plan was built over, in the same order.
        """
        grads = [_address(p.grad) for p in params]
        if grads != self.grad_addresses and not self._repoint(params, grads):
            return False
        counts = None
        if self.host_steps:  # the counts after this step's increment, as float32 computes them
            counts = (torch.stack(self.host_steps) + 1).tolist()
            if any(len({counts[i] for i in launch.host_steps}) > 1 for launch in self.launches):
                return False
        if self.device_steps:
            torch._foreach_add_(self.device_steps, 1.0)
        if self.host_steps:
            torch._foreach_add_(self.host_steps, 1.0)
        self._launch(params, counts)
        return True

    def _launch(self, params, counts) -> None:
        from .kernels import adam_kernel, adam_tensor_kernel

        hyper: dict[int, tuple] = {}
        for launch in self.launches:
            group = launch.group
            values = hyper.get(id(group))
            if values is None:
                beta1, beta2 = (_scalar(b) for b in group["betas"])
                values = hyper[id(group)] = (_scalar(group["lr"]), beta1, beta2, float(group["eps"]),
                                             float(group["weight_decay"]), -1.0 if group["maximize"] else 1.0,
                                             self.decoupled(group))
            lr, beta1, beta2, eps, weight_decay, sign, decoupled = values
            if launch.on_device:
                step_size, bc2_sqrt = 0.0, 1.0
            else:
                count = counts[launch.host_steps[0]]
                step_size, bc2_sqrt = lr / (1 - beta1**count), (1 - beta2**count) ** 0.5
            if launch.table is None:
                e = self.entries[launch.members[0]]
                p = e.p
                adam_tensor_kernel[(triton_cdiv(e.numel, BLOCK),)](
                    p, params[e.index].grad, e.m, e.v, p if e.ids is None else e.ids,
                    p if e.scales is None else e.scales, p if e.thresholds is None else e.thresholds,
                    e.step if launch.on_device else p, e.numel, lr, beta1, beta2, eps, weight_decay, sign, step_size,
                    bc2_sqrt, DECOUPLED=decoupled, MODE=launch.mode, K=launch.k, ABS=launch.absolute,
                    STEP_ON_DEVICE=launch.on_device, BLOCK=BLOCK)
                continue
            e, table = self.entries[launch.members[0]], launch.table
            adam_kernel[(table.programs,)](
                table.addresses, table.numels, table.block_tensor, table.first_block, e.p, params[e.index].grad, e.m,
                e.v, e.step if launch.on_device else e.p, lr, beta1, beta2, eps, weight_decay, sign, step_size,
                bc2_sqrt, DECOUPLED=decoupled, MODE=launch.mode, K=launch.k, ABS=launch.absolute,
                STEP_ON_DEVICE=launch.on_device, ALIGNED=launch.aligned, BLOCK=BLOCK)


def _adam(items, decoupled) -> AdamPlan:
    """One fused AdamW step of ``items``; returns its plan, which later steps of the same tensors may replay."""
    params = [p for _, p, _, _ in items]
    plan = AdamPlan(items, params, None, decoupled)
    plan.step(params)
    return plan


def _lamb(items) -> None:
    from .kernels import lamb_apply_kernel, lamb_moments_kernel

    norms = torch.zeros(len(items), 2, device=items[0][1].device)
    for i, (group, p, state, _) in enumerate(items):
        if not state:
            LambSteps.init_state(group, p, state)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        n = p.numel()
        lamb_moments_kernel[(triton_cdiv(n, BLOCK),)](
            p, p.grad, state["exp_avg"], state["exp_avg_sq"], norms[i], n, beta1, beta2, group["eps"],
            group["weight_decay"], 1 - beta1**step, 1 - beta2**step, BLOCK=BLOCK)
    for i, (group, p, state, source) in enumerate(items):
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        mode, ids, scales, thresholds, k, absolute = _scale_args(source, p.device)
        clamp = group["clamp_value"]
        n = p.numel()
        lamb_apply_kernel[(triton_cdiv(n, BLOCK),)](
            p, state["exp_avg"], state["exp_avg_sq"], ids, scales, thresholds, norms[i], n, group["lr"],
            group["eps"], group["weight_decay"], 1 - beta1**step, 1 - beta2**step,
            0.0 if clamp is None else clamp, MODE=mode, K=k, ABS=absolute, CLAMP=clamp is not None,
            BLOCK=BLOCK)


def _adafactor(items) -> None:
    from .kernels import adafactor_apply_kernel, adafactor_norms_kernel, adafactor_sq_sums_kernel

    device = items[0][1].device
    for group, p, state, _ in items:
        AdafactorSteps.init_state(group, p, state)
        state["step"] += 1
    sizes = [(p.shape[0], p.shape[1]) for _, p, _, _ in items]
    sq_sums = torch.zeros(sum(r + c for r, c in sizes), device=device).split([x for rc in sizes for x in rc])
    row_sums, col_sums = list(sq_sums[0::2]), list(sq_sums[1::2])
    for (group, p, _, _), row, col, (r, c) in zip(items, row_sums, col_sums, sizes):
        grid = (triton_cdiv(r, TILE_ROWS), triton_cdiv(c, TILE_COLS))
        adafactor_sq_sums_kernel[grid](p.grad, row, col, r, c, group["eps"][0], BR=TILE_ROWS, BC=TILE_COLS)
    # The moments of all tensors with one launch per operation (transformers' Adafactor: per tensor).
    by_rate: dict[float, list[int]] = {}
    for i, (group, _, state, _) in enumerate(items):
        by_rate.setdefault(1.0 - math.pow(state["step"], group["decay_rate"]), []).append(i)
    for beta2t, index in by_rate.items():
        rows = [items[i][2]["exp_avg_sq_row"] for i in index]
        cols = [items[i][2]["exp_avg_sq_col"] for i in index]
        torch._foreach_mul_(rows, beta2t)
        torch._foreach_mul_(cols, beta2t)
        torch._foreach_add_(rows, torch._foreach_div([row_sums[i] for i in index], [sizes[i][1] for i in index]),
                            alpha=1.0 - beta2t)
        torch._foreach_add_(cols, torch._foreach_div([col_sums[i] for i in index], [sizes[i][0] for i in index]),
                            alpha=1.0 - beta2t)
    rows = [state["exp_avg_sq_row"] for _, _, state, _ in items]
    row_means = torch._foreach_div(torch._foreach_norm(rows, 1), [r for r, _ in sizes])
    r_factors = torch._foreach_rsqrt(torch._foreach_div(rows, row_means))
    c_factors = torch._foreach_rsqrt([state["exp_avg_sq_col"] for _, _, state, _ in items])
    sums = torch.zeros(len(items), 2, device=device)
    for i, ((group, p, _, _), (r, c)) in enumerate(zip(items, sizes)):
        grid = (triton_cdiv(r, TILE_ROWS), triton_cdiv(c, TILE_COLS))
        adafactor_norms_kernel[grid](p.grad, p, r_factors[i], c_factors[i], sums[i], r, c,
                                     WITH_P=group["scale_parameter"], BR=TILE_ROWS, BC=TILE_COLS)
    for i, ((group, p, state, source), (r, c)) in enumerate(zip(items, sizes)):
        lr = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(state["step"]))
        mode, ids, scales, thresholds, k, absolute = _scale_args(source, p.device)
        grid = (triton_cdiv(r, TILE_ROWS), triton_cdiv(c, TILE_COLS))
        adafactor_apply_kernel[grid](
            p.grad, p, r_factors[i], c_factors[i], sums[i], ids, scales, thresholds, r, c, r * c, lr,
            group["weight_decay"], group["clip_threshold"], group["eps"][1], MODE=mode, K=k, ABS=absolute,
            SCALE_PARAM=group["scale_parameter"], P_NORM=not group["scale_parameter"], BR=TILE_ROWS,
            BC=TILE_COLS)
    rms = sums[:, 1].sqrt() / torch.tensor([float(r * c) for r, c in sizes], device=device).sqrt()
    for (_, _, state, _), value in zip(items, rms.unbind()):
        state["RMS"] = value

