"""BraTS 2023+ lesion-wise metrics: the definitions of the official ``brats-evaluation`` package.

The BraTS challenges since 2023 rank by lesion-wise metrics computed by the PyPI package
``brats-evaluation`` (built on ``panoptica``; AGPL, so segmerge never imports it, the tests use it
as an oracle). Its adult-glioma configuration (``config_gli.yaml``) defines, per region (WT, TC, ET
as binary masks):

* **instances**: 3D connected components, 26-connectivity (``cc3d.connected_components``).
* **matching**: one-to-one maximum bipartite matching of reference and predicted components on
  Dice (Hungarian algorithm on ``1 - Dice``, ``scipy.optimize.linear_sum_assignment``); a pair is
  eligible when its Dice is at least ``1e-6``, i.e. when the two components overlap at all.
* **counts**: ``tp`` matched pairs, ``fp = n_pred - tp``, ``fn = n_ref - tp``; ``f1`` (panoptica's
  recognition quality) ``= tp / (tp + (fp + fn) / 2)``; with ``tp = 0`` it is 0, or NaN when there
  is no component at all.
* **lesion-wise Dice / HD95 / NSD**: the mean of each metric over the matched pairs (unmatched
  lesions enter through ``f1``); with ``tp = 0``: NaN if both masks are empty, otherwise Dice 0,
  NSD 0, HD95 infinite. Distances in mm (voxel size from the reference header), NSD tolerance = the
  smallest voxel size.
* **global Dice / HD95 / NSD** of the whole region: when prediction and reference do not overlap,
  the same edge-case values as above (NaN if both empty; Dice 0, NSD 0, HD95 infinite otherwise,
  even if both are non-empty); otherwise computed on the whole masks **in voxel units** (the
  official pipeline passes no voxel size to its global metrics; NSD tolerance then 0.5 voxel).

Surface metrics (panoptica's definitions, which differ from MONAI's ``HausdorffDistanceMetric``
and ``compute_surface_dice``, hence written here): the border of a mask is the mask minus its
6-connected binary erosion (voxels at the array edge are border); ``d_ab`` are the Euclidean
distances from each border voxel of ``a`` to the nearest border voxel of ``b``. HD95 is the 95th
percentile of ``d_ab`` and ``d_ba`` pooled; NSD at tolerance ``t`` is the mean of the fractions of
``d_ab`` and of ``d_ba`` within ``t``.

Reported infinities: ``brats-evaluation``'s result parser writes 373 for an infinite global HD95;
:func:`lesion_metrics` writes :data:`HD95_INF_AS` (373, the same) for every infinite HD95 so that
every value is finite JSON; NaN stays NaN (means skip it, as the official parser's do).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import cc3d
import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from segmerge.conventions import REGIONS

__all__ = [
    "HD95_INF_AS",
    "LESION_KEYS",
    "MATCH_DICE_THRESHOLD",
    "RegionLesionResult",
    "lesion_metrics",
    "region_lesion_metrics",
    "surface_distances",
]

HD95_INF_AS = 373.0
"""Value written for an infinite HD95 (the official parser's penalty, the SRI-24 cube diagonal)."""
MATCH_DICE_THRESHOLD = 1e-6
"""Smallest Dice of a matchable pair (``config_gli.yaml``: ``matching_threshold: 0.000001``)."""
_UNMATCHED_COST = 1.0 + 1e-6
_STRUCTURE = ndimage.generate_binary_structure(3, 1)

LESION_KEYS: list[str] = [
    f"{name}_{r}"
    for name in (
        "global_dice",
        "global_hd95",
        "nsd",
        "lesion_dice",
        "lesion_hd95",
        "lesion_nsd",
        "lesion_tp",
        "lesion_fp",
        "lesion_fn",
        "lesion_f1",
    )
    for r in REGIONS
]
"""Keys :func:`lesion_metrics` returns (``nsd_<r>`` is the official global NSD)."""


def _border(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask, structure=_STRUCTURE, iterations=1)


def _crop(*masks: np.ndarray, pad: int = 2) -> tuple[slice, ...]:
    """Bounding box of the union, padded: distances between borders inside it are unchanged."""
    union = np.logical_or.reduce(masks)
    box = ndimage.find_objects(union.astype(np.uint8))[0]
    return tuple(
        slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, union.shape)
    )


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Border-to-border distances ``(d_ab, d_ba)`` of two non-empty binary masks.

    Args:
        a: first mask (bool, 3D).
        b: second mask of the same shape.
        spacing: voxel size per axis (mm); ``None`` for voxel units.

    Returns:
        Distances from each border voxel of ``a`` to the nearest border voxel of ``b``, and back.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    box = _crop(a, b)
    a, b = a[box], b[box]
    border_a, border_b = _border(a), _border(b)
    sampling = None if spacing is None else [float(s) for s in spacing]
    d_ab = ndimage.distance_transform_edt(~border_b, sampling=sampling)[border_a]
    d_ba = ndimage.distance_transform_edt(~border_a, sampling=sampling)[border_b]
    return d_ab, d_ba


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


