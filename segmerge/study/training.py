"""Training one (method, seed) of the study: its ``python -m segmerge train`` command, or the
``--resume`` of its interrupted training, run as a child process into
``<output>/methods/<method>/seed-<seed>``, then ``train.json``."""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segmerge.engine.result import find_result, read_result
from segmerge.study.common import atomic_write_json
from segmerge.study.processes import Processes, child_env
from segmerge.study.tracking import StudyTracking

if TYPE_CHECKING:
    from segmerge.study.runner import StudySettings

__all__ = ["Trainer", "method_train_command", "run_dir"]


def run_dir(out: Path, method: str, seed: int) -> Path:
    """``<out>/methods/<method>/seed-<seed>``."""
    return out / "methods" / method / f"seed-{seed}"


def method_train_command(
    settings: StudySettings,
    method: str,
    seed: int,
    data: Path,
    tracking_uri: str,
    device: str | None = None,
) -> list[str]:
    """The ``python -m segmerge train`` command of one (method, seed) (list of arguments)."""
    folder = run_dir(settings.output, method, seed)
    cmd = [sys.executable, "-m", "segmerge", "train", "--aggregator", method]
    cmd += ["--data", str(data), "--seed", str(seed)]
    cmd += ["--output", str(folder), "--bundle_root", str(folder)]
    cmd += ["--tracking-uri", tracking_uri, "--experiment", settings.experiment]
    cmd += ["--run_name", f"{method}-seed{seed}", "--progress", "false"]
    device = device or (settings.slots()[0] if settings.devices else settings.device)
    if device:
        cmd += ["--device", device]
    cmd += settings.budget.train_args() + list(settings.extra)
    return cmd + ["--num_threads", str(settings.threads())]


class Trainer:
    """Trains the runs of one study.

    Args:
        settings: the study's settings (``output`` absolute).
        data: the dataset every run trains on.
        tracking_uri: the MLflow store.
        config_dir: the configs folder the children read.
        threads: intra-op threads of each child.
        processes: runs the children.
        tracking: the study's MLflow runs.
        log: where progress lines go.
    """

    def __init__(
        self,
        settings: StudySettings,
        data: Path,
        tracking_uri: str,
        config_dir: Path,
        threads: int,
        processes: Processes,
        tracking: StudyTracking,
        log: Callable[[str], None],
    ) -> None:
        self.s, self.data, self.tracking_uri = settings, data, tracking_uri
        self.config_dir, self.threads = config_dir, threads
        self.processes, self.tracking, self.log = processes, tracking, log

    def run_dir(self, method: str, seed: int) -> Path:
        """``<output>/methods/<method>/seed-<seed>``."""
        return run_dir(self.s.output, method, seed)

    def run_ids(self, method: str, seed: int) -> list[str]:
        """The MLflow run ids of the run's checkpoints (one per attempt left on disk)."""
        ckpt = self.run_dir(method, seed) / "checkpoints"
        if not ckpt.is_dir():
            return []
        return sorted(p.name for p in ckpt.iterdir() if p.is_dir())

    def discard(self, method: str, seed: int) -> None:
        """Remove an earlier attempt: its folder and its MLflow run(s)."""
        self.tracking.delete_runs(self.run_ids(method, seed))
        shutil.rmtree(self.run_dir(method, seed), ignore_errors=True)

    def command(self, method: str, seed: int, device: str | None, label: str) -> list[str]:
        """``--resume`` of the one interrupted training left, else (after removing whatever an
        earlier attempt left) the fresh training command."""
        folder = self.run_dir(method, seed)
        last = [folder / "checkpoints" / r / "last.pt" for r in self.run_ids(method, seed)]
        last = [p for p in last if p.is_file()]
        if len(last) == 1:
            self.log(f"{label} resuming the interrupted training from {last[0]}")
            return [sys.executable, "-m", "segmerge", "train", "--resume", str(last[0])]
        if folder.exists():
            self.discard(method, seed)
        return method_train_command(self.s, method, seed, self.data, self.tracking_uri, device)

    def train(self, method: str, seed: int, device: str | None, label: str) -> dict[str, Any]:
        """Train (or resume) the run in a child process; its ``train.json`` record.

        Raises:
            RuntimeError: the training failed (with the last lines of its log).
            Stopped: the study is being interrupted.
        """
        folder = self.run_dir(method, seed)
        cmd = self.command(method, seed, device, label)
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / "train.log"
        self.log(f"{label} training on {device or 'the default device'} (log: {log_path})")
        tags = json.dumps(self.tracking.run_tags(method, seed))
        env = child_env(self.config_dir, self.threads, {"SEGMERGE_RUN_TAGS": tags})
        t0 = time.perf_counter()
        code = self.processes.run((method, seed), cmd, log_path, env)
        seconds = time.perf_counter() - t0
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(
                f"training exited with status {code} after {seconds:.0f} s; last lines of "
                f"{log_path}:\n    " + "\n    ".join(tail),
            )
        result_path = find_result(folder)  # what segmerge train says it produced
        if result_path is None:
            raise RuntimeError(f"training finished but wrote no result in {folder}/checkpoints")
        result = read_result(result_path)
        record = {
            "method": method,
            "seed": seed,
            "run_id": result.run_id,
            "result": str(result_path),
            "train_seconds": seconds,
            "command": cmd,
            "device": device,
            "threads": self.threads,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(folder / "train.json", record)
        return record
