"""`llava-sgg bench loss`: does packing change the loss curve by more than bf16 itself does?

Packed and padded batches hold the same samples, but their matrices have other shapes, so bf16
rounds them differently and the two loss curves part a little. Whether that is "within bf16 noise"
needs bf16's noise measured, not assumed. This benchmark trains `bench pipeline`'s parts (random
weights) on its synthetic samples, the same batches in the same order, four times through
``build_trainer``:

- ``bf16 padded`` and ``bf16 packed``: bf16 frozen weights and autocast, fp32 trainable masters, as
  a training run on a GPU;
- ``fp32 padded`` and ``fp32 packed``: the same weights (copied from the bf16 build, so each is the
  bf16 value) in fp32, fp32 compute, TF32 off: the reference curve.

From the per-step losses it reports three distances, each the largest over the steps, relative to
the fp32 padded loss:

- ``bf16_noise``: bf16 padded against fp32 padded, what bf16's rounding alone does to the curve;
- ``packing_bf16``: bf16 packed against bf16 padded, what packing does in a bf16 run;
- ``packing_fp32``: fp32 packed against fp32 padded, what packing does with rounding made small.

Packing is within bf16's noise when ``packing_fp32`` is at the level of fp32 summation order
(``FP32_TOLERANCE``) and ``packing_bf16`` is at most twice ``bf16_noise``: two runs that each
round as bf16 does sit at about bf16's distance from the exact curve, and so at up to twice it
from each other.

LoRA dropout is off here (``lora_dropout`` 0): its masks are drawn per element of a batch's
tensors, whose layout packing changes, so with dropout the curves would differ by sampling, not
by rounding.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from .bench import _write, environment
from .bench_pipeline import (MODES, SIZES, model_parts_and_samples, run_config, run_llava_sgg)

FP32_TOLERANCE = 1e-4  # fp32 packed against fp32 padded over a short run: summation order, grown by the steps
NOISE_FACTOR = 2.0  # packing_bf16 <= NOISE_FACTOR * bf16_noise; see the module docstring
ROWS = (("bf16", False), ("bf16", True), ("fp32", False), ("fp32", True))


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """fp32 matrix products and convolutions in full precision (no TF32) inside."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _capture(store: dict):
    """on_built hook: keep every parameter of the first model built, on the CPU."""
    def capture(trainer):
        store.update({n: p.detach().to("cpu", copy=True) for n, p in trainer.model.named_parameters()})
    return capture


