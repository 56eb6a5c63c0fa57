"""Dice and HD95 per region (WT, TC, ET) of predicted BraTS label maps, per case and on average.

Empty-region conventions (BraTS), applied per case and region:

====================================  =====  ==========
prediction / ground truth             Dice   HD95 (mm)
====================================  =====  ==========
both empty                            1      0
exactly one empty                     0      373.13
both non-empty                        MONAI  MONAI
====================================  =====  ==========

MONAI's ``DiceMetric(ignore_empty=False)`` already gives 1 / 0 in the empty cases; MONAI's
``HausdorffDistanceMetric`` returns NaN/inf there, so the convention is applied by hand. HD95 is in
millimetres (voxel sizes from the ground truth's header). A case without a prediction is scored as
an empty prediction and listed as missing.

``--subsets all`` (:func:`evaluate_subsets`) runs the model on every non-empty subset of the four
sequences (15 subsets) of labelled cases and tabulates the means: what happens without T1ce?
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from segmerge.conventions import HD95_EMPTY, MODALITIES, REGIONS, check_et_label, labels_to_regions
from segmerge.inference.cases import case_id_from_path, discover_cases
from segmerge.inference.predictor import (
    PROBABILITIES_SUFFIX,
    BratsPredictor,
    atomic_write_text,
)

__all__ = [
    "CONVENTIONS",
    "EvaluationResult",
    "all_subsets",
    "region_metrics",
    "ground_truth_files",
    "evaluate_predictions",
    "evaluate_subsets",
    "write_evaluation",
    "write_robustness",
]

CONVENTIONS: dict[str, Any] = {
    "dice_both_empty": 1.0,
    "dice_one_empty": 0.0,
    "hd95_both_empty": 0.0,
    "hd95_one_empty": HD95_EMPTY,
    "hd95_units": "mm",
    "missing_prediction": "scored as an empty prediction",
    "regions": {"wt": "labels 1, 2, ET", "tc": "labels 1, ET", "et": "label ET"},
}
logger = logging.getLogger("segmerge.inference")

METRIC_KEYS = [f"dice_{r}" for r in REGIONS] + [f"hd95_{r}" for r in REGIONS]

_dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
_hd95 = HausdorffDistanceMetric(include_background=True, percentile=95.0, reduction="none")


def region_metrics(
    pred_labels: np.ndarray, gt_labels: np.ndarray, spacing: Sequence[float], et_label: int = 4
) -> dict[str, float]:
    """Dice and HD95 of the three regions of one case, with the empty-region conventions.

    Args:
        pred_labels: predicted BraTS label map.
        gt_labels: ground-truth label map of the same shape.
        spacing: voxel size in mm (for HD95).
        et_label: enhancing-tumour label value of both maps.

    Returns:
        ``{"dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et"}``.
    """
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(
            f"prediction shape {pred_labels.shape} != ground truth shape {gt_labels.shape}"
        )
    pred = torch.as_tensor(labels_to_regions(np.asarray(pred_labels), et_label))[None].float()
    gt = torch.as_tensor(labels_to_regions(np.asarray(gt_labels), et_label))[None].float()
    dice = _dice(pred, gt)[0]
    pred_any = pred.flatten(2).any(-1)[0]
    gt_any = gt.flatten(2).any(-1)[0]
    out: dict[str, float] = {}
    for i, region in enumerate(REGIONS):
        out[f"dice_{region}"] = float(dice[i])
    both = pred_any & gt_any
    hd = torch.zeros(len(REGIONS))
    if bool(both.any()):
        with warnings.catch_warnings():
            # MONAI warns about empty channels; those are replaced by the convention below
            warnings.simplefilter("ignore")
            hd = _hd95(pred, gt, spacing=[float(s) for s in spacing])[0]
    for i, region in enumerate(REGIONS):
        if bool(both[i]):
            value = float(hd[i])
        elif bool(pred_any[i]) or bool(gt_any[i]):
            value = HD95_EMPTY
        else:
            value = 0.0
        out[f"hd95_{region}"] = value
    return out


def ground_truth_files(gt: str | Path) -> dict[str, Path]:
    """Case id -> label file, from a BraTS folder / datalist or a flat folder of label maps.

    Args:
        gt: a BraTS-layout folder or datalist (each case's ``seg``/``label``), or a folder of
            ``<case>.nii.gz`` (or ``<case>_seg.nii.gz``) label maps.
    """
    gt = Path(gt)
    if not gt.exists():
        raise FileNotFoundError(f"ground truth {gt} does not exist")
    if gt.is_dir() and not any(p.is_dir() for p in gt.iterdir()):
        files = {}
        for p in sorted(gt.iterdir()):
            if p.name.endswith((".nii.gz", ".nii")) and PROBABILITIES_SUFFIX not in p.name:
                files[case_id_from_path(p)] = p
        if not files:
            raise ValueError(f"ground truth {gt}: no label files (<case>.nii.gz) found")
        return files
    files = {c.case_id: c.label for c in discover_cases(gt) if c.label is not None}
    if not files:
        raise ValueError(
            f"ground truth {gt}: no case has a label (…_seg.nii.gz or 'label' entries)"
        )
    return files


@dataclass
class EvaluationResult:
    """Per-case rows, their mean and standard deviation, and what could not be scored."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    et_label: int = 4

    def aggregate(self, how: str = "mean") -> dict[str, float]:
        """Mean (``how="mean"``) or standard deviation (``"std"``) of every metric over cases."""
        if not self.rows:
            return {k: float("nan") for k in METRIC_KEYS}
        fn = np.mean if how == "mean" else np.std
        return {k: float(fn([r[k] for r in self.rows])) for k in METRIC_KEYS}


def _load_labels(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise ValueError(f"{path}: a label map must be 3D, got shape {img.shape}")
    return np.asarray(img.dataobj), img


def evaluate_predictions(
    pred_dir: str | Path, gt: str | Path, et_label: int = 4
) -> EvaluationResult:
    """Score every ground-truth case against ``pred_dir/<case>.nii.gz``.

    Args:
        pred_dir: folder of predictions (as written by ``predict``).
        gt: ground truth, see :func:`ground_truth_files`.
        et_label: enhancing-tumour label of both predictions and ground truth.
    """
    et_label = check_et_label(et_label)
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    result = EvaluationResult(et_label=et_label)
    for case_id, gt_path in sorted(ground_truth_files(gt).items()):
        try:
            gt_labels, gt_img = _load_labels(gt_path)
            pred_path = pred_dir / f"{case_id}.nii.gz"
            status = "ok"
            if pred_path.exists():
                pred_labels, pred_img = _load_labels(pred_path)
                if pred_img.shape != gt_img.shape:
                    raise ValueError(
                        f"{pred_path} has shape {pred_img.shape} but the ground truth {gt_path} has {gt_img.shape}"
                    )
                if not np.allclose(pred_img.affine, gt_img.affine, atol=1e-3):
                    raise ValueError(
                        f"{pred_path} and the ground truth {gt_path} have different affines"
                    )
            else:
                pred_labels = np.zeros_like(gt_labels)
                status = "missing_prediction"
                result.missing.append(case_id)
            metrics = region_metrics(
                pred_labels, gt_labels, gt_img.header.get_zooms()[:3], et_label
            )
        except Exception as err:  # one unreadable case is reported, the others still scored
            result.errors[case_id] = str(err)
            continue
        result.rows.append({"case_id": case_id, **metrics, "status": status})
    return result


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def write_evaluation(result: EvaluationResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.csv`` (cases, then ``mean`` and ``std`` rows) and ``metrics.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean, std = result.aggregate("mean"), result.aggregate("std")
    rows = [
        *result.rows,
        {"case_id": "mean", **mean, "status": ""},
        {"case_id": "std", **std, "status": ""},
    ]
    csv_path, json_path = out_dir / "metrics.csv", out_dir / "metrics.json"
    atomic_write_text(csv_path, _csv_text(rows, ["case_id", *METRIC_KEYS, "status"]))
    content = {
        "n_cases": len(result.rows),
        "mean": mean,
        "std": std,
        "cases": result.rows,
        "missing_predictions": result.missing,
        "errors": result.errors,
        "et_label": result.et_label,
        "conventions": CONVENTIONS,
    }
    atomic_write_text(json_path, json.dumps(content, indent=2) + "\n")
    return csv_path, json_path


# -- robustness to missing sequences --------------------------------------------------------------
def all_subsets() -> list[tuple[str, ...]]:
    """The 15 non-empty subsets of ``MODALITIES``, largest first, channel order inside."""
    return [
        combo
        for k in range(len(MODALITIES), 0, -1)
        for combo in itertools.combinations(MODALITIES, k)
    ]


def _parse_subsets(spec: str | Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
    if isinstance(spec, str):
        if spec == "all":
            return all_subsets()
        spec = [part.split("+") for part in spec.split(",")]
    subsets = []
    for subset in spec:
        names = tuple(m for m in MODALITIES if m in subset)
        unknown = sorted(set(subset) - set(MODALITIES))
        if unknown or not names:
            raise ValueError(
                f"subset {'+'.join(subset)!r}: use '+'-joined names of {', '.join(MODALITIES)} "
                "(e.g. flair+t2), or 'all'"
            )
        subsets.append(names)
    return subsets


def evaluate_subsets(
    predictor: BratsPredictor,
    dataset: str | Path,
    subsets: str | Sequence[Sequence[str]] = "all",
    gt: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Mean Dice/HD95 of the model on each subset of sequences, over the labelled cases.

    Each case is read and preprocessed once; per subset, the other sequences are zeroed and marked
    unavailable (exactly as a case lacking them is predicted). A case is scored for a subset only
    if it has every sequence of the subset.

    Args:
        predictor: built from ``configs/inference.json`` (weights loaded).
        dataset: BraTS folder or datalist with the input sequences.
        subsets: ``"all"`` (15 subsets), ``"flair+t1ce,t2"`` or a list of name lists.
        gt: ground truth (default: the labels of ``dataset``).

    Returns:
        One row per subset: ``subset``, ``missing``, ``n_cases`` and mean metrics.
    """
    chosen = _parse_subsets(subsets)
    labels = ground_truth_files(gt if gt is not None else dataset)
    scores: dict[tuple[str, ...], list[dict[str, float]]] = {s: [] for s in chosen}
    for case in discover_cases(dataset):
        if case.case_id not in labels:
            continue
        try:
            predictor.check_inputs(case)
            data = predictor.prepare(case)
        except ValueError as err:  # a bad case is reported and left out, as in predict
            logger.warning("robustness: skipping %s", err)
            continue
        gt_labels, gt_img = _load_labels(labels[case.case_id])
        spacing = gt_img.header.get_zooms()[:3]
        for subset in chosen:
            if not set(subset) <= set(case.images):
                continue
            pred = predictor.to_labels(predictor.infer(data, use=subset))
            scores[subset].append(region_metrics(pred, gt_labels, spacing, predictor.et_label))
    rows = []
    for subset in chosen:
        row: dict[str, Any] = {
            "subset": "+".join(subset),
            "missing": "+".join(m for m in MODALITIES if m not in subset) or "-",
            "n_cases": len(scores[subset]),
        }
        for key in METRIC_KEYS:
            values = [s[key] for s in scores[subset]]
            row[key] = float(np.mean(values)) if values else float("nan")
        rows.append(row)
    return rows


def write_robustness(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``robustness.csv`` and ``robustness.md`` (a markdown table) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["subset", "missing", "n_cases", *METRIC_KEYS]
    csv_path, md_path = out_dir / "robustness.csv", out_dir / "robustness.md"
    atomic_write_text(csv_path, _csv_text(rows, columns))
    header = ["sequences", "missing", "cases"] + [f"Dice {r.upper()}" for r in REGIONS]
    header += [f"HD95 {r.upper()} (mm)" for r in REGIONS]
    lines = [
        "Mean over cases, per subset of input sequences (absent ones zeroed and masked).",
        f"Empty regions: Dice 1 if both empty, 0 if one is; HD95 0 if both empty, {HD95_EMPTY} if one is.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    for row in rows:
        cells = [row["subset"], row["missing"], str(row["n_cases"])]
        cells += [f"{row[k]:.3f}" for k in METRIC_KEYS[:3]] + [
            f"{row[k]:.2f}" for k in METRIC_KEYS[3:]
        ]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path
