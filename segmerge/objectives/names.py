"""Objective (row) names: the one place their grammar lives.

Grammar (``<l>`` a depth index, ``.d0`` never written for modality and subset rows)::

    fused.d<l>                     the network's fused head at depth l (always suffixed)
    modality.<m>[.d<l>]            one modality's own head (``modality.flair``, ``modality.t2.d1``)
    subset.<m>+<m>...[.d<l>]       the prediction fused from a modality subset alone, modalities
                                   in ``MODALITIES`` order (``subset.flair+t1ce``,
                                   ``subset.flair+t1+t1ce+t2.d2``)

These names flow unchanged into losses, coefficient matrices, checkpoints and plots. MLflow
metric keys may not contain ``+``: there :func:`metric_key` writes it as ``-``
(``loss/subset.flair-t1ce``), the one translation. Modality names may not contain ``.``, ``+``
or ``-`` (they would make the names ambiguous).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from segmerge.conventions import MODALITIES, suggest

__all__ = [
    "FUSED",
    "MODALITY",
    "SUBSET",
    "ObjectiveName",
    "check_modality_names",
    "format_objective",
    "head_of",
    "metric_key",
    "modality_subsets",
    "objective_names",
    "ogr_head",
    "parse_name",
    "parse_objective",
    "subset_label",
    "subset_names",
    "suggest",
]

FUSED = "fused"
"""Head name of the fused (multimodal) output; its rows are ``fused.d0``, ``fused.d1``, ..."""
MODALITY = "modality"
"""Prefix of the per-modality auxiliary rows: ``modality.flair``, ..."""

SUBSET = "subset"
"""Prefix of the per-subset rows: ``subset.flair+t1ce``, ``subset.t2.d1``, ..."""

_FUSED_RE = re.compile(r"^fused\.d(\d+)$")
_DEPTH_RE = re.compile(r"^(.*)\.d(\d+)$")


class ObjectiveName(NamedTuple):
    """A parsed objective name.

    Attributes:
        kind: ``"fused"``, ``"modality"`` or ``"subset"``.
        modalities: the modality (one) or subset (one or more) named; empty for ``fused``.
        depth: deep-supervision depth (0 = full resolution).
    """

    kind: str
    modalities: tuple[str, ...]
    depth: int


def parse_name(name: str) -> tuple[str, int | str]:
    """Split a fused or depth-0 modality name into ``("fused", depth)`` or ``("modality", m)``.

    The two-part view of the older rows; :func:`parse_objective` reads the whole grammar.

    Args:
        name: ``fused.d<int>`` or ``modality.<name>``.
    """
    try:
        parsed = parse_objective(name)
    except ValueError:
        parsed = None
    if parsed is not None and parsed.kind == FUSED:
        return FUSED, parsed.depth
    if parsed is not None and parsed.kind == MODALITY and not parsed.depth:
        return MODALITY, parsed.modalities[0]
    raise ValueError(
        f"objective name {name!r} is neither 'fused.d<depth>' (e.g. 'fused.d0') "
        f"nor 'modality.<name>' (e.g. 'modality.flair')"
    )


def head_of(name: str) -> str:
    """Prediction head an objective belongs to.

    ``"fused"`` for ``fused.d*``, the modality for ``modality.<m>[.d<l>]``, the subset label
    (``"flair+t1ce"``) for ``subset.*``.

    Args:
        name: an objective name such as ``"fused.d1"`` or ``"modality.t2"``.

    Example:
        >>> head_of("fused.d2"), head_of("modality.t1ce"), head_of("subset.flair+t2.d1")
        ('fused', 't1ce', 'flair+t2')
    """
    parsed = parse_objective(name)
    if parsed.kind == FUSED:
        return FUSED
    return "+".join(parsed.modalities)


def objective_names(modalities: Sequence[str] = MODALITIES, depths: int = 3) -> list[str]:
    """All objective names of a network, in row order: fused depths first, then modalities.

    Args:
        modalities: modalities with an auxiliary head (empty for early-fusion networks).
        depths: number of fused deep-supervision heads (``fused.d0 .. fused.d{depths-1}``).

    Example:
        >>> objective_names(("flair", "t2"), depths=2)
        ['fused.d0', 'fused.d1', 'modality.flair', 'modality.t2']
    """
    if int(depths) < 0:
        raise ValueError(f"depths must be >= 0, got {depths!r}")
    return [f"{FUSED}.d{d}" for d in range(int(depths))] + [f"{MODALITY}.{m}" for m in modalities]


def check_modality_names(modalities: Sequence[str]) -> tuple[str, ...]:
    """Return the names as a tuple if they are non-empty, unique and free of ``.`` and ``+``."""
    mods = tuple(str(m) for m in modalities)
    if not mods or len(set(mods)) != len(mods):
        raise ValueError(f"modalities must be non-empty and unique, got {modalities!r}")
    for m in mods:
        if not m or any(c in m for c in ".+-") or re.fullmatch(r"d\d+", m):
            raise ValueError(
                f"modality name {m!r} must be non-empty, without '.', '+' or '-' and not 'd<int>' "
                "(objective names such as 'subset.flair+t1.d1' are built from it)"
            )
    return mods


def _ordered(subset: Iterable[str], modalities: Sequence[str]) -> tuple[str, ...]:
    names = list(subset)
    unknown = [m for m in names if m not in modalities]
    if unknown:
        raise ValueError(
            f"unknown modality {unknown[0]!r} in subset {names!r}; valid: {tuple(modalities)}"
            + suggest(unknown[0], modalities)
        )
    if not names or len(set(names)) != len(names):
        raise ValueError(f"a subset must list distinct modalities, at least one: got {names!r}")
    return tuple(m for m in modalities if m in names)


def format_objective(
    kind: str, modalities: Iterable[str] = (), depth: int = 0, order: Sequence[str] = MODALITIES
) -> str:
    """Build an objective name (the inverse of :func:`parse_objective`).

    Args:
        kind: ``"fused"``, ``"modality"`` or ``"subset"``.
        modalities: the modality (``kind="modality"``) or the subset's modalities (any order).
        depth: depth index; written as ``.d<l>`` for fused rows always, otherwise when > 0.
        order: modality order used to sort a subset (default ``MODALITIES``).

    Example:
        >>> format_objective("subset", ["t1ce", "flair"]), format_objective("modality", ["t2"], 1)
        ('subset.flair+t1ce', 'modality.t2.d1')
    """
    depth = int(depth)
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth!r}")
    mods = list(modalities)
    if kind == FUSED:
        if mods:
            raise ValueError(f"fused rows name no modality, got {mods!r}")
        return f"{FUSED}.d{depth}"
    suffix = f".d{depth}" if depth else ""
    if kind == MODALITY:
        if len(mods) != 1:
            raise ValueError(f"a modality row names exactly one modality, got {mods!r}")
        return f"{MODALITY}.{mods[0]}{suffix}"
    if kind == SUBSET:
        return f"{SUBSET}.{'+'.join(_ordered(mods, order))}{suffix}"
    raise ValueError(
        f"objective kind must be one of {(FUSED, MODALITY, SUBSET)}, got {kind!r}"
        + suggest(kind, (FUSED, MODALITY, SUBSET))
    )


def parse_objective(name: str, modalities: Sequence[str] | None = None) -> ObjectiveName:
    """Parse any objective name of the grammar (module docstring).

    Args:
        name: e.g. ``"fused.d1"``, ``"modality.flair"``, ``"subset.flair+t1ce.d2"``.
        modalities: when given, the named modalities must be among them (and a subset must list
            them in this order).

    Example:
        >>> parse_objective("subset.flair+t2.d1")
        ObjectiveName(kind='subset', modalities=('flair', 't2'), depth=1)
    """
    match = _FUSED_RE.match(name)
    if match:
        return ObjectiveName(FUSED, (), int(match.group(1)))
    prefix, _, rest = str(name).partition(".")
    depth = 0
    deep = _DEPTH_RE.match(rest)
    if deep:
        rest, depth = deep.group(1), int(deep.group(2))
    if prefix == MODALITY and rest and "+" not in rest and "." not in rest:
        mods: tuple[str, ...] = (rest,)
    elif prefix == SUBSET and rest and "." not in rest and all(rest.split("+")):
        mods = tuple(rest.split("+"))
    else:
        raise ValueError(
            f"objective name {name!r} is not 'fused.d<l>', 'modality.<m>[.d<l>]' or "
            "'subset.<m>+<m>...[.d<l>]' (e.g. 'fused.d0', 'modality.flair', 'subset.flair+t1ce')"
        )
    if modalities is not None:
        ordered = _ordered(mods, modalities)
        if ordered != mods:
            raise ValueError(
                f"objective name {name!r}: subset modalities must be in the order {tuple(modalities)}"
            )
    return ObjectiveName(prefix, mods, depth)


def subset_label(subset: Iterable[str], modalities: Sequence[str] = MODALITIES) -> str:
    """``"flair+t1ce"``: a subset's modalities joined by ``+`` in ``modalities`` order."""
    return "+".join(_ordered(subset, modalities))


