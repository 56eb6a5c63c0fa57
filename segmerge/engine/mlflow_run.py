"""The MLflow run of one training: start or reopen it, log its params, artifacts and status.

:meth:`MlflowRun.start` decides whether a resume reopens the checkpoint's run
(:func:`run_to_continue`) or starts a new one tagged ``segmerge.resumed_from``, logs the params
and configuration of a new run, records a resume, and switches the :class:`Tracker` to resilient
mode (a store failing during training no longer stops it). :meth:`MlflowRun.publish` logs the end
of the run's plots and weights, :meth:`MlflowRun.end` its final status. Rank 0 talks to the store;
the other ranks hold a disabled tracker and learn the run id by broadcast.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import monai
import torch
from mlflow.tracking import MlflowClient

import segmerge
from segmerge.engine.config import ConfigError
from segmerge.engine.dist import broadcast_object
from segmerge.engine.metrics_buffer import StepMetrics
from segmerge.engine.parts import Parts
from segmerge.engine.settings import Settings, root_message
from segmerge.engine.store import bound_http_requests
from segmerge.engine.tracking import Tracker, TrackingError
from segmerge.engine.validation import ValidationResult

__all__ = ["MlflowRun", "run_params", "run_tags_from_env", "run_to_continue"]


def run_tags_from_env() -> dict[str, str]:
    """Tags of a new MLflow run from ``$SEGMERGE_RUN_TAGS`` (a JSON object of strings; unset or
    empty: none). Raises ``ConfigError`` naming the variable when it is not such an object."""
    text = os.environ.get("SEGMERGE_RUN_TAGS", "").strip()
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"$SEGMERGE_RUN_TAGS is not JSON: {err}") from err
    if not isinstance(tags, dict):
        raise ConfigError(f"$SEGMERGE_RUN_TAGS must be a JSON object, got {text[:80]!r}")
    return {str(k): str(v) for k, v in tags.items()}


def run_to_continue(
    tracking_uri: str, old: str | None, continue_run: bool
) -> tuple[str | None, str]:
    """On resume: the MLflow run to reopen (None: a new one) and the line that says so.

    Args:
        tracking_uri: the store of this training.
        old: the run id the checkpoint names.
        continue_run: reopen a finished run too (``--continue-run``).
    """
    if not old:
        return None, "resume: the checkpoint names no MLflow run; starting a new run"
    bound_http_requests()
    try:
        run = MlflowClient(tracking_uri=tracking_uri).get_run(old)
    except Exception as err:
        if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise ConfigError(f"MLflow store {tracking_uri}: {root_message(err)}") from err
        return None, (
            f"resume: the checkpoint's MLflow run {old} is not in {tracking_uri}; a new "
            f"run continues the checkpoint (tag segmerge.resumed_from={old})"
        )
    status = run.info.status
    complete = run.data.tags.get("segmerge.completed", "true") == "true"
    if status == "FINISHED" and complete and not continue_run:
        return None, (
            f"resume: MLflow run {old} is finished; a new run continues the checkpoint (tag "
            f"segmerge.resumed_from={old}; --continue-run reopens the finished run instead)"
        )
    return old, f"resume: continuing MLflow run {old} (it was {status})"


def run_params(
    parts: Parts, resolved: Mapping[str, Any], data: Mapping[str, Any], world: int, device: Any
) -> dict[str, Any]:
    """The params of a new run (flattened by the tracker)."""
    return {
        "config": resolved,
        "aggregator_repr": repr(parts.aggregator),
        "train_step_repr": repr(parts.train_step),
        "network_repr": repr(parts.network).splitlines()[0] + "...",
        "n_parameters": sum(p.numel() for p in parts.network.parameters()),
        "data": data,
        "versions": {
            "segmerge": getattr(segmerge, "__version__", "0"),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "mlflow": mlflow.__version__,
            "python": sys.version.split()[0],
        },
        "world_size": world,
        "device": str(device),
    }


class MlflowRun:
    """One training's MLflow run (see the module docstring); build it with :meth:`start`."""

    def __init__(
        self, tracker: Tracker, run_id: str | None, checkpoint_dir: Path, is_main: bool,
        resumed_from: str | None, say: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.tracker = tracker
        self.run_id = run_id
        self.checkpoint_dir = checkpoint_dir
        self.is_main = is_main
        self.resumed_from = resumed_from
        self.say = say

    @classmethod
    def start(
        cls, s: Settings, rank: int, world: int, say: Callable[[str], None],
        params: Callable[[], dict[str, Any]], raw_config: Any, resolved: Mapping[str, Any],
        resume: Mapping[str, Any] | None = None,
    ) -> MlflowRun:  # fmt: skip
        """Create (or reopen) the run and its checkpoint folder ``<output>/checkpoints/<run id>``.

        Args:
            params: the params of a new run (called on rank 0 only when the run is new).
            raw_config / resolved: logged as ``config/train.json`` / ``config/resolved.json``.
            resume: ``{"path", "run_id", "continue_run", "iteration", "changes"}`` of a resume.

        Raises:
            ConfigError: the store cannot be used (the run, if created, is marked FAILED).
        """
        is_main = rank == 0
        reopen, note = None, ""
        if resume is not None and is_main:
            reopen, note = run_to_continue(s.tracking_uri, resume["run_id"], resume["continue_run"])
        tags = {
            **run_tags_from_env(),
            "segmerge.command": "train",
            "segmerge.world_size": str(world),
            "segmerge.completed": "false",
        }
        resumed_from = None
        if resume is not None and reopen is None and resume["run_id"]:
            resumed_from = str(resume["run_id"])
            tags["segmerge.resumed_from"] = resumed_from
        try:
            tracker = Tracker(
                s.tracking_uri, experiment=s.experiment, run_name=s.run_name, run_id=reopen,
                enabled=is_main,
                # $SEGMERGE_RUN_TAGS (a JSON object) adds tags to a new run: compare passes
                # mlflow.parentRunId and its study tags so each training nests under the study
                tags=tags, say=say,
            )  # fmt: skip
        except (TrackingError, ConfigError) as err:
            raise ConfigError(str(err)) from err
        run_id = tracker.run_id
        if world > 1:
            run_id = broadcast_object(run_id)
        run = cls(tracker, run_id, s.checkpoint_root / str(run_id), is_main, resumed_from, say)
        if not is_main:
            return run
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for stale in run.checkpoint_dir.glob(".*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        try:
            if reopen is None:
                tracker.log_params(params())
                tracker.log_text(
                    json.dumps(raw_config, indent=2, default=repr), "config/train.json"
                )
                tracker.log_text(
                    json.dumps(resolved, indent=2, default=repr), "config/resolved.json"
                )
            if resume is not None:
                say(note)
                run._record_resume(resume, resolved)
        except TrackingError as err:  # the store broke right after the run was created
            tracker.resilient = True
            tracker.end("FAILED")
            raise ConfigError(str(err)) from err
        # from here on a failing store does not stop training (metrics are kept and retried)
        tracker.resilient = True
        return run

    def _record_resume(self, resume: Mapping[str, Any], resolved: Mapping[str, Any]) -> None:
        """Copy the source's best.pt into a new run's folder; record changed settings."""
        path = Path(resume["path"]) if resume["path"] else None
        source = path.parent if path is not None else None
        best = source / "best.pt" if source is not None else None
        if (
            best is not None
            and best.is_file()
            and source.resolve() != self.checkpoint_dir.resolve()
        ):
            shutil.copyfile(best, self.checkpoint_dir / "best.pt")
        it, changes = resume["iteration"], resume["changes"]
        tags = {f"segmerge.resumed_at_step.{it}": str(path)}
        if changes:
            text = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items()))
            tags[f"segmerge.resume_changes.{it}"] = text[:5000]
            self.say(f"resume: changed settings (recorded in the run): {text}")
            self.tracker.log_text(
                json.dumps(resolved, indent=2, default=repr),
                f"config/resolved-from-step-{it}.json",
            )
        self.tracker.set_tags(tags)

    def end(self, status: str) -> list[str]:
        """Give the run its final status; ``[the line that says what the store did not take]``
        (empty when it took everything)."""
        if not self.is_main or self.tracker.end(status):
            return []
        kept = ""
        if self.tracker.pending:
            path = self.checkpoint_dir / "unsent_metrics.jsonl"
            try:
                n = self.tracker.dump_pending(path)
                kept = f"; the {n} metric value(s) not sent are in {path}"
            except OSError as err:
                kept = f"; {self.tracker.pending} metric value(s) not sent ({err})"
        line = (
            f"MLflow run {self.run_id}: the store did not take everything "
            f"({self.tracker.failure}){kept}. Weights and checkpoints are written"
        )
        self.say(line)
        return [line]

    def log_window(self, metrics: StepMetrics, epoch: int) -> None:
        """Cosine / alpha / weight matrices of the steps since the last validation, as artifacts
        (``matrices/epoch_<n>/``: labelled heatmaps, JSON and CSV; any number of objectives)."""
        # plots selects matplotlib's Agg backend on import: imported when plotting, so that
        # importing segmerge.engine leaves the user's backend alone
        from segmerge.engine import plots

        window = metrics.take_window()
        if not self.is_main or not window["names"]:
            return
        folder = Path(tempfile.mkdtemp(prefix="segmerge-matrices-"))
        try:
            files = plots.matrix_artifacts(window, folder, title=f"epoch {epoch}")
            self.tracker.log_artifacts(files, f"matrices/epoch_{epoch:03d}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(
        self, metrics: StepMetrics, last: ValidationResult | None, model_path: Path,
        weights: str, weights_epoch: int,
    ) -> str | None:  # fmt: skip
        """The end-of-run plots and the weights as artifacts, then the tags of a completed run
        (``weights``: ``best`` or ``last``, of epoch ``weights_epoch``); the line that says the
        weights were not uploaded (None when they were)."""
        from segmerge.engine import plots  # imported when plotting (see log_window)

        tracker = self.tracker
        tracker.retry_now()  # the end of the run: worth one more try of a failing store
        folder = Path(tempfile.mkdtemp(prefix="segmerge-artifacts-"))
        try:
            files = []
            names, cosine, alpha = metrics.mean_matrices()
            if names:
                title = "cosine similarity (training mean)"
                files.append(plots.matrix_heatmap(cosine, names, title, folder / "cosine.png"))
                files.append(
                    plots.matrix_heatmap(
                        alpha, names, "conflict coefficients α (training mean)",
                        folder / "alpha.png", vmin=None, vmax=None,
                    )
                )  # fmt: skip
            keys = tracker.metric_keys()
            for prefix, title in (
                ("ogr/", "OGR per head"),
                ("weight/", "aggregation weight per objective"),
            ):
                series = {
                    k[len(prefix) :]: tracker.metric_history(k)
                    for k in keys
                    if k.startswith(prefix)
                }
                if series:
                    name = prefix.strip("/") + "_curves.png"
                    files.append(
                        plots.curves(series, title, folder / name, ylabel=prefix.strip("/"))
                    )
            if last is not None and last.example:
                ex = last.example
                files.append(
                    plots.validation_montage(
                        ex["image"], ex["label"], ex["pred"],
                        folder / "validation_montage.png", title="validation case 0",
                    )
                )  # fmt: skip
            tracker.log_artifacts(files, "plots")
            line = None
            if not tracker.log_artifact(model_path, "model") and self.is_main:
                line = f"MLflow run {self.run_id}: the weights were not uploaded (they are in {model_path})"
                self.say(line)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        tracker.set_tags(
            {
                "segmerge.weights": weights,
                "segmerge.weights_epoch": weights_epoch,
                "segmerge.completed": "true",
            }
        )
        return line
