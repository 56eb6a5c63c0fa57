"""segmerge.aggregation: merge the gradients of many objectives into one update.

Pure maths on the Jacobian ``J`` (K, D) — one row per objective — and its Gramian: every
method computes a K×K coefficient matrix ``C`` from ``G = J Jᵀ`` and the update is one
combination ``merge_scale ⊙ (Jᵀ C.sum(0))``. Methods (exact maths in ``docs/algorithms.md``):
``gmd``, ``gradcraft``, ``blending`` and the baselines ``sum``, ``mean``, ``pcgrad``.

Functional API (a fresh aggregator per call)::

    from segmerge.aggregation import aggregate
    g = aggregate("gmd", J, shared=mask)

Every aggregator is an :class:`Aggregator` (the typed contract the training step uses:
``coefficients(G)`` for the K-space step, ``merge_``/``merge_scale`` for the one masked merge);
aggregators that learn from validations are also :class:`ObservesValidation`.

Stateful API (what the training step uses)::

    agg = build_aggregator("gradcraft", r=0.5, e=0.0, b=0.9)
    result = agg(J, shared=mask, names=names)   # AggregationResult
    result.update, result.C, result.alpha, result.n_conflicts
"""

from ._blending import (
    Blending,
    GradientBlending,
    IntervalBlending,
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
    ObservesValidation,
    blocked_products,
    combine,
    gramian,
    merge_scale,
)
from ._gmd import GMD, gmd_coefficients
from ._gradcraft import GradCraft, gradcraft_coefficients, magnitude_scales
from ._mean import Mean, mean_coefficients
from ._pcgrad import PCGrad, pcgrad_coefficients
from ._projection import projection_coefficients, seeded_permutation
from ._registry import (
    AGGREGATORS,
    aggregate,
    aggregator_config,
    aggregator_usage,
    build_aggregator,
    check_method,
    hyperparameters,
    register_aggregator,
)
from ._sum import Sum, sum_coefficients
from ._torchjd import (
    IMTLG,
    MGDA,
    PCD,
    AlignedMTL,
    CAGrad,
    DualProj,
    FairGrad,
    GradVac,
    NashMTL,
    TorchJDAggregator,
    UPGrad,
)

__all__ = [
    "AGGREGATORS",
    "GRAM_BLOCK",
    "AggregationResult",
    "Aggregator",
    "Blending",
    "Coefficients",
    "GMD",
    "GradCraft",
    "GradientBlending",
    "IntervalBlending",
    "Mean",
    "ObservesValidation",
    "OGRTracker",
    "PCGrad",
    "Sum",
    # torchjd's weightings, bridged (_torchjd.py)
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "FairGrad",
    "GradVac",
    "IMTLG",
    "MGDA",
    "NashMTL",
    "PCD",
    "TorchJDAggregator",
    "UPGrad",
    "aggregate",
    "aggregator_config",
    "aggregator_usage",
    "blending_gradient_products",
    "blocked_products",
    "build_aggregator",
    "check_method",
    "combine",
    "gmd_coefficients",
    "gradcraft_coefficients",
    "gradient_blending_weights",
    "gramian",
    "head_of",
    "hyperparameters",
    "interval_blending_weights",
    "magnitude_scales",
    "mean_coefficients",
    "merge_scale",
    "pcgrad_coefficients",
    "projection_coefficients",
    "register_aggregator",
    "seeded_permutation",
    "sum_coefficients",
]
