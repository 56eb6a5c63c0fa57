"""The torchjd bridge against torchjd itself (the oracle), and what the bridge adds.

Every bridged method must reproduce ``torchjd.aggregation.<X>(...)(J)`` — its weights and its
update ``wᵀ J`` — on random matrices of several shapes (K > D included, a rank-deficient
Gramian) and seeds, over two consecutive steps (the stateful methods), with the hyper-parameters
mapped one to one. Then the bridge's own contracts: the signatures mirror torchjd's, errors name
the method, state per objective set, GradVac's seeded order and the caller's RNG, the amortised
training step, and torchjd imported only when used. The generic properties (structure,
homogeneity, state round trip, ...) are applied to these methods with all others in
``test_aggregation.py`` and ``test_aggregation_state.py``.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch
from aggregation_properties import close, roundtrip
from test_step_support import TinyDSNet, batch, named_losses
from torchjd import aggregation as tjd
from torchjd.linalg import QuadprogProjector

from segmerge.aggregation import (
    AGGREGATORS,
    GRAM_BLOCK,
    TorchJDAggregator,
    build_aggregator,
    hyperparameters,
)
from segmerge.step import ParamLayout, TrainStep, jacobian_loop, objective_roots

BRIDGED = sorted(
    name
    for name, cls in AGGREGATORS.items()
    if isinstance(cls, type) and issubclass(cls, TorchJDAggregator)
)


def pref(K):
    return [float(i + 1) / K for i in range(K)]


# (segmerge hyper-parameters, the torchjd aggregator with the same configuration), per K.
ORACLE = {
    "upgrad": [
        lambda K: ({}, tjd.UPGrad()),
        lambda K: (
            dict(pref_vector=pref(K), norm_eps=1e-3, reg_eps=1e-5),
            tjd.UPGrad(
                torch.tensor(pref(K), dtype=torch.float64),
                projector=QuadprogProjector(norm_eps=1e-3, reg_eps=1e-5),
            ),
        ),
    ],
    "dualproj": [
        lambda K: ({}, tjd.DualProj()),
        lambda K: (
            dict(pref_vector=pref(K), reg_eps=1e-3),
            tjd.DualProj(
                torch.tensor(pref(K), dtype=torch.float64),
                projector=QuadprogProjector(reg_eps=1e-3),
            ),
        ),
    ],
    "mgda": [
        lambda K: ({}, tjd.MGDA()),
        lambda K: (dict(epsilon=1e-5, max_iters=7), tjd.MGDA(epsilon=1e-5, max_iters=7)),
    ],
    "cagrad": [
        lambda K: ({}, tjd.CAGrad(c=0.5)),
        lambda K: (dict(c=0.2, norm_eps=1e-3), tjd.CAGrad(c=0.2, norm_eps=1e-3)),
    ],
    "imtlg": [lambda K: ({}, tjd.IMTLG())],
    "aligned_mtl": [
        lambda K: ({}, tjd.AlignedMTL()),
        lambda K: (
            dict(pref_vector=pref(K), scale_mode="rmse"),
            tjd.AlignedMTL(torch.tensor(pref(K), dtype=torch.float64), scale_mode="rmse"),
        ),
        lambda K: (dict(scale_mode="median"), tjd.AlignedMTL(scale_mode="median")),
    ],
    "fairgrad": [
        lambda K: ({}, tjd.FairGrad(alpha=1.0)),
        lambda K: (dict(alpha=2.0, max_iters=50), tjd.FairGrad(alpha=2.0, max_iters=50)),
    ],
    "nashmtl": [
        lambda K: ({}, tjd.NashMTL(n_tasks=K)),
        lambda K: (
            dict(max_norm=0.5, update_weights_every=2, optim_niter=5),
            tjd.NashMTL(n_tasks=K, max_norm=0.5, update_weights_every=2, optim_niter=5),
        ),
    ],
    "gradvac": [
        lambda K: ({}, tjd.GradVac()),
        lambda K: (dict(beta=0.9, eps=1e-6, seed=7), tjd.GradVac(beta=0.9, eps=1e-6)),
    ],
    "pcd": [
        lambda K: ({}, tjd.PCD()),
        lambda K: (dict(tau=0.3, beta=0.5, eps=1e-6), tjd.PCD(tau=0.3, beta=0.5, eps=1e-6)),
    ],
}
# ECOS (Nash-MTL) converges to ~1e-9 relative; a Gramian summed in another order moves it there.
ORACLE_RTOL = {"nashmtl": 1e-7}
SHAPES = [(2, 7), (3, 40), (5, 40), (8, 5)]  # (K, D); K > D: a rank-deficient Gramian


def oracle_steps(name, hp, reference, Js):
    """torchjd's weights and updates over consecutive steps (GradVac seeded as the bridge)."""
    torch.manual_seed(hp.get("seed", 0))  # GradVac draws from the global generator
    weights = [reference.weighting(J) for J in Js]
    return weights, [w @ J for w, J in zip(weights, Js)]


