"""Gradient-Blending and the overfitting-to-generalisation ratio (OGR).

Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification Networks Hard?",
CVPR 2020, arXiv 1905.12681. Each prediction head (the fused output, each modality's head) gets
a weight from how much it generalises relative to how much it overfits; the update is
``Σ_k w_k g_k``.

Two estimators:

- *interval* (the paper's practical algorithm): from train/validation losses of each head at
  two checkpoints N and N+n, ``O = L^V − L^T``, ``ΔO = O_{N+n} − O_N``,
  ``ΔG = L^V_N − L^V_{N+n}``, ``OGR = |ΔO/ΔG|``, ``w_k ∝ max(ΔG_k, 0) / max(ΔO_k², ε)``
  normalised to 1;
- *gradient* (the derivation behind it): ``w_k ∝ ⟨∇L*, g_k⟩ / σ_k²`` with ∇L* the gradient of
  the fused objective on a validation batch and σ_k² a running mean of ``⟨∇L^T − ∇L*, g_k⟩²``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._core import Aggregator, ObservesValidation, check_choice, check_range, state_keys

__all__ = [
    "Blending",
    "GradientBlending",
    "IntervalBlending",
    "OGRTracker",
    "blending_gradient_products",
    "gradient_blending_weights",
    "head_of",
    "interval_blending_weights",
]

FUSED_PREFIX = "fused."
MODALITY_PREFIX = "modality."


def head_of(name: str) -> str:
    """Prediction head of an objective name: ``fused`` for ``fused.*``, the modality for
    ``modality.<m>``, the name itself otherwise.

    Example:
        >>> [head_of(n) for n in ["fused.d0", "fused.d2", "modality.t1ce", "aux"]]
        ['fused', 'fused', 't1ce', 'aux']
    """
    if name.startswith(FUSED_PREFIX):
        return "fused"
    if name.startswith(MODALITY_PREFIX):
        return name[len(MODALITY_PREFIX) :]
    return name


def interval_blending_weights(
    train_before: Tensor | Sequence[float],
    val_before: Tensor | Sequence[float],
    train_after: Tensor | Sequence[float],
    val_after: Tensor | Sequence[float],
    eps: float = 1e-8,
    previous: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Interval estimator of Gradient-Blending weights, and the OGR, per head.

    ``O = L^V − L^T``; ``ΔO = O_after − O_before``; ``ΔG = L^V_before − L^V_after``;
    ``OGR = |ΔO / ΔG|`` (+inf when ΔG = 0 ≠ ΔO, 0 when both are 0);
    ``w ∝ max(ΔG, 0) / max(ΔO², eps)``, normalised to sum 1. When every ΔG ≤ 0 the weights
    are ``previous`` (uniform when None).

    Args:
        train_before: (K,) train losses L^T at checkpoint N (on a fixed training slice).
        val_before: (K,) validation losses L^V at checkpoint N.
        train_after: (K,) train losses at checkpoint N+n.
        val_after: (K,) validation losses at checkpoint N+n.
        eps: floor of ΔO² (default 1e-8).
        previous: (K,) weights to keep when no head generalised.

    Returns:
        ``(w, ogr)``, each (K,).

    Example:
        >>> w, ogr = interval_blending_weights([1, 1, 1], [1.1, 1.05, 1.2], [0.6, 0.8, 0.5], [0.9, 0.9, 1.1])
        >>> w, ogr
        (tensor([0.0762, 0.9143, 0.0095]), tensor([1.0000, 0.3333, 4.0000]))
    """
    tb, vb, ta, va = (
        torch.as_tensor(x, dtype=torch.get_default_dtype())
        if not isinstance(x, Tensor) or not x.is_floating_point()
        else x
        for x in (train_before, val_before, train_after, val_after)
    )
    d_o = (va - ta) - (vb - tb)
    d_g = vb - va
    ratio = d_o.abs() / torch.where(d_g != 0, d_g.abs(), torch.ones_like(d_g))
    no_gain = torch.where(d_o != 0, torch.full_like(d_o, math.inf), torch.zeros_like(d_o))
    ogr = torch.where(d_g != 0, ratio, no_gain)
    raw = d_g.clamp_min(0) / (d_o * d_o).clamp_min(eps)
    total = raw.sum()
    if previous is None:
        previous = torch.full_like(raw, 1.0 / raw.numel())
    w = torch.where(total > 0, raw / torch.where(total > 0, total, 1), previous.to(raw))
    return w, ogr


