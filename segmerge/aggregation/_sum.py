"""Sum — the plain sum of the objectives' gradients (baseline)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._core import Aggregator

__all__ = ["Sum", "sum_coefficients"]


def sum_coefficients(G: Tensor) -> tuple[Tensor, Tensor]:
    """``C = I``: the update is ``Σ_i g_i``, identical to backward of ``Σ_i L_i``.

    Example:
        >>> sum_coefficients(torch.eye(2))[0]
        tensor([[1., 0.],
                [0., 1.]])
    """
    K = G.shape[0]
    return torch.eye(K, dtype=G.dtype, device=G.device), torch.zeros_like(G)


class Sum(Aggregator):
    """Sum: ``update = Σ_i g_i`` (backward of the summed loss). Linear, permutation invariant.

    Example:
        >>> Sum()(torch.tensor([[1.0, 2.0], [3.0, 1.0]])).update
        tensor([4., 3.])
    """

    def _coefficients(self, G, names, nonfinite):
        return sum_coefficients(G)
