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
