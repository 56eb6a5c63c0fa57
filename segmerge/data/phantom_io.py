"""Write phantom datasets to disk (BraTS folder layout + ``dataset.json``) and preview them.

:func:`cached_phantoms` is the phantom cache ``train`` and ``compare`` share: a dataset is
written once per generation arguments (:func:`phantom_cache_dir`) and published whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from segmerge.atomic import default_mode, write_bytes_atomic
from segmerge.conventions import MODALITIES, check_et_label
from segmerge.data.anatomy import mni_anatomy
from segmerge.data.dataset import DATALIST_NAME, case_file_names, case_id_for, split_cases
from segmerge.data.nifti import save_nifti
from segmerge.data.phantom import make_phantom_case


def case_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th case of a dataset generated with ``seed`` (independent streams).

    Args:
        seed: dataset seed.
        index: case number (0-based).
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _write_case(args: tuple) -> tuple[str, dict]:
    out_dir, index, size, seed, et_label, layout = args
    case_id = case_id_for(layout, index)
    case = make_phantom_case(
        size=size, seed=case_seed(seed, index), et_label=et_label, case_id=case_id
    )
    names = case_file_names(layout, case_id)
    folder = Path(out_dir) / case_id
    for m in MODALITIES:
        save_nifti(folder / names[m], case.images[m], case.affine)
    save_nifti(folder / names["label"], case.label, case.affine)
    item = {"case_id": case_id, **{k: f"{case_id}/{names[k]}" for k in (*MODALITIES, "label")}}
    return case_id, {**item, "_info": case.info}


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    cases: int,
    size: int = 96,
    seed: int = 0,
    et_label: int = 4,
    layout: str = "brats2021",
    val_fraction: float = 0.2,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Generate ``cases`` phantoms and write them in a BraTS folder layout plus ``dataset.json``.

    Case ``i`` uses seed :func:`case_seed` ``(seed, i)``, so the files do not depend on
    ``workers``; identical arguments give byte-identical files (gzip written with mtime 0).

    Args:
        out_dir: dataset folder (created if needed).
        cases: number of cases (>= 1).
        size: edge of each cubic volume in voxels.
        seed: dataset seed.
        et_label: enhancing-tumour label value, 4 (BraTS 2021 habit) or 3 (BraTS 2023).
        layout: ``"brats2021"`` or ``"brats2023"`` folder and file naming.
        val_fraction: fraction of cases listed under ``validation`` in ``dataset.json``.
        workers: worker processes (1 = in this process).
        progress: show a tqdm progress bar.

    Returns:
        Path of the written ``dataset.json`` (its folder is the dataset root; both load with
        :func:`segmerge.data.load_dataset`).
    """
    et_label = check_et_label(et_label)
    case_file_names(layout, "x")  # validates the layout name before any work
    if int(cases) < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    split_cases([], val_fraction)  # validates val_fraction before any work
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), i, int(size), int(seed), et_label, layout) for i in range(int(cases))]
    bar = tqdm(total=len(jobs), desc=f"phantoms {size}³", unit="case", disable=not progress)
    results: dict[str, dict] = {}
    try:
        if workers == 1:
            for job in jobs:
                cid, item = _write_case(job)
                results[cid] = item
                bar.update()
        else:
            # fork where available: a spawned worker re-imports torch/MONAI (10-20 s on a busy
            # 2-core machine); the workers only run numpy/scipy, so no torch thread pool is used.
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            if method == "fork":
                mni_anatomy(int(size))  # resample once here; forked workers inherit the cache
            with ProcessPoolExecutor(
                max_workers=int(workers), mp_context=get_context(method)
            ) as ex:
                for cid, item in ex.map(_write_case, jobs):
                    results[cid] = item
                    bar.update()
    finally:
        bar.close()
    ids = sorted(results)
    val_ids = split_cases(ids, val_fraction, seed)
    strip = lambda it: {k: v for k, v in it.items() if k != "_info"}  # noqa: E731
    datalist = {
        "name": "segmerge-phantoms",
        "description": "BraTS-like phantoms on the MNI ICBM152 2009a anatomy (segmerge)",
        "layout": layout,
        "et_label": et_label,
        "labels": {
            "0": "background",
            "1": "necrotic/non-enhancing core",
            "2": "edema",
            str(et_label): "enhancing tumour",
        },
        "modalities": list(MODALITIES),
        "size": int(size),
        "seed": int(seed),
        "numTraining": len(ids) - len(val_ids),
        "numValidation": len(val_ids),
        "training": [strip(results[c]) for c in ids if c not in val_ids],
        "validation": [strip(results[c]) for c in ids if c in val_ids],
        "cases": {c: results[c]["_info"] for c in ids},
    }
    path = out / DATALIST_NAME
    write_bytes_atomic(path, (json.dumps(datalist, indent=1) + "\n").encode())
    return path


