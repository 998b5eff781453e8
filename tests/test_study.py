"""`llava-sgg study` and `report`: a resumable grid of commands, and seed statistics with a known answer."""

import json
import math
import sys

import numpy as np
import pytest
from scipy import stats

from llava_sgg.study import PlanError, compare, load_plan, run_study, write_report

# A "training run": its loss curve falls to `final` (the variant's value plus a seed's offset); it fails
# (as a diverging run stops) when lr_scale is 10 and the optimizer is plain.
SCRIPT = """
import json, sys
optimizer, lr_scale, seed, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if optimizer == "plain" and lr_scale == 10:
    sys.exit("step 3: the loss is nan")
final = {"plain": 1.0, "sgg": 0.5}[optimizer] + 0.01 * (seed - 1) + 0.001 * lr_scale
curve = [[s, final + 1.0 / (s + 1)] for s in range(0, 50, 10)]
json.dump({"metrics": {"loss": final}, "curves": {"train_loss": curve}}, open(out, "w"))
"""


def write_plan(tmp_path, grid=None, **extra):
    (tmp_path / "fake_train.py").write_text(SCRIPT)
    plan = {"name": "toy", "command": [sys.executable, str(tmp_path / "fake_train.py"), "{optimizer}", "{lr_scale}",
                                       "{seed}", "{result}"],
            "grid": grid or {"optimizer": ["plain", "sgg"], "lr_scale": [1, 10], "seed": [0, 1, 2]},
            "compare": {"baseline": {"optimizer": "plain", "lr_scale": 1}, "metrics": {"loss": "lower"}}, **extra}
    import yaml

    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    return tmp_path / "plan.yaml"


@pytest.mark.slow
def test_a_study_runs_its_grid_resumes_and_reports(tmp_path):
    plan = load_plan(write_plan(tmp_path))
    study = tmp_path / "study"
    messages = []
    records = run_study(plan, study, jobs=2, echo=messages.append)
    assert [r["status"] for r in records].count("finished") == 9 and [r["status"] for r in records].count("failed") == 3
    assert "the loss is nan" in records[3]["error"]
    # Finished and failed runs are skipped; a run whose record is gone (killed) runs again, alone.
    (study / "runs" / "optimizer=sgg,lr_scale=1,seed=2" / "record.json").unlink()
    messages.clear()
    run_study(plan, study, echo=messages.append)
    assert messages[0].startswith("study toy: 12 runs, 11 done before, 1 to run")
    assert messages[1].startswith("[1/1] optimizer=sgg,lr_scale=1,seed=2: finished")
    messages.clear()
    run_study(plan, study, retry_failed=True, echo=messages.append)
    assert "3 to run" in messages[0]

    report = write_report(study).read_text()
    assert "| optimizer=sgg, lr_scale=1 | 3 | 0.501 ± 0.01 | -0.5 |" in report and "| better |" in report
    assert "| optimizer=plain, lr_scale=10 | 0 (+3 failed) | — | — | — | no result |" in report
    assert "`optimizer=plain,lr_scale=10,seed=0` (exit 1): step 3: the loss is nan" in report
    assert (study / "plots" / "curve-train_loss.png").is_file() and (study / "plots" / "lr-loss.png").is_file()


def test_welch_p_values_and_verdicts_match_an_independent_computation():
    a, b = [1.0, 1.1, 0.9, 1.05], [1.3, 1.5, 1.2]
    # Welch's t and Welch-Satterthwaite degrees of freedom, by hand.
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    expected = 2 * stats.t.sf(abs(t), dof)
    p, verdict = compare(a, b, "lower")
    assert p == pytest.approx(expected, rel=1e-9) and p < 0.05 and verdict == "better"
    assert compare(a, b, "higher")[1] == "worse"
    assert compare([1.0, 1.2, 0.8], [1.05, 0.9, 1.15], "lower")[1] == "no difference beyond seed spread"
    assert compare([1.0], b, "lower") == (None, "too few seeds")


