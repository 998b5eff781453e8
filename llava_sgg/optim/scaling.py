"""The scaling rule: how a re-clustering moves each cluster's scale.

The one place a rule lives. :func:`mda_scales` is the paper's rule (``"mda"``,
Eq. 6-7): each cluster's scale moves, by an EMA, toward the ratio of the
model-wide median absolute deviation to the cluster's own. The authors' later
published rule (``"mean_ratio"``, their code's "version 2") is to sit beside it
here, with the same shape of result: every layer's new [K] scales from its
previous ones and the statistics the re-clustering measured. The wrapper
(:meth:`.sgg.SGG._recluster`) calls the rule once per device, for all layers at
once ([L, K] tensors: a few launches instead of some ten per layer).

A leaf: imports nothing of this package.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["carried_kmeans_ids", "ema_scales", "mda_scales", "mean_ratio_scales", "target_scales"]


def target_scales(global_mda: float | Tensor, mda: Tensor, scale_bounds: tuple[float, float], eps: float) -> Tensor:
    """Eq. 6 with the clamp: r_c = clamp(D / (D_c + eps), lower, upper)."""
    return (global_mda / (mda + eps)).clamp(scale_bounds[0], scale_bounds[1])


def ema_scales(scales: Tensor, target: Tensor, counts: Tensor, beta3: float) -> Tensor:
    """Eq. 7: S <- beta3 * S + (1 - beta3) * r; an empty cluster keeps its scale."""
    updated = beta3 * scales + (1 - beta3) * target.to(scales.dtype)
    return torch.where(counts.to(scales.device) > 0, updated, scales)


def mda_scales(previous: Tensor, global_mda: Tensor, cluster_mda: Tensor, counts: Tensor, *,
               scale_bounds: tuple[float, float], eps: float, beta3: float) -> Tensor:
    """The paper's rule: [L, K] scales after a re-clustering, from the [L, K] ``previous`` ones.

    ``global_mda``: the model-wide median absolute deviation D (0-d); ``cluster_mda``: each
    cluster's own D_{l,c}; ``counts``: each cluster's size (an empty cluster keeps its scale).
    """
    return ema_scales(previous, target_scales(global_mda, cluster_mda, scale_bounds, eps), counts, beta3)


def mean_ratio_scales(previous: Tensor, cluster_means: Tensor, layer_mean: Tensor, sums: Tensor, counts: Tensor, *,
                      mean_decay: float, beta3: float, scale_bounds: tuple[float, float],
                      eps: float) -> tuple[Tensor, Tensor]:
    """The authors' published rule (OpenToMe ``adamw_sgg.py``, "version 2") for one layer: its [K] scales
    and its [K] EMA of cluster means after a re-clustering.

    ``layer_mean``: the layer's mean |m|; ``sums`` and ``counts``: each cluster's sum of |m| and size.
    A cluster's mean |m| (the layer's, for an empty cluster) enters an EMA of decay ``mean_decay``
    that starts at 1; the target is the layer's mean over that EMA (floored at ``eps``); the scale
    is an EMA of decay ``beta3``, starting at 1, of the target, clamped to ``scale_bounds``. Both
    EMAs start at 1 whatever the size of |m|: with |m| far below 1 the targets stay near 0 for many
    re-clusterings and every scale decays by about ``beta3`` per re-clustering (docs/sgg.md).
    """
    current = torch.where(counts > 0, sums / counts.clamp(min=1), layer_mean)
    means = cluster_means * mean_decay + current * (1 - mean_decay)
    target = layer_mean / means.clamp(min=eps)
    scales = (previous * beta3 + target * (1 - beta3)).clamp(scale_bounds[0], scale_bounds[1])
    return scales, means


def carried_kmeans_ids(layer: dict, magnitude: Tensor, n_clusters: int, seed: int = 42) -> Tensor:
    """The authors' clustering of one layer's |m|: a scikit-learn MiniBatchKMeans (``random_state`` 42,
    ``batch_size`` 128) fitted once more with ``partial_fit`` at every re-clustering, then its labels.

    The estimator lives in ``layer`` as tensors (its centres, counts, step counters and random
    state), so that a state dict holds it and a resumed run clusters as an uninterrupted one.
    Labels are the estimator's own numbering (not ordered by centre), as in their code.
    """
    import numpy as np
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, batch_size=128)
    if "km_centers" in layer:  # the estimator of the last re-clustering, rebuilt
        from sklearn.utils._openmp_helpers import _openmp_effective_n_threads

        counters = layer["km_counters"].tolist()  # n_steps_, _n_since_last_reassign, _batch_size, pos, has_gauss
        km.cluster_centers_ = layer["km_centers"].cpu().numpy().reshape(n_clusters, 1).copy()
        km._counts = layer["km_counts"].cpu().numpy().copy()
        km.n_steps_, km._n_since_last_reassign, km._batch_size = counters[:3]
        km.n_features_in_, km._n_threads = 1, _openmp_effective_n_threads()
        km._random_state = np.random.RandomState()
        km._random_state.set_state(("MT19937", layer["km_rng"].cpu().numpy().astype(np.uint32), counters[3],
                                    counters[4], float(layer["km_gauss"])))
    features = magnitude.float().cpu().numpy().reshape(-1, 1)
    km.partial_fit(features)
    ids = torch.from_numpy(km.predict(features).astype(np.int64))
    _, keys, pos, has_gauss, gauss = km._random_state.get_state()
    layer["km_centers"] = torch.from_numpy(km.cluster_centers_.reshape(-1).copy())
    layer["km_counts"] = torch.from_numpy(km._counts.copy())
    layer["km_counters"] = torch.tensor([km.n_steps_, km._n_since_last_reassign, km._batch_size, pos, has_gauss])
    layer["km_rng"] = torch.from_numpy(keys.astype(np.int64))
    layer["km_gauss"] = torch.tensor(gauss, dtype=torch.float64)
    return ids.to(magnitude.device)
