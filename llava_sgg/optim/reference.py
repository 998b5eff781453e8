"""The paper's math, one layer at a time: 1-D k-means, cluster ids, cluster and pooled medians.

Plain torch on any device, written to be read next to the paper (arXiv 2506.01049,
Algorithm 1, Eq. 5) and the spec, and tested against independent computations
(tests/test_functional.py). The re-clustering of a whole model runs the batched
versions of :mod:`.functional`, which the tests hold to these; the wrapper uses
:func:`assign_clusters` for ids derived from thresholds (``assignment="dynamic"``)
and :func:`kmeans_1d_sklearn` for ``backend="sklearn"``.

A leaf: imports nothing of this package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_GRID",
    "EXACT_SIZE",
    "assign_clusters",
    "cluster_mda",
    "float_bits",
    "kmeans_1d",
    "kmeans_1d_sklearn",
    "pooled_lower_median",
    "segment_sse",
]

# Layers with at most EXACT_SIZE values get the exact optimum of `kmeans_1d`;
# larger ones search DEFAULT_GRID split positions by rank and as many by value
# exactly, then refine: within the spec's 2% of the optimal SSE (docs/sgg.md
# gives the measured margin; tests/test_functional.py checks the bound).
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


def float_bits(t: Tensor) -> Tensor:
    """int32 bit patterns of ``t`` as float32: non-negative floats order like these integers."""
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
        hi = float_bits(t).flatten() >> 16
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
        bits = float_bits(t).flatten()
        hist_lo += torch.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    lo = int(torch.searchsorted(hist_lo.cumsum(0), torch.tensor(k_in_bin, device=device), right=True))
    return torch.tensor((hi << 16) | lo, dtype=torch.int32).view(torch.float32)

