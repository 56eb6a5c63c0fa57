"""Statistics of a multi-seed study: intervals over seeds and paired comparisons with a reference.

Pure functions of plain numbers (no I/O, no training), so they are tested on constructed inputs
with known answers (``tests/test_study_stats.py``).

- :func:`seed_interval`: mean and 95% Student-t interval of one method's per-seed scores.
- :func:`paired_comparison`: the paired differences method - reference, one per (validation case
  x seed); their mean, a 95% percentile-bootstrap interval of the mean (``scipy.stats.bootstrap``)
  and a two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``).
- :func:`holm`: Holm's step-down adjustment of the p-values of several methods (scipy has only
  Benjamini-Hochberg, ``scipy.stats.false_discovery_control``, and statsmodels is not a
  dependency, so these few lines are written here).
- :func:`verdict`: ``better`` / ``worse`` / ``indistinguishable`` at level ``alpha`` from the
  adjusted p-value and the sign of the mean difference.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "ALPHA",
    "SeedInterval",
    "PairedComparison",
    "seed_interval",
    "paired_comparison",
    "holm",
    "verdict",
    "compare_with_reference",
]

ALPHA = 0.05
"""Significance level of the verdicts (family-wise, after Holm's adjustment)."""

BETTER, WORSE, SAME = "better", "worse", "indistinguishable"


@dataclass(frozen=True)
class SeedInterval:
    """Mean of per-seed scores and its 95% Student-t interval (NaN bounds with < 2 seeds)."""

    mean: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """Method minus reference over paired (case x seed) scores.

    Attributes:
        difference: mean of the paired differences.
        ci_low, ci_high: 95% percentile-bootstrap interval of that mean.
        p_value: two-sided Wilcoxon signed-rank p-value (1.0 when every difference is 0).
        p_adjusted: Holm-adjusted p-value over the methods compared (set by
            :func:`compare_with_reference`; equals ``p_value`` for a lone comparison).
        verdict: ``better``, ``worse`` or ``indistinguishable`` at :data:`ALPHA`.
        n_pairs: number of pairs.
    """

    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    p_adjusted: float
    verdict: str
    n_pairs: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return asdict(self)


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> SeedInterval:
    """Mean and Student-t interval of ``values`` (one score per seed; NaNs are left out).

    Raises:
        ValueError: ``confidence`` outside (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    n = int(x.size)
    if n == 0:
        return SeedInterval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return SeedInterval(mean, math.nan, math.nan, n)
    sem = float(x.std(ddof=1) / math.sqrt(n))
    if sem == 0.0:
        return SeedInterval(mean, mean, mean, n)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return SeedInterval(mean, float(low), float(high), n)


def paired_comparison(
    method: Sequence[float],
    reference: Sequence[float],
    n_resamples: int = 9999,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedComparison:
    """Compare paired scores (same case and seed at the same index); higher is better.

    The bootstrap resamples pairs with a fixed generator (``seed``), so the interval is
    reproducible. When every difference is the same value ``d`` the interval is ``[d, d]``
    (scipy's bootstrap is undefined on a degenerate sample), and when every difference is zero the
    p-value is 1 (no evidence of a difference).

    Raises:
        ValueError: different lengths, no pair, or a non-finite score.
    """
    a = np.asarray(method, dtype=float)
    b = np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need equal lengths, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired comparison needs at least one pair")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired comparison: every score must be finite")
    d = a - b
    mean = float(d.mean())
    n = int(d.size)
    if np.all(d == d[0]):
        low = high = mean
    else:
        res = stats.bootstrap(
            (d,),
            np.mean,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if np.all(d == 0):
        p = 1.0
    else:
        with warnings.catch_warnings():  # scipy warns that n is small for the normal approx.
            warnings.simplefilter("ignore")
            p = float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    return PairedComparison(mean, low, high, p, p, verdict(mean, p), n)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values; NaN entries stay NaN and do not count in ``m``.

    With the ``m`` finite p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted value
    of the i-th is ``max_{j <= i} min(1, (m - j + 1) * p_(j))``.
    """
    finite = sorted(((p, k) for k, p in p_values.items() if math.isfinite(p)), key=lambda t: t[0])
    m = len(finite)
    out = {k: math.nan for k in p_values}
    running = 0.0
    for i, (p, key) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))
        out[key] = running
    return out


def verdict(difference: float, p_adjusted: float, alpha: float = ALPHA) -> str:
    """``better`` / ``worse`` than the reference when ``p_adjusted < alpha``, by the sign of the
    mean difference; otherwise ``indistinguishable``."""
    if math.isfinite(p_adjusted) and p_adjusted < alpha and difference != 0:
        return BETTER if difference > 0 else WORSE
    return SAME


def compare_with_reference(
    paired: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    alpha: float = ALPHA,
    n_resamples: int = 9999,
    seed: int = 0,
) -> dict[str, PairedComparison]:
    """Paired comparison of every method with the reference, Holm-adjusted over the methods.

    Args:
        paired: method -> (its scores, the reference's scores on the same case x seed pairs).
        alpha: level of the verdicts.
        n_resamples: bootstrap resamples.
        seed: bootstrap generator seed.
    """
    raw = {
        k: paired_comparison(m, r, n_resamples=n_resamples, seed=seed)
        for k, (m, r) in paired.items()
    }
    adjusted = holm({k: c.p_value for k, c in raw.items()})
    return {
        k: PairedComparison(
            c.difference,
            c.ci_low,
            c.ci_high,
            c.p_value,
            adjusted[k],
            verdict(c.difference, adjusted[k], alpha),
            c.n_pairs,
        )
        for k, c in raw.items()
    }
