"""segmerge.aggregation: merge the gradients of many objectives into one update.

Pure maths on the Jacobian ``J`` (K, D) — one row per objective — and its Gramian: every
method computes a K×K coefficient matrix ``C`` from ``G = J Jᵀ`` and the update is one
combination ``merge_scale ⊙ (Jᵀ C.sum(0))``. Methods (exact maths in ``docs/algorithms.md``):
``gmd``, ``gradcraft``, ``blending`` and the baselines ``sum``, ``mean``, ``pcgrad``.

Functional API (a fresh aggregator per call)::

    from segmerge.aggregation import aggregate
    g = aggregate("gmd", J, shared=mask)

Stateful API (what the training step uses)::

    agg = build_aggregator("gradcraft", r=0.5, e=0.0, b=0.9)
    result = agg(J, shared=mask, names=names)   # AggregationResult
    result.update, result.C, result.alpha, result.n_conflicts
"""

from ._blending import (
    Blending,
    OGRTracker,
    blending_gradient_products,
    gradient_blending_weights,
    head_of,
    interval_blending_weights,
)
from ._core import (
    GRAM_BLOCK,
    AggregationResult,
    Aggregator,
    Coefficients,
    blocked_products,
    combine,
    gramian,
    merge_scale,
)
from ._gmd import GMD, gmd_coefficients
from ._gradcraft import GradCraft, gradcraft_coefficients, magnitude_scales
from ._mean import Mean, mean_coefficients
from ._pcgrad import PCGrad, pcgrad_coefficients
from ._projection import projection_coefficients
from ._registry import AGGREGATORS, aggregate, build_aggregator
from ._sum import Sum, sum_coefficients

__all__ = [
    "AGGREGATORS",
    "GRAM_BLOCK",
    "AggregationResult",
    "Aggregator",
    "Blending",
    "Coefficients",
    "GMD",
    "GradCraft",
    "Mean",
    "OGRTracker",
    "PCGrad",
    "Sum",
    "aggregate",
    "blending_gradient_products",
    "blocked_products",
    "build_aggregator",
    "combine",
    "gmd_coefficients",
    "gradcraft_coefficients",
    "gradient_blending_weights",
    "gramian",
    "head_of",
    "interval_blending_weights",
    "magnitude_scales",
    "mean_coefficients",
    "merge_scale",
    "pcgrad_coefficients",
    "projection_coefficients",
    "sum_coefficients",
]
