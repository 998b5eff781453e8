import json
from types import SimpleNamespace

import pytest
import torch

from llava_sgg.bench_loss import _capture, _load, distances
from llava_sgg.cli import main

NAMES = ("bf16 padded", "bf16 packed", "fp32 padded", "fp32 packed")


def test_distances_are_the_largest_relative_gaps_and_the_verdict_follows_them():
    ref = [4.0, 2.0, 1.0]
    losses = {"fp32 padded": ref, "fp32 packed": [4.0, 2.0, 1.00001],
              "bf16 padded": [4.02, 2.0, 0.99], "bf16 packed": [4.0, 2.03, 0.99]}
    check = distances(losses)
    noise = max(abs(a - b) / r for a, b, r in zip(losses["bf16 padded"], ref, ref))  # 0.01, at step 3
    packing = max(abs(a - b) / r for a, b, r in zip(losses["bf16 packed"], losses["bf16 padded"], ref))  # 0.015
    assert check["max"]["bf16_noise"] == pytest.approx(noise) and noise == pytest.approx(0.01)
    assert check["max"]["packing_bf16"] == pytest.approx(packing) and packing == pytest.approx(0.015)
    assert check["max"]["packing_fp32"] == pytest.approx(1e-5)
    assert check["packing_within_bf16_noise"] and check["packing_exact_in_fp32"] and check["passed"]
    # Packing that moves the bf16 curve by more than twice bf16's own noise fails, as does an fp32 gap.
    assert not distances({**losses, "bf16 packed": [4.0, 2.0, 0.969]})["passed"]
    assert not distances({**losses, "fp32 packed": [4.0, 2.001, 1.0]})["passed"]


def test_the_fp32_build_gets_the_bf16_build_s_values():
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(torch.bfloat16)
    torch.manual_seed(1)
    second = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))  # fp32, other values
    store = {}
    _capture(store)(SimpleNamespace(model=first))
    _load(store)(SimpleNamespace(model=second))
    for a, b in zip(first.parameters(), second.parameters()):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b)
    with pytest.raises(RuntimeError, match="parameters differ"):
        _load(store)(SimpleNamespace(model=torch.nn.Linear(4, 3)))


@pytest.mark.slow  # four tiny training runs on a CPU
def test_bench_loss_on_cpu_trains_four_rows_on_the_same_batches(tmp_path, capsys):
    assert main(["bench", "loss", "--size", "tiny", "--batch", "4", "--steps", "3", "--workers", "0",
                 "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "loss-tiny-lora-mix-cpu.json").read_text())
    assert (tmp_path / "loss-tiny-lora-mix-cpu.png").stat().st_size > 0
    assert tuple(report["losses"]) == NAMES and all(len(v) == 3 for v in report["losses"].values())
    assert report["args"]["lora_dropout"] == 0.0
    losses = report["losses"]
    # fp32: packing reorders sums only; bf16 rounds each layout its own way, but not by much.
    for a, b in zip(losses["fp32 packed"], losses["fp32 padded"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    for a, b in zip(losses["bf16 padded"], losses["fp32 padded"]):
        assert 0 < abs(a - b) <= 1e-2 * abs(b)
    assert report["check"]["passed"]
    out = capsys.readouterr().out
    assert "largest relative distance: bf16's noise" in out and "(exact to 1e-04)" in out


@pytest.mark.parametrize("args, message", [(["--size", "7b"], "--size tiny"), (["--steps", "1"], ">= 2"),
                                           (["--attn", "flex_attention"], "sdpa or eager")])
def test_bench_loss_refuses_what_a_cpu_cannot_run_before_building_anything(tmp_path, capsys, monkeypatch, args,
                                                                          message):
    # As on a machine without CUDA: on one with it, `--size 7b` would be accepted and run.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "loss", "--size", "tiny", "--output", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
