"""Figures logged as MLflow artifacts (matplotlib, Agg backend, written atomically).

- :func:`matrix_heatmap`: a K x K matrix (cosines, conflict coefficients alpha) with the objective
  names on both axes;
- :func:`curves`: metric curves over training steps (OGR per head, weight per objective);
- :func:`validation_montage`: the four sequences, ground truth and prediction on the axial slice
  with the most tumour;
- :func:`matrix_artifacts`: the cosine / alpha matrices and weights of one validation interval as
  labelled heatmaps plus the numbers (JSON and CSV), for any number of objectives.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from segmerge.atomic import atomic_destination, write_text_atomic  # noqa: E402
from segmerge.conventions import MODALITIES, REGIONS  # noqa: E402

__all__ = ["matrix_heatmap", "matrix_artifacts", "curves", "validation_montage", "save_figure"]

CELL_TEXT_LIMIT = 20
"""Largest K whose heatmap cells carry their value as text (beyond, the JSON/CSV has them)."""


def save_figure(fig: matplotlib.figure.Figure, path: str | os.PathLike) -> Path:
    """Save a figure atomically (temporary file, then rename) and close it."""
    dest = Path(path)
    try:
        # matplotlib picks the format from the extension, so the temporary name keeps it
        with atomic_destination(dest, suffix=dest.suffix) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return dest


def matrix_heatmap(
    matrix: np.ndarray | torch.Tensor,
    names: Sequence[str],
    title: str,
    path: str | os.PathLike,
    vmin: float | None = -1.0,
    vmax: float | None = 1.0,
) -> Path:
    """Heatmap of a square matrix labelled with objective names, values written in the cells.

    Args:
        matrix: (K, K) values (NaN cells are left blank).
        names: the K objective names, rows and columns.
        title: figure title.
        path: PNG to write (atomically).
        vmin: colour range; with ``vmax`` both None the range is symmetric around 0.
        vmax: see ``vmin``.
    """
    mat = (
        torch.as_tensor(matrix).double().cpu().numpy()
        if not isinstance(matrix, np.ndarray)
        else matrix
    )
    k = len(names)
    if mat.shape != (k, k):
        raise ValueError(f"{title}: matrix of shape {mat.shape} for {k} names")
    if vmin is None and vmax is None:  # symmetric around 0 so the sign reads from the colour
        finite = np.abs(mat[np.isfinite(mat)])
        bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        vmin, vmax = -bound, bound
    # up to 20 rows at 0.75 in per cell; larger K (subset objectives) shrink to a 16 in figure
    cell = 0.75 if k <= CELL_TEXT_LIMIT else max(0.3, 16.0 / k)
    label_size = 8 if k <= CELL_TEXT_LIMIT else 6
    fig, ax = plt.subplots(figsize=(1.0 + cell * k + 1.5, 0.8 + cell * 0.87 * k + 1.5))
    im = ax.imshow(mat, cmap="RdBu_r", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=label_size)
    ax.set_yticks(range(k), names, fontsize=label_size)
    if k <= CELL_TEXT_LIMIT:
        for i in range(k):
            for j in range(k):
                if np.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path)


def curves(
    series: Mapping[str, Sequence[tuple[int, float]]],
    title: str,
    path: str | os.PathLike,
    ylabel: str = "",
) -> Path:
    """Line plot of several ``(step, value)`` series, one line per key."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in sorted(series.items()):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, ms=3, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if series:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def validation_montage(
    image: torch.Tensor,
    label: torch.Tensor,
    pred: torch.Tensor,
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Sequences, ground truth and prediction on the axial slice with the most whole tumour.

    Args:
        image: ``(4, H, W, D)`` in ``MODALITIES`` order.
        label: ``(3, H, W, D)`` region masks (``REGIONS`` order).
        pred: ``(3, H, W, D)`` predicted region masks.
        path: PNG to write.
        title: figure title.
    """
    img = torch.as_tensor(image).float().cpu()
    lab = torch.as_tensor(label).float().cpu()
    prd = torch.as_tensor(pred).float().cpu()
    z = int(lab[0].sum((0, 1)).argmax()) if lab[0].any() else img.shape[-1] // 2

    def regions_rgb(r: torch.Tensor) -> np.ndarray:
        # WT green, TC yellow, ET red (nested regions: later ones paint over earlier ones)
        rgb = np.zeros((*r.shape[1:3], 3), dtype=np.float32)
        colours = {"wt": (0.2, 0.8, 0.2), "tc": (1.0, 0.85, 0.1), "et": (0.9, 0.1, 0.1)}
        for c, name in enumerate(REGIONS):
            rgb[r[c, :, :, z].numpy() > 0.5] = colours[name]
        return np.rot90(rgb)

    fig, axes = plt.subplots(1, len(MODALITIES) + 2, figsize=(2.2 * (len(MODALITIES) + 2), 2.6))
    for ax, (c, name) in zip(axes, enumerate(MODALITIES)):
        ax.imshow(np.rot90(img[c, :, :, z].numpy()), cmap="gray")
        ax.set_title(name, fontsize=9)
    axes[-2].imshow(regions_rgb(lab))
    axes[-2].set_title("ground truth", fontsize=9)
    axes[-1].imshow(regions_rgb(prd))
    axes[-1].set_title("prediction", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(f"{title} (axial slice {z}; WT green, TC yellow, ET red)", fontsize=9)
    return save_figure(fig, path)


def _plain(values: torch.Tensor | np.ndarray) -> list:
    """Nested lists of floats with NaN written as None (valid JSON)."""
    arr = torch.as_tensor(values).double().cpu().tolist()

    def clean(x: object) -> object:
        if isinstance(x, list):
            return [clean(v) for v in x]
        return None if not math.isfinite(float(x)) else float(x)

    return clean(arr)  # type: ignore[return-value]


def _csv_matrix(names: Sequence[str], matrix: torch.Tensor) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["", *names])
    for name, row in zip(names, torch.as_tensor(matrix).double().tolist()):
        writer.writerow([name, *("" if not math.isfinite(v) else f"{v:.6g}" for v in row)])
    return out.getvalue()


def matrix_artifacts(
    window: Mapping[str, object], folder: str | os.PathLike, title: str = ""
) -> list[Path]:
    """Files for one validation interval: heatmaps and the numbers of its matrices.

    Args:
        window: :meth:`segmerge.engine.metrics_buffer.StepMetrics.take_window`'s dict
            (``names``, ``cosine`` (K, K), ``alpha`` (K, K), ``weights`` (K,)).
        folder: where to write ``cosine.png``, ``alpha.png``, ``matrices.json``,
            ``cosine.csv``, ``alpha.csv`` and ``weights.csv``.
        title: suffix of the figure titles (e.g. ``"epoch 4"``).

    Returns:
        The files written (none when the window holds no matrix).
    """
    names = list(window.get("names", []))  # type: ignore[call-overload]
    if not names:
        return []
    dest = Path(folder)
    dest.mkdir(parents=True, exist_ok=True)
    cos = window["cosine"]
    alpha = window["alpha"]
    weights = window["weights"]
    suffix = f" ({title})" if title else ""
    files = [
        matrix_heatmap(cos, names, f"cosine similarity{suffix}", dest / "cosine.png"),
        matrix_heatmap(
            alpha, names, f"conflict coefficients α{suffix}", dest / "alpha.png", None, None
        ),
    ]
    numbers = {
        "names": names,
        "cosine": _plain(cos),  # type: ignore[arg-type]
        "alpha": _plain(alpha),  # type: ignore[arg-type]
        "weights": _plain(weights),  # type: ignore[arg-type]
        "title": title,
    }
    for name, text in (
        ("matrices.json", json.dumps(numbers, indent=1)),
        ("cosine.csv", _csv_matrix(names, cos)),  # type: ignore[arg-type]
        ("alpha.csv", _csv_matrix(names, alpha)),  # type: ignore[arg-type]
        (
            "weights.csv",
            "objective,weight\n"
            + "".join(
                f"{n},{'' if v is None else f'{v:.6g}'}\n"
                for n, v in zip(names, _plain(weights))  # type: ignore[arg-type]
            ),
        ),
    ):
        write_text_atomic(dest / name, text)
        files.append(dest / name)
    return files
