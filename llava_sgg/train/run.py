"""One fine-tuning run: model preparation per mode, the dataset, the Trainer, and the outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import TrainerCallback, TrainingArguments, set_seed

from ..model.builder import DTYPES, ModelError, build_llava, load_preprocessing, save_mm_projector, save_spec
from ..plotting import plot_curves, plot_sgg_scales
from .auto_checkpoint import CheckpointFromMemory, recompute_first
from .checkpoints import begin_outputs, finished_run, outputs_complete, seal_outputs
from .config import ConfigError, RunConfig
from .memory import check_fits, memory_plan
from .text_only import run_image_path_always
from .trainer import PROJECTOR, LlavaTrainer

logger = logging.getLogger(__name__)


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Every Linear of the decoder (LoRA targets, as LLaVA's find_all_linear_names; lm_head excluded)."""
    decoder = model.model.language_model
    prefix = "model.language_model."
    return sorted(prefix + name for name, module in decoder.named_modules() if isinstance(module, nn.Linear))


def hold_trainable_in_float32(model: nn.Module) -> list[str]:
    """Give every trainable parameter an fp32 master copy in place of its low-precision weights.

    Official LLaVA trains in DeepSpeed's bf16 mode: fp32 master weights and optimizer states, bf16
    compute. A model loaded with torch_dtype bfloat16 and handed to the optimizer as it is would
    instead be updated in bf16, where most of an lr-2e-5 step on a weight of size 0.02 rounds away
    and norm weights near 1.0 (bf16 spacing 0.0078) never move. Compute stays bf16 (autocast, or
    FSDP2's param_dtype); frozen weights stay in the loaded dtype. Returns the names upcast.
    """
    upcast = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            upcast.append(name)
    return upcast


def prepare_model(cfg: RunConfig, processor=None):
    """(model, processor) ready to train in cfg.train.mode, trainable weights in fp32; the vision tower is frozen.

    ``processor``: the one the data was tokenized with (builder.load_preprocessing); by default loaded here.
    """
    model, processor = _trainable_model(cfg, processor)
    freeze_unread_tower_parts(model)
    hold_trainable_in_float32(model)
    run_image_path_always(_unwrapped(model).model)  # text-only batches: the tower and connector still step
    if cfg.train.liger:
        use_liger_kernels(model)
    if cfg.train.compile:
        compile_decoder_layers(model)
    return model, processor


def compile_decoder_layers(model) -> None:
    """torch.compile every decoder layer in place (after LoRA is injected, so its graph holds the adapters).

    Layers rather than the whole model: the layers share one compiled graph (same code, same shapes),
    the vision tower and the image-token merge stay eager, and gradient checkpointing still wraps each
    layer's call. Shapes vary from batch to batch, so the graph is compiled for dynamic sequence lengths.
    """
    for layer in decoder_layers(model):
        layer.compile(dynamic=True)


def check_liger(cfg: RunConfig) -> None:
    """train.liger's requirements, before any data or weights load: the package and a CUDA device."""
    if not cfg.train.liger:
        return
    if not torch.cuda.is_available():
        raise ConfigError("train.liger: Liger's kernels are Triton kernels and need a CUDA device; this machine "
                          "has none (set train.liger: false)")
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"train.liger needs the liger-kernel package (pip install liger-kernel): {e}") from e


def use_liger_kernels(model) -> None:
    """Liger's RMSNorm and SwiGLU kernels in this model's decoder.

    Liger's own ``apply_liger_kernel_to_llama`` also rebinds transformers' module-level classes and RoPE, so
    every Llama built later in the process would use them (the stock row of `bench pipeline` included).
    Here each module's forward is rebound on the instance, to Liger's public functional kernels, with the
    arithmetic of the module it replaces (Llama's RMSNorm: fp32 statistics, cast back, then the weight).
    """
    decoder = _unwrapped(model).model.language_model
    if decoder.config.hidden_act not in ("silu", "swish"):
        raise ModelError(f"train.liger: Liger's SwiGLU computes silu(gate) * up; this decoder's activation is "
                         f"{decoder.config.hidden_act!r}")
    from types import MethodType

    from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu

    def rms_norm(self, hidden_states):
        return liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, casting_mode="llama")

    def swiglu(self, x):
        return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))

    norms = [decoder.norm] + [n for layer in decoder.layers for n in (layer.input_layernorm,
                                                                      layer.post_attention_layernorm)]
    for norm in norms:
        norm.forward = MethodType(rms_norm, norm)
    for layer in decoder.layers:
        layer.mlp.forward = MethodType(swiglu, layer.mlp)


def _unwrapped(model):
    """The LLaVA model itself, under a PEFT wrapper or not."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> list:
    """The decoder's layers, under a PEFT wrapper or not."""
    return list(_unwrapped(model).model.language_model.layers)


