"""SGG's math as pure functions of tensors and numbers.

The wrapper in :mod:`llava_sgg.optim.sgg` is bookkeeping around these: it decides
*when* to re-cluster and *which* tensors to pass; everything that decides *what*
the cluster ids and scales are lives here, so it can be read next to the paper
(arXiv 2506.01049, Algorithm 1, Eq. 5-7) and tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = [
    "assign_clusters",
    "assign_ids",
    "assign_ids_many",
    "cluster_sizes",
    "deviation_median",
    "kmeans_1d_rows",
    "rows_cluster_mda",
    "cluster_mda",
    "ema_scales",
    "kmeans_1d",
    "kmeans_1d_sklearn",
    "pooled_lower_median",
    "segment_sse",
    "target_scales",
]

# Layers with at most EXACT_SIZE values get the exact optimum of `kmeans_1d`;
# larger ones search DEFAULT_GRID split positions by rank and as many by value
# exactly, then refine. Measured worst SSE over optimum with grid 256 on
# heavy-tailed, bimodal and Gaussian layers, K = 2..5: +0.24% (spec: 2%).
EXACT_SIZE = 1024
DEFAULT_GRID = 256


def _prefix_sums(sorted_values: Tensor) -> tuple[Tensor, Tensor]:
    zero = sorted_values.new_zeros(1)
    return (
        torch.cat([zero, sorted_values.cumsum(0)]),
        torch.cat([zero, (sorted_values * sorted_values).cumsum(0)]),
    )


def segment_sse(s1: Tensor, s2: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Sum of squared errors of the sorted values in ``[start, end)`` from prefix sums."""
    count = (end - start).to(s1.dtype)
    total = s1[end] - s1[start]
    sse = (s2[end] - s2[start]) - total * total / count.clamp(min=1)
    return sse.clamp(min=0)


def _thresholds_from_distinct(distinct: Tensor, n_clusters: int) -> Tensor:
    # Fewer distinct values than clusters: each value is its own group, the
    # groups take the lowest ids, and the unused ids get +inf thresholds so
    # nothing is ever assigned to them.
    mids = (distinct[:-1] + distinct[1:]) / 2
    pad = mids.new_full((n_clusters - 1 - mids.numel(),), float("inf"))
    return torch.cat([mids, pad])


