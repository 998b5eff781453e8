"""Everything that can be checked is checked before the expensive work, and errors name their file (issue 21).

The order of a run: the config (every value, optimizer and SGG options included) when it is loaded; then
the tokenizer and image processor, read from the parts' config files; then the whole data file; only
then the model's weights.
"""

import json
import logging
from pathlib import Path

import pytest
import yaml

from llava_sgg.errors import FileError, describe, reading
from llava_sgg.model import builder
from llava_sgg.optim import check_optimizer_options
from llava_sgg.train import run
from llava_sgg.train.config import ConfigError, load_run_config
from train_fixtures import make_dataset, make_parts, tiny_run

TINY_PARTS = {"vision_tower": "tiny", "language_model": "tiny"}


@pytest.fixture
def run_config(tmp_path):
    """A run config file over tiny parts and a small dataset, as a user writes it."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": TINY_PARTS, "data": make_dataset(tmp_path),
                                    "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1}}))
    return path


# --- 1. every config value is checked when the config is loaded, naming the file and the key ---

BAD_OPTIMIZER = [
    ("adamw_sgg", "n_clusters=0", "n_clusters must be an integer in [1, 256], got 0"),
    ("adamw_sgg", "recluster_interval=0", "recluster_interval must be an integer >= 1, got 0"),
    ("adamw_sgg", "beta3=1.5", "beta3 must be a number in [0, 1), got 1.5"),
    ("adamw_sgg", "scale_bounds=[2.0, 1.0]", "scale_bounds must satisfy 0 < lower <= upper"),
    ("adamw_sgg", "sgg_eps=0", "eps must be > 0"),
    ("adamw_sgg", "seed=0.5", "seed must be an integer"),
    ("adamw_sgg", "cluster_on=sign", "cluster_on must be one of abs, signed"),
    ("adamw", "betas=[1.5, 0.9]", "Invalid beta parameter at index 0: 1.5"),
    ("adamw", "betas=0.9", "betas must be a pair of numbers"),
    ("adamw", "lr=-1.0e-5", "lr must be a number >= 0"),
    ("adamw", "eps=-1.0e-8", "Invalid epsilon value"),
    ("adamw", "weight_decay=-0.1", "Invalid weight_decay value"),
    ("lamb_sgg", "clamp_value=0", "Invalid clamp_value"),
    ("adafactor", "relative_step=true", "Cannot combine manual `lr` and `relative_step=True`"),
    ("adafactor_sgg", "weight_decay=-0.1", "weight_decay must be a number >= 0"),
    ("adafactor", "eps=1.0e-3", "eps must be a pair"),
    ("adafactor", "decay_rate=0.8", "decay_rate must be a number < 0"),
]


@pytest.mark.parametrize("name, option, message", BAD_OPTIMIZER)
def test_optimizer_values_are_checked_when_the_config_is_loaded(run_config, tmp_path, name, option, message):
    optim = tmp_path / "optim.yaml"
    optim.write_text(f"optimizer:\n  name: {name}\n  lr: 2.0e-5\n")
    with pytest.raises(ConfigError) as info:
        load_run_config([str(run_config)], optim=str(optim), overrides=[f"optimizer.{option}"])
    text = str(info.value)
    # the optimizer section came from the --optim file, the bad value from --set
    assert text.startswith(f"{optim} --set optimizer.{option}: optimizer: ") and message in text


def test_an_optimizer_value_in_a_file_names_that_file(run_config, tmp_path):
    optim = tmp_path / "sgg.yaml"
    optim.write_text("optimizer:\n  name: lamb_sgg\n  lr: 2.0e-5\n  beta3: 1.5\n")
    with pytest.raises(ConfigError, match=rf"^{optim}: optimizer: beta3 must be a number in \[0, 1\)"):
        load_run_config([str(run_config)], optim=str(optim))


def test_check_optimizer_options_checks_values_with_the_constructors_messages():
    assert check_optimizer_options("adamw_sgg", {"lr": 1e-3, "betas": [0.9, 0.95]})[3]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.0"):
        check_optimizer_options("lamb", {"betas": (0.9, 1.0)})
    with pytest.raises(ValueError, match="SGG supports Adam/AdamW with differentiable=False only"):
        check_optimizer_options("adamw_sgg", {"differentiable": True})
    with pytest.raises(ValueError, match="optimizer 'adamw': an option has a value of the wrong type"):
        check_optimizer_options("adamw", {"amsgrad": True, "foreach": True, "fused": True, "eps": "small"})


BAD_TRAIN = [
    ("train.max_steps=0", "train.max_steps must be an integer >= 1, or -1"),
    ("train.max_steps=-5", "train.max_steps must be an integer >= 1, or -1"),
    ("train.num_train_epochs=-1", "train.num_train_epochs must be a number >= 0"),
    ("train.save_total_limit=0", "train.save_total_limit must be an integer >= 1"),
    ("train.save_total_limit=-1", "train.save_total_limit must be an integer >= 1"),
    ("train.lr_scheduler_type=cosine_annealing", "train.lr_scheduler_type must be one of linear, cosine"),
    ("train.max_grad_norm=-1.0", "train.max_grad_norm must be a number >= 0"),
    ("train.report_to=wandbb", "train.report_to: unknown 'wandbb'; valid: none, all"),
    ("train.dataloader_num_workers=-1", "train.dataloader_num_workers must be an integer >= 0"),
    ("train.warmup_ratio=lots", "train.warmup_ratio must be in [0, 1)"),
    ("train.bf16=maybe", "train.bf16 must be true or false"),
    ("train.lora_alpha=0", "train.lora_alpha must be a number > 0"),
    ("train.output_dir=''", "train.output_dir must be a folder path"),
    ("data.template=llama_3", "data.template must be one of vicuna_v1, plain"),
    ("data.check=thorough", "data.check must be one of fast, full; got 'thorough'"),
]


@pytest.mark.parametrize("override, message", BAD_TRAIN)
def test_train_and_data_values_are_checked_when_the_config_is_loaded(run_config, override, message):
    with pytest.raises(ConfigError) as info:
        load_run_config([str(run_config)], overrides=[override])
    assert str(info.value).startswith(f"{run_config} --set {override}: {message}")


def test_a_run_of_no_steps_is_refused(run_config):
    with pytest.raises(ConfigError, match="train.num_train_epochs=0 with train.max_steps=-1 trains no step"):
        load_run_config([str(run_config)], overrides=["train.max_steps=-1", "train.num_train_epochs=0"])
    # max_steps wins over num_train_epochs, as in transformers; null keeps every checkpoint
    cfg = load_run_config([str(run_config)], overrides=["train.num_train_epochs=0", "train.save_total_limit=null"])
    assert cfg.train.max_steps == 1 and cfg.train.save_total_limit is None


def test_a_logger_that_is_not_installed_is_refused(run_config, monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: ["tensorboard"])
    with pytest.raises(ConfigError, match=r"train.report_to: wandb not installed \(installed: tensorboard\)"):
        load_run_config([str(run_config)], overrides=["train.report_to=wandb"])
    assert load_run_config([str(run_config)], overrides=["train.report_to=[tensorboard]"]).train.report_to \
        == ["tensorboard"]


# --- 2. the data is checked before any weights load, with the model's own tokenizer ---

@pytest.fixture
def no_weights(monkeypatch):
    """Make loading any weights fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(builder, "load_vision_tower", refuse)
    monkeypatch.setattr(builder, "load_decoder", refuse)


