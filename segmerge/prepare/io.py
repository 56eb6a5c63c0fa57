"""Finding and reading the raw sequences of a case: image files and DICOM series, checked.

A raw case is a folder holding, per sequence, either an image file SimpleITK reads (NIfTI,
NRRD, MHA/MHD) or a folder with one DICOM series. Every problem is raised as
:class:`PrepareError` naming the case and the file, before any pixel is processed: a DICOM
folder with several series, missing or duplicated slices, a non-MR or single-slice series, an
unreadable file, a name that matches no sequence, two inputs for one sequence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segmerge.prepare.naming import LABEL_KEY, match_name

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""Image files read as one sequence each."""

_IGNORED = {"qc", "transforms"}
_TAG_MODALITY = "0008|0060"
_TAG_DESCRIPTION = "0008|103e"
_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"


class PrepareError(ValueError):
    """A raw case cannot be prepared; the message names the case and the file."""


@dataclass
class RawSequence:
    """One raw input of a case.

    Attributes:
        key: ``flair``, ``t1``, ``t1ce``, ``t2`` or ``seg``.
        path: the image file or DICOM folder.
        kind: ``"file"`` or ``"dicom"``.
        matched: the (normalised) name that identified it.
        by: what was matched: ``"file name"``, ``"folder name"`` or ``"SeriesDescription"``.
        files: the DICOM files of the series, sorted along the slice normal.
    """

    key: str
    path: Path
    kind: str
    matched: str
    by: str
    files: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        """JSON-ready summary for the QC report."""
        out = {"source": str(self.path), "kind": self.kind, "matched": self.matched, "by": self.by}
        if self.files:
            out["slices"] = len(self.files)
        return out


@dataclass
class RawCase:
    """The inputs of one raw case folder."""

    case_id: str
    folder: Path
    sequences: dict[str, RawSequence]


def _strip_image_ext(name: str) -> str | None:
    low = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return None


def _where(case_id: str, path: Path) -> str:
    return f"case {case_id}: {path}"


def dicom_series(folder: Path, case_id: str) -> tuple[list[str], dict[str, str]]:
    """Check the one DICOM series in ``folder`` and return its sorted files and first header.

    Headers only are read (``ReadImageInformation``). Slices are sorted by their position
    along the normal of ImageOrientationPatient; a gap larger than 1.5 median spacings is a
    missing slice, a gap under 1 % of it a duplicated one.

    Raises:
        PrepareError: no series, several series, extra non-series files, a non-MR modality,
            fewer than 3 slices, mixed orientations, missing or duplicated slices.
    """
    where = _where(case_id, folder)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    files_present = sorted(
        str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
    )
    if not ids:
        raise PrepareError(f"{where}: no readable DICOM series in this folder")
    if len(ids) > 1:
        raise PrepareError(
            f"{where}: {len(ids)} DICOM series mixed in one folder (SeriesInstanceUIDs "
            f"{', '.join(ids)}); put each series in its own folder"
        )
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    stray = sorted(set(files_present) - set(files))
    if stray:
        raise PrepareError(
            f"{where}: {Path(stray[0]).name} is not part of the DICOM series "
            f"(unreadable or another kind of file; {len(stray)} such file(s))"
        )
    headers = []
    reader = sitk.ImageFileReader()
    for f in files:
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise PrepareError(f"case {case_id}: {f}: unreadable DICOM file: {err}") from err
        headers.append({k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()})
    first = headers[0]
    modality = first.get(_TAG_MODALITY, "").strip()
    if modality != "MR":
        raise PrepareError(
            f"{where}: DICOM Modality is {modality or 'missing'!r}, not 'MR' (only MR series "
            "can be prepared)"
        )
    if len(files) < 3:
        raise PrepareError(
            f"{where}: the series has {len(files)} slice(s); a 3D volume needs at least 3 (a 2D "
            "image or a localiser?)"
        )
    try:
        orients = {
            tuple(round(float(v), 4) for v in h[_TAG_ORIENTATION].split("\\")) for h in headers
        }
        pos = np.array([[float(v) for v in h[_TAG_POSITION].split("\\")] for h in headers])
    except (KeyError, ValueError) as err:
        raise PrepareError(
            f"{where}: slices lack ImagePositionPatient/ImageOrientationPatient ({err})"
        ) from err
    if len(orients) != 1:
        raise PrepareError(f"{where}: slices with {len(orients)} different orientations")
    o = np.array(next(iter(orients)))
    normal = np.cross(o[:3], o[3:])
    z = pos @ normal
    order = np.argsort(z, kind="stable")
    z = z[order]
    files = [files[i] for i in order]
    gaps = np.diff(z)
    step = float(np.median(gaps))
    if step <= 0:
        raise PrepareError(f"{where}: all slices at the same position")
    dup = np.flatnonzero(gaps < 0.01 * step)
    if dup.size:
        a, b = files[dup[0]], files[dup[0] + 1]
        raise PrepareError(
            f"{where}: duplicated slice at position {z[dup[0]]:.2f} mm ({Path(a).name} and "
            f"{Path(b).name})"
        )
    miss = np.flatnonzero(gaps > 1.5 * step)
    if miss.size:
        i = miss[0]
        n = int(round(gaps[i] / step)) - 1
        raise PrepareError(
            f"{where}: {n} missing slice(s) between {z[i]:.2f} and {z[i + 1]:.2f} mm (after "
            f"{Path(files[i]).name}; slice spacing {step:.2f} mm)"
        )
    return files, first


