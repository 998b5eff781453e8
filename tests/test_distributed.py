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


def _sharded_model() -> nn.Module:
    """_model under FSDP2: one unit per Linear, then the whole."""
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g), torch.randn(8, 5, generator=g)) for _ in range(STEPS)]


def _optimizer(model) -> SGG:
    return SGG(torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1), **SGG_OPTIONS)


def _lamb(model) -> SGG:
    from llava_sgg.optim import build_optimizer

    return build_optimizer(list(model.parameters()), "lamb_sgg", lr=1e-2, **SGG_OPTIONS)


def _mean_ratio(model) -> SGG:
    """The authors' rule; mean_decay 0.5 so that the cluster means move within the run."""
    return SGG(torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1), rule="mean_ratio", mean_decay=0.5,
               **SGG_OPTIONS)


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


def reference_run(steps: int = STEPS, model=None, opt=None, start: int = 0, make=_optimizer) -> dict:
    """One process; each step's gradient is the mean of the two half-batch gradients."""
    model = model or _model()
    opt = opt or make(model)
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


def _train_on_half(model, wrapped, opt, half, checkpoint: str | None = None) -> dict:
    """Every batch's ``half`` on this rank; with ``checkpoint``, a sharded checkpoint at step SAVE_AT."""
    import torch.distributed.checkpoint as dcp

    for step, (x, y) in enumerate(_batches(), start=1):
        opt.zero_grad()
        _loss(wrapped, x[half], y[half]).backward()
        opt.step()
        if checkpoint is not None and step == SAVE_AT:
            dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=checkpoint)
    return _record(model, opt)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel

        half = slice(4 * rank, 4 * rank + 4)
        ddp = DistributedDataParallel(_model())
        results = {"ddp": _train_on_half(ddp.module, ddp, _optimizer(ddp.module), half)}
        model = _sharded_model()
        results["fsdp2"] = _train_on_half(model, model, _optimizer(model), half, f"{out}/ckpt")
        # LAMB's trust ratio takes whole-tensor norms: on DTensors they are reduced across ranks.
        model = _sharded_model()
        results["fsdp2-lamb"] = _train_on_half(model, model, _lamb(model), half)
        model = _sharded_model()
        results["fsdp2-mean_ratio"] = _train_on_half(model, model, _mean_ratio(model), half, f"{out}/ckpt-mean-ratio")
        if rank == 0:
            torch.save(results, f"{out}/results.pt")
        # Both ranks leave together: a rank tearing gloo down while its peer still works can abort it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, f"file://{out}/rendezvous", str(out)), nprocs=2, join=True)
    return out, torch.load(out / "results.pt", weights_only=True)


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


@pytest.mark.slow  # distributed_runs: 2 processes (torch.multiprocessing)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_give_the_ids_scales_and_parameters_of_one_process(distributed_runs, strategy):
    _, results = distributed_runs
    reference = reference_run()
    assert reference["global_mda"] is not None
    assert any(ids is not None and ids.unique().numel() == 3 for ids in reference["ids"].values())
    _assert_same(results[strategy], reference, exact_params=True)


@pytest.mark.slow  # distributed_runs: 2 processes
def test_lamb_sgg_under_fsdp2_matches_one_process_up_to_the_norms_reduction_order(distributed_runs):
    _, results = distributed_runs
    run, reference = results["fsdp2-lamb"], reference_run(make=_lamb)
    assert run["global_mda"] == pytest.approx(reference["global_mda"], rel=1e-5)
    for name, expected in reference["params"].items():
        torch.testing.assert_close(run["params"][name], expected, rtol=1e-5, atol=1e-6)
        if reference["ids"][name] is not None:
            assert torch.equal(run["ids"][name], reference["ids"][name]), name
            torch.testing.assert_close(run["scales"][name], reference["scales"][name], rtol=1e-5, atol=1e-6)


