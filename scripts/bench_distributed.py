"""Step time and memory per GPU of LLaVA-7B-shaped training on N GPUs, DDP against FSDP2, per optimizer.

    torchrun --nproc_per_node 2 scripts/bench_distributed.py --strategy fsdp2 --mode lora \
        --optimizers adamw,adamw_sgg --out docs/benchmarks/dist-lora-fsdp2.json

Random bf16 weights in LLaVA-v1.5-7B's shapes (llava_sgg.bench.llava_7b_config), one sample of
576 image + TEXT text tokens per GPU. FSDP2: one fully_shard unit per decoder and encoder layer,
then the root. SGG's ids are fitted once before timing (the step between re-clusterings); one
re-clustering of every layer (the all-gathers included) is timed on its own. Step times are the
median over ranks' maxima of STEPS steps after 3 warm-up steps, synchronised with CUDA events; the
optimizer's share is timed from the end of backward. Peak memory is the largest over ranks of
torch's allocated peak: in the timed steps, and in the first step with the re-clustering.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
import torch.distributed as dist


def build_model(mode: str, device):
    from llava_sgg.bench import llava_7b_model

    return llava_7b_model(mode, device, tiny=os.environ.get("BENCH_TINY") == "1")


def shard(model, strategy: str, device):
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index])
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in model.modules() if type(m).__name__ in ("LlamaDecoderLayer", "CLIPEncoderLayer")]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--mode", choices=["lora", "full"], required=True)
    parser.add_argument("--optimizers", default="adamw,adamw_sgg")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--text-tokens", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from llava_sgg.optim import SGG, build_optimizer

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    t0 = time.perf_counter()
    model, cfg = build_model(args.mode, device)
    wrapped = shard(model, args.strategy, device)
    build_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    image_tokens = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g = torch.Generator(device=device).manual_seed(rank)
    ids = torch.randint(0, min(30000, cfg.text_config.vocab_size - 100), (1, image_tokens + args.text_tokens), device=device, generator=g)
    ids[0, 1:1 + image_tokens] = cfg.image_token_index
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "pixel_values": torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size,
                                         device=device, dtype=torch.bfloat16, generator=g)}
    batch["labels"][0, : 1 + image_tokens] = -100
    rows = []
    for name in args.optimizers.split(","):
        opt = build_optimizer(trainable, name, lr=1e-5, **({"recluster_interval": 10**9} if "sgg" in name else {}))

        def step(opt=opt, mid=None):
            opt.zero_grad()
            wrapped(**batch).loss.backward()
            if mid is not None:
                mid.record()
            opt.step()

        torch.cuda.reset_peak_memory_stats(device)
        step()
        recluster_s = None
        if isinstance(opt, SGG):
            torch.cuda.synchronize(device)
            dist.barrier()
            start = time.perf_counter()
            opt.recluster()  # every later step is the scaled step
            torch.cuda.synchronize(device)
            recluster_s = time.perf_counter() - start
        first_peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
        dist.all_reduce(first_peak, op=dist.ReduceOp.MAX)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            step()
        times, opt_times = [], []
        for _ in range(args.steps):
            begin, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            dist.barrier()
            begin.record()
            step(mid=mid)
            end.record()
            end.synchronize()
            t = torch.tensor([begin.elapsed_time(end) / 1e3, mid.elapsed_time(end) / 1e3], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times.append(float(t[0]))
            opt_times.append(float(t[1]))
        peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        rows.append({"optimizer": name, "step_s": statistics.median(times),
                     "optimizer_step_s": statistics.median(opt_times), "peak_gib_per_gpu": float(peak),
                     "first_step_peak_gib_per_gpu": float(first_peak),
                     "recluster_s": recluster_s})
        del opt, step
        gc.collect()
        torch.cuda.empty_cache()
    if rank == 0:
        report = {"strategy": args.strategy, "mode": args.mode, "world_size": world,
                  "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                  "trainable_parameters": n_trainable, "image_tokens": image_tokens,
                  "text_tokens": args.text_tokens, "steps": args.steps, "build_s": build_s, "rows": rows}
        print(json.dumps(report))
        for r in rows:
            rc = "" if r["recluster_s"] is None else f"  recluster {r['recluster_s']:.3f} s"
            print(f"{args.strategy:6} {args.mode:5} {r['optimizer']:12} step {r['step_s']:.4f} s  "
                  f"(optimizer {r['optimizer_step_s']:.4f} s)  "
                  f"peak {r['peak_gib_per_gpu']:.2f} GiB/GPU (first step + re-clustering "
                  f"{r['first_step_peak_gib_per_gpu']:.2f}){rc}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