def check_image_header(path: Path, case_id: str) -> None:
    """Read an image file's header only and refuse unreadable, non-3D or 2D images.

    Raises:
        PrepareError: naming the case, the file and the rule broken.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        raise PrepareError(
            f"{_where(case_id, path)}: unreadable image file ({lines[-1] if lines else err})"
        ) from err
    size = reader.GetSize()
    if len(size) == 4 and size[3] == 1:
        size = size[:3]
    if len(size) != 3 or min(size) < 3:
        raise PrepareError(
            f"{_where(case_id, path)}: image of size {tuple(size)} is not a 3D volume (a 2D "
            "image, a single slice or a time series?)"
        )
    if reader.GetNumberOfComponents() != 1:
        raise PrepareError(
            f"{_where(case_id, path)}: {reader.GetNumberOfComponents()} components per voxel; "
            "a scalar volume is needed"
        )


def find_sequences(folder: Path, names: dict[str, list[str]]) -> RawCase:
    """Identify the sequences of one raw case folder (headers only).

    Args:
        folder: the case folder.
        names: the name mapping (:func:`segmerge.prepare.naming.load_names`).

    Raises:
        PrepareError: an input that matches no name, two inputs for one sequence, a bad DICOM
            series (see :func:`dicom_series`), or a folder with no input at all.
    """
    case_id = folder.name
    found: dict[str, RawSequence] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name in _IGNORED:
            continue
        if entry.is_dir():
            files, header = dicom_series(entry, case_id)
            key, matched, by = match_name(entry.name, names, case_id), entry.name, "folder name"
            desc = header.get(_TAG_DESCRIPTION, "").strip()
            if key is None and desc:
                key, matched, by = match_name(desc, names), desc, "SeriesDescription"
            seq = RawSequence(key or "", entry, "dicom", matched, by, files)
            label = f"folder name {entry.name!r}" + (
                f" / SeriesDescription {desc!r}" if desc else ""
            )
        else:
            stem = _strip_image_ext(entry.name)
            if stem is None:
                raise PrepareError(
                    f"{_where(case_id, entry)}: not an image file SimpleITK reads here "
                    f"({', '.join(IMAGE_EXTENSIONS)}) nor a DICOM folder"
                )
            key = match_name(stem, names, case_id)
            seq = RawSequence(key or "", entry, "file", stem, "file name")
            label = f"file name {stem!r}"
            if key is not None:
                check_image_header(entry, case_id)
        if key is None:
            raise PrepareError(
                f"{_where(case_id, entry)}: {label} matches no sequence name; known names: "
                + "; ".join(f"{k}: {', '.join(v[:4])}..." for k, v in names.items())
                + " (give your own with --names FILE.json)"
            )
        if key in found:
            raise PrepareError(
                f"case {case_id}: two inputs for {key}: {found[key].path.name} and {entry.name}"
            )
        found[key] = seq
    if not any(k != LABEL_KEY for k in found):
        raise PrepareError(f"case {case_id}: {folder} holds no sequence")
    return RawCase(case_id, folder, found)


def read_sequence(seq: RawSequence, case_id: str) -> sitk.Image:
    """Read one sequence as a 3D float32 image (labels as uint8).

    Raises:
        PrepareError: an unreadable file, or an image that is not 3D scalar.
    """
    try:
        if seq.kind == "dicom":
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(seq.files)
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(seq.path))
    except RuntimeError as err:
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise PrepareError(f"{_where(case_id, seq.path)}: unreadable image: {msg}") from err
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise PrepareError(
            f"{_where(case_id, seq.path)}: a {img.GetDimension()}D image with "
            f"{img.GetNumberOfComponentsPerPixel()} component(s) per voxel; a 3D scalar volume "
            "is needed"
        )
    if min(img.GetSize()) < 3:
        raise PrepareError(
            f"{_where(case_id, seq.path)}: size {img.GetSize()} is 2D (an axis under 3 voxels)"
        )
    pixel = sitk.sitkUInt8 if seq.key == LABEL_KEY else sitk.sitkFloat32
    return sitk.Cast(img, pixel)


def list_cases(root: str | os.PathLike) -> list[Path]:
    """The case folders of a raw input folder (sorted; hidden folders skipped).

    Raises:
        PrepareError: the folder does not exist or holds no case folder.
    """
    p = Path(root)
    if not p.is_dir():
        raise PrepareError(f"{p}: no such folder (expected one folder per patient)")
    cases = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not cases:
        raise PrepareError(f"{p}: no case folder inside (expected one folder per patient)")
    return cases
