"""What a training produced: :class:`TrainResult`, its JSON file and the printed summary.

``python -m segmerge train`` writes the result of rank 0 to ``<checkpoint_dir>/result.json``
(:data:`RESULT_NAME`, atomically) when it returns, finished or interrupted; ``compare`` reads it
(:func:`read_result`) instead of the engine's folders and checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from segmerge.atomic import write_text_atomic
from segmerge.conventions import REGIONS
from segmerge.engine.settings import root_message
from segmerge.engine.store import ui_command

__all__ = [
    "RESULT_NAME",
    "TrainResult",
    "TrainingFailed",
    "find_result",
    "format_summary",
    "read_result",
    "write_result",
]

RESULT_NAME = "result.json"
"""File name of the result in the run's checkpoint folder."""


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        run_id: MLflow run id (None on ranks other than 0).
        tracking_uri: MLflow tracking URI.
        dice: validation Dice per region and mean of the weights written to the bundle.
        hd95: validation HD95 per region and mean of those weights.
        best_epoch: epoch of the best validation.
        model_path: ``<bundle_root>/models/model.pt`` (the latest run's weights).
        run_model_path: ``<bundle_root>/models/<run id>/model.pt``, this run's own copy.
        weights: ``"best"`` or ``"last"``: which weights were published (dice/hd95 are theirs).
        resumed_from: the checkpoint's MLflow run when a resume started a new run.
        notes: what the run said about its ending (tracking problems, a second interrupt).
        checkpoint_dir: folder holding ``last.pt`` and ``best.pt``.
        iteration: steps done.
        interrupted: True when stopped by SIGINT/SIGTERM (a checkpoint was saved).
        wall_s: seconds from setup to the end.
        rank: this process's rank (only rank 0 reports).
        network_def: the network the weights fit, as plain data (the resolved ``network_def``).
        patch_size: the training patch edge (voxels).
        et_label: the label value of enhancing tumour in the dataset.
        device: the device it trained on.
    """

    run_id: str | None
    tracking_uri: str
    dice: dict[str, float] = field(default_factory=dict)
    hd95: dict[str, float] = field(default_factory=dict)
    best_epoch: int = -1
    model_path: Path | None = None
    run_model_path: Path | None = None
    weights: str = ""
    resumed_from: str | None = None
    notes: list[str] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    iteration: int = 0
    interrupted: bool = False
    wall_s: float = 0.0
    rank: int = 0
    network_def: dict[str, Any] | None = None
    patch_size: int = 0
    et_label: int = 4
    device: str = ""

    _PATHS = ("model_path", "run_model_path", "checkpoint_dir")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (paths as strings)."""
        out = asdict(self)
        for key in self._PATHS:
            out[key] = None if out[key] is None else str(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, absent ones take defaults."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in cls._PATHS:
            if kwargs.get(key) is not None:
                kwargs[key] = Path(kwargs[key])
        return cls(**kwargs)


class TrainingFailed(RuntimeError):
    """Training stopped on an error after it started; the MLflow run is marked FAILED.

    Attributes:
        exit_status: what ``segmerge train`` returns (1).
    """

    exit_status = 1

    @classmethod
    def of(
        cls, err: BaseException, step: int, run_id: str | None, output_dir: Path, last: Path,
        status_taken: bool,
    ) -> TrainingFailed:  # fmt: skip
        """The one line that says what stopped the run at ``step`` and what is kept."""
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            what = f"the disk is full ({err.filename or output_dir}: {err.strerror})"
        elif isinstance(err, OSError):
            what = f"a file could not be written or read: {err}"
        else:
            what = root_message(err)
        kept = f"; the last checkpoint ({last}) is kept: --resume continues from it"
        kept = kept if last.is_file() else ""
        ended = "" if status_taken else " (the store did not take the status)"
        return cls(
            f"training stopped at step {step}: {what}; MLflow run {run_id} marked "
            f"FAILED{ended}{kept}"
        )


def write_result(result: TrainResult, path: str | os.PathLike | None = None) -> Path:
    """Write ``result`` as JSON, atomically; default ``<checkpoint_dir>/result.json``."""
    if path is None:
        if result.checkpoint_dir is None:
            raise ValueError("write_result: the result names no checkpoint folder")
        path = result.checkpoint_dir / RESULT_NAME
    return write_text_atomic(path, json.dumps(result.to_dict(), indent=1) + "\n")


def read_result(path: str | os.PathLike) -> TrainResult:
    """Read a result written by :func:`write_result` (plain JSON: nothing in it is evaluated).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a JSON object with ``run_id`` and ``tracking_uri``.
    """
    src = Path(path)
    try:
        data = json.loads(src.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"training result {src} is not JSON: {err}") from err
    if not isinstance(data, dict) or not {"run_id", "tracking_uri"} <= set(data):
        raise ValueError(f"training result {src} is not a segmerge train result")
    return TrainResult.from_dict(data)


def find_result(output_dir: str | os.PathLike) -> Path | None:
    """The result file of the one training written to ``output_dir`` (``--output``):
    ``<output_dir>/checkpoints/<run id>/result.json``; None when there is none.

    Raises:
        ValueError: more than one run of ``output_dir`` has a result.
    """
    found = sorted(Path(output_dir).glob(f"checkpoints/*/{RESULT_NAME}"))
    if len(found) > 1:
        listing = ", ".join(str(f) for f in found)
        raise ValueError(f"{output_dir}: more than one training result ({listing})")
    return found[0] if found else None


def format_summary(result: TrainResult) -> str:
    """The Dice/HD95 table and the ``mlflow ui`` command printed at the end."""
    lines = []
    if result.dice:
        lines.append(f"validation (epoch {result.best_epoch}):  region   Dice    HD95")
        for region in (*REGIONS, "mean"):
            if region in result.dice:
                lines.append(
                    f"{'':>26}{region:<7}{result.dice[region]:.4f}  {result.hd95.get(region, float('nan')):.2f}"
                )
    if result.model_path is not None:
        which = f" ({result.weights} weights, epoch {result.best_epoch})" if result.weights else ""
        lines.append(
            f"weights: {result.model_path}{which}; this run's copy: {result.run_model_path}"
        )
    if result.resumed_from:
        lines.append(f"continues MLflow run {result.resumed_from} (tag segmerge.resumed_from)")
    if result.checkpoint_dir is not None:
        lines.append(f"checkpoints: {result.checkpoint_dir}")
    if result.run_id:
        lines.append(f"MLflow run {result.run_id}; open it with:")
        lines.append(f"  {ui_command(result.tracking_uri)}")
    return "\n".join(lines)