def test_every_bridged_method_has_an_oracle():
    assert set(ORACLE) == set(BRIDGED)
    assert {"upgrad", "mgda", "cagrad", "imtlg", "aligned_mtl", "dualproj", "nashmtl"} <= set(
        BRIDGED
    ) and "gradvac" in BRIDGED


@pytest.mark.parametrize("name", BRIDGED)
def test_matches_torchjd(name):
    for config in ORACLE[name]:
        for K, D in SHAPES:
            for seed in (0, 1):
                gen = torch.Generator().manual_seed(100 * K + seed)
                Js = [torch.randn(K, D, dtype=torch.float64, generator=gen) for _ in range(2)]
                hp, reference = config(K)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # cvxpy's "not DPP", ECOS's "inaccurate"
                    w_ref, u_ref = oracle_steps(name, hp, reference, Js)
                    ours = build_aggregator(name, **hp)
                    results = [ours(J) for J in Js]
                rtol = ORACLE_RTOL.get(name, 1e-10)
                for step, (res, w, u) in enumerate(zip(results, w_ref, u_ref)):
                    where = f"{name} {hp} K={K} D={D} seed={seed} step={step}"
                    assert close(res.weights, w, rtol=rtol), where
                    assert close(res.update, u, rtol=rtol), where
                    assert torch.equal(res.C, torch.diag(res.weights)), where
                    assert not res.alpha.any(), where


@pytest.mark.parametrize("name", ["upgrad", "mgda", "imtlg", "cagrad"])
def test_matches_torchjd_on_long_rows(name):
    """D above the Gramian's block size: segmerge's blocked Gramian feeds the same weights."""
    gen = torch.Generator().manual_seed(3)
    J = torch.randn(4, 2 * GRAM_BLOCK + 17, dtype=torch.float64, generator=gen)
    hp, reference = ORACLE[name][0](4)
    res = build_aggregator(name, **hp)(J)
    assert close(res.update, reference(J), rtol=1e-9), name


