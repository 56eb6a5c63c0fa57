"""Benchmark the aggregated training step against the plain summed-loss step.

Run (CPU, 2 threads, the default ``MultiModalDSNet`` — K = 3 fused depths + 4 modality heads)::

    .venv/bin/python scripts/bench_step.py                      # 32^3, batch 2, table to stdout
    .venv/bin/python scripts/bench_step.py --size 48 --md docs/bench_step.md

Every variant runs in its own subprocess (same seed, same data) so that its peak memory can be
read from ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak resident set size,
Linux: KiB); the figure printed is the peak over the warm-up and timed steps minus the resident
size just before them (model, optimizer and batch built), i.e. the extra memory the step needs
(autograd graph, Jacobian, optimizer state, buffers).
On CUDA ``torch.cuda.max_memory_allocated`` is reported instead. Each figure is a ratio to the
``sum`` variant (forward + ``losses.sum().backward()`` + Adam step; ``Adam(fused=True)`` in
every variant), from medians of per-step
times after one warm-up step; both wall-clock and process CPU time are recorded (CPU time is
less sensitive to other processes on a shared machine).

Variants:
    sum            forward + backward of the summed loss + optimizer step
    gmd_loop       TrainStep(GMD, strategy="loop"): retained backward per objective, the
                   modality objectives (pairwise disjoint reach) fused into one backward
    gmd_loop_plain the same without the disjoint fusion (one backward per objective)
    gmd_batched    TrainStep(GMD, strategy="batched"): one vmapped backward (is_grads_batched)
    gmd_amortised4 TrainStep(GMD, refresh_every=4), averaged over whole refresh cycles
    gmd_amortised8 TrainStep(GMD, refresh_every=8)
    torchjd_pcgrad torchjd.autojac.backward + jac_to_grad(PCGrad()) + optimizer step
    seed_gmd       the seed-style recipe: one retained backward() per objective, flatten .grad
                   into D-vectors, GMD as Python loops over D-vectors, masked merge, step
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# Defaults (one block): CPU-sized input of the default network.
SIZE = 32
BATCH = 2
THREADS = 2
STEPS = 2  # timed steps per exact variant, after one warm-up step
VARIANTS = (
    "sum",
    "gmd_loop",
    "gmd_loop_plain",
    "gmd_batched",
    "gmd_amortised4",
    "gmd_amortised8",
    "torchjd_pcgrad",
    "seed_gmd",
)


def _seed_gmd_step(net, opt, objectives, x, t):
    """The seed-style recipe (slow reference): K retained backward() calls, D-vector loops."""
    import torch

    outputs = net(x)
    names = list(objectives(outputs, t).names)  # row names / order from the objective set
    rows = [objectives({n: outputs[n]}, t).losses[0] for n in names]  # K separate scalars
    params = [p for p in net.parameters() if p.requires_grad]
    grads, reached = [], []
    for k, loss in enumerate(rows):
        opt.zero_grad(set_to_none=True)
        loss.backward(retain_graph=k < len(rows) - 1)
        reached.append([p.grad is not None for p in params])
        grads.append(
            torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        )
    proj = [g.clone() for g in grads]
    for i in range(len(proj)):
        for j in range(len(grads)):
            d = torch.dot(proj[i], grads[j])
            nn = torch.dot(grads[j], grads[j])
            if d < 0 and nn > 0:  # host syncs, as in the seed
                alpha = (d / nn).clamp(-2.0, 1.0)
                proj[i] = proj[i] - alpha * grads[j]
    merged = torch.stack(proj).sum(0)
    shared = torch.cat(
        [
            torch.full((p.numel(),), all(r[j] for r in reached), dtype=torch.bool)
            for j, p in enumerate(params)
        ]
    )
    merged = torch.where(shared, merged / len(proj), merged)
    offset = 0
    for p in params:
        p.grad = merged[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    opt.step()


def worker(variant: str, size: int, batch: int, threads: int, steps: int) -> dict:
    """Run one variant in this process; return timings and peak memory."""
    import torch

    from segmerge.aggregation import build_aggregator
    from segmerge.nets import MultiModalDSNet
    from segmerge.objectives import ObjectiveSet
    from segmerge.step import TrainStep

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = MultiModalDSNet().to(device).train()
    # fused Adam for every variant: the recommended setting (TrainStep skips non-finite steps
    # through its found_inf input at no cost; other optimizers pay a snapshot/restore copy).
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    objectives = ObjectiveSet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size, size, size, generator=g).to(device)
    t = (torch.rand(batch, 3, size, size, size, generator=g) > 0.8).float().to(device)

    refresh = {"gmd_amortised4": 4, "gmd_amortised8": 8}.get(variant, 1)
    ts = None
    if variant.startswith("gmd_") and variant != "gmd_batched":
        ts = TrainStep(
            net, opt, build_aggregator("gmd"), strategy="loop", refresh_every=refresh,
            fuse_disjoint=variant != "gmd_loop_plain",
        )
    elif variant == "gmd_batched":
        ts = TrainStep(net, opt, build_aggregator("gmd"), strategy="batched")
    if variant == "torchjd_pcgrad":
        from torchjd.aggregation import PCGrad
        from torchjd.autojac import backward as jd_backward
        from torchjd.autojac import jac_to_grad

        pcgrad = PCGrad()
    params = [p for p in net.parameters() if p.requires_grad]
    info: dict = {}

    def one_step() -> None:
        if variant == "sum":
            opt.zero_grad(set_to_none=True)
            objectives(net(x), t).losses.sum().backward()
            opt.step()
        elif variant == "torchjd_pcgrad":
            opt.zero_grad(set_to_none=True)
            jd_backward(objectives(net(x), t).losses, inputs=params)
            jac_to_grad(params, pcgrad)
            opt.step()
        elif variant == "seed_gmd":
            _seed_gmd_step(net, opt, objectives, x, t)
        else:
            report = ts.step(objectives(net(x), t))
            info["backward_passes"] = max(info.get("backward_passes", 0), report.backward_passes)
            info.setdefault("refreshed", []).append(report.refreshed)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Peak memory baseline: model, optimizer and batch built, no step run yet.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    one_step()  # warm-up (allocator, kernels, vmap setup); a refresh step for amortised ones
    sync()
    if ts is not None:
        ts.steps = 0  # timed steps start a refresh cycle
        info.pop("refreshed", None)
    n = max(steps, 2 * refresh) if refresh > 1 else steps
    walls, cpus = [], []
    for _ in range(n):
        w0, c0 = time.perf_counter(), time.process_time()
        one_step()
        sync()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    # Amortised variants: mean over whole refresh cycles (the cost per step in a long run).
    agg = statistics.mean if refresh > 1 else statistics.median
    return {
        "variant": variant,
        "wall_s": agg(walls),
        "cpu_s": agg(cpus),
        "walls": walls,
        "peak_mib": peak_mib,
        "device": str(device),
        **info,
    }


def _table(results: list[dict], args: argparse.Namespace) -> str:
    base = next(r for r in results if r["variant"] == "sum")
    lines = [
        f"MultiModalDSNet defaults (K = 7), input {args.batch}x4x{args.size}^3, "
        f"{args.threads} threads, device {base['device']}, torch {args.torch_version}",
        "",
        "| variant | wall s/step | CPU s/step | wall ratio | CPU ratio | backward passes | peak extra MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['wall_s'] / base['wall_s']:.2f} | {r['cpu_s'] / base['cpu_s']:.2f} | "
            f"{r.get('backward_passes', '-')} | {r['peak_mib']:.0f} |"
        )
    by = {r["variant"]: r for r in results}
    if {"gmd_loop", "seed_gmd", "torchjd_pcgrad", "gmd_amortised8"} <= set(by):
        lines += ["", "Goals (CPU-time ratios; wall-clock in brackets):"]
        for label, num, den, goal in (
            ("exact GMD (loop) / seed recipe <= 1.1", "gmd_loop", "seed_gmd", 1.1),
            ("exact GMD (batched) / seed recipe <= 1.1", "gmd_batched", "seed_gmd", 1.1),
            ("exact GMD (loop) / torchjd PCGrad < 1", "gmd_loop", "torchjd_pcgrad", 1.0),
            ("amortised N=8 / summed step <= 1.35", "gmd_amortised8", "sum", 1.35),
        ):
            if num not in by:
                continue
            cpu = by[num]["cpu_s"] / by[den]["cpu_s"]
            wall = by[num]["wall_s"] / by[den]["wall_s"]
            ok = "met" if cpu <= goal else "NOT met"
            lines.append(f"- {label}: {cpu:.2f} ({wall:.2f}) -> {ok}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--md", help="also write the table to this markdown file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        res = worker(args.worker, args.size, args.batch, args.threads, args.steps)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if "sum" not in args.variants:
        args.variants.insert(0, "sum")
    import torch

    args.torch_version = torch.__version__
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--worker", variant, "--size", str(args.size),
               "--batch", str(args.batch), "--threads", str(args.threads),
               "--steps", str(args.steps)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{variant}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        res = json.loads(lines[-1][len("RESULT ") :])
        results.append(res)
        print(f"{variant}: wall {res['wall_s']:.2f} s, cpu {res['cpu_s']:.2f} s, "
              f"peak +{res['peak_mib']:.0f} MiB", flush=True)  # fmt: skip
    table = _table(results, args)
    print(table)
    if args.md:
        tmp = args.md + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("# Training-step benchmark (`scripts/bench_step.py`)\n\n" + table + "\n")
        os.replace(tmp, args.md)


if __name__ == "__main__":
    main()
