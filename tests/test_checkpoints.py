"""Checkpoints that are complete or ignored: resuming after a kill, refusing what cannot be resumed, and a
finished run that trains nothing. The fault injection (kill -9 of real runs, one process and FSDP2) is slow."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llava_sgg.train.checkpoints import (MANIFEST, RUN_COMPLETE, STAGING, CheckpointError, checkpoint_problems,
                                         newest_complete, rotate, seal_checkpoint)
from llava_sgg.train.run import build_trainer, train
from train_fixtures import make_dataset, make_parts, tiny_run

ROOT = Path(__file__).parent.parent
SGG = {"name": "adamw_sgg", "lr": 1e-3, "recluster_interval": 2, "beta3": 0.5}
RUN = {"max_steps": 3, "save_steps": 1, "save_total_limit": 10, "per_device_train_batch_size": 1}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return make_parts(root), make_dataset(root)


def config(assets, output: Path, **train):
    parts, data = assets
    return tiny_run(parts, data, output, "full", SGG, **{**RUN, **train})


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A 3-step adamw_sgg run that saved every step: checkpoint-1..3 and its outputs."""
    output = tmp_path_factory.mktemp("finished") / "run"
    train(config(assets, output))
    return output


@pytest.fixture(scope="module")
def trainer(assets, finished):
    """A trainer of the same run, for the checks that refuse a checkpoint before anything loads."""
    return build_trainer(config(assets, finished))[0]


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_in_place(path: Path) -> None:
    """Same size, other bytes: what the manifest cannot see and the loader must name."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".pt":
        data[1000:1032] = b"\xff" * 32  # inside the pickle, the zip archive's first entry
    else:
        data[:8] = b"{{{{{{{{" if path.suffix == ".json" else b"\xff" * 8  # safetensors: the header's length
    path.write_bytes(bytes(data))


def assert_same_state(a, b, where: str = "") -> None:
    """Equal to the bit: tensors, numbers and structure (pickled .pt files may differ in bytes, not in content)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b, where


def assert_same_checkpoint(ours: Path, theirs: Path) -> None:
    """Weights, optimizer (SGG's ids, scales, global MDA and step inside), schedule, RNG and Trainer state."""
    assert_same_state(load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors"), "model")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert_same_state(torch.load(ours / name, weights_only=False), torch.load(theirs / name, weights_only=False),
                          name)
    state = [json.loads((folder / "trainer_state.json").read_text()) for folder in (ours, theirs)]
    assert [row.get("loss") for row in state[0]["log_history"]] == [row.get("loss") for row in state[1]["log_history"]]


def outputs(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def test_a_checkpoint_exists_only_complete_with_its_manifest(finished):
    assert sorted(p.name for p in finished.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not (finished / STAGING).exists()
    manifest = json.loads((finished / "checkpoint-3" / MANIFEST).read_text())
    assert manifest["global_step"] == 3
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"):
        assert manifest["files"][name] == (finished / "checkpoint-3" / name).stat().st_size
    record = json.loads((finished / RUN_COMPLETE).read_text())
    assert record["global_step"] == 3 and "model.safetensors" in record["files"]


def test_last_resumes_from_the_newest_complete_checkpoint_and_ends_as_the_run(assets, finished, tmp_path, caplog):
    """A kill during checkpoint-3's save: its staging folder is left, checkpoint-2 is the newest."""
    run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "checkpoint-3")
    (run / STAGING / "checkpoint-3").mkdir(parents=True)
    shutil.copy(finished / "checkpoint-3" / "model.safetensors", run / STAGING / "checkpoint-3")
    for name in outputs(run):
        (run / name).unlink()
    with caplog.at_level(logging.WARNING, logger="llava_sgg"):
        train(config(assets, run, resume_from_checkpoint="last"))
    assert f"resuming from {run / 'checkpoint-2'}, skipping {run / STAGING / 'checkpoint-3'}" in caplog.text
    assert not (run / STAGING).exists()
    assert_same_checkpoint(run / "checkpoint-3", finished / "checkpoint-3")
    ours, theirs = outputs(run), outputs(finished)
    for name in ("model.safetensors", "loss_history.json", "config.json"):
        assert ours[name] == theirs[name], name


MISSING = ["model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", MANIFEST]


@pytest.mark.parametrize("name", MISSING)
def test_a_missing_file_is_an_error_naming_it_and_last_falls_back(trainer, finished, tmp_path, caplog, name):
    run = copy_of(finished, tmp_path)
    (run / "checkpoint-3" / name).unlink()
    with pytest.raises(CheckpointError, match=f"cannot resume from {run / 'checkpoint-3'}: .*{name}"):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-3"))
    with caplog.at_level(logging.WARNING, logger="llava_sgg"):
        assert newest_complete(run) == run / "checkpoint-2"
    assert "skipping checkpoint-3: " in caplog.text and name in caplog.text


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "model.safetensors"])
def test_a_checkpoint_sealed_without_a_needed_file_is_an_error_naming_it(trainer, finished, tmp_path, name):
    """Complete by its manifest, yet without state the run reads back (Trainer would start it afresh)."""
    run = copy_of(finished, tmp_path)
    (run / "checkpoint-3" / name).unlink()
    seal_checkpoint(run / "checkpoint-3", 3)
    with pytest.raises(CheckpointError, match=f"{run / 'checkpoint-3' / name} is missing"):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-3"))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_truncated_file_is_an_error_naming_it_and_last_falls_back(trainer, finished, tmp_path, name):
    run = copy_of(finished, tmp_path)
    truncate(run / "checkpoint-3" / name)
    with pytest.raises(CheckpointError, match=f"{run / 'checkpoint-3' / name} has \\d+ bytes, \\d+ when it was saved"):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-3"))
    assert newest_complete(run) == run / "checkpoint-2"


