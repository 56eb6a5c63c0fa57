"""The training step: many named losses in, one aggregated update out.

This is the one module that talks to autograd for the aggregated update. Per step::

    roots, reach   <- autograd graph of each objective (host-side walk, no sync)
    J (K, D)       <- per-objective gradients, "loop" (grouped retained backward passes) or
                      "batched" (one vmapped backward); zero rows on unreached tensors
    [all_reduce]   <- one flat all_reduce of [J | reference | losses], averaged over ranks
    update (D,)    <- aggregator(J, shared=mask, names=names, reference=r)
    .grad          <- views of the (D,) update (no copy); None on tensors no objective reaches
    clip, step     <- clip_grad_norm_ after aggregation; optimizer step guarded: a no-op, on
                      device, when a loss, J or the update is non-finite (skip counted)

Output-space mode (``jacobian="outputs"``): the per-objective gradients are taken with respect to
the network's output tensors instead of its parameters (a cheap backward through the losses
only), the Gramian and the aggregator's coefficients c = C.sum(0) come from those, and the
update is one backward of Σ_k c_k L_k through the network, followed by the aggregator's masked
merge per parameter tensor. This is the representation-level approximation of MGDA-UB
(Sener & Koltun, NeurIPS 2018) and LibMTL's ``rep_grad``: with Z (K, M) the gradients at the
outputs and A = ∂outputs/∂θ (M, D), the exact J is Z A and its Gramian Z A Aᵀ Zᵀ; the mode uses
Z Zᵀ, i.e. it treats A Aᵀ as the identity. It is exact (up to a common scale of G) when every
objective is a function of the same outputs through a network whose Jacobian rows are
orthonormal, and it sees no conflict between objectives computed from disjoint outputs.

Amortised mode (``refresh_every=N``, with either mode): J (or Z) and the coefficients are
recomputed every N steps; in between one backward of Σ_k c_k L_k (c matched by objective name)
gives Jᵀc directly, followed by the same masked-merge scaling with the shared set of the current
objectives.

The bodies of the three kinds of step (exact, amortised, output-space) are functions of the
``TrainStep`` in :mod:`segmerge.step._modes`; :class:`StepReport` lives in
:mod:`segmerge.step._report`.

Nothing on the per-step path reads a tensor value on the host: the skip decision is a device
flag (see :mod:`segmerge.step._guard`), the skip counter is a tensor, and the report holds
device tensors for the engine to log in batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from segmerge.aggregation import Aggregator
from segmerge.step._guard import GuardedOptimizerStep
from segmerge.step._jacobian import ParamLayout
from segmerge.step._modes import amortised_step, exact_step, output_list, outputs_step
from segmerge.step._reach import graph_reach, objective_roots
from segmerge.step._report import StepReport, _NamedLosses

__all__ = ["AUTO_STRATEGY", "JACOBIAN_MODES", "StepReport", "TrainStep"]

Strategy = Literal["auto", "loop", "batched"]
JacobianMode = Literal["parameters", "outputs"]
JACOBIAN_MODES: tuple[str, ...] = ("parameters", "outputs")
"""Values of ``TrainStep(jacobian=...)`` (and of the engine's ``--jacobian``)."""

#: Jacobian strategy that ``strategy="auto"`` picks per device type. CPU: measured
#: (docs/benchmarks.md, training-step section: on the default network at 2x4x48^3 the batched/vmap Jacobian costs 3.2x
#: the loop one and 2x its memory). CUDA: not measured yet, "loop" until it is. Device types not
#: listed use "loop", which works everywhere.
AUTO_STRATEGY: dict[str, str] = {"cpu": "loop", "cuda": "loop"}


class TrainStep:
    """Per-objective gradients -> aggregator -> ``.grad`` -> clip -> optimizer step.

    Args:
        model: the network (a ``DistributedDataParallel`` wrapper is unwrapped to its
            ``.module``; run its forward under ``no_sync()``, see below). Its parameters with
            ``requires_grad`` are the ones differentiated, in ``model.parameters()`` order.
        optimizer: optimizer over those parameters. ``fused=True`` Adam/AdamW/SGD skip
            non-finite steps on device without any copy; others are snapshotted and restored.
        aggregator: a :class:`segmerge.aggregation.Aggregator` (the typed contract: called on
            ``J``, ``coefficients(G)`` on the Gramian, ``merge_`` for the masked merge of an
            update combined by one backward, ``needs_reference``).
        strategy: Jacobian strategy: ``"loop"`` (retained backward per objective, objectives with
            disjoint reach fused into one backward), ``"batched"`` (one vmapped backward with
            ``is_grads_batched``; falls back to loop with a one-time warning if an operation has
            no batching rule) or ``"auto"`` (per device type, :data:`AUTO_STRATEGY`).
        refresh_every: recompute J and the coefficients every N steps (1 = exact, default);
            in between, one backward of Σ c_k L_k with the last coefficients.
        clip_norm: max global norm of the update (``clip_grad_norm_`` after aggregation), or None.
        scaler: optional ``torch.amp.GradScaler`` (fp16 autocast). The backward runs on scaled
            losses; J is unscaled before the Gramian so the aggregation is scale-correct, and the
            scale is backed off on non-finite gradients as ``GradScaler.update`` does.
            bf16 autocast needs no scaler.
        distributed: average J over ranks with one all_reduce (None = when torch.distributed is
            initialised). DDP's own gradient hooks are not used: they reduce ``.grad`` of one
            summed loss during ``backward()``, whereas the aggregation needs all K rows averaged
            before it runs. Gradients here come from ``torch.autograd.grad``, which never fires
            those hooks, so pass the raw module (or run the forward under ``ddp.no_sync()``).
            Every rank must pass the same objective names in the same order each step (e.g.
            modality dropout drawn from a generator seeded identically on all ranks): the rows
            are averaged position by position. A non-finite value on any rank reaches every
            rank through the all_reduce, so all ranks skip together.
        fuse_disjoint: loop strategy: differentiate objectives with pairwise disjoint reach in
            one backward (default True).
        jacobian: ``"parameters"`` (default: the exact per-objective gradients of every
            parameter) or ``"outputs"`` (gradients at the network's output tensors, passed as
            ``step(..., outputs=)``: Gramian and coefficients from those, then one backward of
            Σ c_k L_k; see the module docstring for what it approximates). ``strategy`` then
            applies to the cheap output-space Jacobian. Not available with aggregators that
            need a reference row (Gradient-Blending's gradient estimator): the reference comes
            from another batch, whose outputs are other tensors.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from segmerge.aggregation import GMD
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> step = TrainStep(net, opt, GMD(), strategy="loop")
        >>> y = net(torch.ones(4, 2)).squeeze(1)
        >>> losses = SimpleNamespace(names=["a", "b"], losses=torch.stack([y.mean(), y.pow(2).mean()]))
        >>> report = step.step(losses)
        >>> report.names, bool(report.skipped)
        (['a', 'b'], False)
        >>> out = TrainStep(net, opt, GMD(), jacobian="outputs")
        >>> y = net(torch.ones(4, 2))
        >>> losses = SimpleNamespace(names=["a", "b"], losses=torch.stack([y.mean(), y.pow(2).mean()]))
        >>> out.step(losses, outputs={"y": y}).backward_passes  # 2 through the losses, 1 through the net
        3
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        aggregator: Aggregator,
        strategy: Strategy = "auto",
        refresh_every: int = 1,
        clip_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        distributed: bool | None = None,
        fuse_disjoint: bool = True,
        jacobian: JacobianMode = "parameters",
    ) -> None:
        _check_arguments(aggregator, strategy, refresh_every, clip_norm, jacobian)
        module = model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            module = model.module
        self.model = module
        self.optimizer = optimizer
        self.aggregator = aggregator
        self.layout = ParamLayout([p for p in module.parameters() if p.requires_grad])
        self.strategy = strategy
        self.refresh_every = int(refresh_every)
        self.clip_norm = clip_norm
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.distributed = distributed
        self.fuse_disjoint = fuse_disjoint
        self.jacobian = jacobian
        self._guard = GuardedOptimizerStep(optimizer)
        self._batched_ok: bool | None = None  # None: not tried yet on this model
        self._buffers: dict[tuple[int, int], Tensor] = {}
        self._zbuf: Tensor | None = None  # output-space Jacobian (jacobian="outputs")
        dev, dt = self.layout.device, self.layout.dtype
        self._one = torch.ones((), dtype=dt, device=dev)
        self._zero = torch.zeros((), dtype=dt, device=dev)
        self.skipped = torch.zeros((), dtype=torch.int64, device=dev)
        self.steps = 0
        self._coef: dict[str, Tensor] = {}  # last coefficients, by objective name

    # -- configuration ----------------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"TrainStep(aggregator={self.aggregator!r}, strategy={self.strategy!r}, "
            f"refresh_every={self.refresh_every}, clip_norm={self.clip_norm!r}, "
            f"scaler={self.scaler is not None}, distributed={self.distributed!r}, "
            f"fuse_disjoint={self.fuse_disjoint}, jacobian={self.jacobian!r})"
        )

    def resolved_strategy(self) -> str:
        """The Jacobian strategy used on this model's device ("loop" or "batched")."""
        strategy = self.strategy
        if strategy == "auto":
            strategy = AUTO_STRATEGY.get(self.layout.device.type, "loop")
        if strategy == "batched" and self._batched_ok is False:
            return "loop"
        return strategy

    def _is_distributed(self) -> bool:
        if self.distributed is not None:
            return self.distributed
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized()

    def _buffer(self, rows: int, k: int) -> Tensor:
        # One flat buffer [rows x D | K losses]: one all_reduce carries everything.
        key = (rows, k)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(
                rows * self.layout.dim + k, dtype=self.layout.dtype, device=self.layout.device
            )
            if len(self._buffers) >= 4:  # exact + amortised shapes, a few K (dropout)
                self._buffers.pop(next(iter(self._buffers)))
            self._buffers[key] = buf
        return buf

    # -- the step ---------------------------------------------------------------------------
    def step(
        self,
        named_losses: _NamedLosses,
        reference_losses: _NamedLosses | Tensor | None = None,
        *,
        outputs: Mapping[str, Tensor] | Sequence[Tensor] | None = None,
    ) -> StepReport:
        """Aggregate the objectives' gradients into one update and step the optimizer.

        Args:
            named_losses: ``.names`` (K objective names) and ``.losses`` ((K,) tensor,
                ``torch.stack`` of the objective scalars, graph attached).
            reference_losses: for aggregators with ``needs_reference`` (Gradient-Blending's
                gradient estimator): the fused objective(s) on a validation batch, a tensor or
                named losses; the gradient of their sum is the reference row.
            outputs: with ``jacobian="outputs"`` (required there, ignored otherwise): the
                network's output tensors the objectives are computed from, e.g. the dict of
                named heads of the forward pass (per-modality, per-depth logits). None of them
                may be computed from another one (the update would count that path twice).

        Returns:
            :class:`StepReport`.
        """
        names = list(named_losses.names)
        losses = named_losses.losses
        if losses.dim() != 1 or losses.shape[0] != len(names):
            raise ValueError(
                f"TrainStep.step: losses must have shape ({len(names)},) for names {names}, "
                f"found {tuple(losses.shape)}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"TrainStep.step: objective names must be distinct, got {names}")
        roots = objective_roots(losses)
        reach = graph_reach(roots, self.layout.index)
        refresh = (
            self.refresh_every == 1
            or self.steps % self.refresh_every == 0
            or any(n not in self._coef for n in names)
        )
        seed = self._one if self.scaler is None else self.scaler.scale(self._one)
        if refresh and self.jacobian == "outputs":
            out = outputs_step(self, names, losses, roots, reach, seed, output_list(outputs))
        elif refresh:
            out = exact_step(self, names, losses, roots, reach, seed, reference_losses)
        else:
            out = amortised_step(self, names, losses, reach, seed)
        self.steps += 1
        return out

    def _finish(self, grad: Tensor, ok: Tensor, any_reach: int) -> tuple[Tensor, Tensor | None]:
        """Point ``.grad`` at views of the (D,) ``grad``, clip, guarded optimizer step.

        On a skipped step (``ok`` False) ``.grad`` may hold non-finite values: the guarded step
        leaves parameters and optimizer state untouched whatever the gradient, so no extra pass
        masks it.
        """
        for j, (p, view) in enumerate(zip(self.layout.params, self.layout.views(grad))):
            # A tensor no objective reaches keeps grad None, as after a plain backward(), so
            # optimizers skip it instead of applying momentum/weight decay to a zero gradient.
            p.grad = view if any_reach >> j & 1 else None
        grad_norm = None
        if self.clip_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.layout.params if p.grad is not None],
                self.clip_norm,
                error_if_nonfinite=False,
                foreach=True,
            )
        self._guard.step(ok)
        skipped = ~ok
        self.skipped += skipped
        if self.scaler is not None:
            self._update_scale(skipped)
        return skipped, grad_norm

    def _update_scale(self, found_inf: Tensor) -> None:
        # GradScaler.update() needs the inf checks its own unscale_() records; the gradients
        # here were unscaled by this step instead, so the same in-place update of the scale
        # and growth tracker is applied with our found_inf (what GradScaler.update() does).
        s = self.scaler
        scale, tracker = s._check_scale_growth_tracker("update")  # noqa: SLF001
        torch._amp_update_scale_(
            scale,
            tracker,
            found_inf.to(device=scale.device, dtype=torch.float32),
            s.get_growth_factor(),
            s.get_backoff_factor(),
            s.get_growth_interval(),
        )

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, skip counter and the amortised coefficients (for exact resume)."""
        return {
            "steps": self.steps,
            "skipped": self.skipped.detach().cpu(),
            "coefficients": {n: c.detach().cpu() for n, c in self._coef.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        dev, dt = self.layout.device, self.layout.dtype
        self.steps = int(state["steps"])
        self.skipped = state["skipped"].to(device=dev, dtype=torch.int64).reshape(())
        self._coef = {n: c.to(device=dev, dtype=dt) for n, c in state["coefficients"].items()}


def _check_arguments(
    aggregator: Aggregator,
    strategy: str,
    refresh_every: int,
    clip_norm: float | None,
    jacobian: str,
) -> None:
    """Raise on a ``TrainStep(...)`` argument outside its domain (the messages name it)."""
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            "TrainStep: aggregator must be a segmerge.aggregation.Aggregator (e.g. "
            f"build_aggregator('gmd')), got {type(aggregator).__name__}"
        )
    if jacobian not in JACOBIAN_MODES:
        raise ValueError(f"TrainStep: jacobian must be 'parameters' or 'outputs', got {jacobian!r}")
    if jacobian == "outputs" and aggregator.needs_reference:
        raise ValueError(
            f"TrainStep: jacobian='outputs' cannot serve {aggregator!r}: it needs the "
            "gradient of a validation batch, whose outputs are not this step's outputs; "
            "use jacobian='parameters'"
        )
    if strategy not in ("auto", "loop", "batched"):
        raise ValueError(
            f"TrainStep: strategy must be 'auto', 'loop' or 'batched', got {strategy!r}"
        )
    if int(refresh_every) < 1:
        raise ValueError(f"TrainStep: refresh_every must be >= 1, got {refresh_every!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"TrainStep: clip_norm must be > 0 or None, got {clip_norm!r}")
