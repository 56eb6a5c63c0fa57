"""TrainStep under torch.distributed: 2 gloo processes equal 1 process with the whole batch.

Each rank holds half of the batch; the objectives are per-sample means, so the rank-average of the
per-rank Jacobians is exactly the whole-batch Jacobian, and the aggregation (identical on every
rank) must then give the same parameters as a single process, up to float tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_step_support import GMDAgg, TinyDSNet, batch, named_losses

from segmerge.step import TrainStep

STEPS = 3
SIZE = 8
BATCH = 4


def _train(rank: int, world: int, out_path: str | None, jacobian: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = TinyDSNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ts = TrainStep(net, opt, GMDAgg(), strategy="loop", clip_norm=5.0, jacobian=jacobian)
    per = BATCH // world
    for s in range(STEPS):
        x, t = batch(n=BATCH, size=SIZE, seed=s)
        sl = slice(rank * per, (rank + 1) * per)
        outs = net(x[sl])
        report = ts.step(named_losses(outs, t[sl]), outputs=outs)
        assert not bool(report.skipped)
    params = [p.detach().clone() for p in net.parameters()]
    if out_path is not None:
        torch.save(params, out_path)
    return params


MODES = ("parameters", "outputs")


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for jacobian in MODES:  # one spawn for both modes (process start-up dominates)
            _train(rank, world, os.path.join(out_dir, f"{jacobian}{rank}.pt"), jacobian)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(folder / "init"), str(folder)), nprocs=2, join=True)
    return folder


@pytest.mark.parametrize("jacobian", MODES)
def test_two_gloo_ranks_equal_one_process_with_whole_batch(spawned, jacobian):
    single = _train(0, 1, None, jacobian)
    r0 = torch.load(spawned / f"{jacobian}0.pt")
    r1 = torch.load(spawned / f"{jacobian}1.pt")
    for a, b in zip(r0, r1):
        assert torch.equal(a, b)  # every rank applied the identical update
    torch.manual_seed(0)
    initial = list(TinyDSNet().parameters())
    moved = False
    for a, b, init in zip(r0, single, initial):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        moved |= not torch.equal(a, init.detach())
    assert moved
