"""MLflow logging for training: one run, batched metrics, params that always fit.

Only rank 0 creates a :class:`Tracker` with ``enabled=True``; the other ranks get a disabled one
whose methods do nothing. Metrics are queued in memory and sent with
``MlflowClient.log_batch`` (at most 1000 per call) when :meth:`Tracker.flush` is called, i.e. at
the logging interval, never one call per value.

Local default store: ``sqlite:///<output>/mlflow.db`` with artifacts in ``<output>/artifacts``
(MLflow 3 refuses a plain folder as tracking store).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "Tracker",
    "default_tracking_uri",
    "check_tracking_uri",
    "flatten_params",
    "ui_command",
]

MAX_PARAM_VALUE = 6000  # MLflow 3 limit for a param value
MAX_KEY = 250
BATCH_METRICS = 1000
BATCH_PARAMS = 100


def default_tracking_uri(output_dir: str | os.PathLike) -> str:
    """``sqlite:///<abs output>/mlflow.db``."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail early (before training) when the tracking store cannot be written or reached.

    Args:
        uri: ``sqlite:///abs/path.db``, ``http(s)://host:port`` or ``databricks``-style URIs
            (the latter are not checked).
        timeout: seconds to wait for a remote server's health endpoint.

    Raises:
        ValueError: unsupported URI, folder not writable, or server unreachable.
    """
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("databricks"):
        raise ValueError(
            f"tracking URI {uri!r}: MLflow 3 does not accept a plain folder as tracking store; "
            "use sqlite:///<abs path>/mlflow.db or an http:// server"
        )
    db = _sqlite_path(uri)
    if db is not None:
        folder = db.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
                pass
        except OSError as err:
            raise ValueError(
                f"tracking store {uri}: folder {folder} is not writable ({err})"
            ) from err
        if db.exists() and not os.access(db, os.W_OK):
            raise ValueError(f"tracking store {uri}: {db} is not writable")
        return
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - user's URI
                if resp.status != 200:
                    raise ValueError(f"tracking server {uri} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError) as err:
            raise ValueError(f"tracking server {uri} cannot be reached: {err}") from err


def ui_command(uri: str) -> str:
    """The command that opens the store in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def _shorten(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    if len(text) > MAX_PARAM_VALUE:
        text = text[: MAX_PARAM_VALUE - 20] + "...[truncated]"
    return text


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into ``a/b/c`` keys with string values that MLflow accepts.

    Lists of numbers stay one value (``[8, 16, 32]``); other lists are indexed. Values longer than
    MLflow's limit are truncated (the full config is an artifact).
    """
    out: dict[str, str] = {}
    if isinstance(config, Mapping):
        for key, value in config.items():
            sub = f"{prefix}/{key}" if prefix else str(key)
            out.update(flatten_params(value, sub))
    elif isinstance(config, list) and any(isinstance(v, (Mapping, list)) for v in config):
        for i, value in enumerate(config):
            out.update(flatten_params(value, f"{prefix}/{i}" if prefix else str(i)))
    else:
        key = prefix[:MAX_KEY].replace("#", "/") or "value"
        out[key] = _shorten(config)
    return out


class Tracker:
    """One MLflow run, written through ``MlflowClient`` in batches.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name (created with artifacts beside a local SQLite store).
        run_name: name of a new run.
        run_id: existing run to continue (resume); its status is set back to RUNNING.
        enabled: False on ranks other than 0: every method is a no-op.
        tags: tags of a new run.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "segmerge",
        run_name: str | None = None,
        run_id: str | None = None,
        enabled: bool = True,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.run_id: str | None = run_id
        self._metrics: list[Any] = []
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is not None:
            run = self.client.get_run(run_id)
            self.experiment_id = run.info.experiment_id
            self.client.update_run(run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            db = _sqlite_path(tracking_uri)
            location = str(db.parent / "artifacts") if db is not None else None
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location
            )
        else:
            self.experiment_id = exp.experiment_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id = run.info.run_id

    # ------------------------------------------------------------------ params
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (flattened, truncated); keys already logged with another value are skipped."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = flatten_params(dict(params))
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(items), BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=items[i : i + BATCH_PARAMS])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (one batch)."""
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # ------------------------------------------------------------------ metrics
    def add_metrics(self, values: Mapping[str, float], step: int) -> None:
        """Queue metric values of one step (sent by :meth:`flush`)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in values.items():
            self._metrics.append(Metric(key, float(value), now, int(step)))

    def flush(self) -> int:
        """Send queued metrics with ``log_batch``; returns how many were sent."""
        if not self.enabled or not self._metrics:
            return 0
        queued, self._metrics = self._metrics, []
        for i in range(0, len(queued), BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=queued[i : i + BATCH_METRICS])
        return len(queued)

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        """Queue and send at once (for rare events such as validation)."""
        self.add_metrics(values, step)
        self.flush()

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of a metric over the whole run (also before a resume)."""
        if not self.enabled:
            return []
        self.flush()
        hist = self.client.get_metric_history(self.run_id, key)
        return sorted((m.step, m.value) for m in hist)

    def metric_keys(self) -> list[str]:
        """Keys of every metric logged in the run so far."""
        if not self.enabled:
            return []
        self.flush()
        return sorted(self.client.get_run(self.run_id).data.metrics)

    # ------------------------------------------------------------------ artifacts
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload one file."""
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, paths: Iterable[str | os.PathLike], artifact_path: str | None) -> None:
        """Upload several files into one artifact folder."""
        for p in paths:
            self.log_artifact(p, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write a text artifact."""
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    # ------------------------------------------------------------------ end
    def end(self, status: str = "FINISHED") -> None:
        """Flush and mark the run ``FINISHED`` / ``KILLED`` / ``FAILED``."""
        if not self.enabled:
            return
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
