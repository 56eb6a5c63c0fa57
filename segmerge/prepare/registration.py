"""Rigid and affine registration, resampling and N4 bias correction with SimpleITK.

Conventions (ITK's): a registration of ``moving`` to ``fixed`` returns the transform that maps
a physical point of the *fixed* image to the corresponding point of the *moving* image, which
is exactly what ``sitk.Resample(moving, fixed_grid, transform)`` needs. Saved ``.tfm`` files
keep that meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk


@dataclass
class RegistrationResult:
    """Outcome of one registration.

    Attributes:
        transform: fixed-to-moving physical transform.
        metric: final Mattes mutual information value (negative; lower is better).
        iterations: optimiser iterations at the last level.
        stop: optimiser's stop condition.
        parameters: transform parameters (Euler: 3 angles in rad then 3 translations in mm).
        rotation_deg: rotation angle of the linear part (degrees).
        translation_mm: length of the translation at the fixed image's centre (mm).
    """

    transform: sitk.Transform
    metric: float
    iterations: int
    stop: str
    parameters: list[float] = field(default_factory=list)
    rotation_deg: float = 0.0
    translation_mm: float = 0.0

    def describe(self) -> dict:
        """JSON-ready summary."""
        return {
            "metric": self.metric,
            "iterations": self.iterations,
            "stop": self.stop,
            "parameters": self.parameters,
            "rotation_deg": self.rotation_deg,
            "translation_mm": self.translation_mm,
        }


def _motion(transform: sitk.Transform, point) -> tuple[float, float]:
    """Rotation angle (deg) of the linear part and displacement (mm) of ``point``."""
    tx = transform
    if isinstance(tx, sitk.CompositeTransform):
        tx = tx.GetBackTransform()
    matrix = np.asarray(getattr(tx, "GetMatrix", lambda: np.eye(3).ravel())()).reshape(3, 3)
    u, _, vt = np.linalg.svd(matrix)
    rot = u @ vt
    angle = math.degrees(math.acos(float(np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0))))
    moved = np.asarray(transform.TransformPoint(tuple(float(p) for p in point)))
    return angle, float(np.linalg.norm(moved - np.asarray(point)))


def image_centre(img: sitk.Image) -> tuple[float, float, float]:
    """Physical position of the centre of an image's grid."""
    idx = [(s - 1) / 2.0 for s in img.GetSize()]
    return img.TransformContinuousIndexToPhysicalPoint(idx)


