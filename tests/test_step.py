"""segmerge.step: Jacobian strategies, reach, the aggregated step, amortisation, skipping, AMP."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from test_step_support import MODS, OBJECTIVES, GMDAgg, SumAgg, TinyDSNet, batch, named_losses

from segmerge.aggregation import merge_scale
from segmerge.objectives import NamedLosses, resize_target
from segmerge.step import (
    ParamLayout,
    TrainStep,
    disjoint_groups,
    graph_reach,
    jacobian_batched,
    jacobian_loop,
    objective_roots,
)


def _losses(net, available=None, seed=0):
    x, t = batch(seed=seed)
    return named_losses(net(x, available), t)


def _row(logits, target):
    """One objective row, built like ObjectiveSet's (to assemble rows in any order)."""
    resized = resize_target(target, tuple(logits.shape[2:]), OBJECTIVES.target_resize)
    return OBJECTIVES.loss(logits, resized).mean()


def _param_names(net, layout, bits):
    name_of = {id(p): n for n, p in net.named_parameters()}
    return {name_of[id(p)] for j, p in enumerate(layout.params) if bits >> j & 1}


def _jacobians(net, available=None):
    """J by plain loop, fused loop and batched, with the reach each reports."""
    layout = ParamLayout([p for p in net.parameters() if p.requires_grad])
    out = {}
    one = torch.ones(())
    nl = _losses(net, available)
    k = len(nl.names)
    roots = objective_roots(nl.losses)
    walk = graph_reach(roots, layout.index)
    J = torch.empty(k, layout.dim)
    found = jacobian_loop(roots, layout, J, one, retain_graph=True)
    out["loop"] = (J.clone(), found)
    groups = disjoint_groups(walk)
    J2 = torch.full((k, layout.dim), float("nan"))
    found = jacobian_loop(roots, layout, J2, one, groups=groups, reach=walk, retain_graph=True)
    out["fused"] = (J2, found)
    J3 = torch.full((k, layout.dim), float("nan"))
    jacobian_batched(nl.losses, layout, J3, one)
    out["batched"] = (J3, walk)
    return nl.names, layout, out, groups


def test_strategies_agree_and_reach_is_right():
    net = TinyDSNet()
    names, layout, out, groups = _jacobians(net)
    J_loop, reach_unused = out["loop"]
    for key in ("fused", "batched"):
        J, reach = out[key]
        torch.testing.assert_close(J, J_loop, rtol=1e-5, atol=1e-7)
        assert reach == reach_unused, key
    # the disjoint modality heads share one backward: 2 fused depths + 1 group of 4 heads
    assert sorted(len(g) for g in groups) == [1, 1, 4]
    assert len(groups) < len(names)
    # rows are exactly zero outside each objective's reach
    for i, bits in enumerate(reach_unused):
        mask = layout.element_mask(bits)
        assert torch.all(J_loop[i][~mask] == 0)
        assert J_loop[i][mask].abs().sum() > 0
    # a modality head's objective reaches only its own encoder and head
    reach = reach_unused
    for m in MODS:
        got = _param_names(net, layout, reach[names.index(f"modality.{m}")])
        assert got == {
            f"encoders.{m}.0.weight",
            f"encoders.{m}.0.bias",
            f"aux.{m}.weight",
            f"aux.{m}.bias",
        }
    fused = _param_names(net, layout, reach[names.index("fused.d1")])
    assert {f"encoders.{m}.0.weight" for m in MODS} <= fused
    assert not any(n.startswith("aux.") or n.startswith("head0") for n in fused)
    assert all(not n.startswith("unused") for r in reach for n in _param_names(net, layout, r))


