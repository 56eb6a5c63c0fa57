"""Scoring one trained (method, seed) of the study: its network read back as data, the
``python -m segmerge.study.evaluation`` child process on the validation cases, and the digest of
its weights."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from segmerge.engine import load_checkpoint, read_result
from segmerge.engine.checkpoint import stored_config
from segmerge.overrides import find_expression
from segmerge.study.common import atomic_write_json
from segmerge.study.evaluation import EvaluationResult
from segmerge.study.processes import Processes, child_env

__all__ = ["Evaluator", "trained_config", "weights_sha256"]


def weights_sha256(path: str | Path) -> str:
    """SHA-256 over a saved state dict's tensors (names and bytes, in name order): equal weights
    give equal digests whatever the pickling."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors only
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def trained_config(
    folder: Path, run_id: str, result_path: str | None = None
) -> tuple[dict[str, Any], int, int, str]:
    """Network definition, patch size, ET label and device of the trained run.

    Read as data from the training's result (``result.json``, written by ``segmerge train``;
    a study trained by a version that wrote none: the checkpoint's resolved configuration,
    format 2): nothing in it is evaluated, and a value that is still an expression, or a
    ``_target_`` outside segmerge's networks, is refused (a file on disk must never run code).
    """
    if result_path is not None:
        source: Path = Path(result_path)
        result = read_result(source)
        values = {
            "network_def": result.network_def,
            "patch_size": result.patch_size,
            "dataset#et_label": result.et_label,
            "device": result.device or "cpu",
        }
    else:
        source = folder / "checkpoints" / run_id / "last.pt"
        config = stored_config(load_checkpoint(source), source)
        dataset = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
        values = {
            "network_def": config.get("network_def"),
            "patch_size": config.get("patch_size"),
            "dataset#et_label": dataset.get("et_label", 4),
            "device": config.get("device", "cpu"),
        }
    for cid, value in values.items():
        bad = find_expression(value)
        if bad is not None:
            raise ValueError(
                f"{source}: '{cid}' holds {bad!r}, an expression; the study reads "
                "training results as data only (train it again with this version of segmerge)"
            )
    network_def = values["network_def"]
    target = network_def.get("_target_") if isinstance(network_def, dict) else None
    if not isinstance(target, str) or not target.startswith("segmerge.nets."):
        raise ValueError(
            f"{source}: 'network_def#_target_' is {target!r}; expected a network of segmerge.nets"
        )
    patch = values["patch_size"]
    patch = patch[0] if isinstance(patch, list) and patch else patch
    return dict(network_def), int(patch), int(values["dataset#et_label"]), str(values["device"])


class Evaluator:
    """Scores trained runs on the validation cases, each in a child process.

    Args:
        evaluation: the budget's evaluation settings (``roi_size``, ``overlap``, ...).
        val_datalist: the validation cases.
        config_dir: the configs folder (``inference.json``).
        threads: the most intra-op threads of each child.
        processes: runs the children.
    """

    def __init__(
        self,
        evaluation: Mapping[str, Any],
        val_datalist: Path,
        config_dir: Path,
        threads: int,
        processes: Processes,
    ) -> None:
        self.ev, self.val_datalist, self.config_dir = evaluation, val_datalist, config_dir
        self.threads, self.processes = threads, processes

    def evaluate(
        self,
        key: tuple[str, int],
        folder: Path,
        run_id: str,
        device: str | None,
        result: str | None = None,
    ) -> EvaluationResult:
        """Score the weights trained in ``folder`` (``result``: the training's ``result.json``).

        Raises:
            RuntimeError: the evaluation failed (with the last lines of its log).
            Stopped: the study is being interrupted.
        """
        network_def, patch, et_label, trained_on = trained_config(folder, run_id, result)
        ev = self.ev
        out_dir = folder / "evaluation"
        out_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "model_path": str(folder / "models" / "model.pt"),
            "datalist": str(self.val_datalist),
            "network_def": network_def,
            "roi_size": int(ev.get("roi_size") or patch),
            "et_label": et_label,
            "device": device or trained_on,
            "overlap": float(ev.get("overlap", 0.25)),
            "sw_batch_size": int(ev.get("sw_batch_size", 1)),
            "out_dir": str(out_dir),
            "config_file": str(self.config_dir / "inference.json"),
            "num_threads": min(int(ev.get("num_threads") or self.threads), self.threads),
            "result": str(out_dir / "evaluation.json"),
        }
        spec_path = atomic_write_json(out_dir / "spec.json", spec)
        cmd = [sys.executable, "-m", "segmerge.study.evaluation", str(spec_path)]
        env = child_env(
            self.config_dir, self.threads, {"OMP_NUM_THREADS": str(spec["num_threads"])}
        )
        code = self.processes.run(key, cmd, out_dir / "evaluation.log", env)
        if code != 0:
            tail = (out_dir / "evaluation.log").read_text(errors="replace").strip()
            raise RuntimeError(
                f"evaluation exited with status {code}; last lines of {out_dir / 'evaluation.log'}"
                ":\n    " + "\n    ".join(tail.splitlines()[-10:])
            )
        return EvaluationResult.from_dict(json.loads((out_dir / "evaluation.json").read_text()))
