"""Seconds per case of BraTS prediction on CPU: reading, inference, writing, for two backends.

    .venv/bin/python scripts/bench_inference.py                      # print the table
    nice -n 10 .venv/bin/python scripts/bench_inference.py --size 96 --repeats 2
    .venv/bin/python scripts/bench_inference.py --backends pytorch --out docs/bench_inference.md

The networks run through the very same predictor (``configs/inference.json``: MONAI LoadImaged,
RAS reorientation, z-scoring, SlidingWindowInferer with gaussian blending, sigmoid, Invertd,
nibabel writing): segmerge's ``MultiModalDSNet`` with the configured widths (the bundle's network),
segmerge's ``SharedModalityUNet`` with the same widths, and MONAI's stock ``SegResNet`` with
``init_filters`` chosen to have the closest parameter count to ``MultiModalDSNet`` (it takes no
availability mask, so a thin wrapper drops it): the reference of every ratio. With the PyTorch
backend one more row, for context only, runs that SegResNet with its convolutions turned into
``segmerge.nets.OneDNNConv3d`` (``use_onednn_convs``, the eval-mode oneDNN path segmerge's
networks take at batch 1): what stock SegResNet would cost with the same convolution kernel.
Weights are freshly initialised: speed does not depend on them. Each network runs with each backend (``pytorch``; ``onnxruntime``, the network
exported to ONNX and run by ONNX Runtime's CPU provider with the same thread count), side by side
in one run: one untimed warm-up on a small case, then ``--repeats`` timed runs, the fastest kept
(the least disturbed by other jobs on a shared machine). The ratios to SegResNet on the same
backend are the figures to compare between runs.

Phases: ``read`` = header checks + loading + preprocessing, ``inference`` = sliding window +
sigmoid + inversion to the input grid, ``write`` = thresholding, labels and the NIfTI/JSON writes.
"""

from __future__ import annotations

import argparse
import copy
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
from segmerge.inference.onnx import OnnxRuntimeNetwork, export_onnx
from segmerge.nets import SharedModalityUNet, use_onednn_convs

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
    network: nn.Module,
    data_dir: Path,
    out_dir: Path,
    warmup_dir: Path,
    backend: str = "pytorch",
    repeats: int = 1,
) -> dict[str, float]:
    """Predict the one case of ``data_dir`` with ``network``; seconds per phase of the fastest run.

    ``backend="onnxruntime"``: segmerge's network goes through the predictor's own
    ``backend="onnxruntime"`` path; SegResNet (which has no availability input, so its graph has
    none) gets the same :class:`OnnxRuntimeNetwork` installed by hand. Both then run the same
    sliding-window code.
    """
    values = {"model_path": None, "device": "cpu", "overwrite": True}
    takes_mask = not isinstance(network, _MaskIgnored)
    values["backend"] = backend if takes_mask else "pytorch"
    parser = load_bundle_config(overrides=values)
    parser["network_def"] = network
    predictor = parser.get_parsed_content("predictor")
    if backend == "onnxruntime" and not takes_mask:
        predictor._net = OnnxRuntimeNetwork(export_onnx(network), require_available=False)
    for case in discover_cases(warmup_dir):  # untimed: first-call allocations, thread pools
        predictor.predict_case(case, out_dir / "warmup")
    (case,) = discover_cases(data_dir)
    best: dict[str, float] | None = None
    for _ in range(max(1, repeats)):
        cpu0 = time.process_time()
        result = predictor.predict_case(case, out_dir)
        # CPU seconds of this process (all threads): less sensitive than wall time to other jobs
        # sharing the cores, which a busy machine adds to every wall-clock phase.
        cpu = time.process_time() - cpu0
        if result.status != "predicted":
            raise RuntimeError(f"benchmark case failed: {result.error}")
        run = {**result.seconds, "cpu": cpu}
        if best is None or run["inference"] < best["inference"]:
            best = run
    assert best is not None
    return best


def networks(
    ours: nn.Module, segresnet: SegResNet, filters: int, backend: str
) -> list[tuple[str, nn.Module]]:
    """The rows of one backend, ``(label, network)``; the reference (:func:`reference_label`) among them."""
    shared = SharedModalityUNet(
        modalities=ours.modalities, features=ours.features, deep_supervision=ours.deep_supervision
    )
    rows = [
        (f"segmerge MultiModalDSNet (features {list(ours.features)})", ours),
        (f"segmerge SharedModalityUNet (features {list(shared.features)})", shared),
        (reference_label(filters), _MaskIgnored(segresnet)),
    ]
    if backend == "pytorch":  # an exported graph is the same with or without the eval fast path
        onednn = use_onednn_convs(copy.deepcopy(segresnet))
        rows.append(("(context) SegResNet + use_onednn_convs", _MaskIgnored(onednn)))
    return rows


