"""The files a training writes outside its checkpoints: folder checks, the lock, the weights.

:func:`claim_outputs` runs before anything is trained (rank 0): the output and bundle folders
take a write that is synced (:data:`PROBE_BYTES`: an empty file still fits on a full disk), the
output folder's lock is taken, the tracking store answers. :func:`publish_weights` writes the
weights of a finished run: this run's copy ``models/<run id>/model.pt`` first (its MLflow
artifact), then the bundle's ``models/model.pt``, each atomic and each with the network they fit
as data (``network.json``: ``predict`` and the bundle rebuild it).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from segmerge.atomic import write_text_atomic
from segmerge.bundle_paths import NETWORK_RECORD
from segmerge.engine.checkpoint import atomic_torch_save
from segmerge.engine.config import ConfigError
from segmerge.engine.lock import FolderLock, FolderLocked
from segmerge.engine.settings import Settings
from segmerge.engine.store import check_tracking_uri

__all__ = ["PROBE_BYTES", "check_writable", "claim_outputs", "publish_weights"]

PROBE_BYTES = 1 << 20
"""Bytes the writability check writes and syncs (an empty file still fits on a full disk)."""


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and write and sync :data:`PROBE_BYTES` there, else ConfigError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise ConfigError(f"{what} {folder} is not writable: {err}") from err


def claim_outputs(s: Settings, say: Callable[[str], None]) -> FolderLock:
    """Check the folders, take the output folder's lock, check the store (rank 0 only).

    Raises:
        ConfigError: a folder that cannot be written, a lock held by a live training, an
            unusable tracking store (the lock is released again).
    """
    check_writable(s.output_dir, "output folder")
    check_writable(s.bundle_root / "models", "bundle models folder")
    try:
        lock = FolderLock(s.output_dir).acquire()
    except FolderLocked as err:
        raise ConfigError(str(err)) from err
    try:
        if lock.took_over:
            old = lock.took_over
            say(
                f"output folder {s.output_dir}: taking over the lock left by pid "
                f"{old.get('pid')} on {old.get('host')} (started {old.get('started')}), "
                "which is no longer running"
            )
        check_tracking_uri(s.tracking_uri)
    except ValueError as err:
        lock.release()
        raise ConfigError(str(err)) from err
    return lock


def publish_weights(
    weights: Mapping[str, Any], bundle_root: Path, run_id: str | None, network_def: Any
) -> tuple[Path, Path]:
    """Write the weights and their ``network.json`` (see the module docstring).

    Returns:
        ``(models/<run id>/model.pt, models/model.pt)``.
    """
    models = bundle_root / "models"
    run_copy = atomic_torch_save(weights, models / str(run_id) / "model.pt")
    bundle = atomic_torch_save(weights, models / "model.pt")
    network = json.dumps(network_def, indent=1) + "\n"
    write_text_atomic(run_copy.with_name(NETWORK_RECORD), network)
    write_text_atomic(bundle.with_name(NETWORK_RECORD), network)
    return run_copy, bundle
