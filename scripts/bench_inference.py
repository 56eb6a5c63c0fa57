"""Seconds per case of BraTS prediction at 128^3 on CPU: reading, inference, writing.

    .venv/bin/python scripts/bench_inference.py                      # print the table
    .venv/bin/python scripts/bench_inference.py --out docs/bench_inference.md

Two networks run through the very same predictor (``configs/inference.json``: MONAI LoadImaged,
RAS reorientation, z-scoring, SlidingWindowInferer with gaussian blending, sigmoid, Invertd,
nibabel writing): segmerge's ``MultiModalDSNet`` with the configured widths, and MONAI's stock
``SegResNet`` with ``init_filters`` chosen to have the closest parameter count (it takes no
availability mask, so a thin wrapper drops it). Weights are freshly initialised: speed does not
depend on them. One untimed warm-up on a small case, then one timed run per network.

Phases: ``read`` = header checks + loading + preprocessing, ``inference`` = sliding window +
sigmoid + inversion to the input grid, ``write`` = thresholding, labels and the NIfTI/JSON writes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import torch
from monai.networks.nets import SegResNet
from torch import nn

from segmerge.conventions import BRATS2021_SUFFIX, MODALITIES, REGIONS
from segmerge.data import make_phantom_case
from segmerge.inference import discover_cases, load_bundle_config

# ---- defaults ----------------------------------------------------------------------------------
SIZE = 128
THREADS = 2
SEED = 0


class _MaskIgnored(nn.Module):
    """Give a single-input MONAI network the ``forward(x, available)`` signature of the predictor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def n_params(net: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in net.parameters())


def matched_segresnet(target: int) -> tuple[SegResNet, int]:
    """MONAI SegResNet (default blocks) whose ``init_filters`` gives the parameter count closest to ``target``."""

    def build(f: int) -> SegResNet:
        return SegResNet(
            spatial_dims=3, in_channels=len(MODALITIES), out_channels=len(REGIONS), init_filters=f
        )

    # default GroupNorm(8 groups): init_filters must be a multiple of 8
    best = min(range(8, 65, 8), key=lambda f: abs(n_params(build(f)) - target))
    return build(best), best


def write_case(root: Path, case_id: str, size: int, seed: int) -> None:
    """One phantom case in BraTS 2021 layout."""
    case = make_phantom_case(size=size, seed=seed)
    folder = root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    for key, arr in case.images.items():
        nib.save(
            nib.Nifti1Image(arr, case.affine), folder / f"{case_id}_{BRATS2021_SUFFIX[key]}.nii.gz"
        )


def time_network(
    network: nn.Module, data_dir: Path, out_dir: Path, warmup_dir: Path
) -> dict[str, float]:
    """Predict the one case of ``data_dir`` with ``network``; return the seconds per phase."""
    parser = load_bundle_config(overrides={"model_path": None, "device": "cpu", "overwrite": True})
    parser["network_def"] = network
    predictor = parser.get_parsed_content("predictor")
    for case in discover_cases(warmup_dir):  # untimed: first-call allocations, thread pools
        predictor.predict_case(case, out_dir / "warmup")
    (case,) = discover_cases(data_dir)
    cpu0 = time.process_time()
    result = predictor.predict_case(case, out_dir)
    # CPU seconds of this process (all threads): less sensitive than wall time to other jobs
    # sharing the cores, which a busy machine adds to every wall-clock phase.
    cpu = time.process_time() - cpu0
    if result.status != "predicted":
        raise RuntimeError(f"benchmark case failed: {result.error}")
    return {**result.seconds, "cpu": cpu}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and optionally write) a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=SIZE, help="cubic case edge in voxels")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads")
    parser.add_argument("--out", help="write the markdown report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    config = load_bundle_config()
    ours = config.get_parsed_content("network_def")
    segresnet, filters = matched_segresnet(n_params(ours))
    roi, overlap = config["roi_size"], config["overlap"]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_case(tmp / "data", "bench", args.size, SEED)
        write_case(tmp / "warmup", "warm", 32, SEED + 1)
        for name, net in (
            (f"segmerge MultiModalDSNet (features {list(ours.features)})", ours),
            (f"MONAI SegResNet (init_filters {filters})", _MaskIgnored(segresnet)),
        ):
            seconds = time_network(net, tmp / "data", tmp / "out", tmp / "warmup")
            rows.append((name, n_params(net), seconds))
            print(f"{name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()), flush=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        "# Inference speed (CPU)",
        "",
        f"`scripts/bench_inference.py`: one {args.size}^3 phantom case, seconds per phase, one timed run "
        "per network after an untimed 32^3 warm-up; fresh weights (speed does not depend on them).",
        f"Sliding window {roi}, overlap {overlap}, gaussian blending, sw_batch_size "
        f"{config['sw_batch_size']}; `torch.set_num_threads({args.threads})`.",
        "",
        "| network | parameters | read (s) | inference (s) | write (s) | total (s) | CPU time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, params, s in rows:
        total = s["read"] + s["inference"] + s["write"]
        lines.append(
            f"| {name} | {params / 1e6:.2f} M | {s['read']:.2f} | {s['inference']:.2f} | {s['write']:.2f} | {total:.2f} | {s['cpu']:.1f} |"
        )
    lines += [
        "",
        "read = header checks + LoadImaged + stacking + RAS + z-scoring; inference = sliding window + "
        "sigmoid + Invertd back to the input grid; write = threshold, labels, NIfTI + JSON. "
        "read/inference/write are wall-clock seconds; CPU time is this process's CPU seconds over all "
        "threads for the whole case.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, load average during the run {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(1/5/15 min; a load above the core count means the figures include waiting for shared cores).",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
