"""``aggregate(...)`` inside a user's compiled step: one graph (``fullgraph=True``) for every
segmerge method and projection order, in float32 and float64, with the eager result."""

from __future__ import annotations

import pytest
import torch

from segmerge.aggregation import AGGREGATORS, TorchJDAggregator, aggregate

CASES = [
    ("sum", {}),
    ("mean", {}),
    ("gmd", {}),
    ("gmd", {"order": "random", "seed": 3}),
    ("gmd", {"order": [2, 0, 1]}),
    ("pcgrad", {}),  # random order by default
    ("pcgrad", {"order": "identity", "masked": True}),
    ("pcgrad", {"order": [1, 2, 0]}),
    ("gradcraft", {"r": 0.5, "e": 0.1}),
    ("blending", {}),
    ("blending", {"estimator": "gradient"}),
]


@pytest.mark.slow  # dynamo traces each case afresh (about 1 s each)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method,hparams", CASES, ids=[f"{m}{h}" for m, h in CASES])
def test_aggregate_compiles_fullgraph(method, hparams, dtype):
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(3, 16, dtype=dtype, generator=gen)
    J[1] = -0.7 * J[0] + 0.1 * J[1]  # a conflict, so the projections act
    shared = torch.arange(16) < 10
    reference = torch.randn(16, dtype=dtype, generator=gen)
    names = ["fused.d0", "fused.d1", "modality.t1"]

    def step(J, shared, reference):
        return aggregate(method, J, shared=shared, names=names, reference=reference, **hparams)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled(J, shared, reference)  # raises on any graph break
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got, step(J, shared, reference))


def test_every_native_method_is_compiled_above():
    """A new registered method joins CASES. Exempt: the torchjd bridge (issue 13), whose
    weightings run torchjd's host-side QP solvers (quadprog / cvxpy) and cannot be traced."""
    bridged = {n for n, cls in AGGREGATORS.items() if issubclass(cls, TorchJDAggregator)}
    assert bridged >= {"upgrad", "mgda"}
    assert set(AGGREGATORS) - bridged == {m for m, _ in CASES}
