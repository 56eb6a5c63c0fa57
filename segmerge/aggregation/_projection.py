"""Sequential pairwise projection in K-space, shared by GMD and PCGrad.

Both methods project each row ``p_i`` (starting from ``g_i``) away from every *original* row
``g_j`` it conflicts with, visiting ``j`` in an order σ:

    d = p_i · g_j;  if d < 0 and ‖g_j‖ > 0:  α_ij = d / ‖g_j‖²  (GMD: clamped to [-2, 1]);
    p_i ← p_i − α_ij g_j.

With ``p_i = Σ_l C_il g_l`` we have ``d = (C G)_ij``, so the loop runs on the K×K Gramian,
and since the rows are independent all ``i`` are processed at once for each ``j``: K steps of
K×K arithmetic instead of K² passes over D-vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._core import Aggregator, check_choice

__all__ = ["ProjectionAggregator", "projection_coefficients"]


def projection_coefficients(
    G: Tensor, order: Sequence[int], clamp: tuple[float, float] | None = None
) -> tuple[Tensor, Tensor]:
    """Coefficients of the sequential projection (GMD with ``clamp=(-2, 1)``, else PCGrad).

    Args:
        G: (K, K) Gramian.
        order: the projection order σ over ``j`` (a permutation of ``range(K)``, Python ints).
        clamp: ``(lo, hi)`` bounds on α_ij, or None for the unclamped PCGrad projection.

    Returns:
        ``(C, alpha)``: rows ``p_i = Σ_j C_ij g_j`` and the applied α (K, K).

    Example:
        >>> G = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])  # g1=(-4,1,1), g2=(6,1,1)
        >>> C, alpha = projection_coefficients(G, [0, 1])
        >>> alpha
        tensor([[ 0.0000, -0.5789],
                [-1.2222,  0.0000]])
    """
    K = G.shape[0]
    C = torch.eye(K, dtype=G.dtype, device=G.device)
    alpha = torch.zeros_like(G)
    sq = torch.diagonal(G)
    for j in order:
        d = C @ G[:, j]  # p_i · g_j for every i at once
        gjj = sq[j]
        reach = gjj > 0
        a = d / torch.where(reach, gjj, torch.ones_like(gjj))
        if clamp is not None:
            a = a.clamp(clamp[0], clamp[1])
        a = torch.where((d < 0) & reach, a, torch.zeros_like(a))
        C[:, j] -= a
        alpha[:, j] = a
    return C, alpha


def _check_order(owner: str, order: Any) -> str | list[int] | None:
    """Validate ``order``: None, ``"identity"``, ``"random"`` or a permutation of 0..K-1."""
    rule = "'identity', 'random' or a permutation list"
    if order is None:
        return None
    if isinstance(order, str):
        check_choice(owner, "order", order, ("identity", "random"), rule)
        return order
    try:
        perm = [int(i) for i in order]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}: order must be {rule}, got {order!r}") from err
    if sorted(perm) != list(range(len(perm))):
        raise ValueError(f"{owner}: order must be a permutation of 0..K-1, got {perm}")
    return perm


class ProjectionAggregator(Aggregator):
    """Common machinery of GMD and PCGrad: the projection order and its seeded generator.

    Args:
        order: ``"identity"``, ``"random"`` (a fresh permutation per step drawn from a
            ``torch.Generator`` seeded with ``seed``, identical on every distributed rank) or an
            explicit permutation of ``range(K)``. None selects the method's default.
        seed: seed of the order generator.
        masked: use the masked merge (mean on shared parameters, sum elsewhere).
    """

    _default_order = "identity"
    _clamp: tuple[float, float] | None = None

    def __init__(self, order: Any = None, seed: int = 0, masked: bool = True) -> None:
        super().__init__()
        self.order = _check_order(type(self).__name__, order)
        self.seed = int(seed)
        self.masked_merge = bool(masked)
        self._generator = torch.Generator(device="cpu")
        self.reset()

    def _resolved_order(self) -> Any:
        return self._default_order if self.order is None else self.order

    def draw_order(self, K: int) -> list[int]:
        """The projection order for a step with K objectives (advances the generator if random)."""
        order = self._resolved_order()
        if order == "identity":
            return list(range(K))
        if order == "random":
            # CPU generator: deterministic across ranks, and tolist() is no device sync.
            return torch.randperm(K, generator=self._generator).tolist()
        if len(order) != K:
            raise ValueError(
                f"{type(self).__name__}: order {order} has {len(order)} entries for K={K}"
            )
        return list(order)

    def _coefficients(self, G: Tensor, names: list[str] | None, nonfinite: Tensor):
        return projection_coefficients(G, self.draw_order(G.shape[0]), self._clamp)

    def reset(self) -> None:
        self._generator.manual_seed(self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self._generator.set_state(state["generator"])
