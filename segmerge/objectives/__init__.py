"""segmerge.objectives: named loss rows (``fused.d*``, ``modality.*``, ``subset.*``) from named
head logits; the name grammar lives in :mod:`segmerge.objectives.names`."""

from segmerge.objectives.losses import RESIZE_MODES, RegionLoss, resize_target
from segmerge.objectives.names import (
    FUSED,
    MODALITY,
    SUBSET,
    format_objective,
    head_of,
    metric_key,
    modality_subsets,
    objective_names,
    parse_name,
    parse_objective,
    subset_names,
)
from segmerge.objectives.objective_set import (
    DEPTH_WEIGHTINGS,
    SUBSET_CHOICES,
    NamedLosses,
    ObjectiveSet,
    head_losses,
)

__all__ = [
    "DEPTH_WEIGHTINGS",
    "FUSED",
    "MODALITY",
    "NamedLosses",
    "ObjectiveSet",
    "RESIZE_MODES",
    "RegionLoss",
    "SUBSET",
    "SUBSET_CHOICES",
    "format_objective",
    "head_losses",
    "head_of",
    "metric_key",
    "modality_subsets",
    "objective_names",
    "parse_name",
    "parse_objective",
    "resize_target",
    "subset_names",
]