def kmeans_1d(values: Tensor, n_clusters: int, *, grid: int = DEFAULT_GRID, exact_size: int = EXACT_SIZE,
              max_iter: int = 100) -> Tensor:
    """Thresholds of a near-optimal 1-D k-means partition of ``values``.

    Returns ``n_clusters - 1`` ascending thresholds on the values' device;
    :func:`assign_clusters` turns them into ids (id = number of thresholds
    strictly below the value), so id 0 is the group with the smallest centre.

    Written by hand because no library offers 1-D k-means on the tensor's own
    device. In one dimension optimal clusters are contiguous runs of the sorted
    values, so the optimum is a dynamic programme over split positions
    (Wang & Song, "Ckmeans.1d.dp", 2011). The programme runs exactly over at most
    2 * ``grid`` + 2 candidate split positions, spaced evenly in rank and in
    value (every position when the layer has at most ``exact_size`` values: the
    exact optimum), then Lloyd iterations on all the
    sorted values move the splits freely; each iteration costs O(K log n) thanks
    to prefix sums, and never increases the sum of squared errors.
    """
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    work_dtype = torch.float64 if values.device.type != "mps" else torch.float32
    # Sort in the values' own precision (cheaper), sum in float64.
    xs = values.detach().flatten().sort().values.to(work_dtype)
    out_dtype = values.dtype if values.is_floating_point() else torch.float32
    if n_clusters == 1:
        return xs.new_zeros(0).to(out_dtype)
    distinct = torch.unique_consecutive(xs)
    if distinct.numel() <= n_clusters:
        return _thresholds_from_distinct(distinct, n_clusters).to(out_dtype)

    n = xs.numel()
    s1, s2 = _prefix_sums(xs)
    if n <= exact_size:
        positions = torch.arange(n + 1, device=xs.device)
    else:
        # Candidate splits evenly spaced in rank *and* in value: rank spacing
        # resolves the bulk, value spacing resolves the sparse tails where the
        # small groups of large magnitudes live.
        by_rank = torch.linspace(0, n, grid + 1, device=xs.device, dtype=torch.float64).round().long()
        by_value = torch.searchsorted(xs, torch.linspace(float(xs[0]), float(xs[-1]), grid + 1, device=xs.device,
                                                         dtype=xs.dtype), right=True)
        positions = torch.cat([by_rank, by_value, torch.tensor([0, n], device=xs.device)]).unique()

    # cost[i, j]: SSE of one cluster holding sorted values positions[i]..positions[j]-1.
    start, end = positions[:, None], positions[None, :]
    cost = segment_sse(s1, s2, start.expand(-1, positions.numel()), end.expand(positions.numel(), -1))
    cost = torch.where(end > start, cost, torch.full_like(cost, float("inf")))
    best = cost[0]  # best[j]: optimal SSE of the values before positions[j] in one cluster
    choices = []
    for _ in range(n_clusters - 1):
        best, arg = (best[:, None] + cost).min(dim=0)
        choices.append(arg)
    splits, j = [], positions.numel() - 1
    for arg in reversed(choices):
        j = int(arg[j])
        splits.append(int(positions[j]))
    splits.reverse()
    bounds = torch.tensor([0, *splits, n], device=xs.device)
    # Midway between the last value of one group and the first of the next.
    thresholds = (xs[bounds[1:-1] - 1] + xs[bounds[1:-1]]) / 2
    best_sse = segment_sse(s1, s2, bounds[:-1], bounds[1:]).sum()

    for _ in range(max_iter):
        counts = bounds[1:] - bounds[:-1]
        centres = (s1[bounds[1:]] - s1[bounds[:-1]]) / counts.to(work_dtype)
        candidate = (centres[:-1] + centres[1:]) / 2
        new_bounds = torch.cat(
            [bounds[:1], torch.searchsorted(xs, candidate, right=True), bounds[-1:]]
        )
        if bool((new_bounds[1:] <= new_bounds[:-1]).any()):
            break  # a group would empty out: keep the last valid partition
        sse = segment_sse(s1, s2, new_bounds[:-1], new_bounds[1:]).sum()
        if sse > best_sse:
            break
        thresholds, best_sse = candidate, sse
        if torch.equal(new_bounds, bounds):
            break
        bounds = new_bounds
    return thresholds.to(out_dtype)


def kmeans_1d_sklearn(values: Tensor, n_clusters: int, *, seed: int = 0) -> Tensor:
    """The paper's choice: scikit-learn's MiniBatchKMeans on the CPU.

    Same contract as :func:`kmeans_1d`; only the returned thresholds survive,
    no scikit-learn object is kept.
    """
    from sklearn.cluster import MiniBatchKMeans

    out_dtype = values.dtype if values.is_floating_point() else torch.float32
    xs = values.detach().flatten().to(torch.float64).cpu()
    if n_clusters == 1:
        return torch.zeros(0, dtype=out_dtype, device=values.device)
    distinct = torch.unique(xs)
    if distinct.numel() <= n_clusters:
        return _thresholds_from_distinct(distinct, n_clusters).to(values.device, out_dtype)
    km = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, n_init=3)
    km.fit(xs.numpy().reshape(-1, 1))
    centres = torch.from_numpy(km.cluster_centers_.ravel()).sort().values
    return ((centres[:-1] + centres[1:]) / 2).to(values.device, out_dtype)


def assign_clusters(values: Tensor, thresholds: Tensor) -> Tensor:
    """Cluster id of every value: the number of thresholds strictly below it."""
    return torch.bucketize(values, thresholds.to(values.dtype), out_int32=True).view(values.shape)


