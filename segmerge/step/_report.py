"""What one training step reports (:class:`StepReport`) and what it takes (named losses)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

__all__ = ["StepReport"]


class _NamedLosses(Protocol):
    names: list[str]
    losses: Tensor


@dataclass
class StepReport:
    """What one training step did. Every tensor stays on the device (no host sync).

    Attributes:
        names: objective names of the rows used this step.
        losses: (K,) detached losses (averaged over ranks under torch.distributed).
        weights: (K,) coefficients c = C.sum(0) applied to the objectives (before the merge).
        norms: (K,) gradient norms of the rows; None on amortised (non-refresh) steps. With
            ``jacobian="outputs"`` these (and cosine, alpha, n_conflicts) are those of the
            output-space gradients the coefficients came from.
        cosine: (K, K) cosine similarities of the rows; None on amortised steps.
        alpha: (K, K) conflict coefficients; None on amortised steps.
        n_conflicts: 0-d count of conflicting pairs; None on amortised steps.
        skipped: 0-d bool, True when the step was skipped (non-finite loss or gradient).
        skipped_total: 0-d int64 running count of skipped steps.
        grad_norm: 0-d norm of the update before clipping (None without ``clip_norm``).
        refreshed: True when J and the coefficients were recomputed this step.
        backward_passes: number of autograd backward passes this step ran.
    """

    names: list[str]
    losses: Tensor
    weights: Tensor
    norms: Tensor | None
    cosine: Tensor | None
    alpha: Tensor | None
    n_conflicts: Tensor | None
    skipped: Tensor
    skipped_total: Tensor
    grad_norm: Tensor | None
    refreshed: bool
    backward_passes: int
