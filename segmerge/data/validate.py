"""Dataset validation: every problem of every case, found before any long work starts.

``python -m segmerge check-data PATH`` prints :func:`validate_dataset`'s list; training runs the
same function first and stops (or, with ``--skip-invalid``, drops the failing cases with
:func:`filter_valid`). Rules checked per case:

- ``file exists`` / ``file loads`` (a truncated ``.nii.gz`` fails to decompress);
- ``volume within MAX_VOXELS voxels`` and ``header's volume fits the file size``, checked on the
  header *before* any voxel is read (a 111-byte file declaring 800³ voxels must not allocate 2 GB);
- ``3-D volume`` (a trailing axis of length 1, ``(X, Y, Z, 1)``, is squeezed);
- ``shape matches`` and ``affine matches`` (within ``affine_tol`` mm) across modalities and label;
- ``label values in {0, 1, 2, ET}`` (a 3 in an ET = 4 dataset is named with its case);
- ``finite intensities`` (no NaN / inf) and ``sequence not empty`` (not all-zero or constant);
- ``modality present`` (unless incomplete data is allowed) and ``labelled`` (training/validation).

:func:`check_case` is the per-case check; ``check-data``, training (through
:func:`validate_dataset`) and ``predict`` (per case, before reading for the network) all run it, so
they agree on what is valid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from segmerge.conventions import MODALITIES, check_et_label, label_set
from segmerge.data.dataset import DatasetSpec

DATASET = "*"
"""``Problem.case`` of problems that concern the whole dataset."""

MAX_VOXELS = 2**28
"""Largest volume read (268 M voxels, 1 GiB as float32; a BraTS volume has 8.9 M)."""

_DEFLATE_MAX_RATIO = 1032
"""Deflate cannot compress better than about 1032:1 (258-byte matches coded in ~2 bits), so a
``.nii.gz`` of n bytes holds at most ~1032 n bytes of header and voxels."""

INCOMPLETE_HINT = (
    "incomplete data: --allow-missing for check-data and train; predict accepts absent sequences"
)


@dataclass(frozen=True)
class Problem:
    """One broken rule.

    Attributes:
        case: case identifier (``"*"`` for the whole dataset).
        file: the offending file (or modality name when it has no file).
        rule: the rule broken, in words.
        value: what was found.
    """

    case: str
    file: str
    rule: str
    value: str

    def __str__(self) -> str:
        return f"case {self.case}: {self.file}: {self.rule} — found {self.value}"


class _HeaderProblem(ValueError):
    def __init__(self, rule: str, value: str) -> None:
        super().__init__(f"{rule}: {value}")
        self.rule, self.value = rule, value


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"  # not reached


def open_volume(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI file and check its header against the file before any voxel is read.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The image (voxels not loaded; ``img.dataobj`` is lazy).

    Raises:
        ValueError: the header declares more than :data:`MAX_VOXELS` voxels, or more bytes than
            the file can hold (uncompressed: its size; gzipped: ~1032 times its size); the message
            names the rule and what the header declares.
        Exception: whatever nibabel raises for a file that is not NIfTI.
    """
    img = nib.load(str(path))
    shape = tuple(int(s) for s in img.header.get_data_shape())
    n_vox = int(np.prod(shape, dtype=np.float64)) if shape else 0
    dims = "×".join(map(str, shape))
    if n_vox > MAX_VOXELS:
        raise _HeaderProblem(
            f"volume within {MAX_VOXELS} voxels", f"header declares {dims} = {n_vox} voxels"
        )
    itemsize = img.header.get_data_dtype().itemsize
    needed = int(img.header.get_data_offset()) + n_vox * itemsize
    size = os.path.getsize(path)
    room = size * _DEFLATE_MAX_RATIO + 4096 if str(path).endswith(".gz") else size
    if needed > room:
        kind = "gzip-compressed" if str(path).endswith(".gz") else "uncompressed"
        raise _HeaderProblem(
            "header's volume fits the file size",
            f"header declares {dims} {img.header.get_data_dtype()} ({_fmt_bytes(needed)}) but the "
            f"{kind} file has {size} bytes",
        )
    return img


