"""SGG's background kernel compilation (llava_sgg/optim/precompile.py).

On CUDA, SGG compiles its Triton kernels in threads from its construction on, running its functions on
small stand-ins of its parameters; the first re-clustering waits for what is left. These tests check
the stand-ins' shapes, that the shadow optimizer mirrors the real one's settings and groups and
touches nothing of it, the whole precompilation under Triton's interpreter (slow), and on a GPU that
the real re-clusterings and scaled steps afterwards compile no new kernel variant.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llava_sgg.optim import SGG, build_optimizer
from llava_sgg.optim import precompile as P
from llava_sgg.optim.fused import LARGE

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_sgg_compiles_nothing_in_the_background_without_cuda():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = SGG(torch.optim.AdamW([p]), n_clusters=3)
    assert opt.precompile_report is None
    assert SGG(torch.optim.AdamW([p]), precompile=False).precompile_report is None


@pytest.mark.parametrize("shape", [(4096, 128), (128, 4096), (11008, 4096), (576,), (1, 7), (3, 1, 5), (17, 33),
                                   (32000, 4096), (2**22,), (5000, 1000)])
def test_stand_ins_keep_what_selects_a_kernel_variant(shape):
    numel = torch.Size(shape).numel()
    minimum = P._minimum(numel, 2**22)
    small = P.stand_in_shape(shape, minimum)
    assert len(small) == len(shape)
    for real, stand_in in zip(shape[1:], small[1:]):
        assert real % 16 == stand_in % 16 and (real == 1) == (stand_in == 1) and stand_in <= 31
    assert small[0] % 16 == shape[0] % 16
    size = torch.Size(small).numel()
    assert (size >= LARGE) == (numel >= LARGE) and (size > 2**22) == (numel > 2**22)
    if numel < LARGE:
        assert size <= 31 ** len(shape)
    else:  # no bigger than needed: the first dimension within 16 rows of the fewest that reach the limit
        assert size < minimum + 16 * torch.Size(small[1:]).numel()


def test_the_shadow_mirrors_settings_and_groups_and_touches_nothing():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(s)) for s in ((40, 24), (40, 24), (24, 7), (24,))]
    frozen = torch.nn.Parameter(torch.randn(50, 50), requires_grad=False)
    opt = build_optimizer([{"params": weights[:3] + [frozen], "weight_decay": 0.1},
                           {"params": weights[3:], "weight_decay": 0.0, "lr": 5e-4}],
                          "adamw_sgg", lr=1e-3, n_clusters=4, recluster_interval=7, beta3=0.5,
                          cluster_on="signed", assignment="dynamic", exact_limit=500, sample_size=100, seed=3)
    rng = torch.get_rng_state()
    shadow = P._shadow(opt, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(shadow.optimizer, torch.optim.AdamW) and shadow.precompile_report is None
    for name in ("n_clusters", "beta3", "scale_bounds", "eps", "cluster_on", "assignment", "backend", "exact_limit",
                 "sample_size", "seed", "fused", "rule", "mean_decay"):
        assert getattr(shadow, name) == getattr(opt, name), name
    assert shadow.recluster_interval == 2
    # One stand-in per distinct (shape, dtype) of a group's trained weights; each group's hyper-parameters.
    shapes = [[tuple(p.shape) for p in g["params"]] for g in shadow.param_groups]
    assert shapes == [[(24, 24), (24, 7)], [(24,)]]  # 40 becomes 24: 16 + its residue 8
    assert shapes[0][0] == P.stand_in_shape((40, 24), P._minimum(960, 500))
    for mine, real in zip(shadow.param_groups, opt.param_groups):
        assert {k: v for k, v in mine.items() if k != "params"} == {k: v for k, v in real.items() if k != "params"}
    assert not opt.state and opt._sgg_step == 0


@cuda
def test_no_kernel_compiles_after_the_precompilation_on_cuda():
    torch.manual_seed(0)
    shapes = [(4096, 128), (128, 4096), (576, 576), (1536, 576), (576,), (2**22 + 16,), (49152, 90)]
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    opt = build_optimizer([{"params": ps[:4] + ps[5:]}, {"params": ps[4:5], "weight_decay": 0.0}], "adamw_sgg",
                          lr=1e-3, recluster_interval=3)
    assert opt._precompile is not None
    opt._precompile.wait()
    report = opt.precompile_report
    assert not report["errors"] and report["seconds"] > 0 and report["compiled_later"] == []
    compiled = P.compiled_variants()
    for _ in range(7):  # two re-clusterings, and scaled steps after each
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    torch.cuda.synchronize()
    assert opt.reclusterings == 2
    assert P.compiled_variants() - compiled == set()
    assert opt.precompile_report["compiled_later"] == []


@pytest.mark.slow
def test_precompilation_under_the_interpreter_leaves_the_run_unchanged():
    script = textwrap.dedent("""
        import torch
        from llava_sgg.optim import build_optimizer
        from llava_sgg.optim import precompile as P
        # Under TRITON_INTERPRET=1 (env below) the kernels run on CPU tensors (launch.kernels_for).
        runs = []
        for name, options in (("adamw_sgg", {}), ("adamw_sgg", {"assignment": "dynamic", "cluster_on": "signed"}),
                              ("lamb_sgg", {}), ("adafactor_sgg", {}), ("adamw_sgg", {"rule": "mean_ratio"})):
            for precompile in (True, False):
                g = torch.Generator().manual_seed(0)
                ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((33, 20), (20,), (20, 9))]
                opt = build_optimizer(ps, name, lr=1e-2, recluster_interval=2, **options)
                if precompile:  # on the CPU only when asked for; one thread: the interpreter is not thread-safe
                    torch.manual_seed(5)
                    job = P.start(opt, [torch.device("cpu")], parallel=False)
                    job.wait()
                    assert not job.errors and job.pieces == (5 if options.get("rule") != "mean_ratio" else 1)
                    assert torch.equal(torch.get_rng_state(), torch.manual_seed(5).get_state())
                    assert not opt.state
                for _ in range(5):
                    for p in ps:
                        p.grad = torch.randn(p.shape, generator=g)
                    opt.step()
                runs.append([p.detach().clone() for p in ps])
            for a, b in zip(runs[-2], runs[-1]):
                assert torch.equal(a, b), name
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_precompile_option_is_validated_and_reaches_sgg():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="precompile must be True or False"):
        SGG(torch.optim.AdamW([p]), precompile="yes")
    assert build_optimizer([p], "adamw_sgg", lr=1e-3, precompile=False)._precompile is None
    with pytest.raises(ValueError, match="SGG options need"):
        build_optimizer([p], "adamw", lr=1e-3, precompile=False)
