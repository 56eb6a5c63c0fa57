"""Check that a refactor changes nothing: train the same tiny configurations with two versions of
segmerge and compare the final weights tensor by tensor (``torch.equal``, bit for bit).

    .venv/bin/python scripts/check_identical_training.py                  # HEAD vs the working tree
    .venv/bin/python scripts/check_identical_training.py --ref 040dd3a    # a commit vs the working tree
    .venv/bin/python scripts/check_identical_training.py --ref 040dd3a --against HEAD
    .venv/bin/python scripts/check_identical_training.py --only sum gmd-refresh2 --keep /tmp/check

``--ref`` (and ``--against`` when given) is checked out with ``git worktree add --detach`` into a
temporary folder, removed afterwards; without ``--against`` the other side is the working tree
this script lives in (uncommitted edits included). Each side runs ``python -m segmerge train``
with this interpreter, ``PYTHONPATH`` set to its own tree (checked: ``segmerge.__file__`` must lie
in it), from an empty folder (so each side reads its own ``configs/``), on one thread, CPU, seed 0,
on the same phantom dataset (written once, by the ``--against`` side), with ``--weights last``.
It then loads both ``models/model.pt`` (``weights_only``) and compares keys, dtypes, shapes and
values. Exit status: 0 all identical, 1 a difference, 2 a run failed (its log tail is printed).

The configurations (``--list``): the tiny budget of ``configs/compare.json`` (features [4, 8, 16],
16³ patches, 24³ phantoms), 2 epochs of 2 steps with a validation after each (so Blending's
per-validation weights and GradCraft's momentum act on later steps), over the aggregators sum,
gmd, pcgrad (random order), gradcraft, blending (both estimators) and upgrad, the batched Jacobian
strategy, amortised refreshes (``--refresh-every 2``), the output Jacobian, and the shared network
with every modality subset (``--network shared --subsets all``). About 20-30 s per run on one
busy core, two runs per configuration.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

PHANTOMS = ["--cases", "4", "--size", "24", "--seed", "0", "--val-fraction", "0.25", "--quiet"]

COMMON = [
    "--device", "cpu", "--seed", "0", "--num_threads", "1", "--progress", "false",
    "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "1", "--patch-size", "16",
    "--val_every", "1", "--log_every", "1", "--weights", "last",
    "--validation#ogr_cases", "1", "--validation#sw_batch_size", "1",
    "--network_def#features", "[4, 8, 16]", "--network_def#deep_supervision", "2",
]  # fmt: skip
LATE = ["--network", "late", "--subsets", "none", "--network_def#aux_level", "1"]

CONFIGS: dict[str, list[str]] = {
    "sum": [*LATE, "--aggregator", "sum"],
    "gmd": [*LATE, "--aggregator", "gmd"],
    "pcgrad-random": [*LATE, "--aggregator", "pcgrad", "--order", "random"],
    "gradcraft": [*LATE, "--aggregator", "gradcraft", "--b", "0.9"],
    "blending-interval": [*LATE, "--aggregator", "blending", "--estimator", "interval"],
    "blending-gradient": [*LATE, "--aggregator", "blending", "--estimator", "gradient"],
    "upgrad": [*LATE, "--aggregator", "upgrad"],
    "gmd-batched": [*LATE, "--aggregator", "gmd", "--strategy", "batched"],
    "gmd-refresh2": [*LATE, "--aggregator", "gmd", "--refresh-every", "2"],
    "gmd-outputs": [*LATE, "--aggregator", "gmd", "--jacobian", "outputs"],
    "shared-all": ["--network", "shared", "--subsets", "all", "--aggregator", "gmd"],
}


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def _env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SEGMERGE_CONFIGS", "PYTHONPATH")}
    env.update(
        PYTHONPATH=str(tree),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        PYTHONHASHSEED="0",
        CUDA_VISIBLE_DEVICES="",
    )
    return env


def _check_import(tree: Path, scratch: Path) -> None:
    found = subprocess.run(
        [sys.executable, "-c", "import segmerge; print(segmerge.__file__)"],
        cwd=scratch, env=_env(tree), check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(
            f"PYTHONPATH={tree}: segmerge is imported from {found}, not from that tree"
        )


def _train(tree: Path, folder: Path, data: Path, args: list[str]) -> tuple[Path | None, float, str]:
    """Run one training in ``folder`` with ``tree``'s segmerge: (model.pt or None, seconds, log)."""
    folder.mkdir(parents=True)
    argv = [sys.executable, "-m", "segmerge", "train", "--data", str(data), *COMMON, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=folder, env=_env(tree), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (folder / "train.log").write_text(" ".join(argv) + "\n\n" + log, encoding="utf-8")
    model = folder / "models" / "model.pt"
    return (model if proc.returncode == 0 and model.is_file() else None), seconds, log


def compare_state_dicts(a: dict, b: dict) -> tuple[int, list[str]]:
    """(number of tensors compared, one line per difference: missing key, dtype, shape or value)."""
    problems = [f"{k}: only in the ref" for k in sorted(a.keys() - b.keys())]
    problems += [f"{k}: only in the tree" for k in sorted(b.keys() - a.keys())]
    common = sorted(a.keys() & b.keys())
    for k in common:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
        elif not torch.equal(x, y):
            diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else "-"
            problems.append(f"{k}: values differ (max |diff| {diff})")
    return len(common), problems


def _worktree(ref: str, parent: Path, label: str) -> tuple[Path, str]:
    sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    path = parent / f"{label}-{sha[:9]}"
    _git("worktree", "add", "--detach", "--quiet", str(path), sha)
    return path, sha


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="HEAD", help="git ref trained first (default HEAD)")
    ap.add_argument("--against", help="git ref compared with it (default: the working tree)")
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), help="these configurations only")
    ap.add_argument("--keep", type=Path, help="keep the runs (logs, models) in this new folder")
    ap.add_argument(
        "--against-extra",
        default="",
        help="train options added on the --against side only, to see the check fail "
        "(e.g. --against-extra '--lr 0.0031')",
    )
    ap.add_argument("--list", action="store_true", help="print the configurations and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, extra in CONFIGS.items():
            print(f"{name:<18} python -m segmerge train {' '.join(COMMON + extra)}")
        return 0
    names = args.only or list(CONFIGS)
    if args.keep is not None and args.keep.exists():
        ap.error(f"--keep {args.keep}: exists; give a new folder")
    scratch = Path(tempfile.mkdtemp(prefix="segmerge-identical-"))
    work = args.keep.absolute() if args.keep else scratch / "runs"
    trees: list[Path] = []
    status = 0
    try:
        ref_tree, ref_sha = _worktree(args.ref, scratch, "ref")
        trees.append(ref_tree)
        if args.against:
            new_tree, new_sha = _worktree(args.against, scratch, "against")
            trees.append(new_tree)
            new_label = f"{args.against} ({new_sha[:9]})"
        else:
            dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
            new_tree, new_label = ROOT, f"working tree{' (uncommitted edits)' if dirty else ''}"
        for tree in (ref_tree, new_tree):
            _check_import(tree, scratch)
        print(f"ref:     {args.ref} ({ref_sha[:9]})  {ref_tree}\nagainst: {new_label}  {new_tree}")
        if args.against_extra:
            print(f"against side only: {args.against_extra}")
        data = work / "phantoms"
        work.mkdir(parents=True)
        subprocess.run(
            [sys.executable, "-m", "segmerge", "phantoms", "--out", str(data), *PHANTOMS],
            cwd=work, env=_env(new_tree), check=True, capture_output=True, text=True,
        )  # fmt: skip
        rows = []
        for name in names:
            ma, ta, loga = _train(ref_tree, work / "ref" / name, data, CONFIGS[name])
            extra = CONFIGS[name] + shlex.split(args.against_extra)
            mb, tb, logb = _train(new_tree, work / "against" / name, data, extra)
            if ma is None or mb is None:
                for side, m, log in (("ref", ma, loga), ("against", mb, logb)):
                    if m is None:
                        tail = "\n    ".join(log.strip().splitlines()[-6:])
                        print(f"\n{name}: the {side} run failed:\n    {tail}")
                rows.append((name, ta, tb, "-", "RUN FAILED"))
                status = max(status, 2)
                continue
            a = torch.load(ma, map_location="cpu", weights_only=True)
            b = torch.load(mb, map_location="cpu", weights_only=True)
            n, problems = compare_state_dicts(a, b)
            if problems:
                status = max(status, 1)
                print(
                    f"\n{name}: {len(problems)} difference(s):\n    " + "\n    ".join(problems[:20])
                )
            verdict = "identical" if not problems else f"DIFFERENT ({len(problems)})"
            rows.append((name, ta, tb, str(n), verdict))
            print(f"  {name:<18} {verdict}", flush=True)
        print(f"\n{'configuration':<18} {'ref s':>7} {'against s':>9} {'tensors':>7}  result")
        for name, ta, tb, n, verdict in rows:
            print(f"{name:<18} {ta:7.1f} {tb:9.1f} {n:>7}  {verdict}")
        summary = {0: "all identical", 1: "DIFFERENCES FOUND", 2: "SOME RUNS FAILED"}[status]
        print(
            f"\n{summary} ({len(rows)} configurations)"
            + (f"; runs kept in {work}" if args.keep else "")
        )
    finally:
        for tree in trees:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True
            )
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