@pytest.mark.parametrize("change, message", [
    ({"grid": {"optimizer": []}}, "grid.optimizer must be a non-empty list"),
    ({"learning_rate": 1}, "unknown key(s) learning_rate"),
    ({"command": ["python", "{optimzer}"]}, "command placeholder {optimzer} is not in grid or fixed"),
    ({"fixed": {"seed": 1}}, "seed is given twice"),
    ({"compare": {"baseline": {"optimizer": "adam"}}}, "compare.baseline.optimizer='adam' is not a grid value"),
    ({"compare": {"metrics": {"loss": "smaller"}}}, "compare.metrics.loss must be lower or higher"),
    ({"grid": {"lr": [0.1, "0.1"]}}, "grid.lr has values that name the same run"),
])
def test_a_bad_plan_is_refused_naming_the_key(tmp_path, change, message):
    import yaml

    path = write_plan(tmp_path)
    plan = {**yaml.safe_load(path.read_text()), **change}
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    with pytest.raises(PlanError, match=f"^{tmp_path / 'plan.yaml'}: .*" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("{", r"\{").replace("}", r"\}").replace("[", r"\[")):
        load_plan(path)


def test_a_report_of_synthetic_records_has_the_known_answer(tmp_path):
    """Records written by hand (no runner): a clear gain, a gain inside the seed spread, one failure."""
    import yaml

    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({
        "name": "synthetic", "command": ["x"], "grid": {"rule": ["none", "mda", "mean_ratio"], "seed": [0, 1, 2]},
        "compare": {"baseline": {"rule": "none"}, "metrics": {"acc": "higher"}}}))
    values = {"none": [50.0, 51.0, 49.0], "mda": [60.0, 61.0, 59.5], "mean_ratio": [50.5, 52.0, 48.0]}
    for rule, accs in values.items():
        for seed, acc in enumerate(accs):
            folder = tmp_path / "runs" / f"rule={rule},seed={seed}"
            folder.mkdir(parents=True)
            status = "failed" if (rule, seed) == ("mean_ratio", 2) else "finished"
            record = {"key": folder.name, "values": {"rule": rule, "seed": seed}, "status": status, "returncode": 0,
                      "result": {"metrics": {"acc": acc}}, "error": "boom"}
            (folder / "record.json").write_text(json.dumps(record))
    report = write_report(tmp_path).read_text()
    assert "| **rule=none** (baseline) | 3 | 50 ± 1 |" in report
    assert "| rule=mda | 3 | 60.17 ± 0.7638 | +10.17 |" in report and report.count("| better |") == 1
    assert "| rule=mean_ratio | 2 (+1 failed) | 51.25 ± 1.061 | +1.25 |" in report
    assert "no difference beyond seed spread" in report


@pytest.mark.slow
def test_the_cli_runs_a_study_and_reports_it(tmp_path, capsys):
    from llava_sgg.cli import main

    grid = {"optimizer": ["sgg"], "lr_scale": [1], "seed": [0, 1]}
    assert main(["study", str(write_plan(tmp_path, grid=grid, compare={})), "--output", str(tmp_path / "s")]) == 0
    assert "2 of 2 runs finished" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "s")]) == 0 and (tmp_path / "s" / "report.md").is_file()


def test_the_cli_names_a_plan_it_cannot_read(tmp_path, capsys):
    from llava_sgg.cli import main

    assert main(["study", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "s")]) == 2
    assert "llava-sgg study: " + str(tmp_path / "missing.yaml") + ": cannot read the plan" in capsys.readouterr().err


def test_names_joined_by_plus_vary_together(tmp_path):
    import yaml

    path = write_plan(tmp_path, grid={"optimizer+lr_scale": [["plain", 1], ["sgg", 3]], "seed": [0, 1]},
                      compare={"baseline": {"optimizer+lr_scale": "plain+1"}})
    plan = load_plan(path)
    runs = plan.runs(tmp_path / "s")
    assert [r.key for r in runs] == ["optimizer+lr_scale=plain+1,seed=0", "optimizer+lr_scale=plain+1,seed=1",
                                     "optimizer+lr_scale=sgg+3,seed=0", "optimizer+lr_scale=sgg+3,seed=1"]
    assert runs[2].command[2:5] == ("sgg", "3", "0") and runs[2].values == {"optimizer+lr_scale": "sgg+3", "seed": 0}
    bad = yaml.safe_load(path.read_text())
    bad["grid"]["optimizer+lr_scale"] = [["plain"]]
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(PlanError, match="varies 2 names together"):
        load_plan(path)


