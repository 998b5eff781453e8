import json
import multiprocessing
import os

import pytest

from llava_sgg.bench_run import _order, summarize
from llava_sgg.cli import main


def _run(name, train, first, ordinary, recluster, position):
    return {"optimizer": name, "position": position, "train_s": train, "first_step_s": first, "ordinary_s": ordinary,
            "recluster_s": recluster, "ordinary_step_s": ordinary / 8, "ordinary_steps": 8,
            "recluster_step_s_mean": recluster / 2, "recluster_step_s_max": recluster / 2,
            "first_recluster_s": recluster / 2, "recluster_steps": 2}


def test_summary_splits_the_difference_into_steps_and_the_rest():
    runs = [_run("adamw", 12.0, 1.0, 8.0, 2.0, 0), _run("adamw_sgg", 16.0, 1.5, 9.0, 4.5, 1),
            _run("adamw_sgg", 14.0, 1.0, 9.0, 3.5, 2), _run("adamw", 10.0, 1.0, 7.0, 1.6, 3)]
    base, sgg = summarize(runs, ["adamw", "adamw_sgg"], "adamw")
    # Hand computed: means 11.0 and 15.0; first steps 1.0 and 1.25, ordinary 7.5 and 9.0, re-clustering 1.8 and 4.0.
    assert base["train_s"] == 11.0 and sgg["train_s"] == 15.0 and sgg["x_base"] == pytest.approx(15 / 11)
    assert sgg["train_s_each"] == [16.0, 14.0] and sgg["runs"] == 2
    excess = sgg["excess_s"]
    assert excess["total"] == pytest.approx(4.0)
    assert excess["first_step"] == pytest.approx(0.25)
    assert excess["ordinary_steps"] == pytest.approx(1.5)
    assert excess["recluster_steps"] == pytest.approx(2.2)
    assert excess["rest"] == pytest.approx(4.0 - 0.25 - 1.5 - 2.2)
    assert base["x_base"] == 1.0 and all(v == 0 for v in base["excess_s"].values())


def test_runs_alternate_so_each_optimizer_is_first_as_often_as_last():
    assert _order(["a", "b"], 1) == ["a", "b"]
    assert _order(["a", "b"], 3) == ["a", "b", "b", "a", "a", "b"]


@pytest.mark.slow
def test_bench_run_times_the_demos_fine_tuning_with_each_optimizer(tmp_path, capsys):
    assert main(["bench", "run", "--setup", "demo", "--quick", "--steps", "7", "--recluster-interval", "3",
                 "--repeats", "2", "--cache", str(tmp_path / "cache"), "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "run-demo-quick-cpu.json").read_text())
    assert [r["optimizer"] for r in report["runs"]] == ["adamw", "adamw_sgg", "adamw_sgg", "adamw"]
    assert report["args"]["sgg"]["recluster_interval"] == 3 and report["args"]["steps"] == 7
    for run in report["runs"]:
        assert run["steps"] == 7
        # Steps 2-7 are timed (step 1 has no previous end): 3 and 6 re-cluster, the other four do not.
        assert run["recluster_steps"] == 2 and run["ordinary_steps"] == 4
        assert run["reclusterings"] == (2 if run["optimizer"] == "adamw_sgg" else None)
        assert run["first_step_s"] + run["ordinary_s"] + run["recluster_s"] <= run["train_s"]
    base, sgg = report["rows"]
    assert sgg["x_base"] == pytest.approx(sgg["train_s"] / base["train_s"])
    assert sum(sgg["excess_s"][k] for k in ("first_step", "ordinary_steps", "recluster_steps", "rest")) \
        == pytest.approx(sgg["excess_s"]["total"])
    assert all(len(run["step_times_s"]) == 6 for run in report["runs"])
    assert (tmp_path / "run-demo-quick-cpu.png").stat().st_size > 0
    assert "seconds over the base" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_run_on_pipeline_parts_profiles_the_host(tmp_path, capsys):
    assert main(["bench", "run", "--setup", "tiny", "--steps", "3", "--recluster-interval", "2", "--repeats", "1",
                 "--batch", "2", "--workers", "0", "--profile", "--device-profile", "2",
                 "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "run-tiny-lora-cpu.json").read_text())
    assert [r["reclusterings"] for r in report["runs"]] == [None, 1]
    assert set(report["profiles"]) == {"adamw", "adamw_sgg"}
    assert "_recluster" in report["profiles"]["adamw_sgg"] or "kmeans" in report["profiles"]["adamw_sgg"]
    # torch.profiler over the last two steps (a CPU: host operators only, no device time).
    assert set(report["device_profiles"]) == {"adamw", "adamw_sgg"}
    for recorded in report["device_profiles"].values():
        assert recorded["steps"] == 2 and recorded["wall_s"] > 0 and "device_busy_s" not in recorded
        assert "aten::mm" in recorded["host_table"] or "aten::addmm" in recorded["host_table"]
    out = capsys.readouterr().out
    assert "host profile, adamw_sgg" in out and "torch.profiler, adamw_sgg, the last 2 steps" in out


@pytest.mark.slow
def test_cold_bench_run_starts_every_run_in_a_new_process_with_empty_compile_caches(tmp_path, capsys):
    assert main(["bench", "run", "--setup", "tiny", "--steps", "3", "--recluster-interval", "2", "--repeats", "1",
                 "--batch", "2", "--workers", "1", "--cold", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "run-tiny-lora-cold-cpu.json").read_text())
    assert report["args"]["cold"] is True
    runs = report["runs"]
    assert [r["reclusterings"] for r in runs] == [None, 1] and all(r["steps"] == 3 for r in runs)
    assert len({r["process"] for r in runs} | {os.getpid()}) == 3
    # the DataLoader workers start as in a normal run, not as the spawned run process itself was
    assert all(r["start_method"] == multiprocessing.get_all_start_methods()[0] for r in runs)
    for kind, variable in (("triton", "TRITON_CACHE_DIR"), ("inductor", "TORCHINDUCTOR_CACHE_DIR")):
        caches = [r[f"{kind}_cache"] for r in runs]
        assert len(set(caches)) == 2 and all(c.endswith(f"caches-{i}/{kind}") for i, c in enumerate(caches))
        assert os.environ.get(variable) not in caches  # this process's own is left as it was
    assert runs[1]["precompile"] is None  # a CPU: nothing compiles
    assert "each run in a new process with empty compile caches" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--optimizers", "adamw,adamw_sggg"], ["--repeats", "0"], ["--steps", "1"],
                                  ["--recluster-interval", "0"], ["--device-profile", "-1"]])
def test_bench_run_refuses_bad_arguments_before_building_anything(tmp_path, capsys, args):
    assert main(["bench", "run", "--setup", "tiny", "--output", str(tmp_path / "out"), *args]) == 2
    error = capsys.readouterr().err
    assert any(s in error for s in ("adamw_sggg", ">= 1", ">= 2", ">= 0"))
    assert not (tmp_path / "out").exists()
