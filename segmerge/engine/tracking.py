"""MLflow logging for training: one run, batched metrics, params that always fit.

Only rank 0 creates a :class:`Tracker` with ``enabled=True``; the other ranks get a disabled one
whose methods do nothing. Metrics are queued in memory and sent with
``MlflowClient.log_batch`` (at most 1000 per call) when :meth:`Tracker.flush` is called, i.e. at
the logging interval, never one call per value. The store itself (URI, checks before training,
bounded HTTP requests) is :mod:`segmerge.engine.store`.

During the run a failing store does not stop training (:class:`Tracker` ``resilient``): the
metrics stay queued and are retried at later flushes, a message says so once, and the caller is
told through ``on_failure`` (the trainer saves a checkpoint).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from segmerge.atomic import atomic_destination
from segmerge.engine.store import (
    DEGRADED_BOUNDS,
    TrackingError,
    bound_http_requests,
    check_tracking_uri,
    default_tracking_uri,
    failure_reason,
    flatten_params,
    sqlite_path,
    ui_command,
)
from segmerge.objectives.names import metric_key  # subset names hold '+' (not allowed)

__all__ = [
    "Tracker",
    "TrackingError",
    "bound_http_requests",
    "default_tracking_uri",
    "check_tracking_uri",
    "flatten_params",
    "ui_command",
]

BATCH_METRICS = 1000
BATCH_PARAMS = 100
RETRY_AFTER_S = 30.0  # after a failed call, wait this long (doubling, at most 16x) to try again
MAX_QUEUED = 1_000_000  # metrics kept while the store is unreachable


class _Skipped(Exception):
    """A store call that failed (or was not tried) in resilient mode."""


class Tracker:
    """One MLflow run, written through ``MlflowClient`` in batches.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name (created with artifacts beside a local SQLite store).
        run_name: name of a new run.
        run_id: existing run to continue (resume); its status is set back to RUNNING.
        enabled: False on ranks other than 0: every method is a no-op.
        tags: tags of a new run.
        say: where the one-time failure / recovery messages go (default: stderr).

    Creating the tracker talks to the store and raises :class:`TrackingError` when it fails (an
    unusable store stops the command before training). Set :attr:`resilient` once the run is under
    way: a failing call is then recorded instead of raised, metrics stay queued and are retried
    (at most every ``RETRY_AFTER_S`` seconds), and ``on_failure(reason)`` is called once.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "segmerge",
        run_name: str | None = None,
        run_id: str | None = None,
        enabled: bool = True,
        tags: Mapping[str, str] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.run_id: str | None = run_id
        self._metrics: list[Any] = []
        self._tags: dict[str, str] = {}
        self.resilient = False
        self.on_failure: Callable[[str], None] | None = None
        self.failure: str | None = None  # the last failure's reason, None while healthy
        self.failures = 0
        self._retry_at = 0.0
        self._say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        if not enabled:
            return
        bound_http_requests()
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            if run_id is not None:
                run = self.client.get_run(run_id)
                self.experiment_id = run.info.experiment_id
                self.client.update_run(run_id, status="RUNNING")
                return
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                db = sqlite_path(tracking_uri)
                location = str(db.parent / "artifacts") if db is not None else None
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location
                )
            else:
                self.experiment_id = exp.experiment_id
            run = self.client.create_run(
                self.experiment_id, run_name=run_name, tags=dict(tags or {})
            )
        except Exception as err:
            raise TrackingError(f"MLflow store {tracking_uri}: {failure_reason(err)}") from err
        self.run_id = run.info.run_id

    # ------------------------------------------------------------------ store calls
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One store call; in resilient mode a failure is recorded and :class:`_Skipped` raised."""
        if self.failure is not None and time.monotonic() < self._retry_at:
            raise _Skipped
        saved = {k: os.environ.get(k) for k in DEGRADED_BOUNDS}
        if self.failure is not None:  # MLflow reads these at each request
            os.environ.update(DEGRADED_BOUNDS)
        try:
            out = fn(*args, **kwargs)
        except Exception as err:
            reason = f"{what}: {failure_reason(err)}"
            if not self.resilient:
                raise TrackingError(f"MLflow store {self.tracking_uri}: {reason}") from err
            first = self.failures == 0
            self.failure = reason
            self.failures += 1
            self._retry_at = time.monotonic() + RETRY_AFTER_S * 2 ** min(self.failures - 1, 4)
            if first:
                self._say(
                    f"MLflow store {self.tracking_uri} failed ({reason}); training continues, "
                    f"metrics are kept and retried every {RETRY_AFTER_S:g} s (said once)"
                )
                if self.on_failure is not None:
                    self.on_failure(reason)
            raise _Skipped from err
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if self.failure is not None:
            self.failure = None
            self._say(f"MLflow store {self.tracking_uri} answers again; sending queued metrics")
        return out

    def retry_now(self) -> None:
        """Let the next call try a failing store at once (at the end of a run)."""
        self._retry_at = 0.0

    @property
    def pending(self) -> int:
        """Metrics queued and not yet sent."""
        return len(self._metrics)

    # ------------------------------------------------------------------ params
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (flattened, truncated); keys already logged with another value are skipped."""
        if not self.enabled:
            return
        flat = flatten_params(dict(params))
        try:
            existing = self._call("get_run", self.client.get_run, self.run_id).data.params
            items = [Param(k, v) for k, v in flat.items() if k not in existing]
            for i in range(0, len(items), BATCH_PARAMS):
                self._call(
                    "log_batch", self.client.log_batch, self.run_id,
                    params=items[i : i + BATCH_PARAMS],
                )  # fmt: skip
        except _Skipped:
            pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (one batch; kept and retried with the metrics if the store fails)."""
        if not self.enabled:
            return
        self._tags.update({k: str(v) for k, v in tags.items()})
        self._send_tags()

    def _send_tags(self) -> None:
        if not self._tags:
            return
        tags = [RunTag(k, v) for k, v in self._tags.items()]
        try:
            self._call("log_batch", self.client.log_batch, self.run_id, tags=tags)
        except _Skipped:
            return
        self._tags = {}

    # ------------------------------------------------------------------ metrics
    def add_metrics(self, values: Mapping[str, float], step: int) -> None:
        """Queue metric values of one step (sent by :meth:`flush`)."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        for key, value in values.items():
            self._metrics.append(Metric(metric_key(key), float(value), now, int(step)))
        if len(self._metrics) > MAX_QUEUED:  # store gone for long: keep the newest
            del self._metrics[: len(self._metrics) - MAX_QUEUED]

    def flush(self) -> int:
        """Send queued metrics (and tags) with ``log_batch``; returns how many metrics were sent."""
        if not self.enabled:
            return 0
        self._send_tags()
        sent = 0
        while self._metrics:
            batch = self._metrics[:BATCH_METRICS]
            try:
                self._call("log_batch", self.client.log_batch, self.run_id, metrics=batch)
            except _Skipped:
                break
            del self._metrics[: len(batch)]
            sent += len(batch)
        return sent

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        """Queue and send at once (for rare events such as validation)."""
        self.add_metrics(values, step)
        self.flush()

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of a metric over the whole run (also before a resume)."""
        if not self.enabled:
            return []
        self.flush()
        try:
            hist = self._call(
                "get_metric_history", self.client.get_metric_history, self.run_id, key
            )
        except _Skipped:
            return []
        return sorted((m.step, m.value) for m in hist)

    def metric_keys(self) -> list[str]:
        """Keys of every metric logged in the run so far."""
        if not self.enabled:
            return []
        self.flush()
        try:
            run = self._call("get_run", self.client.get_run, self.run_id)
        except _Skipped:
            return []
        return sorted(run.data.metrics)

    # ------------------------------------------------------------------ artifacts
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> bool:
        """Upload one file; False when the store failed (resilient mode)."""
        if not self.enabled:
            return False
        try:
            self._call(
                "log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path
            )
        except _Skipped:
            return False
        return True

    def log_artifacts(self, paths: Iterable[str | os.PathLike], artifact_path: str | None) -> None:
        """Upload several files into one artifact folder."""
        for p in paths:
            self.log_artifact(p, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write a text artifact."""
        if self.enabled:
            try:
                self._call("log_text", self.client.log_text, self.run_id, text, artifact_file)
            except _Skipped:
                pass

    def dump_pending(self, path: str | os.PathLike) -> int:
        """Write the metrics not sent as JSON lines (``key, value, timestamp, step``); returns
        how many (nothing is written when none are pending)."""
        if not self._metrics:
            return 0
        with atomic_destination(path) as tmp, open(tmp, "w") as fh:
            for m in self._metrics:
                row = {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                fh.write(json.dumps(row) + "\n")
        return len(self._metrics)

    # ------------------------------------------------------------------ end
    def end(self, status: str = "FINISHED") -> bool:
        """Flush and mark the run ``FINISHED`` / ``KILLED`` / ``FAILED``.

        Returns:
            True when the store took the final status and every queued metric; False otherwise
            (resilient mode: the reason is in :attr:`failure`).
        """
        if not self.enabled:
            return True
        self.retry_now()  # the last chance: try now
        self.flush()
        self.retry_now()  # and the status even if the metrics failed
        try:
            self._call("set_terminated", self.client.set_terminated, self.run_id, status=status)
        except _Skipped:
            return False
        return not self._metrics
