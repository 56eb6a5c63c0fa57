"""Which raw file or DICOM series is which sequence: a configurable name mapping.

Names are compared after normalisation (upper case, every run of non-alphanumeric characters
turned into one ``_``, the case folder's name removed when it prefixes the name), so
``sub01_T1-Gd.nii.gz``, ``T1_GD`` and ``t1 gd`` all read ``T1_GD``. A name matches a sequence when
it equals one of its aliases, or when one of its aliases is a ``fnmatch`` pattern that fits
(``*FLAIR*``). Exact aliases are tried before patterns, so ``T2_FLAIR`` is FLAIR, not T2.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path

from segmerge.conventions import MODALITIES

LABEL_KEY = "seg"
"""Key of the optional label map carried along with the sequences."""

DEFAULT_NAMES: dict[str, list[str]] = {
    "flair": [
        "FLAIR",
        "T2_FLAIR",
        "T2FLAIR",
        "T2F",
        "T2W_FLAIR",
        "FLAIR_3D",
        "3D_FLAIR",
        "AX_FLAIR",
        "T2_TIRM",
        "TIRM",
        "DARK_FLUID",
        "*FLAIR*",
    ],
    "t1ce": [
        "T1C",
        "T1CE",
        "T1_CE",
        "T1_GD",
        "T1GD",
        "T1_C",
        "T1W_CE",
        "T1_POST",
        "T1_POSTCONTRAST",
        "T1_CONTRAST",
        "T1_KM",
        "T1_MPRAGE_GD",
        "T1_MPRAGE_POST",
        "MPRAGE_GD",
        "MPRAGE_POST",
        "T1W_GD",
        "T1_3D_GD",
        "*GD*",
        "*POST*",
        "*CONTRAST*",
        "*T1*CE*",
    ],
    "t1": [
        "T1",
        "T1N",
        "T1W",
        "T1_MPRAGE",
        "MPRAGE",
        "T1_PRE",
        "T1_NATIVE",
        "T1_3D",
        "T1_SE",
        "T1W_3D",
        "T1_TSE",
        "AX_T1",
        "*MPRAGE*",
        "*T1*",
    ],
    "t2": ["T2", "T2W", "T2_TSE", "T2_FSE", "T2W_TSE", "AX_T2", "T2_3D", "*T2*"],
    LABEL_KEY: ["SEG", "SEGMENTATION", "LABEL", "LABELS", "LABEL_MAP", "GT", "TRUTH"],
}
"""Default aliases per key (normalised form). Patterns (with ``*``) come after exact names."""


def normalise(name: str, case_id: str | None = None) -> str:
    """Upper-case ``name``, collapse separators to ``_`` and drop a leading case identifier.

    Args:
        name: file stem, folder name or DICOM SeriesDescription.
        case_id: the case folder's name, removed when the name starts with it.
    """
    norm = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")
    if case_id:
        prefix = re.sub(r"[^A-Z0-9]+", "_", case_id.upper()).strip("_")
        if prefix and norm.startswith(prefix + "_"):
            norm = norm[len(prefix) + 1 :]
    return norm


def load_names(path: str | os.PathLike | None) -> dict[str, list[str]]:
    """The name mapping: defaults, with the keys given in a JSON file replacing theirs.

    Args:
        path: JSON object ``{"flair": ["FLAIR", "DARKFLUID"], ...}`` or ``None`` for defaults.

    Raises:
        ValueError: unreadable JSON, an unknown key, or aliases that are not a list of strings.
    """
    names = {k: list(v) for k, v in DEFAULT_NAMES.items()}
    if path is None:
        return names
    p = Path(path)
    try:
        given = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{p}: cannot read the name mapping: {err}") from err
    if not isinstance(given, dict):
        raise ValueError(f"{p}: the name mapping must be a JSON object {{sequence: [names]}}")
    for key, aliases in given.items():
        if key not in names:
            raise ValueError(
                f"{p}: unknown sequence {key!r} in the name mapping; expected one of "
                f"{sorted(names)}"
            )
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"{p}: names of {key!r} must be a list of strings")
        names[key] = [normalise(a) if "*" not in a else a.upper() for a in aliases]
    return names


def match_name(name: str, names: dict[str, list[str]], case_id: str | None = None) -> str | None:
    """The key (``flair``, ``t1``, ``t1ce``, ``t2`` or ``seg``) a name denotes, or ``None``.

    Args:
        name: file stem, folder name or SeriesDescription.
        names: mapping from :func:`load_names`.
        case_id: case folder name (a prefix that is dropped).
    """
    norm = normalise(name, case_id)
    for key, aliases in names.items():
        if norm in (a for a in aliases if "*" not in a):
            return key
    for key, aliases in names.items():
        if any(fnmatch.fnmatchcase(norm, a) for a in aliases if "*" in a):
            return key
    return None


__all__ = ["DEFAULT_NAMES", "LABEL_KEY", "MODALITIES", "load_names", "match_name", "normalise"]
