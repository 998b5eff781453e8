"""The batched re-clustering: every layer of one work size at once, on its device.

The wrapper in :mod:`llava_sgg.optim.sgg` decides *when* to re-cluster and
*which* tensors to pass; these functions compute, for a whole model in a fixed
number of launches, what :mod:`.reference` computes one layer at a time (the
paper's Algorithm 1 and Eq. 5: k-means thresholds, cluster ids and sizes,
cluster and model-wide medians), and the tests hold them to it.

Each function runs either torch ops (any device) or the Triton kernels of
:mod:`.kernels`; its ``kernels`` argument says which. The wrapper takes that
choice once per device (:func:`.launch.kernels_for`) and passes it down; left
as None, a function asks :func:`.launch.kernels_for` about its tensors' device
itself. The kernels take contiguous float32 tensors; anything else takes the
torch ops whatever ``kernels`` says. Both paths do the same arithmetic in the
same order, except the prefix sums of :func:`kmeans_1d_rows`, whose rounding
order differs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .launch import BLOCK, aligned, kernels_for, tensor_table, triton_cdiv
from .reference import DEFAULT_GRID, EXACT_SIZE, assign_clusters, float_bits

__all__ = [
    "assign_ids",
    "assign_ids_many",
    "cluster_sizes",
    "deviation_median",
    "kmeans_1d_rows",
    "rows_cluster_mda",
]


def _kernel_input(x: Tensor) -> bool:
    """Whether the kernels can read ``x`` as it is."""
    return x.is_contiguous() and x.dtype == torch.float32


# A layer's work set (all its values, or a uniform sample of a large layer) is
# one row of a [L, n] tensor, sorted once by *signed* value. With prefix sums
# of f(x) and x^2 along the sorted rows, everything the re-clustering needs is
# a searchsorted away, whether clusters are intervals of |x| (two index ranges
# of the signed order) or of x (one range): the k-means cost of any threshold
# pair, each cluster's size, and how many of its elements lie within t of the
# layer mean (an index window), which gives its exact median by bisection on t.
# No host synchronisation, a fixed number of launches per group of layers.


def _row_prefix_sums(values: Tensor) -> Tensor:
    """[L, n+1] float64 prefix sums along the rows of ``values`` [L, n], each offset by a constant of its row.

    One scan over the flattened rows, not a scan along dim 1: on a GPU that
    runs a few blocks per row, and a batch is a few dozen rows of millions of
    values. Row r's sums then start at the total of the rows before it (an
    overlapping view of the one scan); every use takes differences within a
    row, where that offset cancels.
    """
    L, n = values.shape
    flat = torch.empty(L * n + 1, dtype=torch.float64, device=values.device)
    flat[:1] = 0
    torch.cumsum(values.reshape(-1), 0, dtype=torch.float64, out=flat[1:])
    return flat.as_strided((L, n + 1), (n, 1))


def _prefix_sums_gpu(xs: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """:func:`_row_prefix_sums` of f(x) and of x^2 for float32 rows on a GPU: two passes over ``xs``.

    The torch ops make |x|, two float64 copies and x^2 before their scans (about 80 bytes moved per
    value); here a pass of block sums, a scan of those, and a
    pass of block scans (24 bytes). The float64 sums differ from torch's scan in rounding order only.
    """
    from .kernels import prefix_partials_kernel, prefix_sums_kernel

    L, n = xs.shape
    total, blocks = L * n, triton_cdiv(L * n, BLOCK)
    partials = torch.empty(2, blocks, dtype=torch.float64, device=xs.device)
    prefix_partials_kernel[(blocks,)](xs, partials, total, blocks, ABS=not signed, BLOCK=BLOCK)
    starts = torch.zeros(2, blocks + 1, dtype=torch.float64, device=xs.device)
    for sums, out in zip(partials, starts):  # two flat scans, not one of [blocks, 2] along dim 0: that is slow
        torch.cumsum(sums, 0, out=out[1:])
    flat = torch.empty(2, total + 1, dtype=torch.float64, device=xs.device)
    flat[:, 0] = 0
    prefix_sums_kernel[(blocks,)](xs, starts, flat[0], flat[1], total, blocks + 1, ABS=not signed, BLOCK=BLOCK)
    return flat[0].as_strided((L, n + 1), (n, 1)), flat[1].as_strided((L, n + 1), (n, 1))


def _row_range(xs: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """[L, 1] min and max of f(x) over each sorted row, read off the sorted order (no pass over the rows)."""
    if signed:
        return xs[:, :1], xs[:, -1:]
    n = xs.shape[1]
    inf = xs.new_full((), float("inf"))  # not torch.tensor(..., device=): that copy waits for the GPU
    zero = torch.searchsorted(xs, xs.new_zeros(xs.shape[0], 1))  # the first x >= 0
    smallest_nonneg = torch.where(zero < n, xs.gather(1, zero.clamp(max=n - 1)).abs(), inf)
    largest_neg = torch.where(zero > 0, -xs.gather(1, (zero - 1).clamp(min=0)), inf)
    return torch.minimum(smallest_nonneg, largest_neg), torch.maximum(xs[:, :1].abs(), xs[:, -1:].abs())


def _stats_below(xs: Tensor, p1: Tensor, p2: Tensor, t: Tensor, signed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Count, sum of f(x) and sum of x^2 over {f(x) <= t} for every row and query t [L, Q]."""
    hi = torch.searchsorted(xs, t.contiguous(), right=True)
    lo = torch.zeros_like(hi) if signed else torch.minimum(torch.searchsorted(xs, (-t).contiguous()), hi)
    count = (hi - lo).to(p1.dtype)
    return count, p1.gather(1, hi) - p1.gather(1, lo), p2.gather(1, hi) - p2.gather(1, lo)


