"""BraTS-like phantom cases synthesised on real anatomy (MNI152), in memory.

One case = four sequences (``flair, t1, t1ce, t2``) plus a BraTS label map on the template's
anatomy resampled to ``size``³ (see :mod:`segmerge.data.anatomy`). Recipe (intensities from
:data:`TISSUE_MEANS`, relative to white matter = 1):

1. Tumour geometry in mm: a randomly oriented ellipsoid whose radius is perturbed by smooth noise
   (irregular, not spherical); necrotic core inside an enhancing rim (tumour core, TC) inside
   edema whose reach is stretched along white matter and which stays out of CSF. Whole-tumour
   volume is drawn log-uniformly in 5-140 cc. ~10 % of cases have no enhancing tumour (the core
   is non-enhancing, label 1), ~15 % have no necrosis (the core is all enhancing).
2. Mass effect: the healthy anatomy is pushed radially away from the tumour centre by a smooth,
   fold-free warp before the tumour is painted in.
3. Intensities: T1/T1ce from the real template T1, T2/FLAIR from the tissue-fraction mixture;
   every tissue mean jittered by +-8 % per case; tumour compartments with the table's means and
   a mild texture.
4. Acquisition: a smooth multiplicative bias field (+-10-15 %) per sequence, a slight blur
   (0.3-0.6 voxel), a random gain, Rician noise (1-4 % of WM), background (skull-stripped) 0.

Everything is drawn from ``numpy.random.default_rng(seed)`` and computed with numpy/scipy only
(no threads), so a case is a pure function of ``(size, seed, et_label)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from segmerge.conventions import ED, MODALITIES, NCR, check_et_label
from segmerge.data.anatomy import mni_anatomy

# Relative tissue means per sequence, WM = 1 (the phantom's reference values). Tumour entries given as a range are
# drawn per case.
TISSUE_MEANS: dict[str, dict[str, float | tuple[float, float]]] = {
    "wm": {"t1": 1.00, "t1ce": 1.00, "t2": 1.00, "flair": 1.00},
    "gm": {"t1": 0.75, "t1ce": 0.75, "t2": 1.30, "flair": 1.25},
    "csf": {"t1": 0.33, "t1ce": 0.35, "t2": 2.6, "flair": 0.15},
    "edema": {"t1": 0.70, "t1ce": 0.72, "t2": 2.0, "flair": 1.85},
    "necrosis": {"t1": 0.45, "t1ce": 0.45, "t2": 2.5, "flair": (0.7, 1.5)},
    "enhancing": {"t1": 0.80, "t1ce": (1.4, 2.1), "t2": 1.55, "flair": 1.45},
}
# The template's own T1 ratios (GM 0.745, CSF 0.33): T1ce reuses the template with these ratios
# corrected towards the T1ce column.
_TEMPLATE_T1 = {"wm": 1.0, "gm": 0.745, "csf": 0.33}

P_NO_ENHANCING = 0.10
P_NO_NECROSIS = 0.15
WT_VOLUME_CC = (5.0, 140.0)
EDEMA_INFILTRATION = 0.75  # edema voxel = 25 % healthy tissue + 75 % edema signal


@dataclass
class PhantomCase:
    """One synthetic case in memory.

    Attributes:
        case_id: identifier (the folder name once written).
        images: ``{modality: (S, S, S) float32}`` keyed by ``MODALITIES``.
        label: (S, S, S) uint8 BraTS labels (0, 1 NCR, 2 ED, ``et_label`` ET).
        affine: (4, 4) voxel -> world (mm, RAS).
        et_label: the enhancing-tumour label value used in ``label``.
        tissues: ``{"wm", "gm", "csf"}`` fractions after the mass-effect warp (for checks).
        info: generation facts: ``seed``, ``wt_cc``, ``has_et``, ``has_necrosis``, ``center_vox``.
    """

    case_id: str
    images: dict[str, np.ndarray]
    label: np.ndarray
    affine: np.ndarray
    et_label: int = 4
    tissues: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    info: dict = field(default_factory=dict)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Unit-variance smooth random field with about ``cells`` bumps per axis.

    Written by hand instead of ``scipy.ndimage.zoom`` of a coarse grid (0.19 s per 96³ field,
    80 % of a case's cost): random weights on a (cells + 3)³ node lattice, each node a Gaussian
    bump, evaluated separably as three small matrix products (a few ms).
    """
    nodes = cells + 3
    mats = []
    for n in shape:
        x = np.linspace(0.0, cells, n, dtype=np.float32)[:, None]
        centres = np.arange(-1, nodes - 1, dtype=np.float32)[None, :]
        mats.append(np.exp(-0.5 * ((x - centres) / 0.8) ** 2))
    coarse = rng.standard_normal((nodes,) * 3).astype(np.float32)
    f = np.einsum("ia,abc->ibc", mats[0], coarse)
    f = np.einsum("jb,ibc->ijc", mats[1], f)
    f = np.einsum("kc,ijc->ijk", mats[2], f)  # no BLAS: results independent of thread count
    f = f - f.mean()
    return (f / (f.std() + 1e-8)).astype(np.float32)


