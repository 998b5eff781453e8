"""SGG under DDP and FSDP2 on 2 CPU processes (gloo): the same ids, scales, global MDA and parameters
as one process, and a sharded checkpoint that resumes on another world size.

The single-process reference steps on the mean of the two half-batch gradients, which is what the
two ranks' all-reduce (DDP) or reduce-scatter (FSDP2) averages: with two ranks the average of two
numbers does not depend on the order, so everything is compared exactly where the arithmetic allows.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from llava_sgg.optim import SGG
from llava_sgg.optim.distributed import prepare_state_for_load

STEPS, SAVE_AT = 6, 3
# exact_limit below the first layer's size, so its clusters come from a sample of the full tensor.
SGG_OPTIONS = dict(n_clusters=3, recluster_interval=2, beta3=0.5, exact_limit=400, sample_size=256)


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Odd row counts: FSDP2's dim-0 shards are uneven (17 = 9 + 8 rows, 33 = 17 + 16).
    return nn.Sequential(nn.Linear(12, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 5))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g), torch.randn(8, 5, generator=g)) for _ in range(STEPS)]


def _optimizer(model) -> SGG:
    return SGG(torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1), **SGG_OPTIONS)


def _loss(model, x, y):
    return (model(x) - y).pow(2).mean()


def _record(model, opt) -> dict:
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    out = {"global_mda": opt.global_mda, "params": {}, "ids": {}, "scales": {}}
    for name, p in model.named_parameters():
        out["params"][name] = full(p.detach()).clone()
        ids = opt.cluster_ids(p)
        out["ids"][name] = None if ids is None else full(ids).clone()
        out["scales"][name] = opt.cluster_scales(p)
    return out


def reference_run(steps: int = STEPS, model=None, opt=None, start: int = 0) -> dict:
    """One process; each step's gradient is the mean of the two half-batch gradients."""
    model = model or _model()
    opt = opt or _optimizer(model)
    for x, y in _batches()[start:steps]:
        grads = []
        for half in (slice(0, 4), slice(4, 8)):
            model.zero_grad()
            _loss(model, x[half], y[half]).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    return _record(model, opt)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel

        import torch.distributed.checkpoint as dcp

        half = slice(4 * rank, 4 * rank + 4)
        ddp = DistributedDataParallel(_model())
        opt = _optimizer(ddp.module)
        for x, y in _batches():
            opt.zero_grad()
            _loss(ddp, x[half], y[half]).backward()
            opt.step()
        results = {"ddp": _record(ddp.module, opt)}

        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = _optimizer(model)
        for step, (x, y) in enumerate(_batches(), start=1):
            opt.zero_grad()
            _loss(model, x[half], y[half]).backward()
            opt.step()
            if step == SAVE_AT:
                dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=f"{out}/ckpt")
        results["fsdp2"] = _record(model, opt)
        if rank == 0:
            torch.save(results, f"{out}/results.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, f"file://{out}/rendezvous", str(out)), nprocs=2, join=True)
    return out, torch.load(out / "results.pt", weights_only=False)


def _assert_same(run: dict, reference: dict, exact_params: bool) -> None:
    assert run["global_mda"] == reference["global_mda"]
    for name, expected in reference["params"].items():
        if exact_params:
            assert torch.equal(run["params"][name], expected), name
        else:
            torch.testing.assert_close(run["params"][name], expected, rtol=1e-5, atol=1e-6)
        if reference["ids"][name] is None:
            assert run["ids"][name] is None, name
            continue
        assert torch.equal(run["ids"][name], reference["ids"][name]), name
        assert torch.equal(run["scales"][name], reference["scales"][name]), name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_give_the_ids_scales_and_parameters_of_one_process(distributed_runs, strategy):
    _, results = distributed_runs
    reference = reference_run()
    assert reference["global_mda"] is not None
    assert any(ids is not None and ids.unique().numel() == 3 for ids in reference["ids"].values())
    _assert_same(results[strategy], reference, exact_params=True)


def test_sharded_checkpoint_resumes_on_one_process(distributed_runs):
    """Saved by 2 FSDP2 ranks at step 3 with torch.distributed.checkpoint, resumed by one plain process."""
    import torch.distributed.checkpoint as dcp

    out, results = distributed_runs
    model = _model()
    opt = _optimizer(model)
    prepare_state_for_load(opt)
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=str(Path(out) / "ckpt"))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    assert opt.state_dict()["sgg"]["step"] == SAVE_AT
    resumed = reference_run(model=model, opt=opt, start=SAVE_AT)
    _assert_same(resumed, reference_run(), exact_params=True)
    _assert_same(results["fsdp2"], resumed, exact_params=True)


def test_load_template_without_a_checkpoint_leaves_layers_unclustered():
    model = _model()
    opt = _optimizer(model)
    prepare_state_for_load(opt)
    sd = copy.deepcopy(opt.state_dict())
    assert not sd["sgg"]["clustered"].any() and len(sd["sgg"]["layers"]) == 3
    fresh = _optimizer(model)
    fresh.load_state_dict(sd)
    assert all(fresh.cluster_ids(p) is None for p in model.parameters())
