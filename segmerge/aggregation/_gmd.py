"""GMD — Gradient Merging Descent.

Pairwise projection of conflicting gradients with a clamped coefficient, then the masked
merge (mean on parameters every objective reaches, sum elsewhere). Motivated by deep
supervision and multimodal segmentation, where each head reaches only part of the network.
See ``docs/algorithms.md`` for the exact specification segmerge implements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ._projection import ProjectionAggregator, projection_coefficients

__all__ = ["GMD", "gmd_coefficients"]

GMD_CLAMP = (-2.0, 1.0)


def gmd_coefficients(G: Tensor, order: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """GMD coefficient matrix from the Gramian.

    For j in σ (for every row i): ``d = p_i·g_j``; if ``d < 0`` and ``‖g_j‖ > 0``,
    ``α_ij = clamp(d/‖g_j‖², −2, 1)`` and ``p_i ← p_i − α_ij g_j``.

    Args:
        G: (K, K) Gramian.
        order: projection order σ (default: identity).

    Returns:
        ``(C, alpha)`` with ``p_i = Σ_j C_ij g_j``.

    Example:
        >>> import torch
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> C, _ = gmd_coefficients(J @ J.T)
        >>> (C.sum(0) @ J) / 2  # masked merge, everything shared
        tensor([0.2924, 1.9006, 1.9006])
    """
    order = list(range(G.shape[0])) if order is None else order
    return projection_coefficients(G, order, GMD_CLAMP)


class GMD(ProjectionAggregator):
    """Gradient Merging Descent: clamped pairwise projection, then the masked merge.

    ``p_i`` starts at ``g_i``; for j in σ, when ``p_i·g_j < 0`` and ``‖g_j‖ > 0``:
    ``p_i ← p_i − clamp(p_i·g_j/‖g_j‖², −2, 1)·g_j`` (original ``g_j``, current ``p_i``).
    Update: ``(1/K)Σ_i p_i`` on shared parameters, ``Σ_i p_i`` elsewhere. The clamp can leave a
    conflict in place. Positively homogeneous; ``alpha`` holds the applied α_ij.

    Args:
        order: projection order σ: ``"identity"`` (default), ``"random"`` (a fresh seeded
            permutation per step) or an explicit permutation of ``range(K)``.
        seed: seed of the random order generator (default 0; identical on every rank).

    Example:
        >>> import torch
        >>> gmd = GMD()
        >>> gmd(torch.tensor([[1.0, 2.0], [3.0, 1.0]])).update
        tensor([2.0000, 1.5000])
        >>> GMD(order="random", seed=3)
        GMD(order='random', seed=3)
    """

    masked_merge = True
    _default_order = "identity"
    _clamp = GMD_CLAMP

    def __init__(self, order: Any = None, seed: int = 0) -> None:
        super().__init__(order=order, seed=seed, masked=True)

    def _config(self) -> dict[str, Any]:
        return {"order": self._resolved_order(), "seed": self.seed}
