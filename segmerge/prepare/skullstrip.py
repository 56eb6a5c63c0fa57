"""Brain extraction by registering the MNI152 template (nilearn's bundled copy) to the case.

The template is nilearn's skull-stripped ICBM152 2009a T1 (read from the installed wheel, no
download; see :func:`segmerge.data.anatomy.template_dir`); its brain mask is ``T1 > 0.2 max``
(the skull-stripped template is zero outside the brain). The template is registered to the
case (affine, Mattes MI, metric restricted to a dilated template brain so the case's skull and
scalp outside it carry no weight), optionally refined with a coarse B-spline, and its brain
mask is warped onto the case's grid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from segmerge.data.anatomy import TEMPLATE_FILES, template_dir
from segmerge.prepare.registration import RegistrationResult, register, sampler_seed

_BRAIN_THRESHOLD = 0.2
TEMPLATE_SPACING_MM = 2.0
"""The template is registered at 2 mm: enough for a mask, 8x fewer voxels than 1 mm."""


@functools.lru_cache(maxsize=1)
def template() -> tuple[sitk.Image, sitk.Image]:
    """The MNI152 T1 template at 2 mm (float32, WM ~ 1) and its brain mask (uint8)."""
    t1 = sitk.ReadImage(str(template_dir() / TEMPLATE_FILES["t1"]), sitk.sitkFloat32)
    size = [
        int(round(s * sp / TEMPLATE_SPACING_MM)) for s, sp in zip(t1.GetSize(), t1.GetSpacing())
    ]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((TEMPLATE_SPACING_MM,) * 3)
    grid.SetDirection(t1.GetDirection())
    shift = np.asarray(t1.GetDirection()).reshape(3, 3) @ (
        (TEMPLATE_SPACING_MM - np.asarray(t1.GetSpacing())) / 2
    )
    grid.SetOrigin(tuple(float(v) for v in np.asarray(t1.GetOrigin()) + shift))
    small = sitk.Resample(
        sitk.SmoothingRecursiveGaussian(t1, 0.5), grid, sitk.Transform(), sitk.sitkLinear
    )
    peak = float(sitk.GetArrayViewFromImage(small).max())
    mask = sitk.Cast(small > _BRAIN_THRESHOLD * peak, sitk.sitkUInt8)
    return sitk.Cast(small / peak, sitk.sitkFloat32), mask


@dataclass
class SkullStripResult:
    """Brain mask on the case grid plus how it was found."""

    mask: sitk.Image
    affine: RegistrationResult
    transform: sitk.Transform
    deformable: dict | None

    def describe(self) -> dict:
        """JSON-ready summary."""
        return {"affine": self.affine.describe(), "deformable": self.deformable}


def brain_mask(
    image: sitk.Image,
    deformable: bool = False,
    seed: int = 0,
    threads: int | None = None,
) -> SkullStripResult:
    """Brain mask of ``image`` from the registered template's mask.

    Args:
        image: a T1-like head image on the prepared grid (T1 or T1ce preferred: the template is
            T1-weighted, though mutual information tolerates other contrasts).
        deformable: refine the affine with a B-spline (control-point grid every ~60 mm).
        seed: metric sampling seed.
        threads: ITK threads.

    Returns:
        The mask (uint8 on ``image``'s grid), the affine result and the final transform
        (``image`` point -> template point).
    """
    t1, mask = template()
    roi = sitk.BinaryDilate(mask, [4, 4, 4])  # 8 mm of margin around the template brain
    # Metric on 4 and 2 mm only (the template is 2 mm); registering at the image's finest
    # level would cost time without sharpening a 2 mm template.
    fixed = image
    finest = min(image.GetSpacing())
    shrink = tuple(max(1, int(round(mm / finest))) for mm in (6.0, 3.0))
    affine = register(
        fixed,
        t1,
        kind="affine",
        shrink=shrink,
        smooth_mm=(4.0, 2.0),
        sampling=0.1,
        iterations=150,
        moving_mask=roi,
        seed=seed,
        threads=threads,
    )
    transform: sitk.Transform = affine.transform
    info = None
    if deformable:
        transform, info = _bspline(fixed, t1, roi, affine.transform, seed, threads)
    warped = sitk.Resample(
        sitk.Cast(mask, sitk.sitkFloat32), image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    out = sitk.Cast(warped >= 0.5, sitk.sitkUInt8)
    out = _largest_component(out)
    return SkullStripResult(out, affine, transform, info)


def _largest_component(mask: sitk.Image) -> sitk.Image:
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.Cast(cc == 1, sitk.sitkUInt8)


def _bspline(
    fixed: sitk.Image,
    moving: sitk.Image,
    roi: sitk.Image,
    affine: sitk.Transform,
    seed: int,
    threads: int | None,
) -> tuple[sitk.Transform, dict]:
    """B-spline refinement on top of ``affine`` (LBFGS-B, Mattes MI, 4 mm level only)."""
    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    mesh = [max(1, int(round(e / 60.0))) for e in extent]
    bs = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, sampler_seed(seed))
    reg.SetMetricMovingMask(roi)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=30)
    reg.SetShrinkFactorsPerLevel([2])
    reg.SetSmoothingSigmasPerLevel([2.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bs, inPlace=True)
    if threads is not None:
        reg.SetNumberOfThreads(int(threads))
    reg.Execute(fixed, moving)
    composite = sitk.CompositeTransform([affine, bs])
    return composite, {
        "metric": float(reg.GetMetricValue()),
        "iterations": int(reg.GetOptimizerIteration()),
        "mesh": mesh,
        "stop": reg.GetOptimizerStopConditionDescription(),
    }
