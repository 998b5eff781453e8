"""The batched re-clustering functions and the fused GPU steps, against independent computations.

CPU tests check the batched k-means, cluster medians, pooled median and ids
(the code every device runs); tests marked for CUDA compare the Triton path
with the reference path of llava_sgg.optim.steps on the same inputs; a slow
test runs the Triton kernels on the CPU through Triton's interpreter.
"""

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch

from llava_sgg.optim import Lamb, build_optimizer
from llava_sgg.optim import functional as F
from reference import lower_median, optimal_kmeans_1d, sse

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _layers(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(300, generator=g) ** 3, torch.empty(300).exponential_(generator=g) * torch.randn(300).sign(),
            torch.cat([torch.randn(150, generator=g) * 0.1, 3 + torch.randn(150, generator=g)])]


def _ids(x, thresholds, signed=False):
    values = x.numpy() if signed else np.abs(x.numpy())
    return (values[:, None] > thresholds.numpy()[None, :]).sum(axis=1)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kmeans_rows_finds_the_optimal_partition_of_small_layers(k):
    rows = torch.stack(_layers(0)).sort(dim=1).values
    thresholds = F.kmeans_1d_rows(rows, k)
    for row, t in zip(rows, thresholds):
        values = np.abs(row.numpy())
        _, best = optimal_kmeans_1d(values, k)
        assert sse(values, _ids(row, t)) == pytest.approx(best, rel=1e-9, abs=1e-12)


@pytest.mark.slow  # the default suite checks the bound at K=3 (test_functional.py)
def test_kmeans_rows_on_large_layers_is_within_the_spec_bound():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4000, generator=g) ** 3
    rows = values[None].sort(dim=1).values
    thresholds = F.kmeans_1d_rows(rows, 3, exact_size=1000, grid=64)
    _, best = optimal_kmeans_1d(np.abs(values.numpy()), 3)
    assert sse(np.abs(values.numpy()), _ids(values, thresholds[0])) <= 1.02 * best


@pytest.mark.parametrize("signed", [False, True])
def test_rows_cluster_mda_gives_each_clusters_lower_median_deviation(signed):
    rows = torch.stack(_layers(2)).sort(dim=1).values
    means = rows.mean(dim=1)
    thresholds = F.kmeans_1d_rows(rows, 3, signed=signed)
    medians, counts = F.rows_cluster_mda(rows, means, thresholds, signed=signed)
    for row, mean, t, med, cnt in zip(rows, means, thresholds, medians, counts):
        ids = _ids(row, t, signed)
        dev = np.abs(row.numpy() - mean.numpy())
        for c in range(3):
            assert cnt[c] == (ids == c).sum()
            expected = lower_median(dev[ids == c]) if (ids == c).any() else 0.0
            assert float(med[c]) == pytest.approx(expected, rel=1e-6)


def test_deviation_median_is_the_lower_median_of_all_deviations_pooled():
    layers = _layers(3)
    means = [x.mean() for x in layers]
    pooled = np.concatenate([np.abs(x.numpy() - m.numpy()) for x, m in zip(layers, means)])
    assert float(F.deviation_median(layers, means)) == lower_median(pooled)


def test_assign_ids_counts_the_thresholds_below_each_magnitude():
    x = _layers(4)[0].view(20, 15)
    ids = F.assign_ids(x, torch.tensor([0.2, 1.5]))
    assert ids.dtype == torch.uint8 and ids.shape == x.shape
    np.testing.assert_array_equal(ids.flatten().numpy(), _ids(x.flatten(), torch.tensor([0.2, 1.5])))


def _train(name, device, fused, dtype=torch.float32, **options):
    g = torch.Generator().manual_seed(0)
    shapes = [(333, 700), (700,), (1200, 900)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    opt = build_optimizer(params, name, lr=1e-2, recluster_interval=2, fused=fused, exact_limit=2**19,
                          sample_size=2**17, **options)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
        opt.step()
    return [p.detach().float().cpu() for p in params]


@cuda
@pytest.mark.parametrize("name", ["adamw_sgg", "lamb_sgg", "adafactor_sgg"])
@pytest.mark.parametrize("assignment", ["frozen", "dynamic"])
def test_fused_gpu_steps_equal_the_reference_path(name, assignment):
    fused = _train(name, "cuda", True, assignment=assignment)
    reference = _train(name, "cuda", False, assignment=assignment)
    for a, b in zip(fused, reference):
        assert float((a - b).norm() / b.norm()) < 1e-6


@cuda
def test_fused_gpu_step_in_bf16_stays_close_to_the_reference():
    fused = _train("adamw_sgg", "cuda", True, torch.bfloat16)
    reference = _train("adamw_sgg", "cuda", False, torch.bfloat16)
    for a, b in zip(fused, reference):
        assert float((a - b).norm() / b.norm()) < 1e-2


@cuda
def test_lamb_on_the_gpu_equals_lamb_on_the_cpu():
    results = []
    for device in ("cuda", "cpu"):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(300, 500, generator=g).to(device))
        opt = Lamb([p], lr=1e-2, weight_decay=0.1)
        for _ in range(5):
            p.grad = torch.randn(p.shape, generator=g).to(device)
            opt.step()
        results.append(p.detach().cpu())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)


