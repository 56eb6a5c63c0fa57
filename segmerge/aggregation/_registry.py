"""The one registry of aggregation methods, and what is derived from it.

``AGGREGATORS`` maps each method name to the class (or, for ``blending``, the estimator
selector) that builds it. Everything else reads this dict: the command line's ``--aggregator``
choices and usage text, the study's method check, the configuration component of a method
(``_target_`` names the class, the hyper-parameters and their defaults come from its
signature) and the functional entry point :func:`aggregate`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from segmerge.hints import suggest

from ._blending import Blending
from ._core import Aggregator
from ._gmd import GMD
from ._gradcraft import GradCraft
from ._mean import Mean
from ._pcgrad import PCGrad
from ._sum import Sum
from ._torchjd import TORCHJD_AGGREGATORS

__all__ = [
    "AGGREGATORS",
    "aggregate",
    "aggregator_config",
    "aggregator_usage",
    "build_aggregator",
    "check_method",
    "hyperparameters",
    "register_aggregator",
]

# Explicit registry: method name -> class. Adding a method means adding a line here (or calling
# register_aggregator from the module that defines it).
AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "sum": Sum,
    "mean": Mean,
    "pcgrad": PCGrad,
    "gmd": GMD,
    "gradcraft": GradCraft,
    "blending": Blending,
    # torchjd's weightings through one bridge: upgrad, mgda, cagrad, imtlg, aligned_mtl,
    # dualproj, nashmtl, gradvac, fairgrad, pcd (segmerge/aggregation/_torchjd.py)
    **TORCHJD_AGGREGATORS,
}


def register_aggregator(name: str, cls: Callable[..., Aggregator]) -> None:
    """Add a method to :data:`AGGREGATORS` (lower-case name, not taken yet).

    Args:
        name: the method name users pass to ``--aggregator`` and :func:`build_aggregator`.
        cls: the class (a subclass of :class:`Aggregator`) or a class selecting one.

    Raises:
        ValueError: the name is taken or not lower case.
    """
    if name != name.lower() or not name:
        raise ValueError(f"register_aggregator: the name must be lower case, got {name!r}")
    if name in AGGREGATORS and AGGREGATORS[name] is not cls:
        raise ValueError(
            f"register_aggregator: {name!r} is already registered to {AGGREGATORS[name]!r}"
        )
    AGGREGATORS[name] = cls


def check_method(name: str) -> str:
    """The registered method name for ``name`` (case-insensitive), or a ValueError.

    Example:
        >>> check_method("GMD")
        'gmd'
    """
    key = str(name).lower()
    if key not in AGGREGATORS:
        raise ValueError(
            f"unknown aggregation method {name!r}{suggest(key, AGGREGATORS, 0.5, clause=True)} "
            f"(known: {', '.join(AGGREGATORS)})"
        )
    return key


def hyperparameters(name: str) -> dict[str, Any]:
    """The hyper-parameters of a method and their defaults, read from its class signature.

    Example:
        >>> hyperparameters("gradcraft")
        {'r': 0.5, 'e': 0.0, 'b': 0.0}
    """
    cls = AGGREGATORS[check_method(name)]
    params = inspect.signature(cls).parameters.values()
    return {
        p.name: None if p.default is inspect.Parameter.empty else p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def aggregator_config(name: str) -> dict[str, Any]:
    """The MONAI-bundle component of a method: ``_target_`` and every hyper-parameter default.

    Its keys are what ``python -m segmerge train --aggregator NAME --<hyper-parameter> V``
    sets.

    Example:
        >>> aggregator_config("gmd")
        {'_target_': 'segmerge.aggregation.GMD', 'order': None, 'seed': 0}
    """
    cls = AGGREGATORS[check_method(name)]
    return {"_target_": f"segmerge.aggregation.{cls.__name__}", **hyperparameters(name)}


def aggregator_usage() -> str:
    """One line per method with its hyper-parameters and defaults (the usage text)."""
    lines = []
    for name in AGGREGATORS:
        hp = " ".join(
            f"--{k} {'(default)' if v is None else json.dumps(v).strip(chr(34))}"
            for k, v in hyperparameters(name).items()
        )
        lines.append(f"  {name:<12} {hp or '(no hyper-parameters)'}")
    return "\n".join(lines)


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
    key = check_method(name)
    cls = AGGREGATORS[key]
    params = list(hyperparameters(key))
    for option in hparams:
        if option not in params:
            raise ValueError(
                f"{cls.__name__}: unknown hyper-parameter {option!r}{suggest(option, params, 0.5, clause=True)} "
                f"(accepted: {', '.join(params) or 'none'})"
            )
    if cls is Blending:  # the estimator selector, as a function call (see Blending.select)
        return Blending.select(**hparams)
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

    Compiles with ``torch.compile(fullgraph=True)`` for every method and order.

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