def _surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None
) -> tuple[float, float]:
    """(HD95, NSD) of two non-empty masks; NSD tolerance: min voxel size, or 0.5 voxel units."""
    d_ref, d_pred = surface_distances(ref, pred, spacing)
    hd95 = float(np.percentile(np.concatenate([d_ref, d_pred]), 95))
    tol = 0.5 if spacing is None else min(float(s) for s in spacing)
    # the official formula, kept literally (its tiny denominator guard included) so values agree
    tp_r, tp_p = np.mean(d_ref <= tol), np.mean(d_pred <= tol)
    fn_r, fp_p = np.mean(d_ref > tol), np.mean(d_pred > tol)
    nsd = float((tp_r + tp_p) / (tp_r + tp_p + fn_r + fp_p + sys.float_info.min))
    return hd95, nsd


class RegionLesionResult(dict):
    """Official metrics of one region (a ``dict`` with the keys below, HD95 may be ``inf``).

    Keys: ``global_dice``, ``global_hd95``, ``global_nsd``, ``dice``, ``hd95``, ``nsd`` (lesion-wise
    means over matched pairs), ``tp``, ``fp``, ``fn``, ``f1``, ``n_pred``, ``n_ref``.
    """


def _zero_tp(n_pred: int, n_ref: int) -> tuple[float, float, float]:
    """(Dice, HD95, NSD) when nothing is matched: NaN without any instance, else 0, inf, 0."""
    if n_pred + n_ref == 0:
        return math.nan, math.nan, math.nan
    return 0.0, math.inf, 0.0


def _match(
    ref_cc: np.ndarray, n_ref: int, pred_cc: np.ndarray, n_pred: int
) -> list[tuple[int, int]]:
    """Maximum-Dice one-to-one matching of overlapping components: ``[(ref_id, pred_id), ...]``."""
    if n_ref == 0 or n_pred == 0:
        return []
    both = (ref_cc > 0) & (pred_cc > 0)
    ref_sizes = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    pairs, overlap = np.unique(
        np.stack([ref_cc[both], pred_cc[both]]).astype(np.int64), axis=1, return_counts=True
    )
    cost = np.full((n_ref, n_pred), _UNMATCHED_COST)
    for (r, p), inter in zip(pairs.T, overlap):
        dice = 2.0 * inter / (ref_sizes[r] + pred_sizes[p])
        if dice >= MATCH_DICE_THRESHOLD:
            cost[r - 1, p - 1] = 1.0 - dice
    rows, cols = linear_sum_assignment(cost)
    return [(int(r) + 1, int(c) + 1) for r, c in zip(rows, cols) if cost[r, c] < 1.0]


