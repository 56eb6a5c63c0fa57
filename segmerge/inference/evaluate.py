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

``--metrics`` chooses the metrics: ``legacy`` (the Dice / HD95 above, keys ``dice_<r>``,
``hd95_<r>``), ``lesionwise`` (the BraTS 2023+ metrics of the official ``brats-evaluation``
package, :mod:`segmerge.inference.lesionwise`: ``nsd_<r>``, ``lesion_dice_<r>``,
``lesion_hd95_<r>``, ``lesion_nsd_<r>``, ``lesion_tp_<r>``, ``lesion_fp_<r>``, ``lesion_fn_<r>``,
``lesion_f1_<r>`` and the official global ``global_dice_<r>``, ``global_hd95_<r>``) or ``all``
(both, the default). The official metrics are NaN where the package gives NaN (e.g. Dice when
both masks are empty): JSON writes ``null``, means skip them (as the official parser does).

Label schemes: BraTS 2017-2022 (ET = 4), BraTS 2023 (ET = 3) and BraTS 2024+ adult glioma
(ET = 3, label 4 = resection cavity, ``resection_cavity=True``; the cavity belongs to no region).
A label value outside the scheme is an error for that case.

``--subsets all`` (:func:`evaluate_subsets`) runs the model on every non-empty subset of the four
sequences (15 subsets) of labelled cases and tabulates the means: what happens without T1ce?
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from segmerge.atomic import write_text_atomic
from segmerge.conventions import (
    HD95_EMPTY,
    MODALITIES,
    REGIONS,
    check_et_label,
    label_set,
    labels_to_regions,
    region_scores,
)
from segmerge.inference.cases import case_id_from_path, discover_cases
from segmerge.inference.lesionwise import HD95_INF_AS, LESION_KEYS, lesion_metrics
from segmerge.inference.predictor import PROBABILITIES_SUFFIX, BratsPredictor

__all__ = [
    "CONVENTIONS",
    "EvaluationResult",
    "all_subsets",
    "METRIC_CHOICES",
    "case_metrics",
    "metric_keys",
    "region_metrics",
    "ground_truth_files",
    "evaluate_predictions",
    "evaluate_subsets",
    "evaluate_subsets_per_case",
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
    "lesionwise": (
        "brats-evaluation (panoptica) definitions: 26-connected components, maximum bipartite "
        "Dice matching of overlapping components, lesion_* means over matched pairs, f1 = tp / "
        "(tp + (fp + fn) / 2); NaN (null) where both masks are empty; global_* and nsd_* on the "
        "whole region in voxel units (as the official pipeline), lesion_* in mm"
    ),
    "hd95_infinite_written_as": HD95_INF_AS,
}
logger = logging.getLogger("segmerge.inference")

METRIC_KEYS = [f"dice_{r}" for r in REGIONS] + [f"hd95_{r}" for r in REGIONS]
"""Legacy (whole-volume, BraTS 2021) keys."""
METRIC_CHOICES = ("legacy", "lesionwise", "all")


def metric_keys(metrics: str = "all") -> list[str]:
    """Row keys of ``metrics`` (``legacy``, ``lesionwise`` or ``all``), in file column order."""
    if metrics not in METRIC_CHOICES:
        raise ValueError(f"metrics must be one of {', '.join(METRIC_CHOICES)}, got {metrics!r}")
    keys: list[str] = []
    if metrics in ("legacy", "all"):
        keys += METRIC_KEYS
    if metrics in ("lesionwise", "all"):
        keys += LESION_KEYS
    return keys


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
    # the one region metric (conventions.region_scores), shared with validation in training
    dice, hd = region_scores(pred, gt, [float(s) for s in spacing])
    out = {f"dice_{r}": float(dice[0, i]) for i, r in enumerate(REGIONS)}
    out.update({f"hd95_{r}": float(hd[0, i]) for i, r in enumerate(REGIONS)})
    return out


