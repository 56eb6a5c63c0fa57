"""What every aggregator shares: the Gramian, the masked merge, the result, the base class.

Every method in this package turns the Gramian ``G = J Jᵀ`` (K×K) into a coefficient matrix
``C`` (K×K) whose rows give the projected rows ``p_i = Σ_j C_ij g_j``; the update is then one
combination of the rows of ``J``::

    update = merge_scale(shared, K, masked) ⊙ (Jᵀ · C.sum(0))

so an aggregation reads ``J`` twice (once for ``G``, once for the combination) and does only
K×K arithmetic in between. Nothing here calls ``.item()`` or branches in Python on a tensor
value, so the same code runs on CUDA without host-device synchronisation from segmerge (only
``torch.linalg.pinv`` in GradCraft checks convergence inside PyTorch) and every aggregator's
``__call__`` compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from segmerge.hints import suggest

__all__ = [
    "GRAM_BLOCK",
    "AggregationResult",
    "Aggregator",
    "Coefficients",
    "ObservesValidation",
    "blocked_products",
    "combine",
    "gramian",
    "merge_scale",
]


GRAM_BLOCK = 16384
"""Columns per block of the blocked Gramian (a K×block slab stays in cache)."""


def blocked_products(X: Tensor, Y: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """``X Yᵀ`` for long rows (D ≫ K), summed over column blocks: (K, M).

    One long matrix product accumulates each entry over all D columns in the input dtype; in
    float32 at D = 20M that loses about 3 significant digits. Splitting D into blocks of
    ``block`` columns (a batched product over strided views, no copy) and summing the per-block
    products keeps the error near float32 resolution, reads each row once while the block is in
    cache, and lets the batch dimension use every thread.

    Args:
        X: (K, D) tensor.
        Y: (M, D) tensor.
        block: columns per block.

    Example:
        >>> X = torch.arange(6.0).reshape(2, 3)
        >>> blocked_products(X, X, block=2)
        tensor([[ 5., 14.],
                [14., 50.]])
    """
    D = X.shape[1]
    n = D // block
    out = X[:, n * block :] @ Y[:, n * block :].T
    if n > 0:
        xb = X[:, : n * block].unflatten(1, (n, block)).transpose(0, 1)  # (n, K, block) view
        yb = Y[:, : n * block].unflatten(1, (n, block)).transpose(0, 1)
        out = out + torch.bmm(xb, yb.transpose(1, 2)).sum(0)
    return out


def gramian(J: Tensor, reference: Tensor | None = None) -> Tensor:
    """Gramian ``J Jᵀ`` (K×K), optionally extended by a reference row to (K+1)×(K+1).

    One read of ``J`` in its own dtype, accumulated blockwise (see :func:`blocked_products`).
    With a ``reference`` vector r (D,), the result is the Gramian of ``[J; r]`` built without
    copying ``J``: ``[[J Jᵀ, J r], [rᵀ Jᵀ, r·r]]`` (one more read of ``J`` for ``J r``).

    Args:
        J: (K, D) Jacobian, one row per objective.
        reference: optional (D,) vector appended as the last row.

    Example:
        >>> import torch
        >>> gramian(torch.tensor([[1.0, 2.0], [3.0, 1.0]]))
        tensor([[ 5.,  5.],
                [ 5., 10.]])
    """
    G = blocked_products(J, J)
    if reference is None:
        return G
    ref = reference[None, :]
    r = blocked_products(J, ref)  # (K, 1)
    rr = blocked_products(ref, ref)  # (1, 1)
    return torch.cat([torch.cat([G, r], dim=1), torch.cat([r.T, rr], dim=1)], dim=0)


def merge_scale(
    shared: Tensor | None,
    K: int,
    masked: bool,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-parameter factor of the masked merge: ``1/K`` on shared entries, 1 elsewhere.

    The masked merge (GMD, GradCraft) averages the projected rows on parameters that every
    objective reaches and sums them elsewhere, so ``update = merge_scale(...) ⊙ (Jᵀ c)``.
    Without masking (Sum, Mean, Blending, PCGrad by default) the factor is 1. ``shared=None``
    means *every* parameter is shared (one trunk reached by all objectives).

    A training step that combines per parameter tensor can use the scalar form directly:
    ``1/K`` for a tensor every objective reaches, 1 otherwise.

    Args:
        shared: (D,) bool mask, True where every objective reaches the parameter; or None.
        K: number of objectives (rows of J) in this step.
        masked: whether the aggregator uses the masked merge.
        dtype: dtype of the returned factor (default: ``torch.get_default_dtype()``).
        device: device of the returned factor (default: that of ``shared``).

    Returns:
        A (D,) tensor when ``masked`` and ``shared`` is given, else a 0-d tensor.

    Example:
        >>> merge_scale(torch.tensor([True, False]), K=4, masked=True)
        tensor([0.2500, 1.0000])
        >>> merge_scale(None, K=4, masked=True)
        tensor(0.2500)
    """
    dtype = dtype or torch.get_default_dtype()
    device = device if device is not None else (shared.device if shared is not None else None)
    if not masked:
        return torch.ones((), dtype=dtype, device=device)
    inv_k = torch.full((), 1.0 / K, dtype=dtype, device=device)
    if shared is None:
        return inv_k
    return torch.where(shared.to(device), inv_k, torch.ones((), dtype=dtype, device=device))


