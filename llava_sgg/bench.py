"""Benchmarks behind `llava-sgg bench`: optimizer steps, re-clustering, and a LLaVA training step.

`bench optim` times each optimizer's step on one set of parameters with
gradients (a LLaMA-1B-shaped model, the LoRA matrices of LLaVA-7B, or a tiny
set for the CPU), every optimizer in the same process, one after the other on
fresh copies: the median of ``steps`` steps after warm-up, measured with CUDA
events on a GPU. For SGG the ids are fitted once before timing (the step
between re-clusterings), and one re-clustering of all layers is timed on its
own. `bench cluster` compares the default 1-D k-means with scikit-learn's on
one layer; `bench train` times whole LLaVA steps (forward, backward, optimizer).
"""

from __future__ import annotations

import datetime
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .optim import SGG, Lamb, build_optimizer

# Bytes each step must move per element at least, fp32 (parameter, gradient, moments; ids extra):
# AdamW and LAMB read p, g, m, v and write p, m, v; Adafactor reads g and p and writes p.
MIN_BYTES_PER_ELEMENT = {"adamw": 7, "lamb": 7, "adafactor": 3}

# (rows, cols) lists. "1b" is the LLaMA-1B of GaLore and the SGG paper (hidden 2048, MLP 5461,
# 24 layers, vocabulary 32000, untied embeddings): 1.34 B parameters.
def _llama_shapes(hidden: int, mlp: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    block = [(hidden, hidden)] * 4 + [(mlp, hidden), (mlp, hidden), (hidden, mlp), (hidden,), (hidden,)]
    return [(vocab, hidden)] + block * layers + [(hidden,), (vocab, hidden)]


def _lora_shapes(hidden: int, mlp: int, layers: int, rank: int, vision: int) -> list[tuple[int, ...]]:
    # LoRA A [r, in] and B [out, r] on q, k, v, o, gate, up, down; the connector trained fully.
    block = [(rank, hidden), (hidden, rank)] * 4 + [(rank, hidden), (mlp, rank)] * 2 + [(rank, mlp), (hidden, rank)]
    return [(hidden, vision), (hidden,), (hidden, hidden), (hidden,)] + block * layers


PARAM_SETS = {
    "1b": lambda: _llama_shapes(2048, 5461, 24, 32000),
    "7b-lora": lambda: _lora_shapes(4096, 11008, 32, 128, 1024),
    "tiny": lambda: _llama_shapes(256, 688, 2, 1000),
}

OPTIMIZERS = ("adamw", "adamw_foreach", "adamw_sgg", "adamw_sgg_dynamic", "adamw_sgg_reference",
              "adamw_sgg_mean_ratio", "adafactor", "adafactor_sgg", "lamb", "lamb_timm", "lamb_sgg")


def make_params(name: str, device, dtype=torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters of ``name``'s shapes with heavy-tailed gradients of different scales per layer."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for i, shape in enumerate(PARAM_SETS[name]()):
        p = torch.nn.Parameter(torch.randn(shape, generator=g, device=device, dtype=dtype) * 0.02)
        p.grad = torch.randn(shape, generator=g, device=device, dtype=dtype).pow_(3).mul_(1e-3 * (1 + i % 7))
        params.append(p)
    return params


def build(name: str, params, lr: float = 1e-4):
    """One of :data:`OPTIMIZERS` over ``params``; the *_sgg ones re-cluster only when asked."""
    cuda = params[0].is_cuda
    never = 10**9
    if name == "adamw":  # the fastest plain AdamW torch has: fused on a GPU
        return torch.optim.AdamW(params, lr=lr, fused=cuda or None, foreach=None if cuda else True)
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=lr, foreach=True)
    if name.startswith("adamw_sgg"):
        base = torch.optim.AdamW(params, lr=lr, fused=cuda or None)
        return SGG(base, recluster_interval=never, assignment="dynamic" if name.endswith("dynamic") else "frozen",
                   fused=not name.endswith("reference"), rule="mean_ratio" if name.endswith("mean_ratio") else "mda")
    if name == "lamb_timm":
        from timm.optim import Lamb as TimmLamb

        return TimmLamb(params, lr=lr, weight_decay=0.0, max_grad_norm=None)
    if name == "lamb":
        return Lamb(params, lr=lr)
    return build_optimizer(params, name, lr=lr, **({"recluster_interval": never} if name.endswith("_sgg") else {}))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], None], device, steps: int, warmup: int = 3) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _grouped(opt: SGG) -> list[torch.Tensor]:
    """The parameters a re-clustering clusters now: those SGG groups (cluster_scales not None) with a gradient."""
    return [p for group in opt.param_groups for p in group["params"]
            if p.grad is not None and opt.cluster_scales(p) is not None]


