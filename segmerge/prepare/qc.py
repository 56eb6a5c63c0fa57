"""Quality control: the per-case JSON report and a montage of the prepared sequences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from segmerge.atomic import atomic_destination, write_text_atomic


def write_report(path: Path, report: dict) -> Path:
    """Write the QC report as indented JSON (atomically)."""
    return write_text_atomic(path, json.dumps(report, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_montage(path: Path, images: dict[str, np.ndarray], mask: np.ndarray, title: str) -> Path:
    """PNG montage: one column per sequence, axial/coronal/sagittal rows through the brain centre.

    Args:
        path: destination ``.png``.
        images: ``{name: array (z, y, x)}`` on one grid (SimpleITK's array order).
        mask: brain mask on that grid, drawn as a red contour.
        title: figure title (the case id).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.argwhere(mask > 0)
    centre = idx.mean(0).round().astype(int) if idx.size else np.array(mask.shape) // 2
    names = list(images)
    fig, axes = plt.subplots(3, len(names), figsize=(2.4 * len(names), 7.2), squeeze=False)
    for col, name in enumerate(names):
        vol = images[name]
        inside = vol[mask > 0] if idx.size else vol.ravel()
        hi = float(np.percentile(inside, 99.5)) if inside.size else 1.0
        for row, axis in enumerate((0, 1, 2)):  # axial, coronal, sagittal
            sl = [slice(None)] * 3
            sl[axis] = int(centre[axis])
            img, msk = vol[tuple(sl)], mask[tuple(sl)]
            if axis:  # slice index z first: put the top of the head up
                img, msk = img[::-1], msk[::-1]
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=hi or 1.0)
            if msk.any():
                ax.contour(msk.astype(float), levels=[0.5], colors="r", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(f"{title}: registered sequences, brain mask in red", fontsize=9)
    fig.tight_layout()
    with atomic_destination(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)
