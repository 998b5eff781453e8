"""GPU memory of full fine-tuning with fp32 master weights: llava_sgg.train.memory's floor against a measured run.

    python scripts/bench_memory.py --layers 8 --out docs/benchmarks/memory-full-h100.json
    torchrun --nproc_per_node N scripts/bench_memory.py --layers 32 --distributed fsdp2 --out ...

Builds LLaVA-v1.5-7B-shaped parts with random weights (CLIP ViT-L/14-336, a Vicuna-7B-wide decoder of
--layers layers), saves them in bf16 as a user's checkpoints would be, writes a synthetic dataset of
336x336 JPEGs and conversations, and trains them through `llava-sgg train`'s own path (build_trainer:
model.torch_dtype bfloat16, train.bf16, full mode, gradient checkpointing) with AdamW+SGG. Prints and
saves, per rank: the plan (weights, gradients, optimizer states, SGG ids), the allocated memory after
an optimizer step (weights + states + ids: gradients are freed), the peak of the steps after the first,
and the plan of the whole 32-layer model on 1 and 8 GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM, TrainerCallback

GIB = 2**30


def build_parts(root: Path, layers: int) -> dict:
    from llava_sgg.bench import llava_7b_config
    from llava_sgg.model.tiny import tiny_tokenizer

    config = llava_7b_config()
    text = config.text_config
    text.num_hidden_layers = layers
    vision, decoder = root / "vision", root / "decoder"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            CLIPVisionModel(config.vision_config).save_pretrained(vision)
            LlamaForCausalLM(text).save_pretrained(decoder)
    finally:
        torch.set_default_dtype(default)
    size = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(vision)
    tiny_tokenizer().save_pretrained(decoder)
    return {"vision_tower": str(vision), "language_model": str(decoder), "torch_dtype": "bfloat16"}


def build_dataset(root: Path, samples: int, words: int) -> dict:
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    vocabulary = "what is in the image digit three left of seven yes no how many are there".split()
    records = []
    for i in range(samples):
        Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
        text = " ".join(rng.choice(vocabulary, words))
        records.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": f"<image>\n{text}?"}, {"from": "gpt", "value": text}]})
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return {"data_path": str(path), "image_folder": str(images), "model_max_length": 2048}


class MemoryProbe(TrainerCallback):
    """Allocated memory after each optimizer step, and the peak of every step after the first."""

    def __init__(self):
        self.after_step, self.peak = [], 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.after_step.append(torch.cuda.memory_allocated())
        if state.global_step >= 2:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())


def plan_dict(plan, shards: int) -> dict:
    return {"trainable_params": plan.trainable_params, "shards": shards, "per_gpu_gib": plan.per_gpu(shards) / GIB,
            **{k: getattr(plan, k) / shards / GIB for k in
               ("frozen_bytes", "master_bytes", "grad_bytes", "state_bytes", "sgg_bytes")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--words", type=int, default=120, help="words per turn (about 2 tokens each)")
    parser.add_argument("--optimizer", default="adamw_sgg")
    parser.add_argument("--distributed", default="ddp", choices=("ddp", "fsdp2"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from llava_sgg.bench import llava_7b_config
    from llava_sgg.train.config import build_run_config
    from llava_sgg.train.memory import DoesNotFitError, memory_plan
    from llava_sgg.train.run import build_trainer, check_memory
    from transformers import LlavaForConditionalGeneration

    rank = int(os.environ.get("RANK", 0))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parts_root = Path(os.environ.get("BENCH_PARTS", root))  # shared by the ranks of one node
        if rank == 0 and not (parts_root / "decoder").is_dir():
            build_parts(parts_root, args.layers)
            build_dataset(parts_root, 64, args.words)
        if torch.distributed.is_available() and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            torch.distributed.init_process_group("nccl")
            torch.distributed.barrier()
        data = {"data_path": str(parts_root / "train.json"), "image_folder": str(parts_root / "images"),
                "model_max_length": 2048}
        parts = {"vision_tower": str(parts_root / "vision"), "language_model": str(parts_root / "decoder"),
                 "torch_dtype": "bfloat16"}
        options = {"name": args.optimizer, "lr": 2e-5}
        if args.optimizer.endswith("_sgg"):
            options["recluster_interval"] = 1  # ids from the first step on
        cfg = build_run_config({
            "model": parts, "data": data,
            "train": {"output_dir": str(root / "out"), "mode": "full", "max_steps": args.steps,
                      "per_device_train_batch_size": args.batch, "bf16": True, "gradient_checkpointing": True,
                      "save_steps": 10**6, "logging_steps": 1, "distributed": args.distributed,
                      "warmup_ratio": 0.0},
            "optimizer": options}, origin="bench_memory")
        trainer, _ = build_trainer(cfg)
        plan = memory_plan(trainer.model, cfg.optimizer)
        try:
            check_memory(trainer, cfg)  # as `llava-sgg train` does before the first step
        except DoesNotFitError as error:
            print(f"refused before the first step: {error}")
            if rank == 0:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"layers": args.layers, "refused": str(error),
                                                "plan": plan_dict(plan, 1)}, indent=1))
            return
        probe = MemoryProbe()
        trainer.add_callback(probe)
        trainer.train()
        world = trainer.args.world_size
        shards = world if trainer.is_fsdp_enabled else 1
        tokens = [row for row in trainer.state.log_history if "loss" in row]

    whole = llava_7b_config()
    with torch.device("meta"):
        full_model = LlavaForConditionalGeneration(whole)
    full_model.model.vision_tower.to(torch.bfloat16).requires_grad_(False)
    full_plan = memory_plan(full_model, options)
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "rank": rank, "world_size": world, "fsdp": trainer.is_fsdp_enabled,
        "layers": args.layers, "batch": args.batch, "optimizer": args.optimizer,
        "plan": plan_dict(plan, shards),
        "measured_after_step_gib": [b / GIB for b in probe.after_step],
        "measured_peak_gib": probe.peak / GIB,
        "activations_and_grads_gib": (probe.peak - probe.after_step[-1]) / GIB if probe.after_step else None,
        "losses": [row["loss"] for row in tokens],
        "llava_7b_plan": {"1_gpu": plan_dict(full_plan, 1), "8_gpus_fsdp2": plan_dict(full_plan, 8)},
    }
    steady = plan.per_gpu(shards) - plan.grad_bytes // shards
    report["plan_without_grads_gib"] = steady / GIB
    if rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(f"rank {rank}: {args.layers} layers, fsdp={trainer.is_fsdp_enabled}, world {world}: plan without grads "
          f"{steady / GIB:.2f} GiB, measured after step {report['measured_after_step_gib'][-1]:.2f} GiB; plan with "
          f"grads {plan.per_gpu(shards) / GIB:.2f} GiB, peak {report['measured_peak_gib']:.2f} GiB; 7B plan: "
          f"{full_plan.per_gpu(1) / GIB:.1f} GiB on 1 GPU, {full_plan.per_gpu(8) / GIB:.1f} GiB per GPU on 8 (FSDP2)")


if __name__ == "__main__":
    main()
