"""Command-line entries of ``segmerge.data``.

    python -m segmerge phantoms --out data/phantoms --cases 120 --size 96 --seed 0 --workers 2 \\
        [--et-label 4|3] [--layout brats2021|brats2023] [--val-fraction 0.2] [--preview p.png]
    python -m segmerge check-data data/phantoms [--et-label 4] [--allow-missing]
"""

from __future__ import annotations

import argparse
import sys
import time

from segmerge.data.dataset import LAYOUTS, DatasetError, load_dataset


def phantoms_main(argv: list[str] | None = None) -> int:
    """``python -m segmerge phantoms``: write a BraTS-like phantom dataset (see ``--help``).

    Args:
        argv: command-line arguments after the command name.

    Returns:
        Exit status (0 on success).
    """
    ap = argparse.ArgumentParser(
        prog="segmerge phantoms",
        description="Write BraTS-like phantoms built on the MNI152 anatomy.",
    )
    ap.add_argument("--out", required=True, help="dataset folder to write")
    ap.add_argument("--cases", type=int, default=20, help="number of cases (default 20)")
    ap.add_argument("--size", type=int, default=96, help="cube edge in voxels (default 96)")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    ap.add_argument(
        "--et-label",
        type=int,
        default=4,
        choices=(4, 3),
        help="enhancing-tumour label (4: BraTS 2021, 3: 2023)",
    )
    ap.add_argument(
        "--layout",
        default="brats2021",
        choices=sorted(LAYOUTS),
        help="folder layout (default brats2021)",
    )
    ap.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="validation fraction in dataset.json (default 0.2)",
    )
    ap.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--preview", default=None, help="also write a montage PNG of the first cases")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    # after parsing: --help stays fast
    from segmerge.data.phantom_io import write_phantom_dataset, write_preview

    t0 = time.perf_counter()
    try:
        path = write_phantom_dataset(
            args.out,
            args.cases,
            size=args.size,
            seed=args.seed,
            et_label=args.et_label,
            layout=args.layout,
            val_fraction=args.val_fraction,
            workers=args.workers,
            progress=not args.quiet,
        )
    except ValueError as e:
        print(f"segmerge phantoms: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    spec = load_dataset(path, et_label=args.et_label)
    print(
        f"wrote {len(spec)} cases ({len(spec.training)} training, {len(spec.validation)} validation) "
        f"of {args.size}³ to {path.parent} in {dt:.1f} s; datalist {path}"
    )
    if args.preview:
        png = write_preview(spec.all_items(), args.preview, et_label=args.et_label)
        print(f"preview: {png}")
    return 0


def check_data_main(argv: list[str] | None = None) -> int:
    """``python -m segmerge check-data PATH``: list every problem of a dataset.

    Args:
        argv: command-line arguments after the command name.

    Returns:
        0 when the dataset is valid, 1 when problems were found, 2 on usage errors.
    """
    ap = argparse.ArgumentParser(
        prog="segmerge check-data",
        description="Validate a dataset (datalist JSON or BraTS folder).",
    )
    ap.add_argument(
        "path", help="datalist .json, folder with dataset.json, or BraTS 2021/2023 folder"
    )
    ap.add_argument(
        "--et-label", type=int, default=4, choices=(4, 3), help="enhancing-tumour label (default 4)"
    )
    ap.add_argument(
        "--allow-missing", action="store_true", help="accept cases with absent modality files"
    )
    ap.add_argument(
        "--resection-cavity",
        action="store_true",
        help="BraTS 2024+ adult glioma labels: 4 is the resection cavity (needs --et-label 3)",
    )
    ap.add_argument(
        "--affine-tol", type=float, default=1e-3, help="affine tolerance in mm (default 1e-3)"
    )
    ap.add_argument("--workers", type=int, default=2, help="cases read at once (default 2)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    # after parsing: --help stays fast
    from segmerge.data.validate import format_problems, validate_dataset

    try:
        spec = load_dataset(args.path, et_label=args.et_label, allow_missing=args.allow_missing)
    except DatasetError as e:
        print(f"* | {args.path} | dataset readable | {e}")
        print("1 problem: the dataset cannot be read", file=sys.stderr)
        return 1
    try:
        problems = validate_dataset(
            spec,
            affine_tol=args.affine_tol,
            progress=not args.quiet,
            workers=args.workers,
            resection_cavity=args.resection_cavity,
        )
    except ValueError as e:  # a label scheme that does not exist (cavity without et_label 3)
        print(f"check-data: error: {e}", file=sys.stderr)
        return 2
    if spec.ignored:  # predict reports them as cases it cannot predict
        names = ", ".join(d.name for d in spec.ignored[:10])
        more = f" and {len(spec.ignored) - 10} more" if len(spec.ignored) > 10 else ""
        print(
            f"note: {len(spec.ignored)} subfolder(s) hold no case files and are not read: "
            f"{names}{more}",
            file=sys.stderr,
        )
    n_cases = len(spec)
    if problems:
        print("case | file | rule | found")
        print(format_problems(problems))
        bad = len({p.case for p in problems})
        print(
            f"{len(problems)} problem(s) in {bad} case(s) of {n_cases} ({spec.layout} at {spec.source})",
            file=sys.stderr,
        )
        return 1
    print(
        f"OK: {n_cases} cases ({len(spec.training)} training, {len(spec.validation)} validation, "
        f"{len(spec.testing)} testing), layout {spec.layout}, et_label {args.et_label}"
    )
    return 0