@pytest.mark.parametrize("name", ["upgrad", "mgda", "aligned_mtl", "nashmtl"])
def test_float32_close_to_torchjd(name):
    """A float32 J: the weights are computed from its float32 Gramian in float64 (torchjd in
    float32), the update is float32."""
    gen = torch.Generator().manual_seed(4)
    J = torch.randn(5, 40, generator=gen)
    hp, reference = ORACLE[name][0](5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference(J)
        got = build_aggregator(name, **hp)(J).update
    assert got.dtype == torch.float32
    assert close(got, expected, rtol=1e-4), name


# -- the hyper-parameters are torchjd's ----------------------------------------------------

# Where a segmerge signature differs from torchjd's aggregator, and why.
REPLACED = {  # torchjd parameter -> the segmerge parameters that configure it
    "upgrad": {"projector": ("norm_eps", "reg_eps")},  # QuadprogProjector's options
    "dualproj": {"projector": ("norm_eps", "reg_eps")},
    "nashmtl": {"n_tasks": ()},  # the number of rows of each step
}
ADDED = {"gradvac": {"seed"}}  # the bridge's generator replaces torch's global one
DEFAULT_GIVEN = {"cagrad": {"c": 0.5}, "fairgrad": {"alpha": 1.0}}  # torchjd has no default


@pytest.mark.parametrize("name", BRIDGED)
def test_signature_mirrors_torchjd(name):
    theirs = inspect.signature(getattr(tjd, AGGREGATORS[name].reference)).parameters
    ours = hyperparameters(name)
    replaced = REPLACED.get(name, {})
    expected = set(theirs) - set(replaced) | {p for ps in replaced.values() for p in ps}
    assert set(ours) == expected | ADDED.get(name, set()), name
    for p, param in theirs.items():
        if p in replaced:
            continue
        if param.default is inspect.Parameter.empty:
            assert ours[p] == DEFAULT_GIVEN[name][p], (name, p)
        else:
            assert ours[p] == param.default, (name, p)
    if "projector" in replaced:
        projector = QuadprogProjector()
        assert (ours["norm_eps"], ours["reg_eps"]) == (projector.norm_eps, projector.reg_eps)


@pytest.mark.parametrize(
    "name,hp,message",
    [
        ("cagrad", dict(c=-1.0), r"CAGrad: c must be non-negative, but got -1.0"),
        ("mgda", dict(epsilon=0.0), r"MGDA: epsilon must be positive, but got 0.0"),
        ("gradvac", dict(beta=1.5), r"GradVac: Attribute `beta` must be in \[0, 1\]"),
        ("pcd", dict(tau=2.0), r"PCD: Attribute `tau` must be in \[0, 1\]"),
        ("nashmtl", dict(optim_niter=0), r"NashMTL: optim_niter must be a positive integer"),
        ("aligned_mtl", dict(scale_mode="max"), r"scale_mode must be one of .* got 'max'"),
    ],
)
def test_invalid_hyperparameters_are_named_at_construction(name, hp, message):
    with pytest.raises(ValueError, match=message):
        build_aggregator(name, **hp)


def test_nash_mtl_needs_two_objectives():
    with pytest.raises(ValueError, match=r"NashMTL needs at least 2 objectives .* got K=1"):
        build_aggregator("nashmtl")(torch.randn(1, 4))


def test_pref_vector_must_match_the_objectives():
    with pytest.raises(ValueError, match=r"should have 3 rows"):
        build_aggregator("upgrad", pref_vector=[0.5, 0.3, 0.2])(torch.randn(4, 6))


# -- state ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nashmtl", "pcd"])
def test_state_is_kept_per_objective_set(name):
    """A step with an objective absent uses its own state and leaves the full set's alone."""
    gen = torch.Generator().manual_seed(5)
    Js = [torch.randn(3, 12, dtype=torch.float64, generator=gen) for _ in range(3)]
    names = ["fused.d0", "modality.t1", "modality.t2"]
    a, b = build_aggregator(name), build_aggregator(name)
    a(Js[0], names=names)
    b(Js[0], names=names)
    b(Js[1][:2], names=names[:2])  # modality.t2 absent
    assert torch.equal(a(Js[2], names=names).update, b(Js[2], names=names).update)
    c = build_aggregator(name)
    c.load_state_dict(roundtrip(b.state_dict()))
    assert [e["names"] for e in c.state_dict()["weightings"]] == [names, names[:2]]
    assert torch.equal(c(Js[1][:2], names=names[:2]).update, b(Js[1][:2], names=names[:2]).update)


@pytest.mark.parametrize(
    "name,key", [("nashmtl", "prvs_alpha"), ("gradvac", "phi"), ("pcd", "sq_norm_ema")]
)
def test_foreign_state_is_rejected_by_name(name, key):
    agg = build_aggregator(name)
    agg(torch.randn(3, 8, dtype=torch.float64), names=["a", "b", "c"])
    state = agg.state_dict()
    state["weightings"][0]["names"] = ["a", "b"]  # state of three objectives filed under two
    with pytest.raises(ValueError, match=rf"{key} must have shape \(2,"):
        build_aggregator(name).load_state_dict(roundtrip(state))


def test_gradvac_order_is_seeded_and_leaves_the_global_generator_alone():
    gen = torch.Generator().manual_seed(6)
    J = torch.randn(6, 20, dtype=torch.float64, generator=gen)
    before = torch.get_rng_state()
    a = [build_aggregator("gradvac", seed=s)(J).update for s in (1, 1, 2)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a[0], a[1])  # two ranks with one seed
    assert not torch.equal(a[0], a[2])  # another seed visits in another order


def test_stateless_methods_keep_no_state():
    for name in BRIDGED:
        agg = build_aggregator(name)
        if not agg.stateful:
            agg(torch.randn(3, 5))
            assert agg.state_dict() == {}, name
    assert {n for n in BRIDGED if build_aggregator(n).stateful} == {"nashmtl", "gradvac", "pcd"}


def test_degenerate_steps_do_not_touch_the_state():
    """An all-zero J gives zero weights without calling torchjd (Nash-MTL would divide by 0)."""
    gen = torch.Generator().manual_seed(8)
    J = torch.randn(3, 9, dtype=torch.float64, generator=gen)
    a, b = build_aggregator("nashmtl"), build_aggregator("nashmtl")
    a(J)
    b(J)
    zero = b(torch.zeros(3, 9, dtype=torch.float64))
    assert not zero.weights.any() and not zero.update.any() and not bool(zero.nonfinite)
    assert torch.equal(a(J).update, b(J).update)


# -- the training step ---------------------------------------------------------------------------


def test_amortised_training_step_reuses_the_torchjd_weights():
    """refresh_every=2: the refresh step's weights are torchjd's UPGrad weights of that step's
    Gramian; the next step applies them in one backward, with no masked merge."""
    torch.manual_seed(0)
    net = TinyDSNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    step = TrainStep(net, opt, build_aggregator("upgrad"), strategy="loop", refresh_every=2)
    layout = ParamLayout([p for p in net.parameters() if p.requires_grad])

    def losses_and_jacobian(seed):
        x, t = batch(seed=seed)
        nl = named_losses(net(x), t)
        J = torch.empty(len(nl.names), layout.dim)
        jacobian_loop(objective_roots(nl.losses), layout, J, torch.ones(()), retain_graph=True)
        return named_losses(net(x), t), J

    nl0, J0 = losses_and_jacobian(0)
    r0 = step.step(nl0)
    assert r0.refreshed
    expected = tjd.UPGradWeighting()((J0 @ J0.T).double()).float()
    torch.testing.assert_close(r0.weights.float(), expected, rtol=1e-4, atol=1e-6)
    nl1, J1 = losses_and_jacobian(1)
    before = [p.detach().clone() for p in layout.params]
    r1 = step.step(nl1)
    assert not r1.refreshed and r1.backward_passes == 1
    torch.testing.assert_close(r1.weights, r0.weights)
    got = torch.cat([(b - p.detach()).flatten() / 0.05 for b, p in zip(before, layout.params)])
    torch.testing.assert_close(got, r0.weights.to(J1.dtype) @ J1, rtol=1e-4, atol=1e-6)


# -- import cost ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchjd_is_imported_only_when_a_bridged_method_is_built():
    """torchjd imports cvxpy and qpsolvers (seconds): segmerge commands that do not use a
    bridged method must not pay for it."""
    code = (
        "import sys; from segmerge.aggregation import build_aggregator, AGGREGATORS; "
        "build_aggregator('gmd'); assert 'torchjd' not in sys.modules, 'imported early'; "
        "build_aggregator('upgrad'); assert 'torchjd' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
