"""What the study's parts share: its error and atomic JSON writes (:mod:`segmerge.study.runner`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segmerge.atomic import write_text_atomic

__all__ = ["StudyError", "atomic_write_json"]


class StudyError(ValueError):
    """The study cannot start: bad option, unusable output folder, mismatching earlier study."""


def atomic_write_json(path: str | Path, content: Any) -> Path:
    """Write JSON atomically (see :mod:`segmerge.atomic`)."""
    return write_text_atomic(path, json.dumps(content, indent=2, default=str) + "\n")
