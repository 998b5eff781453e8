"""Divergence stops the run: a NaN or infinite loss or gradient norm ends training with an error naming
the step, before the optimizer applies it, and no checkpoint or final model holds NaN weights."""

import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import TrainerCallback

from llava_sgg.cli import main
from llava_sgg.train.config import ConfigError, load_run_config
from llava_sgg.train.guards import DivergenceError
from llava_sgg.train.run import build_trainer, train
from llava_sgg.train.trainer import LlavaTrainer
from train_fixtures import make_dataset, make_parts, tiny_run

SGG = {"name": "adamw_sgg", "lr": 1e-3, "recluster_interval": 2, "beta3": 0.5}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return make_parts(root), make_dataset(root)


def _finite(folder: Path) -> bool:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return all(torch.isfinite(f.get_tensor(key)).all() for key in f.keys())


def test_a_diverging_run_stops_with_an_error_naming_the_step(assets, tmp_path, capsys):
    """The issue's run: `--set optimizer.lr=1e5 --set train.max_grad_norm=0`, which used to log loss 0.0,
    exit 0 and save NaN weights."""
    parts, data = assets
    cfg = tiny_run(parts, data, tmp_path / "out", "full", {"name": "adamw", "lr": 1e-3}, max_steps=8, save_steps=1,
                   save_total_limit=10, per_device_train_batch_size=1, mm_projector_lr=None)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))

    rc = main(["train", "--config", str(config), "--set", "optimizer.lr=1e5", "--set", "train.max_grad_norm=0"])

    error = capsys.readouterr().err
    assert rc == 2
    match = re.search(r"training diverged at step (\d+): (.*?)\. ", error)
    assert match, error
    step = int(match.group(1))
    assert step >= 2 and re.fullmatch(r"(the loss is (nan|-?inf)( and )?)?(the gradient norm is not finite)?",
                                      match.group(2))
    last = tmp_path / "out" / f"checkpoint-{step - 1}"
    assert f"The last checkpoint is {last}: resume with train.resume_from_checkpoint=last after lowering " \
           "optimizer.lr" in error
    # The checkpoints before the bad step are intact and finite; nothing was written at or after it.
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*"))
    assert saved == list(range(1, step))
    assert all(_finite(tmp_path / "out" / f"checkpoint-{n}") for n in saved)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    logged = json.loads((last / "trainer_state.json").read_text())["log_history"]
    assert [row["step"] for row in logged if "loss" in row] == list(range(1, step))


def _nan_loss_at(monkeypatch, steps: set[int]) -> None:
    """Make the loss of the given optimizer steps NaN, as a bad batch would (so are their gradients)."""
    compute_loss = LlavaTrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return loss * math.nan if self.state.global_step + 1 in steps else loss

    monkeypatch.setattr(LlavaTrainer, "compute_loss", poisoned)


class _Weights(TrainerCallback):
    """The trained weights after every optimizer step."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = [p.detach().clone() for p in model.parameters() if p.requires_grad]


def _logged(trainer, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in trainer.state.log_history if key in row and "train_loss" not in row}


def test_max_bad_steps_skips_that_many_steps_then_stops(assets, tmp_path, monkeypatch):
    parts, data = assets
    run = dict(max_steps=5, save_steps=100, per_device_train_batch_size=1, max_bad_steps=2, warmup_ratio=0.0)
    clean, _ = build_trainer(tiny_run(parts, data, tmp_path / "clean", "full", SGG, **run))
    clean.train()

    _nan_loss_at(monkeypatch, {2, 4})
    trainer, _ = build_trainer(tiny_run(parts, data, tmp_path / "skips", "full", SGG, **run))
    weights = _Weights()
    trainer.add_callback(weights)
    trainer.train()

    # Logged as what they are, never as 0.0; the other steps log finite losses.
    loss, grad_norm = _logged(trainer, "loss"), _logged(trainer, "grad_norm")
    assert [s for s in loss if math.isnan(loss[s])] == [2, 4] == [s for s in grad_norm if math.isnan(grad_norm[s])]
    assert all(math.isfinite(loss[s]) and loss[s] > 0 for s in (1, 3, 5))
    assert loss[1] == _logged(clean, "loss")[1]
    # No weight moved in a skipped step; the moments saw only the three good steps, while Trainer's step,
    # the learning-rate schedule and SGG's step count advanced as in the clean run.
    for step in (2, 4):
        assert all(torch.equal(a, b) for a, b in zip(weights.after[step - 1], weights.after[step]))
    assert not all(torch.equal(a, b) for a, b in zip(weights.after[2], weights.after[3]))
    assert _logged(trainer, "learning_rate") == _logged(clean, "learning_rate")
    sgg = trainer.optimizer.optimizer
    assert sgg._sgg_step == 5 and trainer.state.global_step == 5
    # (A tensor steps when it has a gradient: the connector's has none in a text-only batch.)
    assert max(float(state["step"]) for state in sgg.state.values()) == 3.0
    assert max(float(state["step"]) for state in clean.optimizer.optimizer.state.values()) == 5.0
    assert trainer.divergence_guard.skipped == [2, 4]

    _nan_loss_at(monkeypatch, {2, 4, 5})
    trainer, _ = build_trainer(tiny_run(parts, data, tmp_path / "stops", "full", SGG, **run))
    with pytest.raises(DivergenceError, match=r"training diverged at step 5: the loss is nan and the gradient norm "
                                              r"is not finite \(train.max_bad_steps=2: skipped steps \[2, 4\]\)\. "
                                              r".*No checkpoint was saved before it"):
        trainer.train()


def test_a_healthy_run_trains_exactly_as_without_the_guard(assets, tmp_path):
    parts, data = assets
    runs = []
    for name in ("guarded", "plain"):
        trainer, _ = build_trainer(tiny_run(parts, data, tmp_path / name, "lora", SGG, max_steps=3,
                                            gradient_accumulation_steps=2, per_device_train_batch_size=1))
        if name == "plain":
            trainer.remove_callback(trainer.divergence_guard)
        trainer.train()
        runs.append(trainer)
    guarded, plain = runs
    assert _logged(guarded, "loss") == _logged(plain, "loss") and len(_logged(plain, "loss")) == 3
    assert _logged(guarded, "grad_norm") == _logged(plain, "grad_norm")
    for p, q in zip(guarded.model.parameters(), plain.model.parameters()):
        assert torch.equal(p, q)


def _overwrite_4kb(path: Path, tensor: str, byte_values: bytes) -> None:
    """Overwrite 4 KB of one tensor's data in a safetensors file."""
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8:8 + header_size])[tensor]["data_offsets"]
    assert end - start > 4096
    offset = 8 + header_size + start
    path.write_bytes(raw[:offset] + (byte_values * 4096)[:4096] + raw[offset + 4096:])


