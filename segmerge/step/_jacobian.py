"""Per-objective gradients of all trainable parameters, written into one flat ``(K, D)`` buffer.

Two strategies (algorithms.md notation: J = [g_1; ...; g_K], rows zero on unreached tensors):

- ``loop``: one retained ``torch.autograd.grad`` per objective, started from that objective's own
  graph root (a :class:`~torch.autograd.graph.GradientEdge`) with ``allow_unused=True``. Objectives
  whose reach sets are pairwise disjoint (the per-modality heads each reach only their own encoder
  and auxiliary head) are differentiated together, in one backward of their sum: their gradients
  live on disjoint tensors, so each tensor's gradient belongs to the one member that reaches it.
  This cuts the backward passes from K to (#objectives that share tensors + #disjoint groups).
- ``batched``: one ``torch.autograd.grad(losses, params, grad_outputs=eye(K),
  is_grads_batched=True)``: autograd runs the backward once under ``vmap`` with a batch of K
  cotangents. Reach comes from the graph walk in :mod:`segmerge.step._reach`.

Both write straight into views of the caller's buffer with ``torch._foreach_copy_`` (no
concatenation, no per-step allocation of J).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = ["ParamLayout", "disjoint_groups", "jacobian_loop", "jacobian_batched", "gradient_into"]


class ParamLayout:
    """Flat layout of a list of parameter tensors: offsets, views, cached element masks.

    Args:
        params: the trainable parameters, in a fixed order (bit ``j`` of a reach set is
            ``params[j]``).
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        self.index = {id(p): j for j, p in enumerate(self.params)}
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.dim = self.offsets[-1]
        dtypes = {p.dtype for p in self.params}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self.device = self.params[0].device
        self._masks: dict[object, Tensor] = {}

    def __len__(self) -> int:
        return len(self.params)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of a ``(D,)`` vector shaped like each parameter."""
        return [
            flat[a:b].view_as(p) for a, b, p in zip(self.offsets, self.offsets[1:], self.params)
        ]

    def column_views(self, mat: Tensor) -> list[Tensor]:
        """Views of a ``(K, D)`` matrix shaped ``(K, *param.shape)`` for each parameter."""
        k = mat.shape[0]
        return [
            mat[:, a:b].view(k, *p.shape)
            for a, b, p in zip(self.offsets, self.offsets[1:], self.params)
        ]

    def element_mask(self, bits: int) -> Tensor:
        """``(D,)`` bool tensor on the parameters' device, True on the tensors in ``bits``.

        Cached per bit set: after the first step with a given reach pattern no host-to-device
        copy happens.
        """
        mask = self._masks.get(bits)
        if mask is None:
            per_tensor = torch.tensor([bool(bits >> j & 1) for j in range(len(self))])
            counts = torch.tensor(self.numels)
            mask = torch.repeat_interleave(per_tensor, counts).to(self.device)
            self._masks[bits] = mask
        return mask


def disjoint_groups(reach: Sequence[int]) -> list[list[int]]:
    """Greedy grouping of objectives into sets with pairwise disjoint reach.

    Objective order is kept; each objective joins the first group whose union of reach is
    disjoint from its own. Objectives that reach nothing get no group (their rows stay zero).

    Args:
        reach: one bit set per objective.

    Returns:
        Groups of objective indices.
    """
    groups: list[list[int]] = []
    unions: list[int] = []
    for k, bits in enumerate(reach):
        if bits == 0:
            continue
        for g, union in enumerate(unions):
            if union & bits == 0:
                groups[g].append(k)
                unions[g] |= bits
                break
        else:
            groups.append([k])
            unions.append(bits)
    return groups


def _write_row(
    layout: ParamLayout,
    row_views: list[Tensor],
    grads: Sequence[Tensor | None],
    keep: int | None = None,
    zero_rest: bool = True,
) -> int:
    """Copy ``grads`` into one row's views; None (or a tensor outside ``keep``) becomes zero.

    With ``zero_rest=False`` those views are left alone (the caller zeroed the row already).
    Returns the bit set of the tensors whose gradient was not None.
    """
    dst, src, zero = [], [], []
    got = 0
    for j, (view, g) in enumerate(zip(row_views, grads)):
        if g is not None:
            got |= 1 << j
        if g is None or (keep is not None and not keep >> j & 1):
            zero.append(view)
        else:
            dst.append(view)
            src.append(g)
    if dst:
        torch._foreach_copy_(dst, src)
    if zero and zero_rest:
        torch._foreach_zero_(zero)
    return got


def jacobian_loop(
    roots: Sequence[GradientEdge | None],
    layout: ParamLayout,
    out: Tensor,
    seed: Tensor,
    groups: Sequence[Sequence[int]] | None = None,
    reach: Sequence[int] | None = None,
    retain_graph: bool = False,
) -> list[int]:
    """Fill ``out`` (K, D) with per-objective gradients, one backward per group.

    Args:
        roots: per-objective graph roots (:func:`segmerge.step._reach.objective_roots`).
        layout: parameter layout of ``out``'s columns.
        out: ``(K, D)`` destination, overwritten.
        seed: 0-dim cotangent of every objective (1, or the AMP loss scale).
        groups: objective groups with pairwise disjoint reach (``reach`` required); None means one
            backward per objective.
        reach: reach bit sets from the graph walk; required with ``groups``.
        retain_graph: keep the graph after the last backward.

    Returns:
        Reach bit sets: from ``allow_unused`` (None = unreached) for single-objective backward
        passes, from ``reach`` for the members of fused groups.
    """
    k_total = len(roots)
    if groups is None:
        groups = [[k] for k in range(k_total)]
    elif reach is None:
        raise ValueError("jacobian_loop: groups need the reach bit sets")
    found = [0] * k_total
    # One memset of J, then only the reached slices are copied: far fewer per-tensor operations
    # (each a kernel launch on CUDA, a thread-pool region on CPU) than zeroing slice by slice.
    out.zero_()
    n_groups = len(groups)
    for gi, group in enumerate(groups):
        edges = [roots[k] for k in group if roots[k] is not None]
        if not edges:
            continue
        grads = torch.autograd.grad(
            edges,
            layout.params,
            grad_outputs=[seed] * len(edges),
            retain_graph=retain_graph or gi < n_groups - 1,
            allow_unused=True,
        )
        for k in group:
            views = layout.views(out[k])
            keep = None if len(group) == 1 or reach is None else reach[k]
            got = _write_row(layout, views, grads, keep, zero_rest=False)
            found[k] = got if keep is None else keep
    return found


def jacobian_batched(
    losses: Tensor, layout: ParamLayout, out: Tensor, seed: Tensor, retain_graph: bool = False
) -> None:
    """Fill ``out`` (K, D) with one vmapped backward of ``losses`` against the K unit cotangents.

    Args:
        losses: ``(K,)`` stacked objectives.
        layout: parameter layout of ``out``'s columns.
        out: ``(K, D)`` destination, overwritten.
        seed: 0-dim cotangent scale (1, or the AMP loss scale).
        retain_graph: keep the graph afterwards.

    Raises:
        RuntimeError: when an operation in the graph has no batching rule for ``vmap``.
    """
    k = losses.shape[0]
    cot = torch.eye(k, dtype=losses.dtype, device=losses.device) * seed
    grads = torch.autograd.grad(
        losses,
        layout.params,
        grad_outputs=cot,
        is_grads_batched=True,
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    torch._foreach_copy_(layout.column_views(out), list(grads))


def gradient_into(
    output: Tensor | GradientEdge | Sequence[GradientEdge],
    cotangent: Tensor | Sequence[Tensor],
    layout: ParamLayout,
    out: Tensor,
    retain_graph: bool = False,
) -> int:
    """One backward of ``output`` with ``cotangent`` written into the ``(D,)`` vector ``out``.

    Returns:
        Bit set of the tensors that received a gradient (allow_unused: None = unreached).
    """
    grads = torch.autograd.grad(
        output, layout.params, grad_outputs=cotangent, retain_graph=retain_graph, allow_unused=True
    )
    return _write_row(layout, layout.views(out), grads)
