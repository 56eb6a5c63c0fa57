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

__all__ = ["ProjectionAggregator", "projection_coefficients", "seeded_permutation"]

_P = 2147483647  # 2^31 - 1: every intermediate of the hash below stays far inside int64


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


def _mix(x: Tensor) -> Tensor:
    """One round of an integer hash on int64 values in [0, 2^31 - 1) (products stay < 2^48)."""
    x = (x * 48271 + 11) % _P
    x = x ^ (x >> 13)
    x = (x * 69621 + 7) % _P
    return x ^ (x >> 11)


def seeded_permutation(seed: int, draw: Tensor | int, K: int) -> Tensor:
    """The ``draw``-th random projection order of a seed: a (K,) int64 permutation on the CPU.

    A counter-based draw: the argsort of K hashed keys of ``(seed, draw, i)``. It needs no
    ``torch.Generator`` (which ``torch.compile`` cannot trace), is the same on every rank
    and device without communication, and a checkpoint only has to store the draw counter.
    Written by hand because torch offers no counter-based permutation without a generator.

    Args:
        seed: the aggregator's seed.
        draw: 0-based index of the draw (a 0-d int64 tensor in a stateful aggregator).
        K: number of objectives.

    Example:
        >>> sorted(seeded_permutation(0, 0, 5).tolist())
        [0, 1, 2, 3, 4]
    """
    base = _mix(torch.as_tensor(int(seed) % _P, dtype=torch.int64))
    base = _mix((base + torch.as_tensor(draw, dtype=torch.int64) % _P) % _P)
    keys = _mix(_mix((base + 7919 * torch.arange(1, K + 1, dtype=torch.int64)) % _P))
    return torch.argsort(keys, stable=True)


def permuted_projection(
    G: Tensor, perm: Tensor, clamp: tuple[float, float] | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`projection_coefficients` with the order σ given as a tensor (``perm[t]`` = σ(t)).

    The objectives are relabelled so that σ becomes the identity, projected, and labelled back:
    no host read of the order, so a random order compiles with ``fullgraph=True``.
    """
    perm = perm.to(G.device)
    inv = torch.argsort(perm)
    Gp = G.index_select(0, perm).index_select(1, perm)
    Cp, ap = projection_coefficients(Gp, range(G.shape[0]), clamp)
    return (
        Cp.index_select(0, inv).index_select(1, inv),
        ap.index_select(0, inv).index_select(1, inv),
    )


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
    """Common machinery of GMD and PCGrad: the projection order and its seeded draws.

    Args:
        order: ``"identity"``, ``"random"`` (a fresh permutation per step, the n-th drawn by
            :func:`seeded_permutation` from ``seed`` and the draw counter n, identical on every
            distributed rank) or an explicit permutation of ``range(K)``. None selects the
            method's default.
        seed: seed of the random order.
        masked: use the masked merge (mean on shared parameters, sum elsewhere).
    """

    _default_order = "identity"
    _clamp: tuple[float, float] | None = None

    def __init__(self, order: Any = None, seed: int = 0, masked: bool = True) -> None:
        super().__init__()
        self.order = _check_order(type(self).__name__, order)
        self.seed = int(seed)
        self.masked_merge = bool(masked)
        self.reset()

    def _resolved_order(self) -> Any:
        return self._default_order if self.order is None else self.order

    def _next_permutation(self, K: int) -> Tensor:
        perm = seeded_permutation(self.seed, self._draws, K)
        self._draws.add_(1)
        return perm

    def draw_order(self, K: int) -> list[int]:
        """The projection order for a step with K objectives (advances the draws if random)."""
        order = self._resolved_order()
        if order == "identity":
            return list(range(K))
        if order == "random":
            return self._next_permutation(K).tolist()  # a CPU tensor: no device sync
        self._check_length(order, K)
        return list(order)

    def _check_length(self, order: list[int], K: int) -> None:
        if len(order) != K:
            raise ValueError(
                f"{type(self).__name__}: order {order} has {len(order)} entries for K={K}"
            )

    def _coefficients(self, G: Tensor, names: list[str] | None, nonfinite: Tensor):
        order = self._resolved_order()
        K = G.shape[0]
        if order == "random":
            return permuted_projection(G, self._next_permutation(K), self._clamp)
        if order != "identity":
            self._check_length(order, K)
        return projection_coefficients(G, range(K) if order == "identity" else order, self._clamp)

    def reset(self) -> None:
        self._draws = torch.zeros((), dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self._draws.clone()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self._draws = torch.as_tensor(state["draws"], dtype=torch.int64).reshape(()).clone()
