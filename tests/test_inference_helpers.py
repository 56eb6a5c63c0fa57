"""Shared helpers of the inference/bundle/evaluate tests (this module holds no tests).

Stand-in networks follow the ``segmerge.nets`` contract (``forward(x, available=None)`` -> region
logits ``(B, 3, H, W, D)``) but are a single fixed convolution, so geometry tests run in
milliseconds and their outputs are known.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose
from torch import nn

from segmerge.conventions import BRATS2021_SUFFIX, MODALITIES
from segmerge.data import make_phantom_case
from segmerge.inference import BratsPredictor, load_bundle_config

SHIFT = 2
"""The stand-in looks SHIFT voxels ahead along network axis 0 (RAS x after reorientation)."""


class ShiftThresholdNet(nn.Module):
    """Region logits from FLAIR brightness ``SHIFT`` voxels further along axis 0.

    Deliberately not symmetric under flips/permutations of the voxel axes: a pipeline that forgets
    to reorient to RAS predicts a visibly different map on a flipped or permuted input.
    Thresholds grow from WT to ET so that the regions are nested.
    """

    def __init__(self, thresholds: tuple[float, float, float] = (0.6, 1.2, 1.8)) -> None:
        super().__init__()
        k = 2 * SHIFT + 1
        self.conv = nn.Conv3d(len(MODALITIES), 3, kernel_size=k, padding=SHIFT)
        with torch.no_grad():
            self.conv.weight.zero_()
            # cross-correlation: out[i] = 10 * x_flair[i + SHIFT] - 10 * threshold
            self.conv.weight[:, MODALITIES.index("flair"), k - 1, SHIFT, SHIFT] = 10.0
            self.conv.bias.copy_(-10.0 * torch.tensor(thresholds))
        self.seen_available: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
        if available is not None:
            self.seen_available.append(available.detach().cpu().clone())
        return self.conv(x)


@functools.lru_cache(maxsize=4)
def phantom(size: int = 32, seed: int = 0):
    """A cached in-memory phantom case (do not modify its arrays)."""
    return make_phantom_case(size=size, seed=seed)


def blob_case(
    shape: tuple[int, int, int] = (30, 34, 28), zooms: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A smooth, asymmetric synthetic case (images, RAS affine) for geometry tests.

    An off-centre anisotropic Gaussian blob on a faint background: thresholds of it are nested
    ellipsoids large enough that resampling changes only their rims, unlike the fine structures
    of a 32^3 phantom.
    """
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array([0.4, 0.55, 0.45]) * np.array(shape)
    sigma = np.array([6.0, 8.0, 5.0])
    r2 = sum(((grid[i] - centre[i]) / sigma[i]) ** 2 for i in range(3))
    blob = (0.05 + np.exp(-r2 / 2)).astype(np.float32)
    images = {m: blob * (1.0 + 0.1 * i) for i, m in enumerate(MODALITIES)}
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [-10.0, -20.0, 5.0]
    return images, affine


def write_case(
    root: Path,
    case_id: str,
    images: dict[str, np.ndarray],
    affine: np.ndarray,
    label: np.ndarray | None = None,
) -> Path:
    """Write one BraTS 2021 case folder ``root/case_id/case_id_<suffix>.nii.gz``."""
    folder = Path(root) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in images.items():
        path = folder / f"{case_id}_{BRATS2021_SUFFIX[key]}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), path)
    if label is not None:
        path = folder / f"{case_id}_seg.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(label, dtype=np.uint8), affine), path)
    return folder


def write_phantoms(root: Path, n: int, size: int = 32, with_label: bool = True) -> list[str]:
    """Write ``n`` phantom cases; return their ids."""
    ids = []
    for seed in range(n):
        case = phantom(size, seed)
        cid = f"case{seed:02d}"
        write_case(root, cid, case.images, case.affine, case.label if with_label else None)
        ids.append(cid)
    return ids


def permute_flip(
    array: np.ndarray, affine: np.ndarray, perm: tuple[int, int, int], flips: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Reorder voxel axes (and flip some) while keeping every voxel at the same world position."""
    out = np.transpose(array, perm)
    aff = affine.astype(np.float64).copy()
    aff[:, :3] = affine[:, list(perm)]
    for ax in flips:
        out = np.flip(out, ax)
        aff[:3, 3] += aff[:3, ax] * (out.shape[ax] - 1)
        aff[:3, ax] *= -1
    return np.ascontiguousarray(out), aff


def resample_nearest(
    array: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target_affine: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour lookup of ``array`` (on ``affine``) at every voxel of a target grid."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = grid @ target_affine[:3, :3].T + target_affine[:3, 3]
    src = np.rint((world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).astype(int)
    inside = np.all((src >= 0) & (src < np.array(array.shape)), axis=1)
    out = np.zeros(len(grid), dtype=array.dtype)
    out[inside] = array[tuple(src[inside].T)]
    return out.reshape(shape)


def make_predictor(
    network: nn.Module | None = None, drop: tuple[str, ...] = (), **overrides
) -> BratsPredictor:
    """Build the config's predictor with a stand-in network (default) and overrides.

    Args:
        network: module to use instead of ``network_def`` (default: a fresh ShiftThresholdNet).
        drop: class names of transforms removed from the preprocessing chain (negative controls).
        **overrides: config id -> value.
    """
    values = {"model_path": None, "device": "cpu", "roi_size": [32, 32, 32]}
    values.update(overrides)
    parser = load_bundle_config(overrides=values)
    parser["network_def"] = network if network is not None else ShiftThresholdNet()
    if drop:
        chain = parser.get_parsed_content("preprocessing").transforms
        parser["preprocessing"] = Compose([t for t in chain if type(t).__name__ not in drop])
        assert len(parser["preprocessing"].transforms) == len(chain) - len(drop), drop
    return parser.get_parsed_content("predictor")


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (to prove inputs are never modified)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Plain Dice of two boolean masks (1 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * (a & b).sum() / denom)
