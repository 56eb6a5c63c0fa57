"""``segmerge prepare``: raw multi-sequence scans -> skull-stripped, co-registered BraTS cases.

Per case (each stage timed): **read** (files / checked DICOM series), **register** every
sequence rigidly to the reference (multi-resolution Mattes MI), **resample** onto an isotropic
grid covering the reference's field of view, **skull strip** (MNI152 template registered
affinely, its brain mask warped), **N4** bias correction fitted inside that brain mask,
**write** the brain-cropped BraTS 2021 files, every transform (``.tfm``), the QC JSON and
montage. The prepared grid lives in the reference's physical space, so a prediction maps
back to the reference's own grid by
resampling alone (:func:`segmerge.prepare.restore.to_original`).

Output of case ``C``::

    OUT/C/C_{flair,t1,t1ce,t2}.nii.gz, OUT/C/C_seg.nii.gz (if the raw case had a seg)
    OUT/C/prepare/qc.json, montage.png, brain_mask.nii.gz, transforms/*.tfm
    OUT/dataset.json
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segmerge.atomic import atomic_destination, write_text_atomic
from segmerge.conventions import MODALITIES, label_set
from segmerge.data.dataset import DATALIST_NAME, case_file_names
from segmerge.prepare import qc
from segmerge.prepare.io import (
    PrepareError,
    RawCase,
    find_sequences,
    list_cases,
    read_sequence,
)
from segmerge.prepare.naming import LABEL_KEY, load_names
from segmerge.prepare.registration import (
    image_centre,
    isotropic_grid,
    n4_correct,
    register,
    resample,
    resample_labels,
)

SIDECAR = "prepare"
"""Per-case folder (inside the case folder) with QC, mask and transforms."""


@dataclass
class PrepareOptions:
    """Settings of one ``prepare`` run.

    Attributes:
        reference: sequence every other one is registered to (its grid defines the output).
        spacing: isotropic output spacing in mm.
        n4: run N4 bias correction.
        skull_strip: extract and crop to the brain (otherwise the full field of view is kept).
        deformable: refine the template registration with a B-spline.
        max_metric: a registration whose final Mattes MI is above this (closer to 0) diverged.
        max_rotation_deg: ... or whose rotation exceeds this.
        max_translation_mm: ... or which moves the reference's centre further than this.
        brain_cc: plausible brain-mask volume range in cc (outside: brain extraction failed).
        margin_mm: margin kept around the brain when cropping.
        names: path of a JSON name mapping (``None``: defaults).
        et_label: label value of enhancing tumour in carried ``seg`` files (4 or 3).
        threads: ITK threads per case (``None``: cores / workers).
        seed: metric-sampling seed.
    """

    reference: str = "t1ce"
    spacing: float = 1.0
    n4: bool = True
    skull_strip: bool = True
    deformable: bool = False
    max_metric: float = -0.15
    max_rotation_deg: float = 30.0
    max_translation_mm: float = 60.0
    brain_cc: tuple[float, float] = (500.0, 3000.0)
    margin_mm: float = 4.0
    names: str | None = None
    et_label: int = 4
    threads: int | None = None
    seed: int = 0


@dataclass
class CaseOutcome:
    """One case of a run: ``status`` is ``"prepared"`` or ``"failed"``."""

    case_id: str
    status: str
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    mapping: dict[str, str] = field(default_factory=dict)
    folder: str | None = None
    has_seg: bool = False


@dataclass
class PrepareReport:
    """All cases of a run."""

    output: Path
    outcomes: list[CaseOutcome] = field(default_factory=list)

    @property
    def failures(self) -> list[CaseOutcome]:
        """Cases that were not prepared."""
        return [o for o in self.outcomes if o.status != "prepared"]

    def summary(self) -> str:
        """One line per case, then the totals."""
        lines = []
        for o in self.outcomes:
            if o.status == "prepared":
                mapping = ", ".join(f"{k}<-{v}" for k, v in o.mapping.items())
                lines.append(
                    f"  {o.case_id}: prepared in {sum(o.seconds.values()):.1f} s ({mapping})"
                )
            else:
                lines.append(f"  {o.case_id}: FAILED, skipped: {o.error}")
        n_ok = len(self.outcomes) - len(self.failures)
        lines.append(
            f"{len(self.outcomes)} case(s): {n_ok} prepared, {len(self.failures)} failed -> "
            f"{self.output}"
        )
        return "\n".join(lines)


def geometry(img: sitk.Image) -> dict:
    """Size, spacing, origin and direction of an image (JSON-ready)."""
    return {
        "size": list(img.GetSize()),
        "spacing": list(img.GetSpacing()),
        "origin": list(img.GetOrigin()),
        "direction": list(img.GetDirection()),
    }


def grid_from_geometry(geom: dict, pixel: int = sitk.sitkUInt8) -> sitk.Image:
    """An empty image with the geometry written by :func:`geometry`."""
    img = sitk.Image([int(s) for s in geom["size"]], pixel)
    img.SetSpacing([float(v) for v in geom["spacing"]])
    img.SetOrigin([float(v) for v in geom["origin"]])
    img.SetDirection([float(v) for v in geom["direction"]])
    return img


def _write_image(img: sitk.Image, path: Path) -> None:
    with atomic_destination(path, suffix=".nii.gz") as tmp:
        sitk.WriteImage(img, tmp, useCompression=True, compressionLevel=1)


def _write_transform(tx: sitk.Transform, path: Path) -> None:
    with atomic_destination(path, suffix=".tfm") as tmp:
        sitk.WriteTransform(tx, tmp)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    tol = 1e-3 * max(b.GetSpacing())
    return (
        np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=max(tol, 1e-3))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)
    )


def prepare_case(raw: RawCase, output: str | os.PathLike, opts: PrepareOptions) -> CaseOutcome:
    """Prepare one raw case into ``output/<case_id>`` (see the module docstring).

    Raises:
        PrepareError: bad input or a registration / brain extraction that failed its checks.
    """
    cid = raw.case_id
    ref_key = opts.reference
    if ref_key not in raw.sequences:
        raise PrepareError(
            f"case {cid}: no {ref_key} sequence (the reference) among "
            f"{sorted(raw.sequences)}; choose another with --reference"
        )
    if opts.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(opts.threads))
    seconds: dict[str, float] = {}
    cpu_stage: dict[str, float] = {}  # process CPU seconds (all ITK threads) per stage
    report: dict = {"case_id": cid, "source": str(raw.folder), "options": asdict(opts)}
    report["mapping"] = {k: s.describe() for k, s in raw.sequences.items()}
    seqs = [m for m in MODALITIES if m in raw.sequences]

    t, c = time.perf_counter(), time.process_time()
    images = {
        k: read_sequence(raw.sequences[k], cid) for k in (*seqs, LABEL_KEY) if k in raw.sequences
    }
    ref = images[ref_key]
    seconds["read"] = time.perf_counter() - t
    cpu_stage["read"] = time.process_time() - c
    report["inputs"] = {k: geometry(img) for k, img in images.items()}
    seg = images.pop(LABEL_KEY, None)
    if seg is not None:
        if not _same_grid(seg, ref):
            raise PrepareError(
                f"case {cid}: {raw.sequences[LABEL_KEY].path}: the seg file must lie on the "
                f"reference ({ref_key}) grid: size {seg.GetSize()} vs {ref.GetSize()}, spacing "
                f"{tuple(round(s, 3) for s in seg.GetSpacing())} vs "
                f"{tuple(round(s, 3) for s in ref.GetSpacing())}"
            )
        values = set(np.unique(sitk.GetArrayViewFromImage(seg)).tolist())
        bad = values - set(label_set(opts.et_label))
        if bad:
            raise PrepareError(
                f"case {cid}: {raw.sequences[LABEL_KEY].path}: label values {sorted(bad)} are "
                f"not BraTS labels {label_set(opts.et_label)}"
            )
        seg.CopyInformation(ref)

    # ---- register ------------------------------------------------------------------------
    t, c = time.perf_counter(), time.process_time()
    transforms: dict[str, sitk.Transform] = {ref_key: sitk.Euler3DTransform()}
    reg_info: dict[str, dict] = {ref_key: {"reference": True}}
    centre = image_centre(ref)
    transforms[ref_key].SetCenter(centre)
    for k in seqs:
        if k == ref_key:
            continue
        # Thick-slice sequences are registered as the fixed image (the metric samples their
        # real voxels and interpolates the finer reference), then the transform is inverted:
        # interpolating 3-7 mm slices biases the optimum by up to a millimetre.
        swap = max(images[k].GetSpacing()) > 1.5 * max(ref.GetSpacing())
        if swap:
            res = register(images[k], ref, "rigid", seed=opts.seed)
            res.transform = res.transform.GetInverse()
            res.parameters = [float(p) for p in res.transform.GetParameters()]
        else:
            res = register(ref, images[k], "rigid", seed=opts.seed)
        reg_info[k] = {**res.describe(), "fixed": k if swap else ref_key}
        problem = None
        if res.metric > opts.max_metric:
            problem = f"final Mattes MI {res.metric:.3f} above the threshold {opts.max_metric}"
        elif res.rotation_deg > opts.max_rotation_deg:
            problem = f"rotation {res.rotation_deg:.1f} deg beyond {opts.max_rotation_deg}"
        elif res.translation_mm > opts.max_translation_mm:
            problem = f"shift {res.translation_mm:.1f} mm beyond {opts.max_translation_mm}"
        if problem:
            raise PrepareError(
                f"case {cid}: {raw.sequences[k].path}: registration of {k} to {ref_key} "
                f"diverged ({problem}); check the sequence or relax --max-metric"
            )
        transforms[k] = res.transform
    seconds["register"] = time.perf_counter() - t
    cpu_stage["register"] = time.process_time() - c
    report["registration"] = reg_info

    # ---- resample ------------------------------------------------------------------------
    t, c = time.perf_counter(), time.process_time()
    grid = isotropic_grid(ref, opts.spacing)
    on_grid = {k: resample(images[k], grid, transforms[k]) for k in seqs}
    seg_grid = resample_labels(seg, grid) if seg is not None else None
    del images
    seconds["resample"] = time.perf_counter() - t
    cpu_stage["resample"] = time.process_time() - c

    # ---- skull strip -------------------------------------------------------------------------
    t, c = time.perf_counter(), time.process_time()
    mask = None
    if opts.skull_strip:
        from segmerge.prepare.skullstrip import brain_mask

        driver = next(k for k in ("t1", "t1ce", ref_key, *seqs) if k in on_grid)
        strip = brain_mask(on_grid[driver], opts.deformable, seed=opts.seed)
        mask = strip.mask
        voxel_cc = float(np.prod(grid.GetSpacing())) / 1000.0
        volume = float(sitk.GetArrayViewFromImage(mask).sum()) * voxel_cc
        report["skull_strip"] = {"driver": driver, "mask_cc": volume, **strip.describe()}
        lo, hi = opts.brain_cc
        if not lo <= volume <= hi:
            raise PrepareError(
                f"case {cid}: brain extraction on {driver} gave a {volume:.0f} cc mask, outside "
                f"the plausible {lo:.0f}-{hi:.0f} cc (template registration failed?); use "
                "--no-skull-strip for already skull-stripped or partial-coverage scans"
            )
    seconds["skull_strip"] = time.perf_counter() - t
    cpu_stage["skull_strip"] = time.process_time() - c

    # ---- N4 ------------------------------------------------------------------------------
    t, c = time.perf_counter(), time.process_time()
    if opts.n4:
        # Fitted inside the brain once it is known, so scalp and skull do not pull the field.
        on_grid = {k: n4_correct(img, mask=mask)[0] for k, img in on_grid.items()}
    seconds["n4"] = time.perf_counter() - t
    cpu_stage["n4"] = time.process_time() - c

    # ---- crop + write ----------------------------------------------------------------------
    t, c = time.perf_counter(), time.process_time()
    crop_lo, crop_size = [0, 0, 0], list(grid.GetSize())
    if mask is not None:
        arr = sitk.GetArrayViewFromImage(mask)
        idx = np.argwhere(arr > 0)[:, ::-1]  # (x, y, z) order
        pad = int(np.ceil(opts.margin_mm / opts.spacing))
        lo_i = np.maximum(idx.min(0) - pad, 0)
        hi_i = np.minimum(idx.max(0) + pad + 1, np.asarray(grid.GetSize()))
        crop_lo, crop_size = [int(v) for v in lo_i], [int(v) for v in hi_i - lo_i]
        on_grid = {k: sitk.Mask(img, mask) for k, img in on_grid.items()}

    def crop(img: sitk.Image) -> sitk.Image:
        return sitk.RegionOfInterest(img, crop_size, crop_lo)

    folder = Path(output) / cid
    side = folder / SIDECAR
    names = case_file_names("brats2021", cid)
    for k, img in on_grid.items():
        _write_image(crop(img), folder / names[k])
    if seg_grid is not None:
        _write_image(crop(seg_grid), folder / names["label"])
    for k, tx in transforms.items():
        _write_transform(tx, side / "transforms" / f"{k}_to_{ref_key}.tfm")
    if mask is not None:
        _write_image(crop(mask), side / "brain_mask.nii.gz")
        _write_transform(strip.transform, side / "transforms" / "case_to_mni152.tfm")
    seconds["write"] = time.perf_counter() - t
    cpu_stage["write"] = time.process_time() - c

    t, c = time.perf_counter(), time.process_time()
    prepared = crop(grid)
    report["geometry"] = {
        "reference": {"sequence": ref_key, **geometry(ref)},
        "grid": geometry(grid),
        "prepared": geometry(prepared),
        "crop_index": crop_lo,
        "spacing_mm": opts.spacing,
    }
    report["transforms"] = {k: f"{SIDECAR}/transforms/{k}_to_{ref_key}.tfm" for k in transforms} | (
        {"mni152": f"{SIDECAR}/transforms/case_to_mni152.tfm"} if mask is not None else {}
    )
    report["files"] = {k: names[k] for k in on_grid} | (
        {"label": names["label"]} if seg_grid is not None else {}
    )
    crop_mask = crop(mask) if mask is not None else None
    arrays = {k: sitk.GetArrayFromImage(crop(on_grid[k])) for k in seqs}
    mask_arr = (
        sitk.GetArrayFromImage(crop_mask)
        if crop_mask is not None
        else np.ones_like(arrays[ref_key])
    )
    qc.write_montage(side / "montage.png", arrays, mask_arr, cid)
    seconds["qc"] = time.perf_counter() - t
    cpu_stage["qc"] = time.process_time() - c
    report["seconds"] = seconds
    report["cpu_seconds_by_stage"] = cpu_stage
    report["cpu_seconds"] = None  # filled by the caller (process CPU time of the whole case)
    qc.write_report(side / "qc.json", report)
    mapping = {k: raw.sequences[k].path.name for k in raw.sequences}
    return CaseOutcome(cid, "prepared", None, seconds, mapping, str(folder), seg_grid is not None)


def _run_one(job: tuple[str, str, PrepareOptions]) -> CaseOutcome:
    folder, output, opts = job
    cid = Path(folder).name
    cpu0 = time.process_time()
    try:
        raw = find_sequences(Path(folder), load_names(opts.names))
        outcome = prepare_case(raw, output, opts)
    except PrepareError as err:
        return CaseOutcome(cid, "failed", str(err))
    except Exception as err:  # an unexpected library failure must not stop the other cases
        return CaseOutcome(cid, "failed", f"case {cid}: {type(err).__name__}: {err}")
    cpu = time.process_time() - cpu0
    outcome.seconds = dict(outcome.seconds)
    qc_path = Path(output) / cid / SIDECAR / "qc.json"
    data = json.loads(qc_path.read_text())
    data["cpu_seconds"] = cpu
    qc.write_report(qc_path, data)
    return outcome


def preflight(
    input_dir: str | os.PathLike, opts: PrepareOptions
) -> tuple[list[Path], dict[str, str]]:
    """Check every case's inputs (names, DICOM series) before any pixel is processed.

    Returns:
        The case folders that passed and ``{case_id: error}`` for those that did not.

    Raises:
        PrepareError: the input folder itself is unusable, or the name mapping is unreadable.
    """
    names = load_names(opts.names)
    good, bad = [], {}
    for folder in list_cases(input_dir):
        try:
            raw = find_sequences(folder, names)
            if opts.reference not in raw.sequences:
                raise PrepareError(
                    f"case {folder.name}: no {opts.reference} sequence (the reference) among "
                    f"{sorted(raw.sequences)}; choose another with --reference"
                )
            good.append(folder)
        except PrepareError as err:
            bad[folder.name] = str(err)
    return good, bad


def prepare_dataset(
    input_dir: str | os.PathLike,
    output: str | os.PathLike,
    opts: PrepareOptions | None = None,
    workers: int = 1,
) -> PrepareReport:
    """Prepare every case folder of ``input_dir`` into ``output`` and write ``dataset.json``.

    Inputs are only read. Cases whose inputs fail the pre-flight checks, or whose registration
    or brain extraction fails, are reported and skipped; the others go on.

    Args:
        input_dir: one folder per patient.
        output: the prepared BraTS 2021 dataset folder (must differ from ``input_dir``).
        opts: settings (defaults: :class:`PrepareOptions`).
        workers: cases prepared in parallel (processes).
    """
    opts = opts or PrepareOptions()
    if int(workers) < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if not float(opts.spacing) > 0:
        raise ValueError(f"--spacing must be positive, got {opts.spacing}")
    src, out = Path(input_dir).resolve(), Path(output).resolve()
    if out == src or src in out.parents:
        raise ValueError(
            f"--output {out} must lie outside --input {src} (inputs are never modified)"
        )
    good, bad = preflight(src, opts)
    report = PrepareReport(out)
    outcomes = {cid: CaseOutcome(cid, "failed", err) for cid, err in bad.items()}
    if good:
        out.mkdir(parents=True, exist_ok=True)
        if opts.threads is None:
            opts = PrepareOptions(
                **{**asdict(opts), "threads": max(1, (os.cpu_count() or 1) // workers)}
            )
        jobs = [(str(f), str(out), opts) for f in good]
        if workers == 1 or len(jobs) == 1:
            results = [_run_one(j) for j in jobs]
        else:
            # spawn, never fork: a process that already ran torch/ITK/OpenMP threads (predict
            # --prepare, a test session) deadlocks in forked children on a lock some thread held
            ctx = get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as ex:
                results = list(ex.map(_run_one, jobs))
        outcomes.update({o.case_id: o for o in results})
    report.outcomes = [outcomes[k] for k in sorted(outcomes)]
    prepared = [o for o in report.outcomes if o.status == "prepared"]
    if prepared:
        write_datalist(out, prepared, opts.et_label)
    if out.exists():
        runs = [asdict(o) for o in report.outcomes]
        write_text_atomic(out / "prepare_report.json", json.dumps(runs, indent=2) + "\n")
    return report


def write_datalist(out: Path, prepared: list[CaseOutcome], et_label: int) -> Path:
    """``dataset.json`` listing the prepared cases (with a seg: training; without: testing)."""
    items = {"training": [], "testing": []}
    for o in prepared:
        names = case_file_names("brats2021", o.case_id)
        present = [m for m in MODALITIES if (out / o.case_id / names[m]).is_file()]
        item = {"case_id": o.case_id, **{m: f"{o.case_id}/{names[m]}" for m in present}}
        if o.has_seg:
            item["label"] = f"{o.case_id}/{names['label']}"
        items["training" if o.has_seg else "testing"].append(item)
    datalist = {
        "name": "segmerge-prepared",
        "description": "raw scans prepared by `python -m segmerge prepare` (co-registered, "
        "resampled, N4, skull-stripped, cropped)",
        "layout": "brats2021",
        "et_label": et_label,
        **{k: v for k, v in items.items() if v},
    }
    return write_text_atomic(out / DATALIST_NAME, json.dumps(datalist, indent=2) + "\n")