@cuda
def test_gpu_deviation_median_and_ids_equal_the_cpu_ones():
    g = torch.Generator().manual_seed(5)
    layers = [torch.randn(1000, 999, generator=g) ** 3, torch.randn(4096, generator=g)]
    means = [x.mean() for x in layers]
    gpu = [x.cuda() for x in layers]
    assert float(F.deviation_median(gpu, [x.mean() for x in gpu])) == pytest.approx(
        float(F.deviation_median(layers, means)), rel=1e-6)
    t = torch.tensor([0.1, 1.0])
    ids = F.assign_ids(gpu[0], t.cuda())
    assert torch.equal(ids.cpu(), F.assign_ids(layers[0], t))
    assert torch.equal(F.cluster_sizes(ids, 3).cpu(), torch.bincount(ids.cpu().flatten().long(), minlength=3))
    # Tensors that start off a 16-byte boundary take the kernels' unaligned variant.
    odd = [x[1:] for x in gpu]
    expected = torch.cat([(x[1:] - x[1:].mean()).abs().flatten() for x in layers]).sort().values
    assert float(F.deviation_median(odd, [x.mean() for x in odd])) == pytest.approx(
        float(expected[(expected.numel() - 1) // 2]), rel=1e-6)


def _lower_median_of_deviations(layers, means):
    d = torch.cat([(x - m).abs().flatten() for x, m in zip(layers, means)]).sort().values
    return float(d[(d.numel() - 1) // 2])


@cuda
def test_gpu_deviation_median_through_a_bracket_is_exact_and_the_full_passes_take_over_when_it_fails(monkeypatch):
    g = torch.Generator().manual_seed(6)
    flat = torch.randn(1 + 70_001, generator=g)
    layers = [torch.randn(400, 1000, generator=g) ** 3, flat[1:], (torch.randn(30_000, generator=g) * 4).round(),
              torch.randn(77, generator=g)]  # heavy tails, off a 16-byte boundary, many ties, a partial block
    periodic = (100 + torch.randn(4096, generator=g)) * torch.randn(4096, generator=g).sign()
    periodic[::4] = 0  # the evenly spaced sample sees only these: its bracket misses the median

    def check(layers, sample, found_expected):
        layers = [x.cuda() for x in layers]
        means = [x.mean() for x in layers]
        expected = _lower_median_of_deviations(layers, means)
        total = sum(x.numel() for x in layers)
        rank = torch.full((), (total - 1) // 2, device="cuda")
        bits, found = F._bracket_median(layers, torch.stack(means), rank, total, sample)
        assert bool(found) == found_expected
        if found_expected:
            assert float(bits.view(torch.float32)) == expected
        assert float(F.deviation_median(layers, means, sample=sample)) == expected

    check(layers, 1024, True)
    check(layers, 2**14, True)
    check([periodic], 1024, False)
    # More deviations inside the bracket than its buffer holds: the overflow is seen, the full passes run.
    monkeypatch.setattr(F, "_BRACKET_ROOM", 0.0)
    monkeypatch.setattr(F, "_HISTOGRAM_ITERS", 1)
    monkeypatch.setattr(F, "_BRACKET_SIGMAS", 1000)
    check(layers, 1024, False)


def _assert_fused_adam_equals_the_reference(make_params, **options):
    """Five AdamW+SGG steps (re-clustering every 2) of make_params(generator), fused and not: same parameters."""
    results = []
    for fused in (True, False):
        g = torch.Generator().manual_seed(0)
        params = make_params(g)
        opt = build_optimizer(params, "adamw_sgg", lr=1e-2, recluster_interval=2, fused=fused, **options)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).cuda()
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for a, b in zip(*results):
        assert float((a - b).norm() / b.norm()) < 1e-6


@cuda
def test_multi_tensor_adam_step_on_unaligned_views_equals_the_reference():
    def params(g):
        flat = torch.randn(1 + 333 * 70 + 50 * 9, generator=g).cuda()
        return [torch.nn.Parameter(flat[1:1 + 333 * 70].view(333, 70)), torch.nn.Parameter(flat[-50 * 9:].view(50, 9))]

    _assert_fused_adam_equals_the_reference(params)


@cuda
@pytest.mark.parametrize("assignment", ["frozen", "dynamic"])
def test_adam_step_of_a_group_mixing_large_and_small_tensors_equals_the_reference(assignment):
    from llava_sgg.optim import fused as fused_module

    def params(g):
        rows = fused_module.LARGE // 1024 + 3  # (rows, 1025): above the per-tensor threshold, partial last block
        flat = torch.randn(1 + rows * 1025, generator=g).cuda()
        return [torch.nn.Parameter(torch.randn(fused_module.LARGE // 1024, 1024, generator=g).cuda()),
                torch.nn.Parameter(flat[1:].view(rows, 1025)),  # large and off a 16-byte boundary
                torch.nn.Parameter(torch.randn(333, 70, generator=g).cuda()),
                torch.nn.Parameter(torch.randn(fused_module.LARGE + 5, generator=g).cuda()),  # large, no scale
                torch.nn.Parameter(torch.randn(700, generator=g).cuda())]

    _assert_fused_adam_equals_the_reference(params, assignment=assignment)


def replayed_run(device, sgg_fused, base_fused=False, assignment="frozen", large=None):
    """AdamW+SGG through what a cached step plan must notice.

    Returns the parameters, the number of plans built, and whether the optimizer was freed on
    release without the garbage collector.

    Gradients are sometimes new tensors (zero_grad(set_to_none=True): at step 5 alone, the plan
    replays with its tables re-pointed) and sometimes updated in place (the same addresses: the plan
    replays); the LR changes every step; a parameter skips a step; a param group is added; the state
    is reloaded; re-clusterings replace the scales.
    """
    from llava_sgg.optim import SGG
    from llava_sgg.optim import fused as fused_module

    built = []

    class CountingPlan(fused_module.AdamPlan):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    real, fused_module.AdamPlan = fused_module.AdamPlan, CountingPlan
    saved_large = fused_module.LARGE
    fused_module.LARGE = large or saved_large
    try:
        g = torch.Generator().manual_seed(0)
        shapes = [(33, 70), (70,), (20, 9), (9, 9)]
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
        groups = [{"params": params[:2]}, {"params": params[2:3], "weight_decay": 0.1, "lr": 3e-3}]
        base = torch.optim.AdamW(groups, lr=1e-2, fused=base_fused or None, foreach=None if base_fused else False)
        opt = SGG(base, recluster_interval=4, assignment=assignment, fused=sgg_fused)
        for step in range(14):  # re-clusterings at steps 3, 7, 11 (0-based); before 3, the base's own step
            if step == 7:
                opt.add_param_group({"params": [params[3]]})
            for p in params if step >= 7 else params[:3]:
                grad = torch.randn(p.shape, generator=g).to(device)
                if step % 2 and step != 5 and p.grad is not None:
                    p.grad.copy_(grad)  # same tensor, same address
                else:
                    p.grad = grad
            if step == 6:
                params[1].grad = None  # skips this step
            if step == 10:
                opt.load_state_dict(opt.state_dict())
            opt.step()
            for group in opt.param_groups:  # an LR schedule
                group["lr"] *= 0.9
        result = [p.detach().float().cpu() for p in params]
        gc.disable()
        try:  # reference counting alone frees a dropped SGG: its plan holds no reference back to it
            alive = weakref.ref(opt)
            del opt, base
            freed = alive() is None
        finally:
            gc.enable()
        return result, len(built), freed
    finally:
        fused_module.AdamPlan, fused_module.LARGE = real, saved_large


@cuda
@pytest.mark.parametrize("base_fused", [True, False])  # step counts on the device, on the host
@pytest.mark.parametrize("assignment", ["frozen", "dynamic"])
def test_replayed_adam_steps_equal_the_reference_path(base_fused, assignment):
    from llava_sgg.optim import fused as fused_module

    fused, plans, _ = replayed_run("cuda", True, base_fused, assignment, large=2000)
    reference, _, _ = replayed_run("cuda", False, False, assignment)
    for a, b in zip(fused, reference):
        assert float((a - b).norm() / b.norm()) < 1e-6
    # Eight fused steps (4-6, 8-10, 12-13); a plan is built at 4 (first), 6 (a gradient is missing),
    # 8 and 12 (after re-clusterings) and 10 (state reloaded); 5 (new gradients), 9 and 13 replay it.
    assert plans == 5
    assert fused_module.LARGE == 1 << 22


@cuda
@pytest.mark.parametrize("k,signed", [(3, False), (2, True), (4, False)])
def test_gpu_batched_kmeans_equals_the_torch_loop_and_ids_of_all_layers_equal_each_layers(k, signed):
    g = torch.Generator().manual_seed(k)
    xs = ((torch.randn(6, 70_000, generator=g) ** 3) * torch.rand(6, 1, generator=g)).cuda().sort(dim=1).values
    gpu = F.kmeans_1d_rows(xs, k, signed=signed)  # fused prefix sums, Lloyd kernel
    p1, p2 = F._prefix_sums_gpu(xs, signed)
    torch_path = F.kmeans_1d_rows(xs, k, signed=signed, kernels=False)
    torch.testing.assert_close(p1, F._row_prefix_sums(xs if signed else xs.abs()), rtol=1e-12, atol=1e-6)
    torch.testing.assert_close(p2, F._row_prefix_sums(xs.double().square()), rtol=1e-12, atol=1e-6)
    # Same thresholds up to the prefix sums' rounding order (in practice equal).
    torch.testing.assert_close(gpu, torch_path, rtol=1e-6, atol=0)
    # With the same sums, the Lloyd kernel is the torch loop to the bit.
    start = F.kmeans_1d_rows(xs, k, signed=signed, lloyd_iters=1, grid=64, kernels=False)
    assert torch.equal(F._lloyd_gpu(xs, p1, p2, start, k, signed, 10),
                       F._lloyd_torch(xs, p1, p2, start, k, signed, 10))
    layers = [xs[0, :60_000].reshape(300, 200).contiguous(), xs[1, 1:].contiguous(), xs[2, 3:].contiguous()[1:]]
    thresholds = torch.stack([F.kmeans_1d_rows(x.reshape(1, -1).sort(dim=1).values, 3)[0] for x in layers])
    ids, sizes = F.assign_ids_many(layers, thresholds, signed=signed)
    for x, t, got, size in zip(layers, thresholds, ids, sizes):
        expected = F.assign_ids(x.cpu(), t.cpu(), signed=signed)
        assert torch.equal(got.cpu(), expected)
        assert torch.equal(size.cpu(), torch.bincount(expected.flatten().long(), minlength=3))


@cuda
@pytest.mark.parametrize("signed", [False, True])
def test_gpu_cluster_median_search_equals_the_torch_search_to_the_bit(signed):
    g = torch.Generator().manual_seed(7)
    xs = ((torch.randn(5, 300_000, generator=g) ** 3) * torch.rand(5, 1, generator=g)).sort(dim=1).values
    xs[1, :100_000] = xs[1, 100_000]  # ties
    xs = xs.cuda()
    means = xs.mean(dim=1)
    thresholds = F.kmeans_1d_rows(xs, 3, signed=signed)
    thresholds[4] = torch.tensor([1e30, 2e30]) * (torch.tensor([-1.0, 1.0]) if signed else 1)  # empty clusters
    got = F.rows_cluster_mda(xs, means, thresholds, signed=signed)  # one launch
    expected = F.rows_cluster_mda(xs, means, thresholds, signed=signed, kernels=False)  # the torch ops, on the GPU
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert (expected[1][4] > 0).sum() == 1


@pytest.mark.slow
def test_triton_kernels_equal_the_reference_path_under_the_interpreter():
    script = textwrap.dedent("""
        import torch
        import llava_sgg.optim.fused as fused
        from llava_sgg.optim import build_optimizer, functional as F
        # Under TRITON_INTERPRET=1 (env below) the kernels run on these CPU tensors (launch.kernels_for).
        fused.LARGE = 2000  # (33, 70) takes the per-tensor AdamW kernel, the others the multi-tensor one
        for name in ("adamw_sgg", "lamb_sgg", "adafactor_sgg"):
            for assignment in ("frozen", "dynamic"):
                runs = []
                for use in (True, False):
                    g = torch.Generator().manual_seed(0)
                    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((33, 70), (70,), (20, 9))]
                    opt = build_optimizer(ps, name, lr=1e-2, recluster_interval=2, fused=use, assignment=assignment)
                    for _ in range(4):
                        for p in ps:
                            p.grad = torch.randn(p.shape, generator=g)
                        opt.step()
                    runs.append(ps)
                for a, b in zip(*runs):
                    assert float((a - b).norm() / b.norm()) < 1e-6, (name, assignment)
        x = [torch.randn(5000) ** 3, torch.randn(300)]
        mu = [t.mean() for t in x]
        d = torch.cat([(t - m).abs() for t, m in zip(x, mu)]).sort().values
        assert float(F.deviation_median(x, mu)) == float(d[(d.numel() - 1) // 2])
        rank = torch.full((), (d.numel() - 1) // 2)
        bits, found = F._bracket_median(x, torch.stack(mu), rank, d.numel(), 256)  # the GPU's one-pass median
        assert bool(found) and float(bits.view(torch.float32)) == float(d[(d.numel() - 1) // 2])
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_replayed_adam_steps_equal_the_reference_path_under_the_interpreter():
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_fused import replayed_run
        for assignment in ("frozen", "dynamic"):
            got, plans, freed = replayed_run("cpu", True, False, assignment, large=2000)
            expected, _, _ = replayed_run("cpu", False, False, assignment)
            for a, b in zip(got, expected):
                assert float((a - b).norm() / b.norm()) < 1e-6, assignment
            assert plans == 5, plans
            assert freed
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
