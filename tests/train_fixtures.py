"""Tiny LLaVA parts saved as real checkpoints, and a small LLaVA-format dataset, for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM

from llava_sgg.model.tiny import tiny_text_config, tiny_tokenizer, tiny_vision_config
from llava_sgg.train.config import build_run_config

CONVERSATIONS = [
    ("<image>\nWhat digit is shown?", "three"),
    ("How many digits are there?\n<image>", "two"),
    ("<image>\nIs there a seven?", "Yes"),
    ("<image>\nWhat is in the image?", "The digit 3 is left of 7."),
    ("What comes after two?", "three"),
    ("Say yes.", "Yes"),
]


def make_parts(root: Path) -> dict[str, str]:
    """Save a tiny CLIP tower (+ processor) and a tiny Llama decoder (+ tokenizer); return their folders."""
    import torch

    torch.manual_seed(0)
    vision, decoder = root / "vision", root / "decoder"
    config = tiny_vision_config()
    CLIPVisionModel(config).save_pretrained(vision)
    CLIPImageProcessor(size={"shortest_edge": config.image_size},
                       crop_size={"height": config.image_size, "width": config.image_size}).save_pretrained(vision)
    LlamaForCausalLM(tiny_text_config()).save_pretrained(decoder)
    tiny_tokenizer().save_pretrained(decoder)
    return {"vision_tower": str(vision), "language_model": str(decoder)}


def make_dataset(root: Path) -> dict[str, str]:
    """Six samples in LLaVA's JSON format: four with an image, two text-only."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i, (question, answer) in enumerate(CONVERSATIONS):
        sample = {"id": f"sample-{i}", "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}]}
        if "<image>" in question:
            name = f"img{i}.png"
            Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 64, 3), dtype=np.uint8)).save(images / name)
            sample["image"] = name
        samples.append(sample)
    path = root / "train.json"
    path.write_text(json.dumps(samples, indent=1))
    return {"data_path": str(path), "image_folder": str(images)}


def tiny_run(parts: dict, data: dict, output: Path, mode: str = "full", optimizer: dict | None = None,
             **train) -> "RunConfig":  # noqa: F821
    model = dict(parts)
    if mode == "qlora":
        model["quantization"] = "8bit"
    return build_run_config({
        "model": model,
        "data": {**data, "model_max_length": 128},
        "train": {"output_dir": str(output), "mode": mode, "max_steps": 1, "per_device_train_batch_size": 2,
                  "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "gradient_checkpointing": False,
                  "save_steps": 1000, "warmup_ratio": 0.0, "mm_projector_lr": 1e-3, **train},
        "optimizer": optimizer or {"name": "adamw", "lr": 1e-3},
    })


def tiny_config_file(folder: Path, parts: dict, data: dict) -> Path:
    """A YAML run config over the tiny parts and dataset, for the finetune scripts (2 LoRA-sized steps)."""
    import yaml

    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {**parts, "torch_dtype": "float32", "mm_projector": None},
        "data": {**data, "model_max_length": 128},
        "train": {"output_dir": str(folder / "out"), "max_steps": 2, "lora_r": 4, "lora_alpha": 8,
                  "gradient_checkpointing": False, "bf16": False, "warmup_ratio": 0.0},
    }))
    return path


def run_dist_llava(cfg, root: Path, name: str, launcher: list[str]) -> dict:
    """Train ``cfg`` through tests/dist_llava.py under ``launcher`` (torchrun, accelerate or one python) and
    return the record rank 0 wrote: parameters, SGG state, log history, dtypes."""
    import os
    import subprocess

    import torch
    import yaml

    tests = Path(__file__).parent
    config, out = root / f"{name}.yaml", root / f"{name}.pt"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    done = subprocess.run([*launcher, str(tests / "dist_llava.py"), str(config), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)