class CheckpointFirstLayers(TrainerCallback):
    """Gradient checkpointing for the first ``count`` decoder layers only (train.checkpoint_layers).

    Trainer turns checkpointing on for every layer as training starts, just before this runs.
    """

    def __init__(self, count: int):
        self.count = count

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        recompute_first(decoder_layers(model), self.count)


def freeze_unread_tower_parts(model) -> list[str]:
    """Freeze the tower's parameters that cannot reach the loss: the encoder layers after the one LLaVA
    reads (``vision_feature_layer``, -2: the last layer) and ``post_layernorm`` (it norms the pooled
    output, which LLaVA does not use), held in fp32 as the trained layers are. Returns their names.

    They get no gradient either way, so nothing trains differently; but under DDP with gradient
    checkpointing (Trainer then leaves ``find_unused_parameters`` off) a trainable parameter without a
    gradient stops the run ("Expected to have finished reduction"), and AdamW would hold states for them.
    """
    llava = _unwrapped(model).model
    # CLIPVisionModel holds its encoder in vision_model (older transformers) or directly.
    layers = len(next(m for n, m in llava.vision_tower.named_modules() if n.endswith("encoder.layers")))
    read = llava.config.vision_feature_layer
    # hidden_states[i] is the output of the first i layers (0: the embeddings), of layers + 1 in all.
    last = max(i % (layers + 1) for i in ([read] if isinstance(read, int) else read))
    frozen = []
    for name, p in llava.vision_tower.named_parameters():  # under PEFT's modules_to_save: its copy's names too
        part = _TOWER_PART.search(name)
        unread = part is not None and (part["layer"] is None or int(part["layer"]) >= last)
        if unread and p.requires_grad:
            p.requires_grad_(False)
            # The tower still computes them: in the dtype of the trained layers around them (fp32 masters,
            # hold_trainable_in_float32), or a CPU's autocast fails on the mixed dtypes.
            p.data = p.data.float()
            frozen.append(name)
    return frozen


_TOWER_PART = re.compile(r"(?:^|\.)(?:post_layernorm|encoder\.layers\.(?P<layer>\d+))\.")


def _trainable_model(cfg: RunConfig, processor=None):
    model, processor = build_llava(cfg.model, processor)
    t = cfg.train
    # The decoder's attention; each implementation keeps a packed row's samples apart (data.packing).
    model.model.language_model.set_attn_implementation(t.attn_implementation)
    if t.mode == "pretrain":
        # LLaVA stage 1 (official --tune_mm_mlp_adapter): the connector learns to map the frozen tower's
        # features into the frozen decoder's embedding space.
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        return model, processor
    if t.mode == "full":
        model.model.vision_tower.requires_grad_(t.unfreeze_mm_vision_tower)
        return model, processor
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if t.mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    # The connector (and the tower, when unfrozen) train fully and are saved with the adapter.
    trained_fully = [PROJECTOR] + (["vision_tower"] if t.unfreeze_mm_vision_tower else [])
    lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, bias="none",
                      target_modules=decoder_linear_names(model), modules_to_save=trained_fully,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if t.lean_lora_dropout:
        from .lean_dropout import use_lean_lora_dropout

        use_lean_lora_dropout(model)
    if t.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings still need grads to flow to LoRA layers
    return model, processor


