"""Dataset discovery: Decathlon-style datalists and BraTS 2021 / 2023 folders.

Every case becomes one dict keyed by modality *name*::

    {"case_id": "BraTS2021_00017", "flair": "/abs/.../BraTS2021_00017_flair.nii.gz",
     "t1": ..., "t1ce": ..., "t2": ..., "label": ".../BraTS2021_00017_seg.nii.gz"}

``label`` is absent for testing cases (no segmentation). With ``allow_missing=True`` a modality
whose file is absent is ``None`` (the transforms turn it into a zero channel and mark it
unavailable); without it the expected path is kept, and :func:`segmerge.data.validate_dataset`
reports the missing file together with every other problem. A file a datalist *lists* must exist
in every mode (``allow_missing`` covers sequences that are not listed, listed as ``null``, or
absent from a case folder): a wrong path is reported, never read as an absent sequence.

This module is the only reader of dataset folders and datalists: training, ``check-data``,
``predict``, evaluation and the bundle all go through :func:`load_dataset`. It enforces, where the
dataset is read, the one case-id rule (:data:`segmerge.conventions.CASE_ID_RULE`: case ids
become output file names), unique case ids, and known datalist keys.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segmerge.conventions import (
    BRATS2021_SUFFIX,
    BRATS2023_SUFFIX,
    CASE_ID_RULE,
    MODALITIES,
    case_id_problem,
    check_et_label,
    suggest,
)

LAYOUTS: dict[str, dict[str, str]] = {"brats2021": BRATS2021_SUFFIX, "brats2023": BRATS2023_SUFFIX}
"""Folder layouts: file-name suffix of each modality and of the label."""

_SEPARATOR = {"brats2021": "_", "brats2023": "-"}
_EXTENSIONS = (".nii.gz", ".nii")
# Datalist keys accepted as synonyms of the canonical names (BraTS 2023 suffixes, "seg").
_ALIASES = {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "seg": "label"}
_ITEM_KEYS = ("case_id", *MODALITIES, "label", *_ALIASES)
DATALIST_NAME = "dataset.json"


class DatasetError(ValueError):
    """A dataset cannot be read at all (no such path, empty folder, unreadable datalist, a case
    id that breaks the rule, two cases with one id)."""


class DatasetWarning(UserWarning):
    """Something in a datalist is ignored (an unknown key that names no file)."""


def check_case_id(case_id: object, where: str) -> str:
    """Return ``case_id`` if it follows :data:`~segmerge.conventions.CASE_ID_RULE`.

    Args:
        case_id: the identifier read from a datalist or a folder name.
        where: the datalist file and item (or folder) it comes from, for the message.

    Raises:
        DatasetError: naming ``where``, the value and the rule.
    """
    problem = case_id_problem(case_id)
    if problem is not None:
        raise DatasetError(f"{where}: case_id {case_id!r} {problem} ({CASE_ID_RULE})")
    return str(case_id)


@dataclass
class DatasetSpec:
    """A dataset split into training / validation / testing case dicts.

    Attributes:
        root: folder the paths were resolved against.
        layout: ``"datalist"``, ``"brats2021"`` or ``"brats2023"``.
        et_label: the enhancing-tumour label value the labels are expected to use.
        allow_missing: whether absent modality files are tolerated (then ``None`` in items).
        training: case dicts with labels used for training.
        validation: case dicts with labels held out for validation.
        testing: case dicts without labels.
        source: the file or folder given to :func:`load_dataset`.
        declared_et_label: ET label written in the datalist (``"et_label"``), if any.
        ignored: subfolders of a BraTS folder that hold no case files (not read as cases).
    """

    root: Path
    layout: str
    et_label: int = 4
    allow_missing: bool = False
    training: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    testing: list[dict] = field(default_factory=list)
    source: Path | None = None
    declared_et_label: int | None = None
    ignored: list[Path] = field(default_factory=list)

    def all_items(self) -> list[dict]:
        """Training, validation and testing items in that order."""
        return [*self.training, *self.validation, *self.testing]

    def __len__(self) -> int:
        return len(self.training) + len(self.validation) + len(self.testing)


def case_id_for(layout: str, index: int) -> str:
    """BraTS-style case identifier of the ``index``-th case of a layout.

    Args:
        layout: ``"brats2021"`` (``BraTS2021_00000``) or ``"brats2023"`` (``BraTS-GLI-00000-000``).
        index: case number (0-based).
    """
    _check_layout(layout)
    return f"BraTS2021_{index:05d}" if layout == "brats2021" else f"BraTS-GLI-{index:05d}-000"


def case_file_names(layout: str, case_id: str, ext: str = ".nii.gz") -> dict[str, str]:
    """File names of one case in a BraTS layout, keyed by ``MODALITIES`` and ``"label"``.

    Args:
        layout: ``"brats2021"`` or ``"brats2023"``.
        case_id: the case folder's name.
        ext: file extension.
    """
    _check_layout(layout)
    sep = _SEPARATOR[layout]
    return {key: f"{case_id}{sep}{suffix}{ext}" for key, suffix in LAYOUTS[layout].items()}


def split_cases(case_ids: list[str], val_fraction: float = 0.2, seed: int = 0) -> set[str]:
    """Deterministic validation subset: sort, shuffle with ``seed``, take ``round(f * n)``.

    At least one validation case when ``val_fraction > 0`` and there are two cases or more, and
    never all of them.

    Args:
        case_ids: identifiers of the labelled cases.
        val_fraction: fraction held out, in [0, 1).
        seed: shuffle seed.

    Returns:
        The identifiers of the validation cases.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(case_ids)
    n = len(ids)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng(int(seed)).permutation(n)
    return {ids[i] for i in order[:n_val]}


