"""`llava-sgg demo --quick`: the whole job in seconds on tiny parts, through the same code as the full demo."""

import json

import pytest

from llava_sgg.cli import main


@pytest.mark.slow  # the whole demo job (about a minute on 2 cores)
def test_quick_demo_runs_to_the_table_report_and_plots(tmp_path, capsys):
    output, cache = tmp_path / "demo", tmp_path / "cache"
    assert main(["demo", "--quick", "--output", str(output), "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "MMBench circular" in out and "wall time" in out
    summary = json.loads((output / "summary.json").read_text())
    assert set(summary["table"]) == {"adamw", "adamw_sgg", "chance", "majority"}
    assert all(len(values) == len(summary["metrics"]) for values in summary["table"].values())
    report = (output / "report.md").read_text()
    assert "| adamw_sgg |" in report and "loss_curves.png" in report
    assert (output / "loss_curves.png").stat().st_size > 0
    assert (output / "cluster_scales_adamw_sgg.png").stat().st_size > 0
    for name in ("adamw", "adamw_sgg"):
        for bench in ("pope", "gqa", "mmbench", "mme"):
            assert (output / name / "answers" / f"{bench}.jsonl").is_file()
            assert (output / name / "metrics" / f"{bench}_metrics.json").is_file()
        assert (output / name / "model.safetensors").is_file()
    # The quick recipe plans its steps from a measured step, as the CPU recipe does, and aligns its connector.
    assert summary["seconds_per_step"] > 0 and summary["steps"] == 2 and summary["time_budget"] > 0
    assert summary["evaluation_seconds_estimate"] > 0 and "per evaluation" in report
    assert 0 <= summary["connector_alignment"]["eval_nearest_accuracy"] <= 1
    assert not (output / "step-probe").exists()
    # The majority baseline answers "Yes" everywhere: POPE F1 2/3, MME acc+ 0.
    assert abs(summary["table"]["majority"][0] - 200 / 3) < 1e-9


def test_recipe_precision_follows_settings_else_the_device(tmp_path, monkeypatch):
    import dataclasses
    from pathlib import Path

    from llava_sgg.demo import recipes, stages

    # Only the recipe's own switch is read here: the raw config is returned unvalidated.
    monkeypatch.setattr(stages, "build_run_config", lambda raw, origin: raw)
    data = type("Data", (), {"train_json": Path("train.json"), "image_folder": Path("images")})()

    def trains_in_bf16(settings) -> bool:
        return stages.run_config(settings, Path("tower"), Path("decoder"), data, tmp_path, "adamw")["train"]["bf16"]

    assert trains_in_bf16(dataclasses.replace(recipes.FULL, bf16=True)) is True
    assert trains_in_bf16(dataclasses.replace(recipes.FULL, bf16=False)) is False
    assert trains_in_bf16(recipes.FULL) is recipes.native_bf16()
    # The recipe the README states: full fine-tuning of the 4-layer decoder, GPU_STEPS on a GPU.
    assert recipes.FULL.mode == "full" and recipes.FULL.decoder_layers == 4 and recipes.FULL.steps == recipes.GPU_STEPS


def test_steps_override_the_recipe_and_bad_counts_are_errors(capsys):
    import dataclasses

    from llava_sgg.demo import recipes

    cpu = recipes.recipe(quick=False, gpu=False)
    # On a CPU: at most CPU_MAX_STEPS, cut to the time budget, no captions stage (the alignment makes the connector).
    assert (cpu.steps, cpu.time_budget, cpu.connector) == (recipes.CPU_MAX_STEPS, recipes.CPU_BUDGET_S, None)
    assert cpu.alignment is not None and cpu.tower.position_weight > 0
    gpu = recipes.recipe(quick=False, gpu=True)
    assert (gpu.steps, gpu.time_budget) == (recipes.GPU_STEPS, None) and gpu.connector is not None
    fixed = recipes.recipe(quick=False, gpu=False, steps=1200)
    assert (fixed.steps, fixed.time_budget) == (1200, None)
    assert recipes.recipe(quick=True, gpu=False, steps=5) == dataclasses.replace(recipes.QUICK, steps=5, time_budget=None)
    assert main(["demo", "--steps", "0", "--output", "unused"]) == 2
    assert "demo steps must be a positive integer, got 0" in capsys.readouterr().err


def test_verdict_names_each_metric_below_the_better_baseline():
    from llava_sgg.demo import recipes, report

    n = len(report.METRICS)
    rows = [("adamw", [70.0] * n), ("adamw_sgg", [60.0] + [70.0] * (n - 1)),
            ("chance", [50.0] * n), ("majority", [66.7] + [10.0] * (n - 1))]
    missed = report.shortfalls(rows)
    # The better baseline is taken per metric: majority's 66.7 on the first, chance's 50 elsewhere.
    assert missed == {"adamw": [], "adamw_sgg": [f"{report.METRICS[0][1]} (60.0 vs 66.7)"]}
    lines = report.verdict(rows, 100)
    assert lines[0] == "adamw: beats chance and majority on every metric."
    assert lines[1].startswith("adamw_sgg: does not beat the better baseline on POPE F1 (60.0 vs 66.7)")
    assert f"--steps {recipes.GPU_STEPS}" in lines[2]
    # A tie is not a win; at the GPU recipe's steps there is no hint to run longer.
    tied = [("adamw", [50.0] * n), ("chance", [50.0] * n), ("majority", [0.0] * n)]
    assert len(report.shortfalls(tied)["adamw"]) == n
    assert len(report.verdict(tied, recipes.GPU_STEPS)) == 1


def test_plan_steps_fits_two_runs_and_their_evaluations_in_the_budget():
    from llava_sgg.demo import planning

    # 540 s budget, 140 s gone, 0.5 s a step, 16 s to evaluate a model: two evaluations, counted at
    # EVAL_MARGIN times, cost 2 * 1.25 * 16 = 40 s, leaving 360 s for two runs of 0.5 s steps: 360 steps each.
    assert planning.plan_steps(540, 140, 0.5, most=1000, evaluation=16) == 360
    assert planning.plan_steps(540, 140, 0.5, most=200, evaluation=16) == 200  # capped by the recipe's steps
    # Over budget already: train a little anyway.
    assert planning.plan_steps(540, 500, 5.0, most=400, evaluation=16) == planning.MIN_STEPS
    assert planning.plan_steps(100, 0, 1.0, most=1000, evaluation=32, runs=1) == 60
    assert planning.plan_steps(540, 500, 5.0, most=2, evaluation=16) == 2  # never more than the recipe asks
    assert planning.plan_steps(540, 140, 1.0, most=1000, evaluation=0.0) == 200


@pytest.mark.slow  # the whole demo job, one optimizer
def test_a_quick_demo_run_as_a_study_runs_it(tmp_path):
    """What `llava-sgg study` runs: one optimizer, a seed and a learning-rate scale, metrics in a JSON."""
    output, result = tmp_path / "demo", tmp_path / "result.json"
    assert main(["demo", "--quick", "--output", str(output), "--cache", str(tmp_path / "cache"),
                 "--optimizers", "lamb_sgg", "--seed", "1", "--lr-scale", "2", "--rule", "mean_ratio",
                 "--result", str(result)]) == 0
    found = json.loads(result.read_text())
    assert {"POPE F1", "GQA acc", "MME perception /400", "final_loss"} <= set(found["metrics"])
    assert [step for step, _ in found["curves"]["train_loss"]] == list(range(1, found["summary"]["steps"] + 1))
    assert set(found["summary"]["table"]) == {"lamb_sgg", "chance", "majority"}
    assert found["summary"]["seed"] == 1 and found["summary"]["lr"] == 2 * recipes_lr()
    assert found["summary"]["sgg"]["rule"] == "mean_ratio"
    # The quick recipe re-clusters every step with beta3 0.5: the rule's scales halve each time while the
    # targets (cluster means over EMAs started at 1) stay near 0 -- the decay `--sgg decay_only` mimics.
    medians = [value for _, value in found["curves"]["sgg_scale_median"]]
    assert medians == pytest.approx([0.5 ** k for k in range(1, len(medians) + 1)], rel=0.05)


@pytest.mark.slow  # the whole demo job, twice
def test_the_study_variants_of_the_demo_run(tmp_path):
    """--prepare-only builds a seed's start; LoRA, and the decay-only control, then run from it."""
    cache = tmp_path / "cache"
    assert main(["demo", "--quick", "--prepare-only", "--output", str(tmp_path / "p"), "--cache", str(cache)]) == 0
    built = sorted(p.name for p in (cache / "models").iterdir())
    result = tmp_path / "result.json"
    assert main(["demo", "--quick", "--output", str(tmp_path / "lora"), "--cache", str(cache), "--mode", "lora",
                 "--optimizers", "adamw", "--sgg", "decay_only", "--result", str(result)]) == 0
    assert sorted(p.name for p in (cache / "models").iterdir()) == built  # nothing new: the start was shared
    summary = json.loads(result.read_text())["summary"]
    assert summary["mode"] == "lora" and summary["lr_step_decay"] == {"every": 1, "factor": 0.5, "floor": 0.1}


def recipes_lr() -> float:
    from llava_sgg.demo.recipes import QUICK

    return QUICK.lr