def cluster_mda(dev: Tensor, ids: Tensor, n_clusters: int) -> tuple[Tensor, Tensor]:
    """Median absolute deviation of each cluster, and each cluster's size.

    ``dev`` holds |x - mean(x)| of the layer (Eq. 5); the median is the lower
    median (an element of the cluster, as :func:`torch.median` returns). An
    empty cluster gets median 0 and count 0.
    """
    dev, ids = dev.flatten(), ids.flatten()
    medians = dev.new_zeros(n_clusters, dtype=torch.float32)
    counts = torch.bincount(ids.long(), minlength=n_clusters)[:n_clusters]
    for c in range(n_clusters):
        if counts[c] > 0:
            medians[c] = dev[ids == c].median().float()
    return medians, counts


def _float_bits(t: Tensor) -> Tensor:
    return t.float().contiguous().view(torch.int32)


def pooled_lower_median(chunks: Callable[[], Iterable[Tensor]]) -> Tensor:
    """Exact lower median of non-negative float32 values spread over many tensors.

    ``chunks`` is called twice and must yield the same tensors each time; they
    are never concatenated, so the pool can be the size of a whole model.
    Written by hand because torch has no order statistic over a list of tensors:
    non-negative floats order like their int32 bit patterns, so two passes of a
    65,536-bin histogram (high 16 bits, then low 16 bits inside the chosen bin)
    find the exact k-th value. The histograms are plain counts, so a sharded
    model can sum them across ranks before the search.
    """
    hist_hi, total, device = None, 0, None
    for t in chunks():
        hi = _float_bits(t).flatten() >> 16
        h = torch.bincount(hi, minlength=1 << 16)
        hist_hi = h if hist_hi is None else hist_hi + h
        total += t.numel()
        device = t.device
    if not total:
        raise ValueError("pooled_lower_median needs at least one value")
    k = (total - 1) // 2  # 0-based rank of the lower median
    cum = hist_hi.cumsum(0)
    hi = int(torch.searchsorted(cum, torch.tensor(k, device=cum.device), right=True))
    k_in_bin = k - (int(cum[hi - 1]) if hi > 0 else 0)
    hist_lo = torch.zeros(1 << 16, dtype=torch.long, device=device)
    for t in chunks():
        bits = _float_bits(t).flatten()
        hist_lo += torch.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    lo = int(torch.searchsorted(hist_lo.cumsum(0), torch.tensor(k_in_bin, device=device), right=True))
    return torch.tensor((hi << 16) | lo, dtype=torch.int32).view(torch.float32)


def target_scales(global_mda: float | Tensor, mda: Tensor, scale_bounds: tuple[float, float], eps: float) -> Tensor:
    """Eq. 6 with the clamp: r_c = clamp(D / (D_c + eps), lower, upper)."""
    return (global_mda / (mda + eps)).clamp(scale_bounds[0], scale_bounds[1])


def ema_scales(scales: Tensor, target: Tensor, counts: Tensor, beta3: float) -> Tensor:
    """Eq. 7: S <- beta3 * S + (1 - beta3) * r; an empty cluster keeps its scale."""
    updated = beta3 * scales + (1 - beta3) * target.to(scales.dtype)
    return torch.where(counts.to(scales.device) > 0, updated, scales)