def combine(
    J: Tensor,
    c: Tensor,
    scale: Tensor | float | None = None,
    nonfinite: Tensor | None = None,
) -> Tensor:
    """The one combination: ``scale ⊙ (Jᵀ c)``, zeros when ``nonfinite``.

    Reads ``J`` once (``c @ J``). A scalar ``scale`` is folded into ``c`` (free); a (D,) scale
    (from :func:`merge_scale`) and the non-finite guard are in-place passes over the result.

    Args:
        J: (K, D) Jacobian.
        c: (K,) combination weights, ``C.sum(0)``.
        scale: the masked-merge factor from :func:`merge_scale` (0-d or (D,)), or None for 1.
        nonfinite: optional 0-d bool tensor; where True the update is all zeros.

    Example:
        >>> J = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
        >>> combine(J, torch.ones(2), merge_scale(torch.tensor([True, False]), 2, masked=True))
        tensor([2., 3.])
    """
    c = c.to(J.dtype)
    vector_scale = isinstance(scale, Tensor) and scale.ndim > 0
    if scale is not None and not vector_scale:
        c = c * scale
    update = c @ J
    if vector_scale:
        update.mul_(scale)
    if nonfinite is not None:
        update.masked_fill_(nonfinite, 0.0)
    return update


class MergeScaleCache:
    """Keeps the last (D,) masked-merge factor, keyed by the identity and version of the mask.

    Building the float factor from the bool mask allocates and writes a D-vector (about half
    a read of J at D = 20M); a training step usually passes the same mask tensor at every step,
    so the aggregator builds it once. The key is the mask object itself (a weak reference), its
    in-place version counter, K, dtype and device, so a changed or new mask is never mistaken
    for the cached one.
    """

    def __init__(self) -> None:
        self._entry: tuple[Any, tuple, Tensor] | None = None

    def get(
        self, shared: Tensor | None, K: int, masked: bool, dtype: torch.dtype, device: torch.device
    ) -> Tensor | None:
        if not masked:
            return None
        if shared is None or torch.compiler.is_compiling():
            return merge_scale(shared, K, masked, dtype=dtype, device=device)
        key = (shared._version, K, dtype, device)
        entry = self._entry
        if entry is not None and entry[0]() is shared and entry[1] == key:
            return entry[2]
        scale = merge_scale(shared, K, masked, dtype=dtype, device=device)
        self._entry = (weakref.ref(shared), key, scale)
        return scale


class Coefficients(NamedTuple):
    """K-space output of an aggregator for one step.

    Attributes:
        C: (K, K) coefficient matrix, rows ``p_i = Σ_j C_ij g_j``.
        alpha: (K, K) conflict coefficients that were applied (method-specific, see each method).
        nonfinite: 0-d bool tensor, True when the Gramian had NaN/Inf (then C and alpha are 0).
    """

    C: Tensor
    alpha: Tensor
    nonfinite: Tensor


