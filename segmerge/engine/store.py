"""The MLflow tracking store: its URI, the checks that fail before training, bounded requests.

Local default store: ``sqlite:///<output>/mlflow.db`` with artifacts in ``<output>/artifacts``
(MLflow 3 refuses a plain folder as tracking store).

Every call is bounded: MLflow's REST client reads ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (default 120 s),
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (7) and ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` (2) at each
request, i.e. minutes of silent retries per call; :func:`bound_http_requests` sets 10 s, 2 retries
and factor 1 unless the user set them. At start, :func:`check_tracking_uri` asks a remote server's
API (not only ``/health``) with a short timeout, so an unusable store fails before training.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "TrackingError",
    "bound_http_requests",
    "check_tracking_uri",
    "default_tracking_uri",
    "flatten_params",
    "ui_command",
]

MAX_PARAM_VALUE = 6000  # MLflow 3 limit for a param value
MAX_KEY = 250
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
# while the store is failing, each retry is one short attempt (training must not stall on it)
DEGRADED_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
_SCHEMES = (
    "sqlite",
    "http",
    "https",
    "postgresql",
    "mysql",
    "mssql",
    "databricks",
    "databricks-uc",
)


class TrackingError(RuntimeError):
    """The MLflow store failed (message names the store and the reason)."""


def bound_http_requests() -> dict[str, str]:
    """Bound MLflow's HTTP timeouts and retries (``HTTP_BOUNDS``) unless already set; returns the
    values in force."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in HTTP_BOUNDS}


def failure_reason(err: BaseException) -> str:
    """``<exception type>: <first line of its message>`` (at most 300 characters)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def default_tracking_uri(output_dir: str | os.PathLike) -> str:
    """``sqlite:///<abs output>/mlflow.db``."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, ``None`` for any other store."""
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
        ValueError: unsupported URI, folder not writable, or server unreachable or unusable.
    """
    if uri.startswith("file:") or "://" not in uri and not uri.startswith("databricks"):
        raise ValueError(
            f"tracking URI {uri!r}: MLflow 3 does not accept a plain folder as tracking store; "
            "use sqlite:///<abs path>/mlflow.db or an http:// server"
        )
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"tracking URI {uri!r}: unsupported scheme {scheme!r}; use sqlite:///<abs path>/mlflow.db, "
            "http(s)://host:port or a database URI (postgresql://, mysql://, mssql://)"
        )
    db = sqlite_path(uri)
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
        base = uri.rstrip("/")
        # /health alone is not enough: a server can answer it and hang or fail on the API
        probes = (
            ("/health", "/health"),
            # GET; a 404 (no such experiment) is an answer too
            (
                "/api/2.0/mlflow/experiments/get-by-name?experiment_name=segmerge-probe",
                "its REST API",
            ),
        )
        for path, what in probes:
            try:
                with urllib.request.urlopen(base + path, timeout=timeout) as resp:  # noqa: S310
                    if resp.status != 200:
                        raise ValueError(f"tracking server {uri} answered {resp.status} on {what}")
            except urllib.error.HTTPError as err:
                if err.code == 404 and what != "/health":
                    continue
                raise ValueError(
                    f"tracking server {uri} answered {err.code} ({err.reason}) on {what}"
                ) from err
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise ValueError(
                    f"tracking server {uri} cannot be reached on {what} within {timeout:g} s: "
                    f"{reason}"
                ) from err


def ui_command(uri: str) -> str:
    """The command that opens the store in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


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
