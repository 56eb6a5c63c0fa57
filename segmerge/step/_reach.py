"""Objective roots and reach: which parameter tensors each objective's graph touches.

algorithms.md: objective i *reaches* a parameter tensor when the tensor is in the autograd graph
of L_i, even if its gradient happens to be zero; a tensor is *shared* when every objective reaches
it. Both are decided per tensor. Here reach is read off the autograd graph itself: a post-order
walk from each objective's root node down ``next_functions`` to the ``AccumulateGrad`` nodes of
the leaves, one walk for all objectives (each node's reach is the union of its children's,
memoised, so shared sub-graphs are visited once). It is pure host-side bookkeeping on the graph
structure: no tensor is read and nothing synchronises with the device.

Reach sets are Python ints used as bit sets over the parameter list (bit ``j`` = parameter ``j``),
which makes unions, intersections and disjointness tests single integer operations.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = ["objective_roots", "graph_reach", "shared_bits"]

# Nodes whose inputs are the per-objective scalars, one per row of the (K,) losses tensor.
_ROW_NODES = ("StackBackward0", "CatBackward0")


def objective_roots(losses: Tensor) -> list[GradientEdge | None]:
    """Split a ``(K,)`` losses tensor into one graph root per objective.

    Differentiating ``losses[k]`` would not tell objectives apart: autograd runs the backward of
    the whole ``stack`` and hands zero gradients to every branch, so every objective would seem to
    reach everything. The per-objective roots are therefore the K input edges of the node that
    assembled the losses (``torch.stack`` of scalars, or ``torch.cat`` of one-element tensors).

    Args:
        losses: ``(K,)`` tensor, ``torch.stack`` of the K objective scalars (graph attached).

    Returns:
        K gradient edges (``None`` for a row that does not depend on any tensor requiring grad).

    Raises:
        ValueError: when the rows cannot be separated (the losses were not assembled by stack/cat
            as the last operation, e.g. multiplied by weights afterwards).
    """
    if losses.dim() != 1:
        raise ValueError(f"losses must have shape (K,), found {tuple(losses.shape)}")
    k = losses.shape[0]
    fn = losses.grad_fn
    if fn is None:
        return [None] * k
    if k == 1 and fn.name() not in _ROW_NODES:
        return [GradientEdge(fn, 0)]
    if fn.name() in _ROW_NODES and len(fn.next_functions) == k:
        return [None if node is None else GradientEdge(node, nr) for node, nr in fn.next_functions]
    raise ValueError(
        "cannot tell objectives apart: NamedLosses.losses must be built by torch.stack of the K "
        f"per-objective scalars as its last operation (found grad_fn {fn.name()} with "
        f"{len(fn.next_functions)} inputs for K={k}); apply row weights before stacking"
    )


def graph_reach(roots: Sequence[GradientEdge | None], param_index: dict[int, int]) -> list[int]:
    """Reach bit set of each root over the parameters in ``param_index``.

    Args:
        roots: one gradient edge (or ``None``) per objective, from :func:`objective_roots`.
        param_index: ``id(parameter) -> bit position``.

    Returns:
        One int per root; bit ``j`` is set when parameter ``j`` is in that root's graph.
    """
    memo: dict[object, int] = {}
    out = []
    for root in roots:
        out.append(0 if root is None else _node_reach(root.node, param_index, memo))
    return out


def _node_reach(start: object, param_index: dict[int, int], memo: dict[object, int]) -> int:
    # Iterative post-order walk (graphs of deep 3D U-Nets exceed Python's recursion limit).
    if start in memo:
        return memo[start]
    stack: list[tuple[object, bool]] = [(start, False)]
    while stack:
        node, expanded = stack.pop()
        if node in memo:
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if expanded:
            bits = 0
            for child in children:
                bits |= memo[child]
            variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold the leaf
            if variable is not None:
                j = param_index.get(id(variable))
                if j is not None:
                    bits |= 1 << j
            memo[node] = bits
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in memo)
    return memo[start]


def shared_bits(reach: Sequence[int]) -> int:
    """Bit set of the parameters reached by every objective (0 for no objectives)."""
    if not reach:
        return 0
    out = reach[0]
    for r in reach[1:]:
        out &= r
    return out