@dataclass
class AggregationResult:
    """One aggregation step: the update and what the aggregator saw.

    Attributes:
        update: (D,) the aggregated gradient (zeros when ``nonfinite``).
        C: (K, K) coefficient matrix, projected rows ``p_i = Σ_j C_ij g_j``.
        weights: (K,) effective weight of each ``g_j`` in the update before the merge scaling,
            ``C.sum(0)``.
        cosine: (K, K) cosine similarity of the rows (0 where a row has zero norm).
        alpha: (K, K) applied conflict coefficients (GMD/PCGrad: the projection coefficients
            α_ij; GradCraft: the projection weights w_ij in the conflicting pairs' entries;
            zeros for methods that do not project).
        n_conflicts: 0-d int64 tensor, number of pairs i<j with ``g_i·g_j < 0``.
        norms: (K,) Euclidean norm of each row.
        nonfinite: 0-d bool tensor, True when J (or its Gramian) had NaN/Inf.
        names: the objective names of the rows, or None.
    """

    update: Tensor
    C: Tensor
    weights: Tensor
    cosine: Tensor
    alpha: Tensor
    n_conflicts: Tensor
    norms: Tensor
    nonfinite: Tensor
    names: list[str] | None = None

    @classmethod
    def from_gramian(
        cls,
        update: Tensor,
        G: Tensor,
        coefficients: Coefficients,
        names: Sequence[str] | None = None,
    ) -> AggregationResult:
        """Assemble the result (with diagnostics from ``G``) for an update computed elsewhere.

        A training step that computes the Gramian and the combination itself (e.g. per
        parameter tensor) calls ``agg.coefficients(G, names)`` and then this.

        Args:
            update: the (D,) update (or any tensor the caller wants to carry).
            G: the Gramian the coefficients were computed from ((K+1)×(K+1) for an aggregator
                that needs a reference row; only the top-left K×K block is used).
            coefficients: the output of ``Aggregator.coefficients``.
            names: the row names.
        """
        C = coefficients.C
        K = C.shape[0]
        Gk = G[:K, :K].to(C.dtype)
        Gk = torch.where(coefficients.nonfinite, torch.zeros_like(Gk), Gk)
        norms = torch.diagonal(Gk).clamp_min(0).sqrt()
        outer = norms[:, None] * norms[None, :]
        cosine = torch.where(outer > 0, Gk / torch.where(outer > 0, outer, 1), 0)
        idx = torch.arange(K, device=Gk.device)
        # conflicting pairs i < j
        n_conflicts = ((Gk < 0) & (idx[:, None] < idx[None, :])).sum()
        return cls(
            update=update,
            C=C,
            weights=C.sum(0),
            cosine=cosine,
            alpha=coefficients.alpha,
            n_conflicts=n_conflicts,
            norms=norms,
            nonfinite=coefficients.nonfinite,
            names=list(names) if names is not None else None,
        )


