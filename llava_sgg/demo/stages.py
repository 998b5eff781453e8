"""The demo's training stages through `llava-sgg train`: stage 1 (the connector) and stage 2 (one run per optimizer)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback

from ..model.builder import MM_PROJECTOR_FILE
from ..train.config import build_run_config
from ..train.run import build_trainer, save_outputs
from .recipes import MAX_LENGTH, DemoSettings, bf16


class ScaleRecorder(TrainerCallback):
    """SGG's cluster scales of every grouped layer after each re-clustering (for the report's figure).

    Scales change only when SGG re-clusters; reading them after every step would copy every layer's
    scales to the host each step, a wait for the GPU the optimizer itself avoids.
    """

    def __init__(self, model):
        self.names = {p: n for n, p in model.named_parameters()}
        self.history: dict[str, list[tuple[int, list[float]]]] = {}  # layer -> [(step, its K scales)]
        self._seen = 0

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        sgg = getattr(optimizer, "optimizer", optimizer)
        if not hasattr(sgg, "cluster_scales") or sgg.reclusterings == self._seen:
            return
        self._seen = sgg.reclusterings
        for group in sgg.param_groups:
            for p in group["params"]:
                scales = sgg.cluster_scales(p)
                if scales is not None:
                    self.history.setdefault(self.names.get(p, "?"), []).append((state.global_step, scales.tolist()))

    @property
    def spread(self) -> list[list[float]]:
        """[step, min, median, max] over every grouped layer's cluster scales, at each re-clustering."""
        at: dict[int, list[float]] = {}
        for series in self.history.values():
            for step, scales in series:
                at.setdefault(step, []).extend(scales)
        return [[step, min(v), float(statistics.median(v)), max(v)] for step, v in sorted(at.items())]


def pretrain_connector(settings: DemoSettings, vision: Path, language_model: Path, data, cache: Path,
                       initial: Path | None = None) -> Path:
    """Stage 1 through `llava-sgg train` with mode pretrain, from the connector at ``initial`` (None: random).

    Cached by its inputs. Returns mm_projector.safetensors.
    """
    recipe = settings.connector
    key = json.dumps({"vision": vision.name, "decoder": language_model.name, "data": data.root.name,
                      "recipe": dataclasses.asdict(recipe), "seed": settings.seed,
                      "initial": initial.parent.name if initial else None}, sort_keys=True)
    output = cache / f"connector-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    projector = output / MM_PROJECTOR_FILE
    if projector.is_file():
        return projector
    cfg = build_run_config({
        "model": {"vision_tower": str(vision), "language_model": str(language_model),
                  "mm_projector": str(initial) if initial else None},
        "data": {"data_path": str(data.pretrain_json), "image_folder": str(data.image_folder),
                 "model_max_length": 256, "image_aspect_ratio": "pad", "template": "plain"},
        "train": {"output_dir": str(output.with_name(output.name + ".partial")), "mode": "pretrain",
                  "max_steps": recipe.steps, "per_device_train_batch_size": recipe.batch_size,
                  "warmup_ratio": 0.03, "gradient_checkpointing": False, "logging_steps": 1,
                  "save_steps": 10**6, "seed": settings.seed, "report_to": "none"},
        "optimizer": {"name": "adamw", "lr": recipe.lr, "weight_decay": 0.0},
    }, origin="demo stage 1")
    trainer, processor = build_trainer(cfg)
    trainer.train()
    save_outputs(trainer, processor, cfg)
    shutil.rmtree(output, ignore_errors=True)
    Path(cfg.train.output_dir).rename(output)  # complete folders only
    return projector


def run_config(settings: DemoSettings, vision: Path, language_model: Path, data, output: Path, name: str,
               projector: Path | None = None):
    optimizer = {"name": name, "lr": settings.lr, **(settings.sgg if name.endswith("_sgg") else {})}
    return build_run_config({
        "model": {"vision_tower": str(vision), "language_model": str(language_model),
                  "mm_projector": str(projector) if projector else None},
        "data": {"data_path": str(data.train_json), "image_folder": str(data.image_folder),
                 "model_max_length": MAX_LENGTH, "image_aspect_ratio": "pad"},
        "train": {"output_dir": str(output), "mode": settings.mode,
                  "unfreeze_mm_vision_tower": settings.tower is None,
                  "lora_r": settings.lora_r, "lora_alpha": settings.lora_alpha, "lora_dropout": 0.0,
                  "lr_step_decay": settings.lr_step_decay,
                  "max_steps": settings.steps, "per_device_train_batch_size": settings.batch_size,
                  "mm_projector_lr": settings.mm_projector_lr, "warmup_ratio": 0.03, "gradient_checkpointing": False,
                  "bf16": bf16(settings), "logging_steps": 1, "save_steps": 10**6, "seed": settings.seed,
                  "report_to": "none"},
        "optimizer": optimizer,
    }, origin="demo")


def train_one(settings, vision, language_model, data, output: Path, name: str, projector: Path | None = None) -> dict:
    cfg = run_config(settings, vision, language_model, data, output, name, projector)
    trainer, processor = build_trainer(cfg)
    recorder = ScaleRecorder(trainer.model)
    trainer.add_callback(recorder)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    save_outputs(trainer, processor, cfg)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"trainer": trainer, "processor": processor, "losses": losses, "scales": recorder.history,
            "scale_spread": recorder.spread,
            "train_seconds": seconds, "output": output}
