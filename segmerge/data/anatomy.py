"""Real brain anatomy for phantoms: the MNI ICBM152 2009a template shipped inside nilearn's wheel.

The template (T1 plus grey/white-matter probability maps, 1 mm, RAS) is read straight from the
installed nilearn package (located with ``importlib.util.find_spec``; nilearn itself is never
imported), cropped to the brain's bounding box and resampled to a cube of ``size`` voxels. The
returned affine maps the resampled voxels to the template's world (mm) coordinates, so the voxel
spacing is the template's 1 mm scaled by the crop-to-cube factor of each axis.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

TEMPLATE_FILES: dict[str, str] = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
"""Template files inside ``nilearn/datasets/data``."""

_BRAIN_THRESHOLD = 0.2  # brain mask = T1 > 0.2 * max of the template T1


@dataclass(frozen=True)
class Anatomy:
    """Healthy anatomy resampled to a cube.

    Attributes:
        t1: T1 intensities scaled so that white matter is 1 (float32, zero outside the brain).
        gm: grey-matter fraction in [0, 1] (float32).
        wm: white-matter fraction in [0, 1] (float32).
        csf: CSF fraction, ``clip(mask - gm - wm, 0, 1)`` (float32).
        mask: brain mask (bool).
        depth: distance in mm from each brain voxel to the outside of the brain (float32).
        affine: (4, 4) voxel -> world (mm, RAS) matrix.
        spacing: voxel size in mm per axis.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    depth: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray


def template_dir() -> Path:
    """Folder of nilearn's bundled MNI152 files.

    Raises:
        FileNotFoundError: nilearn is not installed or lacks the template files.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "phantoms need the MNI152 template shipped in nilearn's wheel, but nilearn is not "
            "installed: pip install 'segmerge[data]' (or nilearn>=0.10)"
        )
    folder = Path(spec.origin).parent / "datasets" / "data"
    missing = [f for f in TEMPLATE_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn at {folder} lacks the template files {missing}")
    return folder


@functools.lru_cache(maxsize=2)
def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = template_dir()
    arrays = [np.asarray(nib.load(folder / TEMPLATE_FILES[k]).dataobj) for k in ("t1", "gm", "wm")]
    affine = nib.load(folder / TEMPLATE_FILES["t1"]).affine
    return arrays[0], arrays[1], arrays[2], affine


@functools.lru_cache(maxsize=4)
def mni_anatomy(size: int = 96) -> Anatomy:
    """The template's brain bounding box resampled (trilinear) to ``size``³ voxels; cached.

    Args:
        size: edge length of the output cube in voxels (>= 16).

    Returns:
        The resampled anatomy with its affine. Arrays are read-only: copy before editing.
    """
    if int(size) < 16:
        raise ValueError(f"phantom size must be at least 16 voxels, got {size}")
    size = int(size)
    t1, gm, wm, affine = _template()
    brain = t1 > _BRAIN_THRESHOLD * t1.max()
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0)
    # Output voxel j samples template index lo + j * step, so voxel corners map onto the box ends.
    step = (hi - lo) / (size - 1)
    out_shape = (size, size, size)

    def resample(a: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(
            a.astype(np.float32), step, offset=lo.astype(float), output_shape=out_shape, order=1
        )

    t1_r, gm_r, wm_r = resample(t1), resample(gm) / 255.0, resample(wm) / 255.0
    mask = t1_r > _BRAIN_THRESHOLD * float(t1.max())
    wm_level = float(np.median(t1_r[mask & (wm_r > 0.9)]))
    t1_r = np.where(mask, t1_r / wm_level, 0.0).astype(np.float32)
    gm_r = np.where(mask, np.clip(gm_r, 0, 1), 0.0).astype(np.float32)
    wm_r = np.where(mask, np.clip(wm_r, 0, 1), 0.0).astype(np.float32)
    csf = np.clip(mask.astype(np.float32) - gm_r - wm_r, 0.0, 1.0).astype(np.float32)
    vox = np.diag(np.append(step, 1.0))
    vox[:3, 3] = lo
    new_affine = affine @ vox
    spacing = np.sqrt((new_affine[:3, :3] ** 2).sum(0))
    depth = ndimage.distance_transform_edt(mask, sampling=spacing).astype(np.float32)
    arrays = {"t1": t1_r, "gm": gm_r, "wm": wm_r, "csf": csf, "mask": mask, "depth": depth}
    for a in arrays.values():
        a.setflags(write=False)
    return Anatomy(**arrays, affine=new_affine, spacing=spacing)
