"""Mean — the average of the objectives' gradients (baseline)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._core import Aggregator

__all__ = ["Mean", "mean_coefficients"]


def mean_coefficients(G: Tensor) -> tuple[Tensor, Tensor]:
    """``C = I/K``: the update is ``(1/K) Σ_i g_i``, identical to backward of the mean loss.

    Example:
        >>> mean_coefficients(torch.eye(2))[0]
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]])
    """
    K = G.shape[0]
    return torch.eye(K, dtype=G.dtype, device=G.device) / K, torch.zeros_like(G)


class Mean(Aggregator):
    """Mean: ``update = (1/K) Σ_i g_i`` (backward of the averaged loss). Linear, permutation invariant.

    Example:
        >>> Mean()(torch.tensor([[1.0, 2.0], [3.0, 1.0]])).update
        tensor([2.0000, 1.5000])
    """

    def _coefficients(self, G, names, nonfinite):
        return mean_coefficients(G)
