"""``python -m segmerge predict --prepare``: raw scans -> prepared cases -> labels in scanner space.

OUTPUT/prepared/            the prepared BraTS dataset (as `segmerge prepare` writes it)
OUTPUT/prepared_grid/<case>.nii.gz   labels on the prepared (isotropic, cropped) grid
OUTPUT/<case>.nii.gz        labels on the reference sequence's original grid and affine
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from segmerge.inference.predictor import BratsPredictor

__all__ = ["predict_raw"]


def predict_raw(
    predictor: BratsPredictor,
    input_dir: str | os.PathLike,
    output: str | os.PathLike,
    prepare_args: str = "",
) -> int:
    """Prepare the raw cases of ``input_dir``, predict them, and map the labels back.

    Args:
        predictor: a :class:`segmerge.inference.BratsPredictor`.
        input_dir: raw scans, one folder per patient.
        output: the prediction folder (layout in the module docstring).
        prepare_args: options of ``segmerge prepare`` as one string, e.g. ``"--spacing 1"``.

    Returns:
        Exit status: 0 all cases predicted, 1 some case failed to prepare or predict.
    """
    import argparse

    from segmerge.prepare.cli import add_options, options_from_args
    from segmerge.prepare.pipeline import prepare_dataset
    from segmerge.prepare.restore import to_original

    parser = argparse.ArgumentParser(prog="python -m segmerge predict --prepare-args")
    add_options(parser)
    args = parser.parse_args(shlex.split(prepare_args))
    out = Path(output)
    prepared = out / "prepared"
    report = prepare_dataset(input_dir, prepared, options_from_args(args), args.workers)
    print(report.summary())
    done = [o for o in report.outcomes if o.status == "prepared"]
    status = 1 if report.failures else 0
    if not done:
        return 1
    pred = predictor.predict_dataset(prepared, out / "prepared_grid")  # logs its summary
    for r in pred.results:
        if r.status == "failed":
            status = 1
            continue
        grid_pred = out / "prepared_grid" / f"{r.case_id}.nii.gz"
        target = to_original(grid_pred, prepared / r.case_id, out / f"{r.case_id}.nii.gz")
        print(f"  {r.case_id}: labels in the original {target.name} geometry -> {target}")
    if pred.failures:
        print(f"{len(pred.failures)} case(s) failed to predict", file=sys.stderr)
    return status