def sgg_state_bytes(opt: SGG) -> int:
    """Bytes of SGG's own state: every layer's ids (or thresholds) and scales, as its state dict holds them."""
    layers = opt.state_dict()["sgg"]["layers"]
    return sum(t.numel() * t.element_size() for layer in layers.values() for t in layer.values())


def bench_optimizer(name: str, param_set: str, device, steps: int) -> dict:
    params = make_params(param_set, device)
    n = sum(p.numel() for p in params)
    opt = build(name, params)
    row = {"optimizer": name, "parameters": n}
    if isinstance(opt, SGG):
        opt.step()  # creates the base's state
        grouped = _grouped(opt)
        row["eligible_elements"] = sum(p.numel() for p in grouped)
        _sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        times = time_steps(opt.recluster, device, steps=3, warmup=1)
        row["recluster_s"] = statistics.median(times)
        _sync(device)
        row["sgg_state_bytes"] = sgg_state_bytes(opt)
        row["sgg_bytes_per_eligible_element"] = row["sgg_state_bytes"] / row["eligible_elements"]
        row["sgg_bytes_per_layer"] = row["sgg_state_bytes"] / len(grouped)
        if device.type == "cuda":
            row["extra_memory_bytes"] = torch.cuda.memory_allocated(device) - before
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(opt.step, device, steps)
    row["step_s"] = statistics.median(times)
    row["step_s_spread"] = [min(times), max(times)]
    base_kind = name.split("_")[0]
    row["effective_gb_s"] = MIN_BYTES_PER_ELEMENT[base_kind] * 4 * n / row["step_s"] / 1e9
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del opt, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def environment(device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
    }


