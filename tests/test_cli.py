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


def _config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {vision_tower: tiny, language_model: tiny}\n"
                    f"data: {{data_path: {tmp_path / 'train.json'}, image_folder: {tmp_path}}}\n")
    return str(path)


def test_a_library_error_about_a_file_is_printed_with_the_file(tmp_path, monkeypatch, capsys):
    from transformers import TrainerState

    from llava_sgg.train import run

    state = tmp_path / "checkpoint-20" / "trainer_state.json"
    state.parent.mkdir()
    state.write_text('{"global_step": 20,\n "epoch": 1.0\n "log_history": []}\n')
    # As a resume reads a truncated checkpoint: json names the line, not the file.
    monkeypatch.setattr(run, "train", lambda cfg: TrainerState.load_from_json(str(state)))
    assert main(["train", "--config", _config(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"llava-sgg train: {state}:3:2: invalid JSON: Expecting ',' delimiter\n"


def test_config_errors_are_one_line_naming_file_and_key(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["train", "--config", config, "--set", "train.save_total_limit=0"]) == 2
    assert capsys.readouterr().err.startswith(
        f"llava-sgg train: {config} --set train.save_total_limit=0: train.save_total_limit must be an integer >= 1")


def test_an_unforeseen_error_keeps_its_traceback(tmp_path, monkeypatch):
    from llava_sgg.train import run

    def bug(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(run, "train", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--config", _config(tmp_path)])
