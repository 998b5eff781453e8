"""Independent re-computations of SGG's math in numpy, for the tests.

Nothing here imports llava_sgg: these are the spec's formulas written a
second time, plainly and slowly, so the tests compare two implementations.
"""

from __future__ import annotations

import numpy as np


def optimal_kmeans_1d(values: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact 1-D k-means by the O(k n^2) dynamic programme; returns (labels, SSE).

    Labels are ordered by cluster centre (0 = smallest).
    """
    order = np.argsort(values, kind="stable")
    xs = values[order].astype(np.float64)
    n = xs.size
    s1 = np.concatenate([[0.0], np.cumsum(xs)])
    s2 = np.concatenate([[0.0], np.cumsum(xs * xs)])
    i = np.arange(n + 1)[:, None]
    j = np.arange(n + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (s2[j] - s2[i]) - (s1[j] - s1[i]) ** 2 / (j - i)
    cost = np.where(j > i, np.maximum(cost, 0.0), np.inf)
    best = cost[0].copy()
    back = []
    for _ in range(k - 1):
        total = best[:, None] + cost
        back.append(total.argmin(axis=0))
        best = total.min(axis=0)
    bounds = [n]
    for arg in reversed(back):
        bounds.append(arg[bounds[-1]])
    bounds = [0] + bounds[::-1][:-1] + [n] if k > 1 else [0, n]
    bounds = sorted(set([0, n] + list(bounds)))
    labels_sorted = np.zeros(n, dtype=np.int64)
    for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        labels_sorted[a:b] = c
    labels = np.empty(n, dtype=np.int64)
    labels[order] = labels_sorted
    return labels, float(best[n])


def sse(values: np.ndarray, labels: np.ndarray) -> float:
    values = values.astype(np.float64)
    return float(sum(((values[labels == c] - values[labels == c].mean()) ** 2).sum() for c in np.unique(labels)))


def lower_median(values: np.ndarray) -> float:
    s = np.sort(values.ravel())
    return float(s[(s.size - 1) // 2])


def sgg_recluster(stats: list[np.ndarray], k: int, scales: list[np.ndarray], beta3: float,
                  bounds=(0.1, 10.0), eps=1e-8):
    """Spec step 2 for every layer: returns (ids per layer, new scales per layer, global MDA)."""
    ids, devs, mdas = [], [], []
    for x in stats:
        x = x.astype(np.float32)
        labels, _ = optimal_kmeans_1d(np.abs(x).ravel(), k)
        dev = np.abs(x - x.mean(dtype=np.float32)).ravel()
        ids.append(labels.reshape(x.shape))
        devs.append(dev)
        mdas.append([lower_median(dev[labels == c]) if (labels == c).any() else None for c in range(k)])
    global_mda = lower_median(np.concatenate(devs))
    new_scales = []
    for s, mda in zip(scales, mdas):
        s = s.copy()
        for c, d in enumerate(mda):
            if d is not None:
                r = min(max(global_mda / (d + eps), bounds[0]), bounds[1])
                s[c] = beta3 * s[c] + (1 - beta3) * r
        new_scales.append(s)
    return ids, new_scales, global_mda
