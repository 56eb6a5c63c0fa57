"""The one "did you mean" of segmerge: :func:`suggest`.

A module of its own, importing only the standard library, so that the command-line entry
(``python -m segmerge``) and the pure-maths :mod:`segmerge.aggregation` use it without loading
MONAI; :mod:`segmerge.conventions` re-exports it with the BraTS names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["suggest"]


def suggest(
    name: object, valid: Iterable[object], cutoff: float = 0.6, *, clause: bool = False
) -> str:
    """`` (did you mean 'x'?)`` for the valid name closest to ``name``, or ``""`` when none is close.

    ``difflib`` similarity, ``cutoff`` in [0, 1]. ``clause=True`` spells it
    ``"; did you mean 'x'?"``, for a message whose own parenthesis follows
    (``unknown aggregation method 'gdm'; did you mean 'gmd'? (known: ...)``).

    Example:
        >>> suggest("flari", ["flair", "t1", "t1ce", "t2"])
        " (did you mean 'flair'?)"
        >>> suggest("gdm", ["gmd", "sum"], clause=True)
        "; did you mean 'gmd'?"
    """
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=cutoff)
    if not close:
        return ""
    return f"; did you mean {close[0]!r}?" if clause else f" (did you mean {close[0]!r}?)"