def run_optim(param_set: str, optimizers: list[str], steps: int, device: str | None, output: Path) -> dict:
    unknown = sorted(set(optimizers) - set(OPTIMIZERS))
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(device)
    rows = [bench_optimizer(name, param_set, device, steps) for name in optimizers]
    reference = next((r["step_s"] for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        r["x_adamw"] = r["step_s"] / reference if reference else None
    plain = {r["optimizer"]: r["step_s"] for r in rows}
    for r in rows:
        base = r["optimizer"].removesuffix("_sgg")
        if r["optimizer"].endswith("_sgg") and base in plain:
            r["x_own_base"] = r["step_s"] / plain[base]
    report = {"environment": env, "params": param_set, "steps": steps, "rows": rows}
    print(f"llava-sgg bench optim: {param_set} ({rows[0]['parameters'] / 1e6:.1f}M parameters) on {env['device']}, "
          f"torch {env['torch']}, median of {steps} steps")
    print(f"{'optimizer':<22}{'step ms':>9}{'x adamw':>9}{'x base':>8}{'GB/s':>8}{'peak GiB':>10}"
          f"{'recluster ms':>14}{'SGG B/elem':>12}")
    for r in rows:
        print(f"{r['optimizer']:<22}{r['step_s'] * 1e3:>9.2f}{_fmt(r['x_adamw'], 9, 3)}{_fmt(r.get('x_own_base'), 8, 3)}"
              f"{r['effective_gb_s']:>8.0f}{_fmt(r.get('peak_memory_gib'), 10, 2)}"
              f"{_fmt(r.get('recluster_s') and r['recluster_s'] * 1e3, 14, 1)}"
              f"{_fmt(r.get('sgg_bytes_per_eligible_element'), 12, 3)}")
    _write(output / f"optim-{param_set}-{device.type}.json", report)
    return report


def _fmt(value, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


def run_cluster(elements: int, n_clusters: int, device: str | None, output: Path, backends=("torch", "sklearn")
                ) -> dict:
    """One re-clustering of a single layer of ``elements`` values, per backend."""
    device = torch.device(device or "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for backend in backends:
        p = torch.nn.Parameter(torch.zeros(elements, device=device).view(-1, 1024 if elements % 1024 == 0 else 1))
        opt = SGG(torch.optim.AdamW([p], lr=1e-4), n_clusters=n_clusters, recluster_interval=10**9, backend=backend)
        p.grad = (torch.randn(p.shape, generator=g) ** 3).to(device)
        opt.step()
        _sync(device)
        t0 = time.perf_counter()
        opt.recluster()
        _sync(device)
        rows.append({"backend": backend, "recluster_s": time.perf_counter() - t0,
                     "scales": opt.cluster_scales(p).tolist()})
    report = {"environment": environment(device), "elements": elements, "n_clusters": n_clusters, "rows": rows}
    print(f"llava-sgg bench cluster: one layer of {elements} elements, K={n_clusters}, on {report['environment']['device']}")
    for r in rows:
        print(f"  backend={r['backend']:<8} {r['recluster_s']:.3f} s  scales {['%.4f' % s for s in r['scales']]}")
    if len(rows) == 2:
        report["speedup"] = rows[1]["recluster_s"] / rows[0]["recluster_s"]
        print(f"  default is {report['speedup']:.1f}x faster than sklearn")
    _write(output / f"cluster-{elements}-{device.type}.json", report)
    return report


# ------------------------------------------------------------------ LLaVA step
def llava_7b_config(tiny: bool = False):
    """LLaVA-v1.5-7B's shapes (Vicuna-7B decoder, CLIP ViT-L/14-336 tower), or a tiny stand-in."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=56, patch_size=14)
        text = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=1000)
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000 if not tiny else 999,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")


def _llava_flops(model, image_tokens: int, text_tokens: int, lora_params: int) -> float:
    """Model FLOPs of one step: frozen weights 2 (forward) + 2 (input gradients) per token, LoRA 6, tower forward."""
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n and p.ndim >= 2)
    decoder = sum(p.numel() for n, p in model.named_parameters()
                  if "vision_tower" not in n and "lora_" not in n and "embed_tokens" not in n and p.ndim >= 2)
    tokens = image_tokens + text_tokens
    return 2 * vision * (image_tokens + 1) + 4 * decoder * tokens + 6 * lora_params * tokens


def llava_7b_model(mode: str, device, tiny: bool = False):
    """(model, config): LLaVA-7B-shaped, bf16, random weights (seed 0), tower frozen; ``mode`` "lora" puts
    LoRA r=128 on the decoder's linears with the connector trained fully, "full" trains all but the tower."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    cfg = llava_7b_config(tiny)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    model.model.vision_tower.requires_grad_(False)
    if mode == "lora":
        model.requires_grad_(False)
        lora = LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, target_modules=(
            r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
        model = get_peft_model(model, lora)
        for n, p in model.named_parameters():
            if "multi_modal_projector" in n:
                p.requires_grad_(True)
    return model, cfg


def run_train(optimizers: list[str], steps: int, text_tokens: int, output: Path, tiny: bool = False,
              peak_tflops: float = 989.0) -> dict:
    """Steps of LLaVA-7B-shaped LoRA training (r=128, bf16, random weights) with each optimizer."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = llava_7b_model("lora", device, tiny)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in trainable)
    initial = [p.detach().clone() for p in trainable]
    image_tokens = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = torch.randint(0, 30000 if not tiny else 900, (1, image_tokens + text_tokens), device=device)
    ids[0, 1:1 + image_tokens] = cfg.image_token_index
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "pixel_values": torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size,
                                         device=device, dtype=torch.bfloat16)}
    batch["labels"][0, : 1 + image_tokens] = -100
    env = environment(device)
    rows = []
    for name in optimizers:
        with torch.no_grad():
            for p, p0 in zip(trainable, initial):
                p.copy_(p0)
        opt = build_optimizer(trainable, name, lr=2e-4, **({"recluster_interval": 10**9} if "sgg" in name else {}))

        def train_step(opt=opt):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()

        train_step()
        if isinstance(opt, SGG):
            opt.recluster()  # fit the ids: every step after this is the scaled step
        times = time_steps(train_step, device, steps)
        step_s = statistics.median(times)
        flops = _llava_flops(model, image_tokens, text_tokens, lora_params)
        rows.append({"optimizer": name, "step_s": step_s, "tokens_per_s": (image_tokens + text_tokens) / step_s,
                     "model_tflops": flops / step_s / 1e12, "mfu": flops / step_s / (peak_tflops * 1e12)})
        del opt
        gc.collect()
    base = next((r["step_s"] for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        r["x_adamw"] = r["step_s"] / base if base else None
    report = {"environment": env, "tiny": tiny, "image_tokens": image_tokens, "text_tokens": text_tokens,
              "trainable_parameters": lora_params, "steps": steps, "peak_tflops": peak_tflops, "rows": rows}
    print(f"llava-sgg bench train: LLaVA-7B-shaped LoRA r=128 ({lora_params / 1e6:.0f}M trainable), "
          f"{image_tokens} image + {text_tokens} text tokens, bf16, on {env['device']}")
    print(f"{'optimizer':<16}{'step s':>9}{'x adamw':>9}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}")
    for r in rows:
        print(f"{r['optimizer']:<16}{r['step_s']:>9.4f}{_fmt(r['x_adamw'], 9, 3)}{r['tokens_per_s']:>10.0f}"
              f"{r['model_tflops']:>9.1f}{r['mfu'] * 100:>6.1f}%")
    _write(output / f"train-{'tiny' if tiny else '7b'}-{device.type}.json", report)
    return report
