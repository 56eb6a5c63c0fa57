"""Raw-looking test cases with known ground truth, built from segmerge's phantoms.

A phantom (skull-stripped, in MNI space) becomes a "scanner" case: padded, given a synthetic
CSF/skull/scalp shell and a head-wide bias field, then each sequence is acquired on its own
grid (anisotropic spacing, its own field of view) after its own random rigid head motion, and
written as NIfTI or as a DICOM series. The motions, the clean label and brain mask are kept, so
registration error, brain-mask overlap and segmentation quality can be measured after
``segmerge prepare``.
"""

from __future__ import annotations

import locale
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from segmerge.conventions import MODALITIES
from segmerge.data.phantom import make_phantom_case

# Shell intensities relative to white matter = 1: CSF rim, skull (dark), scalp (fat, bright T1).
SHELL = {
    "csf": {"flair": 0.15, "t1": 0.33, "t1ce": 0.35, "t2": 2.6},
    "skull": {"flair": 0.08, "t1": 0.08, "t1ce": 0.1, "t2": 0.08},
    "scalp": {"flair": 0.9, "t1": 1.3, "t1ce": 1.35, "t2": 0.9},
}
SHELL_MM = (2.0, 6.0, 11.0)  # outer edge of CSF rim, skull, scalp (distance from the brain)
RAW_NAMES = {"flair": "FLAIR", "t1": "T1_MPRAGE", "t1ce": "T1_GD", "t2": "T2"}


def array_to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A numpy volume indexed (i, j, k) with a nibabel (RAS) affine as a SimpleITK image (LPS)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    lin = np.asarray(affine, float)[:3, :3]
    spacing = np.sqrt((lin**2).sum(0))
    flip = np.diag([-1.0, -1.0, 1.0])  # RAS -> LPS
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in (flip @ (lin / spacing)).ravel()))
    img.SetOrigin(tuple(float(v) for v in flip @ np.asarray(affine, float)[:3, 3]))
    return img


@dataclass
class RawTruth:
    """Ground truth of a synthetic raw case.

    Attributes:
        motions: ``{sequence: transform}`` mapping a point of that sequence's scanner grid to
            the head (phantom) space.
        brain: head-space brain mask (uint8 sitk image, the phantom's brain).
        label: head-space BraTS label map (uint8 sitk image).
        clean: head-space clean images (skull-stripped phantom, no extra bias) per sequence.
        grids: ``{sequence: empty image with that sequence's geometry}``.
        seconds: time taken to build and write the case.
    """

    motions: dict[str, sitk.Transform]
    brain: sitk.Image
    label: sitk.Image
    clean: dict[str, sitk.Image]
    grids: dict[str, sitk.Image] = field(default_factory=dict)
    seconds: float = 0.0


def _rigid(rng: np.random.Generator, centre, max_deg: float, max_mm: float) -> sitk.Transform:
    tx = sitk.Euler3DTransform()
    tx.SetCenter(tuple(float(c) for c in centre))
    tx.SetRotation(*(float(np.deg2rad(a)) for a in rng.uniform(-max_deg, max_deg, 3)))
    tx.SetTranslation(tuple(float(t) for t in rng.uniform(-max_mm, max_mm, 3)))
    return tx


def _grid(head: sitk.Image, spacing, rng: np.random.Generator, margin_mm: float) -> sitk.Image:
    """An axis-aligned scanner grid covering the head (plus margin, shifted at random)."""
    sp = np.asarray(spacing, float)
    extent = np.asarray(head.GetSize()) * np.asarray(head.GetSpacing()) + 2 * margin_mm
    size = [int(np.ceil(e / s)) for e, s in zip(extent, sp)]
    direction = np.asarray(head.GetDirection()).reshape(3, 3)
    centre = np.asarray(
        head.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in head.GetSize()])
    ) + rng.uniform(-3, 3, 3)
    origin = centre - direction @ ((np.asarray(size) - 1) / 2 * sp)
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in sp))
    grid.SetDirection(head.GetDirection())
    grid.SetOrigin(tuple(float(v) for v in origin))
    return grid


