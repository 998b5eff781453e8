"""``llava-sgg report STUDY``: a study folder as markdown tables and plots.

Runs that differ only in their ``seed`` form one variant. For each metric of the runs' results, a
table gives every variant's mean ± standard deviation over its seeds (sample std, ddof=1) and, when
the plan names a baseline (``compare.baseline``), its difference from its baseline's mean with the
two-sided p-value of Welch's t-test (unequal variances) on the two sets of seeds. A variant's
baseline is the variant with the baseline's values and the variant's own other values: with
``baseline: {sgg: none}``, ``optimizer=lamb, sgg=mda, lr_scale=3`` is compared with
``optimizer=lamb, sgg=none, lr_scale=3``. The verdict says
"better" or "worse" (by ``compare.metrics``' direction) only when p < 0.05, "no difference beyond
seed spread" otherwise, and "too few seeds" below two a side: with three seeds only large, steady
differences pass, which is the honest reading of a small study.

The report opens with one summary table (every metric, each variant marked where its verdict is
better or worse), then the plan's contrasts (``compare.contrasts``: each variant that has a contrast's
``variant`` values against the variant with its ``against`` values and the same other values, by the
same test), then a table per metric.

Plots (PNG, beside the markdown): each curve of the results (``"curves": {name: [[step, value], ...]}``)
as the mean over seeds with a ±1 std band per variant (on a log axis, when the values span more than
two decades, the seeds' min-to-max band; curves of more than 200 points as running means over 1% of
them), SGG's scale trajectories among them when the runs record them; and when the grid varies a
learning rate (a grid key starting with ``lr``), each metric against it on a log axis, failed
(diverged) runs marked with a cross.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from ..plotting import pyplot, save
from .runner import Plan, read_record

__all__ = ["ALPHA", "baseline_of", "compare", "load_study", "variants", "write_report"]

ALPHA = 0.05
SEED = "seed"


def load_study(study_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(the plan as the study folder keeps it, every run's record, in folder order)."""
    study_dir = Path(study_dir)
    plan_path = study_dir / "plan.yaml"
    if not plan_path.is_file():
        raise FileNotFoundError(f"{study_dir}: no plan.yaml; is this a folder `llava-sgg study` wrote?")
    plan = yaml.safe_load(plan_path.read_text())
    records = [r for r in (read_record(p) for p in sorted((study_dir / "runs").glob("*/record.json"))) if r]
    return plan, records


