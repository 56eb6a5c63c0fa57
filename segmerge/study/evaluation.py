"""Evaluate one trained model on the validation cases with every non-empty subset of sequences.

This is ``python -m segmerge evaluate --subsets all`` called through its Python API
(:func:`segmerge.inference.evaluate.evaluate_subsets`, the bundle's predictor built from
``configs/inference.json``), restricted to the validation cases: they are written to a small
datalist first, so training cases are never scored. Each case is read once and predicted 15
times, once per subset of ``flair, t1, t1ce, t2`` (the other sequences zeroed and marked
unavailable, which is what a case lacking them looks like to the network). Metrics follow the
inference package's conventions: Dice per region; HD95 in mm, 0 when both masks are empty and
373.13 when exactly one is.

The subset with all four sequences is the plain validation score. Subset names join sequence names
with ``+`` in canonical order (``flair+t1+t1ce+t2``); MLflow keys use ``-`` instead (``+`` is not
allowed in a metric key).

Per-case scores are kept as well (:attr:`EvaluationResult.cases`): the study pairs them across
methods (same case, same seed) for its statistics. The evaluation of a study runs in its own
process, ``python -m segmerge.study.evaluation SPEC.json`` (:func:`main`), so that several run at
once with their own threads and device.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmerge.atomic import write_text_atomic
from segmerge.conventions import MODALITIES, REGIONS
from segmerge.inference import build_predictor
from segmerge.inference.evaluate import evaluate_subsets_per_case as per_case
from segmerge.inference.evaluate import write_robustness

__all__ = [
    "ALL_SEQUENCES",
    "T1CE_MISSING",
    "SubsetScores",
    "EvaluationResult",
    "write_validation_datalist",
    "evaluate_model",
    "evaluate_subsets_per_case",
    "main",
]

ALL_SEQUENCES = "+".join(MODALITIES)
"""Name of the full subset (``flair+t1+t1ce+t2``)."""

T1CE_MISSING = "+".join(m for m in MODALITIES if m != "t1ce")
"""The three-sequence subset without T1ce (``flair+t1+t2``): the question users ask first."""


@dataclass
class SubsetScores:
    """Mean scores of one subset over the evaluated cases.

    Attributes:
        dice: region -> mean Dice, plus ``mean`` (mean over the three regions).
        hd95: region -> mean HD95 in mm, plus ``mean``.
        n_cases: number of cases scored.
    """

    dice: dict[str, float]
    hd95: dict[str, float]
    n_cases: int


@dataclass
class EvaluationResult:
    """Scores of one model on every subset of sequences.

    Attributes:
        subsets: subset name (``+``-joined) -> scores, in the order evaluated (largest first).
        cases: case id -> subset name -> ``dice_<region>`` / ``hd95_<region>`` of that case
            (empty when only means are known).
    """

    subsets: dict[str, SubsetScores]
    cases: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    @property
    def full(self) -> SubsetScores:
        """Scores with all four sequences (the validation-set result)."""
        return self.subsets[ALL_SEQUENCES]

    def robustness(self) -> dict[str, Any]:
        """Mean of the subsets' mean Dice, the worst subset and its mean Dice."""
        means = {name: s.dice["mean"] for name, s in self.subsets.items()}
        finite = {k: v for k, v in means.items() if math.isfinite(v)}
        if not finite:
            return {
                "dice_mean_over_subsets": float("nan"),
                "worst_subset": "",
                "worst_dice": float("nan"),
            }
        worst = min(finite, key=lambda k: (finite[k], k))
        return {
            "dice_mean_over_subsets": float(np.mean(list(finite.values()))),
            "worst_subset": worst,
            "worst_dice": finite[worst],
        }

    def case_scores(self) -> dict[str, dict[str, float]]:
        """Per case: ``dice_mean_over_subsets`` (mean over the subsets of the WT/TC/ET mean Dice,
        the field's headline), ``dice_mean_full`` (all four sequences) and, per region,
        ``dice_<r>_subsets`` / ``dice_<r>_full`` and ``hd95_<r>_subsets`` / ``hd95_<r>_full``."""
        out: dict[str, dict[str, float]] = {}
        for case, subsets in self.cases.items():
            if ALL_SEQUENCES not in subsets:
                continue
            row: dict[str, float] = {}
            for kind in ("dice", "hd95"):
                for r in REGIONS:
                    key = f"{kind}_{r}"
                    row[f"{key}_subsets"] = float(np.mean([s[key] for s in subsets.values()]))
                    row[f"{key}_full"] = float(subsets[ALL_SEQUENCES][key])
            means = [np.mean([s[f"dice_{r}"] for r in REGIONS]) for s in subsets.values()]
            row["dice_mean_over_subsets"] = float(np.mean(means))
            row["dice_mean_full"] = float(
                np.mean([subsets[ALL_SEQUENCES][f"dice_{r}"] for r in REGIONS])
            )
            out[case] = row
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (inverse of :meth:`from_dict`)."""
        return {
            "subsets": {
                k: {"dice": v.dice, "hd95": v.hd95, "n_cases": v.n_cases}
                for k, v in self.subsets.items()
            },
            "cases": self.cases,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            {
                k: SubsetScores(dict(v["dice"]), dict(v["hd95"]), int(v["n_cases"]))
                for k, v in data["subsets"].items()
            },
            {
                str(c): {str(k): {m: float(x) for m, x in v.items()} for k, v in subs.items()}
                for c, subs in data.get("cases", {}).items()
            },
        )

    @classmethod
    def mean_of(cls, results: Sequence[EvaluationResult]) -> EvaluationResult:
        """Subset means averaged over several results (e.g. seeds), subset by subset."""
        if not results:
            raise ValueError("mean_of needs at least one evaluation")
        subsets = {}
        for name in results[0].subsets:
            have = [r.subsets[name] for r in results if name in r.subsets]
            dice = {k: float(np.mean([s.dice[k] for s in have])) for k in have[0].dice}
            hd95 = {k: float(np.mean([s.hd95[k] for s in have])) for k in have[0].hd95}
            subsets[name] = SubsetScores(dice, hd95, sum(s.n_cases for s in have))
        return cls(subsets)

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Mapping[str, Any]],
        cases: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    ) -> EvaluationResult:
        """From the rows of :func:`segmerge.inference.evaluate.evaluate_subsets` (and the
        per-case scores of :func:`evaluate_subsets_per_case`)."""
        subsets = {}
        for row in rows:
            dice = {r: float(row[f"dice_{r}"]) for r in REGIONS}
            hd95 = {r: float(row[f"hd95_{r}"]) for r in REGIONS}
            dice["mean"] = float(np.mean(list(dice.values())))
            hd95["mean"] = float(np.mean(list(hd95.values())))
            subsets[str(row["subset"])] = SubsetScores(dice, hd95, int(row["n_cases"]))
        per_case = {
            str(c): {k: dict(v) for k, v in subs.items()} for c, subs in (cases or {}).items()
        }
        return cls(subsets, per_case)

    def mlflow_metrics(self, prefix: str = "study") -> dict[str, float]:
        """Flat keys: ``study/dice/wt``, ``study/subset/flair-t2/dice_mean``, ``study/robust/...``."""
        out: dict[str, float] = {}
        for region, value in self.full.dice.items():
            out[f"{prefix}/dice/{region}"] = value
        for region, value in self.full.hd95.items():
            out[f"{prefix}/hd95/{region}"] = value
        for name, scores in self.subsets.items():
            out[f"{prefix}/subset/{name.replace('+', '-')}/dice_mean"] = scores.dice["mean"]
        rob = self.robustness()
        out[f"{prefix}/robust/dice_mean_over_subsets"] = rob["dice_mean_over_subsets"]
        out[f"{prefix}/robust/worst_dice"] = rob["worst_dice"]
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def write_validation_datalist(items: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write ``{"validation": items}`` with absolute paths (atomically) and return its path.

    Raises:
        ValueError: no item, or an item without a label.
    """
    if not items:
        raise ValueError("evaluation needs at least one validation case, the dataset has none")
    rows = []
    for item in items:
        if not item.get("label"):
            raise ValueError(
                f"validation case {item.get('case_id', '?')}: no label to score against"
            )
        row = {"case_id": str(item["case_id"])} if item.get("case_id") else {}
        for key in (*MODALITIES, "label"):
            if item.get(key):
                row[key] = str(Path(item[key]).resolve())
        rows.append(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"validation": rows}, indent=1) + "\n")
    return path


