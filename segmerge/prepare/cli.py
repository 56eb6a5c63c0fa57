"""``python -m segmerge prepare``: raw scans (DICOM series or image files) -> BraTS cases.

    python -m segmerge prepare --input raw_scans --output prepared [--reference t1ce]
        [--spacing 1] [--no-n4] [--no-skull-strip] [--workers 2]

Exit status: 0 every case prepared, 1 some case failed (reported and skipped, the others
written), 2 the command could not run at all (bad options, no input folder).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from segmerge.conventions import MODALITIES, VALID_ET_LABELS

if TYPE_CHECKING:  # the pipeline (SimpleITK, nibabel) is imported after --help
    from segmerge.prepare.pipeline import PrepareOptions

__all__ = ["build_parser", "main", "options_from_args"]


def build_parser(prog: str = "python -m segmerge prepare") -> argparse.ArgumentParser:
    """The argument parser of ``prepare`` (``predict --prepare-args`` reuses its options)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Turn raw multi-sequence MRI (one folder per patient, DICOM series folders "
        "or NIfTI/NRRD/MHA files) into co-registered, resampled, bias-corrected, skull-stripped "
        "BraTS 2021 cases plus dataset.json, with per-case QC (JSON + montage) and the "
        "transforms that map predictions back.",
    )
    parser.add_argument("--input", required=True, help="folder with one sub-folder per patient")
    parser.add_argument("--output", required=True, help="prepared dataset folder (BraTS 2021)")
    add_options(parser)
    return parser


def add_options(parser: argparse.ArgumentParser) -> None:
    """Processing options shared by ``prepare`` and ``predict --prepare``."""
    parser.add_argument(
        "--reference",
        default="t1ce",
        choices=MODALITIES,
        help="sequence the others are registered to; its field of view is kept (default t1ce)",
    )
    parser.add_argument(
        "--spacing", type=float, default=1.0, help="isotropic output voxel size in mm (default 1)"
    )
    parser.add_argument("--no-n4", action="store_true", help="skip N4 bias-field correction")
    parser.add_argument(
        "--no-skull-strip",
        action="store_true",
        help="keep the head (no MNI152 brain extraction, no crop), e.g. for skull-stripped input",
    )
    parser.add_argument(
        "--deformable",
        action="store_true",
        help="refine the template registration with a B-spline before warping the brain mask",
    )
    parser.add_argument(
        "--names",
        metavar="FILE.json",
        help='sequence name mapping, e.g. {"flair": ["DARKFLUID"], "t1ce": ["T1_KM"]} (replaces '
        "the defaults of the keys it gives)",
    )
    parser.add_argument(
        "--max-metric",
        type=float,
        default=-0.15,
        help="a registration ending with a Mattes MI above this is treated as diverged and the "
        "case skipped (default -0.15; aligned MR pairs reach about -0.5 to -1.1)",
    )
    parser.add_argument(
        "--et-label",
        type=int,
        choices=VALID_ET_LABELS,
        default=4,
        help="enhancing-tumour label of seg files carried along (default 4)",
    )
    parser.add_argument("--workers", type=int, default=1, help="cases in parallel (default 1)")


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    """:class:`segmerge.prepare.pipeline.PrepareOptions` from parsed arguments."""
    from segmerge.prepare.pipeline import PrepareOptions

    return PrepareOptions(
        reference=args.reference,
        spacing=args.spacing,
        n4=not args.no_n4,
        skull_strip=not args.no_skull_strip,
        deformable=args.deformable,
        max_metric=args.max_metric,
        names=args.names,
        et_label=args.et_label,
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``prepare``; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if not args.spacing > 0:
        print(
            f"segmerge prepare: error: --spacing must be positive, got {args.spacing}",
            file=sys.stderr,
        )
        return 2
    if args.workers < 1:
        print(
            f"segmerge prepare: error: --workers must be at least 1, got {args.workers}",
            file=sys.stderr,
        )
        return 2
    from segmerge.prepare.io import PrepareError
    from segmerge.prepare.pipeline import prepare_dataset

    try:
        report = prepare_dataset(args.input, args.output, options_from_args(args), args.workers)
    except (PrepareError, ValueError) as err:
        print(f"segmerge prepare: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 1 if report.failures else 0