def case_metrics(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    spacing: Sequence[float],
    et_label: int = 4,
    metrics: str = "all",
    resection_cavity: bool = False,
) -> dict[str, float]:
    """The metrics of one case: :func:`region_metrics` and/or the official lesion-wise ones.

    Args:
        pred_labels: predicted BraTS label map.
        gt_labels: ground-truth label map of the same shape.
        spacing: voxel size in mm.
        et_label: enhancing-tumour label value of both maps.
        metrics: ``legacy``, ``lesionwise`` or ``all``.
        resection_cavity: label 4 is the resection cavity (BraTS 2024+, ``et_label`` 3).

    Raises:
        ValueError: a label value outside the scheme, or maps of different shapes.
    """
    keys = metric_keys(metrics)
    allowed = label_set(et_label, resection_cavity)
    for name, labels in (("prediction", pred_labels), ("ground truth", gt_labels)):
        values = np.unique(np.asarray(labels))
        bad = values[~np.isin(values, allowed)]
        if bad.size:
            raise ValueError(
                f"{name} has label value(s) {bad.tolist()} outside {list(allowed)} (et_label="
                f"{et_label}{', resection cavity 4' if resection_cavity else ''})"
            )
    out: dict[str, float] = {}
    if metrics in ("legacy", "all"):
        out.update(region_metrics(pred_labels, gt_labels, spacing, et_label))
    if metrics in ("lesionwise", "all"):
        if pred_labels.shape != gt_labels.shape:
            raise ValueError(
                f"prediction shape {pred_labels.shape} != ground truth shape {gt_labels.shape}"
            )
        out.update(
            lesion_metrics(
                labels_to_regions(np.asarray(pred_labels), et_label),
                labels_to_regions(np.asarray(gt_labels), et_label),
                [float(s) for s in spacing],
            )
        )
    return {k: out[k] for k in keys}


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
    metrics: str = "all"
    resection_cavity: bool = False

    @property
    def keys(self) -> list[str]:
        """Metric keys of the rows, in column order."""
        return metric_keys(self.metrics)

    def aggregate(self, how: str = "mean") -> dict[str, float]:
        """Mean (``how="mean"``) or standard deviation (``"std"``) of every metric over cases.

        NaN values (official lesion-wise metrics of empty regions) are left out, as the official
        parser's means do; a metric NaN in every case stays NaN.
        """
        fn = np.nanmean if how == "mean" else np.nanstd
        out = {}
        for k in self.keys:
            values = np.asarray([r[k] for r in self.rows], dtype=np.float64)
            finite = values[~np.isnan(values)]
            out[k] = float(fn(finite)) if finite.size else float("nan")
        return out


def _load_labels(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise ValueError(f"{path}: a label map must be 3D, got shape {img.shape}")
    return np.asarray(img.dataobj), img


def evaluate_predictions(
    pred_dir: str | Path,
    gt: str | Path,
    et_label: int = 4,
    metrics: str = "all",
    resection_cavity: bool = False,
) -> EvaluationResult:
    """Score every ground-truth case against ``pred_dir/<case>.nii.gz``.

    Args:
        pred_dir: folder of predictions (as written by ``predict``).
        gt: ground truth, see :func:`ground_truth_files`.
        et_label: enhancing-tumour label of both predictions and ground truth.
        metrics: ``legacy``, ``lesionwise`` or ``all`` (see the module docstring).
        resection_cavity: label 4 is the resection cavity (BraTS 2024+ adult glioma, ET 3).
    """
    et_label = check_et_label(et_label)
    label_set(et_label, resection_cavity)  # the scheme itself is valid
    metric_keys(metrics)
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    result = EvaluationResult(
        et_label=et_label, metrics=metrics, resection_cavity=bool(resection_cavity)
    )
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
            scores = case_metrics(
                pred_labels,
                gt_labels,
                gt_img.header.get_zooms()[:3],
                et_label,
                metrics,
                resection_cavity,
            )
        except Exception as err:  # one unreadable case is reported, the others still scored
            result.errors[case_id] = str(err)
            continue
        result.rows.append({"case_id": case_id, **scores, "status": status})
    return result


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


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
    write_text_atomic(csv_path, _csv_text(rows, ["case_id", *result.keys, "status"]))
    content = {
        "metrics": result.metrics,
        "n_cases": len(result.rows),
        "mean": mean,
        "std": std,
        "cases": result.rows,
        "missing_predictions": result.missing,
        "errors": result.errors,
        "et_label": result.et_label,
        "resection_cavity": result.resection_cavity,
        "conventions": CONVENTIONS,
    }
    # strict JSON: NaN (official metrics of empty regions) is written as null
    write_text_atomic(json_path, json.dumps(_json_safe(content), indent=2, allow_nan=False) + "\n")
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
    return evaluate_subsets_per_case(predictor, dataset, subsets, gt)[0]


def evaluate_subsets_per_case(
    predictor: BratsPredictor,
    dataset: str | Path,
    subsets: str | Sequence[Sequence[str]] = "all",
    gt: str | Path | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, dict[str, float]]]]:
    """:func:`evaluate_subsets` keeping every case's scores (the study's paired statistics).

    Returns:
        ``(rows, cases)``: the rows of :func:`evaluate_subsets` and case id -> subset name
        (``flair+t1ce``) -> metrics.
    """
    chosen = _parse_subsets(subsets)
    labels = ground_truth_files(gt if gt is not None else dataset)
    cases: dict[str, dict[str, dict[str, float]]] = {}
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
            scores = region_metrics(pred, gt_labels, spacing, predictor.et_label)
            cases.setdefault(case.case_id, {})["+".join(subset)] = scores
    rows = []
    for subset in chosen:
        name = "+".join(subset)
        have = [c[name] for c in cases.values() if name in c]
        row: dict[str, Any] = {
            "subset": name,
            "missing": "+".join(m for m in MODALITIES if m not in subset) or "-",
            "n_cases": len(have),
        }
        for key in METRIC_KEYS:
            row[key] = float(np.mean([h[key] for h in have])) if have else float("nan")
        rows.append(row)
    return rows, cases


def write_robustness(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``robustness.csv`` and ``robustness.md`` (a markdown table) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["subset", "missing", "n_cases", *METRIC_KEYS]
    csv_path, md_path = out_dir / "robustness.csv", out_dir / "robustness.md"
    write_text_atomic(csv_path, _csv_text(rows, columns))
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
    write_text_atomic(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path
