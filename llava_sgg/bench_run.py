"""`llava-sgg bench run`: what SGG costs over a whole training run, against its base optimizer, in one process.

An isolated optimizer step (`bench optim`) misses what a run pays around it: the re-clusterings,
their first-time kernel compilation, host synchronisation and the Trainer's per-step work. This
benchmark trains the same model on the same samples with each optimizer through ``build_trainer``
(the code `llava-sgg train` runs), ``--repeats`` times in the order A B B A ..., and reports:

- **train_s**: ``trainer.train()``'s wall time (synchronized), and its ratio to the base optimizer's;
- per step (between consecutive ``on_step_end`` callbacks, synchronized, as `bench pipeline` times):
  the median of the ordinary steps, and the mean and maximum of the re-clustering steps (those whose
  step count is a multiple of ``recluster_interval``, for every optimizer, so the rows compare);
- **excess_s**: where an SGG run's extra time went. Every run trains the same batches in the same
  order, so its steps pair with the base's: the first step, the ordinary steps and the re-clustering
  steps (each summed, against the base's same steps), and the rest of ``trainer.train()``.

The first SGG run of a process also compiles its Triton kernels (on a GPU, unless Triton's disk cache
already holds them), in background threads from the optimizer's construction (``precompile``, the
default): each run records how long the first re-clustering waited for them. ``--cold`` runs every
run in a process of its own with empty Triton and inductor caches, as a first run on a new machine or in a
fresh container is: each SGG run then pays the compilation, and every run pays its own process start and
torch.compile's (flex_attention's kernels, `train.compile`).

Setups (``--setup``):

- ``demo``: the demo's fine-tuning stage (recipes.FULL on a GPU, QUICK with ``--quick``): its decoder,
  tower, connector and data from the demo cache (``--cache``; built there first if missing), its
  batch, learning rates, SGG settings and callbacks. The issue's reference: 2500 steps, a re-clustering
  every 50.
- ``tiny``, ``1b``, ``7b``: `bench pipeline`'s parts with random weights and its LLaVA-mix-like samples
  on disk, LoRA (``--mode``) or full fine-tuning, packed batches.

``--profile`` adds, after the timed runs, one cProfile'd run per optimizer and writes the functions
with the most host time; ``--device-profile N`` one run per optimizer under torch.profiler, recording
its last N steps: the operators with the most device and host time, and how busy the device was
(neither is used for any timing). The JSON holds every step's time; a plot of them,
one line per run, sits beside it.
"""

from __future__ import annotations

import cProfile
import dataclasses
import io
import multiprocessing
import os
import pstats
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import TrainerCallback

from .bench import _fmt, _sync, _write, environment
from .bench_pipeline import StepTimer

SETUPS = ("demo", "tiny", "1b", "7b")


def _order(optimizers: list[str], repeats: int) -> list[str]:
    """A B, B A, A B, ...: each optimizer runs first as often as it runs last."""
    order = []
    for r in range(repeats):
        order += optimizers if r % 2 == 0 else optimizers[::-1]
    return order


def _is_recluster_step(step: int, interval: int) -> bool:
    return step % interval == 0


class _ProfilerSteps(TrainerCallback):
    """Advances a torch.profiler schedule at every step's end."""

    def __init__(self, profiler):
        self.profiler = profiler

    def on_step_end(self, args, state, control, **kwargs):
        self.profiler.step()


