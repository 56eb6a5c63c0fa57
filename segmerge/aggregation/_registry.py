"""The registry of aggregation methods and the functional entry point ``aggregate``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ._blending import Blending
from ._core import Aggregator
from ._gmd import GMD
from ._gradcraft import GradCraft
from ._mean import Mean
from ._pcgrad import PCGrad
from ._sum import Sum

__all__ = ["AGGREGATORS", "aggregate", "build_aggregator"]

# Explicit registry: method name -> class. Adding a method means adding a line here.
AGGREGATORS: dict[str, type[Aggregator]] = {
    "sum": Sum,
    "mean": Mean,
    "pcgrad": PCGrad,
    "gmd": GMD,
    "gradcraft": GradCraft,
    "blending": Blending,
}


def _suggest(value: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def build_aggregator(name: str, **hparams: Any) -> Aggregator:
    """Build a fresh aggregator by method name.

    Args:
        name: one of ``AGGREGATORS`` (case-insensitive).
        **hparams: the method's hyper-parameters (see each class).

    Raises:
        ValueError: unknown method name or hyper-parameter (with the closest valid one), or an
            invalid hyper-parameter value.

    Example:
        >>> build_aggregator("gmd")
        GMD(order='identity', seed=0)
    """
    key = str(name).lower()
    if key not in AGGREGATORS:
        raise ValueError(
            f"unknown aggregation method {name!r}{_suggest(key, AGGREGATORS)} "
            f"(known: {', '.join(AGGREGATORS)})"
        )
    cls = AGGREGATORS[key]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for option in hparams:
        if option not in params:
            raise ValueError(
                f"{cls.__name__}: unknown hyper-parameter {option!r}{_suggest(option, params)} "
                f"(accepted: {', '.join(params) or 'none'})"
            )
    return cls(**hparams)


def aggregate(
    method: str,
    J: Tensor,
    shared: Tensor | None = None,
    *,
    names: Sequence[str] | None = None,
    reference: Tensor | None = None,
    **hparams: Any,
) -> Tensor:
    """The (D,) update of a freshly built aggregator (no state carried between calls).

    Args:
        method: method name, e.g. ``"gmd"``, ``"gradcraft"``, ``"pcgrad"``.
        J: (K, D) Jacobian, one row per objective.
        shared: (D,) bool mask, True where every objective reaches the parameter (None: all).
        names: optional objective names of the rows.
        reference: (D,) validation gradient, for methods that need one.
        **hparams: the method's hyper-parameters, e.g. ``r=0.5`` or ``order=[2, 0, 1]``.

    Example:
        >>> import torch
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> aggregate("gmd", J)
        tensor([0.2924, 1.9006, 1.9006])
        >>> aggregate("gmd", J, shared=torch.tensor([True, False, False]))
        tensor([0.2924, 3.8012, 3.8012])
    """
    agg = build_aggregator(method, **hparams)
    return agg(J, shared=shared, names=names, reference=reference).update
