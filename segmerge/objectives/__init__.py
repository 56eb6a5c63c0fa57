"""segmerge.objectives: named loss rows (``fused.d*``, ``modality.*``) from named head logits."""

from segmerge.objectives.losses import RESIZE_MODES, RegionLoss, resize_target
from segmerge.objectives.names import FUSED, MODALITY, head_of, objective_names, parse_name
from segmerge.objectives.objective_set import (
    DEPTH_WEIGHTINGS,
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
    "head_losses",
    "head_of",
    "objective_names",
    "parse_name",
    "resize_target",
]