def modality_subsets(modalities: Sequence[str] = MODALITIES) -> list[tuple[str, ...]]:
    """Every non-empty subset, by size then by channel order (15 for four modalities).

    Example:
        >>> [subset_label(s, ("a", "b", "c")) for s in modality_subsets(("a", "b", "c"))]
        ['a', 'b', 'c', 'a+b', 'a+c', 'b+c', 'a+b+c']
    """
    mods = tuple(modalities)
    return [c for r in range(1, len(mods) + 1) for c in itertools.combinations(mods, r)]


def subset_names(
    subsets: Sequence[Iterable[str]],
    depths: Sequence[int] = (0,),
    modalities: Sequence[str] = MODALITIES,
) -> list[str]:
    """Subset row names, depth-major (every subset at depth 0, then at depth 1, ...).

    Example:
        >>> subset_names([("flair",), ("flair", "t2")], depths=(0, 1))
        ['subset.flair', 'subset.flair+t2', 'subset.flair.d1', 'subset.flair+t2.d1']
    """
    subs = [tuple(s) for s in subsets]
    return [format_objective(SUBSET, s, d, modalities) for d in depths for s in subs]


def ogr_head(name: str, modalities: Sequence[str] = MODALITIES) -> str | None:
    """The prediction head whose held-out loss an objective measures (for OGR), or None.

    ``fused.d0`` and the full-set subset row at depth 0 measure ``"fused"``; ``modality.<m>`` and
    the singleton ``subset.<m>`` at depth 0 measure ``"<m>"``; every other row None.

    Example:
        >>> ogr_head("subset.flair+t1+t1ce+t2"), ogr_head("subset.t1"), ogr_head("fused.d1")
        ('fused', 't1', None)
    """
    try:
        parsed = parse_objective(name)
    except ValueError:
        return None
    if parsed.depth:
        return None
    if parsed.kind == FUSED:
        return FUSED
    if parsed.kind == SUBSET and set(parsed.modalities) == set(modalities):
        return FUSED
    if len(parsed.modalities) == 1:
        return parsed.modalities[0]
    return None


def metric_key(key: str) -> str:
    """An MLflow-valid metric key: ``+`` (not allowed by MLflow) written as ``-``.

    Example:
        >>> metric_key("loss/subset.flair+t1ce")
        'loss/subset.flair-t1ce'
    """
    return key.replace("+", "-")