def write_preview(
    items: list[dict], png_path: str | os.PathLike, et_label: int = 4, max_cases: int = 6
) -> Path:
    """Montage PNG: per case (row) the four sequences and the label overlay on one axial slice.

    The slice is the one with the largest tumour area (or the middle slice without a label).

    Args:
        items: case dicts as in :class:`segmerge.data.DatasetSpec` (paths keyed by modality).
        png_path: output file (written atomically).
        et_label: enhancing-tumour label value, for the overlay colours.
        max_cases: at most this many rows.

    Returns:
        The PNG path.
    """
    # Agg selected for a preview only: importing segmerge.data leaves the user's backend alone
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(items)[: max(1, int(max_cases))]
    if not items:
        raise ValueError("preview needs at least one case")
    fig, axes = plt.subplots(len(items), 5, figsize=(10, 2.1 * len(items)), squeeze=False)
    colours = {1: (1.0, 0.2, 0.2), 2: (0.2, 0.9, 0.2), int(et_label): (1.0, 0.9, 0.1)}
    for row, item in zip(axes, items):
        vols = {
            m: nib.as_closest_canonical(nib.load(item[m])).get_fdata(dtype=np.float32)
            for m in MODALITIES
            if item.get(m)
        }
        lab = (
            nib.as_closest_canonical(nib.load(item["label"])).get_fdata(dtype=np.float32)
            if item.get("label")
            else None
        )
        ref = next(iter(vols.values()))
        z = (
            int(np.argmax((lab > 0).sum((0, 1))))
            if lab is not None and lab.any()
            else ref.shape[2] // 2
        )
        for ax, m in zip(row, MODALITIES):
            if m in vols:
                ax.imshow(np.rot90(vols[m][:, :, z]), cmap="gray")
            ax.set_title(f"{item['case_id']} {m}" if m == "flair" else m, fontsize=7)
            ax.axis("off")
        base = vols.get("t1ce", ref)[:, :, z]
        row[4].imshow(np.rot90(base), cmap="gray")
        if lab is not None:
            rgba = np.zeros((*lab.shape[:2], 4), np.float32)
            for value, colour in colours.items():
                rgba[lab[:, :, z] == value] = (*colour, 0.55)
            row[4].imshow(np.rot90(rgba))
        row[4].set_title("label (NCR red, ED green, ET yellow)", fontsize=6)
        row[4].axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return write_bytes_atomic(png_path, buf.getvalue())


def phantom_cache_dir(cache_dir: str | os.PathLike, spec: Mapping[str, object]) -> Path:
    """``<cache_dir>/phantoms-<hash>``: the cache folder of one set of generation arguments.

    Args:
        cache_dir: the cache root.
        spec: arguments of :func:`write_phantom_dataset` (``cases``, ``size``, ``seed``,
            ``et_label``, ...); ``workers`` is left out of the key (the files do not depend on it).
    """
    key = json.dumps({k: spec[k] for k in sorted(spec) if k != "workers"}, sort_keys=True)
    return Path(cache_dir) / f"phantoms-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def cached_phantoms(
    folder: str | os.PathLike, spec: Mapping[str, object], progress: bool = False
) -> Path:
    """The phantom dataset in ``folder``, written first if it is not there (``train``,
    ``compare``).

    Written into a temporary folder beside ``folder`` and renamed into place, so readers see the
    whole dataset or none of it; when two processes race, the first rename wins and the other
    copy is discarded. The folder gets the mode ``os.mkdir`` would give it (not ``tempfile``'s
    0700).

    Args:
        folder: where the dataset lives (e.g. :func:`phantom_cache_dir`).
        spec: :func:`write_phantom_dataset` arguments (``cases``, ``size``, ``seed``,
            ``et_label``, ``layout``, ``val_fraction``, ``workers``).
        progress: show a progress bar.

    Returns:
        The path of its ``dataset.json``.
    """
    folder = Path(folder)
    datalist = folder / DATALIST_NAME
    if datalist.is_file():
        return datalist
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))
        write_phantom_dataset(
            tmp,
            int(spec["cases"]),
            size=int(spec["size"]),
            seed=int(spec.get("seed", 0)),
            et_label=int(spec.get("et_label", 4)),
            layout=str(spec.get("layout", "brats2021")),
            val_fraction=float(spec.get("val_fraction", 0.2)),
            workers=max(1, min(int(spec.get("workers", 1)), os.cpu_count() or 1)),
            progress=progress,
        )
        try:
            os.replace(tmp, folder)  # atomic publish of the whole folder
        except OSError:
            if not datalist.is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return datalist