def _partition_sse(xs, p1, p2, thresholds, signed):
    """Per-row SSE and cluster (count, sum) of the partition given by [L, K-1] thresholds."""
    L = xs.shape[0]
    inf = xs.new_full((L, 1), float("inf"))
    bounds = torch.cat([-inf, thresholds, inf], dim=1)
    count, s1, s2 = _stats_below(xs, p1, p2, bounds, signed)
    count, s1, s2 = count.diff(dim=1), s1.diff(dim=1), s2.diff(dim=1)
    sse = (s2 - s1 * s1 / count.clamp(min=1)).clamp(min=0).sum(dim=1)
    return sse, count, s1


def kmeans_1d_rows(xs: Tensor, n_clusters: int, *, signed: bool = False, grid: int = DEFAULT_GRID,
                   exact_size: int = EXACT_SIZE, lloyd_iters: int = 10, kernels: bool | None = None) -> Tensor:
    """Thresholds [L, K-1] of a near-optimal 1-D k-means of f(x) for every row of sorted ``xs`` [L, n].

    f = |x| unless ``signed``. The same dynamic programme as :func:`.reference.kmeans_1d`,
    over candidate thresholds rather than split positions: every value of a
    row with at most ``exact_size`` values (the exact optimum), else ``grid``
    values spaced by rank and as many spaced by value; then ``lloyd_iters``
    Lloyd steps, each kept only where it lowers no row's SSE. Thresholds are
    the midpoints between neighbouring centres.
    """
    L, n = xs.shape
    if n_clusters == 1:
        return xs.new_zeros(L, 0)
    with_kernels = (kernels_for(xs.device) if kernels is None else kernels) and _kernel_input(xs)
    if with_kernels:
        p1, p2 = _prefix_sums_gpu(xs, signed)
    else:
        p1 = _row_prefix_sums(xs if signed else xs.abs())
        p2 = _row_prefix_sums(xs.double().square())
    if n <= exact_size:
        candidates = xs if signed else xs.abs()
    else:
        by_rank = xs[:, torch.linspace(0, n - 1, grid + 1, device=xs.device).round().long()]
        by_rank = by_rank if signed else by_rank.abs()
        lo, hi = _row_range(xs, signed)
        by_value = lo + (hi - lo) * torch.linspace(0, 1, grid + 1, device=xs.device)
        candidates = torch.cat([by_rank, by_value], dim=1)
    inf = xs.new_full((L, 1), float("inf"))
    bounds = torch.cat([-inf, candidates.sort(dim=1).values, inf], dim=1)
    count, s1, s2 = _stats_below(xs, p1, p2, bounds, signed)
    # cost[l, i, j]: SSE of one cluster holding the values in (bounds[i], bounds[j]].
    dc = count[:, None, :] - count[:, :, None]
    d1 = s1[:, None, :] - s1[:, :, None]
    cost = ((s2[:, None, :] - s2[:, :, None]) - d1 * d1 / dc.clamp(min=1)).clamp(min=0)
    g = bounds.shape[1]
    upper = torch.ones(g, g, dtype=torch.bool, device=xs.device).triu(1)
    cost = cost.masked_fill(~upper, float("inf"))
    best, choices = cost[:, 0, :], []
    for _ in range(n_clusters - 1):
        best, arg = (best[:, :, None] + cost).min(dim=1)
        choices.append(arg)
    j = torch.full((L, 1), g - 1, device=xs.device, dtype=torch.long)
    picked = []
    for arg in reversed(choices):
        j = arg.gather(1, j)
        picked.append(j)
    thresholds = bounds.gather(1, torch.cat(picked[::-1], dim=1))

    lloyd = _lloyd_gpu if with_kernels else _lloyd_torch
    return lloyd(xs, p1, p2, thresholds, n_clusters, signed, max(lloyd_iters, 1))


