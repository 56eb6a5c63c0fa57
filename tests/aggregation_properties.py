"""Properties of segmerge aggregators, one function per property (a library, not a test file).

In the style of torchjd's ``tests/unit/aggregation/_asserts.py``: each ``assert_*`` states one
property in its docstring and checks it on the inputs it is given, with messages that name the
aggregator (``repr``). The test files decide which property applies to which registered method
(the table in ``tests/test_aggregation.py``) and parametrise over ``AGGREGATORS``, so a new
method gets every property that is not explicitly exempted for it.

``make`` arguments are zero-argument factories returning a *fresh* aggregator (properties that
compare two runs need two independent instances with the same configuration).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

from segmerge.aggregation import (
    AGGREGATORS,
    AggregationResult,
    Aggregator,
    build_aggregator,
    merge_scale,
)

Make = Callable[[], Aggregator]

NAMES5 = ["fused.d0", "fused.d1", "modality.flair", "modality.t1", "modality.t2"]


# -- helpers --------------------------------------------------------------------------------


def registered_cases(variants: dict[str, list[dict]]) -> list:
    """``pytest.param(name, hyper-parameters)`` for every method of ``AGGREGATORS`` with its
    defaults, plus the configurations in ``variants``; ids like ``gmd[order=random,seed=1]``."""
    unknown = set(variants) - set(AGGREGATORS)
    assert not unknown, f"variants of unregistered methods: {sorted(unknown)}"
    return [
        pytest.param(
            name,
            hp,
            id=name + ("[" + ",".join(f"{k}={v}" for k, v in hp.items()) + "]" if hp else ""),
        )
        for name in AGGREGATORS
        for hp in [{}] + variants.get(name, [])
    ]


def factory(name: str, hp: dict) -> Make:
    """A zero-argument factory of ``build_aggregator(name, **hp)``."""
    return lambda: build_aggregator(name, **hp)


def close(a: Tensor, b, rtol: float = 1e-5) -> bool:
    """Max abs error within ``rtol`` times the largest magnitude of ``b``."""
    b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
    scale = b.abs().max().clamp_min(1e-30)
    return bool((a - b).abs().max() <= rtol * scale)


def call(
    agg: Aggregator,
    J: Tensor,
    shared: Tensor | None = None,
    names: Sequence[str] | None = NAMES5,
    reference: Tensor | None = None,
) -> AggregationResult:
    """One aggregation; a reference row is made up from J when the method needs one."""
    if agg.needs_reference and reference is None:
        reference = J[:2].sum(0) * 0.5 + J[-1]
    return agg(J, shared=shared, names=names, reference=reference)


def roundtrip(state):
    """Through a real checkpoint file format, loadable with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def awkward_jacobians(dtype: torch.dtype, K: int = 5, D: int = 40) -> dict[str, Tensor]:
    """Random J and its degenerate relatives: a zero row, all zeros, collinear and conflicting
    rows, duplicated rows, and values near the float64 underflow of their squares."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(K, D, dtype=dtype, generator=gen)
    zero_row = base.clone()
    zero_row[2] = 0
    collinear = base.clone()
    collinear[1] = 3.0 * collinear[0]
    collinear[3] = -2.0 * collinear[0]
    duplicates = base[[0, 0, 1, 1, 2]].clone()
    return {
        "random": base,
        "zero_row": zero_row,
        "all_zero": torch.zeros(K, D, dtype=dtype),
        "collinear": collinear,
        "duplicates": duplicates,
        "tiny": base * 1e-20,
    }


def permuted_order(order: Sequence[int], perm: Sequence[int]) -> list[int]:
    """The order over the rows of ``J[perm]`` that visits the same objectives as ``order`` on J."""
    inverse = torch.argsort(torch.tensor(perm)).tolist()
    return [inverse[j] for j in order]


# -- properties of one aggregation ----------------------------------------------------------


def assert_expected_structure(agg: Aggregator, J: Tensor, shared: Tensor | None = None) -> None:
    """The result is an :class:`AggregationResult` of the documented shapes and dtype, finite,
    not flagged non-finite, with ``weights = C.sum(0)`` and the update equal to the one
    combination ``merge_scale(shared) ⊙ (Jᵀ weights)``."""
    K, D = J.shape
    res = call(agg, J, shared)
    assert isinstance(res, AggregationResult), repr(agg)
    assert res.update.shape == (D,) and res.update.dtype == J.dtype, repr(agg)
    for name in ("C", "cosine", "alpha"):
        assert getattr(res, name).shape == (K, K), (repr(agg), name)
    assert res.weights.shape == (K,) and res.norms.shape == (K,), repr(agg)
    assert res.n_conflicts.shape == () and res.nonfinite.shape == (), repr(agg)
    assert not bool(res.nonfinite), repr(agg)
    for name in ("update", "C", "weights", "cosine", "alpha", "norms"):
        assert torch.isfinite(getattr(res, name)).all(), (repr(agg), name)
    assert close(res.weights, res.C.sum(0)), repr(agg)
    scale = merge_scale(shared, K, agg.masked_merge, dtype=J.dtype)
    expected = scale * (res.weights.to(J.dtype) @ J)
    assert close(res.update, expected, rtol=1e-4 if J.dtype == torch.float32 else 1e-10), repr(agg)


def assert_finite_on_degenerate_input(make: Make, dtype: torch.dtype) -> None:
    """On every Jacobian of :func:`awkward_jacobians` (zero rows, all zeros, collinear and
    duplicated rows, tiny values) the result has the expected structure: finite, never NaN."""
    D = 40
    shared = torch.arange(D) < 25
    for case, J in awkward_jacobians(dtype, D=D).items():
        agg = make()
        try:
            assert_expected_structure(agg, J, shared)
        except AssertionError as err:
            raise AssertionError(f"{case}: {err}") from err


def assert_positively_homogeneous(
    make: Make, J: Tensor, scales: Sequence[float], rtol: float, shared: Tensor | None = None
) -> None:
    """Linear under positive scaling: ``update(s·J) = s·update(J)`` for every s in ``scales``
    (the reference row, for methods that need one, is scaled too)."""
    gen = torch.Generator().manual_seed(11)
    reference = torch.randn(J.shape[1], dtype=J.dtype, generator=gen)
    base = call(make(), J, shared, reference=reference).update
    for s in scales:
        scaled = call(make(), J * s, shared, reference=reference * s).update
        assert close(scaled / s, base, rtol=rtol), f"{make()!r} at scale {s:g}"


def assert_permutation_equivariant(
    make_a: Make,
    make_b: Make,
    J: Tensor,
    perm: Sequence[int],
    rtol: float,
    shared: Tensor | None = None,
) -> None:
    """Relabelling the objectives relabels everything and changes nothing else: with rows
    ``J[perm]`` (and names permuted alike), ``make_b``'s update equals ``make_a``'s on J and
    ``C``, ``alpha`` and ``cosine`` are permuted as ``P X Pᵀ``. ``make_b`` is ``make_a`` unless
    the configuration names rows (an explicit order, permuted with :func:`permuted_order`)."""
    gen = torch.Generator().manual_seed(12)
    reference = torch.randn(J.shape[1], dtype=J.dtype, generator=gen)
    K = J.shape[0]
    names = NAMES5[:K] if K <= len(NAMES5) else [f"o{i}" for i in range(K)]
    P = torch.eye(K, dtype=J.dtype)[list(perm)]
    a, b = make_a(), make_b()
    ra = a(J, shared=shared, names=names, reference=reference)
    rb = b(J[list(perm)], shared=shared, names=[names[i] for i in perm], reference=reference)
    assert close(rb.update, ra.update, rtol=rtol), repr(a)
    for field in ("C", "alpha", "cosine"):
        got, expected = getattr(rb, field), P @ getattr(ra, field) @ P.T
        assert close(got, expected, rtol=rtol), (repr(a), field)


def assert_nonconflicting(make: Make, J: Tensor, tol: float) -> None:
    """The update conflicts with no objective: ``cos(update, g_i) ≥ −tol`` for every row
    (``tol`` absorbs solver tolerances and regularisation)."""
    agg = make()
    u = call(agg, J).update
    cos = (J @ u) / (J.norm(dim=1) * u.norm()).clamp_min(1e-300)
    assert float(cos.min()) >= -tol, f"{agg!r}: min cos(update, g_i) = {float(cos.min()):.3e}"


def assert_coefficients_from_gramian_alone(
    make: Make, J: Tensor, blocks: Sequence[int], rtol: float = 1e-10
) -> None:
    """``coefficients(G)`` on a Gramian accumulated elsewhere (per parameter block, as a training
    step may do) gives the C that ``__call__`` computes from J, and
    ``AggregationResult.from_gramian`` the same diagnostics."""
    G = sum(b @ b.T for b in J.split(list(blocks), dim=1))
    a, b = make(), make()
    co = a.coefficients(G, names=NAMES5)
    res = call(b, J)
    assert close(co.C, res.C, rtol=rtol), repr(a)
    built = AggregationResult.from_gramian(res.update, G, co, NAMES5)
    assert close(built.cosine, res.cosine, rtol=1e-10), repr(a)


def assert_nonfinite_flagged(make: Make, bad: float) -> None:
    """A NaN/Inf anywhere in J is reported (``nonfinite``), the update is all zeros and C and
    the cosines stay finite: a bad value never reaches the parameters. (That a finite J is not
    flagged is part of :func:`assert_expected_structure`.)"""
    J = torch.randn(5, 30)
    J[2, 7] = bad
    agg = make()
    res = call(agg, J, torch.arange(30) < 10)
    assert bool(res.nonfinite), repr(agg)
    assert torch.equal(res.update, torch.zeros(30)), repr(agg)
    assert torch.isfinite(res.C).all() and torch.isfinite(res.cosine).all(), repr(agg)


def assert_repr_reproduces(make: Make, namespace: dict[str, type]) -> None:
    """``repr()`` is a constructor call that rebuilds the same configuration."""
    agg = make()
    rebuilt = eval(repr(agg), dict(namespace))
    assert repr(rebuilt) == repr(agg)


# -- properties of the state ----------------------------------------------------------------


def _steps(agg: Aggregator, Js: Sequence[Tensor], names: Sequence[str]) -> list[Tensor]:
    out = []
    for J in Js:
        ref = J[:3].sum(0) * 0.8 if agg.needs_reference else None
        out.append(agg(J, names=names, reference=ref).update)
    return out


def assert_reset_restores_first_step(
    make: Make, Js: Sequence[Tensor], names: Sequence[str]
) -> None:
    """After some steps, ``reset()`` makes the next step behave exactly like a first one."""
    agg = make()
    first = _steps(agg, Js[-1:], names)[0]
    _steps(agg, Js[:-1], names)
    agg.reset()
    again = _steps(agg, Js[-1:], names)[0]
    assert torch.equal(first, again), repr(agg)


def assert_state_dict_round_trip(make: Make, Js: Sequence[Tensor], names: Sequence[str]) -> None:
    """``state_dict()`` survives a checkpoint file loaded with ``weights_only=True`` (tensors and
    plain values only: nothing loaded executes code), and a fresh aggregator given it continues
    bit-identically."""
    a = make()
    half = len(Js) // 2
    _steps(a, Js[:half], names)
    b = make()
    b.load_state_dict(roundtrip(a.state_dict()))
    for x, y in zip(_steps(a, Js[half:], names), _steps(b, Js[half:], names), strict=True):
        assert torch.equal(x, y), repr(a)


def assert_nonfinite_step_leaves_state_unchanged(
    make: Make, J: Tensor, names: Sequence[str]
) -> None:
    """A step with a non-finite J is skipped by the state: the steps around it give exactly what
    they give without it."""
    bad = J.clone()
    bad[0, 0] = float("nan")
    a, b = make(), make()
    _steps(a, [J], names)
    _steps(b, [J, bad], names)
    assert torch.equal(_steps(a, [J], names)[0], _steps(b, [J], names)[0]), repr(a)


def assert_device_agnostic_and_sync_free(make: Make, device: str) -> None:
    """Runs on the meta device, where reading a tensor value (``.item()``, ``bool(t)``,
    ``if t:``) raises and tensors of two devices cannot be mixed: so no code path syncs with the
    host or creates its tensors on the CPU. On CUDA the results stay on the device and match
    the CPU."""
    gen = torch.Generator().manual_seed(9)
    J = torch.randn(5, 64, generator=gen)
    shared = torch.arange(64) < 20
    reference = torch.randn(64, generator=gen)
    agg, cpu_agg = make(), make()
    for _ in range(2):  # the second step runs with state
        res = call(agg, J.to(device), shared.to(device), reference=reference.to(device))
        expected = call(cpu_agg, J, shared, reference=reference)
        for name in ("update", "C", "weights", "cosine", "alpha", "n_conflicts", "norms"):
            value = getattr(res, name)
            assert value.device.type == device, (repr(agg), name)
            assert value.shape == getattr(expected, name).shape, (repr(agg), name)
        if device != "meta":
            assert close(res.update.cpu(), expected.update, rtol=1e-4), repr(agg)


def assert_compiles_fullgraph(make: Make) -> None:
    """The whole aggregation (Gramian, K-space, combination, state update) is one graph: no
    graph break means no ``.item()`` and no Python branching on tensor values; two compiled
    calls (the second with state) match eager ones."""
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
    for _ in range(2):
        expected = eager(J, shared=shared, names=NAMES5, reference=reference)
        got = compiled(J, shared, reference)
        assert close(got.update, expected.update, rtol=1e-5), repr(eager)
        assert close(got.C, expected.C, rtol=1e-5), repr(eager)