def sampler_seed(seed: int) -> int:
    """The seed handed to SimpleITK's metric sampler for ``seed``.

    SimpleITK reads a sampling seed of 0 as ``sitkWallClock`` (a new random sample set every
    run), so seed ``s`` is passed as ``s + 1``: every seed, 0 included, is reproducible.
    """
    return int(seed) % (2**32 - 1) + 1


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    kind: str = "rigid",
    shrink: tuple[int, ...] = (4, 2, 1),
    smooth_mm: tuple[float, ...] = (4.0, 2.0, 0.0),
    sampling: float = 0.15,
    max_samples: int = 40000,
    min_step: float = 1e-2,
    refine_samples: int = 100000,
    iterations: int = 100,
    bins: int = 32,
    moving_mask: sitk.Image | None = None,
    fixed_mask: sitk.Image | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> RegistrationResult:
    """Multi-resolution Mattes mutual-information registration.

    Args:
        fixed: image defining the target space.
        moving: image to align to it.
        kind: ``"rigid"`` (Euler3D, 6 parameters) or ``"affine"`` (12 parameters, initialised by
            a similarity fit).
        shrink: shrink factor per level (coarse to fine).
        smooth_mm: Gaussian smoothing sigma per level in mm.
        sampling: fraction of fixed voxels sampled (random, seeded) for the metric.
        max_samples: at most this many samples at the finest level, half as many at each coarser
            one (the fraction shrinks on large levels: the metric's cost stays bounded while a
            1 mm level has millions of voxels).
        min_step: the optimiser stops when its step (in mm of physical shift) falls below this.
        refine_samples: rigid only: samples of a final full-resolution pass (0: none).
        iterations: maximum iterations per level.
        bins: histogram bins of the Mattes metric.
        moving_mask: only moving-image points inside this mask count in the metric.
        fixed_mask: only fixed-image points inside this mask count in the metric.

    The start aligns the images' centres of mass (moments).
        seed: sampling seed (fixed: the result is reproducible).
        threads: ITK threads of the method (default: ITK's global setting).

    Returns:
        The fixed-to-moving transform with the final metric and motion summary.
    """
    if kind not in ("rigid", "affine"):
        raise ValueError(f"registration kind must be 'rigid' or 'affine', got {kind!r}")
    if len(shrink) != len(smooth_mm):
        raise ValueError("shrink and smooth_mm need one entry per level")
    if kind == "rigid":
        base: sitk.Transform = sitk.Euler3DTransform()
    else:
        base = sitk.Similarity3DTransform()
    tx = sitk.CenteredTransformInitializer(
        fixed, moving, base, sitk.CenteredTransformInitializerFilter.MOMENTS
    )

    def run(start: sitk.Transform, levels_shrink, levels_smooth, lr=1.0, samples=None):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        voxels = [float(np.prod([max(1, s // f) for s in fixed.GetSize()])) for f in levels_shrink]
        # The finest level gets max_samples, each coarser one half as many as the next.
        budget = [max_samples / 2 ** (len(voxels) - 1 - i) for i in range(len(voxels))]
        if samples is not None:
            budget = [float(samples)] * len(voxels)
        reg.SetMetricSamplingPercentagePerLevel(
            [min(sampling, b / v) for b, v in zip(budget, voxels)], sampler_seed(seed)
        )
        reg.SetInterpolator(sitk.sitkLinear)
        if moving_mask is not None:
            reg.SetMetricMovingMask(moving_mask)
        if fixed_mask is not None:
            reg.SetMetricFixedMask(fixed_mask)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=lr,
            minStep=min_step,
            numberOfIterations=iterations,
            relaxationFactor=0.6,
            gradientMagnitudeTolerance=1e-6,
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(list(levels_shrink))
        reg.SetSmoothingSigmasPerLevel(list(levels_smooth))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(start, inPlace=False)
        if threads is not None:
            reg.SetNumberOfThreads(int(threads))
        out = reg.Execute(fixed, moving)
        return out, reg

    out, reg = run(tx, shrink, smooth_mm)
    if kind == "rigid" and refine_samples:
        # A last pass at full resolution with more samples and a smaller step: the random
        # sample set of one pass leaves a noisy optimum (up to ~1 mm with thick slices).
        out, reg = run(_unwrap(out), (1,), (0.0,), lr=0.3, samples=refine_samples)
    if kind == "affine":
        # Similarity (7 dof) at every level, then the full affine at the two finest levels.
        sim = _unwrap(out)
        aff = sitk.AffineTransform(3)
        aff.SetCenter(sim.GetCenter())
        aff.SetMatrix(sim.GetMatrix())
        aff.SetTranslation(sim.GetTranslation())
        out, reg = run(aff, shrink[-2:], smooth_mm[-2:])
    final = _unwrap(out)
    angle, shift = _motion(final, image_centre(fixed))
    return RegistrationResult(
        transform=final,
        metric=float(reg.GetMetricValue()),
        iterations=int(reg.GetOptimizerIteration()),
        stop=reg.GetOptimizerStopConditionDescription(),
        parameters=[float(p) for p in final.GetParameters()],
        rotation_deg=angle,
        translation_mm=shift,
    )


def _unwrap(tx: sitk.Transform) -> sitk.Transform:
    """The concrete transform held by the (composite) result of ``Execute``."""
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        if comp.GetNumberOfTransforms() == 1:
            tx = comp.GetNthTransform(0)
    return tx.Downcast()


def isotropic_grid(reference: sitk.Image, spacing: float) -> sitk.Image:
    """An empty image covering ``reference``'s field of view at isotropic ``spacing`` mm.

    The grid keeps the reference's direction cosines and corner; its size is the field of view
    (``size * spacing`` per axis) divided by ``spacing``, rounded.
    """
    if not float(spacing) > 0:
        raise ValueError(f"--spacing must be positive, got {spacing}")
    old_sp = np.asarray(reference.GetSpacing())
    extent = np.asarray(reference.GetSize()) * old_sp
    size = [max(1, int(round(e / spacing))) for e in extent]
    # The corner of the field of view (half a voxel before the first centre) stays in place.
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    corner = np.asarray(reference.GetOrigin()) - direction @ (old_sp / 2)
    origin = corner + direction @ (np.full(3, spacing) / 2)
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing((float(spacing),) * 3)
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(tuple(float(v) for v in origin))
    return grid


def resample(
    image: sitk.Image,
    grid: sitk.Image,
    transform: sitk.Transform | None = None,
    nearest: bool = False,
) -> sitk.Image:
    """``image`` sampled on ``grid`` through ``transform`` (grid point -> image point).

    Args:
        image: source image.
        grid: target geometry (its pixels are ignored).
        transform: grid-to-image physical transform; identity if ``None``.
        nearest: nearest-neighbour (label maps) instead of B-spline (float images, clamped to
            the source's range so no negative ringing appears).
    """
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    if nearest:
        return sitk.Resample(image, grid, tx, sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    out = sitk.Resample(image, grid, tx, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return sitk.Clamp(out, sitk.sitkFloat32, min(stats.GetMinimum(), 0.0), stats.GetMaximum())


def resample_labels(
    labels: sitk.Image,
    grid: sitk.Image,
    transform: sitk.Transform | None = None,
) -> sitk.Image:
    """A label map sampled on ``grid``: each label's indicator interpolated linearly, argmax.

    Nearest-neighbour resampling between two non-aligned grids moves every boundary by up to
    half a voxel at random (a 2.5 mm seg carried onto a 2 mm grid kept only 0.88-0.94 of the
    true whole-tumour Dice on the test phantoms); per-label linear interpolation (as nnU-Net
    resamples segmentations) keeps the partial-volume information of the source grid (+0.008 to
    +0.020 Dice on the same cases). Ties go to the lower label; the background is 1 outside the
    source.

    Args:
        labels: integer label map.
        grid: target geometry.
        transform: grid-to-image physical transform; identity if ``None``.
    """
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    if values.size == 1:
        return sitk.Resample(labels, grid, tx, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    best = prob = None
    for v in values.tolist():
        p = sitk.GetArrayFromImage(
            sitk.Resample(
                sitk.Cast(labels == v, sitk.sitkFloat32),
                grid,
                tx,
                sitk.sitkLinear,
                1.0 if v == 0 else 0.0,
                sitk.sitkFloat32,
            )
        )
        if best is None:
            best, prob = np.full(p.shape, v, np.int64), p
        else:
            win = p > prob
            best[win], prob = v, np.maximum(prob, p)
    out = sitk.GetImageFromArray(best.astype(sitk.GetArrayViewFromImage(labels).dtype))
    out.CopyInformation(grid)
    return out


def n4_correct(
    image: sitk.Image,
    shrink: int = 4,
    iterations: tuple[int, ...] = (50, 50, 30),
    mask: sitk.Image | None = None,
) -> tuple[sitk.Image, sitk.Image]:
    """N4 bias-field correction fitted on a shrunk copy, applied at full resolution.

    The fitting mask is ``mask`` (the brain, once extracted) or else Otsu's threshold. The log
    bias field estimated on the
    shrunk image is evaluated on the full grid (``GetLogBiasFieldAsImage``) and divided out.

    Args:
        image: float image.
        shrink: shrink factor of the fitting copy (4 at 1 mm: a 4 mm fit, ~64x fewer voxels).
        iterations: N4 iterations per fitting level.
        mask: where the bias is fitted (uint8); default Otsu's foreground.

    Returns:
        The corrected image and the Otsu foreground mask used.
    """
    mask = sitk.OtsuThreshold(image, 0, 1, 200) if mask is None else sitk.Cast(mask, sitk.sitkUInt8)
    factor = [max(1, min(int(shrink), s // 16)) for s in image.GetSize()]
    small = sitk.Shrink(image, factor)
    small_mask = sitk.Shrink(mask, factor)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(iterations))
    n4.Execute(small, small_mask)
    log_bias = n4.GetLogBiasFieldAsImage(image)
    corrected = sitk.Cast(image / sitk.Exp(log_bias), sitk.sitkFloat32)
    return corrected, mask