def _lloyd_torch(xs, p1, p2, thresholds, n_clusters: int, signed: bool, iters: int) -> torch.Tensor:
    """Lloyd steps on all rows at once; a row keeps a step only if it lowers its SSE (``_lloyd_gpu``: one launch)."""
    best_sse, cnt, sums = _partition_sse(xs, p1, p2, thresholds, signed)
    for _ in range(iters):
        centres = sums / cnt.clamp(min=1)
        candidate = ((centres[:, :-1] + centres[:, 1:]) / 2).to(xs.dtype)
        sse, new_cnt, new_sums = _partition_sse(xs, p1, p2, candidate, signed)
        ok = (cnt > 0).all(dim=1) & (new_cnt > 0).all(dim=1) & (sse <= best_sse)
        ok = ok & (candidate.diff(dim=1) >= 0).all(dim=1) if n_clusters > 2 else ok
        thresholds = torch.where(ok[:, None], candidate, thresholds)
        best_sse = torch.where(ok, sse, best_sse)
        cnt = torch.where(ok[:, None], new_cnt, cnt)
        sums = torch.where(ok[:, None], new_sums, sums)
    return thresholds


def _lloyd_gpu(xs: Tensor, p1: Tensor, p2: Tensor, thresholds: Tensor, n_clusters: int, signed: bool,
               iters: int) -> Tensor:
    """The Lloyd steps of :func:`kmeans_1d_rows` in one launch (:func:`.kernels.lloyd_kernel`), the same
    arithmetic in the same order; the torch loop is ~45 launches a step, host time the GPU waits for."""
    from .kernels import lloyd_kernel

    L, n = xs.shape
    out = torch.empty_like(thresholds)
    lloyd_kernel[(L,)](xs, p1, p2, thresholds.contiguous(), out, n, n.bit_length(), ITERS=iters, K=n_clusters,
                       KP=1 << n_clusters.bit_length(), SIGNED=signed)
    return out


