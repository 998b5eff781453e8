#!/usr/bin/env python
"""Benchmark SGG's cost against its base optimizer, and the large-layer sampling error.

Prints a table and saves JSON, markdown and a bar plot to --output. Measures:
  * optimizer step time of AdamW vs AdamW+SGG: the delegated step (before the
    first re-clustering), the scaled step (every step after it), and the
    re-clustering step (every T steps), on decoder-like layer shapes;
  * 1-D k-means time, default backend vs scikit-learn, per layer size;
  * the error of fitting on a 2^20 sample for layers above 2^22 elements.

  python scripts/bench_sgg.py --preset cpu      # a few hundred MB, minutes on 2 cores
  python scripts/bench_sgg.py --preset gpu      # Llama-7B-like layer shapes
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from llava_sgg.optim import SGG
from llava_sgg.optim import functional as F

# (rows, cols) of the matrices of one decoder block (attention q,k,v,o + MLP gate, up, down) scaled to the preset.
PRESETS = {
    "cpu": {"hidden": 512, "mlp": 1376, "blocks": 2, "kmeans_sizes": [2**14, 2**18, 2**20], "sampling_size": 2**23},
    "gpu": {"hidden": 4096, "mlp": 11008, "blocks": 2, "kmeans_sizes": [2**16, 2**20, 2**22, 2**24],
            "sampling_size": 2**25},
}


STEP_KEYS = ("adamw_step_s", "adamw_single_tensor_step_s", "sgg_delegated_step_s", "sgg_scaled_step_s",
             "sgg_recluster_step_s")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def layer_shapes(cfg):
    h, m = cfg["hidden"], cfg["mlp"]
    return [(h, h)] * 4 + [(m, h), (m, h), (h, m)]


def make_params(cfg, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for _ in range(cfg["blocks"]):
        for shape in layer_shapes(cfg):
            p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device, dtype))
            # Heavy-tailed gradients of different scales per layer, like a real model's.
            p.grad = (torch.randn(shape, generator=g) ** 3 * torch.rand(1, generator=g) * 1e-3).to(device, dtype)
            params.append(p)
    return params


def peak_memory(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def bench_steps(cfg, device, dtype, repeat):
    """AdamW as torch runs it by default (foreach on GPU), single-tensor AdamW, and SGG around the default."""
    results = {}
    for label, foreach in (("adamw", None), ("adamw_single_tensor", False)):
        params = make_params(cfg, device, dtype)
        results["parameters"] = sum(p.numel() for p in params)
        base = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=foreach)
        for _ in range(2):
            base.step()
        results[f"{label}_step_s"] = timed(base.step, device, repeat)
        results[f"{label}_peak_mem_gib"] = peak_memory(base.step, device)
        del base, params
        if device.type == "cuda":
            torch.cuda.empty_cache()

    params = make_params(cfg, device, dtype)
    n = results["parameters"]
    sgg = SGG(torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0), n_clusters=3, recluster_interval=10**9)
    sgg.step()
    results["sgg_delegated_step_s"] = timed(sgg.step, device, repeat)

    def recluster_step():
        sgg.recluster_interval = 1
        sgg.step()
        sgg.recluster_interval = 10**9

    results["sgg_recluster_step_s"] = timed(recluster_step, device, max(1, repeat // 2), warmup=0)
    results["sgg_scaled_step_s"] = timed(sgg.step, device, repeat)
    results["sgg_scaled_peak_mem_gib"] = peak_memory(sgg.step, device)
    ids_bytes = sum(sgg.state_dict()["sgg"]["layers"][i]["cluster_ids"].numel() for i in range(len(params)))
    results["frozen_id_bytes_per_element"] = ids_bytes / n
    return results


def bench_kmeans(cfg, device, repeat):
    rows = []
    for n in cfg["kmeans_sizes"]:
        values = (torch.randn(n, device=device) ** 3).abs()
        row = {"elements": n, "torch_s": timed(lambda: F.kmeans_1d(values, 3), device, repeat)}  # warm-up inside
        if n <= 2**20:
            try:
                row["sklearn_s"] = timed(lambda: F.kmeans_1d_sklearn(values, 3), device, 1, warmup=0)
            except ImportError:
                pass
        rows.append(row)
    return rows


def bench_sampling(cfg, device):
    """MDA and scale error of the sampled fit (2^20 of a large layer) against the exact fit."""
    n = cfg["sampling_size"]
    g = torch.Generator(device="cpu").manual_seed(1)
    out = {"elements": n}
    for label, limit in (("exact", n), ("sampled", 2**22)):
        p = torch.nn.Parameter(torch.zeros(n // 1024, 1024, device=device))
        q = torch.nn.Parameter(torch.zeros(256, 256, device=device))
        opt = SGG(torch.optim.AdamW([p, q], lr=1e-4), n_clusters=3, recluster_interval=1, beta3=0.0,
                  exact_limit=limit, sample_size=2**20)
        p.grad = torch.empty(p.shape).exponential_(generator=g).mul_(torch.randn(p.shape, generator=g).sign()).to(device)
        q.grad = torch.randn(q.shape, generator=g).to(device)
        start = time.perf_counter()
        opt.step()
        sync(device)
        out[f"{label}_recluster_s"] = time.perf_counter() - start
        out[f"{label}_scales"] = opt.cluster_scales(p).tolist()
    exact, sampled = torch.tensor(out["exact_scales"]), torch.tensor(out["sampled_scales"])
    out["max_relative_scale_error"] = float(((sampled - exact).abs() / exact).max())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--output", default="runs/bench-sgg")
    args = parser.parse_args()
    device = torch.device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    cfg = PRESETS[preset]
    dtype = getattr(torch, args.dtype)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "preset": preset, "dtype": args.dtype}
    print(f"SGG benchmark on {env['device']} ({preset} preset, {args.dtype}, torch {env['torch']})")

    steps = bench_steps(cfg, device, dtype, args.repeat)
    print(f"\nOptimizer step over {steps['parameters'] / 1e6:.1f}M parameters "
          f"({cfg['blocks']} blocks of {layer_shapes(cfg)})")
    print(f"{'step':<28}{'seconds':>10}{'x AdamW':>10}")
    for key in STEP_KEYS:
        print(f"{key.removesuffix('_s'):<28}{steps[key]:>10.4f}{steps[key] / steps['adamw_step_s']:>10.2f}")
    for key in ("adamw_peak_mem_gib", "adamw_single_tensor_peak_mem_gib", "sgg_scaled_peak_mem_gib"):
        if steps[key] is not None:
            print(f"{key}: {steps[key]:.2f}")
    print(f"frozen cluster ids: {steps['frozen_id_bytes_per_element']:.0f} byte per element")

    kmeans = bench_kmeans(cfg, device, args.repeat)
    print(f"\n1-D k-means (K=3) time per layer\n{'elements':>12}{'default s':>12}{'sklearn s':>12}")
    for row in kmeans:
        print(f"{row['elements']:>12}{row['torch_s']:>12.4f}{row.get('sklearn_s', float('nan')):>12.4f}")

    sampling = bench_sampling(cfg, device)
    print(f"\nLayer of {sampling['elements']} elements: exact fit {sampling['exact_recluster_s']:.2f}s, "
          f"2^20-sample fit {sampling['sampled_recluster_s']:.2f}s, max relative scale error "
          f"{sampling['max_relative_scale_error']:.2e}")

    output = Path(args.output) / f"{preset}-{device.type}-{args.dtype}"
    output.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "steps": steps, "kmeans": kmeans, "sampling": sampling}
    (output / "bench_sgg.json").write_text(json.dumps(report, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = STEP_KEYS
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([k.removesuffix("_s") for k in keys], [steps[k] for k in keys])
        ax.set(ylabel="seconds per step", yscale="log", title=f"{env['device']}: {steps['parameters'] / 1e6:.0f}M params")
        plt.setp(ax.get_xticklabels(), rotation=15)
        fig.tight_layout()
        fig.savefig(output / "step_times.png", dpi=120)
    except ImportError:
        pass
    print(f"\nwrote {output}/bench_sgg.json and step_times.png")


if __name__ == "__main__":
    main()