def _keep_components(
    mask: np.ndarray, keep_sizes, seed_mask: np.ndarray | None = None
) -> np.ndarray:
    """Connected components of ``mask`` selected by size (and, if given, touching ``seed_mask``)."""
    lab, n = ndimage.label(mask)
    if n <= 1 and seed_mask is None:
        return mask
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    keep = np.asarray(keep_sizes(sizes), bool) if n else np.zeros(0, bool)
    if seed_mask is not None:
        touching = np.zeros(n + 1, bool)
        touching[np.unique(lab[seed_mask])] = True
        keep &= touching[1:]
    return np.concatenate([[False], keep])[lab]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def make_phantom_case(
    size: int = 96, seed: int = 0, et_label: int = 4, case_id: str | None = None
) -> PhantomCase:
    """Synthesise one BraTS-like case in memory (deterministic in its arguments).

    Args:
        size: edge of the cubic grid in voxels (>= 16); the affine's spacing is the template's
            brain bounding box divided by ``size`` (about 1.5-1.9 mm at 96).
        seed: random seed; the same seed gives the same case bit for bit.
        et_label: label value of enhancing tumour, 4 (BraTS <= 2022) or 3 (BraTS 2023+).
        case_id: identifier stored in the case; defaults to ``phantom-<seed>``.

    Returns:
        The case (images keyed by modality name, uint8 label, affine, generation info).
    """
    et_label = check_et_label(et_label)
    anat = mni_anatomy(int(size))
    rng = np.random.default_rng(int(seed))
    shape = anat.mask.shape
    sp = anat.spacing

    # ---- tumour parameters -------------------------------------------------------------
    u = rng.random()
    has_et, has_ncr = (
        u >= P_NO_ENHANCING,
        not (P_NO_ENHANCING <= u < P_NO_ENHANCING + P_NO_NECROSIS),
    )
    wt_cc = float(np.exp(rng.uniform(*np.log(WT_VOLUME_CC))))
    # Edema covers the tumour core and stretches along WM: its nominal sphere is a bit smaller
    # than the target volume's sphere.
    r_wt = 0.8 * (3 * wt_cc * 1000 / (4 * np.pi)) ** (1 / 3)
    r_tc = r_wt * rng.uniform(0.5, 1.05)
    r_ncr = r_tc * rng.uniform(0.5, 0.8)
    # Centre: deep white matter, far enough from the brain surface to hold most of the core.
    ok = (anat.wm > 0.4) & (anat.depth > min(0.8 * r_tc + 2 * sp.max(), 0.6 * anat.depth.max()))
    cand = np.flatnonzero(ok)
    if cand.size == 0:
        cand = np.flatnonzero(anat.depth >= np.percentile(anat.depth[anat.mask], 90))
    center = np.array(np.unravel_index(cand[rng.integers(cand.size)], shape))

    # Voxel offsets from the centre in mm (broadcast grids keep memory low).
    grids = [((np.arange(n) - c) * s).astype(np.float32) for n, c, s in zip(shape, center, sp)]
    gx, gy, gz = np.meshgrid(*grids, indexing="ij", sparse=True)
    r2 = gx**2 + gy**2 + gz**2

    # ---- mass effect: pull samples towards the centre => anatomy appears pushed outwards --------
    # Inverse map x -> c + (x - c) * s(r), s = 1 - A exp(-r²/σ²): monotone in r for A < 1 (no folds).
    amp, sigma = rng.uniform(0.15, 0.4), 1.3 * r_tc
    s = 1.0 - amp * np.exp(-r2 / sigma**2)
    coords = [center[i] + (g / sp[i]) * s for i, g in enumerate((gx, gy, gz))]
    coords = np.stack(np.broadcast_arrays(*coords)).astype(np.float32)

    t1_t, gm, wm, csf, mask_f = (
        ndimage.map_coordinates(a, coords, order=1, mode="constant", cval=0.0).astype(np.float32)
        for a in (anat.t1, anat.gm, anat.wm, anat.csf, anat.mask.astype(np.float32))
    )
    mask = mask_f > 0.5
    del coords, mask_f

    # ---- tumour shape ------------------------------------------------------------------------
    rot = _random_rotation(rng)
    axes = rng.uniform(0.75, 1.3, 3)
    axes /= np.prod(axes) ** (1 / 3)
    comps = [rot[0, k] * gx + rot[1, k] * gy + rot[2, k] * gz for k in range(3)]
    r_ell = np.sqrt(sum((c / a) ** 2 for c, a in zip(comps, axes)))
    del comps
    # Lobes at the scale of the tumour: noise with about one bump per core radius.
    extent = float(np.max(np.array(shape) * sp))
    cells = int(np.clip(round(extent / max(r_tc, 6.0)), 4, max(4, shape[0] // 3)))
    cells2 = int(min(2 * cells, max(4, shape[0] // 2)))
    n_shape = 0.75 * _smooth_noise(rng, shape, cells) + 0.45 * _smooth_noise(rng, shape, cells2)
    r_irr = r_ell * np.maximum(1.0 + 0.3 * n_shape, 0.6)
    tc = (r_irr < r_tc) & mask
    ncr = (r_irr * (1.0 + 0.2 * _smooth_noise(rng, shape, cells2)) < r_ncr) & tc
    # Edema reach is stretched where there is white matter (fibre tracts) and shrunk in cortex.
    wm_s = ndimage.gaussian_filter(wm, 1.0)
    reach = r_irr / (0.65 + 0.7 * wm_s)
    n_edema = _smooth_noise(rng, shape, cells2)
    edema = (reach * np.maximum(1.0 + 0.3 * n_edema, 0.7) < r_wt) & mask & (csf < 0.6)
    # One lesion: drop core crumbs (< 10 % of the largest core piece) and edema islands that do
    # not touch the core.
    tc = _keep_components(tc, lambda sizes: sizes >= 0.1 * sizes.max())
    wt = _keep_components(edema | tc, lambda sizes: np.ones_like(sizes, bool), seed_mask=tc)
    edema, ncr = edema & wt, ncr & tc
    if not has_et:
        ncr, enh = tc, np.zeros_like(tc)
    elif not has_ncr:
        ncr, enh = np.zeros_like(tc), tc
    else:
        enh = tc & ~ncr
    label = np.zeros(shape, np.uint8)
    label[wt] = ED
    label[ncr] = NCR
    label[enh] = et_label

    # ---- intensities ---------------------------------------------------------------------
    def draw(v: float | tuple[float, float]) -> float:
        return float(rng.uniform(*v)) if isinstance(v, tuple) else float(v)

    means = {
        t: {m: draw(v) * rng.uniform(0.92, 1.08) for m, v in col.items()}
        for t, col in TISSUE_MEANS.items()
    }
    frac_sum = np.maximum(wm + gm + csf, 1e-3)
    tex = 1.0 + 0.07 * _smooth_noise(rng, shape, max(4, shape[0] // 4))
    images: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        mix = (wm * means["wm"][m] + gm * means["gm"][m] + csf * means["csf"][m]) / frac_sum
        if m in ("t1", "t1ce"):
            # Real template contrast, rescaled per tissue to this case's (jittered) means.
            ratio = (
                sum(
                    f * means[t][m] / _TEMPLATE_T1[t]
                    for t, f in (("wm", wm), ("gm", gm), ("csf", csf))
                )
                / frac_sum
            )
            healthy = t1_t * ratio
        else:
            healthy = mix
        img = np.where(mask, healthy, 0.0).astype(np.float32)
        edema_signal = means["edema"][m] * tex[edema]
        img[edema] = (1 - EDEMA_INFILTRATION) * img[edema] + EDEMA_INFILTRATION * edema_signal
        img[ncr] = means["necrosis"][m] * tex[ncr]
        img[enh] = means["enhancing"][m] * tex[enh]
        # Acquisition: bias field, blur, gain, Rician noise, skull-stripped background.
        bias = np.exp(rng.uniform(0.10, 0.15) * np.clip(_smooth_noise(rng, shape, 2), -2, 2) / 2)
        img = ndimage.gaussian_filter(img * bias, rng.uniform(0.3, 0.6), truncate=3.0)
        gain = float(np.exp(rng.uniform(np.log(200.0), np.log(2000.0))))
        noise = rng.uniform(0.01, 0.04) * gain
        img = img * gain
        n1 = rng.standard_normal(shape, dtype=np.float32) * noise
        n2 = rng.standard_normal(shape, dtype=np.float32) * noise
        img = np.sqrt((img + n1) ** 2 + n2**2)
        images[m] = np.where(mask, img, 0.0).astype(np.float32)

    voxel_cc = float(np.prod(sp)) / 1000.0
    info = {
        "seed": int(seed),
        "wt_cc": float(wt.sum() * voxel_cc),
        "has_et": bool(enh.any()),
        "has_necrosis": bool(ncr.any()),
        "center_vox": tuple(int(c) for c in center),
    }
    return PhantomCase(
        case_id=case_id or f"phantom-{int(seed)}",
        images=images,
        label=label,
        affine=anat.affine.copy(),
        et_label=et_label,
        tissues={"wm": wm, "gm": gm, "csf": csf},
        info=info,
    )
