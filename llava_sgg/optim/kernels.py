"""Triton kernels for SGG's GPU paths: fused optimizer updates and one-pass re-clustering work.

Written by hand because no library fuses SGG's per-element scale S_l[C_l(i)]
into an optimizer update: torch's fused AdamW, transformers' Adafactor and
timm's Lamb all step without it, and multiplying afterwards costs a second
pass over every tensor (the step is memory-bound, so a second pass is a
second step). Each kernel reads every tensor once and keeps the arithmetic of
:mod:`.steps` (the reference path), in float32 whatever the storage dtype.

Import this module only where a kernel may run: :func:`.launch.kernels_for`
decides that, and elsewhere the callers run the reference path.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Scale modes: no scale, frozen uint8 ids, ids re-derived from thresholds.
NO_SCALE, FROZEN, DYNAMIC = 0, 1, 2


@triton.jit
def _scale_of(stat, ids_ptr, scales_ptr, thr_ptr, offs, mask, MODE: tl.constexpr, K: tl.constexpr,
              ABS: tl.constexpr):
    """S[C(i)]: from stored ids, or from the thresholds (id = thresholds strictly below the value)."""
    if MODE == 1:
        ids = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        value = tl.abs(stat) if ABS else stat
        ids = tl.zeros(value.shape, dtype=tl.int32)
        for j in tl.static_range(K - 1):
            ids += (value > tl.load(thr_ptr + j)).to(tl.int32)
    return tl.load(scales_ptr + ids, mask=mask, other=1.0)


# Columns of the address table that the multi-tensor Adam kernel reads, one row per tensor.
ADAM_COLUMNS = ("param", "grad", "exp_avg", "exp_avg_sq", "ids", "scales", "thresholds", "step")


@triton.jit
def _tensor_and_block(block_tensor_ptr, first_block_ptr):
    """Which tensor of a multi-tensor launch this program works on, and which of its blocks."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)
    return t, pid - tl.load(first_block_ptr + t)


@triton.jit
def adam_kernel(addr_ptr, numel_ptr, block_tensor_ptr, first_block_ptr, p_like, g_like, m_like, v_like, step_like,
                lr, beta1, beta2, eps, weight_decay, grad_sign, step_size, bc2_sqrt,
                DECOUPLED: tl.constexpr, MODE: tl.constexpr, K: tl.constexpr, ABS: tl.constexpr,
                STEP_ON_DEVICE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """AdamW over many tensors in one launch, as torch's fused AdamW does (multi_tensor_apply).

    Row t of the address table holds tensor t's addresses (:data:`ADAM_COLUMNS`);
    the ``*_like`` arguments are tensors of the launch's dtypes, so the addresses
    become typed pointers. One launch per step instead of one per tensor: a
    LoRA model has hundreds of small tensors, and launches, not bytes, bounded
    a per-tensor loop. ALIGNED: every address is a multiple of 16 bytes (the
    caller checks), which a pointer read from memory cannot tell the compiler,
    and without which it loads one element at a time.
    """
    t, block = _tensor_and_block(block_tensor_ptr, first_block_ptr)
    row = addr_ptr + t * 8
    p_ptr = tl.load(row).to(p_like.dtype)
    g_ptr = tl.load(row + 1).to(g_like.dtype)
    m_ptr = tl.load(row + 2).to(m_like.dtype)
    v_ptr = tl.load(row + 3).to(v_like.dtype)
    ids_ptr = tl.load(row + 4).to(tl.pointer_type(tl.uint8))
    if ALIGNED:  # here, not in a helper: the hint does not survive a call
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        ids_ptr = tl.multiple_of(ids_ptr, 16)
    scales_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    thr_ptr = tl.load(row + 6).to(tl.pointer_type(tl.float32))
    n = tl.load(numel_ptr + t)
    if STEP_ON_DEVICE:  # fused/foreach AdamW keep `step` on the device: no host sync for it
        step = tl.load(tl.load(row + 7).to(step_like.dtype)).to(tl.float32)
        step_size = lr / (1.0 - tl.exp2(step * tl.log2(beta1)))
        bc2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(step * tl.log2(beta2)))
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # A size read from memory tells the compiler nothing, so `offs < n` would keep every load one
    # element wide; whole blocks (all but each tensor's last) take a constant mask instead.
    if (block + 1) * BLOCK <= n:
        _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, ids_ptr, scales_ptr, thr_ptr, offs, tl.full((BLOCK,), 1, tl.int1),
                     lr, beta1, beta2, eps, weight_decay, grad_sign, step_size, bc2_sqrt, DECOUPLED, MODE, K, ABS)
    else:
        _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, ids_ptr, scales_ptr, thr_ptr, offs, offs < n,
                     lr, beta1, beta2, eps, weight_decay, grad_sign, step_size, bc2_sqrt, DECOUPLED, MODE, K, ABS)


