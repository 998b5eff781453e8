"""Run configuration: YAML files -> dataclasses, validated once here.

A run config has four sections, ``model``, ``data``, ``train`` and ``optimizer``.
Files compose: a file may list others under ``include:`` (paths relative to
it, merged first), several ``--config`` files merge in order, ``--optim FILE``
replaces the optimizer section, and ``--set section.key=value`` overrides last
(the value is parsed as YAML). Unknown keys are errors that name the file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import BAD_SAMPLES, CHECKS, IMAGE_ASPECT_RATIOS, TEMPLATES
from ..model.builder import ModelConfig, ModelError
from ..optim import check_optimizer_options

MODES = ("pretrain", "full", "lora", "qlora")
DISTRIBUTED = ("ddp", "fsdp2")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
DEFAULT_LR = 2e-5  # the optimizer's lr when its section has none (run.training_arguments' learning_rate)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the file and key."""


@dataclass
class DataConfig:
    data_path: str = ""  # LLaVA JSON / JSONL
    image_folder: str = ""  # image paths in the data are relative to this folder
    image_aspect_ratio: str = "pad"  # pad | resize | crop
    model_max_length: int = 2048
    template: str = "vicuna_v1"
    group_by_modality_length: bool = True
    # error: a bad sample (malformed, missing/empty/unreadable image, fails tokenization) stops the run
    # before training; skip: it is left out and listed in train.output_dir/skipped_samples.jsonl.
    bad_samples: str = "error"
    # skip still refuses above this share of the file. 1% is above the OCR-VQA images users typically
    # cannot download (355 of its 80k samples in LLaVA issue #1618, 0.05% of the mix) and below the
    # smallest source of the mix (OKVQA, 9k samples, 1.35%), so a whole missing source is refused.
    max_bad_fraction: float = 0.01
    # What is checked before the model loads (llava_sgg/data/dataset.py). fast: structure, image files
    # (header, end marker), answers truncated away; samples are tokenized when drawn, as officially.
    # full: also every sample tokenized and every image decoded (cached for later runs and other ranks).
    check: str = "fast"
    # true: the samples of each micro-batch (the same samples, in the same order) are concatenated into one
    # row without padding, positions restarting per sample and attention kept inside each sample
    # (train.attn_implementation); same loss and gradients as padded rows. Off by default: it pays only with
    # flex_attention or flash attention, which need a GPU (docs/performance.md).
    packing: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/llava-sgg"
    mode: str = "full"  # pretrain (stage 1: the connector alone) | full | lora | qlora
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    mm_projector_lr: float | None = None  # None: the optimizer's lr
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    # Multiplies the schedule by max(factor ** (step // every), floor): the stepwise decay that SGG's
    # mean_ratio rule applies to its scales when the momentum is small (every = recluster_interval,
    # factor = beta3, floor = the lower scale bound), for runs that test whether that decay alone
    # explains the rule's effect. None: the schedule alone. A mapping {every, factor, floor}.
    lr_step_decay: dict | None = None
    max_grad_norm: float = 1.0
    # A step whose loss or gradient norm is NaN or infinite stops the run before the optimizer applies
    # it (train/guards.py); up to this many such steps are skipped first (no weight moves in them).
    max_bad_steps: int = 0
    # bf16 compute (autocast; FSDP2: bf16 all-gathered parameters, fp32 gradient reduction). Trainable
    # weights and optimizer states are always fp32 masters, as in official LLaVA's DeepSpeed bf16 mode.
    bf16: bool = False
    gradient_checkpointing: bool = True
    # With gradient_checkpointing: recompute only the first N decoder layers (null: every layer). The other
    # layers keep their activations, trading memory the GPU has spare for the recomputation (about a third
    # of a checkpointed layer's compute) it would otherwise pay. auto: N per batch, from measured memory
    # (train/auto_checkpoint.py).
    checkpoint_layers: int | str | None = None
    # The decoder's attention (transformers' attn_implementation): sdpa | eager | flex_attention |
    # flash_attention_2 | flash_attention_3 (the last two need the flash-attn package). Each keeps a packed
    # row's samples apart (data.packing); the vision tower keeps transformers' default.
    attn_implementation: str = "sdpa"
    # torch.compile each decoder layer (regional compilation: one compiled graph serves every layer of the
    # same shape, so compiling costs about one layer's time, not the model's). Same results within float
    # rounding; a first-step compile cost. Off by default: not yet measured at 7B.
    compile: bool = False
    # Liger's fused Triton kernels (the liger-kernel package) for the decoder's RMSNorms and SwiGLU MLPs,
    # patched into this model's modules only. Needs a CUDA device and an optional package, hence off by default.
    liger: bool = False
    # Each LoRA branch's dropout inside its lora_A, keeping the input and the random generator's state for the
    # backward pass instead of a mask and a dropped copy per Linear (train/lean_dropout.py): less activation
    # memory, so checkpoint_layers auto keeps more layers. Same distribution, other draws than peft's dropout,
    # hence off by default.
    lean_lora_dropout: bool = False
    unfreeze_mm_vision_tower: bool = False  # train the vision tower too (LLaVA-v1.5 keeps it frozen)
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    logging_steps: int = 1
    save_steps: int = 50000
    save_total_limit: int = 1
    seed: int = 42
    dataloader_num_workers: int = 0
    report_to: str = "none"
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "last" for the newest in output_dir
    # Multi-process data parallelism when launched by accelerate/torchrun: "ddp" replicates the
    # model, "fsdp2" shards parameters, gradients and optimizer states (fully_shard, one unit per
    # decoder/encoder layer). An `accelerate launch --config_file` with FSDP settings selects FSDP2 too.
    distributed: str = "ddp"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "lr": 2e-5})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-5` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file is a mapping of sections, got {type(data).__name__}")
    return data


def _check_keys(data: dict, origin: str) -> None:
    for section, values in data.items():
        if section == "optimizer":
            if not isinstance(values, dict):
                raise ConfigError(f"{origin}: optimizer must be a mapping")
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section {section!r}; valid: include, "
                              f"{', '.join(SECTIONS)}, optimizer")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping")
        valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
        for key in values:
            if key not in valid:
                raise ConfigError(f"{origin}: unknown key {section}.{key}; valid keys: {', '.join(valid)}")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if key == "optimizer":
            out[key] = dict(value)  # an optimizer section replaces the whole previous one
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_file(path: str | Path, _seen: tuple = ()) -> dict:
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(map(str, _seen))}")
    data = _read_yaml(path)
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for include in includes:
        merged = _merge(merged, load_file(path.parent / include, _seen + (path,)))
    _check_keys(data, str(path))
    return _merge(merged, data)


def parse_override(text: str) -> dict:
    """``section.key=value`` -> {section: {key: value}} with the value parsed as YAML."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.max_steps=10")
    try:
        value = _yaml(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None
    override = {parts[0]: {parts[1]: value}}
    if parts[0] != "optimizer":
        _check_keys(override, f"--set {text}")
    return override


def build_run_config(data: dict, origin: str = "config", *, optimizer_origin: str | None = None) -> RunConfig:
    """Turn a merged mapping into a validated RunConfig.

    Errors start with ``origin`` (the files and overrides the mapping came from), or for the optimizer
    section with ``optimizer_origin`` when it came from elsewhere (an ``--optim`` file).
    """
    _check_keys(data, origin)
    try:
        model = ModelConfig(**data.get("model", {}))
    except ModelError as error:
        raise ConfigError(f"{origin}: model: {error}") from None
    cfg = RunConfig(model=model, data=DataConfig(**data.get("data", {})), train=TrainConfig(**data.get("train", {})),
                    optimizer=dict(data.get("optimizer", RunConfig().optimizer)))
    _validate(cfg, origin, optimizer_origin)
    return cfg


def _validate(cfg: RunConfig, origin: str, optimizer_origin: str | None = None) -> None:
    t, d = cfg.train, cfg.data
    if t.mode not in MODES:
        raise ConfigError(f"{origin}: train.mode must be one of {', '.join(MODES)}; got {t.mode!r}")
    if t.mode == "qlora" and cfg.model.quantization is None:
        raise ConfigError(f"{origin}: train.mode=qlora needs model.quantization 8bit or 4bit")
    if t.mode != "qlora" and cfg.model.quantization is not None:
        raise ConfigError(f"{origin}: model.quantization={cfg.model.quantization} trains only in train.mode=qlora")
    if t.mode == "pretrain" and t.unfreeze_mm_vision_tower:
        raise ConfigError(f"{origin}: train.mode=pretrain trains the connector alone; "
                          "train.unfreeze_mm_vision_tower must be false")
    if t.distributed not in DISTRIBUTED:
        raise ConfigError(f"{origin}: train.distributed must be one of {', '.join(DISTRIBUTED)}; "
                          f"got {t.distributed!r}")
    if t.distributed == "fsdp2" and t.mode == "qlora":
        raise ConfigError(f"{origin}: train.distributed=fsdp2 does not shard quantized (qlora) weights; use ddp")
    if cfg.model.torch_dtype != "float32" and not t.bf16:
        raise ConfigError(f"{origin}: model.torch_dtype={cfg.model.torch_dtype} needs train.bf16=true: frozen weights "
                          "stay in that dtype and trainable ones in fp32 masters, so compute runs in bf16 "
                          "(as official LLaVA's DeepSpeed bf16 mode); for fp32 compute set model.torch_dtype=float32")
    if d.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise ConfigError(f"{origin}: data.image_aspect_ratio must be one of {', '.join(IMAGE_ASPECT_RATIOS)}")
    if d.check not in CHECKS:
        raise ConfigError(f"{origin}: data.check must be one of {', '.join(CHECKS)}; got {d.check!r}")
    if d.bad_samples not in BAD_SAMPLES:
        raise ConfigError(f"{origin}: data.bad_samples must be one of {', '.join(BAD_SAMPLES)}; got {d.bad_samples!r}")
    if isinstance(d.max_bad_fraction, bool) or not isinstance(d.max_bad_fraction, (int, float)) \
            or not 0 <= d.max_bad_fraction <= 1:
        raise ConfigError(f"{origin}: data.max_bad_fraction must be a number in [0, 1] (a share of the samples, "
                          f"0.01 = 1%), got {d.max_bad_fraction!r}")
    positive = {"train.per_device_train_batch_size": t.per_device_train_batch_size,
                "train.gradient_accumulation_steps": t.gradient_accumulation_steps, "train.lora_r": t.lora_r,
                "data.model_max_length": d.model_max_length, "train.logging_steps": t.logging_steps,
                "train.save_steps": t.save_steps}
    for key, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{origin}: {key} must be an integer >= 1, got {value!r}")
    if not (_is_number(t.warmup_ratio) and 0 <= t.warmup_ratio < 1):
        raise ConfigError(f"{origin}: train.warmup_ratio must be in [0, 1), got {t.warmup_ratio!r}")
    if t.mm_projector_lr is not None and not (_is_number(t.mm_projector_lr) and t.mm_projector_lr >= 0):
        raise ConfigError(f"{origin}: train.mm_projector_lr must be a number >= 0 or null")
    if not (_is_number(t.lora_dropout) and 0 <= t.lora_dropout < 1):
        raise ConfigError(f"{origin}: train.lora_dropout must be in [0, 1)")
    if d.template not in TEMPLATES:
        raise ConfigError(f"{origin}: data.template must be one of {', '.join(TEMPLATES)}; got {d.template!r}")
    if not isinstance(d.group_by_modality_length, bool):
        raise ConfigError(f"{origin}: data.group_by_modality_length must be true or false, "
                          f"got {d.group_by_modality_length!r}")
    if not isinstance(d.packing, bool):
        raise ConfigError(f"{origin}: data.packing must be true or false, got {d.packing!r}")
    _validate_train(t, origin)
    _validate_optimizer(cfg.optimizer, optimizer_origin or origin)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_train(t: TrainConfig, origin: str) -> None:
    """What transformers' Trainer would take and then train wrongly with (no step at all, every checkpoint
    kept), or refuse only once the model is loaded."""
    if not _is_int(t.max_steps) or t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"{origin}: train.max_steps must be an integer >= 1, or -1 to train "
                          f"train.num_train_epochs; got {t.max_steps!r}")
    if not (_is_number(t.num_train_epochs) and t.num_train_epochs >= 0):
        raise ConfigError(f"{origin}: train.num_train_epochs must be a number >= 0, got {t.num_train_epochs!r}")
    if t.max_steps == -1 and t.num_train_epochs == 0:
        raise ConfigError(f"{origin}: train.num_train_epochs=0 with train.max_steps=-1 trains no step; "
                          "set train.num_train_epochs > 0 or train.max_steps >= 1")
    if t.save_total_limit is not None and not (_is_int(t.save_total_limit) and t.save_total_limit >= 1):
        # transformers reads 0 (or less) as "no limit" and keeps every checkpoint.
        raise ConfigError(f"{origin}: train.save_total_limit must be an integer >= 1 (the newest checkpoints "
                          f"kept) or null (keep every checkpoint); got {t.save_total_limit!r}")
    if not (_is_number(t.max_grad_norm) and t.max_grad_norm >= 0):
        raise ConfigError(f"{origin}: train.max_grad_norm must be a number >= 0 (0: no clipping), "
                          f"got {t.max_grad_norm!r}")
    if not (_is_int(t.max_bad_steps) and t.max_bad_steps >= 0):
        raise ConfigError(f"{origin}: train.max_bad_steps must be an integer >= 0 (the steps with a non-finite "
                          f"loss or gradient norm skipped before the run stops), got {t.max_bad_steps!r}")
    if not (_is_number(t.lora_alpha) and t.lora_alpha > 0):
        raise ConfigError(f"{origin}: train.lora_alpha must be a number > 0, got {t.lora_alpha!r}")
    for key in ("dataloader_num_workers", "seed"):
        value = getattr(t, key)
        if not (_is_int(value) and value >= 0):
            raise ConfigError(f"{origin}: train.{key} must be an integer >= 0, got {value!r}")
    for key in ("bf16", "gradient_checkpointing", "unfreeze_mm_vision_tower", "compile", "liger", "lean_lora_dropout"):
        if not isinstance(getattr(t, key), bool):
            raise ConfigError(f"{origin}: train.{key} must be true or false, got {getattr(t, key)!r}")
    if not (isinstance(t.output_dir, str) and t.output_dir.strip()):
        raise ConfigError(f"{origin}: train.output_dir must be a folder path, got {t.output_dir!r}")
    from transformers.trainer_utils import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if t.lr_scheduler_type not in schedulers:
        raise ConfigError(f"{origin}: train.lr_scheduler_type must be one of {', '.join(schedulers)}; "
                          f"got {t.lr_scheduler_type!r}")
    _validate_report_to(t.report_to, origin)
    _validate_step_decay(t.lr_step_decay, origin)
    if t.lr_step_decay is not None and t.lr_scheduler_type == "reduce_lr_on_plateau":
        raise ConfigError(f"{origin}: train.lr_step_decay multiplies a step-indexed schedule; "
                          "train.lr_scheduler_type reduce_lr_on_plateau is not one")
    _validate_attn_implementation(t.attn_implementation, origin)
    if t.liger and t.compile:
        # torch 2.11's dynamo fails an assertion tracing Liger's RMSNorm autograd.Function inside a layer
        raise ConfigError(f"{origin}: train.liger and train.compile do not work together (torch.compile "
                          "cannot trace Liger's kernels); choose one")
    if t.lean_lora_dropout and t.mode != "lora":
        # QLoRA's peft layers (bitsandbytes) compute their branch in a forward of their own, left as it is
        raise ConfigError(f"{origin}: train.lean_lora_dropout changes the dropout of peft's LoRA Linears, in "
                          f"train.mode lora; train.mode {t.mode} has none")
    if t.lean_lora_dropout and t.lora_dropout == 0:
        raise ConfigError(f"{origin}: train.lean_lora_dropout changes LoRA's dropout; train.lora_dropout is 0, "
                          "so there is none to change")
    if t.lean_lora_dropout and t.compile:
        # the function reads and sets the random generator's state, which dynamo does not trace
        raise ConfigError(f"{origin}: train.lean_lora_dropout and train.compile do not work together; choose one")
    if t.checkpoint_layers is not None:
        if not (_is_int(t.checkpoint_layers) and t.checkpoint_layers >= 0) and t.checkpoint_layers != "auto":
            raise ConfigError(f"{origin}: train.checkpoint_layers must be an integer >= 0 (the decoder layers "
                              f"recomputed, from the first), auto (as many as the GPU's memory needs) or null "
                              f"(all), got {t.checkpoint_layers!r}")
        if t.checkpoint_layers == "auto" and t.compile:
            # auto counts a layer's saved activations with autograd's saved-tensor hooks in its eager forward
            raise ConfigError(f"{origin}: train.checkpoint_layers auto measures an eager decoder layer; with "
                              "train.compile give the number of layers to recompute")
        if not t.gradient_checkpointing:
            raise ConfigError(f"{origin}: train.checkpoint_layers={t.checkpoint_layers} chooses the layers that "
                              "gradient checkpointing recomputes; set train.gradient_checkpointing true")


def _validate_attn_implementation(name, origin: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"{origin}: train.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}; "
                          f"got {name!r}")
    if name.startswith("flash_attention"):
        # transformers would otherwise look for the kernel on the Hugging Face hub once the weights are loaded.
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        available = is_flash_attn_2_available if name == "flash_attention_2" else is_flash_attn_3_available
        if not available():
            package = "flash-attn" if name == "flash_attention_2" else "flash-attn 3 (flash_attn_interface)"
            raise ConfigError(f"{origin}: train.attn_implementation={name} needs {package} installed on a CUDA "
                              "GPU; use sdpa or flex_attention")


def _validate_step_decay(decay, origin: str) -> None:
    if decay is None:
        return
    want = "a mapping {every: integer >= 1, factor: number in (0, 1], floor: number in [0, 1]} or null"
    if not isinstance(decay, dict):
        raise ConfigError(f"{origin}: train.lr_step_decay must be {want}, got {decay!r}")
    unknown = set(decay) - {"every", "factor", "floor"}
    missing = {"every", "factor", "floor"} - set(decay)
    if unknown or missing:
        raise ConfigError(f"{origin}: train.lr_step_decay must be {want}; "
                          + (f"unknown {sorted(unknown)}" if unknown else f"missing {sorted(missing)}"))
    every, factor, floor = decay["every"], decay["factor"], decay["floor"]
    if not (_is_int(every) and every >= 1 and _is_number(factor) and 0 < factor <= 1
            and _is_number(floor) and 0 <= floor <= 1):
        raise ConfigError(f"{origin}: train.lr_step_decay must be {want}, got {decay!r}")


def _validate_report_to(report_to, origin: str) -> None:
    """transformers checks the names, and that the logger is installed, only when the Trainer is built."""
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    names = [report_to] if isinstance(report_to, str) else report_to
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{origin}: train.report_to must be a name or a list of names, got {report_to!r}")
    if names in (["none"], ["all"]):
        return
    known = list(INTEGRATION_TO_CALLBACK)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{origin}: train.report_to: unknown {', '.join(map(repr, unknown))}; valid: none, all, "
                          f"{', '.join(known)}")
    installed = get_available_reporting_integrations()
    # flyte is the one logger transformers has no availability check for.
    missing = [n for n in names if n not in installed and n != "flyte"]
    if missing:
        raise ConfigError(f"{origin}: train.report_to: {', '.join(missing)} not installed "
                          f"(installed: {', '.join(installed) or 'none'})")


def _validate_optimizer(optimizer: dict, origin: str) -> None:
    options = dict(optimizer)
    name = options.pop("name", None)
    if name is None:
        raise ConfigError(f"{origin}: optimizer.name is required")
    # The trainer gives the base optimizer TrainingArguments' learning rate when the section has none.
    options.setdefault("lr", DEFAULT_LR)
    try:
        check_optimizer_options(name, options)
    except ValueError as error:
        raise ConfigError(f"{origin}: optimizer: {error}") from None


def load_run_config(configs: list[str], optim: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    if not configs:
        raise ConfigError("give at least one --config file")
    merged: dict = {}
    for path in configs:
        merged = _merge(merged, load_file(path))
    if optim is not None:
        optim_data = load_file(optim)
        if set(optim_data) != {"optimizer"}:
            raise ConfigError(f"{optim}: an --optim file holds only an optimizer section")
        merged = _merge(merged, optim_data)
    for text in overrides or []:
        override = parse_override(text)
        if "optimizer" in override:
            merged.setdefault("optimizer", {}).update(override["optimizer"])
        else:
            merged = _merge(merged, override)
    overrides = list(overrides or [])
    origin = _origin(configs, [o for o in overrides if not o.strip().startswith("optimizer.")])
    optimizer_origin = _origin([optim] if optim is not None else configs,
                               [o for o in overrides if o.strip().startswith("optimizer.")])
    return build_run_config(merged, origin=origin, optimizer_origin=optimizer_origin)


def _origin(files: list[str], overrides: list[str]) -> str:
    """How errors name where a value came from: the files, and the --set overrides on top of them."""
    return ", ".join(files) + "".join(f" --set {o}" for o in overrides)
