"""SGG's pure functions against independent numpy computations (tests/reference.py)."""

import numpy as np
import pytest
import torch

from llava_sgg.optim import functional as F
from reference import lower_median, optimal_kmeans_1d, sse


def _labels(values: np.ndarray, k: int) -> np.ndarray:
    t = torch.from_numpy(values)
    return F.assign_clusters(t, F.kmeans_1d(t, k)).numpy()


def _distributions(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gaussian_magnitude": np.abs(rng.normal(size=n)),
        "laplace_magnitude": np.abs(rng.laplace(size=n)),
        "heavy_tailed": np.abs(rng.standard_t(1.5, size=n)),
        "bimodal": np.concatenate([rng.normal(0, 1, n // 2), rng.normal(8, 0.5, n - n // 2)]),
        "signed": rng.normal(size=n),
        "tiny_values": np.abs(rng.normal(scale=1e-7, size=n)),
    }


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kmeans_is_exact_on_layers_up_to_the_grid(k):
    for name, values in _distributions(700, seed=k).items():
        values = values.astype(np.float32)
        _, best = optimal_kmeans_1d(values, k)
        got = sse(values, _labels(values, k))
        assert got <= best * (1 + 1e-6) + 1e-30, name


@pytest.mark.parametrize("k", [2, 3, 4])
def test_kmeans_sse_within_two_percent_of_optimal_on_large_layers(k):
    for name, values in _distributions(2500, seed=10 + k).items():
        values = values.astype(np.float32)
        _, best = optimal_kmeans_1d(values, k)
        got = sse(values, _labels(values, k))
        assert got <= best * 1.02, f"{name}: SSE {got} vs optimal {best}"


def test_cluster_ids_are_ordered_by_centre():
    values = np.abs(np.random.default_rng(0).standard_t(2, size=900)).astype(np.float32)
    labels = _labels(values, 4)
    centres = [values[labels == c].mean() for c in range(4)]
    assert centres == sorted(centres)
    # Groups are contiguous intervals: every value of group c is below every value of group c + 1.
    for c in range(3):
        assert values[labels == c].max() < values[labels == c + 1].min()


def test_fewer_distinct_values_than_clusters():
    t = torch.tensor([2.0, 2.0, 5.0, 2.0, 5.0])
    thresholds = F.kmeans_1d(t, 4)
    assert thresholds.shape == (3,)
    assert F.assign_clusters(t, thresholds).tolist() == [0, 0, 1, 0, 1]
    zeros = torch.zeros(6)
    assert F.assign_clusters(zeros, F.kmeans_1d(zeros, 3)).tolist() == [0] * 6


def test_kmeans_keeps_dtype_and_device_and_k1_has_no_thresholds():
    t = torch.rand(100, dtype=torch.bfloat16)
    assert F.kmeans_1d(t, 3).dtype == torch.bfloat16
    assert F.kmeans_1d(t, 1).numel() == 0


def test_sklearn_backend_finds_the_same_groups_on_separated_data():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0, 0.1, 300), rng.normal(5, 0.1, 300), rng.normal(10, 0.1, 300)])
    t = torch.from_numpy(values.astype(np.float32))
    ours = F.assign_clusters(t, F.kmeans_1d(t, 3))
    theirs = F.assign_clusters(t, F.kmeans_1d_sklearn(t, 3, seed=0))
    assert torch.equal(ours, theirs)
    assert torch.equal(ours.bincount(), torch.tensor([300, 300, 300]))


@pytest.mark.parametrize("sizes", [[1], [2], [5, 6], [1000, 3, 777], [4097]])
def test_pooled_lower_median_is_exact(sizes):
    rng = np.random.default_rng(len(sizes))
    chunks = [np.abs(rng.standard_t(2, size=n)).astype(np.float32) for n in sizes]
    got = F.pooled_lower_median(lambda: [torch.from_numpy(c) for c in chunks])
    assert got.item() == lower_median(np.concatenate(chunks))


def test_pooled_lower_median_with_ties_and_zeros():
    chunks = [torch.zeros(10), torch.tensor([0.0, 3.0, 3.0, 3.0]), torch.full((7,), 1e-30)]
    expected = lower_median(np.concatenate([c.numpy() for c in chunks]))
    assert F.pooled_lower_median(lambda: chunks).item() == expected


def test_cluster_mda_is_the_lower_median_per_cluster_and_empty_clusters_count_zero():
    dev = torch.tensor([1.0, 4.0, 2.0, 9.0, 3.0, 8.0])
    ids = torch.tensor([0, 0, 0, 2, 0, 2], dtype=torch.int32)
    mda, counts = F.cluster_mda(dev, ids, 3)
    assert mda.tolist() == [2.0, 0.0, 8.0]
    assert counts.tolist() == [4, 0, 2]


def test_target_scales_and_ema_follow_eq6_and_eq7():
    mda = torch.tensor([0.0, 1e-3, 2.0])
    r = F.target_scales(0.5, mda, (0.1, 10.0), 1e-8)
    assert torch.allclose(r, torch.tensor([10.0, min(0.5 / (1e-3 + 1e-8), 10.0), 0.25]))
    scales = torch.tensor([1.0, 2.0, 3.0])
    new = F.ema_scales(scales, r, torch.tensor([5, 0, 1]), 0.9)
    assert torch.allclose(new, torch.tensor([0.9 + 0.1 * 10.0, 2.0, 0.9 * 3.0 + 0.1 * 0.25]))


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 3, 5])
def test_kmeans_quality_over_many_seeds_and_larger_layers(k):
    for seed in range(8):
        for name, values in _distributions(5000, seed=1000 * k + seed).items():
            values = values.astype(np.float32)
            _, best = optimal_kmeans_1d(values, k)
            got = sse(values, _labels(values, k))
            assert got <= best * 1.02, f"{name} seed {seed}: SSE {got} vs optimal {best}"
