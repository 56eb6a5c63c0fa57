"""``python -m segmerge predict`` and ``python -m segmerge evaluate``.

    python -m segmerge predict --input data/phantoms --output predictions [--model models/model.pt]
    python -m segmerge evaluate --pred predictions --gt data/phantoms
    python -m segmerge evaluate --subsets all --input data/phantoms --model models/model.pt --out eval

Both build the predictor from ``configs/inference.json`` (the bundle's config), so they run the
same network, transforms and sliding window as ``python -m monai.bundle run``. ``--set ID=VALUE``
overrides any config id; VALUE follows the rule of :mod:`segmerge.overrides` shared with ``train``
and ``compare`` (a literal: JSON, else a Python literal, else the text; ``$``/``@``/``%`` only
evaluated with ``--expr``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from segmerge.conventions import VALID_ET_LABELS
from segmerge.overrides import EXPRESSION_HELP, RULE_HELP, for_argparse, parse_assignments

__all__ = ["predict_main", "evaluate_main"]


def _overrides(pairs: list[str], expressions: bool = False) -> dict[str, Any]:
    return parse_assignments(pairs, expressions=expressions)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="state dict to load (default: <bundle>/models/model.pt)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:0 if available)")
    parser.add_argument(
        "--et-label",
        type=int,
        choices=VALID_ET_LABELS,
        default=None,
        help="label of enhancing tumour: 4 (BraTS <= 2022, default) or 3 (2023+)",
    )
    parser.add_argument("--config", help="bundle config (default: configs/inference.json)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="override a config id, e.g. --set roi_size=[96,96,96] (repeatable); "
        + for_argparse(RULE_HELP),
    )
    parser.add_argument("--expr", action="store_true", help=for_argparse(EXPRESSION_HELP))


def _predictor_overrides(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(extra)
    if args.model:
        values["model_path"] = str(Path(args.model).resolve())
    if args.device:
        values["device"] = args.device
    if args.et_label is not None:
        values["et_label"] = args.et_label
    values.update(_overrides(args.set, expressions=args.expr))
    return values


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout
    )


def predict_main(argv: list[str]) -> int:
    """Predict every case of a BraTS folder or datalist; exit status 1 if any case failed."""
    parser = argparse.ArgumentParser(
        prog="python -m segmerge predict",
        description="Predict BraTS label maps (uint8, the input's shape and affine) for every case.",
    )
    parser.add_argument("--input", required=True, help="BraTS-layout folder or datalist JSON")
    parser.add_argument("--output", required=True, help="folder for <case>.nii.gz and <case>.json")
    parser.add_argument("--overwrite", action="store_true", help="replace existing predictions")
    parser.add_argument(
        "--probabilities",
        action="store_true",
        help="also write <case>_probabilities.nii.gz (WT, TC, ET on the last axis)",
    )
    parser.add_argument(
        "--backend",
        choices=("pytorch", "onnxruntime"),
        default=None,
        help="pytorch (default) or onnxruntime (CPU: the network is exported to ONNX once, with "
        "its availability input; needs the 'export' extra)",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="--input holds raw scans (one folder per patient): run `segmerge prepare` first "
        "(into OUTPUT/prepared), predict, and also write the labels in the reference sequence's "
        "original geometry (OUTPUT/<case>.nii.gz; prepared grid: OUTPUT/prepared_grid)",
    )
    parser.add_argument(
        "--prepare-args",
        default="",
        metavar="'OPTIONS'",
        help="options of `segmerge prepare` for --prepare, e.g. '--spacing 1 --reference t1'",
    )
    _common(parser)
    args = parser.parse_args(argv)
    _setup_logging()
    from segmerge.inference.bundle import build_predictor  # heavy imports after --help
    from segmerge.inference.predictor import check_device

    try:
        if args.device:
            check_device(args.device)  # before the config moves the network there
        extra: dict[str, Any] = {"overwrite": args.overwrite, "probabilities": args.probabilities}
        if args.backend:
            extra["backend"] = args.backend
            if args.backend == "onnxruntime" and not args.device:
                extra["device"] = "cpu"  # ONNX Runtime's CPU provider
        predictor = build_predictor(args.config, **_predictor_overrides(args, **extra))
        if args.prepare:  # raw scans: segmerge.prepare owns this flow
            from segmerge.prepare.predict import predict_raw

            return predict_raw(predictor, args.input, args.output, args.prepare_args)
        report = predictor.predict_dataset(args.input, args.output)  # logs its summary once
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"segmerge predict: error: {err}", file=sys.stderr)
        return 2
    return 1 if report.failures else 0


def evaluate_main(argv: list[str]) -> int:
    """Score predictions (Dice, HD95 per region) and/or the model on every subset of sequences."""
    parser = argparse.ArgumentParser(
        prog="python -m segmerge evaluate",
        description="Per-case and mean Dice/HD95 of WT, TC, ET as CSV and JSON; with --subsets, a "
        "robustness table of the model over subsets of the input sequences.",
    )
    parser.add_argument("--pred", help="folder of <case>.nii.gz predictions")
    parser.add_argument(
        "--gt", help="ground truth: BraTS folder, datalist, or folder of <case>.nii.gz"
    )
    parser.add_argument(
        "--out", help="where metrics/robustness files go (default: --pred, else ./evaluation)"
    )
    parser.add_argument(
        "--subsets",
        help="'all' (15 subsets) or e.g. 'flair+t1ce,t2': run the model on "
        "--input with only these sequences",
    )
    parser.add_argument("--input", help="dataset with input sequences (for --subsets)")
    parser.add_argument(
        "--metrics",
        choices=("legacy", "lesionwise", "all"),
        default="all",
        help="legacy: whole-volume Dice/HD95 (BraTS 2021); lesionwise: the official BraTS 2023+ "
        "lesion-wise Dice/HD95/NSD, lesion TP/FP/FN/F1 and global NSD; all (default): both",
    )
    parser.add_argument(
        "--resection-cavity",
        action="store_true",
        help="BraTS 2024+ adult glioma labels: 4 is the resection cavity (in no region; "
        "needs --et-label 3)",
    )
    _common(parser)
    args = parser.parse_args(argv)
    if not args.pred and not args.subsets:
        parser.error("give --pred (with --gt) to score predictions, and/or --subsets with --input")
    if args.pred and not args.gt:
        parser.error("--pred needs --gt")
    if args.subsets and not args.input:
        parser.error("--subsets needs --input (the dataset to predict)")
    _setup_logging()
    from segmerge.inference.bundle import build_predictor
    from segmerge.inference.evaluate import (
        evaluate_predictions,
        evaluate_subsets,
        write_evaluation,
        write_robustness,
    )

    out = Path(args.out or args.pred or "evaluation")
    status = 0
    try:
        if args.pred:
            et_label = args.et_label if args.et_label is not None else 4
            result = evaluate_predictions(
                args.pred, args.gt, et_label, args.metrics, args.resection_cavity
            )
            csv_path, json_path = write_evaluation(result, out)
            mean = result.aggregate("mean")
            print(f"{len(result.rows)} case(s) scored -> {csv_path}, {json_path}")
            print("mean " + "  ".join(f"{k}={v:.4f}" for k, v in mean.items()))
            for case_id in result.missing:
                print(f"  {case_id}: no prediction (scored as empty)")
            for case_id, err in result.errors.items():
                print(f"  {case_id}: not scored: {err}")
            if result.missing or result.errors:
                status = 1
        if args.subsets:
            predictor = build_predictor(args.config, **_predictor_overrides(args))
            rows = evaluate_subsets(predictor, args.input, args.subsets, gt=args.gt)
            csv_path, md_path = write_robustness(rows, out)
            print(md_path.read_text())
            print(f"-> {csv_path}, {md_path}")
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"segmerge evaluate: error: {err}", file=sys.stderr)
        return 2
    return status