def test_a_list_of_grids_runs_their_union_once_and_by_part(tmp_path):
    import yaml

    grids = [{"optimizer": ["plain", "sgg"], "lr_scale": [1], "seed": [0, 1]},
             {"optimizer": ["sgg"], "lr_scale": [1, 3], "seed": [0]}]  # sgg,1,0 is in both
    path = write_plan(tmp_path, grid=grids)
    plan = load_plan(path)
    study = tmp_path / "s"
    keys = [r.key for r in plan.runs(study)]
    assert keys == ["optimizer=plain,lr_scale=1,seed=0", "optimizer=plain,lr_scale=1,seed=1",
                    "optimizer=sgg,lr_scale=1,seed=0", "optimizer=sgg,lr_scale=1,seed=1",
                    "optimizer=sgg,lr_scale=3,seed=0"]
    assert [r.key for r in plan.runs(study, part=2)] == ["optimizer=sgg,lr_scale=1,seed=0",
                                                         "optimizer=sgg,lr_scale=3,seed=0"]
    with pytest.raises(PlanError, match="has 2 grid\\(s\\); part must be 1..2, got 3"):
        run_study(plan, study, part=3)
    bad = yaml.safe_load(path.read_text())
    bad["grid"][1] = {"seed": [0], "optimizer": ["sgg"], "lr_scale": [1]}
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(PlanError, match=r"grid\[1\] names seed, optimizer, lr_scale; every grid of the list must "
                                        r"name optimizer, lr_scale, seed, in that order"):
        load_plan(path)


def test_the_study_dir_placeholder_names_the_study_folder(tmp_path):
    path = write_plan(tmp_path, grid={"optimizer": ["plain"], "lr_scale": [1], "seed": [0]})
    import yaml

    plan = yaml.safe_load(path.read_text())
    plan["command"] = plan["command"] + ["{study_dir}/cache"]
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    (run,) = load_plan(path).runs(tmp_path / "s")
    assert run.command[-1] == f"{tmp_path / 's'}/cache"


def test_each_variant_is_compared_with_the_baseline_of_its_other_values(tmp_path):
    """baseline {sgg: none}: lamb+mda against plain lamb at the same lr, not against plain adamw."""
    import yaml

    from llava_sgg.study import baseline_of

    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({
        "name": "families", "command": ["x"],
        "grid": [{"optimizer": ["adamw", "lamb"], "sgg": ["none", "mda"], "lr_scale": [1], "seed": [0, 1, 2]},
                 {"optimizer": ["adamw"], "sgg": ["none", "mda"], "lr_scale": [3], "seed": [0, 1, 2]}],
        "compare": {"baseline": {"sgg": "none"}, "metrics": {"acc": "higher"}}}, sort_keys=False))
    base = {("adamw", 1): 50.0, ("lamb", 1): 20.0, ("adamw", 3): 40.0}
    for (optimizer, lr), acc in base.items():
        for sgg, gain in (("none", 0.0), ("mda", 5.0)):
            for seed in range(3):
                values = {"optimizer": optimizer, "sgg": sgg, "lr_scale": lr, "seed": seed}
                folder = tmp_path / "runs" / ",".join(f"{k}={v}" for k, v in values.items())
                folder.mkdir(parents=True)
                record = {"key": folder.name, "values": values, "status": "finished", "returncode": 0,
                          "result": {"metrics": {"acc": acc + gain + seed}}}
                (folder / "record.json").write_text(json.dumps(record))
    variant = (("optimizer", "lamb"), ("sgg", "mda"), ("lr_scale", 1))
    assert baseline_of(variant, {"sgg": "none"}) == (("optimizer", "lamb"), ("sgg", "none"), ("lr_scale", 1))
    report = write_report(tmp_path).read_text()
    # Every SGG variant is exactly 5 above its own baseline (same seeds' offsets), whatever its family.
    for optimizer, lr in base:
        assert f"| optimizer={optimizer}, sgg=mda, lr_scale={lr} | 3 | " in report
    assert report.count("| +5 |") == 3 and report.count("(baseline)") == 3
    assert "18 runs planned, 18 finished" in report