def evaluate_model(
    model_path: str | Path,
    datalist: str | Path,
    network_def: Mapping[str, Any],
    roi_size: int,
    et_label: int = 4,
    device: str = "cpu",
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    out_dir: str | Path | None = None,
    config_file: str | Path | None = None,
) -> EvaluationResult:
    """Score a trained model on every subset of sequences of the cases of ``datalist``.

    Args:
        model_path: state dict written by training (``<bundle>/models/model.pt``).
        datalist: datalist of the cases to score (:func:`write_validation_datalist`).
        network_def: the training configuration's ``network_def`` (bundle data with
            ``_target_``), so that the weights fit the network.
        roi_size: sliding-window edge; the training patch size.
        et_label: enhancing-tumour label of the ground truth and the predictions (4 or 3).
        device: where the network runs (``cpu``, ``cuda``, ``cuda:1``).
        overlap: sliding-window overlap (gaussian blending).
        sw_batch_size: windows per forward pass.
        out_dir: where ``robustness.csv`` / ``robustness.md`` are written (the files of
            ``python -m segmerge evaluate --subsets all``); ``None`` writes nothing.
        config_file: inference bundle config (default: the repository's).

    Returns:
        Mean scores per subset (15 subsets).

    Raises:
        ValueError: the weights do not fit ``network_def``, or no case could be scored.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = build_predictor(
        config_file,
        model_path=str(Path(model_path).resolve()),
        device=str(device),
        network_def=dict(network_def),
        roi_size=[int(roi_size)] * 3,
        overlap=float(overlap),
        sw_batch_size=int(sw_batch_size),
        et_label=int(et_label),
    )
    rows, cases = evaluate_subsets_per_case(predictor, datalist)
    if out_dir is not None:
        write_robustness(rows, out_dir)
    result = EvaluationResult.from_rows(rows, cases)
    if ALL_SEQUENCES not in result.subsets or result.full.n_cases == 0:
        raise ValueError(f"{datalist}: no validation case could be scored (see the log above)")
    return result


def evaluate_subsets_per_case(
    predictor: Any, datalist: str | Path
) -> tuple[list[dict[str, Any]], dict[str, dict[str, dict[str, float]]]]:
    """The 15-subset rows and every case's scores
    (:func:`segmerge.inference.evaluate.evaluate_subsets_per_case` on all subsets)."""
    return per_case(predictor, datalist, "all")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m segmerge.study.evaluation SPEC.json``: one evaluation of a study, in its own
    process.

    ``SPEC.json`` holds the arguments of :func:`evaluate_model` plus ``result`` (where the
    :meth:`EvaluationResult.to_dict` JSON is written, atomically) and ``num_threads`` (intra-op
    threads, optional). Exit status 0 on success, 1 with the error on stderr otherwise.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m segmerge.study.evaluation SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    if spec.get("num_threads"):
        torch.set_num_threads(int(spec.pop("num_threads")))
    spec.pop("num_threads", None)
    result_path = Path(spec.pop("result"))
    try:
        result = evaluate_model(**spec)
    except (ValueError, FileNotFoundError) as err:
        print(f"segmerge study evaluation: error: {err}", file=sys.stderr)
        return 1
    write_text_atomic(result_path, json.dumps(result.to_dict()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
