"""LLaVA stage 1 (train.mode pretrain, template plain): only the connector trains, and its file loads back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from llava_sgg.model.builder import MM_PROJECTOR_FILE, ModelConfig, build_llava
from llava_sgg.train.config import load_run_config
from llava_sgg.train.run import build_trainer, save_outputs
from train_fixtures import make_parts, tiny_config_file, tiny_run

ROOT = Path(__file__).parent.parent

CAPTIONS = ["3 in the top left", "7 in the middle center, 1 in the bottom right", "4 in the top right"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    parts = make_parts(root)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
        records.append({"id": f"cap-{i}", "image": f"{i}.png",
                        "conversations": [{"from": "human", "value": "Describe the image.\n<image>"},
                                          {"from": "gpt", "value": caption}]})
    (root / "pretrain.json").write_text(json.dumps(records))
    data = {"data_path": str(root / "pretrain.json"), "image_folder": str(images), "template": "plain"}
    return root, parts, data


def test_pretrain_trains_the_connector_alone_and_saves_it_for_stage_two(stage1):
    root, parts, data = stage1
    cfg = tiny_run(parts, data, root / "out", mode="pretrain", max_steps=2)
    trainer, processor = build_trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("multi_modal_projector" in n for n in changed)
    assert {n for n, p in after.items() if p.requires_grad} == {n for n in after if "multi_modal_projector" in n}

    output = save_outputs(trainer, processor, cfg)
    assert (output / MM_PROJECTOR_FILE).is_file() and not (output / "model.safetensors").exists()
    # Stage 2 starts from it: model.mm_projector loads exactly the trained connector.
    model, _ = build_llava(ModelConfig(vision_tower=parts["vision_tower"], language_model=parts["language_model"],
                                       mm_projector=str(output / MM_PROJECTOR_FILE)))
    trained = trainer.model.model.multi_modal_projector.state_dict()
    loaded = model.model.multi_modal_projector.state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)


def test_plain_template_needs_one_captioned_turn(stage1, tmp_path):
    root, parts, data = stage1
    bad = [{"id": "two-turns", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nA?"}, {"from": "gpt", "value": "a"},
        {"from": "human", "value": "B?"}, {"from": "gpt", "value": "b"}]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cfg = tiny_run(parts, {**data, "data_path": str(tmp_path / "bad.json")}, tmp_path / "out", mode="pretrain")
    with pytest.raises(Exception, match="two-turns.*one \\(question, caption\\) turn"):
        build_trainer(cfg)


def test_pretrain_refuses_an_unfrozen_tower(stage1, tmp_path):
    from llava_sgg.train.config import ConfigError

    root, parts, data = stage1
    with pytest.raises(ConfigError, match="pretrain trains the connector alone"):
        tiny_run(parts, data, tmp_path / "out", mode="pretrain", unfreeze_mm_vision_tower=True)


def test_the_pretrain_config_is_the_official_stage_one_recipe():
    """configs/llava_v1_5_7b_pretrain.yaml against official scripts/v1_5/pretrain.sh and train.py's defaults."""
    configs = ROOT / "configs"
    cfg = load_run_config([str(configs / "llava_v1_5_7b_pretrain.yaml")])
    t, d, m = cfg.train, cfg.data, cfg.model
    assert t.mode == "pretrain" and not t.unfreeze_mm_vision_tower  # --tune_mm_mlp_adapter True
    assert cfg.optimizer == {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0} and t.mm_projector_lr is None
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * 8 == 256  # 32 x 1 x 8 GPUs
    assert (t.num_train_epochs, t.warmup_ratio, t.lr_scheduler_type) == (1, 0.03, "cosine")
    assert t.bf16 and t.gradient_checkpointing and t.save_steps == 24000 and t.dataloader_num_workers == 4
    assert t.distributed == "ddp"  # ZeRO-2 in pretrain.sh: nothing to shard but the connector
    assert d.template == "plain" and not d.group_by_modality_length and d.model_max_length == 2048
    assert d.image_aspect_ratio == "crop"  # train.py's default "square": the CLIP processor's resize + centre crop
    assert d.data_path == "playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    assert d.image_folder == "playground/data/LLaVA-Pretrain/images"
    assert (m.mm_projector, m.mm_projector_type, m.vision_feature_layer) == (None, "mlp2x_gelu", -2)
    assert m.vision_tower == "openai/clip-vit-large-patch14-336" and m.language_model == "lmsys/vicuna-7b-v1.5"
    # What scripts/pretrain.sh runs: an --optim file (lr 2e-5) replaces the optimizer section, its --set restores 1e-3.
    scripted = load_run_config([str(configs / "llava_v1_5_7b_pretrain.yaml")], optim=str(configs / "optim/adamw.yaml"),
                               overrides=["optimizer.lr=1.0e-3"])
    assert scripted.optimizer["lr"] == 1e-3 and scripted.optimizer["weight_decay"] == 0.0
    # Stage 2 starts from the file stage 1 writes.
    for mode in ("full", "lora", "qlora"):
        stage2 = load_run_config([str(configs / f"llava_v1_5_7b_{mode}.yaml")])
        assert stage2.model.mm_projector == f"{t.output_dir}/{MM_PROJECTOR_FILE}"


def _script_env(tmp_path, **extra) -> dict:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           **extra}
    if "PYTHONPATH" in os.environ:  # machines where the package runs from a source tree
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


@pytest.mark.slow  # launches bash (with a stand-in python: milliseconds)
@pytest.mark.parametrize("ngpus, accumulation", [("8", "1"), ("2", "4"), ("0", "8")])
def test_pretrain_script_keeps_the_global_batch_of_256(tmp_path, ngpus, accumulation):
    """A dry run: a stand-in `python` prints the command scripts/pretrain.sh would run."""
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "pretrain.sh")]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = _script_env(tmp_path, NGPUS=ngpus, LAUNCHER="python")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "pretrain.sh"), "configs/optim/adamw.yaml",
                             "--set", "optimizer.lr=5e-4"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    args = result.stdout.split("\n")
    assert args[:7] == ["-m", "llava_sgg.cli", "train", "--config", str(ROOT / "configs/llava_v1_5_7b_pretrain.yaml"),
                        "--optim", "configs/optim/adamw.yaml"]
    assert "train.per_device_train_batch_size=32" in args
    assert f"train.gradient_accumulation_steps={accumulation}" in args
    assert args.index("optimizer.lr=1.0e-3") < args.index("optimizer.lr=5e-4")  # the user's --set wins


@pytest.mark.slow  # scripts/pretrain.sh end to end
def test_pretrain_script_trains_a_tiny_connector_end_to_end(stage1, tmp_path):
    root, parts, data = stage1
    tiny = tiny_config_file(tmp_path, parts, data)
    env = _script_env(tmp_path, NGPUS="0", GLOBAL_BATCH="4", PER_DEVICE="2")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "pretrain.sh"), str(ROOT / "configs/optim/adamw.yaml"),
                             "--config", str(tiny)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "out"
    assert (output / MM_PROJECTOR_FILE).is_file() and not (output / "model.safetensors").exists()
    run = yaml.safe_load((output / "llava_sgg_run.yaml").read_text())
    assert run["train"]["mode"] == "pretrain" and run["optimizer"]["lr"] == 1e-3 and run["data"]["template"] == "plain"
    assert run["train"]["gradient_accumulation_steps"] == 2 and run["train"]["per_device_train_batch_size"] == 2