def test_the_summary_table_marks_only_differences_beyond_the_seed_spread(tmp_path):
    import yaml

    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({
        "name": "summary", "command": ["x"], "grid": {"rule": ["none", "mda", "mean_ratio"], "seed": [0, 1, 2]},
        "compare": {"baseline": {"rule": "none"}, "metrics": {"acc": "higher", "loss": "lower"}}}))
    values = {"none": ([50.0, 51.0, 49.0], [1.0, 1.1, 0.9]), "mda": ([60.0, 61.0, 59.0], [1.0, 1.2, 0.8]),
              "mean_ratio": ([40.0, 41.0, 39.0], [2.0, 2.1, 1.9])}
    for rule, (accs, losses) in values.items():
        for seed in range(3):
            folder = tmp_path / "runs" / f"rule={rule},seed={seed}"
            folder.mkdir(parents=True)
            (folder / "record.json").write_text(json.dumps({
                "key": folder.name, "values": {"rule": rule, "seed": seed}, "status": "finished", "returncode": 0,
                "result": {"metrics": {"acc": accs[seed], "loss": losses[seed]}}}))
    report = write_report(tmp_path).read_text()
    assert "| **rule=none** | 3 | 50 ± 1 | 1 ± 0.1 |" in report
    assert "| rule=mda | 3 | 60 ± 1 ▲ | 1 ± 0.2 |" in report  # same loss: no mark
    assert "| rule=mean_ratio | 3 | 40 ± 1 ▼ | 2 ± 0.1 ▼ |" in report


def test_contrasts_compare_each_matching_variant_with_its_against_variant(tmp_path):
    """mean_ratio against the decay-only control at the lr where the control ran; lr x3 against x1."""
    import yaml

    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({
        "name": "contrasts", "command": ["x"],
        "grid": [{"sgg": ["none", "mean_ratio"], "lr_scale": [1, 3], "seed": [0, 1, 2]},
                 {"sgg": ["decay_only"], "lr_scale": [1], "seed": [0, 1, 2]}],
        "compare": {"baseline": {"sgg": "none"}, "metrics": {"acc": "higher"}, "contrasts": [
            {"name": "rule against control", "variant": {"sgg": "mean_ratio"}, "against": {"sgg": "decay_only"}},
            {"name": "x3 against x1", "variant": {"sgg": "none", "lr_scale": 3}, "against": {"lr_scale": 1}}]}},
        sort_keys=False))
    means = {("none", 1): 50.0, ("none", 3): 60.0, ("mean_ratio", 1): 41.0, ("mean_ratio", 3): 45.0,
             ("decay_only", 1): 40.0}
    for (sgg, lr), acc in means.items():
        for seed in range(3):
            folder = tmp_path / "runs" / f"sgg={sgg},lr_scale={lr},seed={seed}"
            folder.mkdir(parents=True)
            (folder / "record.json").write_text(json.dumps({
                "key": folder.name, "values": {"sgg": sgg, "lr_scale": lr, "seed": seed}, "status": "finished",
                "returncode": 0, "result": {"metrics": {"acc": acc + seed - 1.0}}}))
    report = write_report(tmp_path).read_text()
    section = report.split("## Contrasts")[1].split("## Per metric")[0]
    # mean_ratio at lr 1 has a control; at lr 3 none ran, so that pair is absent.
    assert "`sgg=mean_ratio, lr_scale=1` against `sgg=decay_only, lr_scale=1`:" in section
    assert "`sgg=mean_ratio, lr_scale=3` against" not in section
    assert "`sgg=none, lr_scale=3` against `sgg=none, lr_scale=1`:" in section
    rows = [line for line in section.splitlines() if line.startswith("| acc |")]
    # Welch with equal spreads of 1 over 3 seeds: t = 1 / sqrt(2/3), df = 4.
    p = 2 * stats.t.sf(1 / math.sqrt(2 / 3), df=4)
    assert rows[0] == f"| acc | 41 ± 1 | 40 ± 1 | +1 | {p:.3f} | no difference beyond seed spread |"
    assert rows[1] == "| acc | 60 ± 1 | 50 ± 1 | +10 | < 0.001 | better |"
    assert len(rows) == 2


def test_a_contrast_naming_a_value_outside_the_grid_is_refused(tmp_path):
    path = write_plan(tmp_path, compare={"contrasts": [{"name": "c", "variant": {"optimizer": "sgd"},
                                                         "against": {"optimizer": "plain"}}]})
    with pytest.raises(PlanError, match=r"compare.contrasts\[0\].variant.optimizer='sgd' is not a grid value"):
        load_plan(path)