@triton.jit
def adam_tensor_kernel(p_ptr, g_ptr, m_ptr, v_ptr, ids_ptr, scales_ptr, thr_ptr, step_ptr, n,
                       lr, beta1, beta2, eps, weight_decay, grad_sign, step_size, bc2_sqrt,
                       DECOUPLED: tl.constexpr, MODE: tl.constexpr, K: tl.constexpr, ABS: tl.constexpr,
                       STEP_ON_DEVICE: tl.constexpr, BLOCK: tl.constexpr):
    """AdamW over one tensor, the same update as :func:`adam_kernel` with the addresses as arguments.

    For large tensors: a launch costs nothing next to their bytes, and the
    programs start loading data at once, where the multi-tensor kernel first
    makes three dependent table reads.
    Triton specializes on the arguments' 16-byte alignment and on n, so the
    loads are wide without hints.
    """
    if STEP_ON_DEVICE:
        step = tl.load(step_ptr).to(tl.float32)
        step_size = lr / (1.0 - tl.exp2(step * tl.log2(beta1)))
        bc2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(step * tl.log2(beta2)))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, ids_ptr, scales_ptr, thr_ptr, offs, offs < n,
                 lr, beta1, beta2, eps, weight_decay, grad_sign, step_size, bc2_sqrt, DECOUPLED, MODE, K, ABS)


@triton.jit
def _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, ids_ptr, scales_ptr, thr_ptr, offs, mask, lr, beta1, beta2, eps,
                 weight_decay, grad_sign, step_size, bc2_sqrt, DECOUPLED: tl.constexpr, MODE: tl.constexpr,
                 K: tl.constexpr, ABS: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * grad_sign
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = m + (1.0 - beta1) * (g - m)  # lerp_(grad, 1 - beta1)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    denom = tl.sqrt_rn(v) / bc2_sqrt + eps
    update = m
    if MODE != 0:
        update = m * _scale_of(m, ids_ptr, scales_ptr, thr_ptr, offs, mask, MODE, K, ABS)
    p = p - step_size * tl.div_rn(update, denom)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lamb_moments_kernel(p_ptr, g_ptr, m_ptr, v_ptr, norms_ptr, n, beta1, beta2, eps, weight_decay, bc1, bc2,
                        BLOCK: tl.constexpr):
    """Pass 1 of LAMB: moments, and the squared norms of the unscaled update r and of w."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32) * beta1 + (1.0 - beta1) * g
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) * beta2 + (1.0 - beta2) * (g * g)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    r = tl.div_rn(m / bc1, tl.sqrt_rn(v / bc2) + eps) + weight_decay * p
    r = tl.where(mask, r, 0.0)
    tl.atomic_add(norms_ptr, tl.sum(r * r, axis=0))
    tl.atomic_add(norms_ptr + 1, tl.sum(p * p, axis=0))


@triton.jit
def lamb_apply_kernel(p_ptr, m_ptr, v_ptr, ids_ptr, scales_ptr, thr_ptr, norms_ptr, n, lr, eps, weight_decay,
                      bc1, bc2, clamp_value, MODE: tl.constexpr, K: tl.constexpr, ABS: tl.constexpr,
                      CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2 of LAMB: w <- w - lr * trust * S[C] * r, the trust ratio from the unscaled r."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    r = tl.div_rn(m / bc1, tl.sqrt_rn(v / bc2) + eps) + weight_decay * p
    update_norm = tl.sqrt_rn(tl.load(norms_ptr))
    weight_norm = tl.sqrt_rn(tl.load(norms_ptr + 1))
    if CLAMP:
        weight_norm = tl.minimum(weight_norm, clamp_value)
    trust = tl.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
    if MODE != 0:
        r = r * _scale_of(m, ids_ptr, scales_ptr, thr_ptr, offs, mask, MODE, K, ABS)
    p = p - lr * (r * trust)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adafactor_sq_sums_kernel(g_ptr, row_ptr, col_ptr, R, C, eps1, BR: tl.constexpr, BC: tl.constexpr):
    """Row and column sums of g^2 + eps1 over a [R, C] gradient, one tile per program."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    g = tl.load(g_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sq = tl.where(mask, g * g + eps1, 0.0)
    tl.atomic_add(row_ptr + rows, tl.sum(sq, axis=1), mask=rows < R)
    tl.atomic_add(col_ptr + cols, tl.sum(sq, axis=0), mask=cols < C)