def device_profile(trainer, timer: StepTimer, device: torch.device, steps: int, last: int) -> dict:
    """Train under torch.profiler, recording the last ``last`` steps: the operators with the most device
    time and with the most host time, and how busy the device was over those steps."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    last = min(last, steps - 1)
    recorded = schedule(wait=steps - last - 1, warmup=1, active=last, repeat=1)  # repeat=1: keep the events
    with profile(activities=activities, schedule=recorded) as prof:
        trainer.add_callback(_ProfilerSteps(prof))
        trainer.train()
        _sync(device)
    events = prof.key_averages()
    wall = timer.ends[-1] - timer.ends[-1 - last]  # the recorded steps, end to end
    out = {"steps": last, "wall_s": wall,
           "host_table": events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)}
    if cuda:
        busy = sum(e.self_device_time_total for e in events) / 1e6
        out.update(device_busy_s=busy, device_busy_share=busy / wall,
                   device_table=events.table(sort_by="self_device_time_total", row_limit=25,
                                             max_name_column_width=60))
    return out


def time_run(build, device: torch.device, interval: int, profile: bool = False, device_steps: int = 0) -> dict:
    """Train the trainer ``build()`` returns, timing every step; with ``profile``, the host profile instead,
    with ``device_steps``, torch.profiler's view of the last so many steps (:func:`device_profile`)."""
    from transformers.trainer_callback import DefaultFlowCallback

    trainer, extra = build()
    timer = StepTimer(device)
    callbacks = trainer.callback_handler.callbacks
    callbacks.insert(next(i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)) + 1, timer)
    for callback in extra:
        trainer.add_callback(callback)
    _sync(device)
    if device_steps:
        return device_profile(trainer, timer, device, trainer.args.max_steps, device_steps)
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        trainer.train()
        _sync(device)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        return {"profile": text.getvalue()}
    start = time.perf_counter()
    trainer.train()
    _sync(device)
    train_s = time.perf_counter() - start
    ends = timer.ends
    # Step n ends at ends[n - 1]; the first step has no previous end and is left out of the per-step times.
    steps = {n: ends[n - 1] - ends[n - 2] for n in range(2, len(ends) + 1)}
    ordinary = [t for n, t in steps.items() if not _is_recluster_step(n, interval)]
    recluster = [t for n, t in steps.items() if _is_recluster_step(n, interval)]
    sgg = trainer._sgg()
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"train_s": train_s, "steps": len(ends), "first_step_s": ends[0] - start if ends else None,
            "ordinary_step_s": statistics.median(ordinary) if ordinary else None,
            "ordinary_steps": len(ordinary), "ordinary_s": sum(ordinary),
            "recluster_step_s_mean": statistics.mean(recluster) if recluster else None,
            "recluster_step_s_max": max(recluster) if recluster else None,
            "first_recluster_s": recluster[0] if recluster else None, "recluster_steps": len(recluster),
            "recluster_s": sum(recluster), "recluster_step_times_s": recluster,
            "step_times_s": [steps[n] for n in sorted(steps)],  # steps 2, 3, ...
            "reclusterings": None if sgg is None else sgg.reclusterings,
            "precompile": None if sgg is None else sgg.precompile_report}


def _demo_builder(cache: Path | None, quick: bool, steps: int, interval: int | None, output: Path):
    """(SGG settings, batch, build(name, run) -> (trainer, callbacks)) of the demo's fine-tuning stage."""
    from .demo.data import build_demo_data
    from .demo.recipes import recipe
    from .demo.run import run_demo
    from .demo.stages import ScaleRecorder, run_config
    from .train.run import build_trainer

    parts = run_demo(output / "prepare", quick=quick, cache=cache, prepare_only=True)
    settings = recipe(quick, torch.cuda.is_available(), steps)
    if interval is not None:
        settings = dataclasses.replace(settings, sgg={**settings.sgg, "recluster_interval": interval})
    data = build_demo_data(Path(parts["cache"]) / "demo-data", settings.data)  # as prepared: read back
    projector = Path(parts["projector"]) if parts["projector"] else None

    def build(name: str, run: str):
        cfg = run_config(settings, Path(parts["vision"]), Path(parts["language_model"]), data, output / run, name,
                         projector)
        trainer, _ = build_trainer(cfg)
        return trainer, [ScaleRecorder(trainer.model)]

    return settings.sgg, settings.batch_size, build


