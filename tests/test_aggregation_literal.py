"""The K-space aggregators against a literal reference written straight from algorithms.md.

The reference below loops over D-vectors exactly as the specification reads (one dot product
per pair, projections applied to D-vectors, the masked merge with boolean indexing) and builds
J with one backward per objective. The K-space implementations must match it to 1e-5 relative
on random inputs with K up to 16 and random per-parameter-tensor reach masks.
"""

from __future__ import annotations

import pytest
import torch

from segmerge.aggregation import (
    GMD,
    Blending,
    GradCraft,
    Mean,
    PCGrad,
    Sum,
)

# --------------------------------------------------------------------------------------------
# Literal reference (slow on purpose: D-vector loops, Python branching on values)
# --------------------------------------------------------------------------------------------


def literal_masked_merge(P: list[torch.Tensor], shared: torch.Tensor) -> torch.Tensor:
    """merged = (1/K)·Σ p_i on shared entries and Σ p_i on all others."""
    stacked = torch.stack(P)
    merged = torch.zeros_like(P[0])
    merged[shared] = stacked[:, shared].mean(0)
    merged[~shared] = stacked[:, ~shared].sum(0)
    return merged


def literal_projection(J, order, clamp):
    """GMD (clamp=True) / PCGrad (clamp=False) rows, looping over D-vectors."""
    K = J.shape[0]
    rows = [None] * K
    for i in order:
        p = J[i].clone()
        for j in order:
            g_j = J[j]
            d = torch.dot(p, g_j)
            norm_sq = torch.dot(g_j, g_j)
            if d < 0 and norm_sq > 0:
                a = d / norm_sq
                if clamp:
                    a = torch.clamp(a, -2.0, 1.0)
                p = p - a * g_j
        rows[i] = p
    return rows


class LiteralGradCraft:
    """GradCraft as written in the spec, with its norm memory keyed by name."""

    def __init__(self, r, e, b):
        self.r, self.e, self.b = r, e, b
        self.m: dict[str, torch.Tensor] = {}

    def rows(self, J, names):
        K = J.shape[0]
        for i in range(K):
            old = self.m.get(names[i], torch.zeros((), dtype=J.dtype))
            self.m[names[i]] = self.b * old + (1 - self.b) * torch.linalg.vector_norm(J[i])
        m = [self.m[n] for n in names]
        m_max = max(m)
        adjusted = []
        for i in range(K):
            if m[i] > 0:
                adjusted.append(self.r * (m_max / m[i]) * J[i] + (1 - self.r) * J[i])
            else:
                adjusted.append(J[i].clone())
        rows = []
        for i in range(K):
            g_i = adjusted[i]
            conflicting = [j for j in range(K) if torch.dot(g_i, adjusted[j]) < 0]
            if not conflicting:
                rows.append(g_i)
                continue
            Gi = torch.stack([adjusted[j] for j in conflicting])
            target = self.e * torch.linalg.vector_norm(g_i) * torch.linalg.vector_norm(Gi, dim=1)
            w = torch.linalg.pinv(Gi @ Gi.T) @ (-(Gi @ g_i) + target)
            rows.append(g_i + Gi.T @ w)
        return rows


def literal_interval_weights(tb, vb, ta, va, eps=1e-8):
    raw = []
    for k in range(len(tb)):
        d_o = (va[k] - ta[k]) - (vb[k] - tb[k])
        d_g = vb[k] - va[k]
        raw.append(max(d_g, 0.0) / max(d_o**2, eps))
    total = sum(raw)
    return [x / total for x in raw]


def literal_head(name):
    return "fused" if name.startswith("fused.") else name.split("modality.")[-1]


class LiteralGradientBlending:
    def __init__(self):
        self.sigma2: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def weights(self, J, names, reference):
        grad_train = sum(J[i] for i in range(len(names)) if names[i].startswith("fused."))
        raw = []
        for k, name in enumerate(names):
            gap = float(torch.dot(grad_train - reference, J[k]))
            self.count[name] = self.count.get(name, 0) + 1
            old = self.sigma2.get(name, 0.0)
            self.sigma2[name] = old + (gap**2 - old) / self.count[name]
            raw.append(max(float(torch.dot(reference, J[k])), 0.0) / self.sigma2[name])
        total = sum(raw)
        return [x / total for x in raw]


# --------------------------------------------------------------------------------------------
# Inputs: J from one backward per objective of a small multi-head model, reach per tensor
# --------------------------------------------------------------------------------------------


def per_objective_jacobian(losses, params):
    """J (K, D) and the shared mask, with one backward per objective and reach per tensor."""
    rows, reach = [], []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
        )
        reach.append([g is not None for g in grads])
    shared_tensor = [all(r[t] for r in reach) for t in range(len(params))]
    shared = torch.cat(
        [torch.full((p.numel(),), s, dtype=torch.bool) for s, p in zip(shared_tensor, params)]
    )
    return torch.stack(rows), shared


def random_problem(K: int, gen: torch.Generator, dtype=torch.float64):
    """K losses of a random model: parameter tensors each reached by a random subset of the
    objectives (the first tensor by all, so that a shared part exists), losses mixing them."""
    n_tensors = 6
    params = [
        torch.randn(
            int(torch.randint(3, 12, (1,), generator=gen)), dtype=dtype, generator=gen
        ).requires_grad_()
        for _ in range(n_tensors)
    ]
    reach = torch.rand(K, n_tensors, generator=gen) < 0.6
    reach[:, 0] = True
    x = torch.randn(16, dtype=dtype, generator=gen)
    losses = []
    for i in range(K):
        terms = []
        for t, p in enumerate(params):
            if reach[i, t]:
                target = torch.randn(p.shape, dtype=dtype, generator=gen)
                terms.append(((p * x[: p.numel()].sum() * 0.1 - target) ** 2).sum() * (i + 1) / K)
        losses.append(sum(terms))
    return per_objective_jacobian(losses, params)