def make_raw_case(
    folder: str | Path,
    size: int = 64,
    seed: int = 0,
    fmt: str = "nifti",
    reference: str = "t1ce",
    scale: float | None = None,
    max_deg: float = 10.0,
    max_mm: float = 10.0,
    with_seg: bool = True,
    sequences: tuple[str, ...] = MODALITIES,
) -> RawTruth:
    """Write one synthetic raw case into ``folder`` and return its ground truth.

    Args:
        folder: the case folder (created).
        size: phantom size (voxels per axis before padding).
        seed: phantom and motion seed.
        fmt: ``"nifti"`` (``<NAME>.nii.gz`` files) or ``"dicom"`` (one series folder each).
        reference: the sequence acquired isotropically (like a 3D T1ce); the others get
            0.9 x 0.9 x 3 mm (times ``scale``) axial slices.
        scale: multiplies the acquisition spacings; default: the phantom's mean spacing, so a
            small phantom gets proportionally coarse scans.
        max_deg: largest rotation about each axis (degrees).
        max_mm: largest translation along each axis (mm).
        with_seg: also write ``seg.nii.gz`` (the label map on the reference's grid).
        sequences: which sequences to write.
    """
    t0 = time.perf_counter()
    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"fmt must be 'nifti' or 'dicom', got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 14])
    case = make_phantom_case(size=size, seed=seed)
    sp = np.sqrt((case.affine[:3, :3] ** 2).sum(0))
    pad = [int(np.ceil(SHELL_MM[-1] / s)) + 1 for s in sp]
    shift = np.eye(4)
    shift[:3, 3] = -np.asarray(pad)
    affine = case.affine @ shift
    padw = [(p, p) for p in pad]
    brain = np.pad(case.images["t1"] > 0, padw)
    label = np.pad(case.label, padw)
    dist = ndimage.distance_transform_edt(~brain, sampling=sp)
    layers = {
        "csf": (dist > 0) & (dist <= SHELL_MM[0]),
        "skull": (dist > SHELL_MM[0]) & (dist <= SHELL_MM[1]),
        "scalp": (dist > SHELL_MM[1]) & (dist <= SHELL_MM[2]),
    }
    wm = np.pad(case.tissues["wm"] > 0.9, padw)
    # Head-wide bias: a smooth linear-plus-quadratic field of about +-15 %.
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in brain.shape], indexing="ij")
    coef = rng.uniform(-0.12, 0.12, 3)
    bias_log = sum(c * g for c, g in zip(coef, grids)) + 0.05 * (grids[0] ** 2 - grids[2] ** 2)
    head_imgs, clean = {}, {}
    for m in sequences:
        img = np.pad(case.images[m], padw)
        level = float(np.median(img[wm]))
        clean[m] = array_to_sitk(img.astype(np.float32), affine)
        noise = 0.02 * level
        for name, where in layers.items():
            img[where] = SHELL[name][m] * level * (1 + 0.05 * rng.standard_normal(where.sum()))
        img = ndimage.gaussian_filter(img, 0.6)
        img = img * np.exp(bias_log)
        img = np.abs(img + noise * rng.standard_normal(img.shape))
        head_imgs[m] = array_to_sitk(img.astype(np.float32), affine)
    head_brain = array_to_sitk(brain.astype(np.uint8), affine)
    head_label = array_to_sitk(label.astype(np.uint8), affine)
    first = head_imgs[sequences[0]]
    centre = first.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in first.GetSize()])
    scale = float(np.mean(sp)) if scale is None else float(scale)
    motions: dict[str, sitk.Transform] = {}
    out_grids: dict[str, sitk.Image] = {}
    for m in sequences:
        motion = _rigid(rng, centre, max_deg, max_mm)
        spacing = (1.0, 1.0, 1.0) if m == reference else (0.9, 0.9, 3.0)
        spacing = tuple(s * scale for s in spacing)
        grid = _grid(head_imgs[m], spacing, rng, margin_mm=12.0)
        src = head_imgs[m]
        # Partial volume of thick slices: blur along the slice axis before sampling.
        sigma = [max(1e-3, 0.4 * s) for s in spacing]
        src = sitk.SmoothingRecursiveGaussian(src, sigma)
        acq = sitk.Resample(src, grid, motion, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        motions[m] = motion
        out_grids[m] = grid
        if fmt == "nifti":
            sitk.WriteImage(acq, str(folder / f"{RAW_NAMES[m]}.nii.gz"))
        else:
            write_dicom_series(acq, folder / RAW_NAMES[m], RAW_NAMES[m], seed * 10 + len(motions))
    if with_seg:
        ref_seg = sitk.Resample(
            head_label,
            out_grids[reference],
            motions[reference],
            sitk.sitkNearestNeighbor,
            0,
            sitk.sitkUInt8,
        )
        sitk.WriteImage(ref_seg, str(folder / "seg.nii.gz"))
    return RawTruth(motions, head_brain, head_label, clean, out_grids, time.perf_counter() - t0)


def write_dicom_series(
    image: sitk.Image,
    folder: str | Path,
    description: str,
    series_number: int = 1,
    modality: str = "MR",
    prefix: str = "IM",
) -> list[Path]:
    """Write a 3D image as a DICOM series (one file per slice, int16 scaled to a peak of 4000).

    Following SimpleITK's "DICOM series from array" example: per-slice ImagePositionPatient,
    InstanceNumber and shared series tags, with ``KeepOriginalImageUIDOn``.

    Args:
        image: float volume.
        folder: the series folder (created).
        description: SeriesDescription (0008|103e).
        series_number: SeriesNumber.
        modality: Modality tag (``MR``; anything else is refused by ``prepare``).
        prefix: file-name prefix (``<prefix>0001.dcm`` ...).

    Returns:
        The written files in slice order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(image)
    peak = float(arr.max()) or 1.0
    vol = sitk.GetImageFromArray(np.round(arr * (4000.0 / peak)).astype(np.int16))
    vol.CopyInformation(image)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid_root = "1.2.826.0.1.3680043.2.1125"
    stamp = f"{int(series_number)}.{zlib.crc32(f'{folder}{prefix}'.encode())}"
    direction = image.GetDirection()
    tags = [
        ("0008|0060", modality),
        ("0008|103e", description),
        ("0020|0011", str(int(series_number))),
        ("0020|000d", f"{uid_root}.1.{stamp}"),
        ("0020|000e", f"{uid_root}.2.{stamp}"),
        ("0010|0010", "PHANTOM^SEGMERGE"),
        ("0010|0020", "SEGMERGE"),
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0020|0037", "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3]))),
    ]
    paths = []
    # ITK's GDCM writer switches the process locale to plain "C" and leaves it there, which makes
    # every later open() without an encoding ASCII-only: keep the caller's locale.
    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        paths = _write_slices(vol, image, folder, prefix, tags, uid_root, stamp, writer)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return paths


def _write_slices(vol, image, folder, prefix, tags, uid_root, stamp, writer) -> list[Path]:
    paths = []
    for k in range(vol.GetDepth()):
        sl = vol[:, :, k]
        for tag, value in tags:
            sl.SetMetaData(tag, value)
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in pos))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"{uid_root}.3.{stamp}.{k + 1}")
        sl.SetMetaData("0018|0050", f"{image.GetSpacing()[2]:.6f}")
        path = folder / f"{prefix}{k + 1:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(path)
    return paths


def evaluate_prepared(truth: RawTruth, case_dir: str | Path, reference: str = "t1ce") -> dict:
    """Registration error and brain-mask overlap of a prepared synthetic case.

    TRE: for head-space brain points ``h`` (every 20th brain voxel), the reference point is
    ``p = M_ref^-1(h)`` and the true point of sequence ``s`` is ``M_s^-1(h)``; the estimate is
    the saved transform ``T_s(p)``. Brain Dice: the phantom's brain resampled onto the prepared
    grid (grid point ``p`` -> head point ``M_ref(p)``) against ``prepare/brain_mask.nii.gz``.

    Returns:
        ``{"tre_mean": {seq: mm}, "tre_max": {seq: mm}, "brain_dice": float | None}``.
    """
    case_dir = Path(case_dir)
    side = case_dir / "prepare"
    brain = sitk.GetArrayViewFromImage(truth.brain).transpose(2, 1, 0)
    idx = np.argwhere(brain > 0)[::20]
    heads = [truth.brain.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in idx]
    to_ref = truth.motions[reference].GetInverse()
    pts = [to_ref.TransformPoint(h) for h in heads]
    tre_mean, tre_max = {}, {}
    for m, motion in truth.motions.items():
        if m == reference:
            continue
        est = sitk.ReadTransform(str(side / "transforms" / f"{m}_to_{reference}.tfm"))
        inv = motion.GetInverse()
        err = np.array(
            [
                np.linalg.norm(np.subtract(est.TransformPoint(p), inv.TransformPoint(h)))
                for p, h in zip(pts, heads)
            ]
        )
        tre_mean[m], tre_max[m] = float(err.mean()), float(err.max())
    dice = None
    if (side / "brain_mask.nii.gz").is_file():
        mask = sitk.ReadImage(str(side / "brain_mask.nii.gz"))
        gt = sitk.Resample(truth.brain, mask, truth.motions[reference], sitk.sitkNearestNeighbor)
        a = sitk.GetArrayViewFromImage(mask) > 0
        b = sitk.GetArrayViewFromImage(gt) > 0
        dice = float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))
    return {"tre_mean": tre_mean, "tre_max": tre_max, "brain_dice": dice}
