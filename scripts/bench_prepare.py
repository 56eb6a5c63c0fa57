"""Benchmark and check ``segmerge prepare`` on synthetic raw scans (issue 14).

    python scripts/bench_prepare.py                    # brain-sized case at --spacing 1
    python scripts/bench_prepare.py --size 64 --spacing 2 --cases 2
    python scripts/bench_prepare.py --model-check      # WT Dice: prepared vs clean case

Timing mode: builds raw cases (:func:`segmerge.prepare.synthetic.make_raw_case`: phantom of
``--size`` voxels, at 160 about 1 mm, plus a skull/scalp shell, bias, its own rigid motion and
grid per sequence, reference 1 mm isotropic, others 0.9 x 0.9 x 3 mm), prepares them and prints
wall seconds per stage (read, register, resample, n4, skull_strip, write, qc), the process CPU
seconds of each case and of each stage (all ITK threads; on a shared machine the comparable
figure), the target registration error and the brain-mask Dice.

Model check (:mod:`segmerge.prepare.modelcheck`): trains a small MONAI UNet on clean phantoms
(skull-stripped, resampled to the prepared spacing; nnU-Net-style augmentation unless
``--no-augment``) and predicts (a) the clean version and (b) the prepared version of held-out
raw cases; prints WT Dice of both against their own ground truth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segmerge.prepare.pipeline import PrepareOptions, prepare_dataset  # noqa: E402
from segmerge.prepare.synthetic import evaluate_prepared, make_raw_case  # noqa: E402


def bench(args: argparse.Namespace, work: Path) -> dict:
    raw, out = work / "raw", work / "out"
    truths, gen, gen_cpu = {}, [], []
    for i in range(args.cases):
        t, c = time.perf_counter(), time.process_time()
        truths[f"case{i}"] = make_raw_case(
            raw / f"case{i}", size=args.size, seed=100 + i, scale=args.scale
        )
        gen.append(time.perf_counter() - t)
        gen_cpu.append(time.process_time() - c)
    print(f"generated {args.cases} raw case(s), load average {os.getloadavg()[0]:.1f}")
    first = sitk.ReadImage(str(raw / "case0" / "T1_GD.nii.gz"))
    opts = PrepareOptions(spacing=args.spacing, n4=not args.no_n4, deformable=args.deformable)
    t = time.perf_counter()
    report = prepare_dataset(raw, out, opts, workers=args.workers)
    total = time.perf_counter() - t
    print(report.summary())
    rows = []
    for cid, truth in truths.items():
        qc = json.loads((out / cid / "prepare" / "qc.json").read_text())
        m = evaluate_prepared(truth, out / cid)
        rows.append(
            {
                "case": cid,
                **qc["seconds"],
                "cpu": qc["cpu_seconds"],
                "cpu_stage": qc.get("cpu_seconds_by_stage", {}),
                **{
                    "tre_mean_max": max(m["tre_mean"].values()),
                    "brain_dice": m["brain_dice"],
                    "prepared_shape": qc["geometry"]["prepared"]["size"],
                },
            }
        )
    stages = ["read", "register", "resample", "n4", "skull_strip", "write", "qc"]
    print(
        f"\nreference {first.GetSize()} at {tuple(round(s, 2) for s in first.GetSpacing())} mm, "
        f"--spacing {args.spacing}, workers {args.workers}, ITK threads "
        f"{sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}, generation "
        f"{np.mean(gen):.1f} s/case wall, {np.mean(gen_cpu):.1f} CPU s/case"
    )
    print(
        "| case | " + " | ".join(stages) + " | total s | CPU s | worst mean TRE mm | brain Dice |"
    )
    print("|" + "---|" * (len(stages) + 5))
    for r in rows:
        tot = sum(r[s] for s in stages)
        print(
            f"| {r['case']} | "
            + " | ".join(f"{r[s]:.1f}" for s in stages)
            + f" | {tot:.1f} | {r['cpu']:.1f} | {r['tre_mean_max']:.2f} | {r['brain_dice']:.3f} |"
        )
    print("\nprocess CPU seconds per stage (all ITK threads):")
    print("| case | " + " | ".join(stages) + " | sum of stages | case CPU s |")
    print("|" + "---|" * (len(stages) + 3))
    for r in rows:
        cs = r["cpu_stage"]
        print(
            f"| {r['case']} | "
            + " | ".join(f"{cs.get(s, float('nan')):.1f}" for s in stages)
            + f" | {sum(cs.get(s, 0.0) for s in stages):.1f} | {r['cpu']:.1f} |"
        )
    print(f"run: {total:.1f} s wall for {args.cases} case(s) = {total / args.cases:.1f} s/case")
    print(f"load average (1, 5, 15 min) at end: {os.getloadavg()}")
    return {"rows": rows, "wall": total}


def model_check(args: argparse.Namespace, work: Path) -> dict:
    """WT Dice of a clean-trained model on clean vs prepared held-out cases (issue 14)."""
    import torch

    from segmerge.prepare import modelcheck as mc

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    train = [mc.clean_case(args.size, 1000 + i, args.spacing) for i in range(args.train_cases)]
    net = mc.train_model(
        train, args.steps, args.patch, args.channels, augment=not args.no_augment, log_every=100
    )
    took = time.perf_counter() - t0
    opts = PrepareOptions(spacing=args.spacing, n4=not args.no_n4, deformable=args.deformable)
    rows = mc.run_check(
        net,
        work,
        [2000 + i for i in range(args.cases)],
        size=args.size,
        spacing=args.spacing,
        patch=args.patch,
        scale=args.scale,
        options=opts,
        workers=args.workers,
    )
    print("| case | WT Dice clean | WT Dice prepared | difference |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r.case} | {r.clean:.3f} | {r.prepared:.3f} | {r.gap:+.3f} |")
    mc_, mp = np.mean([r.clean for r in rows]), np.mean([r.prepared for r in rows])
    print(f"| mean | {mc_:.3f} | {mp:.3f} | {mp - mc_:+.3f} |")
    aug = "without" if args.no_augment else "with"
    print(
        f"training {args.steps} steps ({aug} augmentation) on {args.train_cases} clean "
        f"phantoms: {took:.0f} s"
    )
    return {"rows": rows}


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # progress visible when redirected
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=160, help="phantom size (160: ~1 mm voxels)")
    ap.add_argument("--spacing", type=float, default=1.0, help="prepare --spacing (mm)")
    ap.add_argument(
        "--scale",
        type=float,
        default=None,
        help="acquisition spacing factor (default: the phantom's mean spacing)",
    )
    ap.add_argument("--cases", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-n4", action="store_true")
    ap.add_argument("--deformable", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="ITK threads (default: all cores)")
    ap.add_argument("--model-check", action="store_true", help="WT Dice prepared vs clean")
    ap.add_argument("--train-cases", type=int, default=12)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument(
        "--channels", type=int, nargs="+", default=[8, 16, 32, 64], help="UNet channels per level"
    )
    ap.add_argument(
        "--no-augment",
        action="store_true",
        help="model check: train without augmentation (the model then memorises the phantoms' "
        "shared anatomy and pose; see segmerge.prepare.modelcheck)",
    )
    ap.add_argument("--torch-threads", type=int, default=None, help="torch threads (model check)")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    if args.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at start, SimpleITK {sitk.Version.VersionString()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        if args.model_check:
            model_check(args, work)
        else:
            bench(args, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