def blending_gradient_products(G_ext: Tensor, fused: Tensor) -> tuple[Tensor, Tensor]:
    """Inner products of the gradient estimator from the Gramian extended by ∇L*.

    Args:
        G_ext: (K+1, K+1) Gramian of ``[J; ∇L*]`` (the reference row last).
        fused: (K,) bool, True on the rows whose sum is the training gradient ∇L^T.

    Returns:
        ``(val, gap)``: ``val_k = ⟨∇L*, g_k⟩`` and ``gap_k = ⟨∇L^T − ∇L*, g_k⟩``.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); ref = torch.tensor([1.0, 1.0])
        >>> X = torch.cat([J, ref[None]])
        >>> blending_gradient_products(X @ X.T, torch.tensor([True, False]))
        (tensor([1., 2.]), tensor([ 0., -2.]))
    """
    K = G_ext.shape[0] - 1
    G = G_ext[:K, :K]
    val = G_ext[K, :K]
    train = fused.to(G.dtype) @ G
    return val, train - val


def gradient_blending_weights(val: Tensor, sigma2: Tensor) -> Tensor:
    """Gradient-estimator weights ``w_k ∝ max(⟨∇L*, g_k⟩, 0) / σ_k²``, normalised to 1.

    A row whose σ² is still 0 is treated as having the largest σ² of the step (1 if all are
    0), so it is never infinitely favoured; all-zero weights become uniform.

    Args:
        val: (K,) ``⟨∇L*, g_k⟩``.
        sigma2: (K,) running mean of ``⟨∇L^T − ∇L*, g_k⟩²``.

    Example:
        >>> gradient_blending_weights(torch.tensor([2.0, -1.0, 1.0]), torch.tensor([1.0, 1.0, 0.5]))
        tensor([0.5000, 0.0000, 0.5000])
    """
    smax = sigma2.max()
    fill = torch.where(smax > 0, smax, torch.ones_like(smax))
    s2 = torch.where(sigma2 > 0, sigma2, fill)
    raw = val.clamp_min(0) / s2
    total = raw.sum()
    uniform = torch.full_like(raw, 1.0 / raw.numel())
    return torch.where(total > 0, raw / torch.where(total > 0, total, 1), uniform)


def _interval_between(
    before: tuple[Mapping[str, float], Mapping[str, float]],
    after: tuple[Mapping[str, float], Mapping[str, float]],
    eps: float,
) -> tuple[dict[str, float], dict[str, float] | None]:
    """OGR and interval weights per head between two (train, val) observations, over the heads
    seen in both; the weights are None when no head generalised (every ΔG ≤ 0)."""
    heads = [h for h in after[0] if h in after[1] and h in before[0] and h in before[1]]
    if not heads:
        return {}, None
    cols = [[float(obs[h]) for h in heads] for obs in (before[0], before[1], after[0], after[1])]
    w, ogr = interval_blending_weights(
        *(torch.tensor(c, dtype=torch.float64) for c in cols), eps=eps
    )
    gained = any(v_before > v_after for v_before, v_after in zip(cols[1], cols[3]))
    return dict(zip(heads, ogr.tolist())), dict(zip(heads, w.tolist())) if gained else None


