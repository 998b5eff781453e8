"""SGG's pure functions against independent numpy computations (tests/reference.py)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from llava_sgg.optim import functional as F
from llava_sgg.optim import reference as R
from llava_sgg.optim import scaling
from reference import lower_median, optimal_kmeans_1d, sse


def _labels(values: np.ndarray, k: int) -> np.ndarray:
    t = torch.from_numpy(values)
    return R.assign_clusters(t, R.kmeans_1d(t, k)).numpy()


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


# K=3, the paper's, by default; the other K with the slow checks.
@pytest.mark.parametrize("k", [pytest.param(2, marks=pytest.mark.slow), 3, pytest.param(4, marks=pytest.mark.slow)])
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
    thresholds = R.kmeans_1d(t, 4)
    assert thresholds.shape == (3,)
    assert R.assign_clusters(t, thresholds).tolist() == [0, 0, 1, 0, 1]
    zeros = torch.zeros(6)
    assert R.assign_clusters(zeros, R.kmeans_1d(zeros, 3)).tolist() == [0] * 6


def test_kmeans_keeps_dtype_and_device_and_k1_has_no_thresholds():
    t = torch.rand(100, dtype=torch.bfloat16)
    assert R.kmeans_1d(t, 3).dtype == torch.bfloat16
    assert R.kmeans_1d(t, 1).numel() == 0


def test_sklearn_backend_finds_the_same_groups_on_separated_data():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0, 0.1, 300), rng.normal(5, 0.1, 300), rng.normal(10, 0.1, 300)])
    t = torch.from_numpy(values.astype(np.float32))
    ours = R.assign_clusters(t, R.kmeans_1d(t, 3))
    theirs = R.assign_clusters(t, R.kmeans_1d_sklearn(t, 3, seed=0))
    assert torch.equal(ours, theirs)
    assert torch.equal(ours.bincount(), torch.tensor([300, 300, 300]))


@pytest.mark.parametrize("sizes", [[1], [2], [5, 6], [1000, 3, 777], [4097]])
def test_pooled_lower_median_is_exact(sizes):
    rng = np.random.default_rng(len(sizes))
    chunks = [np.abs(rng.standard_t(2, size=n)).astype(np.float32) for n in sizes]
    got = R.pooled_lower_median(lambda: [torch.from_numpy(c) for c in chunks])
    assert got.item() == lower_median(np.concatenate(chunks))


def test_pooled_lower_median_with_ties_and_zeros():
    chunks = [torch.zeros(10), torch.tensor([0.0, 3.0, 3.0, 3.0]), torch.full((7,), 1e-30)]
    expected = lower_median(np.concatenate([c.numpy() for c in chunks]))
    assert R.pooled_lower_median(lambda: chunks).item() == expected


def test_cluster_mda_is_the_lower_median_per_cluster_and_empty_clusters_count_zero():
    dev = torch.tensor([1.0, 4.0, 2.0, 9.0, 3.0, 8.0])
    ids = torch.tensor([0, 0, 0, 2, 0, 2], dtype=torch.int32)
    mda, counts = R.cluster_mda(dev, ids, 3)
    assert mda.tolist() == [2.0, 0.0, 8.0]
    assert counts.tolist() == [4, 0, 2]


def test_target_scales_and_ema_follow_eq6_and_eq7():
    mda = torch.tensor([0.0, 1e-3, 2.0])
    r = scaling.target_scales(0.5, mda, (0.1, 10.0), 1e-8)
    assert torch.allclose(r, torch.tensor([10.0, min(0.5 / (1e-3 + 1e-8), 10.0), 0.25]))
    scales = torch.tensor([1.0, 2.0, 3.0])
    new = scaling.ema_scales(scales, r, torch.tensor([5, 0, 1]), 0.9)
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


def test_assign_ids_many_equals_the_ids_and_sizes_of_each_layer():
    g = torch.Generator().manual_seed(3)
    layers = [torch.randn(40, 30, generator=g) ** 3, torch.randn(1000, generator=g), torch.randn(7, 3, generator=g)]
    thresholds = torch.tensor([[0.2, 1.5], [0.5, 0.9], [0.0, 0.1]])
    ids, sizes = F.assign_ids_many(layers, thresholds, sizes=[True, False, True])
    for x, t, got, size in zip(layers, thresholds, ids, sizes):
        expected = (x.abs()[..., None] > t).sum(-1)  # id = thresholds strictly below |x|
        assert got.dtype == torch.uint8 and got.shape == x.shape
        assert torch.equal(got.long(), expected)
        if size is not None:
            assert size.tolist() == [int((expected == c).sum()) for c in range(3)]
    assert sizes[1] is None
    none, only_sizes = F.assign_ids_many(layers, thresholds, ids=False)  # dynamic ids want the sizes alone
    assert none == [None] * 3
    assert [s.tolist() for s in only_sizes] == [s.tolist() for s in F.assign_ids_many(layers, thresholds)[1]]


@pytest.mark.slow  # Triton's interpreter, in a process of its own
def test_batched_kmeans_gpu_kernels_equal_the_torch_path_under_the_triton_interpreter():
    """The Lloyd kernel gives the torch loop's thresholds to the bit, the fused prefix sums its sums up to
    rounding, the multi-tensor id kernel each layer's ids and sizes (Triton's interpreter, on the CPU)."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from llava_sgg.optim import functional as F
        g = torch.Generator().manual_seed(0)
        for k, signed, n in [(3, False, 3000), (2, True, 1500), (4, False, 1100), (3, False, 600)]:
            xs = (torch.randn(3, n, generator=g) ** 3 * torch.rand(3, 1, generator=g)).sort(dim=1).values
            p1 = F._row_prefix_sums(xs if signed else xs.abs())
            p2 = F._row_prefix_sums(xs.double().square())
            reference = F.kmeans_1d_rows(xs, k, signed=signed, kernels=False)
            fused1, fused2 = F._prefix_sums_gpu(xs, signed)
            torch.testing.assert_close(fused1, p1, rtol=1e-12, atol=1e-9)
            torch.testing.assert_close(fused2, p2, rtol=1e-12, atol=1e-9)
            # The Lloyd steps alone, from the same start and the same sums: equal to the bit.
            torch_loop = F.kmeans_1d_rows(xs, k, signed=signed, kernels=False)
            gpu_loop = F._lloyd_gpu(xs, p1, p2, start_thresholds(xs, k, signed), k, signed, 10)
            assert torch.equal(gpu_loop, torch_loop), (k, signed, n)
            assert torch.equal(F.kmeans_1d_rows(xs, k, signed=signed, kernels=True), reference), (k, signed, n)
        layers = [torch.randn(300, 70, generator=g) ** 3, torch.randn(5000, generator=g)[1:]]
        thresholds = torch.tensor([[0.2, 1.5], [0.5, 0.9]])
        ids, sizes = F.assign_ids_many(layers, thresholds, kernels=True)
        for x, t, got, size in zip(layers, thresholds, ids, sizes):
            expected = (x.abs()[..., None] > t).sum(-1)
            assert torch.equal(got.long(), expected)
            assert size.tolist() == [int((expected == c).sum()) for c in range(3)]
        none, only_sizes = F.assign_ids_many(layers, thresholds, ids=False, kernels=True)  # the count-only kernel
        assert none == [None, None] and [s.tolist() for s in only_sizes] == [s.tolist() for s in sizes]
        # The group-median search in one launch: the torch search's medians to the bit, ties and empty groups too.
        for signed in (False, True):
            xs = (torch.randn(3, 3000, generator=g) ** 3).sort(dim=1).values
            xs[1, :1000] = xs[1, 1000]
            thresholds = torch.tensor([[0.2, 1.5], [0.1, 0.3], [100.0, 200.0]]) * (torch.tensor([-1.0, 1.0]) if signed else 1)
            means = xs.mean(dim=1)
            expected = F.rows_cluster_mda(xs, means, thresholds, signed=signed, kernels=False)
            got = F.rows_cluster_mda(xs, means, thresholds, signed=signed, kernels=True)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), signed
        print("ok")
    """)
    helper = textwrap.dedent("""
        import llava_sgg.optim.functional as F
        def start_thresholds(xs, k, signed):  # the dynamic programme's thresholds, before any Lloyd step
            captured = {}
            original = F._partition_sse
            def first_call(xs_, p1, p2, thresholds, signed_):
                captured.setdefault("t", thresholds.clone())
                return original(xs_, p1, p2, thresholds, signed_)
            F._partition_sse = first_call
            try:
                F.kmeans_1d_rows(xs, k, signed=signed, lloyd_iters=1, kernels=False)
            finally:
                F._partition_sse = original
            return captured["t"]
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", helper + script], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