# ---------------------------------------------------------------------------
# Batched re-clustering: every layer of one work size at once, on its device.
#
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

    The torch ops made |x|, two float64 copies and x^2 before their scans (about 80 bytes moved per
    value, a fifth of the re-clustering's GPU time); here a pass of block sums, a scan of those, and a
    pass of block scans (24 bytes). The float64 sums differ from torch's scan in rounding order only.
    """
    from .fused import BLOCK, triton_cdiv
    from .kernels import prefix_partials_kernel, prefix_sums_kernel

    L, n = xs.shape
    total, blocks = L * n, triton_cdiv(L * n, BLOCK)
    partials = torch.empty(2, blocks, dtype=torch.float64, device=xs.device)
    prefix_partials_kernel[(blocks,)](xs, partials, total, blocks, ABS=not signed, BLOCK=BLOCK)
    starts = torch.zeros(2, blocks + 1, dtype=torch.float64, device=xs.device)
    for sums, out in zip(partials, starts):  # two flat scans: a scan of [blocks, 2] along dim 0 took 8 ms
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
                   exact_size: int = EXACT_SIZE, lloyd_iters: int = 10) -> Tensor:
    """Thresholds [L, K-1] of a near-optimal 1-D k-means of f(x) for every row of sorted ``xs`` [L, n].

    f = |x| unless ``signed``. The same dynamic programme as :func:`kmeans_1d`,
    over candidate thresholds rather than split positions: every value of a
    row with at most ``exact_size`` values (the exact optimum), else ``grid``
    values spaced by rank and as many spaced by value; then ``lloyd_iters``
    Lloyd steps, each kept only where it lowers no row's SSE. Thresholds are
    the midpoints between neighbouring centres.
    """
    L, n = xs.shape
    if n_clusters == 1:
        return xs.new_zeros(L, 0)
    gpu = available_gpu(xs) and xs.is_contiguous()
    if gpu:
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

    lloyd = _lloyd_gpu if gpu else _lloyd_torch
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
    arithmetic in the same order; the torch loop was ~45 launches a step, host time the GPU waited for."""
    from .kernels import lloyd_kernel

    L, n = xs.shape
    out = torch.empty_like(thresholds)
    lloyd_kernel[(L,)](xs, p1, p2, thresholds.contiguous(), out, n, ITERS=iters, K=n_clusters,
                       KP=1 << n_clusters.bit_length(), SIGNED=signed, STEPS=n.bit_length())
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


def rows_cluster_mda(xs: Tensor, mean: Tensor, thresholds: Tensor, *, signed: bool = False
                     ) -> tuple[Tensor, Tensor]:
    """Lower median of |x - mean| in each cluster, and each cluster's size, for sorted rows ``xs``.

    Returns ([L, K] float32 medians, [L, K] counts); an empty cluster gets
    median 0. Exact: a search over the float32 bit patterns of t finds the
    smallest t with at least k+1 of the cluster's elements inside
    [mean - t, mean + t] (an index window of the sorted row), k = (count-1)//2.
    Each round tries 255 values of t at once, so the [0, +inf) range of 2^31
    patterns shrinks to one in 4 rounds. On a GPU the rounds run in one launch
    (:func:`.kernels.cluster_median_kernel`, one program per row and cluster);
    elsewhere a few dozen torch ops, not 31 rounds of a bisection.
    """
    neg_lo, neg_hi, pos_lo, pos_hi = _cluster_ranges(xs, thresholds, signed)
    counts = (neg_hi - neg_lo) + (pos_hi - pos_lo)
    L, K = counts.shape
    if available_gpu(xs) and L:
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


def cluster_sizes(ids: Tensor, n_clusters: int) -> Tensor:
    """How many of the uint8 ``ids`` equal each cluster index (int64 [n_clusters]), without a host sync on a GPU."""
    from .fused import BLOCK, available, triton_cdiv

    if available(ids) and ids.is_contiguous() and ids.dtype == torch.uint8:
        from .kernels import id_counts_kernel

        nbins = max(2, 1 << (n_clusters - 1).bit_length())
        counts = torch.zeros(nbins, dtype=torch.long, device=ids.device)
        iters = 16
        if ids.numel():
            id_counts_kernel[(triton_cdiv(ids.numel(), iters * BLOCK),)](ids, counts, ids.numel(), NBINS=nbins,
                                                                       BLOCK=BLOCK, ITERS=iters)
        return counts[:n_clusters]
    return torch.bincount(ids.flatten().long(), minlength=n_clusters)[:n_clusters]


def assign_ids(x: Tensor, thresholds: Tensor, *, signed: bool = False) -> Tensor:
    """uint8 cluster ids shaped like ``x``: one pass on a GPU, the torch ops elsewhere."""
    from .fused import BLOCK, available, triton_cdiv

    values = x.detach()
    if available(values) and values.is_contiguous():
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
                    sizes: list[bool] | None = None, ids: bool = True
                    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """:func:`assign_ids` of every tensor of ``xs`` by its row of ``thresholds`` [L, K-1], and cluster sizes.

    Returns (uint8 ids shaped like each tensor, int64 [K] sizes of each tensor's ids or None).
    ``sizes[l]`` asks for tensor l's sizes (all of them when ``sizes`` is None); with ``ids=False``
    only the sizes are wanted, and the ids are Nones (on a GPU never written). On a GPU, with
    contiguous float32 tensors, one launch assigns every tensor and counts every size (a re-clustering
    of a 1B model has 170 layers: per-layer launches were host time the GPU waited for); elsewhere
    the per-tensor torch ops.
    """
    n_clusters = thresholds.shape[1] + 1
    sizes = [True] * len(xs) if sizes is None else sizes
    if xs and all(available_gpu(x) for x in xs) and len({x.device for x in xs}) == 1:
        from .fused import BLOCK, aligned, tensor_table
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
    found = [assign_ids(x, t, signed=signed) for x, t in zip(xs, thresholds)]
    return (found if ids else [None] * len(xs),
            [cluster_sizes(i, n_clusters) if want else None for i, want in zip(found, sizes)])


# Bit fields of the deviation's float32 pattern, high first: 8 + 8 + 8 + 7 bits (the sign bit is 0).
# Four passes of 256 bins, not three of 2048/1024: on the GPU a pass costs in proportion to its bins.
_LEVELS = ((31, 23, 256), (23, 15, 256), (15, 7, 256), (7, 0, 128))
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
                          out: Tensor, *, skip: Tensor | None = None, raw: bool = False) -> None:
    """Add one level's histogram of all ``tensors`` to ``out``: one launch on a GPU, else per tensor.

    ``means`` [T]: each tensor's mean. On a GPU only: ``raw`` tensors hold the bit patterns of
    deviations themselves (no mean is taken off), and a nonzero ``skip`` (a device flag) leaves
    ``out`` as it is, decided on the device.
    """
    match_shift, shift, nbins = level
    if all(available_gpu(x) for x in tensors):
        from .fused import BLOCK, aligned, tensor_table
        from .kernels import deviation_histogram_kernel

        rows = [(x.data_ptr(),) for x in tensors]
        table = tensor_table(rows, [x.numel() for x in tensors], _HISTOGRAM_ITERS * BLOCK, out.device)
        if table.programs:
            deviation_histogram_kernel[(table.programs,)](
                table.addresses, table.numels, means, table.block_tensor, table.first_block, prefix, out,
                prefix if skip is None else skip, MATCH_SHIFT=match_shift, SHIFT=shift, NBINS=nbins,
                GATED=skip is not None, RAW=raw, ALIGNED=aligned(a for a, in rows), BLOCK=BLOCK,
                ITERS=_HISTOGRAM_ITERS)
        return
    if skip is not None or raw:
        raise ValueError("skip and raw are for the GPU path")
    for x, mean in zip(tensors, means):
        bits = _float_bits((x.float() - mean).abs()).flatten()
        keep = (bits >> match_shift) == prefix
        out += torch.bincount((bits[keep] >> shift) & (nbins - 1), minlength=nbins)


