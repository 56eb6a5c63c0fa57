"""Aggregation core: reference values, properties, equivalences, errors, compilation.

Order of the file: the public reference values of algorithms.md, then properties every method
must have (finite and shaped output, homogeneity, permutation equivariance), then equivalences
between methods and with plain backward, then numerics (zero rows, collinear conflicts,
non-finite input), errors, torch.compile, and the docstring examples.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import segmerge.aggregation as agg_pkg
from segmerge.aggregation import (
    AGGREGATORS,
    GMD,
    AggregationResult,
    Blending,
    GradCraft,
    Mean,
    PCGrad,
    Sum,
    aggregate,
    build_aggregator,
    combine,
    gmd_coefficients,
    gradcraft_coefficients,
    gramian,
    interval_blending_weights,
    merge_scale,
    pcgrad_coefficients,
)

A = [[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]
C_NO_CONFLICT = [[1.0, 2.0], [3.0, 1.0]]
DTYPES = [torch.float32, torch.float64]


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def close(a, b, rtol=1e-5):
    b = torch.as_tensor(b, dtype=a.dtype)
    scale = b.abs().max().clamp_min(1e-30)
    return bool((a - b).abs().max() <= rtol * scale)


# -- public reference values (algorithms.md) ------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_A_projection(dtype):
    J = t(A, dtype)
    C, _ = pcgrad_coefficients(gramian(J), [0, 1])
    assert close(C @ J, [[-0.526316, 1.578947, 1.578947], [1.111111, 2.222222, 2.222222]])
    assert close(aggregate("pcgrad", J, order=[0, 1]), [0.584795, 3.801170, 3.801170])
    assert close(aggregate("pcgrad", J), [0.584795, 3.801170, 3.801170])  # random order, K=2
    assert close(aggregate("gmd", J), [0.292398, 1.900585, 1.900585])
    all_shared = torch.ones(3, dtype=torch.bool)
    assert close(aggregate("gmd", J, shared=all_shared), [0.292398, 1.900585, 1.900585])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hp,expected",
    [
        (dict(r=1.0, e=0.0, b=0.0), [0.173196, 2.258190, 2.258190]),
        (dict(r=0.5, e=0.0, b=0.0), [0.232797, 2.079387, 2.079387]),
        (dict(r=1.0, e=0.1, b=0.0), [0.182603, 2.380838, 2.380838]),
    ],
)
def test_reference_A_gradcraft(dtype, hp, expected):
    J = t(A, dtype)
    mask = torch.ones(3, dtype=torch.bool)
    assert close(aggregate("gradcraft", J, shared=mask, **hp), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_C_no_conflict(dtype):
    J = t(C_NO_CONFLICT, dtype)
    assert close(aggregate("gmd", J), [2.0, 1.5])
    assert close(aggregate("gradcraft", J, r=1.0), [2.207107, 1.914214])


def test_reference_blending_interval():
    w, ogr = interval_blending_weights(
        torch.tensor([1.0, 1.0, 1.0]),
        torch.tensor([1.1, 1.05, 1.2]),
        torch.tensor([0.6, 0.8, 0.5]),
        torch.tensor([0.9, 0.9, 1.1]),
    )
    assert close(ogr, [1.0, 1.0 / 3.0, 4.0])
    assert close(w, [0.076190, 0.914286, 0.009524])
    assert close(w.sum(), 1.0)


def test_gmd_clamp_acts_by_hand():
    # g1=(-10,0), g2=(1,1): α12 = -10/2 = -5 -> clamped to -2, p1 = (-8, 2);
    # α21 = -10/100 = -0.1, p2 = (0, 1); masked merge (all shared): (-4, 1.5).
    J = t([[-10.0, 0.0], [1.0, 1.0]])
    res = GMD()(J)
    assert close(res.C @ J, [[-8.0, 2.0], [0.0, 1.0]])
    assert close(res.alpha, [[0.0, -2.0], [-0.1, 0.0]])
    assert close(res.update, [-4.0, 1.5])
    # the clamp leaves a conflict in place: p1·g2 = -6 < 0
    assert float((res.C @ J)[0] @ J[1]) < 0


def test_pcgrad_order_matters_and_is_used():
    J = t([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]])
    a = aggregate("pcgrad", J, order=[2, 0, 1])
    b = aggregate("pcgrad", J, order=[1, 0, 2])
    assert not close(a, b)
    C, _ = pcgrad_coefficients(gramian(J), [2, 0, 1])
    assert close(a, C.sum(0) @ J)


# -- properties --------------------------------------------------------------------------------

NAMES5 = ["fused.d0", "fused.d1", "modality.flair", "modality.t1", "modality.t2"]


def make_all():
    """One fresh aggregator per registered method and option worth covering."""
    return [
        Sum(),
        Mean(),
        PCGrad(),
        PCGrad(masked=True),
        GMD(),
        GMD(order="random", seed=1),
        GradCraft(r=0.5, e=0.1, b=0.0),
        GradCraft(r=1.0, e=0.0, b=0.5),
        Blending(),
        Blending(estimator="gradient"),
    ]


def call(agg, J, shared=None, names=NAMES5, reference=None):
    if agg.needs_reference and reference is None:
        reference = J[:2].sum(0) * 0.5 + J[-1]
    return agg(J, shared=shared, names=names, reference=reference)


def awkward_jacobians(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 40, dtype=dtype, generator=gen)
    zero_row = base.clone()
    zero_row[2] = 0
    collinear = base.clone()
    collinear[1] = 3.0 * collinear[0]
    collinear[3] = -2.0 * collinear[0]
    duplicates = base[[0, 0, 1, 1, 2]].clone()
    return {
        "random": base,
        "zero_row": zero_row,
        "all_zero": torch.zeros(5, 40, dtype=dtype),
        "collinear": collinear,
        "duplicates": duplicates,
        "tiny": base * 1e-20,
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_and_shaped_everywhere(dtype):
    shared = torch.arange(40) < 25
    for case, J in awkward_jacobians(dtype).items():
        for agg in make_all():
            res = call(agg, J, shared)
            assert isinstance(res, AggregationResult)
            assert res.update.shape == (40,) and res.update.dtype == dtype, (case, agg)
            for name in ("C", "cosine", "alpha"):
                assert getattr(res, name).shape == (5, 5), (case, agg, name)
            assert res.weights.shape == (5,) and res.norms.shape == (5,)
            assert res.n_conflicts.shape == () and res.nonfinite.shape == ()
            assert not bool(res.nonfinite)
            for name in ("update", "C", "weights", "cosine", "alpha", "norms"):
                assert torch.isfinite(getattr(res, name)).all(), (case, repr(agg), name)
            assert close(res.weights, res.C.sum(0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_collinear_conflicts_use_least_squares(dtype):
    # rows 1 and 2 are collinear and both conflict with row 0: G_i G_iᵀ is singular.
    g0 = t([1.0, 0.0, 0.0], dtype)
    g1 = t([-1.0, 1.0, 0.0], dtype)
    J = torch.stack([g0, g1, 2.0 * g1])
    for e in (0.0, 0.2):
        C, w = gradcraft_coefficients(gramian(J), torch.ones(3, dtype=dtype), r=0.0, e=e)
        p0 = C[0] @ J
        for j in (1, 2):  # the constraint holds for both collinear rows
            target = e * J[0].norm() * J[j].norm()
            assert close(p0 @ J[j], target, rtol=1e-5) or abs(float(p0 @ J[j] - target)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-8, 1e-4, 1e4, 1e8])
def test_positive_homogeneity(dtype, scale):
    gen = torch.Generator().manual_seed(1)
    J = torch.randn(5, 30, dtype=dtype, generator=gen)
    reference = torch.randn(30, dtype=dtype, generator=gen)
    shared = torch.arange(30) < 12
    for agg_a, agg_b in zip(make_all(), make_all()):
        base = call(agg_a, J, shared, reference=reference).update
        scaled = call(agg_b, J * scale, shared, reference=reference * scale).update
        assert close(scaled / scale, base, rtol=1e-4 if dtype == torch.float32 else 1e-9), repr(
            agg_a
        )


def permuted_order(order, perm):
    """The order over the rows of J[perm] that visits the same objectives as ``order`` on J."""
    inverse = torch.argsort(torch.tensor(perm)).tolist()
    return [inverse[j] for j in order]


def test_permutation_equivariance():
    gen = torch.Generator().manual_seed(2)
    J = torch.randn(5, 30, dtype=torch.float64, generator=gen)
    reference = torch.randn(30, dtype=torch.float64, generator=gen)
    shared = torch.arange(30) < 12
    perm = [3, 0, 4, 1, 2]
    P = torch.eye(5, dtype=torch.float64)[perm]
    names_p = [NAMES5[i] for i in perm]
    order = [2, 4, 0, 1, 3]
    pairs = [
        (Sum(), Sum()),
        (Mean(), Mean()),
        (GradCraft(r=0.7, e=0.1), GradCraft(r=0.7, e=0.1)),
        (Blending(), Blending()),
        (Blending(estimator="gradient"), Blending(estimator="gradient")),
        (GMD(order=order), GMD(order=permuted_order(order, perm))),
        (PCGrad(order=order), PCGrad(order=permuted_order(order, perm))),
    ]
    for a, b in pairs:
        ra = a(J, shared=shared, names=NAMES5, reference=reference)
        rb = b(J[perm], shared=shared, names=names_p, reference=reference)
        assert close(rb.update, ra.update, rtol=1e-10), repr(a)
        assert close(rb.C, P @ ra.C @ P.T, rtol=1e-10), repr(a)
        assert close(rb.alpha, P @ ra.alpha @ P.T, rtol=1e-10), repr(a)
        assert close(rb.cosine, P @ ra.cosine @ P.T, rtol=1e-10)


def test_diagnostics():
    J = t(A)
    res = GMD()(J)
    assert int(res.n_conflicts) == 1
    assert close(res.norms, [18**0.5, 38**0.5])
    assert close(res.cosine[0, 1], -22 / (18 * 38) ** 0.5)
    assert close(torch.diagonal(res.cosine), [1.0, 1.0])
    assert res.names is None
    assert GMD()(J, names=["a", "b"]).names == ["a", "b"]
    # GradCraft's alpha holds the projection weights of the conflicting pairs only
    gc = GradCraft(r=0.0)(J)
    assert gc.alpha[0, 0] == 0 and gc.alpha[1, 1] == 0 and gc.alpha[0, 1] > 0


# -- equivalences --------------------------------------------------------------------------------


def test_gradcraft_r0_e0_two_objectives_equals_pcgrad_rows():
    gen = torch.Generator().manual_seed(3)
    shared = torch.arange(20) < 8
    for _ in range(10):
        J = torch.randn(2, 20, dtype=torch.float64, generator=gen)
        G = gramian(J)
        C_gc, _ = gradcraft_coefficients(G, torch.diagonal(G).sqrt(), r=0.0, e=0.0)
        C_pc, _ = pcgrad_coefficients(G, [0, 1])
        assert close(C_gc @ J, C_pc @ J, rtol=1e-10)
        gc = GradCraft(r=0.0, e=0.0)(J, shared=shared).update
        assert close(gc, PCGrad(masked=True)(J, shared=shared).update, rtol=1e-10)


def test_gmd_equals_pcgrad_rows_when_no_clamp_acts():
    gen = torch.Generator().manual_seed(4)
    checked = 0
    for _ in range(20):
        J = torch.randn(6, 25, dtype=torch.float64, generator=gen)
        order = torch.randperm(6, generator=gen).tolist()
        C_gmd, alpha = gmd_coefficients(gramian(J), order)
        if bool((alpha <= -2).any()):
            continue  # the clamp acted: the methods legitimately differ
        checked += 1
        C_pc, _ = pcgrad_coefficients(gramian(J), order)
        assert close(C_gmd @ J, C_pc @ J, rtol=1e-10)
        assert close(GMD(order=order)(J).update, PCGrad(order=order, masked=True)(J).update, 1e-10)
    assert checked >= 10


class TinyMultiHead(torch.nn.Module):
    """A shared trunk and one head per objective (so reach differs per parameter tensor)."""

    def __init__(self, heads=3):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(heads))

    def forward(self, x):
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def test_sum_and_mean_equal_plain_backward():
    torch.manual_seed(0)
    net = TinyMultiHead()
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    params = list(net.parameters())

    def losses():
        return [torch.nn.functional.mse_loss(out, y * (k + 1)) for k, out in enumerate(net(x))]

    rows = []
    for loss in losses():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(grads, params)
                ]
            )
        )
    J = torch.stack(rows)
    shared = torch.cat(
        [torch.full((p.numel(),), i < 2, dtype=torch.bool) for i, p in enumerate(params)]
    )
    for agg, reduce in (
        (Sum(), torch.stack(losses()).sum()),
        (Mean(), torch.stack(losses()).mean()),
    ):
        net.zero_grad()
        reduce.backward()
        plain = torch.cat([p.grad.flatten() for p in params])
        assert close(agg(J, shared=shared).update, plain, rtol=1e-5), repr(agg)


def test_merge_scale_and_combine_agree():
    gen = torch.Generator().manual_seed(5)
    J = torch.randn(4, 30, generator=gen)
    shared = torch.arange(30) % 3 == 0
    c = torch.randn(4, generator=gen)
    for masked in (True, False):
        expected = torch.where(shared, (c @ J) / 4, c @ J) if masked else c @ J
        assert close(merge_scale(shared, 4, masked) * (c @ J), expected)
        assert close(combine(J, c, merge_scale(shared, 4, masked)), expected)
    assert close(combine(J, c, merge_scale(None, 4, True)), (c @ J) / 4)
    assert close(combine(J, c), c @ J)
    res = GMD()(J, shared=shared)
    assert close(res.update, merge_scale(shared, 4, GMD.masked_merge) * (res.weights @ J))


def test_coefficients_from_gramian_alone():
    # the step may compute G itself (e.g. blockwise per parameter tensor) and call coefficients
    gen = torch.Generator().manual_seed(6)
    J = torch.randn(5, 40, dtype=torch.float64, generator=gen)
    blocks = J.split([10, 30], dim=1)
    G = sum(b @ b.T for b in blocks)
    for agg_a, agg_b in zip(make_all(), make_all()):
        if agg_a.needs_reference:
            continue
        co = agg_a.coefficients(G, names=NAMES5)
        res = agg_b(J, names=NAMES5)
        assert close(co.C, res.C, rtol=1e-10), repr(agg_a)
        built = AggregationResult.from_gramian(res.update, G, co, NAMES5)
        assert close(built.cosine, res.cosine, rtol=1e-10)


def test_attributes():
    assert GMD.masked_merge and GradCraft.masked_merge
    assert not PCGrad().masked_merge and PCGrad(masked=True).masked_merge
    assert not (Sum.masked_merge or Mean.masked_merge or Blending().masked_merge)
    assert Blending(estimator="gradient").needs_reference and not Blending().needs_reference
    assert not any(cls().needs_reference for cls in (Sum, Mean, GMD, PCGrad, GradCraft))


# -- non-finite input ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_is_flagged_not_propagated(bad):
    J = torch.randn(5, 30)
    J[2, 7] = bad
    for agg in make_all():
        res = call(agg, J, torch.arange(30) < 10)
        assert bool(res.nonfinite), repr(agg)
        assert torch.equal(res.update, torch.zeros(30)), repr(agg)
        assert torch.isfinite(res.C).all() and torch.isfinite(res.cosine).all()
    assert not bool(GMD()(torch.randn(5, 30)).nonfinite)


def test_nonfinite_step_leaves_state_unchanged():
    J = torch.randn(5, 30, dtype=torch.float64)
    bad = J.clone()
    bad[0, 0] = float("nan")
    for make in (lambda: GradCraft(b=0.5), lambda: Blending(estimator="gradient")):
        a, b = make(), make()
        call(a, J)
        call(b, J)
        call(b, bad)
        assert close(call(a, J).update, call(b, J).update, rtol=1e-12)


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hp,message",
    [
        (dict(r=1.5), r"r must be in \[0, 1\], got 1.5"),
        (dict(r=-0.1), r"r must be in \[0, 1\], got -0.1"),
        (dict(e=-0.01), r"e must be >= 0, got -0.01"),
        (dict(b=1.0), r"b must be in \[0, 1\), got 1.0"),
        (dict(b=-0.5), r"b must be in \[0, 1\), got -0.5"),
        (dict(r=float("nan")), r"r must be in \[0, 1\], got nan"),
    ],
)
def test_invalid_gradcraft_hyperparameters(hp, message):
    with pytest.raises(ValueError, match=message):
        build_aggregator("gradcraft", **hp)
    with pytest.raises(ValueError, match=message):
        aggregate("gradcraft", torch.randn(2, 3), **hp)


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ValueError, match=r"unknown aggregation method 'gdm'; did you mean 'gmd'"):
        aggregate("gdm", torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"did you mean 'gradcraft'"):
        build_aggregator("gradcraf")
    with pytest.raises(ValueError, match=r"unknown hyper-parameter 'rr'; did you mean 'r'"):
        build_aggregator("gradcraft", rr=0.5)
    with pytest.raises(
        ValueError, match=r"estimator must be one of .* got 'gradiant'; did you mean 'gradient'"
    ):
        Blending(estimator="gradiant")
    assert set(AGGREGATORS) == {"sum", "mean", "pcgrad", "gmd", "gradcraft", "blending"}
    assert isinstance(build_aggregator("GMD"), GMD)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"order must be a permutation of 0..K-1, got \[0, 0, 1\]"):
        GMD(order=[0, 0, 1])
    with pytest.raises(ValueError, match=r"got 'randm'; did you mean 'random'"):
        GMD(order="randm")
    with pytest.raises(ValueError, match=r"order \[1, 0\] has 2 entries for K=3"):
        GMD(order=[1, 0])(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"J must be a 2-D floating"):
        GMD()(torch.randn(3))
    with pytest.raises(ValueError, match=r"shared must be a \(4,\) bool tensor"):
        GMD()(torch.randn(3, 4), shared=torch.ones(5, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"names must have one entry per row of J: got 2 names for K=3"
    ):
        GMD()(torch.randn(3, 4), names=["a", "b"])
    with pytest.raises(ValueError, match=r"needs reference="):
        Blending(estimator="gradient")(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"warmup must be >= 0, got -1"):
        Blending(warmup=-1)
    with pytest.raises(ValueError, match=r"super_epoch must be >= 1, got 0"):
        Blending(super_epoch=0)


# -- representation ------------------------------------------------------------------------------


def test_repr_reproduces_configuration():
    for agg in make_all() + [PCGrad(order=[2, 0, 1], seed=5)]:
        rebuilt = eval(repr(agg), {c.__name__: c for c in AGGREGATORS.values()})
        assert repr(rebuilt) == repr(agg)
    assert repr(GradCraft(r=0.5, e=0.0, b=0.0)) == "GradCraft(r=0.5, e=0.0, b=0.0)"


# -- compilation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        Sum,
        Mean,
        GMD,
        lambda: PCGrad(order=[2, 0, 1, 4, 3]),
        lambda: GradCraft(r=0.5, e=0.1, b=0.5),
        Blending,
        lambda: Blending(estimator="gradient"),
    ],
)
def test_compiles_fullgraph(make):
    """The whole aggregation (Gramian, K-space, combination, state update) is one graph: no
    graph break means no .item() and no Python branching on tensor values."""
    J = torch.randn(5, 64)
    shared = torch.arange(64) < 20
    reference = torch.randn(64)
    torch._dynamo.reset()  # each case compiles afresh (no recompile-limit carry-over)
    eager, compiled_agg = make(), make()
    compiled = torch.compile(
        lambda J, s, r: compiled_agg(J, shared=s, names=NAMES5, reference=r),
        fullgraph=True,
        backend="aot_eager",
    )
    for _ in range(2):  # the second call runs with state from the first
        expected = eager(J, shared=shared, names=NAMES5, reference=reference)
        got = compiled(J, shared, reference)
        assert close(got.update, expected.update, rtol=1e-5)
        assert close(got.C, expected.C, rtol=1e-5)


# -- docstring examples -------------------------------------------------------------------------------


def test_docstring_examples_run():
    modules = [agg_pkg] + [
        importlib.import_module(f"segmerge.aggregation.{m.name}")
        for m in pkgutil.iter_modules(agg_pkg.__path__)
    ]
    attempted = 0
    for module in modules:
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 40


def test_merge_scale_cache_follows_the_mask():
    """The (D,) merge factor is cached per mask object; an in-place change or a new mask with the
    same contents' address must never reuse a stale factor."""
    J = torch.randn(3, 12, dtype=torch.float64)
    shared = torch.arange(12) < 6
    agg = GMD()
    first = agg(J, shared=shared).update
    assert torch.equal(agg(J, shared=shared).update, first)
    shared[:3] = False  # in place: bumps the version counter
    expected = GMD()(J, shared=shared.clone()).update
    assert torch.equal(agg(J, shared=shared).update, expected)
    other = torch.arange(12) >= 6
    assert torch.equal(agg(J, shared=other).update, GMD()(J, shared=other.clone()).update)
    assert torch.equal(agg(J[:2], shared=other).update, GMD()(J[:2], shared=other).update)