def _version_dependent(t) -> dict:
    """TrainingArguments names that changed across the transformers versions we support."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio) ...
    out = {"warmup_ratio": t.warmup_ratio} if "warmup_ratio" in names else {"warmup_steps": t.warmup_ratio}
    # ... and later renamed gradient checkpointing to activation checkpointing.
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    out[prefix] = t.gradient_checkpointing
    out[f"{prefix}_kwargs"] = {"use_reentrant": False}
    return out


def _sharding(t) -> dict:
    """FSDP2 through accelerate: one fully_shard unit per transformer layer (the model's
    _no_split_modules), full state dicts for the saved model so outputs load anywhere."""
    if t.distributed != "fsdp2" or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return {}  # one process has nothing to shard (and Trainer refuses FSDP outside a launcher)
    return {"fsdp": "full_shard auto_wrap",
            "fsdp_config": {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
                            "cpu_ram_efficient_loading": False}}


def training_arguments(cfg: RunConfig) -> TrainingArguments:
    t = cfg.train
    return TrainingArguments(**_version_dependent(t), **_sharding(t),
        output_dir=t.output_dir, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=cfg.optimizer.get("lr", 2e-5),
        lr_scheduler_type=t.lr_scheduler_type, max_grad_norm=t.max_grad_norm,
        bf16=t.bf16, logging_steps=t.logging_steps,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit, seed=t.seed,
        data_seed=t.seed, dataloader_num_workers=t.dataloader_num_workers, report_to=t.report_to,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,  # log a NaN loss as NaN, not as 0.0 (guards.py stops the run on it)
        use_cpu=not torch.cuda.is_available(),  # lets bf16 run on a CPU-only machine
    )


def limit_no_split_modules(model: nn.Module) -> None:
    """Keep in ``_no_split_modules`` only the classes the model contains.

    FSDP2's transformer auto-wrap (accelerate) shards one unit per class listed there and fails
    on a listed class the model lacks: LLaVA inherits CLIP's list, text-tower classes included.
    """
    base = _unwrapped(model)
    present = {type(m).__name__ for m in base.modules()}
    listed = getattr(base, "_no_split_modules", None) or []
    base._no_split_modules = [name for name in listed if name in present]


def _skipped_samples_file(cfg: RunConfig) -> Path | None:
    """Where data.bad_samples=skip lists what it left out: the output folder, written by global rank 0 only.

    Every rank runs the same checks on the same files, so all skip the same samples; the process
    group is not up yet (Trainer starts it), hence the launcher's RANK.
    """
    if cfg.data.bad_samples != "skip" or int(os.environ.get("RANK", "0")) != 0:
        return None
    return Path(cfg.train.output_dir) / "skipped_samples.jsonl"


def build_trainer(cfg: RunConfig) -> tuple[LlavaTrainer, object]:
    from ..data import DataCollatorForLlava, LlavaSFTDataset

    # Cheap checks first (issue 21): the config was validated when loaded, Trainer's own arguments and the
    # stage-1 projector's presence are checked here, then the whole data file is checked and tokenized with
    # the processor read from the parts' config files; only then do the weights load, around that processor.
    args = training_arguments(cfg)
    check_liger(cfg)
    if cfg.model.mm_projector and not Path(cfg.model.mm_projector).is_file():
        raise ModelError(f"mm_projector file {cfg.model.mm_projector!r} does not exist")
    processor, num_image_tokens = load_preprocessing(cfg.model)
    d = cfg.data
    dataset = LlavaSFTDataset(d.data_path, d.image_folder, processor.tokenizer, processor.image_processor,
                              num_image_tokens=num_image_tokens, image_token=cfg.model.image_token,
                              image_aspect_ratio=d.image_aspect_ratio, model_max_length=d.model_max_length,
                              template=d.template, check=d.check, bad_samples=d.bad_samples,
                              max_bad_fraction=d.max_bad_fraction,
                              skipped_samples_file=_skipped_samples_file(cfg))
    if d.packing and cfg.train.attn_implementation in ("sdpa", "eager") and cfg.train.per_device_train_batch_size > 1:
        # Exact either way; but these read a packed row's boundaries from a dense mask over the whole row.
        logger.warning("data.packing with train.attn_implementation=%s: attention is computed over the whole "
                       "packed row (a row x row mask) and masked between samples; flex_attention or "
                       "flash_attention_2 compute only each sample's own block", cfg.train.attn_implementation)
    set_seed(cfg.train.seed)
    model, processor = prepare_model(cfg, processor)
    limit_no_split_modules(model)
    if cfg.train.checkpoint_layers not in (None, "auto"):
        layers = len(decoder_layers(model))
        if cfg.train.checkpoint_layers > layers:
            raise ConfigError(f"train.checkpoint_layers={cfg.train.checkpoint_layers}, but the decoder "
                              f"{cfg.model.language_model} has {layers} layers")
    trainer = LlavaTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=DataCollatorForLlava(processor.tokenizer.pad_token_id, packing=d.packing),
        optimizer_config=cfg.optimizer, mm_projector_lr=cfg.train.mm_projector_lr,
        max_bad_steps=cfg.train.max_bad_steps, lr_step_decay=cfg.train.lr_step_decay,
        modality_lengths=dataset.modality_lengths if d.group_by_modality_length else None,
    )
    if cfg.train.checkpoint_layers == "auto":
        trainer.add_callback(CheckpointFromMemory(_unwrapped(model).model.language_model, decoder_layers(model)))
    elif cfg.train.checkpoint_layers is not None:
        trainer.add_callback(CheckpointFirstLayers(cfg.train.checkpoint_layers))
    return trainer, processor


def save_outputs(trainer: LlavaTrainer, processor, cfg: RunConfig) -> Path:
    """HF checkpoint (or PEFT adapter + connector; or, in pretrain mode, the connector alone as
    mm_projector.safetensors), processor, base-model spec, run config, loss plot; run_complete.json, written
    last, marks them complete (checkpoints.seal_outputs)."""
    output = Path(cfg.train.output_dir)
    if trainer.is_world_process_zero():
        begin_outputs(output)
    if cfg.train.mode == "pretrain":  # stage 1's product is the connector alone, for model.mm_projector
        save_mm_projector(trainer.model.model.multi_modal_projector, output)
    else:
        trainer.save_model(str(output))
        # Trainer also pickles its TrainingArguments there; the run is recorded as YAML instead,
        # so the output folder holds nothing that needs unpickling.
        (output / "training_args.bin").unlink(missing_ok=True)
        processor.save_pretrained(output)
        save_spec(cfg.model, output)
    if trainer.is_world_process_zero():
        # The final weights in the loaded dtype, as official LLaVA's bf16 outputs; checkpoint-* folders
        # keep the fp32 masters, so a resumed run continues exactly.
        cast_saved_weights(output, DTYPES[cfg.model.torch_dtype])
    (output / "llava_sgg_run.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    history = [row for row in trainer.state.log_history if "loss" in row]
    # Sorted keys, as trainer_state.json holds them: a resumed run writes the bytes an uninterrupted one does.
    (output / "loss_history.json").write_text(json.dumps(history, indent=1, sort_keys=True))
    if history:
        curve = ([row["step"] for row in history], [row["loss"] for row in history])
        plot_curves({"loss": curve}, output / "loss_curve.png", ylabel="training loss", log=False,
                    title=f"{cfg.train.mode} / {cfg.optimizer['name']}", size=(6, 3.6), marker=".")
        plot_sgg_scales(history, output / "sgg_scales.png", title=f"SGG scales, {cfg.optimizer['name']}")
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        seal_outputs(output, trainer.state.global_step, cfg.to_dict())
    return output


def cast_saved_weights(folder: Path, dtype: torch.dtype) -> list[str]:
    """Rewrite the float32 tensors of the folder's top-level safetensors files in ``dtype``.

    Covers each output layout: a full model (model*.safetensors, and config.json's dtype), a LoRA
    adapter with its fully trained connector (adapter_model.safetensors) and stage 1's connector
    (mm_projector.safetensors). Returns the files rewritten.
    """
    if dtype == torch.float32:
        return []
    from safetensors import safe_open
    from safetensors.torch import save_file

    rewritten = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if not any(t.dtype == torch.float32 for t in tensors.values()):
            continue
        tensors = {key: t.to(dtype) if t.dtype == torch.float32 else t for key, t in tensors.items()}
        save_file(tensors, str(path), metadata=metadata)
        rewritten.append(path.name)
    config = folder / "config.json"
    if rewritten and config.is_file():
        name = str(dtype).removeprefix("torch.")

        def relabel(node):  # the model's dtype and its sub-configs' (text_config, vision_config)
            if isinstance(node, dict):
                return {key: name if key in ("dtype", "torch_dtype") and value == "float32" else relabel(value)
                        for key, value in node.items()}
            return node

        config.write_text(json.dumps(relabel(json.loads(config.read_text())), indent=2, sort_keys=True) + "\n")
    return rewritten


def check_memory(trainer: LlavaTrainer, cfg: RunConfig) -> None:
    """On a GPU, refuse a run whose weights, gradients and optimizer states cannot fit (memory.check_fits)."""
    if not torch.cuda.is_available():
        return
    plan = memory_plan(trainer.model, cfg.optimizer)
    shards = trainer.args.world_size if trainer.is_fsdp_enabled else 1
    capacity = torch.cuda.get_device_properties(trainer.args.device).total_memory
    check_fits(plan, capacity, shards=shards, mode=cfg.train.mode)


def leave_process_group() -> None:
    """Tear down the process group the Trainer started, with every rank at a barrier first.

    A rank that exits with its gloo/NCCL group still alive, or tears it down while a peer still
    talks to it, can die in the group's destructor (SIGABRT, "terminate called without an active
    exception"), and torchrun then fails a run that trained and saved everything.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train(cfg: RunConfig) -> Path:
    """Train and write the outputs; resumed after the end of its schedule, a run trains nothing.

    Its outputs, when complete (run_complete.json), stay as they are: with the same config this is
    known before anything loads. When a kill interrupted them, they are written again from the
    final checkpoint, identical to those of an uninterrupted run.
    """
    output, resume = Path(cfg.train.output_dir), cfg.train.resume_from_checkpoint
    step = finished_run(output, cfg.to_dict(), resume) if resume else None
    if step is not None:
        logger.warning("%s: the run already finished at step %d and its outputs are complete; nothing to train",
                       output, step)
        return output
    trainer, processor = build_trainer(cfg)
    check_memory(trainer, cfg)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.resumed_finished_run and outputs_complete(output, trainer.state.global_step):
        logger.warning("%s: the outputs of step %d are complete and left as they are", output,
                       trainer.state.global_step)
        return output
    return save_outputs(trainer, processor, cfg)
