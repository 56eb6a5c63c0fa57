"""Aggregation core: reference values, the property table, equivalences, errors, compilation.

Order of the file: the public reference values of algorithms.md; the table of which property
applies to which registered method, and the properties (``tests/aggregation_properties.py``)
applied to every method of ``AGGREGATORS`` by parametrisation (a new method gets every property
that the table does not exempt it from, and a failure names the method); then equivalences
between methods and with plain backward, numerics, errors, torch.compile and the docstring
examples. State properties are in ``test_aggregation_state.py``, the literal D-loop references
in ``test_aggregation_literal.py``, torchjd as the oracle of the bridged methods in
``test_aggregation_torchjd.py``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch
from aggregation_properties import (
    assert_coefficients_from_gramian_alone,
    assert_compiles_fullgraph,
    assert_device_agnostic_and_sync_free,
    assert_finite_on_degenerate_input,
    assert_nonconflicting,
    assert_nonfinite_flagged,
    assert_permutation_equivariant,
    assert_positively_homogeneous,
    assert_repr_reproduces,
    close,
    factory,
    permuted_order,
    registered_cases,
)

import segmerge.aggregation as agg_pkg
from segmerge.aggregation import (
    AGGREGATORS,
    GMD,
    Blending,
    GradCraft,
    Mean,
    PCGrad,
    Sum,
    TorchJDAggregator,
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


# -- which property applies to which method -------------------------------------------------
#
# Every registered method is covered with its defaults, plus the configurations below. Each
# property test is parametrised over these cases; a method is exempted from a property only
# here, with the reason.

VARIANTS: dict[str, list[dict]] = {
    "pcgrad": [dict(masked=True)],
    "gmd": [dict(order="random", seed=1)],
    "gradcraft": [dict(r=0.5, e=0.1, b=0.0), dict(r=1.0, e=0.0, b=0.5)],
    "blending": [dict(estimator="gradient")],
    "aligned_mtl": [dict(scale_mode="rmse")],
}

# torchjd's weightings run on the host (quadprog, cvxpy, scipy solvers and Python branches on
# values: one K×K transfer per step, see segmerge/aggregation/_torchjd.py): they neither run on
# the meta device nor compile with fullgraph=True.
HOST_SIDE = {
    name
    for name, cls in AGGREGATORS.items()
    if isinstance(cls, type) and issubclass(cls, TorchJDAggregator)
}

# Permutation equivariance: every method, except
NOT_PERMUTATION_EQUIVARIANT = {
    "gradvac": "visits the other rows in a random order drawn per row",
    "pcd": "row 0 is the primary objective by definition",
}
# gmd and pcgrad visit the rows in an order over positions (identity / a seeded draw): they are
# equivariant when the order is relabelled with the rows, so they are tested with an explicit
# order on one side and its relabelling on the other.
ORDERED = {"gmd", "pcgrad"}
# ECOS's solver tolerance: a Gramian permuted, or summed in another order, moves Nash-MTL's
# weights by ~1e-9 (measured 2e-10 permuted, 3.6e-9 blockwise)
PERMUTATION_RTOL = {"nashmtl": 1e-6}
COEFFICIENT_RTOL = {"nashmtl": 1e-7}

# Positive homogeneity, update(sJ) = s·update(J), at these scales for every method, except
SCALES = (1e-8, 1e-4, 1e4, 1e8)
NOT_HOMOGENEOUS = {
    "nashmtl": "α ⊙ (Gα) = 1 makes the update scale-invariant (then clipped to max_norm)",
    "fairgrad": "G w = w^(-1/α): the weights scale as s^(-2α/(1+α))",
}
HOMOGENEOUS_ABOVE_FLOOR = {  # absolute epsilons: homogeneous only well above them
    "upgrad": "the dual-cone projector zeroes a Gramian of trace < norm_eps = 1e-4",
    "cagrad": "the Gramian's normalisation and the ball radius use norm_eps = 1e-4",
    "gradvac": "eps = 1e-8 is added to the norm products of every cosine",
    "pcd": "eps = 1e-8 is added to the norms' moving average",
}
HOMOGENEITY_RTOL64 = {"gradvac": 1e-8}  # eps = 1e-8 still acts at s = 1e4 (measured 6.5e-10)

# The update conflicts with no objective (cos(update, g_i) >= -tol): only these methods
# guarantee it. (GMD's clamp can leave a conflict; PCGrad and GradCraft only de-conflict the
# rows pairwise, not the merged update; Sum, Mean, Blending never project.)
NONCONFLICTING = {
    "upgrad": 1e-9,  # each row projected onto the dual cone, so is their mean
    "mgda": 1e-9,  # the minimum-norm point d of the hull has d·g_i >= ‖d‖²
    "nashmtl": 1e-6,  # α > 0 and α_i (Gα)_i = 1, up to ECOS's tolerance
    "fairgrad": 1e-6,  # (Gw)_i = w_i^(-1/α) > 0, up to the least-squares tolerance
    "pcd": 1e-9,  # descent on the primary, a fraction τ >= 0 of progress on the others
    "dualproj": 5e-3,  # the projector's reg_eps = 1e-4 regularisation (measured -1.4e-3)
}


CASES = registered_cases(VARIANTS)


def cases_except(*exempt):
    """The cases of the methods not named in any of the ``exempt`` collections."""
    return [c for c in CASES if not any(c.values[0] in e for e in exempt)]


def test_the_table_names_registered_methods():
    """A renamed or removed method must not silently leave the table."""
    named = (
        set(VARIANTS)
        | set(NOT_PERMUTATION_EQUIVARIANT)
        | ORDERED
        | set(PERMUTATION_RTOL)
        | set(COEFFICIENT_RTOL)
        | set(NOT_HOMOGENEOUS)
        | set(HOMOGENEOUS_ABOVE_FLOOR)
        | set(HOMOGENEITY_RTOL64)
        | set(NONCONFLICTING)
    )
    assert named <= set(AGGREGATORS), named - set(AGGREGATORS)
    assert {"upgrad", "mgda", "cagrad", "imtlg", "aligned_mtl", "dualproj", "nashmtl"} <= HOST_SIDE
    assert not HOST_SIDE & {"sum", "mean", "pcgrad", "gmd", "gradcraft", "blending"}


# -- properties of every method ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,hp", CASES)
def test_finite_and_shaped_everywhere(name, hp, dtype):
    assert_finite_on_degenerate_input(factory(name, hp), dtype)


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
@pytest.mark.parametrize("name,hp", cases_except(NOT_HOMOGENEOUS))
def test_positive_homogeneity(name, hp, dtype):
    gen = torch.Generator().manual_seed(1)
    J = torch.randn(5, 30, dtype=dtype, generator=gen)
    scales = [s for s in SCALES if s > 1] if name in HOMOGENEOUS_ABOVE_FLOOR else SCALES
    rtol = 1e-4 if dtype == torch.float32 else HOMOGENEITY_RTOL64.get(name, 1e-9)
    assert_positively_homogeneous(factory(name, hp), J, scales, rtol, shared=torch.arange(30) < 12)


PERM = [3, 0, 4, 1, 2]
ORDER = [2, 4, 0, 1, 3]


@pytest.mark.parametrize("name,hp", cases_except(NOT_PERMUTATION_EQUIVARIANT))
def test_permutation_equivariance(name, hp):
    gen = torch.Generator().manual_seed(2)
    J = torch.randn(5, 30, dtype=torch.float64, generator=gen)
    make_a = make_b = factory(name, hp)
    if name in ORDERED:
        base = {k: v for k, v in hp.items() if k not in ("order", "seed")}
        make_a = factory(name, {**base, "order": ORDER})
        make_b = factory(name, {**base, "order": permuted_order(ORDER, PERM)})
    rtol = PERMUTATION_RTOL.get(name, 1e-10)
    assert_permutation_equivariant(make_a, make_b, J, PERM, rtol, shared=torch.arange(30) < 12)


@pytest.mark.parametrize("name", sorted(NONCONFLICTING))
def test_nonconflicting(name):
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        J = torch.randn(5, 8, dtype=torch.float64, generator=gen)  # K=5 rows in 8 dims conflict
        assert_nonconflicting(factory(name, {}), J, NONCONFLICTING[name])


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


# (not for methods that need a reference row: the step builds that Gramian through __call__)
@pytest.mark.parametrize("name,hp", [c for c in CASES if not factory(*c.values)().needs_reference])
def test_coefficients_from_gramian_alone(name, hp):
    # the step may compute G itself (e.g. blockwise per parameter tensor) and call coefficients
    gen = torch.Generator().manual_seed(6)
    J = torch.randn(5, 40, dtype=torch.float64, generator=gen)
    rtol = COEFFICIENT_RTOL.get(name, 1e-10)
    assert_coefficients_from_gramian_alone(factory(name, hp), J, [10, 30], rtol)


def test_attributes():
    assert GMD.masked_merge and GradCraft.masked_merge
    assert not PCGrad().masked_merge and PCGrad(masked=True).masked_merge
    assert not (Sum.masked_merge or Mean.masked_merge or Blending().masked_merge)
    assert Blending(estimator="gradient").needs_reference and not Blending().needs_reference
    assert not any(cls().needs_reference for cls in (Sum, Mean, GMD, PCGrad, GradCraft))


# -- non-finite input ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name,hp", CASES)
def test_nonfinite_is_flagged_not_propagated(name, hp, bad):
    assert_nonfinite_flagged(factory(name, hp), bad)


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
    assert set(AGGREGATORS) == {
        *("sum", "mean", "pcgrad", "gmd", "gradcraft", "blending"),
        *("upgrad", "mgda", "cagrad", "imtlg", "aligned_mtl", "dualproj", "nashmtl", "gradvac"),
        *("fairgrad", "pcd"),
    }
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


@pytest.mark.parametrize("name,hp", CASES + [pytest.param("pcgrad", dict(order=[2, 0, 1], seed=5))])
def test_repr_reproduces_configuration(name, hp):
    namespace = {cls.__name__: cls for cls in AGGREGATORS.values()}
    assert_repr_reproduces(factory(name, hp), namespace)


def test_repr_exact():
    assert repr(GradCraft(r=0.5, e=0.0, b=0.0)) == "GradCraft(r=0.5, e=0.0, b=0.0)"


# -- compilation ------------------------------------------------------------------------------------

# Each method with its defaults (pcgrad: its random order, and an explicit one; gradcraft with
# b = 0.5, its norm memory in the graph) and Blending's gradient estimator (the extended
# Gramian); the host-side methods are exempt.
COMPILE_CASES = [
    pytest.param(name, {}, id=name)
    for name in AGGREGATORS
    if name not in HOST_SIDE and name != "gradcraft"
] + [
    pytest.param("pcgrad", dict(order=[2, 0, 1, 4, 3]), id="pcgrad[order]"),
    pytest.param("gradcraft", dict(r=0.5, e=0.1, b=0.5), id="gradcraft[b=0.5]"),
    pytest.param("blending", dict(estimator="gradient"), id="blending[gradient]"),
]


@pytest.mark.parametrize("name,hp", COMPILE_CASES)
def test_compiles_fullgraph(name, hp):
    assert_compiles_fullgraph(factory(name, hp))


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


# meta: every method that runs on the device (the host-side ones read values by design); CUDA,
# when present: every method, results on the device and equal to the CPU's.
DEVICE_CASES = [
    pytest.param(*c.values, "meta", id=f"{c.id}-meta") for c in cases_except(HOST_SIDE)
] + [pytest.param(*c.values, "cuda", id=f"{c.id}-cuda") for c in CASES if torch.cuda.is_available()]


@pytest.mark.parametrize("name,hp,device", DEVICE_CASES)
def test_device_agnostic_and_sync_free(name, hp, device):
    assert_device_agnostic_and_sync_free(factory(name, hp), device)