def _cluster_ranges(xs: Tensor, thresholds: Tensor, signed: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Index ranges [a1, b1) and [a2, b2) of the sorted rows holding each cluster's elements, each [L, K]."""
    L, n = xs.shape
    inf = xs.new_full((L, 1), float("inf"))
    upper = torch.cat([thresholds, inf], dim=1)  # t_c
    pos_hi = torch.searchsorted(xs, upper.contiguous(), right=True)
    if signed:
        pos_lo = torch.cat([torch.zeros_like(pos_hi[:, :1]), pos_hi[:, :-1]], dim=1)
        empty = torch.zeros_like(pos_hi)
        return empty, empty, pos_lo, pos_hi
    zero = torch.searchsorted(xs, xs.new_zeros(L, 1))  # first x >= 0
    pos_lo = torch.cat([zero, torch.searchsorted(xs, thresholds.contiguous(), right=True)], dim=1)
    neg_lo = torch.searchsorted(xs, (-upper).contiguous())
    neg_hi = torch.cat([zero, torch.searchsorted(xs, (-thresholds).contiguous())], dim=1)
    pos_lo = torch.minimum(pos_lo, pos_hi)
    neg_lo = torch.minimum(neg_lo, neg_hi)
    return neg_lo, neg_hi, pos_lo, pos_hi


_MEDIAN_WAYS = 256  # values of t tried at once by rows_cluster_mda's search
_MEDIAN_ROUNDS = 4  # rounds of _MEDIAN_WAYS - 1 tries that narrow [0, +inf)'s 2^31 bit patterns to one


def rows_cluster_mda(xs: Tensor, mean: Tensor, thresholds: Tensor, *, signed: bool = False,
                     kernels: bool | None = None) -> tuple[Tensor, Tensor]:
    """Lower median of |x - mean| in each cluster, and each cluster's size, for sorted rows ``xs``.

    Returns ([L, K] float32 medians, [L, K] counts); an empty cluster gets
    median 0. Exact: a search over the float32 bit patterns of t finds the
    smallest t with at least k+1 of the cluster's elements inside
    [mean - t, mean + t] (an index window of the sorted row), k = (count-1)//2.
    Each round tries 255 values of t at once, so the [0, +inf) range of 2^31
    patterns shrinks to one in 4 rounds. With the kernels the rounds run in one launch
    (:func:`.kernels.cluster_median_kernel`, one program per row and cluster);
    elsewhere a few dozen torch ops, not 31 rounds of a bisection.
    """
    neg_lo, neg_hi, pos_lo, pos_hi = _cluster_ranges(xs, thresholds, signed)
    counts = (neg_hi - neg_lo) + (pos_hi - pos_lo)
    L, K = counts.shape
    if (kernels_for(xs.device) if kernels is None else kernels) and _kernel_input(xs) and L:
        from .kernels import cluster_median_kernel

        bits = torch.empty(L, K, dtype=torch.int32, device=xs.device)
        cluster_median_kernel[(L, K)](xs, mean.to(xs.dtype).contiguous(), torch.stack([neg_lo, neg_hi, pos_lo, pos_hi]),
                                      bits, xs.shape[1], xs.shape[1].bit_length(), K=K, WAYS=_MEDIAN_WAYS,
                                      ROUNDS=_MEDIAN_ROUNDS)
        return bits.view(torch.float32), counts
    need = ((counts - 1) // 2 + 1)[..., None]
    mean = mean.to(xs.dtype)[:, None]
    lo = torch.zeros_like(counts)
    hi = torch.full_like(counts, 0x7F800000)  # bit pattern of +inf, where every element is inside
    probes = torch.arange(1, _MEDIAN_WAYS, device=xs.device)
    ranges = [r[..., None] for r in (neg_lo, neg_hi, pos_lo, pos_hi)]
    # With R = hi - lo, probes at lo + floor(R j / W) leave at most floor(R / W) (W = 256):
    # 2^31 > R0 -> < 2^23 -> < 2^15 -> < 2^7 -> 0.
    for _ in range(_MEDIAN_ROUNDS):
        mid = lo[..., None] + (hi - lo)[..., None] * probes // _MEDIAN_WAYS  # [L, K, W-1]
        t = mid.to(torch.int32).view(torch.float32).to(xs.dtype).reshape(L, -1)
        w_lo = torch.searchsorted(xs, (mean - t).contiguous()).view(mid.shape)
        w_hi = torch.searchsorted(xs, (mean + t).contiguous(), right=True).view(mid.shape)
        inside = ((torch.minimum(ranges[1], w_hi) - torch.maximum(ranges[0], w_lo)).clamp(min=0)
                  + (torch.minimum(ranges[3], w_hi) - torch.maximum(ranges[2], w_lo)).clamp(min=0))
        enough = inside >= need
        hi = torch.minimum(hi, torch.where(enough, mid, hi[..., None]).amin(dim=-1))
        lo = torch.maximum(lo, torch.where(enough, lo[..., None] - 1, mid).amax(dim=-1) + 1)
    medians = hi.to(torch.int32).view(torch.float32)
    return torch.where(counts > 0, medians, torch.zeros_like(medians)), counts


def cluster_sizes(ids: Tensor, n_clusters: int, *, kernels: bool | None = None) -> Tensor:
    """How many of the uint8 ``ids`` equal each cluster index (int64 [n_clusters]), without a host sync on a GPU."""
    if kernels is None:
        kernels = kernels_for(ids.device)
    if kernels and ids.is_contiguous() and ids.dtype == torch.uint8:
        from .kernels import id_counts_kernel

        nbins = max(2, 1 << (n_clusters - 1).bit_length())
        counts = torch.zeros(nbins, dtype=torch.long, device=ids.device)
        iters = 16
        if ids.numel():
            id_counts_kernel[(triton_cdiv(ids.numel(), iters * BLOCK),)](ids, counts, ids.numel(), NBINS=nbins,
                                                                       BLOCK=BLOCK, ITERS=iters)
        return counts[:n_clusters]
    return torch.bincount(ids.flatten().long(), minlength=n_clusters)[:n_clusters]


def assign_ids(x: Tensor, thresholds: Tensor, *, signed: bool = False, kernels: bool | None = None) -> Tensor:
    """uint8 cluster ids shaped like ``x``: one pass with the kernels, the torch ops elsewhere."""
    values = x.detach()
    if kernels is None:
        kernels = kernels_for(values.device)
    if kernels and values.is_contiguous():
        from .kernels import assign_kernel

        ids = torch.empty(values.shape, dtype=torch.uint8, device=values.device)
        thr = thresholds.float().contiguous() if thresholds.numel() else values.new_zeros(1, dtype=torch.float32)
        assign_kernel[(triton_cdiv(values.numel(), BLOCK),)](values, thr, ids, values.numel(),
                                                             K=thresholds.numel() + 1, ABS=not signed, BLOCK=BLOCK)
        return ids
    values = values.float()
    return assign_clusters(values if signed else values.abs(), thresholds.float()).to(torch.uint8)


_ASSIGN_ITERS = 16  # blocks each GPU program of assign_ids_many handles


def assign_ids_many(xs: list[Tensor], thresholds: Tensor, *, signed: bool = False,
                    sizes: list[bool] | None = None, ids: bool = True, kernels: bool | None = None
                    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """:func:`assign_ids` of every tensor of ``xs`` by its row of ``thresholds`` [L, K-1], and cluster sizes.

    Returns (uint8 ids shaped like each tensor, int64 [K] sizes of each tensor's ids or None).
    ``sizes[l]`` asks for tensor l's sizes (all of them when ``sizes`` is None); with ``ids=False``
    only the sizes are wanted, and the ids are Nones (with the kernels never written). With the
    kernels, and contiguous float32 tensors on one device, one launch assigns every tensor and counts
    every size (a re-clustering of a 1B model has 170 layers: per-layer launches would be host time
    the GPU waits for); elsewhere :func:`assign_ids` and :func:`cluster_sizes` of each tensor.
    """
    n_clusters = thresholds.shape[1] + 1
    sizes = [True] * len(xs) if sizes is None else sizes
    batched = kernels_for(xs[0].device) if kernels is None and xs else kernels
    if xs and batched and all(_kernel_input(x) for x in xs) and len({x.device for x in xs}) == 1:
        from .kernels import assign_many_kernel

        device = xs[0].device
        out = [torch.empty(x.shape, dtype=torch.uint8, device=device) if ids else x for x in xs]
        nbins = max(2, 1 << (n_clusters - 1).bit_length())
        counts = torch.zeros(len(xs), nbins, dtype=torch.long, device=device)
        thr = thresholds.to(device, torch.float32).contiguous() if n_clusters > 1 else counts
        rows = [(x.data_ptr(), i.data_ptr()) for x, i in zip(xs, out)]
        table = tensor_table(rows, [x.numel() for x in xs], _ASSIGN_ITERS * BLOCK, device)
        if table.programs:
            assign_many_kernel[(table.programs,)](
                table.addresses, table.numels, table.block_tensor, table.first_block, thr, counts, K=n_clusters,
                NBINS=nbins, ABS=not signed, WRITE=ids, ALIGNED=aligned(a for row in rows for a in row), BLOCK=BLOCK,
                ITERS=_ASSIGN_ITERS)
        counts = counts[:, :n_clusters]
        return out if ids else [None] * len(xs), [c if want else None for c, want in zip(counts.unbind(0), sizes)]
    found = [assign_ids(x, t, signed=signed, kernels=kernels) for x, t in zip(xs, thresholds)]
    return (found if ids else [None] * len(xs),
            [cluster_sizes(i, n_clusters, kernels=kernels) if want else None for i, want in zip(found, sizes)])


# Bit fields of the deviation's float32 pattern, high first: 8 + 8 + 8 + 7 bits (the sign bit is 0).
# Four passes of 256 bins, not three of 2048/1024: on the GPU a pass costs in proportion to its bins.
_LEVELS = ((31, 23, 256), (23, 15, 256), (15, 7, 256), (7, 0, 128))
_HISTOGRAM_BINS = 256  # every level's histogram: one kernel compilation serves them all
_HISTOGRAM_ITERS = 16  # blocks each GPU program counts before adding to the histogram

# The GPU's shortcut (see deviation_median): a sample of this many deviations gives a bracket around
# the median, this many standard deviations of the sample median's rank to each side (about 0.6% of
# all deviations with 2^20 samples), and a buffer of twice the expected number inside, in this many
# slices, each filled through its own atomic counter.
MEDIAN_SAMPLE = 1 << 20
_BRACKET_SIGMAS = 6
_BRACKET_ROOM = 2.0
_BRACKET_SLOTS = 64
_NOT_A_DEVIATION = 0x7FFFFFFF  # fills the buffer's unused places: above every deviation's bit pattern


def _deviation_histograms(tensors: list[Tensor], means: Tensor, prefix: Tensor, level: tuple[int, int, int],
                          out: Tensor, *, kernels: bool, skip: Tensor | None = None, raw: bool = False) -> None:
    """Add one level's histogram of all ``tensors`` to ``out``: one launch with the kernels, else per tensor.

    ``means`` [T]: each tensor's mean; ``out`` may have more bins than the level's, which stay as they
    are. With the kernels only: ``raw`` tensors hold the bit patterns of deviations themselves (no
    mean is taken off), and a nonzero ``skip`` (a device flag) leaves ``out`` as it is, decided on the
    device.
    """
    match_shift, shift, nbins = level
    if kernels and all(_kernel_input(x) for x in tensors):
        from .kernels import deviation_histogram_kernel

        rows = [(x.data_ptr(),) for x in tensors]
        table = tensor_table(rows, [x.numel() for x in tensors], _HISTOGRAM_ITERS * BLOCK, out.device)
        if table.programs:
            deviation_histogram_kernel[(table.programs,)](
                table.addresses, table.numels, means, table.block_tensor, table.first_block, prefix, out,
                prefix if skip is None else skip, match_shift, shift, nbins - 1, NBINS=out.numel(),
                GATED=skip is not None, RAW=raw, ALIGNED=aligned(a for a, in rows), BLOCK=BLOCK,
                ITERS=_HISTOGRAM_ITERS)
        return
    if skip is not None or raw:
        raise ValueError("skip and raw are for the kernels' path")
    for x, mean in zip(tensors, means):
        bits = float_bits((x.float() - mean).abs()).flatten()
        keep = (bits >> match_shift) == prefix
        out[:nbins] += torch.bincount((bits[keep] >> shift) & (nbins - 1), minlength=nbins)


def _select_bits(tensors: list[Tensor], means: Tensor, rank: Tensor, *, kernels: bool,
                 reduce: Callable[[Tensor], Tensor] | None = None, skip: Tensor | None = None,
                 raw: bool = False) -> Tensor:
    """int32 bit pattern of the deviation of 0-based ``rank`` (a 0-d device tensor) among all ``tensors``.

    One histogram pass per bit field of :data:`_LEVELS`; the rank bookkeeping stays on the device.
    """
    prefix = torch.zeros((), dtype=torch.int32, device=rank.device)
    for level in _LEVELS:
        hist = torch.zeros(_HISTOGRAM_BINS, dtype=torch.long, device=rank.device)  # bins >= level[2] stay 0
        _deviation_histograms(tensors, means, prefix, level, hist, kernels=kernels, skip=skip, raw=raw)
        if reduce is not None:
            hist = reduce(hist)
        cum = hist.cumsum(0)
        b = torch.searchsorted(cum, rank.reshape(1), right=True)[0]
        rank = rank - torch.where(b > 0, cum[(b - 1).clamp(min=0)], torch.zeros_like(rank))
        prefix = (prefix << (level[0] - level[1])) | b.to(torch.int32)
    return prefix


def bracket_applies(total: int, sample: int = MEDIAN_SAMPLE) -> bool:
    """Whether :func:`deviation_median` takes its one-pass bracket (with the kernels, unsharded) for a pool of
    ``total`` values."""
    return 16 <= sample <= total // 4


def bracket_slots(numels: list[int]) -> int:
    """The bracket pass's buffer slots for tensors of ``numels`` (a compiled constant): one per program, at most
    :data:`_BRACKET_SLOTS`."""
    programs = sum(triton_cdiv(n, _HISTOGRAM_ITERS * BLOCK) for n in numels)
    return max(1, min(_BRACKET_SLOTS, programs))


def _bracket_median(tensors: list[Tensor], means: Tensor, rank: Tensor, total: int, sample: int
                    ) -> tuple[Tensor, Tensor]:
    """The deviation of ``rank`` among all float32 ``tensors`` through a bracket (kernels): (int32 bits, found).

    ``found`` (a 0-d bool on the device) is False where the bracket missed the rank or its buffer
    overflowed; the bits are then meaningless. Three launches over the data's size, one pass over it.
    """
    from .kernels import deviation_bracket_kernel, deviation_sample_kernel

    device = means.device
    rows = [(x.data_ptr(),) for x in tensors]
    table = tensor_table(rows, [x.numel() for x in tensors], _HISTOGRAM_ITERS * BLOCK, device)
    ends = table.numels.cumsum(0)
    picked = torch.empty(sample, dtype=torch.int32, device=device)
    deviation_sample_kernel[(triton_cdiv(sample, BLOCK),)](
        table.addresses, table.numels, ends, means, picked, len(tensors), total, sample, len(tensors).bit_length(),
        BLOCK=BLOCK)
    picked = picked.sort().values
    # The sample's count below the median is Binomial(sample, 1/2): standard deviation sqrt(sample) / 2.
    half = int(_BRACKET_SIGMAS * sample**0.5 / 2) + 1
    lo, hi = max(sample // 2 - half, 0), min(sample // 2 + half, sample - 1)
    bounds = picked[lo:hi + 1:hi - lo].contiguous()  # bit patterns [low, high], both inside
    slots = bracket_slots([x.numel() for x in tensors])
    expected = (hi - lo + 1) / sample * total
    slot_size = int(_BRACKET_ROOM * expected / slots) + _HISTOGRAM_ITERS * BLOCK
    inside = torch.full((slots * slot_size,), _NOT_A_DEVIATION, dtype=torch.int32, device=device)
    fill = torch.zeros(slots, dtype=torch.long, device=device)
    below = torch.zeros((), dtype=torch.long, device=device)
    deviation_bracket_kernel[(table.programs,)](
        table.addresses, table.numels, means, table.block_tensor, table.first_block, bounds, below, fill, inside,
        slot_size, SLOTS=slots, ALIGNED=aligned(a for a, in rows), BLOCK=BLOCK, ITERS=_HISTOGRAM_ITERS)
    rank = rank - below
    found = (rank >= 0) & (rank < fill.sum()) & (fill <= slot_size).all()
    bits = _select_bits([inside.view(torch.float32)], means.new_zeros(1), rank.clamp(0, inside.numel() - 1),
                        kernels=True, raw=True)
    return bits, found


def deviation_median(tensors: list[Tensor], means: list[Tensor], *, total: int | None = None,
                     reduce: Callable[[Tensor], Tensor] | None = None, sample: int = MEDIAN_SAMPLE,
                     kernels: bool | None = None) -> Tensor:
    """Exact lower median of |x - mean| pooled over all elements of all ``tensors`` (0-d float32).

    Four passes, each a histogram of one bit field of the deviations among
    those matching the bits chosen so far (with the kernels one launch over all
    tensors); the rank bookkeeping stays on the device (no host synchronisation).
    The histograms are plain counts, so a sharded model sums them across ranks
    before each choice: ``tensors`` are then this rank's pieces, ``total`` the
    number of elements over all ranks, and ``reduce`` sums a histogram over the
    ranks (an all-reduce).

    With the kernels, no ``reduce`` and at least 4 * ``sample`` deviations, one pass instead of four: ``sample``
    deviations at evenly spaced positions of the pool give a bracket that holds the median
    with near certainty and a small share of the pool; one pass counts the deviations below
    it and copies those inside to a buffer, and the median is found in that buffer. The four
    passes still run, but each GPU program reads first whether the bracket held the median
    and returns at once if it did, so the result is exact either way and no host
    synchronisation decides between the two (docs/performance.md has the measurements).
    """
    device = tensors[0].device
    total = sum(t.numel() for t in tensors) if total is None else total
    if not total:
        raise ValueError("deviation_median needs at least one value")
    rank = torch.full((), (total - 1) // 2, dtype=torch.long, device=device)  # 0-based rank of the lower median
    means = torch.cat([m.float().reshape(1) for m in means]).to(device)
    if kernels is None:
        kernels = all(kernels_for(x.device) for x in tensors)
    if reduce is None and bracket_applies(total, sample) and kernels and all(_kernel_input(x) for x in tensors):
        bits, found = _bracket_median(tensors, means, rank, total, sample)
        everywhere = _select_bits(tensors, means, rank, kernels=True, skip=found.to(torch.int32))
        return torch.where(found, bits, everywhere).view(torch.float32)
    return _select_bits(tensors, means, rank, kernels=kernels, reduce=reduce).view(torch.float32)