def reference_label(filters: int) -> str:
    """Label of the reference row: stock MONAI SegResNet."""
    return f"MONAI SegResNet (init_filters {filters})"


def per_window(
    ours: nn.Module,
    segresnet: SegResNet,
    filters: int,
    roi: list[int],
    backends: list[str],
    reps: int = 2,
) -> list[str]:
    """CPU milliseconds per sliding window of the networks alone, batch 1 and 8, per backend.

    Isolates the network from reading, blending and writing; CPU time (``time.process_time``) of
    this process, so other jobs on the machine matter less than for wall time.
    """
    lines = [
        "| network | backend | ms / window, batch 1 | ms / window, batch 8 |",
        "|---|---|---:|---:|",
    ]
    for backend in backends:
        for name, net in networks(ours, segresnet, filters, backend):
            net.eval()
            run = net
            if backend == "onnxruntime":
                run = OnnxRuntimeNetwork(export_onnx(net), require_available=False)
            cells = []
            for batch in (1, 8):
                x = torch.randn(batch, len(MODALITIES), *roi)
                available = torch.ones(batch, len(MODALITIES), dtype=torch.bool)
                with torch.no_grad():
                    run(x, available)  # warm-up
                    t0 = time.process_time()
                    for _ in range(reps):
                        run(x, available)
                cells.append(f"{(time.process_time() - t0) / reps / batch * 1000:.0f}")
            lines.append(f"| {name} | {backend} | {cells[0]} | {cells[1]} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and optionally write) a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=SIZE, help="cubic case edge in voxels")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (fastest kept)")
    parser.add_argument(
        "--backends", default="pytorch,onnxruntime", help="comma-separated: pytorch, onnxruntime"
    )
    parser.add_argument(
        "--per-window", action="store_true", help="time the networks alone per window instead"
    )
    parser.add_argument("--out", help="write the markdown report here")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    config = load_bundle_config()
    ours = config.get_parsed_content("network_def")
    segresnet, filters = matched_segresnet(n_params(ours))
    roi, overlap = config["roi_size"], config["overlap"]
    if args.per_window:
        lines = per_window(ours, segresnet, filters, list(roi), backends)
        head = f"Window {list(roi)}, `torch.set_num_threads({args.threads})`, CPU ms per window:"
        text = "\n".join([head, "", *lines]) + "\n"
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_case(tmp / "data", "bench", args.size, SEED)
        write_case(tmp / "warmup", "warm", 32, SEED + 1)
        for backend in backends:
            for name, net in networks(ours, segresnet, filters, backend):
                seconds = time_network(
                    net, tmp / "data", tmp / "out", tmp / "warmup", backend, args.repeats
                )
                rows.append((name, backend, n_params(net), seconds))
                print(
                    f"{name} [{backend}]: "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()),
                    flush=True,
                )

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        "# Inference speed (CPU)",
        "",
        f"`scripts/bench_inference.py`: one {args.size}^3 phantom case, seconds per phase, fastest of "
        f"{args.repeats} timed run(s) per row after an untimed 32^3 warm-up; fresh weights (speed "
        "does not depend on them). Ratio = this row / stock SegResNet's on the same backend.",
        f"Sliding window {roi}, overlap {overlap}, gaussian blending, sw_batch_size "
        f"{config['sw_batch_size']}; `torch.set_num_threads({args.threads})`.",
        "",
        "| network | backend | parameters | read (s) | inference (s) | write (s) | total (s) "
        "| CPU time (s) | ratio (wall) | ratio (CPU) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference = {b: s for name, b, _, s in rows if name == reference_label(filters)}
    for name, backend, params, s in rows:
        total = s["read"] + s["inference"] + s["write"]
        ref = reference[backend]
        lines.append(
            f"| {name} | {backend} | {params / 1e6:.2f} M | {s['read']:.2f} | {s['inference']:.2f} "
            f"| {s['write']:.2f} | {total:.2f} | {s['cpu']:.1f} "
            f"| {s['inference'] / ref['inference']:.2f} | {s['cpu'] / ref['cpu']:.2f} |"
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
