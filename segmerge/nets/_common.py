"""Input checks and the availability mask shared by the segmerge networks.

Every check here reads shapes and dtypes only (Python ints), never tensor values, so the
forward passes stay free of device syncs and trace cleanly.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch

NORM_NAMES = ("instance", "batch", "group", "layer", "instance_nvfuser", "syncbatch")
"""Normalisation names accepted by MONAI's ``get_norm_layer`` that make sense here."""


def suggest(name: str, valid: Sequence[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest valid name, or an empty string."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_norm(norm: str | tuple) -> str | tuple:
    """Validate a MONAI normalisation spec (``"instance"`` or ``("group", {"num_groups": 4})``).

    Args:
        norm: a name or a ``(name, kwargs)`` tuple as MONAI's ``get_norm_layer`` takes it.

    Returns:
        ``norm`` unchanged.
    """
    name = norm[0] if isinstance(norm, tuple) else norm
    if not isinstance(name, str) or name.lower() not in NORM_NAMES:
        raise ValueError(
            f"norm must be one of {NORM_NAMES} (or a (name, kwargs) tuple), got {norm!r}"
            + suggest(str(name).lower(), NORM_NAMES)
        )
    return norm


def check_features(features: Sequence[int], what: str = "features") -> tuple[int, ...]:
    """Validate a sequence of channel widths, one per resolution level (at least 2 levels)."""
    feats = tuple(int(f) for f in features)
    if len(feats) < 2 or any(f < 1 for f in feats):
        raise ValueError(
            f"{what} must list at least 2 positive widths (one per resolution level), got {features!r}"
        )
    return feats


def check_input(x: torch.Tensor, in_channels: int, divisor: int, names: Sequence[str]) -> None:
    """Raise a clear error if ``x`` is not ``(B, in_channels, H, W, D)`` with H, W, D divisible.

    Args:
        x: network input.
        in_channels: expected channel count (one per modality).
        divisor: every spatial size must be a multiple of this (``2 ** n_downsamplings``).
        names: modality names in channel order, quoted in the error.
    """
    if x.dim() != 5:
        raise ValueError(f"input must be (B, C, H, W, D), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"input has {x.shape[1]} channels but the network expects {in_channels} "
            f"(one per modality, in order {tuple(names)})"
        )
    for size in x.shape[2:]:
        if size % divisor != 0:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {divisor} "
                f"(2^depth for {divisor.bit_length() - 1} downsamplings); pad or crop the patch"
            )
