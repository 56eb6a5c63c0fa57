"""Per-sample region loss (sigmoid Dice + BCE) and deep-supervision target resizing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from segmerge.objectives.names import suggest

__all__ = ["RESIZE_MODES", "RegionLoss", "resize_target"]

RESIZE_MODES = ("nearest", "max", "area")


def resize_target(target: torch.Tensor, size: Sequence[int], mode: str = "nearest") -> torch.Tensor:
    """Downsample region masks ``(B, C, H, W, D)`` to a head's spatial ``size``.

    Args:
        target: float region masks (0/1) at full resolution.
        size: spatial size of the head's logits; each dimension at most the target's.
        mode: ``"nearest"`` (nnU-Net's choice: pick one voxel per block, masks stay binary),
            ``"max"`` (a coarse voxel is on if any fine voxel is: keeps small ET islands,
            dilates), or ``"area"`` (fraction of the block that is on: soft targets).

    Returns:
        The target at ``size`` (the input itself when the size already matches).
    """
    size = tuple(int(s) for s in size)
    if tuple(target.shape[2:]) == size:
        return target
    if any(s > t for s, t in zip(size, target.shape[2:])):
        raise ValueError(
            f"head size {size} is larger than the target's {tuple(target.shape[2:])}; "
            "targets are only downsampled"
        )
    if mode == "nearest":
        # nearest-exact samples the block centre ((i + 0.5) * scale) rather than its corner.
        return F.interpolate(target, size=size, mode="nearest-exact")
    if mode == "max":
        return F.adaptive_max_pool3d(target, size)
    if mode == "area":
        return F.adaptive_avg_pool3d(target, size)
    raise ValueError(
        f"target resize mode must be one of {RESIZE_MODES}, got {mode!r}"
        + suggest(mode, RESIZE_MODES)
    )


class RegionLoss(nn.Module):
    """Per-sample ``dice_weight * Dice + bce_weight * BCE`` of independent sigmoid region channels.

    ``Dice`` is MONAI's ``DiceLoss(sigmoid=True)`` per sample and channel (``batch=False``:
    1 - (2 sum(p t) + s) / (sum p + sum t + s), s = 1e-5), averaged over channels; ``BCE`` is
    ``binary_cross_entropy_with_logits`` averaged over channels and voxels. MONAI's
    ``DiceCELoss`` is not used: with more than one channel it applies softmax cross-entropy,
    wrong for overlapping regions (WT contains TC contains ET).

    Computed in float32 whatever the logits' dtype (AMP-safe: Dice sums and the log of the
    sigmoid lose too much in half precision).

    Args:
        dice_weight: weight of the Dice term. Default 1.
        bce_weight: weight of the BCE term. Default 1.
        smooth: Dice smoothing added to numerator and denominator. Default 1e-5 (MONAI's).
    """

    def __init__(
        self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1e-5
    ) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight <= 0:
            raise ValueError(
                f"dice_weight and bce_weight must be >= 0 and not both 0, got {dice_weight!r}, {bce_weight!r}"
            )
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.dice = DiceLoss(
            sigmoid=True, reduction="none", batch=False, smooth_nr=smooth, smooth_dr=smooth
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the ``(B,)`` per-sample loss of ``logits`` against same-shape float ``target``."""
        logits = logits.float()
        target = target.float()
        loss = logits.new_zeros(logits.shape[0])
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target).flatten(1).mean(1)
        if self.bce_weight:
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            loss = loss + self.bce_weight * bce.flatten(1).mean(1)
        return loss
