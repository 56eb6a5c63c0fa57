"""The study's outputs: ``results.md`` (tables) and the plots beside it.

Everything here is a pure function of the per-method summaries (:class:`MethodSummary`) and the
metric histories read back from MLflow, so the report can be rebuilt from a finished study
folder without training anything.

Plots (PNG, written atomically):

- ``dice_per_region.png``: validation Dice of WT, TC, ET and their mean, grouped bars per method;
- ``robustness_subsets.png``: heatmap of mean Dice, methods x the 15 subsets of sequences;
- ``conflicts.png``: number of conflicting objective pairs (``conflict/n_pairs``) over training;
- ``ogr.png``: overfitting-to-generalisation ratio per head (``ogr/<head>``) over training, one
  panel per method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segmerge.conventions import REGIONS
from segmerge.study.evaluation import ALL_SEQUENCES, T1CE_MISSING, EvaluationResult

__all__ = [
    "MethodSummary",
    "History",
    "PLOT_FILES",
    "results_markdown",
    "plot_dice_per_region",
    "plot_subset_heatmap",
    "plot_curves",
    "plot_ogr",
    "write_plots",
]

History = list[tuple[int, float]]
"""``(step, value)`` pairs of one metric, ordered by step."""

PLOT_FILES: dict[str, str] = {
    "dice": "dice_per_region.png",
    "robustness": "robustness_subsets.png",
    "conflicts": "conflicts.png",
    "ogr": "ogr.png",
}
"""Plot kind -> file name inside ``<output>/plots``."""


@dataclass
class MethodSummary:
    """What the report needs about one method.

    Attributes:
        method: aggregator name (also the MLflow run name).
        status: ``"ok"`` or ``"failed"``.
        run_id: MLflow run id (``None`` if training never started a run).
        evaluation: scores per subset (``None`` if it failed before evaluation).
        train_seconds: wall time of the training subprocess(es).
        eval_seconds: wall time of the evaluation.
        steps_per_second: mean of the run's ``perf/steps_per_second`` history.
        error: what went wrong (failed methods).
        histories: metric key -> history (``conflict/n_pairs``, ``ogr/<head>``).
    """

    method: str
    status: str = "ok"
    run_id: str | None = None
    evaluation: EvaluationResult | None = None
    train_seconds: float = float("nan")
    eval_seconds: float = float("nan")
    steps_per_second: float = float("nan")
    error: str | None = None
    histories: dict[str, History] = field(default_factory=dict)


def fmt(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or an en dash when it is missing or not finite."""
    return (
        f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"
    )


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1) -> list[str]:
    """Lines of a markdown table; columns from ``right_from`` on are right-aligned (numbers)."""
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def results_markdown(
    summaries: Sequence[MethodSummary],
    meta: Mapping[str, Any],
    plots: Mapping[str, str] | None = None,
) -> str:
    """The text of ``results.md``.

    Args:
        summaries: one per method, in the study's order.
        meta: ``study_id``, ``command``, ``budget``, ``seed``, ``data``, ``machine``,
            ``experiment``, ``tracking_uri``, ``n_cases`` (shown in the header).
        plots: plot kind -> path relative to ``results.md`` (see :data:`PLOT_FILES`).
    """
    ok = [s for s in summaries if s.evaluation is not None]
    lines = [f"# Aggregator comparison — study `{meta.get('study_id', '?')}`", ""]
    lines += [
        f"- command: `{meta.get('command', '')}`",
        f"- budget: `{meta.get('budget', '')}`; seed {meta.get('seed', '')}; "
        f"data: `{meta.get('data', '')}` ({meta.get('n_cases', '?')} validation case(s))",
        f"- machine: {meta.get('machine', '')}",
        f"- MLflow: experiment `{meta.get('experiment', '')}` in `{meta.get('tracking_uri', '')}` "
        f"(run names = method names, tag `segmerge.study={meta.get('study_id', '')}`)",
        "",
        "Same data, seed, network and budget for every method; scores are means over the "
        "validation cases. HD95 in mm (0 when prediction and truth are both empty, 373.13 when "
        "exactly one is).",
        "",
        "## Validation (all four sequences)",
        "",
    ]
    header = ["method"] + [f"Dice {r.upper()}" for r in REGIONS] + ["Dice mean"]
    header += [f"HD95 {r.upper()}" for r in REGIONS] + ["HD95 mean", "steps/s", "train s"]
    rows = []
    for s in ok:
        full = s.evaluation.full  # type: ignore[union-attr]
        row = [s.method] + [fmt(full.dice[r]) for r in (*REGIONS, "mean")]
        row += [fmt(full.hd95[r], 2) for r in (*REGIONS, "mean")]
        row += [fmt(s.steps_per_second, 2), fmt(s.train_seconds, 0)]
        rows.append(row)
    lines += md_table(header, rows) if rows else ["(no method finished)"]
    lines += ["", "## Robustness to missing sequences (mean Dice over WT, TC, ET)", ""]
    header = [
        "method",
        "mean over 15 subsets",
        "worst subset",
        "worst Dice",
        f"T1ce missing ({T1CE_MISSING})",
        f"all four ({ALL_SEQUENCES})",
    ]
    rows = []
    for s in ok:
        ev: EvaluationResult = s.evaluation  # type: ignore[assignment]
        rob = ev.robustness()
        t1ce = ev.subsets.get(T1CE_MISSING)
        rows.append(
            [
                s.method,
                fmt(rob["dice_mean_over_subsets"]),
                rob["worst_subset"] or "–",
                fmt(rob["worst_dice"]),
                fmt(t1ce.dice["mean"]) if t1ce else "–",
                fmt(ev.full.dice["mean"]),
            ]
        )
    lines += md_table(header, rows) if rows else ["(no method finished)"]
    if ok:
        subsets = list(ok[0].evaluation.subsets)  # type: ignore[union-attr]
        lines += ["", "### Mean Dice per subset", ""]
        header = ["sequences"] + [s.method for s in ok]
        rows = []
        for name in subsets:
            cells = [name]
            for s in ok:
                sub = s.evaluation.subsets.get(name)  # type: ignore[union-attr]
                cells.append(fmt(sub.dice["mean"]) if sub else "–")
            rows.append(cells)
        lines += md_table(header, rows)
    lines += ["", "## Gradient conflicts and OGR over training", ""]
    header = ["method", "conflicting pairs (mean)", "conflicting pairs (last)", "OGR heads (last)"]
    rows = []
    for s in summaries:
        conf = [v for _, v in s.histories.get("conflict/n_pairs", [])]
        ogr = {
            k[4:]: h[-1][1] for k, h in sorted(s.histories.items()) if k.startswith("ogr/") and h
        }
        ogr_text = ", ".join(f"{k} {fmt(v, 2)}" for k, v in ogr.items()) or "–"
        rows.append(
            [
                s.method,
                fmt(float(np.mean(conf)), 2) if conf else "–",
                fmt(conf[-1], 2) if conf else "–",
                ogr_text,
            ]
        )
    lines += md_table(header, rows, right_from=1)
    failed = [s for s in summaries if s.status != "ok"]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- **{s.method}**: {s.error}" for s in failed]
    if plots:
        lines += ["", "## Plots", ""]
        titles = {
            "dice": "Dice per region",
            "robustness": "Robustness across subsets of sequences",
            "conflicts": "Conflicting pairs over training",
            "ogr": "OGR over training",
        }
        for kind, rel in plots.items():
            lines += [f"![{titles.get(kind, kind)}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    from segmerge.engine.plots import save_figure

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
        ax.set_ylabel("OGR")
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
