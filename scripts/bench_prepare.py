"""Benchmark and check ``segmerge prepare`` on synthetic raw scans (issue 14).

    python scripts/bench_prepare.py                    # brain-sized case at --spacing 1
    python scripts/bench_prepare.py --size 64 --spacing 2 --cases 2
    python scripts/bench_prepare.py --model-check      # WT Dice: prepared vs clean case

Timing mode: builds raw cases (:func:`segmerge.prepare.synthetic.make_raw_case`: phantom of
``--size`` voxels, at 160 about 1 mm, plus a skull/scalp shell, bias, its own rigid motion and
grid per sequence, reference 1 mm isotropic, others 0.9 x 0.9 x 3 mm), prepares them and prints
wall seconds per stage (read, register, resample, n4, skull_strip, write, qc), the process CPU
seconds of each case, the target registration error and the brain-mask Dice.

Model check: trains a small MONAI UNet on clean phantoms (skull-stripped, resampled to the
prepared spacing) and predicts (a) the clean version and (b) the prepared version of held-out
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

from segmerge.conventions import MODALITIES, labels_to_regions  # noqa: E402
from segmerge.prepare.pipeline import PrepareOptions, prepare_dataset  # noqa: E402
from segmerge.prepare.synthetic import array_to_sitk, evaluate_prepared, make_raw_case  # noqa: E402


def bench(args: argparse.Namespace, work: Path) -> dict:
    raw, out = work / "raw", work / "out"
    truths, gen = {}, []
    for i in range(args.cases):
        t = time.perf_counter()
        truths[f"case{i}"] = make_raw_case(
            raw / f"case{i}", size=args.size, seed=100 + i, scale=args.scale
        )
        gen.append(time.perf_counter() - t)
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
        f"--spacing {args.spacing}, workers {args.workers}, generation {np.mean(gen):.1f} s/case"
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
    print(f"run: {total:.1f} s wall for {args.cases} case(s) = {total / args.cases:.1f} s/case")
    return {"rows": rows, "wall": total}


def _regions(label: np.ndarray) -> np.ndarray:
    return labels_to_regions(label, 4).astype(np.float32)


def _norm(vol: np.ndarray) -> np.ndarray:
    out = np.zeros_like(vol, dtype=np.float32)
    for c in range(vol.shape[0]):
        nz = vol[c] > 0
        if nz.any():
            out[c][nz] = (vol[c][nz] - vol[c][nz].mean()) / (vol[c][nz].std() + 1e-6)
    return out


def _clean_case(size: int, seed: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """A clean phantom resampled to isotropic ``spacing`` (what a BraTS-ready case looks like)."""
    from segmerge.data import make_phantom_case
    from segmerge.prepare.registration import isotropic_grid

    case = make_phantom_case(size=size, seed=seed)
    ref = array_to_sitk(case.images["t1ce"], case.affine)
    grid = isotropic_grid(ref, spacing)
    imgs = [
        sitk.GetArrayFromImage(
            sitk.Resample(
                array_to_sitk(case.images[m], case.affine),
                grid,
                sitk.Transform(),
                sitk.sitkLinear,
                0.0,
                sitk.sitkFloat32,
            )
        )
        for m in MODALITIES
    ]
    lab = sitk.GetArrayFromImage(
        sitk.Resample(
            array_to_sitk(case.label, case.affine),
            grid,
            sitk.Transform(),
            sitk.sitkNearestNeighbor,
            0,
            sitk.sitkUInt8,
        )
    )
    return np.stack(imgs), lab


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def model_check(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train = [_clean_case(args.size, 1000 + i, args.spacing) for i in range(args.train_cases)]
    train = [(_norm(x), _regions(y)) for x, y in train]
    net = UNet(3, 4, 3, channels=args.channels, strides=(2,) * (len(args.channels) - 1))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    loss_fn = DiceCELoss(sigmoid=True)
    p = args.patch
    t0 = time.perf_counter()
    for step in range(args.steps):
        xs, ys = [], []
        for _ in range(2):
            x, y = train[rng.integers(len(train))]
            # Half the patches centred on tumour (as RandCropByPosNegLabel would).
            if rng.random() < 0.5 and y[0].any():
                c = np.argwhere(y[0] > 0)[rng.integers(int((y[0] > 0).sum()))]
            else:
                c = np.array([rng.integers(s) for s in x.shape[1:]])
            lo = [int(np.clip(ci - p // 2, 0, max(0, s - p))) for ci, s in zip(c, x.shape[1:])]
            sl = tuple(slice(a, a + p) for a in lo)
            xp, yp = x[(slice(None), *sl)], y[(slice(None), *sl)]
            pad = [(0, 0)] + [(0, p - s) for s in xp.shape[1:]]
            xs.append(np.pad(xp, pad))
            ys.append(np.pad(yp, pad))
        loss = loss_fn(net(torch.from_numpy(np.stack(xs))), torch.from_numpy(np.stack(ys)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(
                f"step {step} loss {float(loss.detach()):.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    net.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = sliding_window_inference(
                torch.from_numpy(_norm(x))[None], (p,) * 3, 2, net, 0.25
            )
        return torch.sigmoid(logits[0]).numpy() > 0.5

    raw, out = work / "raw", work / "out"
    rows = []
    for i in range(args.cases):
        seed = 2000 + i
        cx, cy = _clean_case(args.size, seed, args.spacing)
        clean = _dice(predict(cx)[0], _regions(cy)[0] > 0)
        make_raw_case(raw / f"m{i}", size=args.size, seed=seed, scale=args.scale)
        rows.append({"case": f"m{i}", "clean": clean})
    opts = PrepareOptions(spacing=args.spacing, n4=not args.no_n4)
    prepare_dataset(raw, out, opts, workers=args.workers)
    for r in rows:
        case = out / r["case"]
        x = np.stack(
            [
                sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{r['case']}_{m}.nii.gz")))
                for m in MODALITIES
            ]
        )
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{r['case']}_seg.nii.gz")))
        r["prepared"] = _dice(predict(x)[0], _regions(y)[0] > 0)
    print("| case | WT Dice clean | WT Dice prepared | difference |\n|---|---|---|---|")
    for r in rows:
        diff = r["prepared"] - r["clean"]
        print(f"| {r['case']} | {r['clean']:.3f} | {r['prepared']:.3f} | {diff:+.3f} |")
    mc, mp = np.mean([r["clean"] for r in rows]), np.mean([r["prepared"] for r in rows])
    print(f"| mean | {mc:.3f} | {mp:.3f} | {mp - mc:+.3f} |")
    took = time.perf_counter() - t0
    print(f"training {args.steps} steps on {args.train_cases} clean phantoms: {took:.0f} s")
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