def assert_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:g} x {scale:.3e}"


CASES = [(K, seed) for K in (1, 2, 3, 5, 8, 16) for seed in range(3)]


@pytest.mark.parametrize("K,seed", CASES)
def test_projection_methods_match_literal(K, seed):
    gen = torch.Generator().manual_seed(seed)
    J, shared = random_problem(K, gen)
    order = torch.randperm(K, generator=gen).tolist()
    gmd = GMD(order=order)(J, shared=shared)
    assert_close(gmd.update, literal_masked_merge(literal_projection(J, order, True), shared))
    assert_close(
        GMD()(J, shared=shared).update,
        literal_masked_merge(literal_projection(J, list(range(K)), True), shared),
    )
    pc = PCGrad(order=order)(J, shared=shared)
    assert_close(pc.update, torch.stack(literal_projection(J, order, False)).sum(0))
    pcm = PCGrad(order=order, masked=True)(J, shared=shared)
    assert_close(pcm.update, literal_masked_merge(literal_projection(J, order, False), shared))
    # The coefficient matrix reproduces the literal rows themselves, not only their merge.
    assert_close(gmd.C @ J, torch.stack(literal_projection(J, order, True)))


@pytest.mark.parametrize("K,seed", CASES)
def test_gradcraft_matches_literal_over_steps(K, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    r = float(torch.rand((), generator=gen))
    e = float(torch.rand((), generator=gen)) * 0.2
    b = float(torch.rand((), generator=gen)) * 0.9
    names = [f"obj{i}" for i in range(K)]
    ours, literal = GradCraft(r=r, e=e, b=b), LiteralGradCraft(r, e, b)
    for step in range(3):
        J, shared = random_problem(K, gen)
        # some steps leave an objective out (an absent modality): K varies, memory is per name
        keep = list(range(K)) if step != 1 or K == 1 else list(range(1, K))
        step_names = [names[i] for i in keep]
        Jk = J[keep]
        res = ours(Jk, shared=shared, names=step_names)
        expected = literal_masked_merge(literal.rows(Jk, step_names), shared)
        assert_close(res.update, expected)
    for n in names:
        assert_close(ours.norm_memory[n], literal.m[n])


@pytest.mark.parametrize("K,seed", [(2, 0), (5, 1), (9, 2)])
def test_sum_mean_match_literal(K, seed):
    gen = torch.Generator().manual_seed(200 + seed)
    J, shared = random_problem(K, gen)
    assert_close(Sum()(J, shared=shared).update, sum(J[i] for i in range(K)))
    assert_close(Mean()(J, shared=shared).update, sum(J[i] for i in range(K)) / K)


def test_blending_gradient_matches_literal():
    gen = torch.Generator().manual_seed(7)
    names = ["fused.d0", "fused.d1", "modality.flair", "modality.t1", "modality.t2"]
    ours, literal = Blending(estimator="gradient"), LiteralGradientBlending()
    for _ in range(4):
        J, shared = random_problem(len(names), gen)
        reference = J[:2].sum(0) + 0.5 * torch.randn(J.shape[1], dtype=J.dtype, generator=gen)
        res = ours(J, shared=shared, names=names, reference=reference)
        w = torch.tensor(literal.weights(J, names, reference), dtype=J.dtype)
        assert_close(res.weights, w)
        assert_close(res.update, w @ J)


def test_blending_interval_heads_match_literal():
    names = ["fused.d0", "fused.d1", "fused.d2", "modality.flair", "modality.t1"]
    heads = ["fused", "flair", "t1", "t2"]
    before = ([1.0, 1.0, 1.0, 1.0], [1.1, 1.05, 1.2, 1.3])
    after = ([0.6, 0.8, 0.5, 0.7], [0.9, 0.9, 1.1, 1.2])
    agg = Blending()
    agg.observe_validation(dict(zip(heads, before[0])), dict(zip(heads, before[1])))
    agg.observe_validation(dict(zip(heads, after[0])), dict(zip(heads, after[1])))
    head_w = dict(zip(heads, literal_interval_weights(*before, *after)))
    # t2 is absent from this step: present heads renormalised, fused split over its 3 rows
    present = {literal_head(n) for n in names}
    total = sum(head_w[h] for h in present)
    counts = {h: sum(literal_head(n) == h for n in names) for h in present}
    expected = torch.tensor(
        [head_w[literal_head(n)] / counts[literal_head(n)] / total for n in names],
        dtype=torch.float64,
    )
    J = torch.randn(len(names), 20, dtype=torch.float64)
    res = agg(J, names=names)
    assert_close(res.weights, expected)
    assert_close(res.update, expected @ J)


@pytest.mark.parametrize("method", ["gmd", "gradcraft", "pcgrad"])
def test_float32_close_to_float64_literal(method):
    gen = torch.Generator().manual_seed(11)
    J, shared = random_problem(8, gen)
    order = list(range(8))
    if method == "gradcraft":
        expected = literal_masked_merge(
            LiteralGradCraft(0.5, 0.05, 0.0).rows(J, [str(i) for i in range(8)]), shared
        )
        agg = GradCraft(r=0.5, e=0.05)
    else:
        rows = literal_projection(J, order, clamp=method == "gmd")
        expected = (
            literal_masked_merge(rows, shared) if method == "gmd" else torch.stack(rows).sum(0)
        )
        agg = GMD() if method == "gmd" else PCGrad(order=order)
    out = agg(J.float(), shared=shared).update
    assert out.dtype == torch.float32
    assert_close(out.double(), expected, rtol=1e-4)