def _load(store: dict):
    """on_built hook: give the model the captured values (cast to each parameter's dtype)."""
    def load(trainer):
        params = dict(trainer.model.named_parameters())
        if params.keys() != store.keys():
            missing, extra = store.keys() - params.keys(), params.keys() - store.keys()
            raise RuntimeError(f"bench loss: the fp32 build's parameters differ from the bf16 build's "
                               f"(missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(store[name])
    return load


def distances(losses: dict[str, list[float]]) -> dict:
    """The three largest relative distances of the module docstring, per step and at most."""
    ref = losses["fp32 padded"]

    def rel(a: str, b: str) -> list[float]:
        return [abs(x - y) / max(abs(r), 1e-12) for x, y, r in zip(losses[a], losses[b], ref)]

    per_step = {"bf16_noise": rel("bf16 padded", "fp32 padded"),
                "packing_bf16": rel("bf16 packed", "bf16 padded"),
                "packing_fp32": rel("fp32 packed", "fp32 padded")}
    worst = {k: max(v) for k, v in per_step.items()}
    exact = worst["packing_fp32"] <= FP32_TOLERANCE
    within = worst["packing_bf16"] <= NOISE_FACTOR * worst["bf16_noise"]
    return {"per_step": per_step, "max": worst, "fp32_tolerance": FP32_TOLERANCE, "noise_factor": NOISE_FACTOR,
            "packing_exact_in_fp32": exact, "packing_within_bf16_noise": within, "passed": exact and within}


def run_loss(*, size: str = "7b", mode: str = "lora", lengths: str = "mix", batch: int = 16, steps: int = 8,
             attn: str = "sdpa", workers: int = 4, seed: int = 0, output: Path = Path("runs/bench"),
             device: str | None = None) -> dict:
    """Train the four rows of the module docstring on the same batches; prints the distances, writes JSON
    and a plot of them."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if size not in SIZES or mode not in MODES:
        raise ValueError(f"--size one of {', '.join(SIZES)}, --mode one of {', '.join(MODES)}")
    if steps < 2 or batch < 1 or workers < 0:
        raise ValueError("--steps must be >= 2 (a curve), --batch >= 1, --workers >= 0")
    if not cuda and attn not in ("sdpa", "eager"):
        raise ValueError(f"--attn {attn} on a CPU: use sdpa or eager")
    if not cuda and size != "tiny":
        raise ValueError(f"--size {size} on a CPU: its fp32 rows would take hours; use --size tiny")
    lora_r = 8 if size == "tiny" else 128
    args = {"size": size, "mode": mode, "lengths": lengths, "batch": batch, "steps": steps, "attn": attn,
            "workers": workers, "seed": seed, "lora_r": lora_r if mode == "lora" else None, "lora_dropout": 0.0}
    losses, peaks, weights = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="llava-sgg-bench-loss-") as tmp:
        root = Path(tmp)
        model_section, data_section, distribution, _ = model_parts_and_samples(root, size, lengths, steps * batch,
                                                                                seed)
        for precision, packing in ROWS:
            name = f"{precision} {'packed' if packing else 'padded'}"
            print(f"bench loss: {name}, {steps} steps", flush=True)
            cfg = run_config(model_section, data_section, root / name.replace(" ", "-"), mode=mode, packing=packing,
                             optimizer="adamw", batch=batch, max_steps=steps, gradient_checkpointing=size != "tiny",
                             workers=workers, attn=attn, lora_r=lora_r, lora_alpha=2 * lora_r, seed=seed, cuda=cuda,
                             bf16=precision == "bf16", lora_dropout=0.0)
            hook = _capture(weights) if not weights else (_load(weights) if precision == "fp32" else None)
            with full_fp32(device) if precision == "fp32" else contextlib.nullcontext():
                measured = run_llava_sgg(cfg, device, 1, on_built=hook)
            losses[name], peaks[name] = measured["losses"], measured["peak_gib"]
            # Each row's curve goes to the log as it completes: a later row that fails (out of memory, a
            # time limit) leaves the finished rows readable.
            print(f"bench loss: {name} losses {' '.join(f'{v:.6f}' for v in losses[name])}"
                  f"{'' if peaks[name] is None else f', peak {peaks[name]:.2f} GiB'}", flush=True)
    if any(len(v) != steps for v in losses.values()):
        raise RuntimeError(f"bench loss: expected {steps} losses per row, got "
                           f"{ {k: len(v) for k, v in losses.items()} }")
    check = distances(losses)
    report = {"environment": environment(device), "args": args, "lengths": distribution, "losses": losses,
              "peak_gib": peaks, "check": check,
              "weights": "built once in bf16 (random, seeded); the fp32 rows get the bf16 build's values",
              "distance": "|a - b| / |fp32 padded| per step; max over the steps"}
    _print(report)
    stem = f"loss-{size}-{mode}-{lengths}{'' if attn == 'sdpa' else '-' + attn}-{device.type}"
    _write(output / f"{stem}.json", report)
    _plot(check, output / f"{stem}.png", title=f"bench loss: {size} {mode}, {lengths} lengths, batch {batch}")
    return report


def _plot(check: dict, path: Path, *, title: str) -> Path:
    from .plotting import plot_curves

    labels = {"bf16_noise": "bf16 padded vs fp32 padded (bf16's noise)",
              "packing_bf16": "bf16 packed vs bf16 padded", "packing_fp32": "fp32 packed vs fp32 padded"}
    curves = {}
    for key, label in labels.items():
        values = check["per_step"][key]
        # a log axis cannot draw an exact 0 (fp32 rows can agree to the last bit): drawn at 1e-9
        curves[label] = (list(range(1, len(values) + 1)), [max(v, 1e-9) for v in values])
    return plot_curves(curves, path, ylabel="relative loss difference", title=title, marker="o")


def _print(report: dict) -> None:
    a, check, env = report["args"], report["check"], report["environment"]
    print(f"llava-sgg bench loss: {a['size']} {a['mode']}, {a['lengths']} lengths, batch {a['batch']}, "
          f"{a['steps']} steps, attn {a['attn']}, on {env['device']}")
    print(f"{'step':>4}" + "".join(f"{name:>14}" for name in report["losses"]))
    for i in range(a["steps"]):
        print(f"{i + 1:>4}" + "".join(f"{v[i]:>14.6f}" for v in report["losses"].values()))
    m = check["max"]
    print(f"largest relative distance: bf16's noise {m['bf16_noise']:.2e}; packing in bf16 {m['packing_bf16']:.2e} "
          f"({'within' if check['packing_within_bf16_noise'] else 'NOT within'} {check['noise_factor']:g} x the "
          f"noise); packing in fp32 {m['packing_fp32']:.2e} "
          f"({'exact' if check['packing_exact_in_fp32'] else 'NOT exact'} to {check['fp32_tolerance']:.0e})")