def test_bad_data_fails_before_any_weights_load(tmp_path, no_weights):
    data = make_dataset(tmp_path)
    (Path(data["image_folder"]) / "img0.png").unlink()
    from llava_sgg.data import DataError

    with pytest.raises(DataError, match=r"train.json\[0\] \(id 'sample-0'\): image not found: .*img0.png"):
        run.build_trainer(tiny_run(TINY_PARTS, data, tmp_path / "out"))


def test_good_data_is_checked_then_the_weights_load(tmp_path, no_weights):
    with pytest.raises(AssertionError, match="weights were loaded"):
        run.build_trainer(tiny_run(TINY_PARTS, make_dataset(tmp_path), tmp_path / "out"))


def test_a_missing_projector_file_fails_before_the_data_and_weights(tmp_path, no_weights):
    cfg = tiny_run({**TINY_PARTS, "mm_projector": str(tmp_path / "mm_projector.bin")}, make_dataset(tmp_path),
                   tmp_path / "out")
    with pytest.raises(builder.ModelError, match="mm_projector file .*mm_projector.bin' does not exist"):
        run.build_trainer(cfg)


def test_a_bad_optimizer_value_fails_before_the_data_and_weights(run_config, monkeypatch, capsys):
    from llava_sgg.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(builder, "load_preprocessing", refuse)
    monkeypatch.setattr(run, "build_trainer", refuse)
    assert main(["train", "--config", str(run_config), "--set", "optimizer.name=adamw_sgg",
                 "--set", "optimizer.n_clusters=0"]) == 2
    assert capsys.readouterr().err.startswith(
        f"llava-sgg train: {run_config} --set optimizer.name=adamw_sgg --set optimizer.n_clusters=0: optimizer: "
        "n_clusters must be an integer in [1, 256], got 0")


