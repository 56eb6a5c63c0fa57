"""Subset machinery of :class:`~segmerge.objectives.ObjectiveSet`: the seeded per-call subset
draws (:class:`SubsetDraws`) and the per-subset fused logits (logit re-fusion from the
``modality.<m>`` heads, or a feature-fusion network's decoded subset heads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, cast

import torch

from segmerge.objectives.names import FUSED, MODALITY, format_objective

SubsetLogits = dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor | None]]
"""Per subset: its fused logits and the per-sample count of its available modalities (None:
every modality available in every sample)."""

_T = TypeVar("_T")


class SubsetDraws:
    """Seeded draws of k proper subsets plus the full set, one draw per training call.

    Draw n uses a generator seeded from ``(seed, n)`` only, so every rank (same seed, same
    number of calls) draws the same subsets, and restoring :meth:`state_dict` (the count)
    continues the sequence exactly.

    Args:
        all_subsets: every non-empty subset in canonical order, the full set last.
        seed: seed of the draws.
    """

    def __init__(self, all_subsets: Sequence[tuple[str, ...]], seed: int) -> None:
        self.all_subsets = list(all_subsets)
        self.seed = seed
        self.count = 0  # subset draws done so far (the checkpointable state)

    def draw(self, k: int) -> list[tuple[str, ...]]:
        """Draw k proper subsets plus the full set (advancing :attr:`count`)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.count)
        self.count += 1
        proper = self.all_subsets[:-1]
        picked = sorted(torch.randperm(len(proper), generator=gen)[:k].tolist())
        return [proper[i] for i in picked] + [self.all_subsets[-1]]

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: the number of subset draws done (plain ints)."""
        return {"draws": int(self.count), "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty dict resets the draws)."""
        if state and int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"objectives state was drawn with seed {state['seed']}, this set has {self.seed}"
            )
        self.count = int(state.get("draws", 0)) if state else 0


def _prefix_sums(
    subsets: Sequence[tuple[str, ...]], values: Mapping[str, _T | None]
) -> dict[tuple[str, ...], _T | None]:
    """Per subset prefix ``S[:j]``, ``sum_{m in S[:j]} values[m]``, each prefix summed once (flair+t1
    reuses flair's); None where a value is None."""
    sums: dict[tuple[str, ...], Any] = {}
    for subset in subsets:
        for end in range(1, len(subset) + 1):
            key = subset[:end]
            if key not in sums:
                value = values[key[-1]]
                prev = sums[key[:-1]] if end > 1 else None
                sums[key] = value if value is None or prev is None else prev + value
    return sums


def subset_counts(
    subsets: Sequence[tuple[str, ...]], cols: Mapping[str, torch.Tensor | None], dtype: torch.dtype
) -> dict[tuple[str, ...], torch.Tensor | None]:
    """Per subset, ``sum_{m in S} a_m`` per sample (None without a mask); prefixes shared."""
    values = {m: None if col is None else col.to(dtype) for m, col in cols.items()}
    counts = _prefix_sums(subsets, values)
    return {s: counts[s] for s in subsets}


def fused_subsets(
    outputs: Mapping[str, torch.Tensor],
    subsets: Sequence[tuple[str, ...]],
    depth: int,
    cols: Mapping[str, torch.Tensor | None],
) -> SubsetLogits:
    """Each subset's fused logits at ``depth`` and its per-sample count of available modalities.

    Feature fusion (``SharedModalityUNet(fusion="features")``'s ``SubsetHeads``, which have
    ``subset_logits``): the network's decoder on the masked mean of S's encoder features, one
    decoder pass per subset (the full set and singletons are heads already), the encoders not
    rerun. Logit fusion otherwise: ``z_S = sum_{m in S} a_m z_m / max(1, sum_{m in S} a_m)``
    from the ``modality.<m>`` heads; masked logits once per modality, partial sums shared along
    each subset's prefix (flair+t1 reuses flair's), so the 15 subsets cost 15 additions in all.
    """
    if hasattr(outputs, "subset_logits"):
        dtype = outputs[format_objective(FUSED, (), depth)].dtype
        counts = subset_counts(subsets, cols, dtype)
        return {s: (outputs.subset_logits(s)[depth], counts[s]) for s in subsets}  # type: ignore[attr-defined]
    masked: dict[str, torch.Tensor] = {}
    for m, col in cols.items():
        z = outputs[format_objective(MODALITY, (m,), depth)]
        masked[m] = (
            z
            if col is None
            else torch.where(col.view(-1, *([1] * (z.dim() - 1))), z, torch.zeros_like(z))
        )
    sums = _prefix_sums(subsets, masked)
    counts = subset_counts(subsets, cols, next(iter(masked.values())).dtype)
    out: SubsetLogits = {}
    for subset in subsets:
        count = counts[subset]
        total = cast(torch.Tensor, sums[subset])  # masked logits are never None
        if count is None:
            fused = total / len(subset) if len(subset) > 1 else total
        else:
            shape = (-1, *([1] * (total.dim() - 1)))
            fused = total / count.clamp(min=1).view(shape)
        out[subset] = (fused, count)
    return out
