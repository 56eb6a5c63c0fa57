"""The study's plots (PNG, written atomically), drawn from the per-method summaries of
:mod:`segmerge.study.report`:

- ``dice_per_region.png``: validation Dice of WT, TC, ET and their mean, grouped bars per method;
- ``robustness_subsets.png``: heatmap of mean Dice, methods x the 15 subsets of sequences;
- ``conflicts.png``: number of conflicting objective pairs (``conflict/n_pairs``) over training;
- ``ogr.png``: overfitting-to-generalisation ratio per head (``ogr/<head>``) over training, one
  panel per method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segmerge.conventions import REGIONS
from segmerge.study.report import History, MethodSummary

__all__ = [
    "PLOT_FILES",
    "plot_curves",
    "plot_dice_per_region",
    "plot_ogr",
    "plot_subset_heatmap",
    "write_plots",
]

PLOT_FILES: dict[str, str] = {
    "dice": "dice_per_region.png",
    "robustness": "robustness_subsets.png",
    "conflicts": "conflicts.png",
    "ogr": "ogr.png",
}
"""Plot kind -> file name inside ``<output>/plots``."""


def _plt() -> Any:
    # Agg selected when plotting only: importing segmerge.study leaves the user's backend alone
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    from segmerge.engine.plots import save_figure  # selects Agg on import: imported when plotting

    return save_figure(fig, path)


def plot_dice_per_region(summaries: Sequence[MethodSummary], path: str | Path) -> Path:
    """Grouped bars: validation Dice of WT, TC, ET and mean, one bar per method."""
    plt = _plt()
    ok = [s for s in summaries if s.evaluation is not None]
    groups = [*REGIONS, "mean"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(groups) * max(1, len(ok)) / 3, 3.6))
    width = 0.8 / max(1, len(ok))
    x = np.arange(len(groups))
    for i, s in enumerate(ok):
        values = [s.evaluation.full.dice[g] for g in groups]  # type: ignore[union-attr]
        ax.bar(x + (i - (len(ok) - 1) / 2) * width, values, width, label=s.method)
    ax.set_xticks(x, [g.upper() if g != "mean" else "mean" for g in groups])
    ax.set_ylim(0, 1)
    ax.set_ylabel("validation Dice")
    ax.set_title("Dice per region (all four sequences)")
    if ok:
        ax.legend(fontsize=8, ncol=min(3, len(ok)), loc="upper right")
    else:
        ax.text(0.5, 0.5, "no method finished", ha="center", transform=ax.transAxes)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_subset_heatmap(summaries: Sequence[MethodSummary], path: str | Path) -> Path:
    """Heatmap of mean Dice: methods (rows) x subsets of sequences (columns), annotated."""
    plt = _plt()
    ok = [s for s in summaries if s.evaluation is not None]
    subsets = list(ok[0].evaluation.subsets) if ok else []  # type: ignore[union-attr]
    values = np.full((max(1, len(ok)), max(1, len(subsets))), np.nan)
    for i, s in enumerate(ok):
        for j, name in enumerate(subsets):
            sub = s.evaluation.subsets.get(name)  # type: ignore[union-attr]
            if sub is not None:
                values[i, j] = sub.dice["mean"]
    fig, ax = plt.subplots(
        figsize=(2.0 + 0.75 * max(1, len(subsets)), 1.4 + 0.45 * max(1, len(ok)))
    )
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(ok)), [s.method for s in ok])
    ax.set_xticks(range(len(subsets)), subsets, rotation=60, ha="right", fontsize=7)
    for i in range(len(ok)):
        for j in range(len(subsets)):
            if np.isfinite(values[i, j]):
                color = "white" if values[i, j] < 0.6 else "black"
                ax.text(
                    j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6, color=color
                )
    ax.set_title("mean Dice per subset of input sequences")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    return _save(fig, path)


def plot_curves(series: Mapping[str, History], title: str, ylabel: str, path: str | Path) -> Path:
    """One line per name (e.g. per method) over training steps; a note if nothing was logged."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = 0
    for name, hist in series.items():
        if hist:
            steps, vals = zip(*hist)
            ax.plot(steps, vals, marker="o" if len(hist) < 12 else None, ms=3, label=name)
            drawn += 1
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "nothing logged", ha="center", transform=ax.transAxes)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_ogr(summaries: Sequence[MethodSummary], path: str | Path) -> Path:
    """OGR per head over training, one panel per method (``ogr/<head>`` histories)."""
    plt = _plt()
    n = max(1, len(summaries))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(summaries):
            ax.axis("off")
            continue
        s = summaries[k]
        heads = {key[4:]: h for key, h in sorted(s.histories.items()) if key.startswith("ogr/")}
        for head, hist in heads.items():
            if hist:
                steps, vals = zip(*hist)
                ax.plot(steps, vals, marker="o", ms=3, label=head)
        if any(heads.values()):
            ax.legend(fontsize=7)
        else:
            ax.text(
                0.5,
                0.5,
                "no OGR logged\n(needs two validations)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=8,
            )
        ax.set_title(s.method)
        ax.set_xlabel("training step")
        ax.set_ylabel("OGR (symlog)")
        # OGR is a ratio of loss changes: it spikes by orders of magnitude when a head's
        # generalisation change is near zero, which flattens every other curve on a linear axis.
        ax.set_yscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
    fig.suptitle("overfitting-to-generalisation ratio per head")
    fig.tight_layout()
    return _save(fig, path)


def write_plots(summaries: Sequence[MethodSummary], folder: str | Path) -> dict[str, Path]:
    """Write every plot of :data:`PLOT_FILES` into ``folder``; returns kind -> path."""
    folder = Path(folder)
    conflicts = {s.method: s.histories.get("conflict/n_pairs", []) for s in summaries}
    return {
        "dice": plot_dice_per_region(summaries, folder / PLOT_FILES["dice"]),
        "robustness": plot_subset_heatmap(summaries, folder / PLOT_FILES["robustness"]),
        "conflicts": plot_curves(
            conflicts,
            "conflicting objective pairs (interval mean)",
            "conflict/n_pairs",
            folder / PLOT_FILES["conflicts"],
        ),
        "ogr": plot_ogr(summaries, folder / PLOT_FILES["ogr"]),
    }
