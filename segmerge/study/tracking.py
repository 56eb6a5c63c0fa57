"""The study's MLflow bookkeeping: its experiment, the parent run (one per study, reused on every
resume), the tags and metrics of each nested (method, seed) run, and the report on the parent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from segmerge.engine import check_tracking_uri
from segmerge.study.common import StudyError, atomic_write_json
from segmerge.study.evaluation import EvaluationResult
from segmerge.study.report import MethodSummary

__all__ = ["HISTORY_KEYS", "HISTORY_PREFIXES", "STUDY_TAG", "StudyTracking"]

STUDY_TAG = "segmerge.study"
# What the report's tables read back from each run (segmerge.study.report.diagnostics_row).
HISTORY_KEYS = ("conflict/n_pairs", "conflict/fraction", "cosine/mean", "cosine/min")
HISTORY_PREFIXES = ("ogr/", "weight/", "conflict/alpha/")


class StudyTracking:
    """The MLflow side of one study.

    Args:
        tracking_uri: the store.
        experiment: the experiment's name.
        study_id: the study's id (tag ``segmerge.study`` of every run).
        labels: ``budget``, ``network`` and ``objectives``, tagged on every run.
        out: the study folder (tag ``segmerge.study.output``).
        lock: guards the client calls of the job threads.
        log: where notes go.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        study_id: str,
        labels: dict[str, str],
        out: Path,
        lock: threading.Lock,
        log: Callable[[str], None],
    ) -> None:
        self.tracking_uri, self.experiment, self.study_id = tracking_uri, experiment, study_id
        self.labels, self.out, self.lock, self.log = labels, out, lock, log
        self._client: Any = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None

    def client(self) -> Any:
        """The MLflow client (made on first use)."""
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def open_experiment(self) -> None:
        """Check the store and find (or create) the experiment.

        Raises:
            StudyError: an unusable ``--tracking-uri``.
        """
        try:
            check_tracking_uri(self.tracking_uri)
        except ValueError as err:
            raise StudyError(f"--tracking-uri: {err}") from err
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = None
            if self.tracking_uri.startswith("sqlite:///"):  # artifacts beside the store, as train
                location = str(Path(self.tracking_uri[len("sqlite:///") :]).parent / "artifacts")
            self.experiment_id = client.create_experiment(
                self.experiment, artifact_location=location
            )
        else:
            self.experiment_id = exp.experiment_id

    def _parent_tags(self, methods: Sequence[str], seeds: Sequence[int]) -> dict[str, str]:
        return {
            STUDY_TAG: self.study_id,
            "segmerge.study.role": "parent",
            "budget": self.labels["budget"],
            "network": self.labels["network"],
            "objectives": self.labels["objectives"],
            "methods": ",".join(methods),
            "seeds": ",".join(map(str, seeds)),
            "segmerge.study.output": str(self.out),
        }

    def open_parent_run(
        self, record: dict[str, Any], methods: Sequence[str], seeds: Sequence[int]
    ) -> None:
        """The study's parent MLflow run: created once (its id saved in ``record``, written to
        ``study.json``), reused (set RUNNING) on every resume."""
        client = self.client()
        run_id = record.get("parent_run_id")
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.lifecycle_stage != "active":
                    run_id = None
            except Exception:  # noqa: BLE001 - deleted or from another store: start a new one
                run_id = None
        tags = self._parent_tags(methods, seeds)
        if run_id:
            client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(
                self.experiment_id, run_name=f"compare {self.study_id}", tags=tags
            )
            run_id = run.info.run_id
            record["parent_run_id"] = run_id
            atomic_write_json(self.out / "study.json", record)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.parent_run_id = str(run_id)

    def run_tags(self, method: str, seed: int) -> dict[str, str]:
        """The tags of the nested run of (method, seed)."""
        tags = {
            STUDY_TAG: self.study_id,
            "method": method,
            "seed": str(seed),
            "budget": self.labels["budget"],
            "network": self.labels["network"],
            "objectives": self.labels["objectives"],
        }
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags

    def delete_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the MLflow runs of an earlier attempt (a run already gone is fine)."""
        for run_id in run_ids:
            try:
                with self.lock:
                    self.client().delete_run(run_id)
            except Exception as err:
                self.log(f"  note: could not delete earlier MLflow run {run_id}: {err}")

    def tag_and_log(
        self, method: str, seed: int, run_id: str, evaluation: EvaluationResult | None
    ) -> None:
        """Tag the nested run and log the evaluation's metrics (if any) to it."""
        tags = [RunTag(k, v) for k, v in self.run_tags(method, seed).items()]
        tags.append(RunTag("segmerge.study.output", str(self.out)))
        metrics = []
        if evaluation is not None:
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, 0) for k, v in evaluation.mlflow_metrics().items()]
        with self.lock:
            self.client().log_batch(run_id, metrics=metrics, tags=tags)

    def mark_failed(self, method: str, seed: int, run_id: str, stage: str) -> None:
        """Tag a failed run (``segmerge.study.failed``: the stage); never raises."""
        try:
            self.tag_and_log(method, seed, run_id, None)
            with self.lock:
                self.client().set_tag(run_id, "segmerge.study.failed", stage)
        except Exception:  # noqa: S110 - the failure itself is what gets reported
            pass

    def read_histories(self, summary: MethodSummary) -> None:
        """Read the conflict, cosine, weight, OGR and speed histories of the run from MLflow."""
        if summary.run_id is None:
            return
        client = self.client()
        try:
            keys = list(client.get_run(summary.run_id).data.metrics)
        except Exception as err:
            self.log(f"  note: run {summary.run_id} of {summary.method} unreadable: {err}")
            return
        wanted = [k for k in keys if k in HISTORY_KEYS or k.startswith(HISTORY_PREFIXES)]
        for key in wanted:
            hist = client.get_metric_history(summary.run_id, key)
            summary.histories[key] = sorted((int(m.step), float(m.value)) for m in hist)
        speed = [
            m.value for m in client.get_metric_history(summary.run_id, "perf/steps_per_second")
        ]
        if speed:
            summary.steps_per_second = float(sum(speed) / len(speed))

    def log_parent(self, stats: dict[str, Any], files: Sequence[Path]) -> None:
        """The report on the parent run: per-method mean scores, verdict tags, the files."""
        if not self.parent_run_id:
            return
        client = self.client()
        now = int(time.time() * 1000)
        metrics, tags = [], []
        for method, entry in stats["methods"].items():
            for key, value in entry["scores"].items():
                if isinstance(value.get("mean"), float) and value["mean"] == value["mean"]:
                    metrics.append(Metric(f"{method}/{key}", value["mean"], now, 0))
            if entry.get("verdict"):
                tags.append(RunTag(f"verdict.{method}", entry["verdict"]))
        try:
            client.log_batch(self.parent_run_id, metrics=metrics, tags=tags)
            for path in files:
                folder = "plots" if path.parent.name == "plots" else None
                client.log_artifact(self.parent_run_id, str(path), folder)
        except Exception as err:  # the files are written either way
            self.log(f"  note: could not log the report to the parent MLflow run: {err}")

    def set_parent_status(self, status: str) -> None:
        """Close the parent run (``FINISHED``, ``FAILED``, ``KILLED``); never raises."""
        if self.parent_run_id:
            try:
                self.client().set_terminated(self.parent_run_id, status=status)
            except Exception as err:  # noqa: BLE001
                self.log(f"  note: could not close the parent MLflow run: {err}")
