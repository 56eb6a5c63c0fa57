"""PCGrad — Projecting Conflicting Gradients (Yu et al., "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020, arXiv 2001.06782). A baseline: GMD without the clamp, a fresh random
order per step and the plain sum as merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ._projection import ProjectionAggregator, projection_coefficients

__all__ = ["PCGrad", "pcgrad_coefficients"]


def pcgrad_coefficients(G: Tensor, order: Sequence[int]) -> tuple[Tensor, Tensor]:
    """PCGrad coefficient matrix: for j in σ, if ``p_i·g_j < 0``, ``p_i ← p_i − (p_i·g_j/‖g_j‖²) g_j``.

    Args:
        G: (K, K) Gramian.
        order: projection order σ (a permutation of ``range(K)``).

    Returns:
        ``(C, alpha)`` with ``p_i = Σ_j C_ij g_j``.

    Example:
        >>> import torch
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> C, _ = pcgrad_coefficients(J @ J.T, [0, 1])
        >>> C @ J  # the projected rows
        tensor([[-0.5263,  1.5789,  1.5789],
                [ 1.1111,  2.2222,  2.2222]])
    """
    return projection_coefficients(G, order, None)


class PCGrad(ProjectionAggregator):
    """PCGrad: ``p_i ← p_i − (p_i·g_j/‖g_j‖²)·g_j`` for each conflicting ``g_j``, update ``Σ_i p_i``.

    Yu et al., NeurIPS 2020. Positively homogeneous; ``alpha`` holds the applied coefficients.

    Args:
        order: projection order σ: ``"random"`` (default: a fresh permutation per step from a
            generator seeded with ``seed``), ``"identity"`` or an explicit permutation.
        seed: seed of the order generator (default 0; identical on every distributed rank).
        masked: use the masked merge of GMD instead of the paper's plain sum (default False).

    Example:
        >>> import torch
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> PCGrad(order=[1, 0])(J).update
        tensor([0.5848, 3.8012, 3.8012])
        >>> PCGrad()
        PCGrad(order='random', seed=0, masked=False)
    """

    _default_order = "random"
    _clamp = None

    def __init__(self, order: Any = None, seed: int = 0, masked: bool = False) -> None:
        super().__init__(order=order, seed=seed, masked=masked)

    def _config(self) -> dict[str, Any]:
        return {"order": self._resolved_order(), "seed": self.seed, "masked": self.masked_merge}