def _pipeline_builder(size: str, mode: str, steps: int, batch: int, interval: int, attn: str, workers: int,
                      device: torch.device, root: Path, seed: int):
    """(SGG settings, batch, build(name, run) -> (trainer, callbacks)) over `bench pipeline`'s parts and samples."""
    from .bench_pipeline import model_parts_and_samples, random_weights, run_config
    from .train.run import build_trainer

    model_section, data_section, _, _ = model_parts_and_samples(root, size, "mix", steps * batch, seed)
    cuda = device.type == "cuda"
    lora_r = 8 if size == "tiny" else 128
    sgg = {"n_clusters": 3, "recluster_interval": interval}

    def build(name: str, run: str):
        cfg = run_config(model_section, data_section, root / run, mode=mode, packing=True, optimizer=name,
                         batch=batch, max_steps=steps, gradient_checkpointing=size != "tiny", workers=workers,
                         attn=attn, lora_r=lora_r, lora_alpha=2 * lora_r, seed=seed, cuda=cuda)
        if name.endswith("_sgg"):
            cfg = dataclasses.replace(cfg, optimizer={**cfg.optimizer, **sgg})
        with random_weights(device):
            trainer, _ = build_trainer(cfg)
        return trainer, []

    return sgg, batch, build


def _builder(setup: str, steps: int | None, root: Path, *, quick: bool, cache: str | Path | None,
             recluster_interval: int | None, mode: str, batch: int, attn: str, workers: int, seed: int,
             device: torch.device):
    """(steps, SGG settings, batch, build(name, run) -> (trainer, callbacks)) of a setup, its files under ``root``."""
    if setup == "demo":
        from .demo.recipes import recipe

        steps = steps or recipe(quick, device.type == "cuda").steps
        return (steps, *_demo_builder(Path(cache) if cache else None, quick, steps, recluster_interval, root))
    steps = steps or 200
    return (steps, *_pipeline_builder(setup, mode, steps, batch, recluster_interval or 50, attn, workers, device,
                                      root, seed))


