"""The three kinds of training step, as functions of a :class:`~segmerge.step.TrainStep`.

Moved out of :mod:`segmerge.step._train_step` unchanged (issue 11: no class over ~300 lines):
the exact step (per-objective Jacobian, all_reduce, aggregator), the amortised cheap step
(one backward of Σ c_k L_k with the last coefficients) and the output-space step
(``jacobian="outputs"``), with the Jacobian fill per strategy and the report of a refresh. Each
reads and updates the ``TrainStep``'s state (buffers, coefficients, skip counter) exactly as
its methods did; nothing here reads a tensor value on the host.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from segmerge.aggregation import AggregationResult, gramian
from segmerge.step._jacobian import (
    ParamLayout,
    disjoint_groups,
    gradient_into,
    jacobian_batched,
    jacobian_loop,
)
from segmerge.step._reach import shared_bits
from segmerge.step._report import StepReport, _NamedLosses

if TYPE_CHECKING:
    from segmerge.step._train_step import TrainStep

__all__ = [
    "all_reduce_mean",
    "amortised_step",
    "exact_step",
    "jacobian_into",
    "output_jacobian_into",
    "output_list",
    "outputs_step",
    "refresh_report",
]


def jacobian_into(
    ts: TrainStep,
    losses: Tensor,
    roots: list,
    reach: list[int],
    J: Tensor,
    seed: Tensor,
    retain: bool,
) -> tuple[list[int], int]:
    """Fill J; return (reach, number of backward passes)."""
    seed = seed.to(losses.dtype)  # cotangents must match the losses' dtype (autocast)
    if ts.resolved_strategy() == "batched":
        first = ts._batched_ok is None
        try:
            # The first try keeps the graph so that a vmap failure can fall back to loop.
            jacobian_batched(losses, ts.layout, J, seed, retain_graph=retain or first)
            ts._batched_ok = True
            return reach, 1
        except RuntimeError as err:
            if not first:
                raise
            ts._batched_ok = False
            warnings.warn(
                "TrainStep: the batched (vmap) Jacobian failed on this model "
                f"({str(err).splitlines()[0]}); using the loop strategy from now on",
                RuntimeWarning,
                stacklevel=3,
            )
    if ts.fuse_disjoint:
        groups = disjoint_groups(reach)
        found = jacobian_loop(
            roots, ts.layout, J, seed, groups=groups, reach=reach, retain_graph=retain
        )
        return found, len(groups)
    found = jacobian_loop(roots, ts.layout, J, seed, retain_graph=retain)
    return found, sum(r is not None for r in roots)


def exact_step(
    ts: TrainStep,
    names: list[str],
    losses: Tensor,
    roots: list,
    reach: list[int],
    seed: Tensor,
    reference_losses: _NamedLosses | Tensor | None,
) -> StepReport:
    k, d = len(names), ts.layout.dim
    agg = ts.aggregator
    use_ref = agg.needs_reference
    if use_ref and reference_losses is None:
        raise ValueError(
            f"TrainStep.step: {agg!r} needs a reference gradient: pass reference_losses= "
            "(the fused objective on a validation batch)"
        )
    rows = k + (1 if use_ref else 0)
    buf = ts._buffer(rows, k)
    J = buf[: k * d].view(k, d)
    reach, passes = jacobian_into(ts, losses, roots, reach, J, seed, retain=False)
    reference = None
    if use_ref:
        ref = reference_losses.losses if hasattr(reference_losses, "losses") else reference_losses
        reference = buf[k * d : rows * d]
        gradient_into(ref.sum(), seed.to(ref.dtype), ts.layout, reference)
        passes += 1
    if ts.scaler is not None:
        buf[: rows * d].div_(seed)  # unscale before the Gramian: scale-correct aggregation
    loss_buf = buf[rows * d :]
    loss_buf.copy_(losses.detach())
    if ts._is_distributed():
        all_reduce_mean(buf)
    shared = ts.layout.element_mask(shared_bits(reach))
    result = agg(J, shared=shared, names=names, reference=reference)
    update = result.update.to(ts.layout.dtype).contiguous()
    # Non-finite J (or reference) makes the Gramian non-finite: the aggregator reports it
    # (and zeroes the update, leaving its own state unchanged). The losses and the update
    # (overflow of c @ J) are checked with one reduction each, no (K, D) scan.
    ok = torch.isfinite(loss_buf.sum()) & torch.isfinite(update.sum()) & ~result.nonfinite
    any_reach = 0
    for r in reach:
        any_reach |= r
    skipped, grad_norm = ts._finish(update, ok, any_reach)
    return refresh_report(ts, names, loss_buf, result, ok, skipped, grad_norm, passes)


def refresh_report(
    ts: TrainStep,
    names: list[str],
    loss_buf: Tensor,
    result: AggregationResult,
    ok: Tensor,
    skipped: Tensor,
    grad_norm: Tensor | None,
    passes: int,
) -> StepReport:
    weights = result.weights
    # Coefficients for amortised steps; a skipped refresh keeps the previous ones (or 1).
    for i, n in enumerate(names):
        prev = ts._coef.get(n, ts._one)
        ts._coef[n] = torch.where(ok, weights[i].to(ts._one.dtype), prev)
    return StepReport(
        names=names,
        losses=loss_buf.clone(),
        weights=weights,
        norms=result.norms,
        cosine=result.cosine,
        alpha=result.alpha,
        n_conflicts=result.n_conflicts,
        skipped=skipped,
        skipped_total=ts.skipped.clone(),
        grad_norm=grad_norm,
        refreshed=True,
        backward_passes=passes,
    )


def amortised_step(
    ts: TrainStep, names: list[str], losses: Tensor, reach: list[int], seed: Tensor
) -> StepReport:
    k, d = len(names), ts.layout.dim
    c = torch.stack([ts._coef[n] for n in names])
    buf = ts._buffer(1, k)
    flat = buf[:d]
    found = gradient_into(losses, (c * seed).to(losses.dtype), ts.layout, flat)
    if ts.scaler is not None:
        flat.div_(seed)
    loss_buf = buf[d:]
    loss_buf.copy_(losses.detach())
    if ts._is_distributed():
        all_reduce_mean(buf)
    shared = shared_bits(reach)
    if shared:  # the aggregator's masked merge (a no-op factor 1 when nothing is shared)
        ts.aggregator.merge_(flat, ts.layout.element_mask(shared), k)
    # One reduction over gradient and losses: NaN/Inf propagate through the sum (a finite
    # sum overflowing float32 also counts as non-finite, which is what it is for Adam).
    ok = torch.isfinite(buf.sum())
    skipped, grad_norm = ts._finish(flat, ok, found)
    return StepReport(
        names=names,
        losses=loss_buf.clone(),
        weights=c,
        norms=None,
        cosine=None,
        alpha=None,
        n_conflicts=None,
        skipped=skipped,
        skipped_total=ts.skipped.clone(),
        grad_norm=grad_norm,
        refreshed=False,
        backward_passes=1,
    )


def output_jacobian_into(
    ts: TrainStep, losses: Tensor, roots: list, layout: ParamLayout, Z: Tensor, seed: Tensor
) -> int:
    """Fill Z (K, M) with the gradients of each objective at the outputs; return passes.

    These backward passes run through the losses only (autograd stops at the outputs), so
    "loop" costs K small passes and "batched" one vmapped pass; the graph is kept for the
    backward through the network.
    """
    seed = seed.to(losses.dtype)
    if ts.resolved_strategy() == "batched":
        try:
            jacobian_batched(losses, layout, Z, seed, retain_graph=True)
            return 1
        except RuntimeError as err:
            ts._batched_ok = False
            warnings.warn(
                "TrainStep: the batched (vmap) output Jacobian failed "
                f"({str(err).splitlines()[0]}); using the loop strategy from now on",
                RuntimeWarning,
                stacklevel=4,
            )
    jacobian_loop(roots, layout, Z, seed, retain_graph=True)
    return sum(r is not None for r in roots)


def outputs_step(
    ts: TrainStep,
    names: list[str],
    losses: Tensor,
    roots: list,
    reach: list[int],
    seed: Tensor,
    outs: list[Tensor],
) -> StepReport:
    k, d = len(names), ts.layout.dim
    olay = ParamLayout(outs)
    kdt = torch.float64 if ts.layout.dtype == torch.float64 else torch.float32
    Z = ts._zbuf
    if Z is None or Z.shape != (k, olay.dim) or Z.dtype != kdt:
        Z = ts._zbuf = torch.empty(k, olay.dim, dtype=kdt, device=ts.layout.device)
    passes = output_jacobian_into(ts, losses, roots, olay, Z, seed)
    if ts.scaler is not None:
        Z.div_(seed)  # unscale before the Gramian: scale-correct coefficients
    buf = ts._buffer(1, k + k * k)  # [update (D) | losses (K) | Gramian (K*K)]
    loss_buf = buf[d : d + k]
    loss_buf.copy_(losses.detach())
    G = buf[d + k :].view(k, k)
    G.copy_(gramian(Z))
    if ts._is_distributed():
        # Whole-batch Gramian: the batch-mean losses give Z_full = concat_r(Z_r) / W, so
        # G_full = Σ_r Z_r Z_rᵀ / W²; the losses are averaged as in the exact mode.
        world = torch.distributed.get_world_size()
        all_reduce_mean(buf[d:])
        G.mul_(1.0 / world)  # mean over ranks / W = sum / W²
    agg = ts.aggregator
    co = agg.coefficients(G, names)
    c = co.C.sum(0).to(kdt)
    # One backward of Σ c_k L_k through the network, started at the outputs with the
    # cotangent Σ c_k z_k (the losses' part of the graph is not run again).
    cot = (c * seed.to(kdt)) @ Z
    flat = buf[:d]
    found = gradient_into(
        outs,
        [v.to(o.dtype) for v, o in zip(olay.views(cot), outs)],
        ts.layout,
        flat,
    )
    passes += 1
    if ts.scaler is not None:
        flat.div_(seed)
    if ts._is_distributed():
        all_reduce_mean(flat)
    shared = shared_bits(reach)
    if shared:
        agg.merge_(flat, ts.layout.element_mask(shared), k)
    flat.masked_fill_(co.nonfinite, 0.0)
    ok = torch.isfinite(loss_buf.sum()) & torch.isfinite(flat.sum()) & ~co.nonfinite
    skipped, grad_norm = ts._finish(flat, ok, found)
    result = AggregationResult.from_gramian(flat, G, co, names)
    return refresh_report(ts, names, loss_buf, result, ok, skipped, grad_norm, passes)


def output_list(outputs: Mapping[str, Tensor] | Sequence[Tensor] | None) -> list[Tensor]:
    """The output tensors of ``step(outputs=)`` that carry a graph, or a clear error."""
    if outputs is None:
        raise ValueError(
            "TrainStep.step: jacobian='outputs' needs outputs=: the network's output tensors "
            "the objectives are computed from (e.g. the dict of named heads)"
        )
    items = list(outputs.values()) if isinstance(outputs, Mapping) else list(outputs)
    outs = [o for o in items if isinstance(o, Tensor) and o.requires_grad]
    if not outs:
        raise ValueError(
            "TrainStep.step: none of the outputs= tensors requires grad (pass the forward "
            "pass's outputs, not detached copies)"
        )
    return outs


def all_reduce_mean(buf: Tensor) -> None:
    """Average ``buf`` over ranks in place (one collective; gloo has no AVG, so SUM / world)."""
    dist = torch.distributed
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf.div_(dist.get_world_size())