def load_dataset(
    path: str | os.PathLike,
    et_label: int = 4,
    allow_missing: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
    exclude: Sequence[str | os.PathLike] = (),
) -> DatasetSpec:
    """Read a dataset; the format is auto-detected.

    Accepted: a datalist JSON file (Decathlon style, modalities keyed by name, paths relative to
    the JSON's folder); a folder containing ``dataset.json``; a BraTS 2021 folder
    (``BraTS2021_00001/BraTS2021_00001_{flair,t1,t1ce,t2,seg}.nii.gz``); a BraTS 2023 folder
    (``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t2f,t1n,t1c,t2w,seg}.nii.gz``). Folder cases
    without a ``seg`` file become testing cases. When no validation list is given, labelled
    cases are split with :func:`split_cases`.

    Args:
        path: datalist file or dataset folder.
        et_label: enhancing-tumour label the labels should use (4 or 3).
        allow_missing: tolerate absent modality files (``None`` in the item) instead of keeping
            the expected path for :func:`validate_dataset` to report.
        val_fraction: fraction of labelled cases held out when no validation list exists.
        seed: seed of that split.
        exclude: folders never read as case folders (``predict`` passes its ``--output``, which
            may lie inside the input folder).

    Returns:
        The dataset description (no image is read here; see :func:`validate_dataset`).

    Raises:
        DatasetError: the path does not exist, the folder holds no case, or the datalist cannot
            be parsed.
    """
    et_label = check_et_label(et_label)
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".json":
            raise DatasetError(f"{p}: expected a datalist .json file or a dataset folder")
        return _from_datalist(p, et_label, allow_missing, val_fraction, seed)
    if (p / DATALIST_NAME).is_file():
        return _from_datalist(p / DATALIST_NAME, et_label, allow_missing, val_fraction, seed)
    skip = {Path(e).expanduser().absolute() for e in exclude}
    return _from_folder(p, et_label, allow_missing, val_fraction, seed, skip)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(
            f"unknown layout {layout!r}: expected one of {sorted(LAYOUTS)}{suggest(layout, LAYOUTS)}"
        )


def _find_file(folder: Path, stem: str) -> Path | None:
    for ext in _EXTENSIONS:
        if (folder / (stem + ext)).is_file():
            return folder / (stem + ext)
    return None


