"""TrainStep(jacobian="outputs"): coefficients from the gradients at the network's outputs.

The mode replaces the exact Gramian Z A Aᵀ Zᵀ (Z: gradients at the outputs, A: the network's
Jacobian) by Z Zᵀ. On a linear layer applied to one unit-norm sample, A Aᵀ = (‖x‖² + 1)·I, so the
two Gramians differ by a common scale only and every scale-invariant aggregator must then give
the exact step's update: that is what makes the equality below a real test of the mode.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from test_step_support import GMDAgg, SumAgg, TinyDSNet, batch, named_losses

from segmerge.aggregation import GMD, Blending, GradCraft, Mean, PCGrad, Sum
from segmerge.step import TrainStep


class OneOutput(torch.nn.Module):
    """A trunk (linear layer) whose one output all objectives are computed from."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 6, dtype=torch.float64)

    def forward(self, x):
        return self.lin(x)


def _conflicting(y):
    """Three objectives of one output, the first two in conflict."""
    t = torch.linspace(-1, 1, 6, dtype=y.dtype)
    rows = [((y - t) ** 2).sum(), ((y + t) ** 2).sum() * 0.5, (y.sum() - 1.0) ** 2]
    return SimpleNamespace(names=["a", "b", "c"], losses=torch.stack(rows))


@pytest.mark.parametrize(
    "make", [GMD, lambda: PCGrad(order="identity"), lambda: GradCraft(r=0.7, e=0.1), Sum, Mean]
)
def test_outputs_mode_equals_exact_when_objectives_share_one_output(make):
    torch.manual_seed(0)
    net = OneOutput()
    twin = copy.deepcopy(net)
    x = torch.randn(1, 5, dtype=torch.float64)
    x = x / x.norm()
    exact = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), make(), strategy="loop")
    approx = TrainStep(twin, torch.optim.SGD(twin.parameters(), lr=0.1), make(), jacobian="outputs")
    conflicts = 0
    for _ in range(3):
        re = exact.step(_conflicting(net(x)))
        conflicts += int(re.n_conflicts)
        y = twin(x)
        ra = approx.step(_conflicting(y), outputs={"y": y})
        assert ra.refreshed and ra.backward_passes == 4  # 3 through the losses, 1 through the net
        torch.testing.assert_close(ra.weights, re.weights, rtol=1e-9, atol=1e-12)
    assert conflicts >= 1  # the test exercises a projection, not a plain sum
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_outputs_mode_on_the_multi_head_net_applies_the_masked_merge():
    """One backward of Σ c_k L_k, then 1/K on the tensors every objective reaches."""
    net = TinyDSNet()
    x, t = batch()

    def fused_only():
        outs = {n: o for n, o in net(x).items() if n.startswith("fused.")}
        return outs, named_losses(outs, t)

    ts = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.0), GMDAgg(), jacobian="outputs")
    outs, nl = fused_only()
    report = ts.step(nl, outputs=outs)
    assert report.names == ["fused.d0", "fused.d1"]
    # the same combination computed independently: backward of Σ c_k L_k, then the merge
    outs, nl = fused_only()
    c = report.weights.detach()
    grads = torch.autograd.grad((c * nl.losses).sum(), list(net.parameters()), allow_unused=True)
    for (name, p), g in zip(net.named_parameters(), grads):
        if name.startswith(("unused", "aux")):
            assert p.grad is None and g is None, name
            continue
        k_reach = 2 if name.startswith(("encoders.", "decoder.")) else 1  # shared: 1/K
        torch.testing.assert_close(p.grad, g / k_reach, rtol=1e-5, atol=1e-7, msg=name)
    assert report.cosine.shape == (2, 2)


def test_outputs_mode_amortised_steps_reuse_the_coefficients():
    net = TinyDSNet()
    ts = TrainStep(
        net,
        torch.optim.SGD(net.parameters(), lr=0.01),
        GMDAgg(),
        jacobian="outputs",
        refresh_every=2,
    )
    x, t = batch()
    outs = net(x)
    r0 = ts.step(named_losses(outs, t), outputs=outs)
    outs = net(x)
    r1 = ts.step(named_losses(outs, t))  # amortised: no outputs needed, one backward
    assert r0.refreshed and not r1.refreshed and r1.backward_passes == 1
    torch.testing.assert_close(r1.weights, r0.weights)
    outs = net(x)
    assert ts.step(named_losses(outs, t), outputs=outs).refreshed


def test_outputs_mode_skips_non_finite_steps_and_keeps_adam_state():
    net = TinyDSNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ts = TrainStep(net, opt, GMDAgg(), jacobian="outputs", strategy="batched")
    x, t = batch()
    outs = net(x)
    ts.step(named_losses(outs, t), outputs=outs)
    params = [p.detach().clone() for p in net.parameters()]
    state = {k: v.clone() for p in net.parameters() for k, v in opt.state[p].items()}
    outs = net(x)
    outs["modality.t1"] = outs["modality.t1"] * float("nan")
    report = ts.step(named_losses(outs, t), outputs=outs)
    assert bool(report.skipped) and int(report.skipped_total) == 1
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    after = {k: v for p in net.parameters() for k, v in opt.state[p].items()}
    assert all(torch.equal(after[k], state[k]) for k in state)
    outs = net(x)
    assert not bool(ts.step(named_losses(outs, t), outputs=outs).skipped)


def test_outputs_mode_loop_and_batched_agree():
    net = TinyDSNet()
    twin = copy.deepcopy(net)
    x, t = batch()
    a = TrainStep(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        GMDAgg(),
        jacobian="outputs",
        strategy="loop",
    )
    b = TrainStep(
        twin,
        torch.optim.SGD(twin.parameters(), lr=0.1),
        GMDAgg(),
        jacobian="outputs",
        strategy="batched",
    )
    oa, ob = net(x), twin(x)
    ra, rb = a.step(named_losses(oa, t), outputs=oa), b.step(named_losses(ob, t), outputs=ob)
    torch.testing.assert_close(ra.weights, rb.weights)
    assert rb.backward_passes == 2 and ra.backward_passes == len(ra.names) + 1
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_outputs_mode_errors_are_clear():
    net = TinyDSNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="jacobian must be 'parameters' or 'outputs'"):
        TrainStep(net, opt, SumAgg(), jacobian="output")
    with pytest.raises(ValueError, match="cannot serve .*gradient"):
        TrainStep(net, opt, Blending(estimator="gradient"), jacobian="outputs")
    with pytest.raises(TypeError, match="must be a segmerge.aggregation.Aggregator"):
        TrainStep(net, opt, object())
    ts = TrainStep(net, opt, SumAgg(), jacobian="outputs")
    x, t = batch()
    outs = net(x)
    with pytest.raises(ValueError, match="needs outputs="):
        ts.step(named_losses(outs, t))
    with pytest.raises(ValueError, match="requires grad"):
        ts.step(named_losses(outs, t), outputs={k: v.detach() for k, v in outs.items()})
