"""Benchmark: K-space aggregation against the literal D-space loop, and the memory floor.

    .venv/bin/python scripts/bench_aggregation.py            # K in {4, 8, 16}, D in {1M, 20M}
    .venv/bin/python scripts/bench_aggregation.py --quick    # small sizes, a few seconds

For every (K, D), on the same float32 inputs and 2 CPU threads, it times
- ``kspace``: the aggregator as the training step calls it (Gramian ``J Jᵀ``, K×K arithmetic,
  one combination ``c @ J`` with the masked merge, diagnostics);
- ``literal``: the loop written straight from docs/algorithms.md (one dot product per pair of
  D-vectors, projections applied to D-vectors, masked merge by boolean indexing) — the same
  reference the tests check the K-space code against (tests/test_aggregation_literal.py);
- ``floor``: reading J once (``c @ J``); an aggregation needs at least two reads (Gramian and
  combination), so ``kspace / (2 floor)`` is how far it is from the memory bound.

It prints the speed-up over the literal loop, the multiple of the floor and the max relative
difference between the two updates (``--check64`` adds each one's difference from the K-space
code run in float64: at large D the literal loop's long float32 dot products dominate).
The fast paths are timed in interleaved rounds (min of each) so that bursts of load on a shared
machine hit them alike; the literal loop runs once. Goal at K=8, D=20M: speed-up >= 15 and
kspace within 2x of two passes over J.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
from pathlib import Path

import torch

from segmerge.aggregation import GMD, GradCraft, gramian

ROOT = Path(__file__).resolve().parents[1]


def load_literal_reference():
    """The literal reference lives in the test file that checks the K-space code against it."""
    path = ROOT / "tests" / "test_aggregation_literal.py"
    spec = importlib.util.spec_from_file_location("literal_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(K: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sharing a common direction with random signs (so that many pairs conflict) and
    different norms; the first 60 % of the parameters are shared by every objective."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(K, D, generator=gen)
    common = torch.randn(D, generator=gen)
    coef = torch.randn(K, 1, generator=gen) * 2.0
    J.addmm_(coef, common[None, :])
    J.mul_(torch.rand(K, 1, generator=gen) * 4 + 0.25)
    shared = torch.zeros(D, dtype=torch.bool)
    shared[: int(0.6 * D)] = True
    return J, shared


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def make_aggregator(method: str):
    return GMD() if method == "gmd" else GradCraft(r=0.5, e=0.1)


def literal_update(literal, method: str, J: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """The update of the literal D-space loop (tests/test_aggregation_literal.py)."""
    K = J.shape[0]
    if method == "gmd":
        rows = literal.literal_projection(J, list(range(K)), clamp=True)
    else:
        rows = literal.LiteralGradCraft(0.5, 0.1, 0.0).rows(J, [str(i) for i in range(K)])
    return literal.literal_masked_merge(rows, shared)


def bench_shape(literal, methods, K: int, D: int, rounds: int, args) -> list[str]:
    """Rows of the table for one (K, D): every fast path timed in interleaved rounds (min of
    each), so that a burst of load on a shared machine hits all of them alike."""
    J, shared = make_inputs(K, D)
    c = torch.randn(K)
    # one aggregator per method across calls, as in training (the (D,) merge factor is built once)
    fast = {"floor": lambda: c @ J, "gram": lambda: gramian(J)}
    aggs = {m: make_aggregator(m) for m in methods}
    for m, agg in aggs.items():
        fast[m] = lambda agg=agg: agg(J, shared=shared).update
    best = {name: float("inf") for name in fast}
    out = {name: fn() for name, fn in fast.items()}  # warm-up
    for _ in range(rounds):
        for name, fn in fast.items():
            start = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    lines = []
    for m in methods:
        kspace = best[m]
        cells = [f"{m:9s} {K:3d} {D:10,d}", f"{best['floor'] * 1e3:9.1f}"]
        cells += [f"{best['gram'] * 1e3:8.1f}", f"{kspace * 1e3:10.1f}"]
        if args.no_literal:
            cells += [f"{'-':>11s}", f"{'-':>9s}"]
        else:
            start = time.perf_counter()
            ref = literal_update(literal, m, J, shared)
            slow = time.perf_counter() - start
            cells += [f"{slow * 1e3:11.1f}", f"{slow / kspace:9.1f}"]
        cells += [f"{kspace / best['floor']:8.2f}", f"{kspace / (2 * best['floor']):11.2f}"]
        cells.append(f"{'-':>13s}" if args.no_literal else f"{rel_diff(out[m], ref):13.2e}")
        if args.check64:  # both float32 updates against the K-space code in float64
            exact = make_aggregator(m)(J.double(), shared=shared).update
            cells.append(f"{rel_diff(out[m], exact):10.2e}")
            cells.append(f"{'-':>10s}" if args.no_literal else f"{rel_diff(ref, exact):10.2e}")
            del exact
        lines.append(" ".join(cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (K 4, 8; D 100k)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the fast paths")
    parser.add_argument("--methods", default="gmd,gradcraft", help="comma list of gmd, gradcraft")
    parser.add_argument("--ks", type=int, nargs="*", help="override the list of K")
    parser.add_argument("--ds", type=int, nargs="*", help="override the list of D")
    parser.add_argument("--no-literal", action="store_true", help="skip the slow literal loop")
    parser.add_argument(
        "--check64", action="store_true", help="also compare both updates with float64 K-space"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    literal = load_literal_reference()
    Ks, Ds = ([4, 8], [100_000]) if args.quick else ([4, 8, 16], [1_000_000, 20_000_000])
    Ks, Ds = args.ks or Ks, args.ds or Ds
    methods = args.methods.split(",")
    for method in methods:
        if method not in ("gmd", "gradcraft"):
            parser.error(f"--methods: unknown method {method!r}; choose gmd, gradcraft")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, min of {args.rounds} rounds"
    )
    header = (
        f"{'method':9s} {'K':>3s} {'D':>10s} {'floor ms':>9s} {'gram ms':>8s} {'kspace ms':>10s}"
        f" {'literal ms':>11s} {'speed-up':>9s} {'x floor':>8s} {'x 2 passes':>11s}"
        f" {'max rel diff':>13s}"
    )
    if args.check64:
        header += f" {'ks vs f64':>10s} {'lit vs f64':>10s}"
    print(header)
    for D in Ds:
        for K in Ks:
            for line in bench_shape(literal, methods, K, D, args.rounds, args):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