def region_lesion_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> RegionLesionResult:
    """Official BraTS metrics of one binary region (see the module docstring).

    Args:
        pred: predicted region mask (3D, bool).
        ref: reference region mask of the same shape.
        spacing: voxel size in mm (lesion-wise HD95 / NSD).
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"region masks must be 3D of one shape, got {pred.shape} and {ref.shape}")
    ref_cc, n_ref = cc3d.connected_components(ref, connectivity=26, return_N=True)
    pred_cc, n_pred = cc3d.connected_components(pred, connectivity=26, return_N=True)
    out = RegionLesionResult(n_pred=int(n_pred), n_ref=int(n_ref))
    if (pred & ref).any():
        out["global_dice"] = _dice(pred, ref)
        out["global_hd95"], out["global_nsd"] = _surface_metrics(pred, ref, None)
    else:
        out["global_dice"], out["global_hd95"], out["global_nsd"] = _zero_tp(n_pred, n_ref)
    scores = []
    ref_boxes, pred_boxes = ndimage.find_objects(ref_cc), ndimage.find_objects(pred_cc)
    for r, p in _match(ref_cc, n_ref, pred_cc, n_pred):
        # the union of the two components' boxes holds both: metrics are evaluated inside it
        box = tuple(
            slice(min(a.start, b.start), max(a.stop, b.stop))
            for a, b in zip(ref_boxes[r - 1], pred_boxes[p - 1])
        )
        ref_i, pred_i = ref_cc[box] == r, pred_cc[box] == p
        scores.append((_dice(pred_i, ref_i), *_surface_metrics(pred_i, ref_i, spacing)))
    tp = len(scores)
    fp, fn = int(n_pred) - tp, int(n_ref) - tp
    out.update(tp=tp, fp=fp, fn=fn)
    if tp == 0:
        out["f1"] = 0.0 if n_pred + n_ref > 0 else math.nan
        out["dice"], out["hd95"], out["nsd"] = _zero_tp(n_pred, n_ref)
    else:
        out["f1"] = tp / (tp + 0.5 * fp + 0.5 * fn)
        mean = np.mean(np.asarray(scores, dtype=np.float64), axis=0)
        out["dice"], out["hd95"], out["nsd"] = (float(v) for v in mean)
    return out


def _finite_hd95(value: float) -> float:
    return HD95_INF_AS if math.isinf(value) else float(value)


def lesion_metrics(
    pred_regions: np.ndarray, ref_regions: np.ndarray, spacing: Sequence[float]
) -> dict[str, float]:
    """The pinned lesion-wise keys of one case (:data:`LESION_KEYS`).

    Args:
        pred_regions: predicted region masks ``(3, H, W, D)`` in ``REGIONS`` order.
        ref_regions: reference region masks of the same shape.
        spacing: voxel size in mm.

    Returns:
        ``global_dice_<r>``, ``global_hd95_<r>``, ``nsd_<r>`` (global), ``lesion_dice_<r>``,
        ``lesion_hd95_<r>``, ``lesion_nsd_<r>``, ``lesion_tp_<r>``, ``lesion_fp_<r>``,
        ``lesion_fn_<r>``, ``lesion_f1_<r>``; infinite HD95 written as :data:`HD95_INF_AS`.
    """
    if pred_regions.shape != ref_regions.shape or pred_regions.shape[0] != len(REGIONS):
        raise ValueError(
            f"expected region masks (3, H, W, D) of one shape, got {pred_regions.shape} and "
            f"{ref_regions.shape}"
        )
    out: dict[str, float] = {}
    for i, r in enumerate(REGIONS):
        m = region_lesion_metrics(pred_regions[i], ref_regions[i], spacing)
        out[f"global_dice_{r}"] = m["global_dice"]
        out[f"global_hd95_{r}"] = _finite_hd95(m["global_hd95"])
        out[f"nsd_{r}"] = m["global_nsd"]
        out[f"lesion_dice_{r}"] = m["dice"]
        out[f"lesion_hd95_{r}"] = _finite_hd95(m["hd95"])
        out[f"lesion_nsd_{r}"] = m["nsd"]
        out[f"lesion_tp_{r}"] = m["tp"]
        out[f"lesion_fp_{r}"] = m["fp"]
        out[f"lesion_fn_{r}"] = m["fn"]
        out[f"lesion_f1_{r}"] = m["f1"]
    return {k: out[k] for k in LESION_KEYS}