@pytest.mark.parametrize("saved", [False, True], ids=["tiny", "saved-parts"])
def test_the_data_is_tokenized_with_the_tokenizer_the_model_uses(tmp_path, saved):
    parts = make_parts(tmp_path) if saved else TINY_PARTS
    trainer, processor = run.build_trainer(tiny_run(parts, make_dataset(tmp_path), tmp_path / "out"))
    model, dataset = trainer.model, trainer.train_dataset
    assert dataset.tokenizer is processor.tokenizer
    assert model.config.image_seq_length == dataset.num_image_tokens == 16
    assert model.config.image_token_id == dataset.image_token_id
    assert model.get_input_embeddings().num_embeddings >= len(processor.tokenizer)


# --- 3. errors that name their file ---

def test_a_library_error_about_a_file_is_described_with_that_file(tmp_path):
    from transformers import TrainerState

    state = tmp_path / "checkpoint-20" / "trainer_state.json"
    state.parent.mkdir()
    state.write_text('{"global_step": 20,\n "epoch": 1.0\n "log_history": []}\n')
    with pytest.raises(json.JSONDecodeError) as info:
        TrainerState.load_from_json(str(state))  # what Trainer's resume calls
    assert describe(info.value) == f"{state}:3:2: invalid JSON: Expecting ',' delimiter"

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 4)
    from transformers.modeling_utils import load_state_dict

    with pytest.raises(Exception) as info:
        load_state_dict(str(weights))
    assert describe(info.value).startswith(f"{weights}: not a readable safetensors file (")

    with pytest.raises(FileNotFoundError) as info:
        TrainerState.load_from_json(str(tmp_path / "checkpoint-30" / "trainer_state.json"))
    assert describe(info.value) == f"{tmp_path / 'checkpoint-30' / 'trainer_state.json'}: No such file or directory"
    assert describe(RuntimeError("a bug")) is None  # shown with its traceback


def test_reading_names_the_file_of_a_read_or_parse_error(tmp_path):
    import torch

    empty = tmp_path / "optimizer.pt"
    empty.write_bytes(b"")
    with pytest.raises(FileError, match=rf"^{empty}: not a readable torch.save file, truncated"):
        with reading(empty):
            torch.load(empty, weights_only=True)
    spec = tmp_path / "llava_sgg_model.json"
    spec.write_text('{"vision_tower": "tiny",')
    with pytest.raises(FileError, match=rf"^{spec}:1:25: invalid JSON"):
        builder.read_spec(tmp_path)


def test_a_full_check_names_the_samples_truncation_cuts(tmp_path, caplog):
    from llava_sgg.data import LlavaSFTDataset
    from llava_sgg.model.tiny import tiny_tokenizer

    long_answer = " ".join(["The digit 3 is left of 7."] * 12)
    samples = [{"id": f"long-{i}", "conversations": [{"from": "human", "value": "What is in the image?"},
                                                    {"from": "gpt", "value": long_answer}]} for i in range(7)]
    samples.append({"id": "short", "conversations": [{"from": "human", "value": "Say yes."},
                                                     {"from": "gpt", "value": "Yes"}]})
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    with caplog.at_level(logging.WARNING, logger="llava_sgg.data.dataset"):
        LlavaSFTDataset(path, None, tiny_tokenizer(), num_image_tokens=16, model_max_length=100, check="full")
    message = caplog.records[-1].getMessage()
    assert "7 of 8 samples are longer than model_max_length=100 and are truncated (first 5 shown):" in message
    assert f"\n  {path}:1 (id 'long-0'): " in message and f"{path}:5 (id 'long-4')" in message
    assert "long-5" not in message and "short" not in message
