"""Checkpoints: a :class:`TrainingState`, written atomically, read with ``weights_only=True``.

On disk a checkpoint is a plain dict of tensors, numbers, strings and containers (so the safe
``weights_only`` loader reads it): :meth:`TrainingState.to_dict` writes, and
:meth:`TrainingState.from_dict` reads, format 2 (and the format-1 checkpoints of older versions).
The keys are the model, optimizer, scheduler and aggregator state dicts, the random states of
torch (CPU and CUDA), numpy and Python (:mod:`segmerge.engine.rng`), the step/epoch counters, the
best metric, the MLflow run id and the resolved configuration, which is data
(:mod:`segmerge.engine.config_record`: nothing read from a checkpoint is ever evaluated).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segmerge.atomic import atomic_destination
from segmerge.engine.config import ConfigError
from segmerge.engine.config_record import (
    changed_settings,
    resolved_config,
    restore_config,
    stored_config,
)
from segmerge.engine.rng import rng_state, set_rng_state
from segmerge.overrides import decode_literal

CHECKPOINT_FORMAT = 2
"""2: ``config`` is the resolved configuration (JSON) plus ``config_expressions``; 1: raw config."""

__all__ = [
    "RESUME_MAY_CHANGE",
    "TrainingState",
    "check_resume_changes",
    "atomic_torch_save",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "resolve_resume_path",
    "resolved_config",
    "restore_config",
    "stored_config",
    "changed_settings",
    "CHECKPOINT_FORMAT",
]

RESUME_MAY_CHANGE: tuple[str, ...] = (
    "epochs", "stop_after", "checkpoint_every", "log_every", "progress", "num_threads",
    "num_workers", "device", "bundle_root", "output_dir", "cache_dir", "tracking_uri",
    "experiment", "run_name", "weights", "cache_rate", "validation#sw_batch_size",
    "dataset#phantoms#workers",
    # follows epochs; the scheduler's own state (restored) keeps the T_max it ran with
    "lr_scheduler#T_max",
)  # fmt: skip
"""Settings a resume may change (recorded in the run); any other change is refused: it would make
the continued run differ from an uninterrupted one (aggregator, network, data, seed, lr...)."""


def check_resume_changes(
    state: Mapping[str, Any],
    source: Any,
    raw_config: Mapping[str, Any],
    resolved: Mapping[str, Any],
) -> dict[str, tuple[Any, Any]]:
    """``{id: (checkpoint's, now)}`` of the settings that differ from the checkpoint's.

    Args:
        state: the loaded checkpoint; source: its path (messages).
        raw_config: ``parser.get()`` now (compared with a format-1 checkpoint).
        resolved: ``resolved_config(parser)[0]`` now (compared with a format-2 checkpoint).

    Raises:
        ConfigError: a change outside :data:`RESUME_MAY_CHANGE`.
    """
    stored = stored_config(state, source)
    if int(state.get("format", 1)) >= 2:
        now: Mapping[str, Any] = resolved
    else:  # format 1 stored the raw configuration
        raw = decode_literal(raw_config)
        now = {k: v for k, v in raw.items() if k not in ("_comment", "imports")}
        stored = {k: v for k, v in stored.items() if k not in ("_comment", "imports")}
    changes = changed_settings(stored, now)
    refused = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        listing = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in sorted(refused.items()))
        raise ConfigError(
            f"--resume {source}: {listing} differ from the checkpoint's settings; "
            "the continued run would not be the run it continues. Start a new training for "
            f"that (a resume may change: {', '.join(RESUME_MAY_CHANGE)})"
        )
    return changes


@dataclass
class TrainingState:
    """Everything a resume needs, one field per key of the checkpoint dict (same names).

    Attributes:
        model, optimizer, scheduler, aggregator, train_step, scaler, ogr, metrics, objectives:
            the state dicts (``{}`` for an absent scheduler / scaler / objective draws).
        rng: :func:`rng_state` at the step.
        iteration: steps done; epoch: ``iteration // steps_per_epoch``.
        best: ``{"metric", "epoch", "dice", "hd95"}`` of the best validation so far.
        run_id, tracking_uri: the MLflow run.
        config: the resolved configuration as JSON text (format 1: the raw configuration).
        config_expressions: ids that kept their expression text; config_derived: ``{id:
            expression}`` of values computed by an expression (see ``resolved_config``).
        format: :data:`CHECKPOINT_FORMAT` when written by this version.
    """

    model: Mapping[str, Any]
    optimizer: Mapping[str, Any]
    aggregator: Mapping[str, Any]
    train_step: Mapping[str, Any]
    ogr: Mapping[str, Any]
    rng: Mapping[str, Any]
    iteration: int
    best: Mapping[str, Any]
    epoch: int = 0
    scheduler: Mapping[str, Any] = field(default_factory=dict)
    scaler: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    objectives: Mapping[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    tracking_uri: str | None = None
    config: Any = None
    config_expressions: list[str] = field(default_factory=list)
    config_derived: Mapping[str, str] = field(default_factory=dict)
    format: int = CHECKPOINT_FORMAT

    _REQUIRED = (
        "model",
        "optimizer",
        "aggregator",
        "train_step",
        "ogr",
        "rng",
        "iteration",
        "best",
    )

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint dict (format 2 keys, in the order this version has always written)."""
        return {
            "format": self.format,
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "aggregator": self.aggregator,
            "train_step": self.train_step,
            "scaler": self.scaler,
            "ogr": self.ogr,
            "metrics": self.metrics,
            "objectives": self.objectives,
            "rng": self.rng,
            "iteration": int(self.iteration),
            "epoch": int(self.epoch),
            "best": dict(self.best),
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "config": self.config,
            "config_expressions": list(self.config_expressions),
            "config_derived": dict(self.config_derived),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], source: str | os.PathLike) -> TrainingState:
        """Read a loaded checkpoint dict (format 1 or 2); ``source`` names it in messages.

        Raises:
            ValueError: a key a resume needs is absent (``--resume <source>: ... holds no ...``).
        """
        if not isinstance(state.get("model"), Mapping):
            raise ValueError(f"--resume {source}: the checkpoint holds no model weights")
        for key in cls._REQUIRED:
            if key not in state:
                raise ValueError(
                    f"--resume {source}: the checkpoint holds no {key!r}; it was not written by "
                    "segmerge train and cannot be resumed"
                )
        optional = {
            k: state[k]
            for k in ("scheduler", "scaler", "metrics", "objectives", "run_id", "tracking_uri")
            if state.get(k) is not None
        }
        return cls(
            **{k: state[k] for k in cls._REQUIRED if k != "iteration"},
            iteration=int(state["iteration"]),
            epoch=int(state.get("epoch", 0)),
            config=state.get("config"),
            config_expressions=list(state.get("config_expressions") or []),
            config_derived=dict(state.get("config_derived") or {}),
            format=int(state.get("format", 1)),
            **optional,
        )


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    A reader (or a process killed mid-write) sees either the previous file or the new one, never
    a truncated file.

    Args:
        obj: what to save.
        path: destination file; its folder is created if needed.

    Returns:
        The destination path.
    """
    with atomic_destination(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with the safe loader (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable segmerge checkpoint.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if src.stat().st_size == 0:
        raise ValueError(f"checkpoint {src} is empty (0 bytes): not a segmerge checkpoint")
    try:
        state = torch.load(src, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt or foreign file: say which
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {src} cannot be read safely: {reason}") from err
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        raise ValueError(f"{src} is not a segmerge training checkpoint (no model / iteration)")
    return state


def resolve_resume_path(path: str | os.PathLike) -> Path:
    """``--resume`` accepts a checkpoint file or a folder holding ``last.pt``."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(f"--resume {path}: no checkpoint at {p}")
    return p