@triton.jit
def adafactor_norms_kernel(g_ptr, p_ptr, rf_ptr, cf_ptr, sums_ptr, R, C, WITH_P: tl.constexpr,
                           BR: tl.constexpr, BC: tl.constexpr):
    """sum(u^2) of u = g * r_factor * c_factor (for the RMS clip), and sum(w^2) when asked."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rf = tl.load(rf_ptr + rows, mask=rows < R, other=0.0)
    cf = tl.load(cf_ptr + cols, mask=cols < C, other=0.0)
    u = rf[:, None] * cf[None, :] * g
    tl.atomic_add(sums_ptr, tl.sum(tl.sum(u * u, axis=1), axis=0))
    if WITH_P:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(sums_ptr + 1, tl.sum(tl.sum(p * p, axis=1), axis=0))


@triton.jit
def adafactor_apply_kernel(g_ptr, p_ptr, rf_ptr, cf_ptr, sums_ptr, ids_ptr, scales_ptr, thr_ptr, R, C, numel,
                           lr, weight_decay, clip_threshold, eps2, MODE: tl.constexpr, K: tl.constexpr,
                           ABS: tl.constexpr, SCALE_PARAM: tl.constexpr, P_NORM: tl.constexpr,
                           BR: tl.constexpr, BC: tl.constexpr):
    """w <- w - wd * lr * w - S[C] * lr * u / max(RMS(u) / clip, 1); optionally sum(w^2) before the step."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rf = tl.load(rf_ptr + rows, mask=rows < R, other=0.0)
    cf = tl.load(cf_ptr + cols, mask=cols < C, other=0.0)
    if P_NORM:  # RMS(w) before the step, kept in state["RMS"] as transformers does
        tl.atomic_add(sums_ptr + 1, tl.sum(tl.sum(p * p, axis=1), axis=0))
    rms = tl.sqrt_rn(tl.load(sums_ptr)) / tl.sqrt_rn(numel.to(tl.float32))
    u = tl.div_rn(rf[:, None] * cf[None, :] * g, tl.maximum(rms / clip_threshold, 1.0))
    if SCALE_PARAM:
        rms_p = tl.sqrt_rn(tl.load(sums_ptr + 1)) / tl.sqrt_rn(numel.to(tl.float32))
        lr = tl.maximum(eps2, rms_p) * lr
    step = u * lr
    if MODE != 0:
        step = step * _scale_of(u, ids_ptr, scales_ptr, thr_ptr, offs, mask, MODE, K, ABS)
    p = p + p * (-weight_decay * lr)
    p = p - step
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def assign_kernel(x_ptr, thr_ptr, ids_ptr, n, K: tl.constexpr, ABS: tl.constexpr, BLOCK: tl.constexpr):
    """uint8 cluster id of every element: the number of thresholds strictly below f(x)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    value = tl.abs(x) if ABS else x
    ids = tl.zeros(value.shape, dtype=tl.int32)
    for j in tl.static_range(K - 1):
        ids += (value > tl.load(thr_ptr + j)).to(tl.int32)
    tl.store(ids_ptr + offs, ids.to(tl.uint8), mask=mask)


# The bit field is a runtime argument, not a constexpr: each distinct constexpr value is a compilation of
# its own, and a run's first re-clustering would compile the kernel once per field.
@triton.jit(do_not_specialize=["match_shift", "shift", "bin_mask"])
def deviation_histogram_kernel(addr_ptr, numel_ptr, mean_ptr, block_tensor_ptr, first_block_ptr, prefix_ptr,
                               hist_ptr, skip_ptr, match_shift, shift, bin_mask, NBINS: tl.constexpr,
                               GATED: tl.constexpr, RAW: tl.constexpr, ALIGNED: tl.constexpr,
                               BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Histogram of bit fields of dev = |x - mean| among the elements whose higher bits equal a prefix.

    Over many float32 tensors in one launch (row t of the address table: tensor
    t's address; ``mean_ptr[t]``: its mean). Non-negative floats order like
    their int32 bit patterns, so a few such passes (high bits first) find an
    exact order statistic of any pool of tensors: the field is ``(dev >> shift) &
    bin_mask`` among the elements with ``dev >> match_shift == prefix``, counted
    in NBINS >= bin_mask + 1 bins. Few bins per pass (256):
    ``tl.histogram`` costs in proportion to its bins, and with 2048 the pass was
    bound by that arithmetic, not by memory. Each program counts ITERS blocks in
    registers and adds its counts to the global histogram once, so atomics stay
    far fewer than elements. RAW: the tensors hold deviations' bit patterns
    already. GATED: a nonzero ``skip_ptr[0]`` ends every program at once (the
    caller decides on the device whether this pass is needed).
    """
    if GATED:
        if tl.load(skip_ptr) != 0:
            return
    t, chunk = _tensor_and_block(block_tensor_ptr, first_block_ptr)
    x_ptr = tl.load(addr_ptr + t).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # here, not in a helper: the hint does not survive a call
        x_ptr = tl.multiple_of(x_ptr, 16)
    n = tl.load(numel_ptr + t)
    mu = tl.load(mean_ptr + t)
    prefix = tl.load(prefix_ptr)
    base = chunk.to(tl.int64) * BLOCK * ITERS
    if base + BLOCK * ITERS <= n:  # a whole chunk: constant masks, wide loads (see adam_kernel)
        counts, dropped = _deviation_counts(x_ptr, base, n, mu, prefix, False, match_shift, shift, bin_mask,
                                            NBINS, RAW, BLOCK, ITERS)
    else:
        counts, dropped = _deviation_counts(x_ptr, base, n, mu, prefix, True, match_shift, shift, bin_mask,
                                            NBINS, RAW, BLOCK, ITERS)
    counts = counts - tl.where(tl.arange(0, NBINS) == 0, dropped, 0)
    tl.atomic_add(hist_ptr + tl.arange(0, NBINS), counts.to(tl.int64), mask=counts > 0)


