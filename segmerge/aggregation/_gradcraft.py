"""GradCraft — holistic gradient crafting (Meng et al., "GradCraft: Elevating Multi-task
Recommendations through Holistic Gradient Crafting", KDD 2024, arXiv 2407.19682).

Magnitude adjustment towards the largest (remembered) gradient norm, then a global,
order-free projection that removes every conflict of a row at once, aiming at a small
positive similarity ``e``; merged with the masked merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._core import Aggregator, check_range, state_keys

__all__ = ["GradCraft", "gradcraft_coefficients", "magnitude_scales"]


def magnitude_scales(m: Tensor, r: float) -> Tensor:
    """Per-row factor ``s_i`` of the magnitude adjustment ``ĝ_i = s_i g_i``.

    ``s_i = r·max_j m_j / m_i + (1 − r)``; a row with ``m_i = 0`` keeps ``s_i = 1``.

    Args:
        m: (K,) remembered norms.
        r: adjustment strength τ ∈ [0, 1].

    Example:
        >>> magnitude_scales(torch.tensor([1.0, 4.0, 0.0]), r=0.5)
        tensor([2.5000, 1.0000, 1.0000])
    """
    pos = m > 0
    ratio = m.max() / torch.where(pos, m, torch.ones_like(m))
    return torch.where(pos, r * ratio + (1.0 - r), torch.ones_like(m))


def gradcraft_coefficients(
    G: Tensor, m: Tensor, r: float = 0.5, e: float = 0.0
) -> tuple[Tensor, Tensor]:
    """GradCraft coefficient matrix from the Gramian and the remembered norms.

    With ``ĝ_i = s_i g_i`` (see :func:`magnitude_scales`) and ``Ĝ = S G S``, for every row i
    independently: ``N_i = {j : ĝ_i·ĝ_j < 0}``; ``w`` solves
    ``Ĝ_{N_i N_i} w = −Ĝ_{N_i i} + e‖ĝ_i‖(‖ĝ_j‖)_{j∈N_i}`` in the least-squares sense and
    ``p_i = ĝ_i + Σ_{j∈N_i} w_j ĝ_j``, so that ``ĝ_j·p_i = e‖ĝ_i‖‖ĝ_j‖`` for j in N_i.

    All K systems are solved at once, without branching on the conflict sets: system i is
    the masked matrix ``block-diag(Ĝ_NN, τ_i I)`` (τ_i = the largest ``Ĝ_jj`` in N_i, so the
    filler block does not change the relative rank cut-off) with a right-hand side that is zero
    outside N_i, solved with the pseudo-inverse (least squares when conflicting rows are
    collinear; w = 0 outside N_i and when N_i is empty).

    Args:
        G: (K, K) Gramian.
        m: (K,) remembered norms (the EMA of ``‖g_i‖``; with b = 0 simply the norms).
        r: magnitude adjustment strength τ ∈ [0, 1].
        e: target positive similarity ε ≥ 0.

    Returns:
        ``(C, alpha)``: ``C_ij = s_i δ_ij + w_ij s_j`` and ``alpha = w`` (zero outside the
        conflicting pairs).

    Example:
        >>> J = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
        >>> G = J @ J.T
        >>> C, _ = gradcraft_coefficients(G, torch.diagonal(G).sqrt(), r=1.0)
        >>> C.sum(0) @ J / 2
        tensor([2.2071, 1.9142])
    """
    K = G.shape[0]
    eye = torch.eye(K, dtype=torch.bool, device=G.device)
    s = magnitude_scales(m.to(G.dtype), r)
    Gh = s[:, None] * G * s[None, :]
    conflict = (Gh < 0) & ~eye  # N_i as row i
    nh = torch.diagonal(Gh).clamp_min(0).sqrt()
    rhs = torch.where(conflict, -Gh + e * nh[:, None] * nh[None, :], torch.zeros_like(Gh))
    pair = conflict[:, :, None] & conflict[:, None, :]  # (i, j, l): j and l both in N_i
    diag_in_n = torch.where(conflict, torch.diagonal(Gh)[None, :], torch.zeros_like(Gh))
    tau = diag_in_n.amax(dim=1)
    tau = torch.where(tau > 0, tau, torch.ones_like(tau))
    filler = (~conflict)[:, :, None] & eye[None, :, :]  # identity outside N_i
    A = torch.where(pair, Gh[None, :, :], torch.zeros_like(pair, dtype=Gh.dtype))
    A = A + torch.where(filler, tau[:, None, None], torch.zeros_like(A))
    w = (torch.linalg.pinv(A, hermitian=True) @ rhs[:, :, None]).squeeze(-1)
    w = torch.where(conflict, w, torch.zeros_like(w))
    C = torch.diag(s) + w * s[None, :]
    return C, w


class GradCraft(Aggregator):
    """GradCraft (Meng et al., KDD 2024): magnitude adjustment, global de-conflict, masked merge.

    1. Norm memory ``m_i ← b·m_i + (1 − b)·‖g_i‖`` (kept per objective name; starts at 0).
    2. ``ĝ_i = r·(max_j m_j / m_i)·g_i + (1 − r)·g_i`` (``ĝ_i = g_i`` when ``m_i = 0``), the max
       over the objectives present in the step.
    3. For each i: ``N_i = {j : ĝ_i·ĝ_j < 0}``, ``p_i = ĝ_i + G_iᵀ w`` with
       ``(G_i G_iᵀ) w = −G_i ĝ_i + e‖ĝ_i‖(‖ĝ_j‖)_{j∈N_i}`` (least squares when singular).
    4. Masked merge: ``(1/K)Σ p_i`` on shared parameters, ``Σ p_i`` elsewhere.

    Positively homogeneous when ``b = 0`` (and on the first step for any b), permutation
    equivariant. ``alpha`` holds the projection weights ``w_ij`` of the conflicting pairs.

    Args:
        r: magnitude adjustment strength τ ∈ [0, 1] (default 0.5; 0 keeps the norms, 1 scales
            every row to the largest remembered norm).
        e: target positive similarity ε ≥ 0 between ``p_i`` and each conflicting ``ĝ_j``
            (default 0.0: plain orthogonal projection).
        b: EMA factor of the norm memory, in [0, 1) (default 0.0: no memory).

    Example:
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> GradCraft(r=1.0)(J).update
        tensor([0.1732, 2.2582, 2.2582])
        >>> GradCraft(r=0.5, e=0.0, b=0.0)
        GradCraft(r=0.5, e=0.0, b=0.0)
    """

    masked_merge = True

    def __init__(self, r: float = 0.5, e: float = 0.0, b: float = 0.0) -> None:
        super().__init__()
        self.r = check_range("GradCraft", "r", r, 0.0, 1.0, hi_open=False)
        self.e = check_range("GradCraft", "e", e, 0.0, None, hi_open=False)
        self.b = check_range("GradCraft", "b", b, 0.0, 1.0, hi_open=True)
        self._m: dict[str, Tensor] = {}

    def _config(self) -> dict[str, Any]:
        return {"r": self.r, "e": self.e, "b": self.b}

    def _coefficients(self, G: Tensor, names: Sequence[str] | None, nonfinite: Tensor):
        K = G.shape[0]
        keys = state_keys(names, K)
        zero = torch.zeros((), dtype=G.dtype, device=G.device)
        m_old = torch.stack([self._m.get(k, zero).to(G) for k in keys])
        norms = torch.diagonal(G).clamp_min(0).sqrt()
        m = self.b * m_old + (1.0 - self.b) * norms
        m = torch.where(nonfinite, m_old, m)  # a non-finite step leaves the memory unchanged
        for k, mk in zip(keys, m.unbind(0)):
            self._m[k] = mk
        return gradcraft_coefficients(G, m, self.r, self.e)

    @property
    def norm_memory(self) -> dict[str, Tensor]:
        """The remembered norms ``m`` per objective name (row position when unnamed)."""
        return dict(self._m)

    def reset(self) -> None:
        self._m = {}

    def state_dict(self) -> dict[str, Any]:
        return {"m": {k: v.detach().clone() for k, v in self._m.items()}}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self._m = {str(k): torch.as_tensor(v).clone() for k, v in state["m"].items()}