def test_resuming_damaged_weights_names_the_checkpoint(assets, tmp_path, monkeypatch):
    """The issue's 4 KB of a checkpoint's weights overwritten (0xFF: NaN), which used to train on and log
    loss 0.0, is refused when the checkpoint loads; a non-finite first step after a resume says the
    checkpoint may be at fault."""
    parts, data = assets
    run = dict(max_steps=2, save_steps=1, save_total_limit=5, per_device_train_batch_size=1)
    train(tiny_run(parts, data, tmp_path / "out", "full", SGG, **run))
    damaged = tmp_path / "out" / "checkpoint-2"
    with safe_open(str(damaged / "model.safetensors"), framework="pt") as f:
        largest = max((k for k in f.keys() if "language_model" in k), key=lambda k: f.get_slice(k).get_shape())
    _overwrite_4kb(damaged / "model.safetensors", largest, b"\xff")

    resumed = tiny_run(parts, data, tmp_path / "out", "full", SGG, **{**run, "max_steps": 4},
                       resume_from_checkpoint="last")
    with pytest.raises(DivergenceError, match=rf"^the weights hold NaN, infinite or overflowing values \([\w.]+\) "
                                              rf"as loaded from {re.escape(str(damaged))}: it is damaged"):
        train(resumed)
    assert not list((tmp_path / "out").glob("checkpoint-3"))

    _nan_loss_at(monkeypatch, {2})
    resumed.train.resume_from_checkpoint = str(tmp_path / "out" / "checkpoint-1")
    with pytest.raises(DivergenceError, match=r"^training diverged at step 2: .* It is the first step after resuming "
                                              r"at step 1: if that checkpoint's weights are damaged, resume from an "
                                              r"earlier one\."):
        train(resumed)


@pytest.mark.parametrize("value", [-1, 1.5, True, "2", None])
def test_max_bad_steps_must_be_a_count(assets, tmp_path, value):
    parts, data = assets
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run(parts, data, tmp_path / "out").to_dict()))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}.*: train.max_bad_steps must be an integer "
                                          r">= 0"):
        load_run_config([str(config)], overrides=[f"train.max_bad_steps={yaml.safe_dump(value).split(chr(10))[0]}"])
    assert load_run_config([str(config)], overrides=["train.max_bad_steps=3"]).train.max_bad_steps == 3


@pytest.mark.slow  # torchrun, 2 processes
@pytest.mark.parametrize("distributed", ["ddp", "fsdp2"])
def test_every_rank_stops_at_the_step_only_one_rank_saw_diverge(assets, tmp_path, distributed):
    """2 CPU processes: rank 1's loss alone is NaN at step 2 (its gradient finite); both ranks stop there,
    where the other would otherwise step on and wait for rank 1 in the next collective."""
    import os
    import subprocess

    parts, data = assets
    root = Path(__file__).parent.parent
    cfg = tiny_run(parts, data, tmp_path / "out", "full", SGG, max_steps=3, per_device_train_batch_size=1,
                   distributed=distributed)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    done = subprocess.run(["torchrun", "--nproc_per_node", "2", str(root / "tests" / "dist_divergence.py"),
                           str(config), str(tmp_path / "record"), "1", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"record.rank{rank}.json").read_text())
        assert record["fsdp"] == (distributed == "fsdp2")
        assert record["error"].startswith("training diverged at step 2: the loss is nan. "), record["error"]
        assert record["logged"] == [1]


def test_a_healthy_save_looks_for_no_checkpoint_to_resume_from(assets, tmp_path, caplog):
    """The guard checks the weights at every save; the resume hint of its error is built only for an error."""
    parts, data = assets
    cfg = tiny_run(parts, data, tmp_path / "out", "full", {"name": "adamw", "lr": 1e-3}, max_steps=2, save_steps=1)
    trainer, _ = build_trainer(cfg)
    with caplog.at_level("INFO"):
        trainer.train()
    assert (tmp_path / "out" / "checkpoint-2").is_dir()  # saved at steps 1 and 2 (the newest kept)
    assert "no checkpoint in" not in caplog.text
