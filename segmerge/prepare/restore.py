"""Map predictions on a prepared grid back to the original geometry of the reference sequence.

The prepared grid is the reference's physical space resampled and cropped
(:mod:`segmerge.prepare.pipeline`), so the way back is a nearest-neighbour resampling onto the
reference's original grid (read from ``prepare/qc.json``) with the identity transform; another
sequence's grid is reached through its saved rigid ``.tfm``. A NIfTI reference keeps its exact
header (sform/qform); a DICOM/NRRD/MHA reference gets the affine SimpleITK derives from the
scanner geometry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from segmerge.atomic import atomic_destination
from segmerge.prepare.pipeline import SIDECAR, grid_from_geometry


def load_qc(case_dir: str | os.PathLike) -> dict:
    """The QC report of a prepared case folder.

    Raises:
        FileNotFoundError: the folder was not written by ``segmerge prepare``.
    """
    path = Path(case_dir) / SIDECAR / "qc.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {case_dir} is not a case prepared by segmerge")
    return json.loads(path.read_text())


def to_original(
    prediction: str | os.PathLike,
    case_dir: str | os.PathLike,
    output: str | os.PathLike,
    sequence: str | None = None,
) -> Path:
    """Resample a label map from the prepared grid to a sequence's original grid (nearest).

    Args:
        prediction: label map on the prepared case's grid (e.g. ``predict``'s ``<case>.nii.gz``).
        case_dir: the prepared case folder (holds ``prepare/qc.json`` and the transforms).
        output: destination ``.nii.gz``.
        sequence: target sequence; default the reference.

    Returns:
        ``output``.
    """
    qc = load_qc(case_dir)
    ref_key = qc["geometry"]["reference"]["sequence"]
    target = sequence or ref_key
    if target not in qc["inputs"]:
        raise ValueError(f"{case_dir}: no {target} sequence in this case ({sorted(qc['inputs'])})")
    labels = sitk.ReadImage(str(prediction))
    grid = grid_from_geometry(qc["inputs"][target])
    tx: sitk.Transform = sitk.Transform(3, sitk.sitkIdentity)
    if target != ref_key:
        # The saved transform maps reference points to `target` points; resampling onto the
        # target grid needs the opposite direction.
        tx = sitk.ReadTransform(str(Path(case_dir) / qc["transforms"][target])).GetInverse()
    out = sitk.Resample(labels, grid, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    source = Path(qc["mapping"][target]["source"])
    name = source.name.lower()
    with atomic_destination(output, suffix=".nii.gz") as tmp:
        if qc["mapping"][target]["kind"] == "file" and name.endswith((".nii", ".nii.gz")):
            header = nib.load(str(source)).header.copy()
            header.set_data_dtype(np.uint8)
            header["descrip"] = b"segmerge BraTS labels (original geometry)"
            arr = sitk.GetArrayFromImage(out).transpose(2, 1, 0)  # (z,y,x) -> NIfTI (i,j,k)
            nib.save(nib.Nifti1Image(arr, None, header), tmp)
        else:
            sitk.WriteImage(out, tmp, useCompression=True)
    return Path(output)
