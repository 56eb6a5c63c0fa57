"""The study folder's shared inputs: its record (``study.json``: the study id and the setup
every run shares), its dataset (generated phantoms when no ``--data``) and the validation cases
every run is scored on (``validation.json``)."""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from segmerge.data import cached_phantoms, load_dataset
from segmerge.study.common import StudyError, atomic_write_json
from segmerge.study.evaluation import write_validation_datalist

__all__ = ["open_study_record", "study_dataset", "validation_cases"]


def open_study_record(
    out: Path, signature: dict[str, Any], overwrite: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """The record of the study in ``out`` (``study.json``), made when there is none.

    Raises:
        StudyError: ``out`` holds a study with another signature (setup) and not ``overwrite``;
            with ``overwrite`` a new study starts there (its ``methods/`` removed).
    """
    path = out / "study.json"
    record: dict[str, Any] | None = None
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            record = None
    if record is not None and record.get("signature") != signature:
        old = record.get("signature", {})
        diffs = [k for k in signature if old.get(k) != signature[k]]
        if not overwrite:
            raise StudyError(
                f"--output {out} holds study {record.get('study_id')} with another setup "
                f"(differs in: {', '.join(diffs)}); every run of a study must share it. "
                "Use another --output, or --overwrite to start a new study there"
            )
        log(f"starting a new study in {out} (setup changed: {', '.join(diffs)})")
        shutil.rmtree(out / "methods", ignore_errors=True)
        record = None
    if record is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        record = {
            "study_id": f"study-{stamp}-{uuid.uuid4().hex[:6]}",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "signature": signature,
        }
        atomic_write_json(path, record)
    return record


def study_dataset(
    data: Path | None,
    out: Path,
    phantoms: Mapping[str, Any],
    et_label: int,
    workers: int,
    log: Callable[[str], None],
) -> Path:
    """``data`` (absolute), or the budget's phantoms in ``<out>/data/phantoms`` (written once)."""
    if data is not None:
        return Path(data).absolute()
    folder = out / "data" / "phantoms"
    if (folder / "dataset.json").is_file():
        return folder
    spec = {"cases": 20, "size": 64, **dict(phantoms)}
    spec.update(et_label=et_label, workers=workers)
    log(f"writing {spec['cases']} phantom case(s) of {spec['size']}³ to {folder} ...")
    cached_phantoms(folder, spec)  # the data package's cache, shared with train
    return folder


def validation_cases(data: Path, et_label: int, out: Path) -> tuple[int, Path]:
    """The number of validation cases of ``data`` and ``<out>/validation.json`` listing them.

    Raises:
        StudyError: an unreadable dataset, or one without validation cases.
    """
    try:
        spec = load_dataset(data, et_label=et_label)
    except ValueError as err:
        raise StudyError(f"dataset {data}: {err}") from err
    if not spec.validation:
        raise StudyError(
            f"dataset {data}: no validation case; the study evaluates every run on the "
            "validation split"
        )
    return len(spec.validation), write_validation_datalist(spec.validation, out / "validation.json")
