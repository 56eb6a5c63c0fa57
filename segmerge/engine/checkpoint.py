"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings and containers (so the safe
``weights_only`` loader reads it): model, optimizer, scheduler and aggregator state dicts, the
random states of torch (CPU and CUDA), numpy and Python, the step/epoch counters, the best metric
and the MLflow run id. numpy's random state is stored as a dict of a tensor and numbers because
the safe loader refuses numpy arrays.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmerge.atomic import atomic_destination

__all__ = [
    "atomic_torch_save",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "resolve_resume_path",
]


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
    try:
        state = torch.load(src, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt or foreign file: say which
        raise ValueError(f"checkpoint {src} cannot be read safely: {err}") from err
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


def rng_state() -> dict[str, Any]:
    """Random states of torch, CUDA, numpy and Python as safe-loadable containers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "state": list(internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["gauss"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
