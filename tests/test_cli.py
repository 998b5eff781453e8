"""The `llava-sgg` command line."""

import json

import pytest

from llava_sgg.cli import main


def test_sgg_example_prints_the_table_and_writes_plots(tmp_path, capsys):
    assert main(["sgg-example", "--steps", "20", "--optimizers", "adamw", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "adamw_sgg" in out and "final loss" in out
    report = json.loads((tmp_path / "sgg_example.json").read_text())
    assert set(report["results"]) == {"adamw", "adamw_sgg"}
    assert len(report["runs"]["adamw_sgg"]["losses"]) == 20
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert (tmp_path / "cluster_scales.png").stat().st_size > 0


def test_bad_arguments_are_reported(capsys):
    assert main(["sgg-example", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sgg-example", "--optimizers", "sgd"])