def variants(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records grouped by their values other than ``seed`` (a key: tuple of (name, value) pairs)."""
    groups = defaultdict(list)
    for record in records:
        groups[tuple((k, v) for k, v in record["values"].items() if k != SEED)].append(record)
    return dict(groups)


def _label(variant: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in variant) or "(all runs)"


def compare(values: list[float], baseline: list[float], better: str | None) -> tuple[float | None, str]:
    """(Welch's two-sided p-value, verdict) of ``values`` against ``baseline``."""
    from scipy import stats

    if len(values) < 2 or len(baseline) < 2:
        return None, "too few seeds"
    if np.std(values) == 0 and np.std(baseline) == 0:
        p = 1.0 if np.mean(values) == np.mean(baseline) else 0.0
    else:
        p = float(stats.ttest_ind(values, baseline, equal_var=False).pvalue)
    if p >= ALPHA:
        return p, "no difference beyond seed spread"
    higher = np.mean(values) > np.mean(baseline)
    if better is None:
        return p, "higher" if higher else "lower"
    return p, "better" if higher == (better == "higher") else "worse"


def _metric_values(records: list[dict], metric: str) -> list[float]:
    out = []
    for r in records:
        value = r.get("result", {}).get("metrics", {}).get(metric) if r["status"] == "finished" else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.append(float(value))
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def baseline_of(variant: tuple, baseline: dict | None) -> tuple | None:
    """The variant ``variant`` is compared with: the baseline's values, ``variant``'s other values."""
    if not baseline:
        return None
    return tuple((k, baseline.get(k, v)) for k, v in variant)


def _table(metric: str, groups: dict, baseline: dict | None, better: str | None) -> list[str]:
    lines = [f"### {metric}" + (f" ({better} is better)" if better else ""), "",
             "| variant | seeds | mean ± std | Δ vs baseline | p (Welch) | verdict |", "|---|---|---|---|---|---|"]
    for variant, records in groups.items():
        reference = baseline_of(variant, baseline)
        base = _metric_values(groups[reference], metric) if reference in groups else []
        values = _metric_values(records, metric)
        failed = sum(r["status"] == "failed" for r in records)
        seeds = f"{len(values)}" + (f" (+{failed} failed)" if failed else "")
        if not values:
            lines.append(f"| {_label(variant)} | {seeds} | — | — | — | no result |")
            continue
        spread = _spread(values)
        if variant == reference:
            lines.append(f"| **{_label(variant)}** (baseline) | {seeds} | {spread} | — | — | — |")
        elif base:
            p, verdict = compare(values, base, better)
            lines.append(f"| {_label(variant)} | {seeds} | {spread} | {np.mean(values) - np.mean(base):+.4g} | "
                         f"{_p(p)} | {verdict} |")
        else:
            lines.append(f"| {_label(variant)} | {seeds} | {spread} | — | — | — |")
    return lines + [""]


def _contrasts(metrics: list[str], groups: dict, contrasts: list[dict], directions: dict) -> list[str]:
    lines = []
    for contrast in contrasts:
        lines += [f"### {contrast['name']}", ""]
        pairs = [(variant, baseline_of(variant, contrast["against"])) for variant in groups
                 if all(dict(variant).get(k) == v for k, v in contrast["variant"].items())]
        pairs = [(variant, reference) for variant, reference in pairs if reference in groups and reference != variant]
        for variant, reference in pairs:
            lines += [f"`{_label(variant)}` against `{_label(reference)}`:", "",
                      "| metric | variant: mean ± std | against: mean ± std | Δ | p (Welch) | verdict |",
                      "|---|---|---|---|---|---|"]
            for metric in metrics:
                values, base = _metric_values(groups[variant], metric), _metric_values(groups[reference], metric)
                if values and base:
                    p, verdict = compare(values, base, directions.get(metric))
                    lines.append(f"| {metric} | {_spread(values)} | {_spread(base)} | "
                                 f"{np.mean(values) - np.mean(base):+.4g} | {_p(p)} | {verdict} |")
            lines.append("")
        if not pairs:
            lines += ["No finished pair yet.", ""]
    return lines


def _spread(values: list[float]) -> str:
    return f"{_fmt(np.mean(values))} ± {_fmt(np.std(values, ddof=1)) if len(values) > 1 else '—'}"


def _p(p: float | None) -> str:
    return "—" if p is None else "< 0.001" if p < 0.001 else f"{p:.3f}"


def _summary(metrics: list[str], groups: dict, baseline: dict | None, directions: dict) -> list[str]:
    """One table of every metric: mean ± std per variant, marked where its baseline comparison is a verdict."""
    marks = {"better": " ▲", "worse": " ▼", "higher": " ↑", "lower": " ↓"}
    lines = ["| variant | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for variant, records in groups.items():
        reference = baseline_of(variant, baseline)
        cells = []
        for metric in metrics:
            values = _metric_values(records, metric)
            if not values:
                cells.append("—")
                continue
            cell = _fmt(np.mean(values)) + (f" ± {_fmt(np.std(values, ddof=1))}" if len(values) > 1 else "")
            if reference in groups and reference != variant:
                _, verdict = compare(values, _metric_values(groups[reference], metric), directions.get(metric))
                cell += marks.get(verdict, "")
            cells.append(cell)
        finished = sum(r["status"] == "finished" for r in records)
        failed = len(records) - finished
        name = f"**{_label(variant)}**" if reference == variant else _label(variant)
        lines.append(f"| {name} | {finished}" + (f" (+{failed} failed)" if failed else "") + " | "
                     + " | ".join(cells) + " |")
    return lines + ["", "Bold: a baseline. ▲ / ▼: better / worse than its baseline at p < "
                    f"{ALPHA} (Welch); unmarked: no difference beyond seed spread (or too few seeds).", ""]


def _curve_plots(groups: dict, plots: Path) -> list[Path]:
    plt = pyplot()
    names = sorted({n for rs in groups.values() for r in rs if r["status"] == "finished"
                    for n in r.get("result", {}).get("curves", {})})
    written = []
    for name in names:
        drawn = []  # (variant, steps, seeds x steps)
        for variant, records in groups.items():
            curves = [np.asarray(r["result"]["curves"][name], float) for r in records
                      if r["status"] == "finished" and r.get("result", {}).get("curves", {}).get(name)]
            if curves:
                steps = curves[0][:, 0]  # the other seeds are read at the first seed's steps
                drawn.append((variant, steps, np.stack([np.interp(steps, c[:, 0], c[:, 1]) for c in curves])))
        if not drawn:
            continue
        low = min(float(np.nanmin(ys)) for _, _, ys in drawn)
        high = max(float(np.nanmax(ys)) for _, _, ys in drawn)
        log = low > 0 and high / low > 100  # a loss falling by decades: a linear axis shows only its first steps
        window = max(1, max(len(steps) for _, steps, _ in drawn) // 100)  # per-step curves: a running mean
        # More lines than tab10's colours would repeat them; tab20 (paired shades) keeps them apart.
        colours = plt.get_cmap("tab20" if len(drawn) > 10 else "tab10").colors
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for colour, (variant, steps, ys) in zip(colours, drawn):
            if window > 1 and len(steps) > window:
                kernel = np.ones(window) / window
                ys = np.stack([np.convolve(y, kernel, mode="valid") for y in ys])
                steps = steps[window - 1:]
            mean = ys.mean(0)
            (line,) = ax.plot(steps, mean, label=f"{_label(variant)} (n={len(ys)})", color=colour, lw=1)
            if len(ys) > 1:
                # On a log axis mean - std can fall below zero; the seeds' own range stays positive.
                std = ys.std(0, ddof=1)
                lo, hi = (ys.min(0), ys.max(0)) if log else (mean - std, mean + std)
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
        if log:
            ax.set_yscale("log")
        band = "seeds' min to max" if log else "±1 std"
        ax.set(xlabel="step", ylabel=name,
               title=f"{name}: mean over seeds, band {band}" + (f", running mean of {window} points" if window > 1
                                                                else ""))
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        written.append(save(fig, plots / f"curve-{_slug(name)}.png"))
    return written


def _lr_plots(records: list[dict], metrics: list[str], lr_key: str, plots: Path) -> list[Path]:
    plt = pyplot()
    others = defaultdict(list)  # variant without lr and seed -> records
    for r in records:
        others[tuple((k, v) for k, v in r["values"].items() if k not in (SEED, lr_key))].append(r)
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        drawn = 0
        for variant, rs in others.items():
            lrs = sorted({r["values"][lr_key] for r in rs})
            if len(lrs) < 2:  # a variant the plan runs at one learning rate only
                continue
            means, stds, failed = [], [], []
            for lr in lrs:
                at = [r for r in rs if r["values"][lr_key] == lr]
                values = _metric_values(at, metric)
                means.append(np.mean(values) if values else np.nan)
                stds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
                failed.append(any(r["status"] == "failed" for r in at))
            drawn += 1
            line = ax.errorbar(lrs, means, yerr=stds, marker="o", capsize=3, label=_label(variant))
            top = np.nanmax(means) if np.isfinite(means).any() else 0.0
            for lr, bad in zip(lrs, failed):
                if bad:
                    ax.plot([lr], [top], marker="x", markersize=10, color=line[0].get_color())
        if not drawn:  # no variant has finished runs at two learning rates yet
            plt.close(fig)
            continue
        ax.set(xscale="log", xlabel=lr_key, ylabel=metric,
               title=f"{metric} against {lr_key} (mean ± std; x: a run failed or diverged)")
        ax.legend(fontsize=7)
        written.append(save(fig, plots / f"lr-{_slug(metric)}.png"))
    return written


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_report(study_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``report.md`` (or ``out``) and its plots (``plots/`` beside it); returns the markdown's path."""
    study_dir = Path(study_dir)
    plan, records = load_study(study_dir)
    out = Path(out) if out is not None else study_dir / "report.md"
    plots = out.parent / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    compare_spec = plan.get("compare") or {}
    directions = compare_spec.get("metrics") or {}
    groups = variants(records)
    baseline = compare_spec.get("baseline")
    metrics = list(directions) + sorted({m for r in records if r["status"] == "finished"
                                         for m in r.get("result", {}).get("metrics", {})} - set(directions))
    finished = sum(r["status"] == "finished" for r in records)
    study = Plan(plan["name"], plan["command"], plan["grid"], plan.get("fixed") or {}, compare_spec)
    planned = len(study.runs(study_dir))
    grids = study.grids
    described = " + ".join("; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in grid.items()) for grid in grids)
    lines = [f"# Study: {plan['name']}", "",
             f"{planned} runs planned, {finished} finished, {len(records) - finished} failed, "
             f"{planned - len(records)} not run. Command: `{' '.join(plan['command'])}`; grid: " + described
             + (f"; fixed: {', '.join(f'{k}={v}' for k, v in plan.get('fixed', {}).items())}" if plan.get("fixed")
                else "") + ".", "",
             f"Each row is a variant's runs over its seeds: mean ± sample std. Against the baseline, Welch's "
             f"two-sided t-test on the seeds; a difference is called better or worse only at p < {ALPHA}.", ""]
    lines += ["## Summary", ""] + _summary(metrics, groups, baseline, directions)
    if compare_spec.get("contrasts"):
        lines += ["## Contrasts", ""] + _contrasts(metrics, groups, compare_spec["contrasts"], directions)
    lines += ["## Per metric", ""]
    for metric in metrics:
        lines += _table(metric, groups, baseline, directions.get(metric))
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        lines += ["### Failed runs", ""]
        for r in failed:
            last = (r.get("error") or "").strip().splitlines()[-1:] or [""]
            lines.append(f"- `{r['key']}` (exit {r['returncode']}): {last[0][:200]}")
        lines.append("")
    images = _curve_plots(groups, plots)
    lr_key = next((k for k in grids[0] if k.startswith("lr")), None)
    if lr_key is not None and len({str(v) for grid in grids for v in grid[lr_key]}) > 1:
        images += _lr_plots(records, metrics, lr_key, plots)
    if images:
        lines += ["### Plots", ""] + [f"![{p.stem}]({p.relative_to(out.parent)})" for p in images] + [""]
    out.write_text("\n".join(lines))
    return out
