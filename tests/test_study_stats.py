"""segmerge.study.stats on constructed inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segmerge.study.stats import (
    compare_with_reference,
    holm,
    paired_comparison,
    seed_interval,
    verdict,
)


def test_holm_matches_the_hand_computed_step_down_values():
    # sorted: a 0.01 (x3 = 0.03), c 0.03 (x2 = 0.06), b 0.04 (x1 = 0.04 -> monotone 0.06)
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx(
        {"a": 0.03, "b": 0.06, "c": 0.06}
    )
    # capped at 1; a NaN neither counts in m nor gets a value
    adj = holm({"a": 0.5, "b": 0.2, "x": math.nan})
    assert adj["a"] == pytest.approx(0.5) and adj["b"] == pytest.approx(0.4)
    assert math.isnan(adj["x"])
    assert holm({"a": 0.7, "b": 0.6}) == pytest.approx({"a": 1.0, "b": 1.0})
    assert holm({}) == {}


def test_wilcoxon_p_value_is_the_exact_one_on_a_tiny_sample():
    # n = 5 differences all positive: W- = 0 is the most extreme of 2^5 sign patterns,
    # two-sided p = 2 / 32; n = 6: 2 / 64.
    base = np.zeros(5)
    assert paired_comparison(base + [1, 2, 3, 4, 5], base).p_value == pytest.approx(2 / 32)
    assert paired_comparison(np.arange(1.0, 7.0), np.zeros(6)).p_value == pytest.approx(2 / 64)
    # ranks 1..4 with signs + + - +: W- = 3; patterns with W- <= 3 are {}, {1}, {2}, {3}, {1,2}
    # -> 5 of 16, two-sided 10 / 16
    c = paired_comparison([1.0, 2.0, -3.0, 4.0], [0.0] * 4)
    assert c.p_value == pytest.approx(10 / 16)


def test_bootstrap_interval_contains_a_known_shift_and_not_zero():
    rng = np.random.default_rng(1)
    reference = rng.uniform(0.3, 0.7, size=40)
    method = reference + 0.1 + rng.normal(0.0, 0.02, size=40)
    c = paired_comparison(method, reference)
    assert c.ci_low < 0.1 < c.ci_high and c.ci_low > 0.0
    assert c.difference == pytest.approx(float(np.mean(method - reference)))
    assert c.p_value < 1e-6 and c.verdict == "better" and c.n_pairs == 40
    again = paired_comparison(method, reference)
    assert (again.ci_low, again.ci_high) == (c.ci_low, c.ci_high)  # fixed bootstrap generator
    worse = paired_comparison(reference, method)
    assert worse.verdict == "worse" and worse.ci_high < 0.0


def test_degenerate_differences():
    same = paired_comparison([0.4, 0.5, 0.6], [0.4, 0.5, 0.6])
    assert (same.difference, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert same.verdict == "indistinguishable"
    shift = paired_comparison([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])  # every difference 0.1
    assert shift.ci_low == pytest.approx(0.1) and shift.ci_high == pytest.approx(0.1)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="at least one pair"):
        paired_comparison([], [])
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([math.nan], [0.1])


def test_seed_interval_is_the_student_t_interval():
    # values 1, 2, 3: mean 2, sd 1, sem 1/sqrt(3), t(0.975, 2) = 4.302653
    s = seed_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert (s.mean, s.n) == (2.0, 3)
    assert (s.ci_low, s.ci_high) == pytest.approx((2 - half, 2 + half))
    one = seed_interval([0.5, math.nan])
    assert one.mean == 0.5 and one.n == 1 and math.isnan(one.ci_low)
    assert seed_interval([0.3, 0.3]).ci_high == 0.3
    assert seed_interval([]).n == 0


def test_compare_with_reference_adjusts_over_methods_and_gives_verdicts():
    ref = np.linspace(0.2, 0.8, 6)
    out = compare_with_reference(
        {
            "up": (ref + np.arange(1, 7) * 0.01, ref),  # all positive: raw p = 2/64
            "down": (ref - np.arange(1, 7) * 0.01, ref),  # all negative: raw p = 2/64
            "flat": (ref, ref),  # p = 1
        }
    )
    assert out["up"].p_value == pytest.approx(2 / 64)
    # Holm over 3: 2/64 * 3 = 0.09375 for the first, max(0.09375, 2 * 2/64) for the second
    assert out["up"].p_adjusted == pytest.approx(3 * 2 / 64)
    assert out["down"].p_adjusted == pytest.approx(3 * 2 / 64)
    assert out["flat"].p_adjusted == 1.0
    # raw p < 0.05 but adjusted > 0.05: not a verdict of difference
    assert {k: c.verdict for k, c in out.items()} == dict.fromkeys(out, "indistinguishable")
    assert verdict(0.02, 0.01) == "better" and verdict(-0.02, 0.01) == "worse"
    assert verdict(0.02, math.nan) == "indistinguishable"