def test_dropping_a_modality_removes_its_rows_and_reach():
    net = TinyDSNet()
    avail = torch.tensor([[True, True, False, True]] * 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ts = TrainStep(net, opt, GMDAgg(), strategy="loop")
    report = ts.step(_losses(net, avail))
    assert "modality.t1ce" not in report.names and len(report.names) == 5
    assert report.weights.shape == (5,) and report.losses.shape == (5,)
    # no objective reaches the dropped encoder: its grad stays None, as after backward()
    assert net.encoders["t1ce"][0].weight.grad is None
    assert net.encoders["t1"][0].weight.grad is not None
    layout = ts.layout
    reach = graph_reach(objective_roots(_losses(net, avail).losses), layout.index)
    assert all("t1ce" not in n for r in reach for n in _param_names(net, layout, r))


@pytest.mark.parametrize("strategy,fuse", [("loop", True), ("loop", False), ("batched", True)])
def test_sum_aggregator_step_equals_plain_backward(strategy, fuse):
    net = TinyDSNet()
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    ts = TrainStep(net, opt, SumAgg(), strategy=strategy, fuse_disjoint=fuse)
    for s in range(2):
        report = ts.step(_losses(net, seed=s))
        opt_ref.zero_grad()
        _losses(ref, seed=s).losses.sum().backward()
        opt_ref.step()
        assert not report.skipped
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert net.unused.weight.grad is None  # unreached: untouched, as after backward()


def test_exact_step_applies_masked_merge_on_shared_tensors():
    net = TinyDSNet()
    x, t = batch()

    def fused_only(model):
        outs = model(x)
        return named_losses({n: o for n, o in outs.items() if n.startswith("fused.")}, t)

    layout = ParamLayout(list(net.parameters()))
    nl = fused_only(net)
    roots = objective_roots(nl.losses)
    J = torch.empty(2, layout.dim)
    reach = jacobian_loop(roots, layout, J, torch.ones(()), retain_graph=False)
    shared = reach[0] & reach[1]
    assert _param_names(net, layout, shared) == {
        n for n, _ in net.named_parameters() if n.startswith(("encoders.", "decoder."))
    }
    expected = GMDAgg()(J, shared=layout.element_mask(shared)).update
    ts = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.0), GMDAgg(), strategy="batched")
    ts.step(fused_only(net))
    grads = torch.cat(
        [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in layout.params]
    )
    torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-7)
    scale = merge_scale(layout.element_mask(shared), 2, masked=True)
    assert set(scale.unique().tolist()) == {0.5, 1.0}


def test_amortised_steps_use_last_coefficients_by_name():
    net = TinyDSNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    ts = TrainStep(net, opt, GMDAgg(), strategy="loop", refresh_every=3)
    r0 = ts.step(_losses(net, seed=0))
    assert r0.refreshed and r0.backward_passes == 3
    c = dict(zip(r0.names, r0.weights))
    # step 2: amortised on a subset of the objectives (modality heads dropped): coefficients
    # matched by name, the shared set recomputed for the current objectives, one backward
    x, t = batch(seed=1)
    outs = net(x)
    order = ["fused.d1", "fused.d0"]  # reversed: coefficients must follow the names
    nl = NamedLosses(order, torch.stack([_row(outs[n], t) for n in order]))
    layout = ts.layout
    roots = objective_roots(nl.losses)
    J = torch.empty(2, layout.dim)
    found = jacobian_loop(roots, layout, J, torch.ones(()), retain_graph=True)
    shared = found[0] & found[1]
    assert shared != 0
    cvec = torch.stack([c[n] for n in nl.names])
    expected = merge_scale(layout.element_mask(shared), 2, masked=True) * (cvec @ J)
    before = [p.detach().clone() for p in layout.params]
    r1 = ts.step(nl)
    assert not r1.refreshed and r1.backward_passes == 1 and r1.norms is None
    assert r1.names == ["fused.d1", "fused.d0"]
    torch.testing.assert_close(r1.weights, cvec)
    got = torch.cat([(b - p.detach()).flatten() / 0.05 for b, p in zip(before, layout.params)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # step 3: amortised; step 4 refreshes (N = 3)
    assert not ts.step(_losses(net, seed=2)).refreshed
    assert ts.step(_losses(net, seed=3)).refreshed


def test_amortised_n1_equals_exact():
    torch.manual_seed(1)
    net = TinyDSNet()
    twin = copy.deepcopy(net)
    a = TrainStep(net, torch.optim.Adam(net.parameters(), lr=1e-2), GMDAgg(), strategy="loop")
    b = TrainStep(
        twin,
        torch.optim.Adam(twin.parameters(), lr=1e-2),
        GMDAgg(),
        strategy="batched",
        refresh_every=1,
    )
    for s in range(2):
        ra, rb = a.step(_losses(net, seed=s)), b.step(_losses(twin, seed=s))
        assert ra.refreshed and rb.refreshed
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def _state(opt):
    return {
        (i, k): v.clone()
        for i, p in enumerate(opt.param_groups[0]["params"])
        for k, v in opt.state.get(p, {}).items()
    }


@pytest.mark.parametrize("fused", [False, True])
def test_nan_loss_skips_step_and_keeps_adam_state(fused):
    net = TinyDSNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-2, fused=fused)
    ts = TrainStep(net, opt, GMDAgg(), strategy="loop", clip_norm=1.0)
    ts.step(_losses(net, seed=0))
    params = [p.detach().clone() for p in net.parameters()]
    state = _state(opt)
    x, t = batch(seed=1)
    outs = net(x)
    outs["modality.t1"] = outs["modality.t1"] * float("nan")
    poisoned = named_losses(outs, t)
    report = ts.step(poisoned)
    assert bool(report.skipped) and int(report.skipped_total) == 1
    for p, q in zip(net.parameters(), params):
        assert torch.equal(p, q)
    after = _state(opt)
    assert after.keys() == state.keys()
    for key in state:
        assert torch.equal(after[key], state[key]), key
    report = ts.step(_losses(net, seed=2))  # training goes on
    assert not report.skipped and int(ts.skipped) == 1
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_nan_on_first_step_leaves_optimizer_fresh():
    net = TinyDSNet()
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ts = TrainStep(net, opt, SumAgg(), strategy="loop")
    x, t = batch()
    outs = net(x)
    outs["fused.d0"] = outs["fused.d0"] + float("inf")
    report = ts.step(named_losses(outs, t))
    assert bool(report.skipped)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert len(opt.state) == 0


def test_losses_not_stacked_last_are_rejected():
    net = TinyDSNet()
    nl = _losses(net)
    ts = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), SumAgg())
    with pytest.raises(ValueError, match="torch.stack"):
        ts.step(SimpleNamespace(names=nl.names, losses=nl.losses * 2))
    with pytest.raises(ValueError, match="strategy"):
        TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), SumAgg(), strategy="vmap")