class OGRTracker:
    """Per-head OGR between consecutive validations (what the engine logs as ``ogr/<head>``).

    Call :meth:`observe` at every validation with the train loss (on a fixed training slice)
    and the validation loss of each head; it returns ``{head: OGR}`` between the previous and
    the current observation (empty at the first).

    Example:
        >>> t = OGRTracker()
        >>> t.observe({"fused": 1.0, "t1": 1.0}, {"fused": 1.1, "t1": 1.2})
        {}
        >>> ogr = t.observe({"fused": 0.6, "t1": 0.5}, {"fused": 0.9, "t1": 1.1})
        >>> {h: round(v, 6) for h, v in ogr.items()}
        {'fused': 1.0, 't1': 4.0}
    """

    def __init__(self) -> None:
        self.reset()

    def observe(self, train: Mapping[str, float], val: Mapping[str, float]) -> dict[str, float]:
        """Record one validation; return the OGR per head since the previous one."""
        current = (
            {str(k): float(v) for k, v in train.items()},
            {str(k): float(v) for k, v in val.items()},
        )
        ogr: dict[str, float] = {}
        if self._last is not None:
            ogr, _ = _interval_between(self._last, current, eps=1e-8)
            self.history.append(ogr)
        self._last = current
        return ogr

    def reset(self) -> None:
        self._last: tuple[dict[str, float], dict[str, float]] | None = None
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "last": None if self._last is None else [dict(self._last[0]), dict(self._last[1])],
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        last = state["last"]
        self._last = None if last is None else (dict(last[0]), dict(last[1]))
        self.history = [dict(h) for h in state["history"]]


class Blending(abc.ABC):  # noqa: B024 - an ABC only for register(): isinstance of either class
    """Gradient-Blending (Wang, Tran, Feiszli, CVPR 2020): ``update = Σ_k w_k g_k``.

    The registered method ``blending``: calling ``Blending(estimator=...)`` builds the class of
    the chosen estimator, :class:`IntervalBlending` (default) or :class:`GradientBlending`; both
    are (virtual) subclasses, so ``isinstance(agg, Blending)`` holds for either.

    Args:
        estimator: ``"interval"`` (default) or ``"gradient"``.
        warmup: interval estimator: validations with uniform weights (default 0).
        super_epoch: interval estimator: validations between estimates (default 1).
        eps: interval estimator: floor of ΔO² (default 1e-8).

    Raises:
        ValueError: unknown estimator, or an interval-only option changed for the gradient one.

    Example:
        >>> type(Blending()).__name__, Blending()  # repr() writes the registered call
        ('IntervalBlending', Blending(estimator='interval', warmup=0, super_epoch=1, eps=1e-08))
        >>> type(Blending(estimator="gradient")).__name__
        'GradientBlending'
    """

    def __new__(  # type: ignore[misc]
        cls,
        estimator: str = "interval",
        warmup: int = 0,
        super_epoch: int = 1,
        eps: float = 1e-8,
    ) -> IntervalBlending | GradientBlending:
        return cls.select(estimator, warmup=warmup, super_epoch=super_epoch, eps=eps)

    @staticmethod
    def select(
        estimator: str = "interval", warmup: int = 0, super_epoch: int = 1, eps: float = 1e-8
    ) -> IntervalBlending | GradientBlending:
        """What ``Blending(...)`` returns, as a plain function (``torch.compile`` traces a call
        of it, not a ``__new__`` that returns another class)."""
        check_choice("Blending", "estimator", estimator, ("interval", "gradient"))
        if estimator == "interval":
            return IntervalBlending(warmup=warmup, super_epoch=super_epoch, eps=eps)
        defaults = (("warmup", warmup, 0), ("super_epoch", super_epoch, 1), ("eps", eps, 1e-8))
        changed = [f"{k}={v!r}" for k, v, default in defaults if v != default]
        if changed:
            raise ValueError(
                f"Blending: {', '.join(changed)} only apply to estimator='interval', "
                "got estimator='gradient'"
            )
        return GradientBlending()


def _diag(w: Tensor, K: int, G: Tensor) -> tuple[Tensor, Tensor]:
    return torch.diag(w), torch.zeros(K, K, dtype=G.dtype, device=G.device)


