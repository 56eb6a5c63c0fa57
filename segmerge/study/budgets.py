"""Budgets of the comparison study: how much data, training and evaluation every method gets.

Budgets are data, in ``configs/compare.json`` beside ``configs/train.json`` (the same folder the
training command reads, see :func:`segmerge.engine.config.default_config_dir`)::

    "budgets": {"cpu": {"description": ..., "phantoms": {...}, "train": {...}, "evaluation": {...}}}

``train`` maps ``python -m segmerge train`` option names or config ids to values; they are passed
to every method alike as ``--<key> <json value>``, so a budget can set anything the training
command accepts and nothing else (unknown keys fail before the first method trains).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segmerge.bundle_paths import config_dir as find_config_dir
from segmerge.hints import suggest

__all__ = [
    "Budget",
    "STUDY_CONFIG",
    "load_study_config",
    "get_budget",
    "default_methods",
    "study_defaults",
]

STUDY_CONFIG = "compare.json"
"""File name of the study configuration inside the configs folder."""


@dataclass(frozen=True)
class Budget:
    """One budget preset.

    Attributes:
        name: preset name (``tiny``, ``cpu``, ``full``).
        description: what it is for.
        phantoms: arguments of :func:`segmerge.data.write_phantom_dataset` when no ``--data``.
        train: training options / config ids, identical for every method.
        evaluation: ``overlap`` and ``sw_batch_size`` of the subset evaluation.
    """

    name: str
    description: str = ""
    phantoms: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)

    def train_args(self) -> list[str]:
        """``["--epochs", "4", "--network_def#features", "[8, 16, 32, 64]", ...]``."""
        args: list[str] = []
        for key, value in self.train.items():
            args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        return args


def _config_dir(config_dir: str | Path | None) -> Path:
    if config_dir is not None:
        return Path(config_dir)
    return find_config_dir("compare.json")  # the file read here, looked up like every other config


def load_study_config(config_dir: str | Path | None = None) -> dict[str, Any]:
    """Read ``<configs>/compare.json``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it is not valid JSON or has no ``budgets`` object.
    """
    path = _config_dir(config_dir) / STUDY_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"study config {path} not found")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"study config {path}: invalid JSON ({err})") from err
    if not isinstance(content, Mapping) or not isinstance(content.get("budgets"), Mapping):
        raise ValueError(f"study config {path}: needs a 'budgets' object")
    return dict(content)


def default_methods(config_dir: str | Path | None = None) -> list[str]:
    """The methods compared when ``--methods`` is not given (``compare.json``'s ``methods``)."""
    return [str(m) for m in load_study_config(config_dir).get("methods", [])]


def study_defaults(config_dir: str | Path | None = None) -> dict[str, Any]:
    """``seeds`` (list of ints), ``reference`` (method name) and ``alpha`` of ``compare.json``.

    Raises:
        ValueError: a malformed value, naming the key.
    """
    content = load_study_config(config_dir)
    seeds = content.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not all(isinstance(x, int) and x >= 0 for x in seeds):
        raise ValueError(f"compare.json: 'seeds' must be a list of integers >= 0, got {seeds!r}")
    alpha = content.get("alpha", 0.05)
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"compare.json: 'alpha' must be in (0, 1), got {alpha!r}")
    return {
        "seeds": list(seeds),
        "reference": str(content.get("reference", "sum")),
        "alpha": float(alpha),
    }


def get_budget(name: str, config_dir: str | Path | None = None) -> Budget:
    """The preset called ``name``.

    Raises:
        ValueError: unknown name (with the closest valid one) or a malformed preset.
    """
    budgets = load_study_config(config_dir)["budgets"]
    if name not in budgets:
        hint = suggest(name, budgets, 0.4)
        raise ValueError(f"unknown budget {name!r}{hint}; available: {', '.join(sorted(budgets))}")
    raw = budgets[name]
    for key in ("phantoms", "train", "evaluation"):
        if not isinstance(raw.get(key, {}), Mapping):
            raise ValueError(f"budget {name!r}: '{key}' must be an object, got {raw[key]!r}")
    return Budget(
        name=name,
        description=str(raw.get("description", "")),
        phantoms=dict(raw.get("phantoms", {})),
        train=dict(raw.get("train", {})),
        evaluation=dict(raw.get("evaluation", {})),
    )
