"""Aggregator state: reset, checkpoint round trip and non-finite steps for every registered method
(the state properties of tests/aggregation_properties.py), then the method-specific state: seeded
order, GradCraft's per-name memory, the Blending schedule and OGR."""

from __future__ import annotations

import pytest
import torch
from aggregation_properties import (
    assert_nonfinite_step_leaves_state_unchanged,
    assert_reset_restores_first_step,
    assert_state_dict_round_trip,
    factory,
    registered_cases,
    roundtrip,
)

from segmerge.aggregation import (
    GMD,
    Blending,
    GradCraft,
    OGRTracker,
    PCGrad,
    build_aggregator,
    head_of,
)

NAMES = ["fused.d0", "fused.d1", "fused.d2", "modality.flair", "modality.t1", "modality.t2"]
HEADS = ["fused", "flair", "t1", "t2"]


def jacobians(n, K=6, D=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(K, D, dtype=torch.float64, generator=gen) * (1 + k) for k in range(n)]


def observe(agg, train, val):
    return agg.observe_validation(dict(zip(HEADS, train)), dict(zip(HEADS, val)))


# Every registered method gets the state properties (for a stateless one they check that
# reset and the empty state dict change nothing); these configurations exercise the state:
STATE_VARIANTS: dict[str, list[dict]] = {
    "gradcraft": [dict(r=0.7, e=0.05, b=0.8)],  # the norm memory
    "pcgrad": [dict(seed=3)],  # the random order's draws
    "gmd": [dict(order="random", seed=4)],
    "blending": [dict(estimator="gradient")],  # the running σ²
    "nashmtl": [dict(update_weights_every=2)],  # the step counter and the reused weights
    "gradvac": [dict(seed=3, beta=0.9)],  # the EMA targets and the visiting order
    "pcd": [dict(beta=0.5)],  # the moving average of the squared norms
}
STATE_CASES = registered_cases(STATE_VARIANTS)


@pytest.mark.parametrize("name,hp", STATE_CASES)
def test_reset_restores_first_step_behaviour(name, hp):
    assert_reset_restores_first_step(factory(name, hp), jacobians(3), NAMES)


@pytest.mark.parametrize("name,hp", STATE_CASES)
def test_state_dict_round_trip_continues_exactly(name, hp):
    assert_state_dict_round_trip(factory(name, hp), jacobians(5, seed=1), NAMES)


# A random projection order is drawn per step, finite or not (a skipped step consumes its draw,
# identically on every rank): the other state must not see a non-finite step.
RANDOM_ORDER = [c for c in STATE_CASES if "order='random'" in repr(factory(*c.values)())]


@pytest.mark.parametrize("name,hp", [c for c in STATE_CASES if c not in RANDOM_ORDER])
def test_nonfinite_step_leaves_state_unchanged(name, hp):
    assert_nonfinite_step_leaves_state_unchanged(factory(name, hp), jacobians(1, seed=2)[0], NAMES)