class IntervalBlending(Aggregator, ObservesValidation):
    """Gradient-Blending, interval estimator: per-head weights from validations.

    One weight per head, estimated from validations (call :meth:`observe_validation` with
    per-head train and validation losses), between the anchor observation N and N+n with n =
    ``super_epoch``: ``w_h ∝ max(ΔG_h, 0) / max(ΔO_h², eps)``. The first ``warmup``
    observations keep uniform weights; when every ΔG ≤ 0 the previous weights are kept. In a
    step, a head's weight is split equally among its rows present (``fused.d0``, ``fused.d1``…
    share ``fused``) and the row weights are renormalised to sum 1 over the present rows (a head
    never estimated gets the uniform share). Registered as ``blending`` (the default estimator).

    Args:
        warmup: number of validations with uniform weights before the first estimate (default 0).
        super_epoch: recompute the weights every this many validations (default 1).
        eps: floor of ΔO² (default 1e-8).

    Example:
        >>> agg = IntervalBlending()
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
        >>> names = ["fused.d0", "fused.d1", "modality.t1"]
        >>> agg(J, names=names).weights  # uniform per head before any estimate
        tensor([0.2500, 0.2500, 0.5000])
        >>> agg.observe_validation({"fused": 1.0, "t1": 1.0}, {"fused": 1.1, "t1": 1.2})
        {'fused': 0.5, 't1': 0.5}
        >>> w = agg.observe_validation({"fused": 0.6, "t1": 0.5}, {"fused": 0.9, "t1": 1.1})
        >>> {h: round(v, 4) for h, v in w.items()}  # ∝ 0.2/0.2² and 0.1/0.4²
        {'fused': 0.8889, 't1': 0.1111}
        >>> agg(J, names=names).weights
        tensor([0.4444, 0.4444, 0.1111])
    """

    def __init__(self, warmup: int = 0, super_epoch: int = 1, eps: float = 1e-8) -> None:
        super().__init__()
        self.warmup = int(check_range("Blending", "warmup", warmup, 0, None, hi_open=False))
        self.super_epoch = int(check_range("Blending", "super_epoch", super_epoch, 1, None, False))
        self.eps = check_range("Blending", "eps", eps, 0.0, None, hi_open=False)
        self.reset()

    _repr_name = "Blending"

    def _config(self) -> dict[str, Any]:
        return {
            "estimator": "interval",
            "warmup": self.warmup,
            "super_epoch": self.super_epoch,
            "eps": self.eps,
        }

    @property
    def head_weights(self) -> dict[str, float]:
        """Current weight per head ({} while uniform)."""
        return dict(self._head_weights)

    def observe_validation(
        self, train: Mapping[str, float], val: Mapping[str, float]
    ) -> dict[str, float]:
        """Record one validation (per-head train and validation losses); returns the head weights.

        Weights are re-estimated when the observation is past ``warmup`` and ``super_epoch``
        observations after the anchor (the previous estimate, or the last warm-up observation).
        The OGR of every estimate is appended to ``ogr_history``.
        """
        current = (
            {str(k): float(v) for k, v in train.items()},
            {str(k): float(v) for k, v in val.items()},
        )
        self._n_obs += 1
        if self._anchor is None or self._n_obs <= self.warmup:
            self._anchor, self._anchor_obs = current, self._n_obs
        elif self._n_obs - self._anchor_obs >= self.super_epoch:
            ogr, weights = _interval_between(self._anchor, current, self.eps)
            self.ogr_history.append(ogr)
            if weights is not None:  # else keep the previous weights: no head generalised
                self._head_weights = weights
                self._row_cache.clear()
            self._anchor, self._anchor_obs = current, self._n_obs
        if self._head_weights:
            return dict(self._head_weights)
        heads = sorted(set(current[0]) & set(current[1]))
        return {h: 1.0 / len(heads) for h in heads}

    def _row_weights(self, keys: list[str], G: Tensor) -> Tensor:
        cache_key = (tuple(keys), G.dtype, G.device)
        if cache_key not in self._row_cache:
            heads = [head_of(k) for k in keys]
            present = sorted(set(heads))
            known = set(self._head_weights) | set(present)
            hw = {h: self._head_weights.get(h, 1.0 / len(known)) for h in present}
            if sum(hw.values()) <= 0:
                hw = {h: 1.0 for h in present}
            total = sum(hw.values())
            rows = [hw[h] / heads.count(h) / total for h in heads]
            self._row_cache[cache_key] = torch.tensor(rows, dtype=G.dtype, device=G.device)
        return self._row_cache[cache_key]

    def _coefficients(self, G: Tensor, names: Sequence[str] | None, nonfinite: Tensor):
        K = G.shape[0]
        return _diag(self._row_weights(state_keys(names, K), G), K, G)

    def reset(self) -> None:
        self._head_weights: dict[str, float] = {}
        self._anchor: tuple[dict[str, float], dict[str, float]] | None = None
        self._anchor_obs = 0
        self._n_obs = 0
        self.ogr_history: list[dict[str, float]] = []
        self._row_cache: dict[tuple, Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "head_weights": dict(self._head_weights),
            "anchor": None
            if self._anchor is None
            else [dict(self._anchor[0]), dict(self._anchor[1])],
            "anchor_obs": self._anchor_obs,
            "n_obs": self._n_obs,
            "ogr_history": [dict(h) for h in self.ogr_history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.reset()
        self._head_weights = {str(k): float(v) for k, v in state["head_weights"].items()}
        anchor = state["anchor"]
        self._anchor = None if anchor is None else (dict(anchor[0]), dict(anchor[1]))
        self._anchor_obs = int(state["anchor_obs"])
        self._n_obs = int(state["n_obs"])
        self.ogr_history = [dict(h) for h in state["ogr_history"]]


class GradientBlending(Aggregator):
    """Gradient-Blending, gradient estimator: per-row weights from a validation gradient.

    Per objective row k, with ``reference`` = ∇L* (the fused objective on a validation batch)
    and ∇L^T = the sum of the ``fused.*`` rows (all rows when unnamed):
    ``σ_k² ←`` running mean of ``⟨∇L^T − ∇L*, g_k⟩²`` (per name), ``w_k ∝ ⟨∇L*, g_k⟩ / σ_k²``,
    negative weights clipped to 0, normalised to 1 (uniform if all are 0). Every inner product
    comes from the Gramian of ``[J; ∇L*]``. Built by ``Blending(estimator="gradient")`` (the
    registered method ``blending``).

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> GradientBlending()(J, names=["fused.d0", "modality.t1"], reference=torch.ones(2)).weights
        tensor([0.3333, 0.6667])
    """

    needs_reference = True
    _repr_name = "Blending"

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"estimator": "gradient"}

    def _coefficients(self, G: Tensor, names: Sequence[str] | None, nonfinite: Tensor):
        K = G.shape[0] - 1
        keys = state_keys(names, K)
        fused = [k.startswith(FUSED_PREFIX) for k in keys] if names is not None else [True] * K
        if not any(fused):
            raise ValueError(
                f"Blending(estimator='gradient'): no 'fused.*' row among {keys} to form ∇L^T"
            )
        val, gap = blending_gradient_products(G, torch.tensor(fused, device=G.device))
        zero = torch.zeros((), dtype=G.dtype, device=G.device)
        s_old = torch.stack([self._sigma2.get(k, zero).to(G) for k in keys])
        n_old = torch.stack([self._count.get(k, zero).to(G) for k in keys])
        n = n_old + (~nonfinite).to(G.dtype)
        s = torch.where(nonfinite, s_old, s_old + (gap * gap - s_old) / n.clamp_min(1))
        for k, sk, nk in zip(keys, s.unbind(0), n.unbind(0)):
            self._sigma2[k], self._count[k] = sk, nk
        return _diag(gradient_blending_weights(val, s), K, G)

    def reset(self) -> None:
        self._sigma2: dict[str, Tensor] = {}
        self._count: dict[str, Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "sigma2": {k: v.detach().clone() for k, v in self._sigma2.items()},
            "count": {k: v.detach().clone() for k, v in self._count.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._sigma2 = {str(k): torch.as_tensor(v).clone() for k, v in state["sigma2"].items()}
        self._count = {str(k): torch.as_tensor(v).clone() for k, v in state["count"].items()}


Blending.register(IntervalBlending)
Blending.register(GradientBlending)
