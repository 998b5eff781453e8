"""train.lr_step_decay: the schedule times max(factor ** (step // every), floor), the control run of the
evidence study for SGG's mean_ratio rule; and the demo's --sgg variants that use it."""

import io
import math

import pytest
import torch
from train_fixtures import make_dataset, make_parts, tiny_run
from transformers import get_scheduler

from llava_sgg.demo.recipes import FULL
from llava_sgg.demo.run import implied_decay, with_sgg
from llava_sgg.train.config import ConfigError, build_run_config
from llava_sgg.train.run import build_trainer
from llava_sgg.train.trainer import step_decayed


def cosine_with_warmup(step0: int, warmup: int, total: int) -> float:
    """transformers' cosine schedule by its formula (step0 counts from 0)."""
    if step0 < warmup:
        return step0 / max(1, warmup)
    progress = (step0 - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lrs(optimizer, scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def fresh(lr=0.1, warmup=3, total=40):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=total)


def test_the_decayed_schedule_matches_its_formula_step_for_step():
    optimizer, scheduler = fresh()
    got = lrs(optimizer, step_decayed(scheduler, every=5, factor=0.5, floor=0.2), 40)
    # Optimizer step s (from 1) runs at lr * cosine(s - 1) * max(0.5 ** (s // 5), 0.2): SGG rescales
    # at its step 5, 10, ... and the rescaled step is that step's own.
    want = [0.1 * cosine_with_warmup(s - 1, 3, 40) * max(0.5 ** (s // 5), 0.2) for s in range(1, 41)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_a_checkpointed_decayed_schedule_loads_without_pickle_and_resumes_the_same():
    optimizer, scheduler = fresh()
    scheduler = step_decayed(scheduler, every=4, factor=0.9, floor=0.1)
    straight = lrs(optimizer, scheduler, 20)
    optimizer, scheduler = fresh()
    scheduler = step_decayed(scheduler, every=4, factor=0.9, floor=0.1)
    first = lrs(optimizer, scheduler, 9)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # no function is pickled
    # As transformers' Trainer resumes: schedule built, then the optimizer's and the schedule's states loaded.
    resumed_optimizer, resumed = fresh()
    resumed = step_decayed(resumed, every=4, factor=0.9, floor=0.1)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(state)
    assert first + lrs(resumed_optimizer, resumed, 11) == pytest.approx(straight, rel=1e-12)


def test_a_schedule_that_is_not_a_lambda_schedule_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="needs a LambdaLR schedule, got StepLR"):
        step_decayed(torch.optim.lr_scheduler.StepLR(optimizer, 2), every=2, factor=0.5, floor=0.1)


@pytest.mark.parametrize("value, message", [
    ([50, 0.9, 0.1], "got \\[50, 0.9, 0.1\\]"),
    ({"every": 50, "factor": 0.9}, "missing \\['floor'\\]"),
    ({"every": 50, "factor": 0.9, "floor": 0.1, "start": 3}, "unknown \\['start'\\]"),
    ({"every": 0, "factor": 0.9, "floor": 0.1}, "got"),
    ({"every": 50, "factor": 1.5, "floor": 0.1}, "got"),
    ({"every": 50, "factor": 0.9, "floor": -1}, "got"),
    ({"every": True, "factor": 0.9, "floor": 0.1}, "got"),
])
def test_a_bad_step_decay_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match="train.lr_step_decay must be .*" + message):
        build_run_config({"model": {"vision_tower": "v", "language_model": "l"}, "data": {"data_path": "d"},
                          "train": {"lr_step_decay": value}})


def test_a_step_decay_on_a_plateau_schedule_is_refused_before_training():
    with pytest.raises(ConfigError, match="reduce_lr_on_plateau is not one"):
        build_run_config({"model": {"vision_tower": "v", "language_model": "l"}, "data": {"data_path": "d"},
                          "train": {"lr_step_decay": {"every": 5, "factor": 0.9, "floor": 0.1},
                                    "lr_scheduler_type": "reduce_lr_on_plateau"}})


def test_the_trainer_runs_its_schedule_with_the_decay(tmp_path):
    parts, data = make_parts(tmp_path), make_dataset(tmp_path)
    cfg = tiny_run(parts, data, tmp_path / "out", "full", {"name": "adamw", "lr": 1e-3}, max_steps=6,
                   per_device_train_batch_size=1, lr_step_decay={"every": 2, "factor": 0.5, "floor": 0.2})
    trainer, _ = build_trainer(cfg)
    trainer.train()
    logged = [row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row]
    # Logged at each step: the lr that step ran at (cosine over 6 steps, no warmup).
    want = [1e-3 * cosine_with_warmup(s - 1, 0, 6) * max(0.5 ** (s // 2), 0.2) for s in range(1, 7)]
    assert logged == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_the_demo_sgg_variants_name_the_runs_and_the_implied_decay():
    names, settings = with_sgg(["adamw", "lamb"], FULL, "mean_ratio")
    assert names == ["adamw_sgg", "lamb_sgg"] and settings.sgg["rule"] == "mean_ratio"
    names, settings = with_sgg(["adamw"], FULL, "decay_only")
    assert names == ["adamw"] and settings.lr_step_decay == {"every": 50, "factor": 0.9, "floor": 0.1}
    assert implied_decay({"recluster_interval": 7, "beta3": 0.5}) == {"every": 7, "factor": 0.5, "floor": 0.1}
    assert with_sgg(["adamw"], FULL, "none") == (["adamw"], FULL)
    with pytest.raises(ValueError, match="name the base optimizers"):
        with_sgg(["adamw_sgg"], FULL, "mda")
