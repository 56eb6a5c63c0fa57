"""Benchmark the aggregated training step against the plain summed-loss step.

Run (CPU, 2 threads)::

    # the late-fusion MultiModalDSNet: K = 3 fused depths + 4 modality heads
    .venv/bin/python scripts/bench_step.py                      # 32^3, batch 2, table to stdout
    .venv/bin/python scripts/bench_step.py --size 48 --md docs/bench_step.md
    # the shared-weight SharedModalityUNet with subset objectives (GMD's setting): K = 15
    # (every modality subset at depth 0) or K = 45 (at depths 0, 1, 2)
    .venv/bin/python scripts/bench_step.py --network shared --subset-depths 0
    .venv/bin/python scripts/bench_step.py --network shared --subset-depths 0 1 2
    # the shared U-Net's two fusions side by side (variant/features rows: fusion="features",
    # encoders once, the decoder once per subset)
    .venv/bin/python scripts/bench_step.py --network shared --fusion both --variants sum gmd_outputs

Timing: one process builds every variant (same initial weights, same batch, ``Adam(fused=True)``
everywhere) and runs interleaved rounds, one step of each variant per round in rotating order,
after a warm-up round; so load from other processes on a shared machine falls on all variants
alike. Per variant the minimum (and median) per-step wall-clock and process CPU time are kept;
each figure is a ratio to ``sum``. The amortised figures are derived from measured steps: per
refresh cycle of N steps, one exact step (``gmd_loop``) and N-1 cheap steps (``gmd_amortised``).

Memory: each variant runs two steps in a fresh subprocess; the figure is the peak resident set
size during the steps (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``;
``ru_maxrss`` elsewhere) minus the resident size just before the first step (model, optimizer
and batch built), i.e. the extra memory of the step (autograd graph, Jacobian, optimizer state,
buffers). tracemalloc does not see torch's allocations. On CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before the steps.

Variants:
    sum            forward + backward of the summed loss + optimizer step
    gmd_loop       TrainStep(GMD, strategy="loop"): retained backward per objective, the
                   modality objectives (pairwise disjoint reach) fused into one backward
    gmd_loop_plain the same without the disjoint fusion (one backward per objective)
    gmd_batched    TrainStep(GMD, strategy="batched"): one vmapped backward (is_grads_batched)
    gmd_amortised  the cheap step of TrainStep(GMD, refresh_every=N): one backward of
                   sum_k c_k L_k with the last coefficients, masked merge, optimizer step
                   (the same code for both Jacobian modes)
    gmd_outputs    TrainStep(GMD, jacobian="outputs"): gradients at the modality heads (loop
                   over objectives through the losses only), Gramian, one backward of
                   sum_k c_k L_k through the network, masked merge per tensor
    gmd_outputs_batched  the same with the output Jacobian as one vmapped backward
    torchjd_pcgrad torchjd.autojac.backward + jac_to_grad(PCGrad()) + optimizer step
    seed_gmd       the published recipe (as in HaoWang420/Gradient-guided-Modality-Decoupling,
                   optim/gmd.py): one retained backward() per objective into .grad, clone and
                   flatten the gradients into D-vectors (zeros where None, reach = not None),
                   the projection as Python loops over D-vectors with a host-side sign test
                   per pair, masked merge (mean on shared, sum elsewhere), unflatten, step
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
ROUNDS = 3  # timed rounds (one step of every variant each), after one warm-up round
VARIANTS = (
    "sum",
    "gmd_loop",
    "gmd_loop_plain",
    "gmd_batched",
    "gmd_amortised",
    "gmd_outputs",
    "gmd_outputs_batched",
    "torchjd_pcgrad",
    "seed_gmd",
)
NETWORKS = ("late", "shared")
FUSIONS = ("logits", "features", "both")  # shared network only; "both": every variant twice


def _seed_gmd_step(net, opt, objectives, x, t):
    """The published recipe (slow reference): K retained backward() calls, D-vector loops."""
    import torch

    from segmerge.step import objective_roots

    # K separate scalars: the stack's input edges (a backward of losses[k] would run every
    # row's branch with zero cotangents, which the recipe, given separate scalars, does not)
    rows = objective_roots(objectives(net(x), t).losses)
    params = [p for p in net.parameters() if p.requires_grad]
    one = torch.ones((), device=x.device)
    grads, reached = [], []
    for k, edge in enumerate(rows):
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(edge, grad_tensors=one, retain_graph=k < len(rows) - 1)
        reached.append([p.grad is not None for p in params])
        grads.append(
            torch.cat(
                [(p.grad.clone() if p.grad is not None else torch.zeros_like(p)).flatten()
                 for p in params]
            )
        )  # fmt: skip
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


def _heads(outputs: dict, fusion: str = "logits") -> dict:
    """The network's own output tensors for jacobian="outputs": every head that is not derived
    from others (the shared U-Net's fused.d* are means of its modality heads; with feature
    fusion none is derived, and the dict holds the subset heads decoded by the objectives)."""
    if fusion == "features":
        return dict(outputs)
    if _SETUP["network"] == "shared":
        return {n: o for n, o in outputs.items() if n.startswith("modality.")}
    return outputs  # late fusion: every head is computed from features, none from another


_SETUP: dict = {"network": "late", "subset_depths": (0,), "fusions": ("logits",)}


def _split(variant: str) -> tuple[str, str]:
    """``"gmd_loop/features"`` -> ``("gmd_loop", "features")``; no suffix: logit fusion."""
    base, _, fusion = variant.partition("/")
    return base, fusion or "logits"


def _label(variant: str, fusion: str) -> str:
    return variant if fusion == "logits" else f"{variant}/{fusion}"


def _objectives():
    from segmerge.objectives import ObjectiveSet

    if _SETUP["network"] == "late":
        return ObjectiveSet()
    return ObjectiveSet(subsets="all", subset_depths=_SETUP["subset_depths"], fused=False)


def _build(variant: str, net0, x, t, device):
    """Model copy, optimizer and a one-step callable for ``variant``."""
    import copy

    import torch

    from segmerge.aggregation import build_aggregator
    from segmerge.step import TrainStep

    variant, fusion = _split(variant)
    net = copy.deepcopy(net0).to(device).train()
    # fused Adam for every variant: the recommended setting (TrainStep skips non-finite steps
    # through its found_inf input at no cost; other optimizers pay a snapshot/restore copy).
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    objectives = _objectives()
    params = [p for p in net.parameters() if p.requires_grad]
    info: dict = {}
    if variant == "sum":

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            objectives(net(x), t).losses.sum().backward()
            opt.step()

    elif variant == "torchjd_pcgrad":
        from torchjd.aggregation import PCGrad
        from torchjd.autojac import backward as jd_backward
        from torchjd.autojac import jac_to_grad

        pcgrad = PCGrad()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            jd_backward(objectives(net(x), t).losses, inputs=params)
            jac_to_grad(params, pcgrad)
            opt.step()

    elif variant == "seed_gmd":

        def step() -> None:
            _seed_gmd_step(net, opt, objectives, x, t)

    else:
        ts = TrainStep(
            net,
            opt,
            build_aggregator("gmd"),
            strategy="batched" if variant.endswith("batched") else "loop",
            # the cheap step of amortised mode: after the warm-up refresh, never refresh again
            refresh_every=10**9 if variant == "gmd_amortised" else 1,
            fuse_disjoint=variant != "gmd_loop_plain",
            jacobian="outputs" if variant.startswith("gmd_outputs") else "parameters",
        )

        def step() -> None:
            outputs = net(x)
            report = ts.step(objectives(outputs, t), outputs=_heads(outputs, fusion))
            info["backward_passes"] = report.backward_passes
            info["K"] = len(report.names)

    return step, info


def _setup(size: int, batch: int, threads: int, fusion: str = "logits"):
    import torch

    from segmerge.nets import MultiModalDSNet, SharedModalityUNet

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net0 = MultiModalDSNet() if _SETUP["network"] == "late" else SharedModalityUNet(fusion=fusion)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size, size, size, generator=g).to(device)
    t = (torch.rand(batch, 3, size, size, size, generator=g) > 0.8).float().to(device)
    return net0, x, t, device


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_all(variants, size: int, batch: int, threads: int, rounds: int) -> dict[str, dict]:
    """Interleaved timing in one process: every round runs one step of every variant.

    Round-robin (rotating order) so that load from other processes on a shared machine falls on
    all variants alike; the first round is a warm-up. Per variant: min and median of the
    per-step wall-clock and process CPU time.
    """
    nets = {}
    for v in variants:
        fusion = _split(v)[1]
        if fusion not in nets:
            nets[fusion] = _setup(size, batch, threads, fusion)  # same seed, same batch
    runners = {v: _build(v, *nets[_split(v)[1]]) for v in variants}
    device = nets[_split(variants[0])[1]][3]
    times: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in variants}
    order = list(variants)
    for r in range(rounds + 1):
        for v in order:
            w0, c0 = time.perf_counter(), time.process_time()
            runners[v][0]()
            _sync(device)
            if r > 0:
                times[v]["wall"].append(time.perf_counter() - w0)
                times[v]["cpu"].append(time.process_time() - c0)
        order = order[1:] + order[:1]
        print(f"round {r} done", file=sys.stderr, flush=True)
    out = {}
    for v in variants:
        w, c = times[v]["wall"], times[v]["cpu"]
        out[v] = {
            "wall_min": min(w),
            "wall_med": statistics.median(w),
            "cpu_min": min(c),
            "cpu_med": statistics.median(c),
            "walls": w,
            "cpus": c,
            "device": str(device),
            **runners[v][1],
        }
    return out


def peak_memory(variant: str, size: int, batch: int, threads: int) -> float:
    """Extra peak memory (MiB) of two steps of ``variant`` in this (fresh) process."""
    import torch

    net0, x, t, device = _setup(size, batch, threads, _split(variant)[1])
    step, _ = _build(variant, net0, x, t, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss_kib()
    for _ in range(2):
        step()
        _sync(device)
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (_peak_rss_kib() - base) / 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss_kib() -> int:
    """Reset the peak RSS (Linux: write 5 to /proc/self/clear_refs) and return the current RSS.

    Without the reset, a high-water mark reached while importing or building the model would
    hide the step's own peak. Falls back to ``ru_maxrss`` where /proc is unavailable.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kib() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _table(res: dict[str, dict], args: argparse.Namespace) -> str:
    base = res[next(v for v in res if _split(v)[0] == "sum")]
    k = next((r["K"] for r in res.values() if "K" in r), "?")
    if args.network == "late":
        net = f"MultiModalDSNet defaults (K = {k}: fused.d0-d2 + 4 modality heads"
    else:
        depths = ", ".join(str(d) for d in args.subset_depths)
        net = (
            f"SharedModalityUNet defaults (K = {k}: ObjectiveSet(subsets='all', "
            f"subset_depths=[{depths}], fused=False); fusion {' and '.join(_SETUP['fusions'])}"
        )
    lines = [
        f"{net}, {args.n_params / 1e6:.2f} M parameters), input {args.batch}x4x{args.size}^3, "
        f"{args.threads} threads, device {base['device']}, torch {args.torch_version}; "
        f"{args.rounds} interleaved rounds after a warm-up round.",
        "",
        "| variant | CPU s/step (min) | wall s/step (min / median) | ratio to sum (CPU min) "
        "| ratio to sum (wall min) | backward passes | peak extra MiB |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name, cpu, wall, wall_med, passes, mem):
        lines.append(
            f"| {name} | {cpu:.2f} | {wall:.2f} / {wall_med:.2f} | {cpu / base['cpu_min']:.2f} | "
            f"{wall / base['wall_min']:.2f} | {passes} | {mem} |"
        )

    for v, r in res.items():
        mem = r.get("peak_mib")
        row(v, r["cpu_min"], r["wall_min"], r["wall_med"], r.get("backward_passes", "-"),
            "-" if mem is None else f"{mem:.0f}")  # fmt: skip
    derived: dict[tuple[str, int], tuple[float, float]] = {}
    refreshes = [v for v in ("gmd_loop", "gmd_batched", "gmd_outputs", "gmd_outputs_batched")
                 if v in res]  # fmt: skip
    if "gmd_amortised" in res and refreshes:
        lines += [
            "",
            "Amortised mode, refresh_every=N: one refresh step and N-1 cheap steps "
            "(gmd_amortised: one backward of sum_k c_k L_k + masked merge) per cycle, "
            "cost per step = (T_refresh + (N-1) T_cheap) / N (peak memory = the refresh's):",
            "",
        ]
        ch = res["gmd_amortised"]
        for refresh in refreshes:
            ex = res[refresh]
            for n in (4, 8):
                cpu = (ex["cpu_min"] + (n - 1) * ch["cpu_min"]) / n
                wall = (ex["wall_min"] + (n - 1) * ch["wall_min"]) / n
                derived[refresh, n] = (cpu / base["cpu_min"], wall / base["wall_min"])
                lines.append(
                    f"- refresh {refresh}, N = {n}: {cpu:.2f} CPU s/step, ratio "
                    f"{derived[refresh, n][0]:.2f} (wall {derived[refresh, n][1]:.2f})"
                )
    pairs = [(v, f"{v}/features") for v in res if f"{v}/features" in res]
    if pairs:
        lines += [
            "",
            "Feature fusion / logit fusion, same variant (CPU min; wall min in brackets):",
            "",
        ]
        for v, vf in pairs:
            lines.append(
                f"- {v}: {res[vf]['cpu_min'] / res[v]['cpu_min']:.2f} "
                f"({res[vf]['wall_min'] / res[v]['wall_min']:.2f})"
            )
    lines += ["", "Goals (ratios of CPU-time minima; wall-clock minima in brackets):"]

    def goal(label, num, den, limit):
        if num in res and den in res:
            cpu = res[num]["cpu_min"] / res[den]["cpu_min"]
            wall = res[num]["wall_min"] / res[den]["wall_min"]
            lines.append(
                f"- {label}: {cpu:.2f} ({wall:.2f}) -> {'met' if cpu <= limit else 'NOT met'}"
            )

    if args.network == "late":
        goal("exact GMD, loop / seed recipe <= 1.1", "gmd_loop", "seed_gmd", 1.1)
        goal("exact GMD, batched / seed recipe <= 1.1", "gmd_batched", "seed_gmd", 1.1)
        goal("exact GMD, loop / torchjd PCGrad < 1", "gmd_loop", "torchjd_pcgrad", 1.0)
        goal("exact GMD, batched / torchjd PCGrad < 1", "gmd_batched", "torchjd_pcgrad", 1.0)
        if ("gmd_loop", 8) in derived:
            cpu, wall = derived["gmd_loop", 8]
            lines.append(
                f"- amortised N = 8 / summed step <= 1.35: {cpu:.2f} ({wall:.2f}) -> "
                f"{'met' if cpu <= 1.35 else 'NOT met'}"
            )
    else:
        goal("exact GMD, loop / published recipe <= 1", "gmd_loop", "seed_gmd", 1.0)
        goal("exact GMD, batched / published recipe <= 1", "gmd_batched", "seed_gmd", 1.0)
        goal("jacobian='outputs' / summed step <= 1.3", "gmd_outputs", "sum", 1.3)
        goal("jacobian='outputs' (batched) / summed step <= 1.3", "gmd_outputs_batched", "sum", 1.3)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=VARIANTS,
        help="default: every variant that applies to the network",
    )
    parser.add_argument(
        "--network",
        default="late",
        choices=NETWORKS,
        help="late: MultiModalDSNet; shared: SharedModalityUNet + subset rows",
    )
    parser.add_argument(
        "--subset-depths",
        nargs="+",
        type=int,
        default=[0],
        help="shared network: depths with subset rows (0 -> K=15, 0 1 2 -> 45)",
    )
    parser.add_argument(
        "--fusion",
        default="logits",
        choices=FUSIONS,
        help="shared network: SharedModalityUNet(fusion=...); both: side by side",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--md", help="also write the table to this markdown file")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _SETUP["network"], _SETUP["subset_depths"] = args.network, tuple(args.subset_depths)
    if args.fusion != "logits" and args.network != "shared":
        parser.error(f"--fusion {args.fusion}: only the shared network has a fusion option")
    fusions = ("logits", "features") if args.fusion == "both" else (args.fusion,)
    _SETUP["fusions"] = fusions
    if args.variants is None:
        skip = {"gmd_outputs", "gmd_outputs_batched"} if args.network == "late" else {
            "gmd_loop_plain", "torchjd_pcgrad"}  # fmt: skip
        args.variants = [v for v in VARIANTS if v not in skip]
    if args.memory_worker:
        mib = peak_memory(args.memory_worker, args.size, args.batch, args.threads)
        print("RESULT " + json.dumps({"peak_mib": mib}), flush=True)
        return
    if "sum" not in args.variants:
        args.variants.insert(0, "sum")
    args.variants = [_label(v, f) for f in fusions for v in args.variants]
    import torch

    args.torch_version = torch.__version__
    res = time_all(args.variants, args.size, args.batch, args.threads, args.rounds)
    args.n_params = sum(p.numel() for p in _setup(8, 1, args.threads, fusions[0])[0].parameters())
    for v, r in res.items():
        print(f"{v}: cpu min {r['cpu_min']:.2f} s, wall min {r['wall_min']:.2f} s", flush=True)
    if not args.no_memory:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        for v in args.variants:
            if _split(v)[0] == "gmd_amortised":
                continue  # its peak is its refresh step's: gmd_loop
            cmd = [sys.executable, __file__, "--memory-worker", v, "--size", str(args.size),
                   "--batch", str(args.batch), "--threads", str(args.threads),
                   "--network", args.network, "--subset-depths",
                   *[str(d) for d in args.subset_depths]]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{v}: memory run failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            res[v]["peak_mib"] = json.loads(lines[-1][len("RESULT ") :])["peak_mib"]
            print(f"{v}: peak +{res[v]['peak_mib']:.0f} MiB", flush=True)
    table = _table(res, args)
    print(table)
    if args.md:
        tmp = args.md + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("# Training-step benchmark (`scripts/bench_step.py`)\n\n" + table + "\n")
            fh.write("\n<details><summary>raw per-step times (s)</summary>\n\n```json\n")
            raw = {v: {"cpu": r["cpus"], "wall": r["walls"]} for v, r in res.items()}
            fh.write(json.dumps(raw, indent=1) + "\n```\n</details>\n")
        os.replace(tmp, args.md)


if __name__ == "__main__":
    main()
