"""Benchmark of segmerge.data: phantom generation cost and loader rate vs training-step rate.

    .venv/bin/python scripts/bench_data.py            # ~1-2 min on 2 cores
    .venv/bin/python scripts/bench_data.py --cases 3 --samples 30 --json out.json

Goals (issue 3): <= 2 s per generated 96³ case on one core (generation + writing 5 gzipped
NIfTI files), and a training loader at least 3x faster (samples/s) than the training step.

The training step is measured as forward + backward + optimizer step of a plain summed loss
(BCE over every head): a *lower bound* on the real aggregated step (which adds per-objective
Jacobians), so the loader/step ratio printed is conservative. Two configurations:
``default``: configs/train.json (MultiModalDSNet, phantoms 64³, patch 48, batch 2), and
``dev-96``: the development-set geometry (96³ cases, patch 64, batch 2) with MONAI's 4.8M-parameter
``UNet`` as a stand-in network.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # generation is measured on one core
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from monai.data import DataLoader  # noqa: E402

from segmerge.data import (  # noqa: E402
    load_dataset,
    make_phantom_case,
    train_transforms,
    write_phantom_dataset,
)
from segmerge.engine.sampling import SeededCacheDataset, StreamSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bench_generation(tmp: Path, size: int, cases: int) -> dict:
    make_phantom_case(size=size, seed=0)  # load the template outside the timing
    gen, total, cpu = [], [], []
    for i in range(cases):
        t0 = time.perf_counter()
        make_phantom_case(size=size, seed=1000 + i)
        gen.append(time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), time.process_time()
        # one case through the public writer: 5 gzipped NIfTI files (+ a one-case dataset.json)
        write_phantom_dataset(
            tmp / f"gen{size}" / str(i), cases=1, size=size, seed=1000 + i, progress=False
        )
        total.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "size": size,
        "cases": cases,
        "generate_s_median": statistics.median(gen),
        "generate_and_write_s_median": statistics.median(total),
        "generate_and_write_s_max": max(total),
        # CPU seconds of this single-threaded process: the cost on one core even when the
        # shared machine is oversubscribed (wall time then includes waiting for a core).
        "generate_and_write_cpu_s_median": statistics.median(cpu),
    }


def _network(kind: str) -> torch.nn.Module:
    if kind == "default":
        cfg = json.loads((ROOT / "configs" / "train.json").read_text())["network_def"]
        from segmerge.nets import MultiModalDSNet

        kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
        return MultiModalDSNet(**kwargs)
    from monai.networks.nets import UNet

    return UNet(3, 4, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)


def bench_step(kind: str, patch: int, batch: int, steps: int) -> dict:
    net = _network(kind).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 4, patch, patch, patch)
    y = (torch.rand(batch, 3, patch, patch, patch) > 0.9).float()
    bce = torch.nn.BCEWithLogitsLoss()

    def loss_of(out) -> torch.Tensor:
        outs = out.values() if isinstance(out, dict) else [out]
        total = 0.0
        for o in outs:
            o = (
                o
                if o.shape[2:] == y.shape[2:]
                else torch.nn.functional.interpolate(o, size=y.shape[2:])
            )
            total = total + bce(o, y)
        return total

    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_of(net(x)).backward()
        opt.step()
        if i:  # first step is warm-up
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {
        "network": type(net).__name__,
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "patch": patch,
        "batch": batch,
        "step_s_median": step,
        "step_samples_per_s": batch / step,
    }


def bench_loader(
    tmp: Path,
    name: str,
    size: int,
    patch: int,
    batch: int,
    cases: int,
    samples: int,
    num_workers: int = 0,
) -> dict:
    path = tmp / name / "dataset.json"
    if not path.is_file():
        write_phantom_dataset(tmp / name, cases, size=size, seed=1, progress=False)
    spec = load_dataset(path, val_fraction=0.0)
    t0 = time.perf_counter()
    # the engine's training loader (TrainingData.loader): cached dataset, seeded stream sampler
    ds = SeededCacheDataset(spec.training, train_transforms(patch_size=patch), progress=False)
    steps = -(-samples // batch)
    sampler = StreamSampler(len(ds), batch, steps, seed=0)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=num_workers)
    cache_s = time.perf_counter() - t0
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n < samples:
        for b in loader:
            n += b["image"].shape[0]
            if n >= samples:
                break
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "size": size,
        "cases": cases,
        "cache_fill_s": cache_s,
        "samples": n,
        "loader_samples_per_s": n / dt,
        "loader_cpu_s_per_sample": cpu / n,  # main process only (workers not counted)
        "num_workers": num_workers,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=4, help="96³ cases timed for generation")
    ap.add_argument(
        "--samples", type=int, default=40, help="loader samples timed per configuration"
    )
    ap.add_argument("--steps", type=int, default=4, help="training steps timed per configuration")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training step")
    ap.add_argument("--json", default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at start"
    result: dict = {"machine": machine, "torch": torch.__version__}
    print(machine)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        torch.set_num_threads(1)
        result["generation"] = gen = bench_generation(tmp, 96, args.cases)
        print(
            f"phantom 96³, one core: generate {gen['generate_s_median']:.2f} s, generate+write "
            f"{gen['generate_and_write_s_median']:.2f} s wall = {gen['generate_and_write_cpu_s_median']:.2f} s CPU per case "
            f"(max wall {gen['generate_and_write_s_max']:.2f}; goal <= 2 s)"
        )
        for name, size, patch in (("default", 64, 48), ("dev-96", 96, 64)):
            torch.set_num_threads(args.threads)
            loader = bench_loader(tmp, name, size, patch, 2, 6, args.samples)
            step = bench_step(name, patch, 2, args.steps)
            ratio = loader["loader_samples_per_s"] / step["step_samples_per_s"]
            result[name] = {"loader": loader, "step": step, "loader_over_step": ratio}
            print(
                f"{name}: {size}³ cases, patch {patch}³, batch 2, {args.threads} threads | loader "
                f"{loader['loader_samples_per_s']:.1f} samples/s ({loader['loader_cpu_s_per_sample'] * 1000:.0f} ms CPU each; cache fill {loader['cache_fill_s']:.1f} s for 6 cases) | "
                f"step ({step['network']} {step['params_M']:.2f}M, plain fwd+bwd stand-in) {step['step_s_median']:.3f} s = "
                f"{step['step_samples_per_s']:.1f} samples/s | loader/step = {ratio:.1f}x (goal >= 3x)"
            )
            # Alternative: one loader process (torch gives it 1 thread; the main process keeps 2).
            alt = bench_loader(tmp, name, size, patch, 2, 6, args.samples, num_workers=1)
            result[name]["loader_num_workers_1"] = alt
            print(
                f"{name} with num_workers=1: loader {alt['loader_samples_per_s']:.1f} samples/s = "
                f"{alt['loader_samples_per_s'] / step['step_samples_per_s']:.1f}x the step"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