class _NoBatchingRule(torch.autograd.Function):
    """Identity whose backward reads its gradient's data: fine in a plain backward, a
    RuntimeError under the batched (vmap) backward, like an op without a batching rule."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad.tolist()  # needs storage: a vmapped (batched) gradient has none
        return grad


class _UnbatchableNet(TinyDSNet):
    def forward(self, x, available=None):
        return {k: _NoBatchingRule.apply(v) for k, v in super().forward(x, available).items()}


def test_batched_failure_falls_back_to_loop_once():
    # A second batched try would raise (only the first failure falls back): the second step
    # passing without a warning shows that the batched strategy is tried once.
    net = _UnbatchableNet()
    twin = copy.deepcopy(net)
    ts = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), SumAgg(), strategy="batched")
    with pytest.warns(
        RuntimeWarning, match="batched .vmap. Jacobian failed.*using the loop strategy"
    ):
        ts.step(_losses(net))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.step(_losses(net, seed=1))
    assert ts.resolved_strategy() == "loop"
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for s in range(2):
        opt.zero_grad()
        _losses(twin, seed=s).losses.sum().backward()
        opt.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_grad_scaler_unscales_before_aggregation_and_backs_off_on_inf():
    net = TinyDSNet()
    twin = copy.deepcopy(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    a = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), GMDAgg(), scaler=scaler)
    b = TrainStep(twin, torch.optim.SGD(twin.parameters(), lr=0.1), GMDAgg())
    ra, rb = a.step(_losses(net)), b.step(_losses(twin))
    torch.testing.assert_close(ra.norms, rb.norms, rtol=1e-5, atol=1e-7)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() == 2.0**13  # finite step, growth_interval=1: grows
    x, t = batch(seed=1)
    outs = net(x)
    outs["fused.d1"] = outs["fused.d1"] * 1e38  # overflows once scaled
    params = [p.detach().clone() for p in net.parameters()]
    report = a.step(named_losses(outs, t))
    assert bool(report.skipped)
    assert scaler.get_scale() == 2.0**12  # backed off by 0.5
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params))


def test_state_dict_round_trip_resumes_amortised_coefficients():
    net = TinyDSNet()
    ts = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), GMDAgg(), refresh_every=4)
    r = ts.step(_losses(net))
    fresh = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), GMDAgg(), refresh_every=4)
    fresh.load_state_dict(ts.state_dict())
    r2 = fresh.step(_losses(net, seed=1))
    assert not r2.refreshed
    torch.testing.assert_close(r2.weights, r.weights)


def _real_net():
    from segmerge.nets import MultiModalDSNet

    torch.manual_seed(0)
    return MultiModalDSNet(features=(4, 8, 8), deep_supervision=2, aux_level=1)


def test_real_network_reach_and_strategies():
    net = _real_net()
    x, t = batch(size=8)
    layout = ParamLayout(list(net.parameters()))
    nl = OBJECTIVES(net(x), t)
    assert nl.names == ["fused.d0", "fused.d1"] + [f"modality.{m}" for m in MODS]
    roots = objective_roots(nl.losses)
    walk = graph_reach(roots, layout.index)
    k = len(nl.names)
    J = torch.empty(k, layout.dim)
    found = jacobian_loop(roots, layout, J, torch.ones(()), retain_graph=True)
    assert found == walk  # graph walk == allow_unused on the real network
    J2 = torch.empty(k, layout.dim)
    jacobian_loop(roots, layout, J2, torch.ones(()), disjoint_groups(walk), walk, True)
    J3 = torch.empty(k, layout.dim)
    jacobian_batched(nl.losses, layout, J3, torch.ones(()))
    torch.testing.assert_close(J2, J, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(J3, J, rtol=1e-4, atol=1e-6)

    def top(bits):
        return {".".join(n.split(".")[:2]) for n in _param_names(net, layout, bits)}

    for m in MODS:
        assert top(walk[nl.names.index(f"modality.{m}")]) == {f"encoders.{m}", f"aux_heads.{m}"}
    for d in (0, 1):
        got = top(walk[d])
        assert got == {f"encoders.{m}" for m in MODS} | {"decoder.ups", f"heads.d{d}"}


def test_real_network_dropped_modality_rows_leave_the_step():
    net = _real_net()
    x, t = batch(size=8)
    avail = torch.tensor([[True, True, True, False]] * 2)
    ts = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.1), GMDAgg(), strategy="loop")
    report = ts.step(OBJECTIVES(net(x, avail), t, avail))
    assert report.names == ["fused.d0", "fused.d1"] + [f"modality.{m}" for m in MODS[:3]]
    assert report.weights.shape == (5,) and report.norms.shape == (5,)
    # the t2 auxiliary head has no objective this step: no gradient at all
    assert all(p.grad is None for p in net.aux_heads["t2"].parameters())
    assert all(p.grad is not None for p in net.aux_heads["t1"].parameters())


def test_blending_gradient_estimator_gets_the_validation_reference_row():
    from segmerge.aggregation import build_aggregator

    net = TinyDSNet()
    layout = ParamLayout(list(net.parameters()))
    x, t = batch(seed=0)
    xv, tv = batch(seed=5)
    nl = named_losses(net(x), t)
    k = len(nl.names)
    J = torch.empty(k, layout.dim)
    found = jacobian_loop(objective_roots(nl.losses), layout, J, torch.ones(()))
    shared = found[0]
    for r in found:
        shared &= r
    ref = torch.zeros(layout.dim)
    grads = torch.autograd.grad(
        named_losses(net(xv), tv).losses[0], layout.params, allow_unused=True
    )
    for g, v in zip(grads, layout.views(ref)):
        if g is not None:
            v.copy_(g)
    expected = build_aggregator("blending", estimator="gradient")(
        J, shared=layout.element_mask(shared), names=nl.names, reference=ref
    ).update
    agg = build_aggregator("blending", estimator="gradient")
    ts = TrainStep(net, torch.optim.SGD(net.parameters(), lr=0.0), agg, strategy="loop")
    with pytest.raises(ValueError, match="reference_losses"):
        ts.step(named_losses(net(x), t))
    vl = named_losses(net(xv), tv)
    ts.step(named_losses(net(x), t), reference_losses=vl.losses[:1])
    got = torch.cat(
        [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in layout.params]
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert got.abs().sum() > 0


def test_amortised_refreshes_on_unknown_names_and_skips_non_finite_cheap_steps():
    net = TinyDSNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
    ts = TrainStep(net, opt, GMDAgg(), strategy="loop", refresh_every=10)
    x, t = batch()
    outs = net(x)
    r0 = ts.step(named_losses({n: outs[n] for n in ("fused.d0", "fused.d1")}, t))
    assert r0.refreshed
    r1 = ts.step(_losses(net, seed=1))  # modality rows never seen: no coefficients, refresh
    assert r1.refreshed and len(r1.names) == 6
    r2 = ts.step(_losses(net, seed=2))
    assert not r2.refreshed
    params = [p.detach().clone() for p in net.parameters()]
    state = _state(opt)
    outs = net(x)
    outs["fused.d1"] = outs["fused.d1"] * float("nan")
    r3 = ts.step(named_losses(outs, t))
    assert not r3.refreshed and bool(r3.skipped) and int(r3.skipped_total) == 1
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    after = _state(opt)
    assert all(torch.equal(after[key], state[key]) for key in state)