def _load_on_one_process(checkpoint: Path, make) -> tuple[nn.Module, SGG]:
    """A plain model and optimizer filled from a sharded checkpoint (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp

    model = _model()
    opt = make(model)
    prepare_state_for_load(opt)
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    return model, opt


@pytest.mark.slow  # distributed_runs: 2 processes
def test_sharded_checkpoint_resumes_on_one_process(distributed_runs):
    """Saved by 2 FSDP2 ranks at step 3 with torch.distributed.checkpoint, resumed by one plain process."""
    out, results = distributed_runs
    model, opt = _load_on_one_process(Path(out) / "ckpt", _optimizer)
    assert opt.state_dict()["sgg"]["step"] == SAVE_AT
    resumed = reference_run(model=model, opt=opt, start=SAVE_AT)
    _assert_same(resumed, reference_run(), exact_params=True)
    _assert_same(results["fsdp2"], resumed, exact_params=True)


@pytest.mark.slow  # distributed_runs: 2 processes
def test_the_authors_rule_under_fsdp2_gives_one_process_ids_scales_and_resumes_on_one(distributed_runs):
    """rule=mean_ratio on sharded layers: the full |m| per layer, ids per shard; its sharded checkpoint
    (the EMA of cluster means included) resumes on one plain process to the same run."""
    out, results = distributed_runs
    reference = reference_run(make=_mean_ratio)
    assert any(ids is not None and ids.unique().numel() == 3 for ids in reference["ids"].values())
    _assert_same(results["fsdp2-mean_ratio"], reference, exact_params=True)
    model, opt = _load_on_one_process(Path(out) / "ckpt-mean-ratio", _mean_ratio)
    means = [layer["cluster_means"] for layer in opt.state_dict()["sgg"]["layers"].values()]
    assert means and not all(torch.equal(m, torch.ones_like(m)) for m in means)  # restored, not restarted
    _assert_same(reference_run(model=model, opt=opt, start=SAVE_AT, make=_mean_ratio), reference, exact_params=True)


def test_load_template_without_a_checkpoint_leaves_layers_unclustered():
    model = _model()
    opt = _optimizer(model)
    prepare_state_for_load(opt)
    sd = copy.deepcopy(opt.state_dict())
    assert not sd["sgg"]["clustered"].any() and len(sd["sgg"]["layers"]) == 3
    fresh = _optimizer(model)
    fresh.load_state_dict(sd)
    assert all(fresh.cluster_ids(p) is None for p in model.parameters())


# ------------------------------------------------------------------ the tiny LLaVA through the launchers
ROOT = Path(__file__).parent.parent
SGG_RUN = {"name": "adamw_sgg", "lr": 1e-3, "recluster_interval": 1, "beta3": 0.0}


@pytest.fixture(scope="module")
def llava_assets(tmp_path_factory):
    from train_fixtures import make_dataset, make_parts

    root = tmp_path_factory.mktemp("llava-dist")
    return root, make_parts(root), make_dataset(root)


def _launch(llava_assets, launcher: list[str], distributed: str, name: str, optimizer: dict = SGG_RUN,
            packing: bool = False, **train) -> dict:
    from train_fixtures import run_dist_llava, tiny_run

    root, parts, data = llava_assets
    train = {"max_steps": 2, "per_device_train_batch_size": 1, "distributed": distributed, **train}
    cfg = tiny_run(parts, {**data, "packing": packing}, root / name, "full", optimizer, **train)
    return run_dist_llava(cfg, root, name, launcher)


def _one_process_sgg(record: dict) -> SGG:
    """SGG re-clustered once, in one process, on the full first moments the sharded run ended with.

    With beta3 = 0 the scales are the targets of the last re-clustering, so the sharded run's ids,
    scales and global MDA must be exactly these. AdamW with beta1 = 0 and lr = 0 makes the
    gradient the statistic bit for bit.
    """
    params = [nn.Parameter(torch.zeros_like(m)) for m in record["exp_avg"].values()]
    for p, m in zip(params, record["exp_avg"].values()):
        p.grad = m.clone()
    opt = SGG(torch.optim.AdamW(params, lr=0.0, betas=(0.0, 0.999), weight_decay=0.0), n_clusters=3,
              recluster_interval=1, beta3=0.0)
    opt.step()
    return opt, dict(zip(record["exp_avg"], params))


def _assert_exact_sgg(record: dict) -> None:
    opt, params = _one_process_sgg(record)
    assert record["global_mda"] == opt.global_mda
    for name, p in params.items():
        assert torch.equal(record["ids"][name], opt.cluster_ids(p)), name
        assert torch.equal(record["scales"][name], opt.cluster_scales(p)), name


@pytest.mark.slow  # torchrun, 2 processes
def test_torchrun_trains_the_tiny_llava_with_fsdp2_and_exact_sgg(llava_assets):
    """`torchrun --nproc_per_node 2` with train.distributed=fsdp2 in the run config."""
    record = _launch(llava_assets, ["torchrun", "--nproc_per_node", "2"], "fsdp2", "torchrun-fsdp2")
    assert record["world_size"] == 2 and record["fsdp"]
    _assert_exact_sgg(record)


@pytest.mark.slow  # accelerate launch, 2 processes
def test_accelerate_launch_config_file_selects_fsdp2_with_exact_sgg(llava_assets):
    """`accelerate launch --config_file configs/accelerate/fsdp2_1node.yaml`: FSDP2 although the run config says ddp."""
    launcher = ["accelerate", "launch", "--config_file", str(ROOT / "configs/accelerate/fsdp2_1node.yaml"),
                "--num_processes", "2"]
    record = _launch(llava_assets, launcher, "ddp", "accelerate-fsdp2")
    assert record["world_size"] == 2 and record["fsdp"]
    _assert_exact_sgg(record)


@pytest.mark.slow
def test_ddp_and_fsdp2_train_the_tiny_llava_alike(llava_assets):
    fsdp2 = _launch(llava_assets, ["torchrun", "--nproc_per_node", "2"], "fsdp2", "torchrun-fsdp2")
    ddp = _launch(llava_assets, ["torchrun", "--nproc_per_node", "2"], "ddp", "torchrun-ddp")
    assert ddp["world_size"] == 2 and not ddp["fsdp"]
    _assert_exact_sgg(ddp)
    for name, value in ddp["params"].items():
        torch.testing.assert_close(fsdp2["params"][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_trainer_checkpoint_resumes_sgg(llava_assets):
    """Trainer checkpoints of an FSDP2 run carry SGG's sharded state: resuming at step 2 ends as the run did."""
    root = llava_assets[0]
    torchrun = ["torchrun", "--nproc_per_node", "2"]
    optimizer = {**SGG_RUN, "recluster_interval": 2, "beta3": 0.5}  # step 3 steps with step 2's clusters
    whole = _launch(llava_assets, torchrun, "fsdp2", "whole", optimizer, max_steps=3, save_steps=1,
                    save_total_limit=3)
    assert (root / "whole" / "checkpoint-2" / "sgg_state").is_dir()
    resumed = _launch(llava_assets, torchrun, "fsdp2", "resumed", optimizer, max_steps=3,
                      resume_from_checkpoint=str(root / "whole" / "checkpoint-2"))
    assert resumed["global_mda"] == whole["global_mda"]
    for name, ids in whole["ids"].items():
        assert torch.equal(resumed["ids"][name], ids), name
        assert torch.equal(resumed["scales"][name], whole["scales"][name]), name
    for name, value in whole["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_finetune_script_takes_the_launcher(llava_assets, tmp_path, launcher):
    """scripts/finetune_lora.sh on 2 CPU processes (DDP) through LAUNCHER=torchrun or accelerate."""
    import subprocess
    import sys

    from train_fixtures import tiny_config_file

    from llava_sgg.model.loading import load_trained

    _, parts, data = llava_assets
    tiny = tiny_config_file(tmp_path, parts, data)
    env = {**os.environ, "NGPUS": "2", "LAUNCHER": launcher, "GLOBAL_BATCH": "4", "PER_DEVICE": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_lora.sh"),
                             str(ROOT / "configs" / "optim" / "adamw_sgg.yaml"), "--config", str(tiny),
                             "--set", "optimizer.recluster_interval=1"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    model, _ = load_trained(tmp_path / "out")
    assert model is not None


def test_sgg_is_refused_under_deepspeed_zero_and_plain_optimizers_are_not(llava_assets, tmp_path):
    from train_fixtures import tiny_run

    from llava_sgg.train.run import build_trainer

    _, parts, data = llava_assets
    for name, refused in (("adamw_sgg", True), ("adamw", False)):
        trainer, _ = build_trainer(tiny_run(parts, data, tmp_path / name, "lora", {"name": name, "lr": 1e-3}))
        trainer.is_deepspeed_enabled = True  # as Trainer sets it under `accelerate launch` with a ZeRO config
        if refused:
            with pytest.raises(ValueError, match="FSDP2"):
                trainer.create_optimizer()
        else:
            assert trainer.create_optimizer() is not None


def test_adafactor_is_refused_under_fsdp2_with_a_clear_error(llava_assets, tmp_path):
    from train_fixtures import tiny_run

    from llava_sgg.train.run import build_trainer

    _, parts, data = llava_assets
    trainer, _ = build_trainer(tiny_run(parts, data, tmp_path, "lora", {"name": "adafactor_sgg", "lr": 1e-3}))
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="DTensor"):
        trainer.create_optimizer()


@pytest.mark.slow  # torchrun, 2 processes, three runs
def test_packed_batches_train_as_padded_ones_under_ddp_and_fsdp2(llava_assets):
    """data.packing on two ranks: the same weights as padded batches, under DDP and FSDP2 alike, with a
    text-only batch on one rank and images on the other.

    Each rank packs its own two samples into one row (positions restarting per sample, attention kept
    inside each); the answer-only loss is normalised by the answer tokens of all ranks either way.
    """
    torchrun = ["torchrun", "--nproc_per_node", "2"]

    def launch(name: str, distributed: str, packing: bool, **train) -> dict:
        return _launch(llava_assets, torchrun, distributed, name, {"name": "adamw", "lr": 1e-3}, packing,
                       per_device_train_batch_size=2, **train)

    # Modality grouping gives one rank the text-only samples and the other images at step 1: every rank
    # still runs the connector (train/text_only.py). With gradient checkpointing, Trainer leaves DDP's
    # find_unused_parameters off, as in LLaVA's recipe.
    padded = launch("ddp-padded", "ddp", False, gradient_checkpointing=True)
    for name, distributed in (("ddp-packed", "ddp"), ("fsdp2-packed", "fsdp2")):
        packed = launch(name, distributed, True)
        assert packed["world_size"] == 2 and packed["fsdp"] == (distributed == "fsdp2")
        assert [round(r["loss"], 4) for r in packed["log_history"] if "loss" in r] \
            == [round(r["loss"], 4) for r in padded["log_history"] if "loss" in r]
        # Float32 sums in another order; Adam's first steps divide each gradient by its own size, so
        # elements with gradients near 0 (a token seen once) move by up to a few 1e-6 apart.
        for param, value in padded["params"].items():
            torch.testing.assert_close(packed["params"][param], value, rtol=1e-4, atol=2e-5, msg=f"{name}: {param}")


@pytest.mark.slow  # torchrun, 2 processes
def test_ddp_with_checkpointing_trains_an_unfrozen_tower(llava_assets):
    """The tower's unread last layer and post_layernorm stay frozen: DDP, which Trainer runs without
    find_unused_parameters under gradient checkpointing, finds no trainable parameter without a gradient."""
    record = _launch(llava_assets, ["torchrun", "--nproc_per_node", "2"], "ddp", "ddp-unfrozen-tower",
                     {"name": "adamw", "lr": 1e-3}, per_device_train_batch_size=2, gradient_checkpointing=True,
                     unfreeze_mm_vision_tower=True)
    tower = [name for name in record["params"] if "vision_tower" in name]
    assert record["world_size"] == 2 and tower
    assert not any("post_layernorm" in name for name in tower)