def test_blocked_gramian_matches_float64():
    """Blocks plus a remainder; float32 accuracy close to resolution (one long product is not)."""
    from segmerge.aggregation import GRAM_BLOCK

    gen = torch.Generator().manual_seed(8)
    J = torch.randn(6, 3 * GRAM_BLOCK + 123, generator=gen) + 0.5
    reference = torch.randn(J.shape[1], generator=gen)
    exact = torch.cat([J, reference[None]]).double()
    exact = exact @ exact.T
    G = gramian(J, reference)
    assert G.shape == (7, 7) and G.dtype == torch.float32
    assert float(((G.double() - exact).abs() / exact.abs().max()).max()) < 1e-6
    assert torch.equal(gramian(J), G[:6, :6])


DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_agnostic_and_sync_free(device):
    """Every aggregator runs on the meta device, where reading a tensor value (``.item()``,
    ``bool(t)``, ``if t:``) raises and tensors of two devices cannot be mixed: so no code path
    syncs with the host or creates its tensors on the CPU. On CUDA (when present) the results
    stay on the device and match the CPU."""
    gen = torch.Generator().manual_seed(9)
    J = torch.randn(5, 64, generator=gen)
    shared = torch.arange(64) < 20
    reference = torch.randn(64, generator=gen)
    for agg, cpu_agg in zip(make_all(), make_all()):
        for _ in range(2):  # second step runs with state
            res = call(agg, J.to(device), shared.to(device), reference=reference.to(device))
            expected = call(cpu_agg, J, shared, reference=reference)
            for name in ("update", "C", "weights", "cosine", "alpha", "n_conflicts", "norms"):
                value = getattr(res, name)
                assert value.device.type == device, (repr(agg), name)
                assert value.shape == getattr(expected, name).shape
            if device != "meta":
                assert close(res.update.cpu(), expected.update, rtol=1e-4), repr(agg)
