"""torchjd's Gramian-based weightings as segmerge aggregators (one bridge, no copies).

torchjd (PyPI ``torchjd``, the field's library for Jacobian descent) computes the weights of
UPGrad, MGDA, CAGrad, IMTL-G, Aligned-MTL, DualProj, Nash-MTL, GradVac, FairGrad and PCD from
the Gramian ``G = J Jᵀ`` alone, which is segmerge's K-space contract. The bridge hands segmerge's
Gramian to torchjd's ``Weighting``, takes the (K,) weights ``w`` back and lets the base class do
the one combination ``Jᵀ w`` (no masked merge: torchjd's update is the plain weighted sum). So
the speed path is segmerge's: one blocked Gramian, K×K work, one combination; the amortised
training step reuses ``w`` between refreshes like every other method.

What the bridge adds around torchjd, and nothing else:

- **Host side.** torchjd's solvers run on the CPU (quadprog, cvxpy/CLARABEL, cvxpy/ECOS, scipy)
  or branch on tensor values (MGDA, GradVac, PCD). The bridge moves the K×K Gramian to the CPU
  once per step, in float64 (one small transfer: the aggregator's only host-device
  synchronisation, and only on refresh steps in amortised mode) and returns ``w`` on the
  Gramian's device in its dtype. These
  aggregators therefore do not compile with ``torch.compile(fullgraph=True)`` and do not run on
  the meta device; the K-space call is excluded from compilation (one graph break).
- **Degenerate and non-finite steps.** A non-finite Gramian (NaN/Inf in J) returns zeros without
  calling torchjd, so a stateful weighting's state is left unchanged. A Gramian of zero trace
  (every row zero) gives zero weights without calling torchjd: every combination of zero rows is
  zero, and several torchjd solvers divide by the trace (Nash-MTL fails there).
- **State, per set of objectives.** A stateful weighting (Nash-MTL, GradVac, PCD) is kept per
  tuple of objective names (row positions when unnamed): torchjd's state is shaped by
  the number of tasks, so a step with a modality absent uses (and keeps) the state of that
  objective set instead of resetting the full set's. ``state_dict()`` holds tensors and plain
  Python values only (loadable with ``torch.load(weights_only=True)``); the attributes saved are
  torchjd 0.18's (pinned in ``pyproject.toml``; the round-trip tests guard them).
- **Seeded randomness.** GradVac shuffles with torch's *global* CPU generator. The bridge runs it
  under ``torch.random.fork_rng`` with its own generator state seeded by ``seed``: reproducible,
  identical on every distributed rank, checkpointed, and the caller's global RNG is untouched.
- **Matrix weightings.** Nash-MTL is typed as a weighting of J, but depends on J only through
  ``J Jᵀ`` (its problem matrix) and ``‖Jᵀ w‖`` (its norm clip). The bridge feeds it the K×K
  factor ``L = V Λ^{1/2}`` of ``G = V Λ Vᵀ``, whose Gramian ``L Lᵀ`` is G.

``C = diag(w)`` (so ``weights = C.sum(0) = w``: torchjd returns the weights only, not projected
rows) and ``alpha`` is zero. Not bridged (see ``docs/algorithms.md``): torchjd's Sum, Mean and
PCGrad (segmerge's own ``sum``, ``mean``, ``pcgrad``), Constant and Random (no method), Krum
(Byzantine-robust federated averaging), CR-MOGM (a wrapper of another weighting), ExcessMTL (a
function of J's entries, not of its Gramian), MoDo and SDMGrad (they need the product of two
independent stochastic Jacobians, which the step does not form), ConFIG, GradDrop and
TrimmedMean (aggregators of J, no weighting).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._core import Aggregator, check_choice, state_keys

__all__ = [
    "CAGrad",
    "IMTLG",
    "PCD",
    "UPGrad",
    "AlignedMTL",
    "DualProj",
    "FairGrad",
    "GradVac",
    "MGDA",
    "NashMTL",
    "TorchJDAggregator",
]

_F64 = torch.float64


@functools.cache
def _tjd() -> Any:
    """``torchjd.aggregation``, imported on first use: it imports cvxpy and qpsolvers (several
    seconds), which every ``segmerge`` command would otherwise pay at start-up."""
    return importlib.import_module("torchjd.aggregation")


def _floats(value: Sequence[float] | None) -> list[float] | None:
    return None if value is None else [float(v) for v in value]


def _loaded(owner: str, key: str, value: Any, shape: tuple[int, ...], dtype=None) -> Tensor:
    """A saved state tensor, on the CPU, checked against the shape its objective set implies."""
    t = torch.as_tensor(value, dtype=dtype).cpu()
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{owner}.load_state_dict: {key} must have shape {shape} (its objective set's), "
            f"got {tuple(t.shape)}"
        )
    return t.clone()


class TorchJDAggregator(Aggregator):
    """Base of the bridge: segmerge's Gramian -> a torchjd ``Weighting`` -> ``C = diag(w)``.

    A subclass names torchjd's aggregator (``reference``: the oracle the tests compare with) and
    weighting (``weighting``), declares the hyper-parameters in its ``__init__`` signature and
    passes them to this ``__init__`` (they become attributes, the configuration and ``repr``);
    by default they are torchjd's weighting's keyword arguments (:meth:`_build` otherwise). When
    the weighting keeps state, :meth:`_save_state` / :meth:`_load_state` save and restore it.

    Class attributes:
        reference: name of the torchjd aggregator this bridges, e.g. ``"UPGrad"``.
        weighting: name of the torchjd weighting built by the default :meth:`_build`.
        bridge_only: hyper-parameters of the bridge, not passed to torchjd (GradVac's seed).
        stateful: the weighting's output depends on earlier calls.
        seeded: the weighting draws from torch's global CPU generator (run under the bridge's
            own seeded generator state).
        matrix_input: the weighting takes a matrix (fed the K×K factor of the Gramian).
        min_objectives: the smallest K torchjd's weighting accepts.
    """

    reference: ClassVar[str]
    weighting: ClassVar[str] = ""
    bridge_only: ClassVar[tuple[str, ...]] = ()
    stateful: ClassVar[bool] = False
    seeded: ClassVar[bool] = False
    matrix_input: ClassVar[bool] = False
    min_objectives: ClassVar[int] = 1

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self._hparams = dict(hparams)
        for name, value in hparams.items():
            setattr(self, name, value)
        self.seed = int(hparams.get("seed", 0))
        self._weightings: dict[tuple[str, ...], torch.nn.Module] = {}
        self._rng_state: Tensor | None = None
        self.reset()
        self._checked_build(2)  # torchjd's setters reject bad hyper-parameters now, not later

    def _config(self) -> dict[str, Any]:
        return dict(self._hparams)

    # -- what a bridged method may replace --------------------------------------------------
    def _build(self, K: int) -> torch.nn.Module:
        """A fresh torchjd weighting for K objectives (it computes in float64)."""
        kwargs = {k: v for k, v in self._hparams.items() if k not in self.bridge_only}
        return getattr(_tjd(), self.weighting)(**kwargs)

    def _save_state(self, weighting: torch.nn.Module) -> dict[str, Any]:
        """The weighting's state as tensors and plain values (stateful methods)."""
        return {}

    def _load_state(self, weighting: torch.nn.Module, K: int, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_save_state` returned into a fresh weighting."""

    # -- the bridge -------------------------------------------------------------------------
    def _checked_build(self, K: int) -> torch.nn.Module:
        try:
            return self._build(K)
        except ValueError as err:  # torchjd's own message names the value and the rule
            raise ValueError(f"{type(self).__name__}: {err}") from err

    def _weighting(self, keys: list[str]) -> torch.nn.Module:
        key = tuple(keys) if self.stateful else (len(keys),)
        if key not in self._weightings:
            self._weightings[key] = self._checked_build(len(keys))
        return self._weightings[key]

    @contextlib.contextmanager
    def _generator(self) -> Iterator[None]:
        if not self.seeded:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            yield
            self._rng_state = torch.get_rng_state()

    @torch.compiler.disable
    def _host_weights(self, G: Tensor, nonfinite: Tensor, keys: list[str]) -> Tensor:
        K = G.shape[0]
        # One transfer of the K×K Gramian and the flag: torchjd works on the host, in float64
        # (a float32 Gramian of tiny rows is subnormal: IMTL-G's pinv of it is not finite).
        host = torch.cat([G.reshape(-1), nonfinite.reshape(1).to(G.dtype)]).to("cpu", _F64)
        G_host = host[:-1].view(K, K)
        if bool(host[-1]) or not bool(torch.diagonal(G_host).sum() > 0):
            return torch.zeros(K, dtype=G.dtype, device=G.device)  # state left unchanged
        weighting = self._weighting(keys)
        stat = G_host
        if self.matrix_input:
            vals, vecs = torch.linalg.eigh(G_host)
            stat = vecs * vals.clamp_min(0).sqrt()  # L with L Lᵀ = G
        with self._generator(), warnings.catch_warnings():
            # cvxpy: Nash-MTL's problem is not DPP, so re-solves are not faster (noise per step)
            warnings.filterwarnings("ignore", message=".*not DPP.*")
            w = weighting(stat)
        return w.detach().to(device=G.device, dtype=G.dtype)

    def _coefficients(
        self, G: Tensor, names: list[str] | None, nonfinite: Tensor
    ) -> tuple[Tensor, Tensor]:
        K = G.shape[0]
        if K < self.min_objectives:
            raise ValueError(
                f"{type(self).__name__} needs at least {self.min_objectives} objectives "
                f"(torchjd's {self.reference} rejects fewer), got K={K}"
            )
        w = self._host_weights(G, nonfinite, state_keys(names, K))
        return torch.diag(w), torch.zeros_like(G)

    # -- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        self._weightings = {}
        if self.seeded:
            self._rng_state = torch.Generator(device="cpu").manual_seed(self.seed).get_state()

    def state_dict(self) -> dict[str, Any]:
        if not self.stateful:
            return {}
        entries = [
            {"names": list(names), "state": self._save_state(w)}
            for names, w in self._weightings.items()
        ]
        state: dict[str, Any] = {"weightings": entries}
        if self.seeded:
            state["generator"] = self._rng_state.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (its tensors may be on any device: torchjd's state
        lives on the CPU)."""
        super().load_state_dict(state)
        if not self.stateful:
            return
        weightings: dict[tuple[str, ...], torch.nn.Module] = {}
        for entry in state["weightings"]:
            names = tuple(str(n) for n in entry["names"])
            weighting = self._checked_build(len(names))
            self._load_state(weighting, len(names), entry["state"])
            weightings[names] = weighting
        self._weightings = weightings
        if self.seeded:
            self._rng_state = torch.as_tensor(state["generator"], dtype=torch.uint8).cpu().clone()


# -- the bridged methods: hyper-parameters from torchjd's signatures -------------------------


class UPGrad(TorchJDAggregator):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024):
    each row projected onto the dual cone of all rows, the projections averaged.

    torchjd: ``UPGrad(pref_vector, projector=QuadprogProjector(norm_eps, reg_eps))``.

    Args:
        pref_vector: weights combining the projected rows (default uniform 1/K); one per
            objective, so it fixes K.
        norm_eps: the dual-cone projector's floor on the Gramian's trace (default 1e-4).
        reg_eps: the projector's diagonal regularisation of the normalised Gramian (1e-4).

    Example:
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> UPGrad()(J).update
        tensor([0.2929, 1.9004, 1.9004])
    """

    reference = "UPGrad"
    weighting = "UPGradWeighting"

    def __init__(
        self,
        pref_vector: Sequence[float] | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
    ) -> None:
        super().__init__(
            pref_vector=_floats(pref_vector), norm_eps=float(norm_eps), reg_eps=float(reg_eps)
        )

    def _pref(self) -> Tensor | None:
        return None if self.pref_vector is None else torch.tensor(self.pref_vector, dtype=_F64)

    def _projector(self) -> Any:
        linalg = importlib.import_module("torchjd.linalg")  # after _tjd(): already loaded
        return linalg.QuadprogProjector(norm_eps=self.norm_eps, reg_eps=self.reg_eps)

    def _build(self, K: int) -> torch.nn.Module:
        return getattr(_tjd(), self.weighting)(self._pref(), projector=self._projector())


class DualProj(UPGrad):
    """DualProj (the GEM projection, Lopez-Paz & Ranzato, NeurIPS 2017): the averaged row
    projected onto the dual cone of the rows.

    torchjd: ``DualProj(pref_vector, projector=QuadprogProjector(norm_eps, reg_eps))``.

    Args:
        pref_vector: weights of the combination that is projected (default uniform 1/K).
        norm_eps: the projector's floor on the Gramian's trace (default 1e-4).
        reg_eps: the projector's diagonal regularisation (default 1e-4).
    """

    reference = "DualProj"
    weighting = "DualProjWeighting"


class MGDA(TorchJDAggregator):
    """MGDA (Désidéri 2012; Frank-Wolfe solver of Sener & Koltun, NeurIPS 2018): the
    minimum-norm point of the convex hull of the rows.

    Args:
        epsilon: Frank-Wolfe stops when the step size falls below this (default 1e-3).
        max_iters: at most this many Frank-Wolfe iterations (default 100).

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> MGDA()(J).weights
        tensor([0.5000, 0.5000])
    """

    reference = "MGDA"
    weighting = "MGDAWeighting"

    def __init__(self, epsilon: float = 1e-3, max_iters: int = 100) -> None:
        super().__init__(epsilon=float(epsilon), max_iters=int(max_iters))


class CAGrad(TorchJDAggregator):
    """CAGrad (Liu et al., "Conflict-Averse Gradient Descent", NeurIPS 2021): the direction that
    maximises the worst objective's improvement within a ball of radius ``c·‖ḡ‖`` around the
    mean gradient ḡ (torchjd solves it with cvxpy/CLARABEL).

    Args:
        c: radius scale of the ball constraint, >= 0 (torchjd has no default; segmerge uses 0.5;
            0 gives the mean gradient).
        norm_eps: floor against division by zero in the normalisation (default 1e-4).
    """

    reference = "CAGrad"
    weighting = "CAGradWeighting"

    def __init__(self, c: float = 0.5, norm_eps: float = 1e-4) -> None:
        super().__init__(c=float(c), norm_eps=float(norm_eps))


class IMTLG(TorchJDAggregator):
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021), generalised by
    torchjd to linearly dependent rows: the update has equal projections on every unit row.
    No hyper-parameters.
    """

    reference = "IMTLG"
    weighting = "IMTLGWeighting"

    def __init__(self) -> None:
        super().__init__()


class AlignedMTL(TorchJDAggregator):
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023): the rows' principal components rescaled to one condition number.

    Args:
        pref_vector: preference weights (default uniform 1/K); one per objective.
        scale_mode: ``"min"`` (default: smallest eigenvalue), ``"median"`` or ``"rmse"`` (the
            mean eigenvalue, as in the original code).
    """

    reference = "AlignedMTL"
    weighting = "AlignedMTLWeighting"

    def __init__(self, pref_vector: Sequence[float] | None = None, scale_mode: str = "min") -> None:
        # torchjd checks scale_mode only when weighting: check it here, with the closest choice
        check_choice("AlignedMTL", "scale_mode", scale_mode, ("min", "median", "rmse"))
        super().__init__(pref_vector=_floats(pref_vector), scale_mode=scale_mode)

    def _build(self, K: int) -> torch.nn.Module:
        pref = None if self.pref_vector is None else torch.tensor(self.pref_vector, dtype=_F64)
        return _tjd().AlignedMTLWeighting(pref, scale_mode=self.scale_mode)


class FairGrad(TorchJDAggregator):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024):
    α-fair weights solving ``G w = w^{-1/α}`` (scipy least squares).

    Args:
        alpha: fairness exponent α (torchjd has no default; segmerge uses 1.0, proportional
            fairness; 0 gives the mean).
        max_iters: at most this many function evaluations (default: scipy's ``100·K``).
    """

    reference = "FairGrad"
    weighting = "FairGradWeighting"

    def __init__(self, alpha: float = 1.0, max_iters: int | None = None) -> None:
        super().__init__(
            alpha=float(alpha), max_iters=None if max_iters is None else int(max_iters)
        )


class NashMTL(TorchJDAggregator):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022): the Nash
    bargaining solution ``α ⊙ (G α) = 1`` (cvxpy/ECOS), the update clipped to ``max_norm``.

    Stateful (the previous α warm-starts the next solve; with ``update_weights_every = n`` the
    weights are re-solved every n-th call). Needs at least two objectives.

    Args:
        max_norm: clip ``‖Jᵀ α‖`` to this (default 1.0; 0 disables the clip).
        update_weights_every: re-solve every this many calls (default 1).
        optim_niter: iterations of the sequential convex solve (default 20).
    """

    reference = "NashMTL"
    stateful = True
    matrix_input = True
    min_objectives = 2

    def __init__(
        self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20
    ) -> None:
        super().__init__(
            max_norm=float(max_norm),
            update_weights_every=int(update_weights_every),
            optim_niter=int(optim_niter),
        )

    def _build(self, K: int) -> torch.nn.Module:
        # torchjd's aggregator owns the (private) weighting; the bridge uses the weighting alone.
        return _tjd().NashMTL(n_tasks=K, **self._hparams).weighting

    def _save_state(self, weighting: torch.nn.Module) -> dict[str, Any]:
        return {
            "step": float(weighting.step),
            "prvs_alpha": torch.from_numpy(weighting.prvs_alpha.copy()),
            "normalization_factor": torch.from_numpy(weighting.normalization_factor.copy()),
        }

    def _load_state(self, weighting, K, state) -> None:
        weighting.step = float(state["step"])
        weighting.prvs_alpha = _loaded("NashMTL", "prvs_alpha", state["prvs_alpha"], (K,)).numpy()
        weighting.normalization_factor = _loaded(
            "NashMTL", "normalization_factor", state["normalization_factor"], (1,)
        ).numpy()
        if weighting.step > 0:  # torchjd builds the cvxpy problem on its first call only
            weighting._init_optim_problem()


class GradVac(TorchJDAggregator):
    """GradVac (Wang et al., "Gradient Vaccine", ICLR 2021): each row corrected towards an EMA
    target cosine with every other row, visited in a random order.

    Stateful (the EMA targets φ̂, per objective set); the random order comes from the bridge's
    generator seeded with ``seed`` (torchjd uses the global generator).

    Args:
        beta: EMA decay of the target cosines φ̂ (default 0.5).
        eps: constant added to denominators (default 1e-8).
        seed: seed of the visiting order (default 0; identical on every rank).
    """

    reference = "GradVac"
    weighting = "GradVacWeighting"
    bridge_only = ("seed",)
    stateful = True
    seeded = True

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int = 0) -> None:
        super().__init__(beta=float(beta), eps=float(eps), seed=int(seed))

    def _save_state(self, weighting: torch.nn.Module) -> dict[str, Any]:
        phi = weighting._phi_t
        return {"phi": None if phi is None else phi.detach().clone()}

    def _load_state(self, weighting, K, state) -> None:
        if state["phi"] is not None:
            weighting._ensure_state(K, _F64)
            weighting._phi_t.copy_(_loaded("GradVac", "phi", state["phi"], (K, K), _F64))


class PCD(TorchJDAggregator):
    """PCD, Priority-Constrained Descent (TMLR 2026, arXiv 2606.29521): descent on the *first*
    objective (row 0, e.g. ``fused.d0``) subject to each other objective keeping a fraction τ of
    its normalised first-order progress; rows normalised by an EMA of their squared norms.

    Stateful (the EMA, per objective set). Not permutation invariant: row 0 is the primary.

    Args:
        tau: guaranteed progress fraction τ ∈ [0, 1] for the secondary objectives (default 0.02).
        beta: EMA decay of the squared norms, in [0, 1) (default 0.999).
        eps: constant added to the EMA before its inverse square root (default 1e-8).
    """

    reference = "PCD"
    weighting = "PCDWeighting"
    stateful = True

    def __init__(self, tau: float = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(tau=float(tau), beta=float(beta), eps=float(eps))

    def _save_state(self, weighting: torch.nn.Module) -> dict[str, Any]:
        ema = weighting._sq_norm_ema
        if ema is None:
            return {"sq_norm_ema": None, "n_steps": 0}
        return {"sq_norm_ema": ema.detach().clone(), "n_steps": int(weighting._n_steps)}

    def _load_state(self, weighting, K, state) -> None:
        if state["sq_norm_ema"] is not None:
            weighting._ensure_state(K)
            weighting._sq_norm_ema = _loaded("PCD", "sq_norm_ema", state["sq_norm_ema"], (K,), _F64)
            weighting._n_steps = torch.tensor(int(state["n_steps"]))


TORCHJD_AGGREGATORS: dict[str, type[TorchJDAggregator]] = {
    "upgrad": UPGrad,
    "mgda": MGDA,
    "cagrad": CAGrad,
    "imtlg": IMTLG,
    "aligned_mtl": AlignedMTL,
    "dualproj": DualProj,
    "nashmtl": NashMTL,
    "gradvac": GradVac,
    "fairgrad": FairGrad,
    "pcd": PCD,
}
"""Registry names of the bridged methods (merged into ``AGGREGATORS``)."""
