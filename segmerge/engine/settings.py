"""The settings of one training, read and checked once from the parsed configuration.

:meth:`Settings.from_parser` reads every plain value the engine uses (``epochs``,
``validation#overlap``, ``device``, the output folders...), checks each one once with one message
style (``<id> must be <rule>, got <value>``) and returns a frozen :class:`Settings`. Nothing else
in the engine reads these values from the parser.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from segmerge.engine.config import ConfigError
from segmerge.engine.store import default_tracking_uri

__all__ = ["Settings", "check_float", "check_int", "config_value", "root_message"]


def check_int(name: str, value: Any, lo: int, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``lo`` (``None`` passes with ``allow_none``), else ConfigError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, lo: float, strict: bool = True) -> float:
    """``value`` as a finite float > ``lo`` (>= with ``strict=False``), else ConfigError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= lo if strict else value < lo):
        rule = ">" if strict else ">="
        raise ConfigError(f"{name} must be a finite number {rule} {lo}, got {value!r}")
    return float(value)


def root_message(err: BaseException) -> str:
    """The innermost exception message (ConfigParser wraps instantiation errors)."""
    seen = err
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    return f"{type(seen).__name__}: {seen}"


def config_value(parser: ConfigParser, cid: str) -> Any:
    """``parser.get_parsed_content(cid)`` with a failure reported as a ConfigError naming ``cid``."""
    try:
        return parser.get_parsed_content(cid)
    except Exception as err:
        raise ConfigError(f"{cid}: cannot be resolved ({root_message(err)})") from err


@dataclass(frozen=True)
class Settings:
    """Every plain setting of a training, checked (see the module docstring).

    Attributes mirror the config ids (``validation#sw_batch_size`` is ``sw_batch_size``);
    ``weights`` is ``"best"`` or ``"last"``; ``jacobian`` is ``"parameters"`` or ``"outputs"``
    (read as written, never evaluated); ``device`` is resolved (``auto`` -> ``cuda`` or
    ``cpu``, ``cuda`` -> ``cuda:<LOCAL_RANK>`` under torchrun); folders are absolute;
    ``tracking_uri`` defaults to the SQLite store in ``output_dir``.
    """

    epochs: int
    steps_per_epoch: int
    batch_size: int
    patch_size: int
    val_every: int
    log_every: int
    stop_after: int | None
    checkpoint_every: int | None
    refresh_every: int
    jacobian: str
    num_workers: int
    seed: int
    weights: str
    sw_batch_size: int
    overlap: float
    ogr_cases: int
    max_val_cases: int | None
    amp: bool
    progress: bool
    num_threads: int | None
    experiment: str
    run_name: str | None
    device: torch.device
    bundle_root: Path
    output_dir: Path
    cache_dir: Path
    tracking_uri: str

    @property
    def total_steps(self) -> int:
        """``epochs * steps_per_epoch``."""
        return self.epochs * self.steps_per_epoch

    @property
    def checkpoint_root(self) -> Path:
        """``<output_dir>/checkpoints`` (one folder per MLflow run below it)."""
        return self.output_dir / "checkpoints"

    @classmethod
    def from_parser(cls, parser: ConfigParser, world: int = 1) -> Settings:
        """Read and check the settings; sets ``parser["device"]`` to the resolved device.

        Args:
            parser: the merged configuration.
            world: number of processes (``cuda`` becomes ``cuda:<LOCAL_RANK>`` when > 1).

        Raises:
            ConfigError: naming the config id, the rule and the value.
        """
        g = parser.get_parsed_content
        values: dict[str, Any] = {}
        for name, lo, none in (
            ("epochs", 1, False), ("steps_per_epoch", 1, False), ("batch_size", 1, False),
            ("patch_size", 8, False), ("val_every", 1, False), ("log_every", 1, False),
            ("stop_after", 1, True), ("checkpoint_every", 1, True), ("refresh_every", 1, False),
            ("num_workers", 0, False), ("seed", 0, False),
        ):  # fmt: skip
            values[name] = check_int(name, g(name), lo, allow_none=none)
        jacobian = parser.get("jacobian", "parameters")  # the raw value: never evaluated
        if jacobian not in ("parameters", "outputs"):
            raise ConfigError(f"jacobian must be 'parameters' or 'outputs', got {jacobian!r}")
        values["jacobian"] = jacobian
        check_float("lr", g("lr"), 0.0)
        check_float("weight_decay", g("weight_decay"), 0.0, strict=False)
        v = values
        v["weights"] = g("weights")
        if v["weights"] not in ("best", "last"):
            raise ConfigError(f"weights must be 'best' or 'last', got {v['weights']!r}")
        val = g("validation")
        v["sw_batch_size"] = check_int("validation#sw_batch_size", val["sw_batch_size"], 1)
        v["overlap"] = float(val["overlap"])
        if not 0.0 <= v["overlap"] < 1.0:
            raise ConfigError(f"validation#overlap must be in [0, 1), got {v['overlap']!r}")
        v["ogr_cases"] = check_int("validation#ogr_cases", val["ogr_cases"], 1)
        v["max_val_cases"] = check_int(
            "validation#max_cases", val.get("max_cases"), 1, allow_none=True
        )
        v["amp"], v["progress"] = bool(g("amp")), bool(g("progress"))
        threads = g("num_threads")
        v["num_threads"] = None if threads is None else check_int("num_threads", threads, 1)
        # read here (a bad reference is a config error, not blamed on the MLflow store later)
        v["experiment"] = str(config_value(parser, "experiment"))
        run_name = config_value(parser, "run_name")
        v["run_name"] = None if run_name is None else str(run_name)
        v["device"] = _device(str(g("device")).lower(), world, v["amp"])
        parser["device"] = str(v["device"])
        for key in ("bundle_root", "output_dir", "cache_dir"):
            v[key] = Path(g(key)).expanduser().absolute()
        uri = g("tracking_uri")
        # the default store follows output_dir (not frozen into the config: a resumed copy of a
        # checkpoint elsewhere writes to its own folder's store)
        v["tracking_uri"] = str(uri) if uri else default_tracking_uri(v["output_dir"])
        return cls(**v)


def _device(want: str, world: int, amp: bool) -> torch.device:
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want not in ("cpu", "cuda") and not want.startswith("cuda:"):
        raise ConfigError(f"device must be cpu, cuda or auto, got {want!r}")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no CUDA device")
    if want == "cuda" and world > 1:
        want = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = torch.device(want)
    if amp and device.type != "cuda":
        raise ConfigError("--amp needs --device cuda (mixed precision is CUDA-only here)")
    return device