def load_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine of a 3-D NIfTI file, header checked first (:func:`open_volume`).

    A trailing axis of length 1, ``(X, Y, Z, 1)``, is squeezed (as MONAI's loaders do).
    """
    img = open_volume(path)
    data = np.asanyarray(img.dataobj)  # reads (and decompresses) the whole file
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return data, img.affine


def check_case(
    item: dict,
    split: str = "testing",
    et_label: int = 4,
    allow_missing: bool = True,
    affine_tol: float = 1e-3,
    labels: bool = True,
    resection_cavity: bool = False,
) -> list[Problem]:
    """Every problem of one case (empty list: valid); reads each listed file once.

    Args:
        item: case dict from :func:`segmerge.data.load_dataset`.
        split: ``"training"`` / ``"validation"`` cases must have a label.
        et_label: enhancing-tumour label value of the label maps.
        allow_missing: tolerate sequences that are not given (``None``); a listed path that does
            not exist is always a problem.
        affine_tol: largest tolerated affine difference (mm) between the case's files.
        labels: also check the label file (``predict`` reads only the sequences).
        resection_cavity: label 4 is the resection cavity (BraTS 2024+ adult glioma, et_label 3).

    Returns:
        The problems, each naming the case, the file, the rule and what was found.
    """
    if not labels:
        item = {k: v for k, v in item.items() if k != "label"}
    case = str(item.get("case_id", "?"))
    problems: list[Problem] = []

    def add(file: str, rule: str, value: str) -> None:
        problems.append(Problem(case, file, rule, value))

    loaded: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    keys = [*MODALITIES, "label"]
    for key in keys:
        path = item.get(key)
        if key == "label" and path is None:
            if split in ("training", "validation"):
                add("label", f"{split} cases have a label", "no label file")
            continue
        if path is None:
            if not allow_missing:
                add(key, f"every modality present ({INCOMPLETE_HINT})", "not listed")
            continue
        if not Path(path).is_file():
            add(str(path), "file exists", "no such file")
            continue
        try:
            data, affine = load_volume(str(path))
        except _HeaderProblem as e:
            add(str(path), e.rule, e.value)
            continue
        except Exception as e:  # nibabel raises many types for corrupt files
            add(str(path), "file loads", f"{type(e).__name__}: {e}".strip()[:200])
            continue
        if data.ndim != 3:
            add(str(path), "3-D volume", f"shape {data.shape}")
            continue
        loaded[key] = (data, affine, str(path))

    if not any(m in loaded for m in MODALITIES) and not any(
        p.rule.startswith("file") for p in problems
    ):
        add("-", "at least one modality available", "none")

    ref_key = next((k for k in keys if k in loaded), None)
    if ref_key is not None:
        ref_data, ref_aff, _ = loaded[ref_key]
        for key, (data, aff, path) in loaded.items():
            if key == ref_key:
                continue
            if data.shape != ref_data.shape:
                shape = "×".join(map(str, data.shape))
                ref_shape = "×".join(map(str, ref_data.shape))
                add(
                    path,
                    "shape matches the case's other files",
                    f"{key} {shape} but {ref_key} {ref_shape}",
                )
            elif not np.allclose(aff, ref_aff, atol=affine_tol, rtol=0):
                diff = float(np.abs(aff - ref_aff).max())
                add(
                    path,
                    f"affine matches the case's other files (±{affine_tol} mm)",
                    f"{key} differs from {ref_key} by {diff:.4g}",
                )

    for key, (data, _, path) in loaded.items():
        if key == "label":
            allowed = np.array(label_set(et_label, resection_cavity))
            values, counts = np.unique(data, return_counts=True)
            bad = ~np.isin(values, allowed)
            if bad.any():
                found = ", ".join(
                    f"{v:g} ({c} voxels)"
                    for v, c in zip(values[bad].tolist(), counts[bad].tolist())
                )
                add(
                    path,
                    f"label values in {{{', '.join(map(str, allowed))}}} (et_label={et_label})",
                    found,
                )
            continue
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            add(
                path,
                "finite intensities",
                f"{n_nan} NaN and {int(data.size - finite.sum()) - n_nan} inf voxels",
            )
            data = data[finite]
            if data.size == 0:
                continue
        lo, hi = float(data.min()), float(data.max())
        if lo == hi:
            add(path, "sequence not empty (all voxels equal)", f"every voxel = {lo:g}")
    return problems


def validate_dataset(
    spec_or_items: DatasetSpec | Sequence[dict],
    et_label: int | None = None,
    allow_missing: bool | None = None,
    affine_tol: float = 1e-3,
    progress: bool = False,
    workers: int = 1,
    resection_cavity: bool = False,
) -> list[Problem]:
    """Check every file of every case and return all problems (empty list: the dataset is valid).

    Args:
        spec_or_items: a :class:`DatasetSpec` or a list of case dicts (labels optional then).
        et_label: enhancing-tumour label value; default: the spec's, else 4.
        allow_missing: tolerate absent modalities; default: the spec's, else False.
        affine_tol: largest tolerated difference (mm) between affines of one case's files.
        progress: show a tqdm progress bar.
        workers: cases checked at once in threads (zlib decompression releases the GIL).
        resection_cavity: label 4 is the resection cavity (BraTS 2024+ adult glioma, et_label 3).

    Returns:
        The problems, in case order, each naming case, file, rule and the value found.
    """
    if isinstance(spec_or_items, DatasetSpec):
        spec = spec_or_items
        et_label = spec.et_label if et_label is None else et_label
        allow_missing = spec.allow_missing if allow_missing is None else allow_missing
        splits = [
            ("training", spec.training),
            ("validation", spec.validation),
            ("testing", spec.testing),
        ]
    else:
        spec = None
        splits = [("items", list(spec_or_items))]
    et_label = check_et_label(4 if et_label is None else et_label)
    label_set(et_label, resection_cavity)  # the scheme itself is valid
    allow_missing = bool(allow_missing)
    problems: list[Problem] = []
    if spec is not None:
        where = str(spec.source or spec.root)
        if spec.declared_et_label is not None and spec.declared_et_label != et_label:
            problems.append(
                Problem(
                    DATASET,
                    where,
                    f"declared et_label matches the configured {et_label}",
                    f"et_label={spec.declared_et_label}",
                )
            )
        if len(spec) == 0:
            problems.append(Problem(DATASET, where, "dataset has at least one case", "0 cases"))
    items = [(split, it) for split, its in splits for it in its]
    seen: dict[str, int] = {}
    for _, it in items:
        seen[str(it.get("case_id"))] = seen.get(str(it.get("case_id")), 0) + 1
    for cid, n in seen.items():
        if n > 1:
            problems.append(Problem(cid, "-", "case ids are unique", f"{n} cases named {cid}"))

    def check(pair: tuple[str, dict]) -> list[Problem]:
        return check_case(
            pair[1], pair[0], et_label, allow_missing, affine_tol, resection_cavity=resection_cavity
        )

    bar = tqdm(total=len(items), desc="check-data", unit="case", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        for found in pool.map(check, items):  # results in case order
            problems.extend(found)
            bar.update()
    bar.close()
    return problems


def filter_valid(
    items: Sequence[dict], problems: Sequence[Problem]
) -> tuple[list[dict], list[str]]:
    """Split items into the valid ones and the identifiers of the cases with problems.

    Used by ``train --skip-invalid``. Dataset-wide problems (case ``"*"``) are not case-specific
    and must be handled by the caller.

    Args:
        items: case dicts.
        problems: output of :func:`validate_dataset` for (a superset of) these items.

    Returns:
        ``(valid_items, skipped_case_ids)``.
    """
    bad = {p.case for p in problems if p.case != DATASET}
    valid = [it for it in items if str(it.get("case_id")) not in bad]
    skipped = [str(it.get("case_id")) for it in items if str(it.get("case_id")) in bad]
    return valid, skipped


def format_problems(problems: Sequence[Problem]) -> str:
    """One line per problem: ``case | file | rule | value`` (paths shortened to their last parts).

    Args:
        problems: output of :func:`validate_dataset`.
    """
    lines = []
    for p in problems:
        f = p.file
        if os.sep in f:
            f = os.path.join(*Path(f).parts[-2:])
        lines.append(f"{p.case} | {f} | {p.rule} | {p.value}")
    return "\n".join(lines)