def _kspace_dtype(dtype: torch.dtype) -> torch.dtype:
    """K×K arithmetic runs in float64 for float64 input and in float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_names(names: Sequence[str] | None, K: int) -> list[str] | None:
    """Validate row names (one distinct string per row)."""
    if names is None:
        return None
    names = list(names)
    if len(names) != K:
        raise ValueError(
            f"names must have one entry per row of J: got {len(names)} names for K={K}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {names}")
    return names


def state_keys(names: Sequence[str] | None, K: int) -> list[str]:
    """Keys of per-objective state: the names, or the row positions ``"0".."K-1"``."""
    return list(names) if names is not None else [str(i) for i in range(K)]


class Aggregator(ABC):
    """The typed contract of every aggregator: Gramian -> coefficient matrix C -> one combination.

    The training step (``segmerge.step``) relies on exactly this interface:

    - :meth:`coefficients` (``G`` -> :class:`Coefficients`), the K-space hook: subclasses
      implement ``_coefficients(G, names, nonfinite) -> (C, alpha)`` on a finite Gramian (the
      base class replaces a non-finite Gramian by zeros, zeroes C and alpha and reports
      ``nonfinite``; stateful subclasses must leave their state unchanged when ``nonfinite`` is
      True, using ``torch.where``);
    - :meth:`merge_scale` / :meth:`merge_` — the one masked-merge implementation, also applied
      by the step to an update it combined itself (one backward of ``Σ c_k L_k``);
    - :meth:`__call__` — the whole aggregation of a materialised ``J``;
    - ``masked_merge`` and ``needs_reference`` (class attributes, part of the type);
    - ``reset`` / ``state_dict`` / ``load_state_dict``.

    Configuration is returned by ``_config()`` and reproduced by ``repr()``. Subclasses that
    define ``__init__`` call ``super().__init__()``.

    Attributes:
        masked_merge: True when the update is averaged over objectives on shared parameters
            and summed elsewhere (see :func:`merge_scale`).
        needs_reference: True when ``__call__`` needs ``reference`` (the (D,) gradient of a
            validation objective) and ``coefficients`` the Gramian extended by that row.
    """

    masked_merge: bool = False
    needs_reference: bool = False
    #: the registered callable whose call ``repr()`` writes (default: the class itself)
    _repr_name: str | None = None

    def __init__(self) -> None:
        self._scale_cache = MergeScaleCache()

    # -- configuration -------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{self._repr_name or type(self).__name__}({args})"

    # -- K-space ----------------------------------------------------------------------------
    @abstractmethod
    def _coefficients(
        self, G: Tensor, names: list[str] | None, nonfinite: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(C, alpha)``, each (K, K), from a finite Gramian (see the class docstring)."""

    def coefficients(self, G: Tensor, names: Sequence[str] | None = None) -> Coefficients:
        """Coefficient matrix C from the Gramian alone (advances the state by one step).

        Args:
            G: (K, K) Gramian ``J Jᵀ``; (K+1, K+1) with the reference row last when
                ``needs_reference``.
            names: optional row names (keys of per-objective state).

        Returns:
            :class:`Coefficients` ``(C, alpha, nonfinite)``.
        """
        if G.ndim != 2 or G.shape[0] != G.shape[1]:
            raise ValueError(f"G must be a square (K, K) Gramian, got shape {tuple(G.shape)}")
        K = G.shape[0] - (1 if self.needs_reference else 0)
        if K < 1:
            raise ValueError(f"{type(self).__name__} needs at least one objective, got K={K}")
        names = check_names(names, K)
        Gk = G.to(_kspace_dtype(G.dtype))
        nonfinite = ~torch.isfinite(Gk).all()
        Gk = torch.where(nonfinite, torch.zeros_like(Gk), Gk)
        C, alpha = self._coefficients(Gk, names, nonfinite)
        C = torch.where(nonfinite, torch.zeros_like(C), C)
        alpha = torch.where(nonfinite, torch.zeros_like(alpha), alpha)
        return Coefficients(C, alpha, nonfinite)

    # -- the masked merge -------------------------------------------------------------------
    def merge_scale(
        self, shared: Tensor | None, K: int, dtype: torch.dtype, device: torch.device
    ) -> Tensor | None:
        """This aggregator's masked-merge factor (:func:`merge_scale`), or None when it is 1.

        The (D,) factor is cached per mask tensor (see :class:`MergeScaleCache`).
        """
        cache = self.__dict__.get("_scale_cache")
        if cache is None:  # a subclass that skipped super().__init__()
            cache = self._scale_cache = MergeScaleCache()
        return cache.get(shared, K, self.masked_merge, dtype, device)

    def merge_(self, combined: Tensor, shared: Tensor | None, K: int) -> Tensor:
        """Apply the masked merge in place to an already combined ``Jᵀ c`` (D,) and return it.

        What a training step uses when it obtains ``Jᵀ c`` from one backward of ``Σ_k c_k L_k``
        (amortised steps, ``jacobian="outputs"``) instead of from a materialised ``J``; the
        same factor as :meth:`__call__` applies.

        Args:
            combined: (D,) ``Σ_k c_k g_k``, modified in place.
            shared: (D,) bool mask of the parameters every objective reaches; None: all.
            K: number of objectives in the step.
        """
        scale = self.merge_scale(shared, K, combined.dtype, combined.device)
        if scale is not None:
            combined.mul_(scale)
        return combined

    def __call__(
        self,
        J: Tensor,
        shared: Tensor | None = None,
        names: Sequence[str] | None = None,
        reference: Tensor | None = None,
    ) -> AggregationResult:
        """Aggregate the rows of ``J`` into one update.

        Args:
            J: (K, D) floating tensor, one row ``g_i = ∇θ L_i`` per objective.
            shared: (D,) bool mask, True on parameters every objective reaches (decided per
                parameter tensor); None means every parameter is shared.
            names: optional list of K distinct objective names (e.g. ``fused.d0``,
                ``modality.flair``); stateful aggregators key their state by them.
            reference: (D,) gradient of the fused objective on a validation batch; required
                when ``needs_reference``, ignored otherwise.

        Returns:
            :class:`AggregationResult`.
        """
        if J.ndim != 2 or not J.is_floating_point():
            raise ValueError(
                f"J must be a 2-D floating (K, D) tensor, got shape {tuple(J.shape)} dtype {J.dtype}"
            )
        if shared is not None and (shared.shape != (J.shape[1],) or shared.dtype != torch.bool):
            raise ValueError(
                f"shared must be a ({J.shape[1]},) bool tensor, got shape {tuple(shared.shape)} "
                f"dtype {shared.dtype}"
            )
        if self.needs_reference:
            if reference is None:
                raise ValueError(f"{self!r} needs reference=: the (D,) validation gradient")
            if reference.shape != (J.shape[1],):
                raise ValueError(
                    f"reference must have shape ({J.shape[1]},), got {tuple(reference.shape)}"
                )
            G = gramian(J, reference.to(J.dtype))
        else:
            G = gramian(J)
        co = self.coefficients(G, names)
        scale = self.merge_scale(shared, J.shape[0], J.dtype, J.device)
        update = combine(J, co.C.sum(0), scale, co.nonfinite)
        return AggregationResult.from_gramian(update, G, co, names)

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:  # noqa: B027 - stateless aggregators keep this no-op
        """Forget all state: the next call behaves like the first."""

    def state_dict(self) -> dict[str, Any]:
        """State as tensors and plain Python values (loadable with ``weights_only=True``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: expected keys {sorted(expected)}, "
                f"got {sorted(state)}"
            )


class ObservesValidation(ABC):
    """An aggregator that learns from validations (Gradient-Blending's interval estimator).

    The engine checks ``isinstance(aggregator, ObservesValidation)`` and then calls
    :meth:`observe_validation` at every validation with the per-head losses.
    """

    @abstractmethod
    def observe_validation(
        self, train: Mapping[str, float], val: Mapping[str, float]
    ) -> dict[str, float]:
        """Record one validation (per-head train and validation losses); return the weights
        per head now in force (what the engine logs as ``blending/weight/<head>``)."""


def check_choice(
    owner: str, param: str, value: Any, choices: Sequence[str], rule: str | None = None
) -> None:
    """Raise ValueError naming ``param``, the rule and the value (with the closest choice)."""
    if value not in choices:
        hint = suggest(value, choices, clause=True)
        rule = rule or f"one of {list(choices)}"
        raise ValueError(f"{owner}: {param} must be {rule}, got {value!r}{hint}")


def check_range(
    owner: str, param: str, value: float, lo: float, hi: float | None, hi_open: bool
) -> float:
    """Raise ValueError naming ``param``, the rule and the value when out of range."""
    v = float(value)
    ok = v >= lo and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        if hi is None:
            rule = f">= {lo:g}"
        else:
            rule = f"in [{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{owner}: {param} must be {rule}, got {value!r}")
    return v