def _detect_case_layout(folder: Path) -> str | None:
    """Layout whose file names a case folder follows (by the files present, then by its name)."""
    scores = {}
    for layout, suffixes in LAYOUTS.items():
        sep = _SEPARATOR[layout]
        scores[layout] = sum(
            _find_file(folder, folder.name + sep + s) is not None for s in suffixes.values()
        )
    best = max(scores, key=scores.get)
    if scores[best] > 0:
        return best
    if re.fullmatch(r"BraTS20\d\d_\d+", folder.name):
        return "brats2021"
    if re.fullmatch(r"BraTS-[A-Za-z]+-\d+-\d+", folder.name):
        return "brats2023"
    return None


def _scan_cases(
    entries: list[Path], skip: set[Path]
) -> tuple[list[tuple[Path, str]], list[Path]]:
    cases, ignored = [], []
    for d in entries:
        if d.is_dir() and not d.name.startswith(".") and d.absolute() not in skip:
            layout = _detect_case_layout(d)
            if layout is not None:
                cases.append((d, layout))
            else:
                ignored.append(d)
    return cases, ignored


def _from_folder(
    root: Path, et_label: int, allow_missing: bool, val_fraction: float, seed: int, skip: set[Path]
) -> DatasetSpec:
    entries = [e for e in sorted(root.iterdir()) if e.absolute() not in skip]
    if not entries:
        raise DatasetError(f"{root}: empty folder (no dataset.json and no case folders)")
    cases, ignored = _scan_cases(entries, skip)
    if not cases:
        # Official archives unpack into one wrapper folder (e.g. BraTS2021_TrainingData/): look
        # one level down when exactly one subfolder holds cases.
        nested = [_scan_cases(sorted(d.iterdir()), skip) for d in entries if d.is_dir()]
        nested = [c for c in nested if c[0]]
        if len(nested) == 1:
            cases, ignored = nested[0]
    if not cases:
        raise DatasetError(
            f"{root}: no {DATALIST_NAME} and no BraTS case folders found (expected "
            "<case>/<case>_flair.nii.gz for BraTS 2021 or <case>/<case>-t2f.nii.gz for BraTS 2023)"
        )
    layouts = {lay for _, lay in cases}
    if len(layouts) > 1:
        by = {lay: [d.name for d, x in cases if x == lay][:3] for lay in layouts}
        raise DatasetError(
            f"{root}: case folders mix BraTS layouts {by}; use one layout per dataset"
        )
    layout = layouts.pop()
    labelled, unlabelled = [], []
    for d, _ in cases:
        item: dict = {"case_id": check_case_id(d.name, f"{root}: case folder")}
        sep = _SEPARATOR[layout]
        for key, suffix in LAYOUTS[layout].items():
            found = _find_file(d, d.name + sep + suffix)
            if key == "label":
                if found is not None:
                    item["label"] = str(found)
            elif found is not None:
                item[key] = str(found)
            else:
                item[key] = None if allow_missing else str(d / (d.name + sep + suffix + ".nii.gz"))
        (labelled if "label" in item else unlabelled).append(item)
    val_ids = split_cases([it["case_id"] for it in labelled], val_fraction, seed)
    return DatasetSpec(
        root=root,
        layout=layout,
        et_label=et_label,
        allow_missing=allow_missing,
        training=[it for it in labelled if it["case_id"] not in val_ids],
        validation=[it for it in labelled if it["case_id"] in val_ids],
        testing=unlabelled,
        source=root,
        ignored=ignored,
    )


def _case_id_from_path(path: str) -> str:
    name = Path(path).name
    for ext in _EXTENSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    for suffixes in LAYOUTS.values():
        for suffix in suffixes.values():
            for sep in "_-":
                if name.endswith(sep + suffix):
                    return name[: -len(sep + suffix)]
    return name


