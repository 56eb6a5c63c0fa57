"""The data of one training: the dataset (or the cached phantoms), its checks, the loaders.

:func:`build_data` finds the dataset (``dataset#path`` or the phantom cache, written once and
shared with ``compare``), checks every case (``--skip-invalid`` leaves the broken ones out, the
same ones on every rank), and builds the cached datasets, the fixed OGR patches and a summary
logged with the run. :meth:`TrainingData.loader` is the training loader from a given step
(:class:`~segmerge.engine.sampling.StreamSampler`: a resumed run draws what the uninterrupted
one would have drawn).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.data import CacheDataset, DataLoader

from segmerge.data import cached_phantoms, load_dataset, phantom_cache_dir, validate_dataset
from segmerge.engine.config import ConfigError
from segmerge.engine.dist import barrier, broadcast_object
from segmerge.engine.outputs import check_writable
from segmerge.engine.sampling import SeededCacheDataset, StreamSampler
from segmerge.engine.settings import Settings, check_int, root_message
from segmerge.engine.validation import crop_around_tumour

__all__ = [
    "TrainingData",
    "build_data",
    "dataset_location",
    "phantom_cache_path",
    "phantom_spec",
]


def phantom_cache_path(cache_dir: str | os.PathLike, spec: Mapping[str, Any]) -> Path:
    """``<cache_dir>/phantoms-<hash of the generation arguments>`` (the data package's cache)."""
    return phantom_cache_dir(cache_dir, spec)


def phantom_spec(parser: ConfigParser) -> dict[str, Any]:
    """Generation arguments of the default phantom dataset (what its cache folder hashes)."""
    ds = parser.get_parsed_content("dataset")
    spec = dict(ds["phantoms"])
    spec["et_label"] = ds["et_label"]
    return spec


def dataset_location(parser: ConfigParser) -> Path:
    """Where the configured dataset is: ``dataset#path`` or the phantom cache folder."""
    ds = parser.get_parsed_content("dataset")
    if ds.get("path"):
        return Path(ds["path"]).expanduser()
    cache = Path(parser.get_parsed_content("cache_dir")).expanduser().absolute()
    return phantom_cache_path(cache, phantom_spec(parser))


@dataclass
class TrainingData:
    """The datasets of a training (see :func:`build_data`).

    Attributes:
        train_ds: the training cases (patches are drawn per step, seeded by the step).
        val_ds: the validation cases (at most ``validation#max_cases``).
        ogr_train_patches / ogr_val_patches: fixed patches around the tumour of the first
            ``validation#ogr_cases`` training / validation cases (OGR, held-out losses and
            Gradient-Blending's reference loss).
        summary: what the run logs as its ``data`` param.
    """

    train_ds: SeededCacheDataset
    val_ds: CacheDataset
    ogr_train_patches: list[Any]
    ogr_val_patches: list[Any]
    summary: dict[str, Any]

    def loader(self, s: Settings, start_step: int, rank: int, world: int) -> DataLoader:
        """The training loader from ``start_step`` (this rank's share of every batch)."""
        sampler = StreamSampler(
            len(self.train_ds), s.batch_size, s.total_steps,
            start_step=start_step, seed=s.seed, rank=rank, world=world,
        )  # fmt: skip
        return DataLoader(
            self.train_ds,
            batch_size=s.batch_size,
            sampler=sampler,
            num_workers=s.num_workers,
            pin_memory=s.device.type == "cuda",
            persistent_workers=False,
        )


def _dataset_path(parser: ConfigParser, s: Settings, is_main: bool, progress: bool) -> Path:
    ds = parser.get_parsed_content("dataset")
    if ds.get("path"):
        return Path(ds["path"]).expanduser()
    spec = phantom_spec(parser)
    size = check_int("dataset#phantoms#size", spec.get("size"), 16)
    check_int("dataset#phantoms#cases", spec.get("cases"), 2)
    if size < s.patch_size:
        raise ConfigError(f"dataset#phantoms#size ({size}) must be >= patch_size ({s.patch_size})")
    folder = phantom_cache_path(s.cache_dir, spec)
    if is_main and not (folder / "dataset.json").is_file():
        check_writable(s.cache_dir, "cache folder")
        cached_phantoms(folder, spec, progress=progress)  # shared with compare
    barrier()
    return folder


def _listing(items: list[str], n: int = 20) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def build_data(
    parser: ConfigParser, s: Settings, rank: int, world: int, say: Callable[[str], None]
) -> TrainingData:
    """Find, check and load the dataset (see the module docstring).

    Raises:
        ConfigError: unreadable dataset, invalid cases without ``--skip-invalid``, no training
            or validation case left, transforms that cannot be built.
    """
    g = parser.get_parsed_content
    ds = g("dataset")
    path = _dataset_path(parser, s, rank == 0, s.progress)
    try:
        spec = load_dataset(
            path, et_label=int(ds["et_label"]), allow_missing=bool(ds.get("allow_missing"))
        )
    except ValueError as err:
        raise ConfigError(f"dataset {path}: {err}") from err
    cavity = bool(ds.get("resection_cavity", False))
    problems = (
        validate_dataset(spec, int(ds["et_label"]), resection_cavity=cavity) if rank == 0 else []
    )
    bad = {getattr(pr, "case", None) for pr in problems}
    if problems and not ds.get("skip_invalid"):
        listing = "\n  ".join(str(pr) for pr in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConfigError(
            f"dataset {path} has {len(problems)} problem(s) (--skip-invalid skips those "
            f"cases):\n  {listing}{more}"
        )
    skipped = sorted(str(c) for c in bad if c is not None)
    if skipped:
        say(
            f"--skip-invalid: leaving out {len(skipped)} case(s) of {path}: "
            f"{_listing(skipped)} (problems: check-data {path})"
        )
    train_items = [c for c in spec.training if c.get("case_id") not in bad]
    val_items = [c for c in spec.validation if c.get("case_id") not in bad]
    if world > 1:  # every rank must drop the same cases
        box = broadcast_object(
            [[c["case_id"] for c in train_items], [c["case_id"] for c in val_items]]
        )
        train_items = [c for c in spec.training if c["case_id"] in set(box[0])]
        val_items = [c for c in spec.validation if c["case_id"] in set(box[1])]
    if not train_items:
        raise ConfigError(f"dataset {path}: no valid training case")
    if not val_items:
        raise ConfigError(f"dataset {path}: no validation case (needed for validation/OGR)")
    if s.max_val_cases:
        val_items = val_items[: s.max_val_cases]
    n_all = len(spec.training) + len(spec.validation)
    summary = {
        "path": str(path),
        "layout": spec.layout,
        "et_label": int(ds["et_label"]),
        "n_training": len(train_items),
        "n_validation": len(val_items),
        "n_skipped_invalid": n_all - len(train_items) - len(val_items),
        "skipped_cases": skipped,
    }
    try:
        train_tf = g("train_transforms")
        val_tf = g("val_transforms")
    except Exception as err:
        raise ConfigError(f"invalid transforms: {root_message(err)}") from err
    cache_rate = float(g("cache_rate"))
    train_ds = SeededCacheDataset(
        train_items, train_tf, cache_rate=cache_rate, num_workers=None, progress=False
    )
    val_ds = CacheDataset(val_items, val_tf, cache_rate=cache_rate, progress=False)
    heldout = CacheDataset(train_items[: s.ogr_cases], val_tf, progress=False)
    roi = [s.patch_size] * 3
    ogr_train = [crop_around_tumour(heldout[i], roi) for i in range(len(heldout))]
    n_val = min(s.ogr_cases, len(val_ds))
    ogr_val = [crop_around_tumour(val_ds[i], roi) for i in range(n_val)]
    return TrainingData(train_ds, val_ds, ogr_train, ogr_val, summary)
