"""The demo's report: the table against the baselines, the verdict, the plots and report.md."""

from __future__ import annotations

from pathlib import Path

from ..plotting import plot_curves, pyplot, save
from .recipes import GPU_STEPS, DemoSettings, bf16

METRICS = [  # (benchmark, label, how to read it from the scorer's metrics; all in percent)
    ("pope", "POPE F1", lambda m: 100 * m["f1_average"]),
    ("pope", "POPE acc", lambda m: 100 * m["accuracy_average"]),
    ("gqa", "GQA acc", lambda m: m["accuracy"]),
    ("mmbench", "MMBench circular", lambda m: m["circular_accuracy"]),
    ("mmbench", "MMBench 1-round", lambda m: m["single_round_accuracy"]),
    ("mme", "MME perception /400", lambda m: m["perception"]),
]


def table_rows(scores: dict[str, dict[str, dict]]) -> list[tuple[str, list[float]]]:
    return [(name, [read(metrics[bench]) for bench, _, read in METRICS]) for name, metrics in scores.items()]


def shortfalls(rows) -> dict[str, list[str]]:
    """For each trained model, the metrics where it does not beat the better of the chance and majority rows."""
    table = dict(rows)
    best = [max(a, b) for a, b in zip(table["chance"], table["majority"])]
    return {name: [f"{label} ({value:.1f} vs {baseline:.1f})"
                   for (_, label, _), value, baseline in zip(METRICS, values, best) if value <= baseline]
            for name, values in rows if name not in ("chance", "majority")}


def verdict(rows, steps: int) -> list[str]:
    """One line per trained model: does it beat both baselines everywhere, and if not, where not and why."""
    missed_by = shortfalls(rows)
    lines = [f"{name}: beats chance and majority on every metric." if not missed else
             f"{name}: does not beat the better baseline on {', '.join(missed)}." for name, missed in missed_by.items()]
    if any(missed_by.values()) and steps < GPU_STEPS:
        lines.append(f"{steps} steps are too few for the questions that name a digit to find (POPE, MME, "
                     f"MMBench): they are learned after about 1000 steps (README, \"The demo\"). "
                     f"`llava-sgg demo --steps {GPU_STEPS}` runs the GPU recipe here.")
    return lines


def format_table(rows) -> str:
    header = f"{'':<12}" + "".join(f"{label:>21}" for _, label, _ in METRICS)
    lines = [header] + [f"{name:<12}" + "".join(f"{v:>21.1f}" for v in values) for name, values in rows]
    return "\n".join(lines)


def plot_report(runs: dict[str, dict], output: Path) -> list[Path]:
    plt = pyplot()
    curves = {name: (range(1, len(run["losses"]) + 1), run["losses"]) for name, run in runs.items()}
    paths = [plot_curves(curves, output / "loss_curves.png", ylabel="training loss",
                         title="Demo fine-tuning: AdamW vs AdamW+SGG")]

    scales = {name: run["scales"] for name, run in runs.items() if run["scales"]}
    for name, history in scales.items():
        k = len(next(iter(history.values()))[0][1])
        fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 3.6), squeeze=False, sharey=True)
        for c, ax in enumerate(axes[0]):
            for layer, series in history.items():
                ax.plot([step for step, _ in series], [scales[c] for _, scales in series], marker=".",
                        linewidth=0.7, alpha=0.6)
            ax.set(xlabel="step", title=f"cluster {c} (id order = |momentum| order)", yscale="log")
        axes[0][0].set_ylabel(f"scale, one line per layer ({len(history)} layers)")
        fig.suptitle(f"{name}: SGG cluster scales over training")
        paths.append(save(fig, output / f"cluster_scales_{name}.png"))
    return paths


def write_report(output: Path, settings: DemoSettings, rows, runs, seconds: float, device: str, plots,
                 tower_report: dict | None = None, alignment_report: dict | None = None,
                 seconds_per_step: float | None = None, eval_seconds: float | None = None) -> Path:
    if tower_report is None:
        tower = "trained here from its random initialisation along with the connector"
    else:
        tower = (f"pretrained here for {settings.tower.steps} steps on the training scenes to classify each patch "
                 f"token's digit, the scene's digits and the token's place (patch accuracy on the evaluation scenes "
                 f"{100 * tower_report['eval_patch_accuracy']:.1f}%), then frozen as LLaVA-v1.5 freezes CLIP")
    lines = [
        "# llava-sgg demo report", "",
        f"Device: {device}. Wall time: {seconds:.0f} s.", "",
        f"Model: CLIP ViT built from config (no pretrained CLIP can be installed offline; {tower}), "
        "`mlp2x_gelu` connector, decoder SmolLM2-135M-Instruct"
        + (f" (its first {settings.decoder_layers} of 30 decoder layers)" if settings.decoder_layers else "")
        + f". Mode {settings.mode}; both runs start from the same weights and see the same batches.", "",
        f"Data: {settings.data.train_scenes} training scenes, {settings.data.eval_scenes} evaluation scenes of "
        "scikit-learn handwritten digits (disjoint source scans), evaluation files in the official POPE, GQA, "
        "MMBench (circular, all option rotations) and MME formats, scored by `llava-sgg score`.", "",
        (f"Connector aligned to the decoder's word embeddings of each patch's digit and place "
         f"({settings.alignment.steps} steps; on the evaluation scenes "
         f"{100 * alignment_report['eval_nearest_accuracy']:.1f}% of patch tokens land nearest their own words)."
         if alignment_report else "No alignment: stage 1 starts from a random connector."), "",
        (f"Stage 1 (shared by both runs): the connector alone on the training scenes' captions (template "
         f"plain), {settings.connector.steps} steps, batch {settings.connector.batch_size}, lr "
         f"{settings.connector.lr}." if settings.connector else "No captions stage."), "",
        f"Stage 2: {settings.steps} steps, batch {settings.batch_size}, lr {settings.lr} "
        f"(connector {settings.mm_projector_lr}), cosine, warmup 3%, {'bf16' if bf16(settings) else 'float32'}; "
        f"SGG {settings.sgg}"
        + (" (the paper's rule; docs/evidence.md compares it with the authors' mean_ratio, which acts as a "
           "stepwise learning-rate decay on this task)." if settings.sgg.get("rule", "mda") == "mda" else ".")
        + (f" Steps planned from a measured {seconds_per_step:.2f} s per step"
           + (f" and an estimated {eval_seconds:.0f} s per evaluation" if eval_seconds else "")
           + f" to end within {settings.time_budget:.0f} s." if seconds_per_step else ""), "",
        "| | " + " | ".join(label for _, label, _ in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |" for name, values in rows]
    lines += [""] + verdict(rows, settings.steps)
    lines += ["", "Training time per run: " + ", ".join(f"{n} {r['train_seconds']:.0f} s" for n, r in runs.items()),
              ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = output / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