def test_gradcraft_memory_is_per_name_and_survives_absent_objectives():
    agg = GradCraft(r=1.0, b=0.5)
    J = torch.tensor([[3.0, 0.0], [0.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    agg(J, names=["a", "b", "c"])
    agg(J[[0, 2]], names=["a", "c"])  # "b" absent this step
    mem = {k: float(v) for k, v in agg.norm_memory.items()}
    assert mem == pytest.approx({"a": 0.5 * 1.5 + 0.5 * 3.0, "b": 2.0, "c": 0.5 * 0.5 + 0.5 * 1.0})
    assert "m" in agg.state_dict()


def test_seeded_random_order_is_reproducible_across_instances():
    # two "ranks" with the same seed draw the same orders; another seed draws others
    a, b, c = PCGrad(seed=7), PCGrad(seed=7), PCGrad(seed=8)
    orders_a = [a.draw_order(8) for _ in range(5)]
    assert orders_a == [b.draw_order(8) for _ in range(5)]
    assert orders_a != [c.draw_order(8) for _ in range(5)]
    assert all(sorted(o) == list(range(8)) for o in orders_a)
    assert GMD().draw_order(4) == [0, 1, 2, 3]


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(ValueError, match=r"GradCraft.load_state_dict: expected keys \['m'\]"):
        GradCraft().load_state_dict({"generator": torch.zeros(3)})


# -- Gradient-Blending, interval estimator ----------------------------------------------------

BEFORE = ([1.0, 1.0, 1.0, 1.0], [1.1, 1.05, 1.2, 1.3])
AFTER = ([0.6, 0.8, 0.5, 0.7], [0.9, 0.9, 1.1, 1.2])


def test_head_of_names():
    assert [head_of(n) for n in NAMES] == ["fused"] * 3 + ["flair", "t1", "t2"]


def test_blending_uniform_per_head_until_first_estimate():
    agg = Blending()
    w = agg(torch.eye(6, dtype=torch.float64), names=NAMES).weights
    expected = torch.tensor([1 / 12] * 3 + [1 / 4] * 3, dtype=torch.float64)
    assert torch.allclose(w, expected)
    assert torch.allclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_blending_warmup_and_super_epoch():
    agg = Blending(warmup=2, super_epoch=2)
    J = torch.eye(6, dtype=torch.float64)
    uniform = agg(J, names=NAMES).weights
    observe(agg, *BEFORE)  # 1: warm-up
    observe(agg, *BEFORE)  # 2: warm-up, anchor
    observe(agg, *AFTER)  # 3: only one observation after the anchor
    assert torch.equal(agg(J, names=NAMES).weights, uniform) and agg.ogr_history == []
    observe(agg, *AFTER)  # 4: anchor(2) -> 4 : estimate
    assert len(agg.ogr_history) == 1
    assert agg.ogr_history[0] == pytest.approx({"fused": 1.0, "flair": 1 / 3, "t1": 4.0, "t2": 2.0})
    assert not torch.equal(agg(J, names=NAMES).weights, uniform)


def test_blending_keeps_previous_weights_when_nothing_generalises():
    agg = Blending()
    observe(agg, *BEFORE)
    estimated = observe(agg, *AFTER)
    assert sum(estimated.values()) == pytest.approx(1.0)
    worse = ([0.5, 0.7, 0.4, 0.6], [1.0, 1.0, 1.2, 1.3])  # every validation loss went up
    assert observe(agg, *worse) == estimated
    assert len(agg.ogr_history) == 2


def test_blending_absent_rows_renormalise():
    agg = Blending()
    observe(agg, *BEFORE)
    observe(agg, *AFTER)
    w_all = agg(torch.eye(6, dtype=torch.float64), names=NAMES).weights
    present = [0, 3, 4]  # fused.d0, flair, t1 (t2 and two fused depths absent)
    w_some = agg(torch.eye(3, dtype=torch.float64), names=[NAMES[i] for i in present]).weights
    hw = agg.head_weights
    total = hw["fused"] + hw["flair"] + hw["t1"]
    expected = torch.tensor([hw["fused"], hw["flair"], hw["t1"]], dtype=torch.float64) / total
    assert torch.allclose(w_some, expected)
    assert torch.allclose(w_all[:3], torch.full((3,), hw["fused"] / 3, dtype=torch.float64))


def test_blending_interval_state_round_trip():
    a = Blending(warmup=1, super_epoch=1)
    observe(a, *BEFORE)
    observe(a, *AFTER)
    b = Blending(warmup=1, super_epoch=1)
    b.load_state_dict(roundtrip(a.state_dict()))
    nxt = ([0.5, 0.7, 0.45, 0.6], [0.85, 0.88, 1.0, 1.1])
    assert observe(a, *nxt) == observe(b, *nxt)
    assert a.ogr_history == b.ogr_history
    J = torch.randn(6, 10, dtype=torch.float64)
    assert torch.equal(a(J, names=NAMES).update, b(J, names=NAMES).update)
    a.reset()
    assert a.head_weights == {} and a.ogr_history == []


def test_ogr_tracker():
    tracker = OGRTracker()
    assert tracker.observe(dict(zip(HEADS, BEFORE[0])), dict(zip(HEADS, BEFORE[1]))) == {}
    ogr = tracker.observe(dict(zip(HEADS, AFTER[0])), dict(zip(HEADS, AFTER[1])))
    assert ogr == pytest.approx({"fused": 1.0, "flair": 1 / 3, "t1": 4.0, "t2": 2.0})
    copy = OGRTracker()
    copy.load_state_dict(roundtrip(tracker.state_dict()))
    nxt = ({"fused": 0.5}, {"fused": 0.85})
    assert copy.observe(*nxt) == tracker.observe(*nxt)
    tracker.reset()
    assert tracker.observe(*nxt) == {} and tracker.history == []
    # ΔG = 0: the OGR is infinite (or 0 when nothing changed), never NaN
    flat = OGRTracker()
    flat.observe({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})
    assert flat.observe({"a": 0.5, "b": 1.0}, {"a": 1.0, "b": 1.0}) == {"a": float("inf"), "b": 0.0}


def test_functional_aggregate_is_stateless():
    J = torch.randn(3, 8, dtype=torch.float64)
    from segmerge.aggregation import aggregate

    a = aggregate("gradcraft", J, r=0.5, b=0.9)
    assert torch.equal(a, aggregate("gradcraft", J, r=0.5, b=0.9))
    assert torch.equal(aggregate("pcgrad", J), aggregate("pcgrad", J))  # same seed, fresh state
    assert isinstance(build_aggregator("blending", estimator="gradient"), Blending)