def _select_bits(tensors: list[Tensor], means: Tensor, rank: Tensor, *,
                 reduce: Callable[[Tensor], Tensor] | None = None, skip: Tensor | None = None,
                 raw: bool = False) -> Tensor:
    """int32 bit pattern of the deviation of 0-based ``rank`` (a 0-d device tensor) among all ``tensors``.

    One histogram pass per bit field of :data:`_LEVELS`; the rank bookkeeping stays on the device.
    """
    prefix = torch.zeros((), dtype=torch.int32, device=rank.device)
    for level in _LEVELS:
        hist = torch.zeros(level[2], dtype=torch.long, device=rank.device)
        _deviation_histograms(tensors, means, prefix, level, hist, skip=skip, raw=raw)
        if reduce is not None:
            hist = reduce(hist)
        cum = hist.cumsum(0)
        b = torch.searchsorted(cum, rank.reshape(1), right=True)[0]
        rank = rank - torch.where(b > 0, cum[(b - 1).clamp(min=0)], torch.zeros_like(rank))
        prefix = (prefix << (level[0] - level[1])) | b.to(torch.int32)
    return prefix


def _bracket_median(tensors: list[Tensor], means: Tensor, rank: Tensor, total: int, sample: int
                    ) -> tuple[Tensor, Tensor]:
    """The deviation of ``rank`` among all ``tensors`` (float32 on a GPU) through a bracket: (int32 bits, found).

    ``found`` (a 0-d bool on the device) is False where the bracket missed the rank or its buffer
    overflowed; the bits are then meaningless. Three launches over the data's size, one pass over it.
    """
    from .fused import BLOCK, aligned, tensor_table, triton_cdiv
    from .kernels import deviation_bracket_kernel, deviation_sample_kernel

    device = means.device
    rows = [(x.data_ptr(),) for x in tensors]
    table = tensor_table(rows, [x.numel() for x in tensors], _HISTOGRAM_ITERS * BLOCK, device)
    ends = table.numels.cumsum(0)
    picked = torch.empty(sample, dtype=torch.int32, device=device)
    deviation_sample_kernel[(triton_cdiv(sample, BLOCK),)](
        table.addresses, table.numels, ends, means, picked, len(tensors), total, sample,
        STEPS=len(tensors).bit_length(), BLOCK=BLOCK)
    picked = picked.sort().values
    # The sample's count below the median is Binomial(sample, 1/2): standard deviation sqrt(sample) / 2.
    half = int(_BRACKET_SIGMAS * sample**0.5 / 2) + 1
    lo, hi = max(sample // 2 - half, 0), min(sample // 2 + half, sample - 1)
    bounds = picked[lo:hi + 1:hi - lo].contiguous()  # bit patterns [low, high], both inside
    slots = max(1, min(_BRACKET_SLOTS, table.programs))
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
    bits = _select_bits([inside.view(torch.float32)], means.new_zeros(1), rank.clamp(0, inside.numel() - 1), raw=True)
    return bits, found


def available_gpu(x: Tensor) -> bool:
    from .fused import available

    return available(x) and x.is_contiguous() and x.dtype == torch.float32


def deviation_median(tensors: list[Tensor], means: list[Tensor], *, total: int | None = None,
                     reduce: Callable[[Tensor], Tensor] | None = None, sample: int = MEDIAN_SAMPLE) -> Tensor:
    """Exact lower median of |x - mean| pooled over all elements of all ``tensors`` (0-d float32).

    Four passes, each a histogram of one bit field of the deviations among
    those matching the bits chosen so far (on a GPU one launch over all tensors); the rank bookkeeping stays on the
    device (no host synchronisation). The histograms are plain counts, so a
    sharded model sums them across ranks before each choice: ``tensors`` are
    then this rank's pieces, ``total`` the number of elements over all ranks,
    and ``reduce`` sums a histogram over the ranks (an all-reduce).

    On one GPU, with at least 4 * ``sample`` deviations, one pass instead of four: ``sample``
    deviations at evenly spaced positions of the pool give a bracket that holds the median
    with near certainty and a small share of the pool; one pass counts the deviations below
    it and copies those inside to a buffer, and the median is found in that buffer. The four
    passes still run, but each GPU program reads first whether the bracket held the median
    and returns at once if it did, so the result is exact either way and no host
    synchronisation decides between the two. On the 1.34 B elements of the 1B set (H100):
    3.6 ms of GPU work, where the four passes took 18 ms.
    """
    device = tensors[0].device
    total = sum(t.numel() for t in tensors) if total is None else total
    if not total:
        raise ValueError("deviation_median needs at least one value")
    rank = torch.full((), (total - 1) // 2, dtype=torch.long, device=device)  # 0-based rank of the lower median
    means = torch.cat([m.float().reshape(1) for m in means]).to(device)
    if reduce is None and 16 <= sample <= total // 4 and all(available_gpu(x) for x in tensors):
        bits, found = _bracket_median(tensors, means, rank, total, sample)
        everywhere = _select_bits(tensors, means, rank, skip=found.to(torch.int32))
        return torch.where(found, bits, everywhere).view(torch.float32)
    return _select_bits(tensors, means, rank, reduce=reduce).view(torch.float32)
