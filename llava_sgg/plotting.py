"""The one place that draws loss curves and saves figures (training outputs, the demo, the SGG example)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, *, ylabel: str, title: str,
                log: bool = True, size: tuple[float, float] = (6.4, 4), **line) -> Path:
    """One line per ``label: (x, y)``, a legend when there are several; ``line`` goes to every ``ax.plot``.

    A callable ``linestyle`` is called with the label.
    """
    fig, ax = pyplot().subplots(figsize=size)
    for label, (x, y) in curves.items():
        style = {k: (v(label) if callable(v) else v) for k, v in line.items()}
        ax.plot(x, y, label=label, **style)
    ax.set(xlabel="step", ylabel=ylabel, title=title, yscale="log" if log else "linear")
    if len(curves) > 1:
        ax.legend()
    return save(fig, path)


def plot_sgg_scales(history: Sequence[dict], path: Path, *, title: str) -> Path | None:
    """SGG's cluster scales over training from logged rows (``step`` and ``sgg/scale_{min,median,max}/c``,
    as :meth:`llava_sgg.optim.SGG.summary` gives them): per cluster the median over layers, with the
    band from the smallest to the largest layer's scale. None when no row has them."""
    rows = [row for row in history if "sgg/scale_median/0" in row]
    if not rows:
        return None
    fig, ax = pyplot().subplots(figsize=(6.4, 4))
    clusters = sorted(int(key.rsplit("/", 1)[1]) for key in rows[-1] if key.startswith("sgg/scale_median/"))
    steps = [row["step"] for row in rows]
    for c in clusters:
        (line,) = ax.plot(steps, [row[f"sgg/scale_median/{c}"] for row in rows], marker=".", label=f"cluster {c}")
        ax.fill_between(steps, [row[f"sgg/scale_min/{c}"] for row in rows], [row[f"sgg/scale_max/{c}"] for row in rows],
                        color=line.get_color(), alpha=0.2)
    ax.set(xlabel="step", ylabel="scale (median over layers; band: min to max)", title=title, yscale="log")
    ax.legend()
    return save(fig, path)