@pytest.mark.parametrize("name, error", [("model.safetensors", "cannot load the model weights .*model.safetensors"),
                                         ("trainer_state.json", "trainer_state.json is not valid JSON"),
                                         ("optimizer.pt", "cannot load the optimizer .*optimizer.pt")])
def test_a_damaged_file_of_the_right_size_is_an_error_naming_it(assets, finished, tmp_path, name, error):
    run = copy_of(finished, tmp_path)
    damage_in_place(run / "checkpoint-2" / name)
    trainer, _ = build_trainer(config(assets, run))
    with pytest.raises(CheckpointError, match=error) as caught:
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert str(run / "checkpoint-2") in str(caught.value)


def test_last_with_no_checkpoint_yet_starts_at_step_0_and_with_none_complete_is_an_error(finished, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llava_sgg"):
        assert newest_complete(tmp_path / "new") is None
    assert "no checkpoint in" in caplog.text and "training from step 0" in caplog.text
    run = copy_of(finished, tmp_path)
    for folder in run.glob("checkpoint-*"):
        (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*checkpoint-3: no checkpoint_complete.json"):
        newest_complete(run)


def test_resuming_a_finished_run_trains_nothing_and_leaves_its_outputs(assets, finished, tmp_path, caplog):
    run = copy_of(finished, tmp_path)
    before = outputs(run)
    with caplog.at_level(logging.WARNING, logger="llava_sgg"):
        train(config(assets, run, resume_from_checkpoint="last"))  # the same config: known before any load
    assert "the run already finished at step 3 and its outputs are complete; nothing to train" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llava_sgg"):  # another config (logging): through the Trainer
        train(config(assets, run, resume_from_checkpoint="last", logging_steps=2))
    assert "checkpoint-3 is step 3 of 3: the run is already finished; nothing to train" in caplog.text
    assert "the outputs of step 3 are complete and left as they are" in caplog.text
    assert outputs(run) == before
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_a_finished_run_whose_final_save_was_killed_writes_the_same_outputs_again(assets, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    (run / RUN_COMPLETE).unlink()  # killed before the outputs were sealed
    truncate(run / "model.safetensors")
    train(config(assets, run, resume_from_checkpoint=str(run / "checkpoint-3")))
    assert outputs(run).keys() == outputs(finished).keys()
    for name, data in outputs(finished).items():
        if name not in (RUN_COMPLETE, "llava_sgg_run.yaml"):  # the config: resume_from_checkpoint differs
            assert outputs(run)[name] == data, name
    assert json.loads((run / RUN_COMPLETE).read_text())["files"].keys() == json.loads(
        (finished / RUN_COMPLETE).read_text())["files"].keys()


def test_a_finished_run_resumed_by_the_trainer_takes_no_step_past_the_schedule(trainer, finished):
    """Trainer alone would go on with the epoch step 3 fell in (6 batches) and run a step 4, past the schedule."""
    weights = load_file(finished / "checkpoint-3" / "model.safetensors")
    trainer.train(resume_from_checkpoint=str(finished / "checkpoint-3"))
    assert trainer.resumed_finished_run and trainer.state.global_step == 3
    assert not any("train_loss" in row for row in trainer.state.log_history)  # no loss of 0 steps logged as 0.0
    for name, p in trainer.model.state_dict().items():
        if name in weights:
            assert torch.equal(p, weights[name]), name


def test_rotation_keeps_the_checkpoint_just_written_and_ignores_incomplete_ones(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    shutil.copytree(run / "checkpoint-3", run / "checkpoint-9")
    (run / "checkpoint-9" / MANIFEST).unlink()  # incomplete: neither counted nor deleted
    assert rotate(run, 2, keep=run / "checkpoint-3") == [run / "checkpoint-1"]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-9"]
    # A run resumed from an older checkpoint: the one it just wrote stays, the abandoned newer ones go first.
    assert rotate(run, 1, keep=run / "checkpoint-2") == [run / "checkpoint-3"]
    assert newest_complete(run) == run / "checkpoint-2"


# ------------------------------------------------------------------ fault injection: kill -9 of real runs (slow)
# Kills land at random times (seeded), and, to hit the short windows that matter, at random delays after a
# save is seen to start (saving-checkpoint/ appears), right after a checkpoint is renamed into place, and
# after the final outputs start; nothing in the package knows it is being tested.
KILL_RUN = {"max_steps": 16, "save_steps": 4, "save_total_limit": 2, "per_device_train_batch_size": 1}
STRATEGIES = ("at a random time", "inside a checkpoint save", "after a checkpoint is published",
              "inside the final save")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def _kill_point(output: Path, strategy: str, rng: random.Random, duration: float):
    """A function that returns once the process should be killed (or the deadline is past)."""
    def seen(condition, delay: float):
        def wait(deadline: float) -> None:
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(delay)
        return wait

    if strategy == "at a random time":
        moment = rng.uniform(0, duration)
        return lambda deadline: time.sleep(moment)
    if strategy == "inside a checkpoint save":
        return seen(lambda: any((output / STAGING).glob("checkpoint-*")), rng.uniform(0, 0.03))
    if strategy == "after a checkpoint is published":
        before = {p.name for p in output.glob("checkpoint-*")}
        return seen(lambda: {p.name for p in output.glob("checkpoint-*")} - before, rng.uniform(0, 0.02))
    return seen(lambda: (output / "config.json").exists() and not (output / RUN_COMPLETE).exists(),
                rng.uniform(0, 0.3))


def _where_killed(output: Path) -> str:
    """What a kill left, read from the folder."""
    if any((output / STAGING).glob("checkpoint-*")):
        return "a checkpoint half written"
    if (output / "config.json").exists() and not (output / RUN_COMPLETE).exists():
        return "the final outputs half written"
    if (output / RUN_COMPLETE).exists():
        return "after the run"
    return "between saves" if any(output.glob("checkpoint-*")) else "before the first checkpoint"


def _kill_9_all(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it at once, as a lost node: torchrun starts its workers in
    sessions of their own, so killing its process group would leave them running."""
    def children(parent: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:  # after the name: state, ppid
                    found.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                pass  # ended meanwhile
        return found + [grandchild for child in found for grandchild in children(child)]

    for victim in [pid] + children(pid):
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _launch_and_maybe_kill(command: list[str], log: Path, wait=None, timeout: float = 300) -> bool:
    """Run ``command``; with ``wait``, SIGKILL its whole process group once wait() returns. True if killed."""
    with open(log, "a") as f:
        process = subprocess.Popen(command, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        if wait is not None:
            wait(time.monotonic() + timeout)
            if process.poll() is None:
                _kill_9_all(process.pid)
                process.wait()
                return True
        rc = process.wait(timeout=timeout)
    assert rc == 0, log.read_text()[-4000:]
    return False


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_last_ends_as_the_uninterrupted_run(assets, tmp_path):
    import yaml

    def config_file(name: str) -> tuple[Path, Path]:
        output = tmp_path / name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config(assets, output, **KILL_RUN).to_dict()))
        return path, output

    def command(path: Path) -> list[str]:  # as a job script would: always resume from the last checkpoint
        return [sys.executable, "-m", "llava_sgg.cli", "train", "--config", str(path),
                "--set", "train.resume_from_checkpoint=last"]

    path, reference = config_file("reference")
    start = time.monotonic()
    _launch_and_maybe_kill(command(path), tmp_path / "reference.log")
    duration = time.monotonic() - start
    sgg = torch.load(reference / "checkpoint-16" / "optimizer.pt", weights_only=False)["sgg"]
    assert sgg["global_mda"] is not None and sgg["layers"], "SGG clustered nothing: the comparison would be idle"

    rng = random.Random(21)
    figures = {"trials": 0, "kills": 0, "exact": 0, "by_strategy": {s: 0 for s in STRATEGIES}, "left": {}}
    for trial in range(5):  # 10 trials (18 kills, all exact) when written; 5 keep CI's slow step short
        path, output = config_file(f"trial{trial}")
        log = tmp_path / f"trial{trial}.log"
        for strategy in (STRATEGIES[trial % len(STRATEGIES)], rng.choice(STRATEGIES)):  # killed, resumed, killed
            if _launch_and_maybe_kill(command(path), log, _kill_point(output, strategy, rng, duration)):
                figures["kills"] += 1
                figures["by_strategy"][strategy] += 1
                left = _where_killed(output)
                figures["left"][left] = figures["left"].get(left, 0) + 1
            assert not any(checkpoint_problems(folder) for folder in output.glob("checkpoint-*"))  # complete or absent
        _launch_and_maybe_kill(command(path), log)  # to the end
        before = outputs(output)
        _launch_and_maybe_kill(command(path), log)  # once more: finished, nothing to do
        assert "the run already finished at step 16" in log.read_text()
        assert outputs(output) == before
        figures["trials"] += 1
        assert_same_checkpoint(output / "checkpoint-16", reference / "checkpoint-16")
        assert outputs(output)["model.safetensors"] == outputs(reference)["model.safetensors"]
        assert outputs(output)["loss_history.json"] == outputs(reference)["loss_history.json"]
        assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-16"]
        figures["exact"] += 1
    print(f"\nfault injection: {figures}")
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    assert figures["kills"] >= 7


def _torchrun(config_file: Path, record: Path) -> list[str]:
    import socket

    with socket.socket() as s:  # a fresh port per launch: a killed launcher's may linger
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            str(ROOT / "tests" / "dist_llava.py"), str(config_file), str(record)]


@pytest.mark.slow
def test_fsdp2_checkpoints_are_sealed_once_every_rank_wrote_and_survive_kill_9(assets, tmp_path):
    """2 gloo processes, FSDP2, adamw_sgg: every rank writes its optimizer and sgg_state/ shards into the
    staging folder; the manifest lists them all; kills inside saves resume to the uninterrupted run's SGG state."""
    import yaml

    run = {"max_steps": 6, "save_steps": 2, "save_total_limit": 3, "distributed": "fsdp2"}

    def config_file(name: str, **train) -> tuple[Path, Path]:
        output = tmp_path / name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config(assets, output, **{**run, **train}).to_dict()))
        return path, output

    path, reference = config_file("reference")
    start = time.monotonic()
    _launch_and_maybe_kill(_torchrun(path, tmp_path / "reference.pt"), tmp_path / "reference.log")
    duration = time.monotonic() - start
    whole = torch.load(tmp_path / "reference.pt", weights_only=False)
    assert whole["world_size"] == 2 and whole["fsdp"] and whole["global_mda"] is not None
    assert not (reference / STAGING).exists()
    for step in (2, 4, 6):
        listed = json.loads((reference / f"checkpoint-{step}" / MANIFEST).read_text())["files"]
        assert {"pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.pt", "trainer_state.json",
                "rng_state_0.pth", "rng_state_1.pth", "sgg_state/.metadata"} <= set(listed), listed
        assert sum(name.startswith("sgg_state/") and name.endswith(".distcp") for name in listed) == 2, listed

    # A checkpoint without SGG's shards would resume with fresh clusters: refused, naming the folder.
    copy = Path(shutil.copytree(reference, tmp_path / "no-sgg"))
    shutil.rmtree(copy / "checkpoint-4" / "sgg_state")
    seal_checkpoint(copy / "checkpoint-4", 4)
    path_no_sgg, _ = config_file("no-sgg", resume_from_checkpoint=str(copy / "checkpoint-4"))
    done = subprocess.run(_torchrun(path_no_sgg, tmp_path / "no-sgg.pt"), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and f"{copy / 'checkpoint-4' / 'sgg_state'} is missing" in done.stderr

    rng = random.Random(2)
    figures = {"trials": 0, "kills": 0, "exact": 0, "left": {}}
    for trial in range(3):
        path, output = config_file(f"trial{trial}", resume_from_checkpoint="last")
        log, record = tmp_path / f"trial{trial}.log", tmp_path / f"trial{trial}.pt"
        strategy = "inside a checkpoint save" if trial < 2 else "at a random time"
        if _launch_and_maybe_kill(_torchrun(path, record), log, _kill_point(output, strategy, rng, duration)):
            figures["kills"] += 1
            left = _where_killed(output)
            figures["left"][left] = figures["left"].get(left, 0) + 1
        assert not any(checkpoint_problems(folder) for folder in output.glob("checkpoint-*"))  # complete or absent
        _launch_and_maybe_kill(_torchrun(path, record), log)
        resumed = torch.load(record, weights_only=False)
        figures["trials"] += 1
        assert resumed["global_mda"] == whole["global_mda"]
        for name, ids in whole["ids"].items():
            assert torch.equal(resumed["ids"][name], ids), name
            assert torch.equal(resumed["scales"][name], whole["scales"][name]), name
        for name, value in whole["params"].items():
            assert torch.equal(resumed["params"][name], value), name
        losses = [[row["loss"] for row in r["log_history"] if "loss" in row] for r in (resumed, whole)]
        assert losses[0] == losses[1] and len(losses[0]) == 6
        figures["exact"] += 1
    print(f"\nFSDP2 fault injection: {figures}")
    assert figures["kills"] >= 2
