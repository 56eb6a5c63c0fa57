"""BraTS conventions in one place: modality names and channel order, labels, regions.

Every other module maps names to channels through this file, never by hard-coded position.
Channel order of the network input (written into the bundle's ``channel_def``):
``flair, t1, t1ce, t2``. Region output channels: ``wt, tc, et``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from segmerge.hints import suggest as suggest  # the one "did you mean", re-exported

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
"""Canonical modality names, in network channel order."""

REGIONS: tuple[str, ...] = ("wt", "tc", "et")
"""Evaluation regions, in network output channel order."""

# File-name suffix of each modality in the two BraTS folder layouts.
BRATS2021_SUFFIX: dict[str, str] = {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2", "label": "seg"}
BRATS2023_SUFFIX: dict[str, str] = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "label": "seg"}

NCR, ED = 1, 2
VALID_ET_LABELS = (3, 4)
HD95_EMPTY = 373.13
"""BraTS convention: HD95 when exactly one of prediction / ground truth is empty."""


CASE_ID_RULE = "a case id is a plain name: not empty, no '/' or '\\', no '..', no control characters"
"""The one rule every command applies to case ids (they become output file names)."""


def case_id_problem(case_id: object) -> str | None:
    """Why ``case_id`` breaks :data:`CASE_ID_RULE`, or ``None`` when it is a valid case id.

    Example:
        >>> case_id_problem("BraTS-GLI-00000-000") is None
        True
        >>> case_id_problem("../../victim/settings")
        "contains '..'"
    """
    if not isinstance(case_id, str):
        return f"not a string ({type(case_id).__name__})"
    if not case_id.strip():
        return "empty"
    if ".." in case_id:
        return "contains '..'"
    for sep in ("/", "\\"):
        if sep in case_id:
            return f"contains the separator {sep!r}"
    bad = [ch for ch in case_id if ord(ch) < 32 or 127 <= ord(ch) < 160]
    if bad:
        return f"contains the control character {bad[0]!r}"
    return None


def check_et_label(et_label: int) -> int:
    """Return ``et_label`` if it is a valid enhancing-tumour label (4 for BraTS ≤2022, 3 for 2023+)."""
    if int(et_label) not in VALID_ET_LABELS:
        raise ValueError(f"et_label must be 4 (BraTS 2017-2022) or 3 (BraTS 2023+), got {et_label!r}")
    return int(et_label)


RC = 4
"""BraTS 2024+ adult glioma: resection cavity (with ET = 3); part of no region (WT/TC/ET)."""


def label_set(et_label: int = 4, resection_cavity: bool = False) -> tuple[int, ...]:
    """Allowed voxel values of a label map.

    Args:
        et_label: enhancing-tumour label (4 for BraTS <= 2022, 3 for 2023+).
        resection_cavity: BraTS 2024+ adult glioma scheme: label :data:`RC` (4) marks the resection
            cavity; needs ``et_label`` 3. :func:`labels_to_regions` leaves it out of every region.
    """
    et_label = check_et_label(et_label)
    if not resection_cavity:
        return (0, NCR, ED, et_label)
    if et_label != 3:
        raise ValueError(
            f"the resection-cavity label {RC} (BraTS 2024+) needs et_label 3, got {et_label}"
        )
    return (0, NCR, ED, et_label, RC)


def labels_to_regions(label: np.ndarray | torch.Tensor, et_label: int = 4):
    """Label map (..., spatial) -> stacked region masks (3, ...) in ``REGIONS`` order.

    WT = {1, 2, ET}, TC = {1, ET}, ET = {ET}. Works on numpy arrays and tensors alike.
    """
    et_label = check_et_label(et_label)
    if isinstance(label, torch.Tensor):
        wt = (label == NCR) | (label == ED) | (label == et_label)
        tc = (label == NCR) | (label == et_label)
        et = label == et_label
        return torch.stack([wt, tc, et], dim=0)
    lab = np.asarray(label)
    wt = (lab == NCR) | (lab == ED) | (lab == et_label)
    tc = (lab == NCR) | (lab == et_label)
    et = lab == et_label
    return np.stack([wt, tc, et], axis=0)


def regions_to_labels(regions: np.ndarray | torch.Tensor, et_label: int = 4):
    """Region masks (3, ...) in ``REGIONS`` order -> uint8 BraTS label map.

    ET where the ET channel is on, else NCR where TC, else ED where WT, else 0.
    """
    et_label = check_et_label(et_label)
    if isinstance(regions, torch.Tensor):
        r = regions.bool()
        out = torch.zeros(r.shape[1:], dtype=torch.uint8, device=r.device)
        out[r[0]] = ED
        out[r[1]] = NCR
        out[r[2]] = et_label
        return out
    r = np.asarray(regions).astype(bool)
    out = np.zeros(r.shape[1:], dtype=np.uint8)
    out[r[0]] = ED
    out[r[1]] = NCR
    out[r[2]] = et_label
    return out


def region_scores(
    pred: torch.Tensor,
    target: torch.Tensor,
    spacing: Sequence[float] | Sequence[Sequence[float]] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and HD95 (mm) of binary region masks with the BraTS empty-region conventions.

    The one region metric of segmerge: validation during training and ``segmerge evaluate`` both
    call it, so both report HD95 in millimetres. Dice is 1 when prediction and ground truth are
    both empty and 0 when exactly one is; HD95 is 0 when both are empty and :data:`HD95_EMPTY`
    when exactly one is (MONAI returns NaN/inf there, so the conventions are applied after).

    Args:
        pred: ``(B, R, *spatial)`` binary prediction.
        target: ``(B, R, *spatial)`` binary ground truth.
        spacing: voxel size in mm along the spatial axes, one triple for the batch or one per
            case (``(B, 3)``), e.g. the zooms of the ground truth's header or
            :func:`voxel_spacing` of the image's affine (the default, 1 mm, is for unit tests).

    Returns:
        ``(dice, hd95)``, each ``(B, R)`` float64 tensors; HD95 in mm.
    """
    pred, target = pred.float(), target.float()
    spacing_list = [float(s) for s in spacing] if np.ndim(spacing) == 1 else [
        [float(s) for s in row] for row in spacing
    ]
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on every empty region; handled below
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            pred, target, spacing=spacing_list
        )
    spatial = tuple(range(2, pred.ndim))
    p_empty = pred.sum(spatial) == 0
    t_empty = target.sum(spatial) == 0
    both = p_empty & t_empty
    one = p_empty ^ t_empty
    dice = dice.double()  # float64: HD95_EMPTY and small distances exact as Python floats
    dice = torch.where(both, torch.ones_like(dice), torch.where(one, torch.zeros_like(dice), dice))
    hd = hd.to(dice)
    hd = torch.where(
        both, torch.zeros_like(hd), torch.where(one, torch.full_like(hd, HD95_EMPTY), hd)
    )
    return dice, torch.nan_to_num(hd, nan=HD95_EMPTY, posinf=HD95_EMPTY)


def voxel_spacing(affine: np.ndarray | torch.Tensor) -> tuple[float, float, float]:
    """Voxel size in mm along each voxel axis of a ``(4, 4)`` voxel-to-world affine."""
    a = np.asarray(torch.as_tensor(affine).detach().cpu().double(), dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))
