"""Accuracy-vs-latency plots with the Pareto frontier marked (matplotlib, written as PNG).

The frontier is the set of models no other model beats on both axes: nothing is at least as fast
and at least as accurate, and strictly better on one of the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class ParetoPoint:
    label: str
    p50_ms: float
    top1: float  # fraction, 0..1
    baseline: bool = False


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (latency, accuracy) pairs: True where no other pair is as fast and as accurate and
    strictly better in one (lower latency is better, higher accuracy is better). Ties stay on it."""
    front = []
    for i, (lat_i, acc_i) in enumerate(points):
        dominated = any(
            lat_j <= lat_i and acc_j >= acc_i and (lat_j < lat_i or acc_j > acc_i)
            for j, (lat_j, acc_j) in enumerate(points)
            if j != i
        )
        front.append(not dominated)
    return front


def pareto_figure(points: Sequence[ParetoPoint], title: str) -> tuple[Figure, list[bool]]:
    """Scatter top-1 against p50 latency, draw the frontier as a step line through its points and
    label every point (its `label`: a sweep variant's settings, e.g. `target_macs=0.5`). Returns
    the figure and the frontier flags, in the order of `points`."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    front = pareto_front([(p.p50_ms, p.top1) for p in points])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    on = sorted((p for p, f in zip(points, front, strict=True) if f), key=lambda p: p.p50_ms)
    if len(on) > 1:
        ax.step(
            [p.p50_ms for p in on],
            [100 * p.top1 for p in on],
            where="post",
            color="tab:orange",
            alpha=0.6,
            label="Pareto frontier",
        )
    for point, is_front in zip(points, front, strict=True):
        color = "tab:gray" if point.baseline else "tab:orange" if is_front else "tab:blue"
        ax.scatter(
            [point.p50_ms],
            [100 * point.top1],
            s=60 if is_front else 30,
            zorder=3,
            marker="s" if point.baseline else "o",
            color=color,
        )
        ax.annotate(
            point.label,
            (point.p50_ms, 100 * point.top1),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xlabel("p50 latency, batch 1 (ms)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(on) > 1:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig, front


def plot_pareto(points: Sequence[ParetoPoint], path: Path, title: str) -> list[bool]:
    """pareto_figure written as a PNG, atomically. Returns the frontier flags, in the order of `points`."""
    from vitcompress.fileio import atomic_path

    fig, front = pareto_figure(points, title)
    import matplotlib.pyplot as plt  # after pareto_figure chose the Agg backend

    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return front
