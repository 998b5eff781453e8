import json

from llava_sgg.cli import main


def test_bench_optim_on_the_tiny_set_writes_a_report(tmp_path, capsys, monkeypatch):
    from llava_sgg import bench

    # The tiny set's kinds of tensors (embeddings, matrices, norms) at ~1% of its 2.1 M parameters: the
    # report is what is checked here, not the timings of full-size re-clusterings.
    monkeypatch.setitem(bench.PARAM_SETS, "tiny", lambda: [(100, 32), (32, 32), (86, 32), (32, 86), (32,), (100, 32)])
    assert main(["bench", "optim", "--params", "tiny", "--optimizers", "adamw,adamw_sgg,adamw_sgg_mean_ratio",
                 "--steps", "2", "--device", "cpu", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "optim-tiny-cpu.json").read_text())
    rows = {r["optimizer"]: r for r in report["rows"]}
    assert rows["adamw"]["x_adamw"] == 1.0
    sgg = rows["adamw_sgg"]
    assert sgg["sgg_bytes_per_eligible_element"] >= 1.0 and sgg["recluster_s"] > 0 and sgg["step_s"] > 0
    assert rows["adamw_sgg_mean_ratio"]["recluster_s"] > 0
    assert "adamw_sgg" in capsys.readouterr().out


def test_bench_rejects_an_unknown_optimizer(tmp_path, capsys):
    assert main(["bench", "optim", "--params", "tiny", "--optimizers", "sgd", "--output", str(tmp_path)]) != 0
    assert "unknown optimizer(s) sgd" in capsys.readouterr().err