def _datalist_item(raw, where: str, folder: Path, allow_missing: bool) -> dict:
    if not isinstance(raw, dict):
        raise DatasetError(
            f"{where}: each case must be an object keyed by modality name, got {type(raw).__name__}"
        )
    if "image" in raw and not any(k in raw for k in MODALITIES):
        raise DatasetError(
            f"{where}: modalities must be keyed by name ({', '.join(MODALITIES)}), not given as an "
            "'image' list (channel order differs between projects)"
        )
    item: dict = {}
    for key, value in raw.items():
        if key not in _ITEM_KEYS:
            _unknown_key(key, value, where)
            continue
        key = _ALIASES.get(key, key)
        if key in item and key != "case_id":
            raise DatasetError(f"{where}: '{key}' is given twice (once under a BraTS 2023 name)")
        if key in (*MODALITIES, "label"):
            if value is None:
                item[key] = None
            elif not isinstance(value, str):
                raise DatasetError(f"{where}: '{key}' must be a file path string, got {value!r}")
            else:
                q = Path(value).expanduser()
                item[key] = str(q if q.is_absolute() else folder / q)
        elif key == "case_id" and value is not None:
            item["case_id"] = check_case_id(
                value if isinstance(value, str) else str(value), where
            )
    for m in MODALITIES:
        if m not in item:
            item[m] = None
    if "case_id" not in item:
        first = next((item[k] for k in (*MODALITIES, "label") if item.get(k)), None)
        if first is None:
            raise DatasetError(f"{where}: the case names no file at all")
        item["case_id"] = check_case_id(_case_id_from_path(first), f"{where} (from {first})")
    return {
        "case_id": item.pop("case_id"),
        **{k: item[k] for k in MODALITIES},
        **({"label": item["label"]} if item.get("label") else {}),
    }


def _unknown_key(key: object, value: object, where: str) -> None:
    """An unknown item key: an error when it looks like a misspelt sequence or names a NIfTI
    file (the file would otherwise be silently unused), else a :class:`DatasetWarning`."""
    valid = ", ".join(_ITEM_KEYS)
    hint = suggest(key, _ITEM_KEYS)
    names_file = isinstance(value, str) and value.lower().endswith((".nii", ".nii.gz"))
    if hint or names_file:
        raise DatasetError(f"{where}: unknown key {key!r}{hint}; valid keys: {valid}")
    warnings.warn(
        f"{where}: unknown key {key!r} ignored (valid keys: {valid})", DatasetWarning, stacklevel=4
    )


def _check_unique(splits: dict[str, list[dict]], path: Path) -> None:
    first: dict[str, str] = {}
    for split, items in splits.items():
        for i, item in enumerate(items):
            where = f"{split}[{i}]"
            cid = item["case_id"]
            if cid in first:
                raise DatasetError(
                    f"{path}: {first[cid]} and {where} both have case_id {cid!r} (case ids must be "
                    "unique: each names the case's output files)"
                )
            first[cid] = where


def _from_datalist(
    path: Path, et_label: int, allow_missing: bool, val_fraction: float, seed: int
) -> DatasetSpec:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable datalist ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not any(
        isinstance(data.get(k), list) for k in ("training", "validation", "testing")
    ):
        raise DatasetError(
            f"{path}: a datalist must be a JSON object with a 'training', 'validation' or 'testing' list"
        )
    folder = path.parent
    splits = {}
    for split in ("training", "validation", "testing"):
        raw = data.get(split) or []
        if not isinstance(raw, list):
            raise DatasetError(f"{path}: '{split}' must be a list, got {type(raw).__name__}")
        splits[split] = [
            _datalist_item(r, f"{path} {split}[{i}]", folder, allow_missing)
            for i, r in enumerate(raw)
        ]
    _check_unique(splits, path)
    training, validation = splits["training"], splits["validation"]
    if not validation and val_fraction > 0:
        val_ids = split_cases([it["case_id"] for it in training], val_fraction, seed)
        validation = [it for it in training if it["case_id"] in val_ids]
        training = [it for it in training if it["case_id"] not in val_ids]
    declared = data.get("et_label")
    return DatasetSpec(
        root=folder,
        layout="datalist",
        et_label=et_label,
        allow_missing=allow_missing,
        training=training,
        validation=validation,
        testing=splits["testing"],
        source=path,
        declared_et_label=int(declared) if isinstance(declared, int) else None,
    )
