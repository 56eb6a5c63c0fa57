"""Objective (row) names: ``fused.d<depth>`` and ``modality.<name>``.

These names flow unchanged into losses, coefficient matrices, metric keys and plots.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from segmerge.conventions import MODALITIES

__all__ = ["FUSED", "MODALITY", "head_of", "objective_names", "parse_name", "suggest"]

FUSED = "fused"
"""Head name of the fused (multimodal) output; its rows are ``fused.d0``, ``fused.d1``, ..."""
MODALITY = "modality"
"""Prefix of the per-modality auxiliary rows: ``modality.flair``, ..."""

_FUSED_RE = re.compile(r"^fused\.d(\d+)$")


def suggest(name: str, valid: Sequence[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest of ``valid``, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_name(name: str) -> tuple[str, int | str]:
    """Split an objective name into ``("fused", depth)`` or ``("modality", modality_name)``.

    Args:
        name: ``fused.d<int>`` or ``modality.<name>``.
    """
    match = _FUSED_RE.match(name)
    if match:
        return FUSED, int(match.group(1))
    prefix, _, rest = name.partition(".")
    if prefix == MODALITY and rest:
        return MODALITY, rest
    raise ValueError(
        f"objective name {name!r} is neither 'fused.d<depth>' (e.g. 'fused.d0') "
        f"nor 'modality.<name>' (e.g. 'modality.flair')"
    )


def head_of(name: str) -> str:
    """Prediction head an objective belongs to: ``"fused"`` for ``fused.d*``, else the modality.

    Args:
        name: an objective name such as ``"fused.d1"`` or ``"modality.t2"``.

    Example:
        >>> head_of("fused.d2"), head_of("modality.t1ce")
        ('fused', 't1ce')
    """
    kind, value = parse_name(name)
    return FUSED if kind == FUSED else str(value)


def objective_names(modalities: Sequence[str] = MODALITIES, depths: int = 3) -> list[str]:
    """All objective names of a network, in row order: fused depths first, then modalities.

    Args:
        modalities: modalities with an auxiliary head (empty for early-fusion networks).
        depths: number of fused deep-supervision heads (``fused.d0 .. fused.d{depths-1}``).

    Example:
        >>> objective_names(("flair", "t2"), depths=2)
        ['fused.d0', 'fused.d1', 'modality.flair', 'modality.t2']
    """
    if int(depths) < 0:
        raise ValueError(f"depths must be >= 0, got {depths!r}")
    return [f"{FUSED}.d{d}" for d in range(int(depths))] + [f"{MODALITY}.{m}" for m in modalities]