def _cold_run(setup: str, options: dict, name: str, run: str) -> dict:
    """One timed run in a process of its own (``run_whole(cold=True)`` spawns it with empty compile caches)."""
    # A spawned process inherits "spawn" as its start method, so its DataLoader workers would be spawned where
    # `llava-sgg train`'s are forked (on Linux): each re-imports everything and gets its batches' tensors over
    # file-descriptor passing. A cold run is to differ from a normal one in its caches only; and the 7B cold
    # runs, made with spawned workers, stalled in their first step (docs/performance.md).
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="llava-sgg-bench-run-") as tmp:
        _, sgg, _, build = _builder(setup, root=Path(tmp), device=device, **options)
        measured = time_run(lambda: build(name, run), device, sgg["recluster_interval"])
    return {**measured, "process": os.getpid(), "start_method": multiprocessing.get_start_method(),
            "triton_cache": os.environ.get("TRITON_CACHE_DIR"),
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


# Triton keeps compiled kernels in TRITON_CACHE_DIR; torch.compile (flex_attention's kernels among them) keeps its
# graphs and their kernels in TORCHINDUCTOR_CACHE_DIR. A cold run empties both, or the runs after the first of a
# call would find the first one's work and the order of the optimizers would decide who pays for compiling.
CACHE_VARIABLES = {"triton": "TRITON_CACHE_DIR", "inductor": "TORCHINDUCTOR_CACHE_DIR"}


def _in_fresh_process(caches: Path, fn, *args):
    """``fn(*args)`` in a new Python process whose Triton and inductor caches are empty folders under ``caches``."""
    before = {v: os.environ.get(v) for v in CACHE_VARIABLES.values()}
    for kind, variable in CACHE_VARIABLES.items():  # a spawned process starts with this environment
        os.environ[variable] = str(caches / kind)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        for variable, value in before.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value


def run_whole(*, setup: str = "demo", optimizers: list[str] = ("adamw", "adamw_sgg"), steps: int | None = None,
              repeats: int = 2, recluster_interval: int | None = None, mode: str = "lora", batch: int = 16,
              attn: str = "sdpa", workers: int = 4, cache: str | Path | None = None, quick: bool = False,
              profile: bool = False, device_profile_steps: int = 0, seed: int = 0, cold: bool = False,
              output: Path = Path("runs/bench")) -> dict:
    """Each optimizer's whole run, ``repeats`` times, alternating; prints a table, writes JSON."""
    if setup not in SETUPS:
        raise ValueError(f"unknown setup {setup!r}; choose one of {', '.join(SETUPS)}")
    from .optim.factory import OPTIMIZER_NAMES

    if repeats < 1 or (steps is not None and steps < 2) or (recluster_interval is not None and recluster_interval < 1):
        raise ValueError("--repeats and --recluster-interval must be >= 1, --steps >= 2")
    if device_profile_steps < 0 or (steps is not None and device_profile_steps >= steps):
        raise ValueError("--device-profile must be >= 0 and fewer than --steps")
    optimizers = list(optimizers)
    unknown = [name for name in optimizers if name not in OPTIMIZER_NAMES]
    if unknown or not optimizers:
        raise ValueError(f"unknown optimizer(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(OPTIMIZER_NAMES)}")
    base = optimizers[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setup != "demo" and device.type == "cpu" and attn not in ("sdpa", "eager"):
        raise ValueError(f"--attn {attn} on a CPU: use sdpa or eager")
    options = {"steps": steps, "quick": quick, "cache": cache, "recluster_interval": recluster_interval, "mode": mode,
               "batch": batch, "attn": attn, "workers": workers, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="llava-sgg-bench-run-") as tmp:
        root = Path(tmp)
        steps, sgg, batch, build = _builder(setup, root=root, device=device, **options)
        options["steps"] = steps
        interval = sgg["recluster_interval"]
        runs = []
        for i, name in enumerate(_order(optimizers, repeats)):
            print(f"run {i + 1}: {name}, {steps} steps{', in a new process, empty compile caches' if cold else ''}",
                  flush=True)
            if cold:
                measured = _in_fresh_process(root / f"caches-{i}", _cold_run, setup, options, name, f"run-{i}")
            else:
                measured = time_run(lambda name=name, i=i: build(name, f"run-{i}"), device, interval)
            runs.append({"optimizer": name, "position": i, **measured})
        profiles, device_profiles = {}, {}
        if profile:
            for name in optimizers:
                profiles[name] = time_run(lambda name=name: build(name, f"profile-{name}"), device, interval,
                                          profile=True)["profile"]
        for name in optimizers if device_profile_steps else ():
            device_profiles[name] = time_run(lambda name=name: build(name, f"device-profile-{name}"), device,
                                             interval, device_steps=device_profile_steps)
    rows = summarize(runs, optimizers, base)
    args = {"setup": setup, "optimizers": optimizers, "steps": steps, "repeats": repeats, "sgg": sgg,
            "batch": batch, "quick": quick, "mode": None if setup == "demo" else mode,
            "attn": None if setup == "demo" else attn, "seed": seed, "cold": cold}
    report = {"environment": environment(device), "args": args, "rows": rows, "runs": runs,
              "step_timing": "between consecutive on_step_end callbacks, synchronized; train_s: trainer.train()",
              "profiles": profiles, "device_profiles": device_profiles}
    _print(report)
    name = (f"run-{setup}{'-quick' if quick else ''}{'' if setup == 'demo' else '-' + mode}{'-cold' if cold else ''}"
            f"-{device.type}")
    _write(output / f"{name}.json", report)
    plot_step_times(runs, output / f"{name}.png", title=f"bench run: {setup}, re-clustering every {interval}")
    return report


def plot_step_times(runs: list[dict], path: Path, *, title: str) -> Path:
    """Every run's step times (from step 2), one line each: the re-clustering steps stand out."""
    from .plotting import plot_curves

    curves = {f"{r['optimizer']} (run {r['position'] + 1})": (list(range(2, len(r["step_times_s"]) + 2)),
                                                              [t * 1e3 for t in r["step_times_s"]]) for r in runs}
    path = plot_curves(curves, path, ylabel="step time, ms", title=title, linewidth=0.8, alpha=0.8)
    print(f"wrote {path}")
    return path


def summarize(runs: list[dict], optimizers: list[str], base: str) -> list[dict]:
    """Per optimizer: means over its runs, the ratio of its train_s to the base's, and where the difference went.

    Every run trains the same batches in the same order, so step n of one run is step n of another:
    ``excess_s`` splits the difference of the mean train_s into the first step (data loader start,
    first launches), the ordinary steps and the re-clustering steps (their summed times against the
    base's same steps), and the rest of ``trainer.train()`` (set-up before the first step, the end).
    """
    def mean(name, key):
        values = [r[key] for r in runs if r["optimizer"] == name and r[key] is not None]
        return statistics.mean(values) if values else None

    keys = ("train_s", "first_step_s", "ordinary_s", "recluster_s", "ordinary_step_s", "recluster_step_s_mean",
            "recluster_step_s_max", "first_recluster_s")
    rows = []
    for name in optimizers:
        mine = [r for r in runs if r["optimizer"] == name]
        rows.append({"optimizer": name, "runs": len(mine), **{k: mean(name, k) for k in keys},
                     "train_s_each": [r["train_s"] for r in mine],
                     "ordinary_steps": mine[0]["ordinary_steps"], "recluster_steps": mine[0]["recluster_steps"]})
    reference = next(r for r in rows if r["optimizer"] == base)
    for row in rows:
        row["x_base"] = row["train_s"] / reference["train_s"]
        parts = {key: row[key] - reference[key] for key in ("first_step_s", "ordinary_s", "recluster_s")}
        total = row["train_s"] - reference["train_s"]
        row["excess_s"] = {"total": total, "first_step": parts["first_step_s"], "ordinary_steps": parts["ordinary_s"],
                           "recluster_steps": parts["recluster_s"], "rest": total - sum(parts.values())}
    return rows


def _print(report: dict) -> None:
    a, env = report["args"], report["environment"]
    print(f"llava-sgg bench run: {a['setup']}{' (quick)' if a['quick'] else ''}, {a['steps']} steps, "
          f"{'each run in a new process with empty compile caches, ' if a.get('cold') else ''}"
          f"re-clustering every {a['sgg']['recluster_interval']}, {a['repeats']} run(s) each, on {env['device']}")
    print(f"{'':<36}{'median ms of a step':>22}   {'seconds over the base':>32}")
    print(f"{'optimizer':<14}{'train s':>9}{'x base':>8}{'':>5}{'ordinary':>10}{'re-clust.':>10}{'1st re-cl.':>11}"
          f"{'1st step':>10}{'ordinary':>10}{'re-clust.':>10}{'rest':>8}")
    for r in report["rows"]:
        ms = lambda v: v and v * 1e3  # noqa: E731
        e = r["excess_s"]
        print(f"{r['optimizer']:<14}{r['train_s']:>9.1f}{r['x_base']:>8.3f}{'':>5}{_fmt(ms(r['ordinary_step_s']), 10, 1)}"
              f"{_fmt(ms(r['recluster_step_s_mean']), 10, 1)}{_fmt(ms(r['first_recluster_s']), 11, 1)}"
              f"{e['first_step']:>10.2f}{e['ordinary_steps']:>10.2f}{e['recluster_steps']:>10.2f}{e['rest']:>8.2f}")
    for r in report["runs"]:
        if r.get("precompile"):
            p = r["precompile"]
            print(f"run {r['position'] + 1} ({r['optimizer']}): kernels compiled in the background in "
                  f"{p['seconds']:.2f} s ({p['pieces']} pieces); the first re-clustering waited {p['waited_s']:.2f} s"
                  + (f"; compiled later: {', '.join(p['compiled_later'])}" if p.get("compiled_later") else "")
                  + (f"; errors: {p['errors']}" if p["errors"] else ""))
    for name, text in report["profiles"].items():
        print(f"\nhost profile, {name}:\n" + "\n".join(text.splitlines()[:45]))
    for name, p in report["device_profiles"].items():
        busy = "" if "device_busy_s" not in p else \
            f", device busy {p['device_busy_s']:.3f} s ({p['device_busy_share']:.0%})"
        print(f"\ntorch.profiler, {name}, the last {p['steps']} steps: {p['wall_s']:.3f} s{busy}")
        print(p.get("device_table", p["host_table"]))