@triton.jit
def _deviation_bits(x, mu, RAW: tl.constexpr):
    if RAW:
        return x.to(tl.int32, bitcast=True)
    return tl.abs(x - mu).to(tl.int32, bitcast=True)


@triton.jit
def _deviation_counts(x_ptr, base, n, mu, prefix, MASKED: tl.constexpr, match_shift, shift, bin_mask,
                      NBINS: tl.constexpr, RAW: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    counts = tl.zeros((NBINS,), dtype=tl.int32)
    dropped = 0
    for i in tl.range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            mask = offs < n
        else:
            mask = tl.full((BLOCK,), 1, tl.int1)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        bits = _deviation_bits(x, mu, RAW)
        keep = mask & ((bits >> match_shift) == prefix)
        key = tl.where(keep, (bits >> shift) & bin_mask, 0)
        counts += tl.histogram(key, NBINS)
        # Elements left out were counted in bin 0: the caller takes them back out.
        dropped += BLOCK - tl.sum(keep.to(tl.int32), axis=0)
    return counts, dropped


@triton.jit(do_not_specialize=["T", "total", "m", "steps"])  # runtime sizes: one compilation for every pool
def deviation_sample_kernel(addr_ptr, numel_ptr, ends_ptr, mean_ptr, out_ptr, T, total, m, steps,
                            BLOCK: tl.constexpr):
    """Bit patterns of |x - mean| at m evenly spaced positions of many float32 tensors pooled end to end.

    ``ends_ptr``: the running sum of the tensors' sizes; position q lies in the tensor of the first
    end above q (a binary search per lane).
    """
    s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = s < m
    q = tl.minimum(s, m - 1) * total // m
    lo = tl.zeros((BLOCK,), tl.int64)  # the first t with ends[t] > q
    hi = tl.zeros((BLOCK,), tl.int64) + T
    for _ in range(steps):
        active = lo < hi
        mid = lo + (hi - lo) // 2
        above = tl.load(ends_ptr + mid, mask=active, other=0) > q
        lo = tl.where(active & ~above, mid + 1, lo)
        hi = tl.where(active & above, mid, hi)
    t = tl.minimum(lo, T - 1)
    local = q - (tl.load(ends_ptr + t) - tl.load(numel_ptr + t))
    x_ptr = tl.load(addr_ptr + t).to(tl.pointer_type(tl.float32))
    x = tl.load(x_ptr + local, mask=mask, other=0.0)
    tl.store(out_ptr + s, tl.abs(x - tl.load(mean_ptr + t)).to(tl.int32, bitcast=True), mask=mask)


@triton.jit(do_not_specialize=["slot_size"])  # from the pool's size
def deviation_bracket_kernel(addr_ptr, numel_ptr, mean_ptr, block_tensor_ptr, first_block_ptr, bounds_ptr, below_ptr,
                             fill_ptr, inside_ptr, slot_size, SLOTS: tl.constexpr, ALIGNED: tl.constexpr,
                             BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """One pass of functional.deviation_median's shortcut over many float32 tensors (as deviation_histogram_kernel).

    Counts the deviations whose bit patterns lie below ``bounds_ptr[0]`` and copies those within
    [bounds_ptr[0], bounds_ptr[1]] to ``inside_ptr``: program p writes to slice p % SLOTS of
    ``slot_size`` places through that slice's counter ``fill_ptr[p % SLOTS]``; counters go on past
    the slice's end (nothing is written there), so the caller sees an overflow. Written by hand
    for the reason deviation_histogram_kernel is: torch has no order statistic over many tensors,
    and one over their concatenation would copy the whole model.
    """
    t, chunk = _tensor_and_block(block_tensor_ptr, first_block_ptr)
    x_ptr = tl.load(addr_ptr + t).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # here, not in a helper: the hint does not survive a call
        x_ptr = tl.multiple_of(x_ptr, 16)
    n = tl.load(numel_ptr + t)
    mu = tl.load(mean_ptr + t)
    low = tl.load(bounds_ptr)
    high = tl.load(bounds_ptr + 1)
    slot = tl.program_id(0) % SLOTS
    out_ptr = inside_ptr + slot.to(tl.int64) * slot_size
    base = chunk.to(tl.int64) * BLOCK * ITERS
    if base + BLOCK * ITERS <= n:  # a whole chunk: constant masks, wide loads (see adam_kernel)
        below = _bracket_blocks(x_ptr, base, n, mu, low, high, fill_ptr + slot, out_ptr, slot_size, False, BLOCK,
                                ITERS)
    else:
        below = _bracket_blocks(x_ptr, base, n, mu, low, high, fill_ptr + slot, out_ptr, slot_size, True, BLOCK,
                                ITERS)
    tl.atomic_add(below_ptr, below.to(tl.int64))


@triton.jit
def _bracket_blocks(x_ptr, base, n, mu, low, high, fill_ptr, out_ptr, slot_size, MASKED: tl.constexpr,
                    BLOCK: tl.constexpr, ITERS: tl.constexpr):
    below = 0
    for i in tl.range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            mask = offs < n
        else:
            mask = tl.full((BLOCK,), 1, tl.int1)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        bits = _deviation_bits(x, mu, False)
        below += tl.sum((mask & (bits < low)).to(tl.int32), axis=0)
        inside = (mask & (bits >= low) & (bits <= high)).to(tl.int32)
        count = tl.sum(inside, axis=0)
        if count > 0:
            start = tl.atomic_add(fill_ptr, count.to(tl.int64))
            place = start + tl.cumsum(inside, axis=0).to(tl.int64) - 1
            tl.store(out_ptr + place, bits, mask=(inside > 0) & (place < slot_size))
    return below


@triton.jit
def id_counts_kernel(ids_ptr, counts_ptr, n, NBINS: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """How many of the uint8 ids equal each value below NBINS (torch.bincount on CUDA syncs with the host)."""
    counts = tl.zeros((NBINS,), dtype=tl.int32)
    dropped = 0
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    for i in tl.range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        counts += tl.histogram(tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32), NBINS)
        dropped += BLOCK - tl.sum(mask.to(tl.int32), axis=0)  # counted in bin 0
    counts = counts - tl.where(tl.arange(0, NBINS) == 0, dropped, 0)
    tl.atomic_add(counts_ptr + tl.arange(0, NBINS), counts.to(tl.int64), mask=counts > 0)


@triton.jit
def assign_many_kernel(addr_ptr, numel_ptr, block_tensor_ptr, first_block_ptr, thr_ptr, counts_ptr,
                       K: tl.constexpr, NBINS: tl.constexpr, ABS: tl.constexpr, WRITE: tl.constexpr,
                       ALIGNED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """uint8 ids of many float32 tensors in one launch, and how many of each tensor's ids equal each value.

    Row t of the address table: tensor t's values and its ids; ``thr_ptr`` rows of K-1 thresholds,
    ``counts_ptr`` rows of NBINS counts, one per tensor. One launch for all layers of a
    re-clustering, where a launch per layer (and a second for the sizes) left the GPU waiting on
    the host; each program counts ITERS blocks in registers and adds them to its tensor's row once.
    Without WRITE only the counts are made (dynamic ids need the sizes of sampled layers alone).
    """
    t, chunk = _tensor_and_block(block_tensor_ptr, first_block_ptr)
    x_ptr = tl.load(addr_ptr + t * 2).to(tl.pointer_type(tl.float32))
    ids_ptr = tl.load(addr_ptr + t * 2 + 1).to(tl.pointer_type(tl.uint8))
    if ALIGNED:  # here, not in a helper: the hint does not survive a call
        x_ptr = tl.multiple_of(x_ptr, 16)
        ids_ptr = tl.multiple_of(ids_ptr, 16)
    n = tl.load(numel_ptr + t)
    base = chunk.to(tl.int64) * BLOCK * ITERS
    if base + BLOCK * ITERS <= n:  # a whole chunk: constant masks, wide loads (see adam_kernel)
        counts, dropped = _assign_counts(x_ptr, ids_ptr, thr_ptr + t * (K - 1), base, n, False, K, NBINS, ABS,
                                         WRITE, BLOCK, ITERS)
    else:
        counts, dropped = _assign_counts(x_ptr, ids_ptr, thr_ptr + t * (K - 1), base, n, True, K, NBINS, ABS,
                                         WRITE, BLOCK, ITERS)
    counts = counts - tl.where(tl.arange(0, NBINS) == 0, dropped, 0)
    tl.atomic_add(counts_ptr + t * NBINS + tl.arange(0, NBINS), counts.to(tl.int64), mask=counts > 0)


@triton.jit
def _assign_counts(x_ptr, ids_ptr, thr_ptr, base, n, MASKED: tl.constexpr, K: tl.constexpr, NBINS: tl.constexpr,
                   ABS: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    counts = tl.zeros((NBINS,), dtype=tl.int32)
    dropped = 0
    for i in tl.range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            mask = offs < n
        else:
            mask = tl.full((BLOCK,), 1, tl.int1)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        value = tl.abs(x) if ABS else x
        ids = tl.zeros(value.shape, dtype=tl.int32)
        for j in tl.static_range(K - 1):
            ids += (value > tl.load(thr_ptr + j)).to(tl.int32)
        if WRITE:
            tl.store(ids_ptr + offs, ids.to(tl.uint8), mask=mask)
        counts += tl.histogram(tl.where(mask, ids, 0), NBINS)
        dropped += BLOCK - tl.sum(mask.to(tl.int32), axis=0)  # counted in bin 0
    return counts, dropped


@triton.jit
def _halve(row_ptr, v, lo, hi, RIGHT: tl.constexpr):
    """One halving of the binary searches below: torch's lower (upper, RIGHT) bound predicates."""
    active = lo < hi
    mid = lo + (hi - lo) // 2
    x = tl.load(row_ptr + mid, mask=active, other=0.0)
    if RIGHT:
        right = ~(x > v)
    else:
        right = ~(x >= v)
    return tl.where(active & right, mid + 1, lo), tl.where(active & ~right, mid, hi)


@triton.jit
def _searchsorted(row_ptr, v, n, RIGHT: tl.constexpr, steps):
    """torch.searchsorted(row, v, right=RIGHT) of every lane of ``v`` in one sorted row of n values.

    The same predicates as torch's lower and upper bound, so the same index for every input.
    """
    lo = tl.zeros(v.shape, tl.int64)
    hi = tl.zeros(v.shape, tl.int64) + n
    for _ in range(steps):
        lo, hi = _halve(row_ptr, v, lo, hi, RIGHT)
    return lo


@triton.jit
def _next_lane(v, KP: tl.constexpr):
    """out[k] = v[k + 1] (0 in the last lane); exact: one value plus zeros."""
    k = tl.arange(0, KP)
    return tl.sum(tl.where(k[None, :] == k[:, None] + 1, v[None, :], 0), axis=1)


@triton.jit
def _previous_lane(v, KP: tl.constexpr):
    """out[k] = v[k - 1] (0 in lane 0); exact: one value plus zeros."""
    k = tl.arange(0, KP)
    return tl.sum(tl.where(k[None, :] + 1 == k[:, None], v[None, :], 0), axis=1)


@triton.jit
def _partition(xs_ptr, p1_ptr, p2_ptr, bounds, n, steps, K: tl.constexpr, KP: tl.constexpr, SIGNED: tl.constexpr):
    """functional._partition_sse of one row: SSE, and each cluster's count and sum of f(x) (lanes < K).

    ``bounds``: lane 0 -inf, lanes 1..K-1 the thresholds, lane K +inf. The arithmetic and its order
    are the torch version's, so the result is the same to the bit.
    """
    hi = _searchsorted(xs_ptr, bounds, n, True, steps)
    if SIGNED:
        lo = tl.zeros(hi.shape, tl.int64)
    else:
        lo = tl.minimum(_searchsorted(xs_ptr, -bounds, n, False, steps), hi)
    count = (hi - lo).to(tl.float64)
    s1 = tl.load(p1_ptr + hi) - tl.load(p1_ptr + lo)
    s2 = tl.load(p2_ptr + hi) - tl.load(p2_ptr + lo)
    count = _next_lane(count, KP) - count  # .diff(): lane k holds cluster k
    s1 = _next_lane(s1, KP) - s1
    s2 = _next_lane(s2, KP) - s2
    sse_k = tl.maximum(s2 - s1 * s1 / tl.maximum(count, 1.0), 0.0)
    lane = tl.arange(0, KP)
    sse = tl.sum(tl.where(lane == 0, sse_k, 0.0), axis=0)
    for k in tl.static_range(1, K):  # in order, as torch sums K values
        sse = sse + tl.sum(tl.where(lane == k, sse_k, 0.0), axis=0)
    return sse, count, s1


# The row length and its search depth are runtime arguments: layers of many sizes share one compilation.
@triton.jit(do_not_specialize=["n", "steps"])
def lloyd_kernel(xs_ptr, p1_ptr, p2_ptr, thr_ptr, out_ptr, n, steps, ITERS: tl.constexpr, K: tl.constexpr,
                 KP: tl.constexpr, SIGNED: tl.constexpr):
    """The Lloyd steps of functional.kmeans_1d_rows for one sorted row per program.

    The torch loop is ~45 tiny launches per step, 10 steps per batch of rows: on a GPU they cost
    host time, not GPU time. Here one launch does them all, with the same searches and float64
    arithmetic in the same order (tests compare the two bit for bit).
    """
    row = tl.program_id(0).to(tl.int64)
    xs_ptr += row * n
    p1_ptr += row * n  # the prefix sums are rows of n + 1 overlapping by one: see _row_prefix_sums
    p2_ptr += row * n
    lane = tl.arange(0, KP)
    inner = (lane >= 1) & (lane < K)
    given = tl.load(thr_ptr + row * (K - 1) + lane - 1, mask=inner, other=0.0)
    bounds = tl.where(lane == 0, float("-inf"), tl.where(inner, given, float("inf")))
    best, cnt, sums = _partition(xs_ptr, p1_ptr, p2_ptr, bounds, n, steps, K, KP, SIGNED)
    for _ in tl.range(ITERS):
        centres = sums / tl.maximum(cnt, 1.0)
        candidate = ((_previous_lane(centres, KP) + centres) / 2).to(tl.float32)
        candidate = tl.where(lane == 0, float("-inf"), tl.where(inner, candidate, float("inf")))
        sse, new_cnt, new_sums = _partition(xs_ptr, p1_ptr, p2_ptr, candidate, n, steps, K, KP, SIGNED)
        cluster = lane < K
        ok = (tl.sum((cluster & ~(cnt > 0)).to(tl.int32), axis=0) == 0) \
            & (tl.sum((cluster & ~(new_cnt > 0)).to(tl.int32), axis=0) == 0) & (sse <= best)
        if K > 2:
            rising = (_next_lane(candidate, KP) - candidate) >= 0
            ok = ok & (tl.sum(((lane >= 1) & (lane < K - 1) & ~rising).to(tl.int32), axis=0) == 0)
        bounds = tl.where(ok, candidate, bounds)
        best = tl.where(ok, sse, best)
        cnt = tl.where(ok, new_cnt, cnt)
        sums = tl.where(ok, new_sums, sums)
    tl.store(out_ptr + row * (K - 1) + lane - 1, bounds, mask=inner)


@triton.jit(do_not_specialize=["row"])  # a count of blocks: its residue would only multiply the variants
def prefix_partials_kernel(x_ptr, part_ptr, N, row, ABS: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 of functional._prefix_sums_gpu: each block's float64 sums of f(x) and x^2 (two rows of ``row``)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float64)
    f = tl.abs(x) if ABS else x
    tl.store(part_ptr + pid, tl.sum(f, axis=0))
    tl.store(part_ptr + row + pid, tl.sum(x * x, axis=0))


@triton.jit(do_not_specialize=["row"])
def prefix_sums_kernel(x_ptr, start_ptr, p1_ptr, p2_ptr, N, row, ABS: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: inclusive float64 prefix sums of f(x) and x^2, each block from its start (the sums before it)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    f = tl.abs(x) if ABS else x
    s1 = tl.cumsum(f, axis=0) + tl.load(start_ptr + pid)
    s2 = tl.cumsum(x * x, axis=0) + tl.load(start_ptr + row + pid)
    tl.store(p1_ptr + 1 + offs, s1, mask=mask)
    tl.store(p2_ptr + 1 + offs, s2, mask=mask)


@triton.jit(do_not_specialize=["steps"])  # a loop count, from the row size
def cluster_median_kernel(xs_ptr, mean_ptr, ranges_ptr, out_ptr, n, steps, K: tl.constexpr, WAYS: tl.constexpr,
                          ROUNDS: tl.constexpr):
    """The search of functional.rows_cluster_mda for one (row, cluster) per program: int32 bits of the median.

    The torch version is some 50 tiny launches per batch of rows, host time the GPU waited for. Here
    each round tries WAYS - 1 values of t at once, one per lane (lane 0 idle), with the same integer
    arithmetic, the same float32 windows and the same searches (``steps`` halvings of a row of n),
    so the same result to the bit. Loops, not unrolled: unrolled, the searches are slow to compile.
    ``ranges_ptr``: [4, L, K] int64 (neg_lo, neg_hi, pos_lo, pos_hi), the cluster's index ranges.
    """
    row = tl.program_id(0).to(tl.int64)
    cluster = tl.program_id(1)
    L = tl.num_programs(0).to(tl.int64)
    at = row * K + cluster
    r0 = tl.load(ranges_ptr + at)
    r1 = tl.load(ranges_ptr + L * K + at)
    r2 = tl.load(ranges_ptr + 2 * L * K + at)
    r3 = tl.load(ranges_ptr + 3 * L * K + at)
    count = (r1 - r0) + (r3 - r2)
    need = (count - 1) // 2 + 1
    mean = tl.load(mean_ptr + row)
    xs_ptr += row * n
    lane = tl.arange(0, WAYS).to(tl.int64)
    probe = lane > 0
    lo = r0 * 0
    hi = lo + 0x7F800000  # bit pattern of +inf, where every element is inside
    for _ in tl.range(ROUNDS):
        mid = lo + (hi - lo) * lane // WAYS
        t = mid.to(tl.int32).to(tl.float32, bitcast=True)
        w_lo = _searchsorted_loop(xs_ptr, mean - t, n, steps, False)
        w_hi = _searchsorted_loop(xs_ptr, mean + t, n, steps, True)
        inside = (tl.maximum(tl.minimum(r1, w_hi) - tl.maximum(r0, w_lo), 0)
                  + tl.maximum(tl.minimum(r3, w_hi) - tl.maximum(r2, w_lo), 0))
        enough = probe & (inside >= need)
        new_hi = tl.min(tl.where(enough, mid, hi), axis=0)
        new_lo = tl.max(tl.where(enough | ~probe, lo - 1, mid), axis=0) + 1
        hi = tl.minimum(hi, new_hi)
        lo = tl.maximum(lo, new_lo)
    tl.store(out_ptr + at, tl.where(count > 0, hi, 0).to(tl.int32))


@triton.jit
def _searchsorted_loop(row_ptr, v, n, steps, RIGHT: tl.constexpr):
    """:func:`_searchsorted` with its halvings in a loop (``steps`` >= bit length of n), not unrolled."""
    lo = tl.zeros(v.shape, tl.int64)
    hi = tl.zeros(v.shape, tl.int64) + n
    for _ in tl.range(steps):
        lo, hi = _halve(row_ptr, v, lo, hi, RIGHT)
    return lo
