"""The training application behind ``python -m segmerge train``.

Run it::

    python -m segmerge train                                  # embedded default (GMD, phantoms)
    python -m segmerge train --aggregator gradcraft --r 0.5 --epochs 20 --data /data/brats21
    torchrun --nproc_per_node 2 -m segmerge train --device cpu   # gloo on CPU, NCCL on GPU
    python -m segmerge train --resume runs/checkpoints/<run id>/last.pt

One step is MONAI's ``SupervisedTrainer`` with ``iteration_update=`` replaced by the
per-objective step: forward -> named losses (``ObjectiveSet``) -> ``TrainStep.step`` (the
Jacobian, the aggregator, the update). Around it, ignite event handlers log batched step metrics
to MLflow, validate (sliding window Dice/HD95, per-head losses and OGR), checkpoint and stop on
SIGINT/SIGTERM. Everything a bad input could break is checked in :meth:`Trainer.setup`, before
the first step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.bundle import ConfigParser

from segmerge.aggregation import ObservesValidation
from segmerge.atomic import write_text_atomic
from segmerge.bundle_paths import NETWORK_RECORD
from segmerge.conventions import REGIONS
from segmerge.data import cached_phantoms, phantom_cache_dir
from segmerge.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    changed_settings,
    load_checkpoint,
    resolved_config,
    rng_state,
    set_rng_state,
    stored_config,
)
from segmerge.engine.config import ConfigError
from segmerge.engine.dist import all_reduce, barrier, broadcast_object, rank_world
from segmerge.engine.lock import FolderLock, FolderLocked
from segmerge.engine.metrics_buffer import StepMetrics
from segmerge.engine.sampling import SeededCacheDataset, StreamSampler
from segmerge.engine.tracking import (
    Tracker,
    TrackingError,
    bound_http_requests,
    check_tracking_uri,
    default_tracking_uri,
    ui_command,
)
from segmerge.engine.validation import (
    ValidationResult,
    crop_around_tumour,
    head_losses,
    heads_of,
    validate,
)
from segmerge.overrides import decode_literal

__all__ = [
    "RESUME_MAY_CHANGE",
    "Trainer",
    "TrainingFailed",
    "TrainResult",
    "dataset_location",
    "format_summary",
    "phantom_cache_path",
    "phantom_spec",
    "train",
]


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        run_id: MLflow run id (None on ranks other than 0).
        tracking_uri: MLflow tracking URI.
        dice: validation Dice per region and mean of the weights written to the bundle.
        hd95: validation HD95 per region and mean of those weights.
        best_epoch: epoch of the best validation.
        model_path: ``<bundle_root>/models/model.pt`` (the latest run's weights).
        run_model_path: ``<bundle_root>/models/<run id>/model.pt``, this run's own copy.
        weights: ``"best"`` or ``"last"``: which weights were published (dice/hd95 are theirs).
        resumed_from: the checkpoint's MLflow run when a resume started a new run.
        notes: what the run said about its ending (tracking problems, a second interrupt).
        checkpoint_dir: folder holding ``last.pt`` and ``best.pt``.
        iteration: steps done.
        interrupted: True when stopped by SIGINT/SIGTERM (a checkpoint was saved).
        wall_s: seconds from setup to the end.
        rank: this process's rank (only rank 0 reports).
    """

    run_id: str | None
    tracking_uri: str
    dice: dict[str, float] = field(default_factory=dict)
    hd95: dict[str, float] = field(default_factory=dict)
    best_epoch: int = -1
    model_path: Path | None = None
    run_model_path: Path | None = None
    weights: str = ""
    resumed_from: str | None = None
    notes: list[str] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    iteration: int = 0
    interrupted: bool = False
    wall_s: float = 0.0
    rank: int = 0


RESUME_MAY_CHANGE: tuple[str, ...] = (
    "epochs", "stop_after", "checkpoint_every", "log_every", "progress", "num_threads",
    "num_workers", "device", "bundle_root", "output_dir", "cache_dir", "tracking_uri",
    "experiment", "run_name", "weights", "cache_rate", "validation#sw_batch_size",
    "dataset#phantoms#workers",
    # follows epochs; the scheduler's own state (restored) keeps the T_max it ran with
    "lr_scheduler#T_max",
)  # fmt: skip
"""Settings a resume may change (recorded in the run); any other change is refused: it would make
the continued run differ from an uninterrupted one (aggregator, network, data, seed, lr...)."""


class TrainingFailed(RuntimeError):
    """Training stopped on an error after it started; the MLflow run is marked FAILED.

    Attributes:
        exit_status: what ``segmerge train`` returns (1).
    """

    exit_status = 1


def phantom_cache_path(cache_dir: str | os.PathLike, spec: Mapping[str, Any]) -> Path:
    """``<cache_dir>/phantoms-<hash of the generation arguments>`` (the data package's cache)."""
    return phantom_cache_dir(cache_dir, spec)


def phantom_spec(parser: ConfigParser) -> dict[str, Any]:
    """Generation arguments of the default phantom dataset (what its cache folder hashes)."""
    ds = parser.get_parsed_content("dataset")
    spec = dict(ds["phantoms"])
    spec["et_label"] = ds["et_label"]
    return spec


def dataset_location(parser: ConfigParser) -> Path:
    """Where the configured dataset is: ``dataset#path`` or the phantom cache folder."""
    ds = parser.get_parsed_content("dataset")
    if ds.get("path"):
        return Path(ds["path"]).expanduser()
    cache = Path(parser.get_parsed_content("cache_dir")).expanduser().absolute()
    return phantom_cache_path(cache, phantom_spec(parser))


def _check_int(name: str, value: Any, lo: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, lo: float, strict: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= lo if strict else value < lo):
        rule = ">" if strict else ">="
        raise ConfigError(f"{name} must be a finite number {rule} {lo}, got {value!r}")
    return float(value)


PROBE_BYTES = 1 << 20
"""Bytes the writability check writes and syncs (an empty file still fits on a full disk)."""


def _check_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise ConfigError(f"{what} {folder} is not writable: {err}") from err


def _as_tensor(x: Any) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class Trainer:
    """Set up, run and finish one training (see the module docstring).

    Args:
        parser: the merged configuration (``segmerge.engine.config.load_config``).
        resume: checkpoint to continue from. Its MLflow run is continued when it is in this
            store and not finished; otherwise a new run continues the checkpoint (tagged
            ``segmerge.resumed_from``).
        resume_state: the already-loaded checkpoint (saves a second read).
        continue_run: reopen the checkpoint's MLflow run even when it is finished.
    """

    def __init__(
        self,
        parser: ConfigParser,
        resume: str | os.PathLike | None = None,
        resume_state: dict | None = None,
        continue_run: bool = False,
    ) -> None:
        self.parser = parser
        self.resume_path = Path(resume) if resume else None
        self.resume_state = resume_state
        self.continue_run = continue_run
        self.bar: Any = None
        self.interrupted = False
        self._stop_reason: str | None = None

    # ================================================================== setup
    def setup(self) -> None:
        """Everything that can fail on bad input, before the first training step."""
        self.lock: FolderLock | None = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output folder's lock (idempotent)."""
        lock, self.lock = getattr(self, "lock", None), None
        if lock is not None:
            lock.release()

    def _setup(self) -> None:
        t0 = time.time()
        self._init_distributed()
        p = self.parser
        self._settings()
        self._resolve_device()
        self._check_outputs()
        self._seed()
        try:
            self.network = p.get_parsed_content("network_def")
            self.network.to(self.device)
            self.objectives = p.get_parsed_content("objectives")
            self.aggregator = p.get_parsed_content("aggregator")
            self.optimizer = p.get_parsed_content("optimizer")
            self.scheduler = p.get_parsed_content("lr_scheduler")
        except ConfigError:
            raise
        except Exception as err:  # ConfigParser wraps the component's own ValueError
            raise ConfigError(f"invalid configuration: {_root_message(err)}") from err
        divisor = int(getattr(self.network, "divisor", 1))
        if self.patch_size % divisor:
            raise ConfigError(
                f"patch_size must be a multiple of {divisor} for this network "
                f"({len(getattr(self.network, 'features', [])) - 1} downsamplings), "
                f"got {self.patch_size}"
            )
        self._build_data()
        from segmerge.aggregation import OGRTracker
        from segmerge.step import TrainStep

        self.scaler = None
        if self.amp:
            self.scaler = torch.amp.GradScaler("cuda")
        step_options = _jacobian_option(TrainStep, p.get("jacobian", "parameters"))
        try:
            self.train_step = TrainStep(
                self.network,
                self.optimizer,
                self.aggregator,
                strategy=p.get_parsed_content("strategy"),
                refresh_every=self.refresh_every,
                clip_norm=p.get_parsed_content("clip_norm"),
                scaler=self.scaler,
                **step_options,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.ogr = OGRTracker()
        self.metrics = StepMetrics()
        self.iteration = 0
        self.best = {"metric": -1.0, "epoch": -1, "dice": {}, "hd95": {}}
        self.run_id: str | None = None
        # the configuration as data (checkpoints, MLflow params): resolved once, RNG-neutral
        self.resolved, self.resolved_expressions, self.resolved_derived = resolved_config(p)
        self.resume_changes: dict[str, tuple[Any, Any]] = {}
        if self.resume_state is not None:
            self.resume_changes = self._check_resume_changes(self.resume_state)
            self._restore(self.resume_state)
        self._start_tracking()
        self.setup_s = time.time() - t0

    def _init_distributed(self) -> None:
        self._owns_group = False
        self.rank, self.world = rank_world()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            want = str(self.parser.get("device", "auto"))
            cuda = want.startswith("cuda") or (want == "auto" and torch.cuda.is_available())
            backend = "nccl" if cuda else "gloo"
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
            self._owns_group = True
            self.rank, self.world = rank_world()
        self.is_main = self.rank == 0

    def _settings(self) -> None:
        p = self.parser
        g = p.get_parsed_content
        self.epochs = _check_int("epochs", g("epochs"), 1)
        self.steps_per_epoch = _check_int("steps_per_epoch", g("steps_per_epoch"), 1)
        self.batch_size = _check_int("batch_size", g("batch_size"), 1)
        self.patch_size = _check_int("patch_size", g("patch_size"), 8)
        self.val_every = _check_int("val_every", g("val_every"), 1)
        self.log_every = _check_int("log_every", g("log_every"), 1)
        self.stop_after = _check_int("stop_after", g("stop_after"), 1, allow_none=True)
        self.checkpoint_every = _check_int(
            "checkpoint_every", g("checkpoint_every"), 1, allow_none=True
        )
        self.refresh_every = _check_int("refresh_every", g("refresh_every"), 1)
        self.num_workers = _check_int("num_workers", g("num_workers"), 0)
        self.seed = _check_int("seed", g("seed"), 0)
        _check_float("lr", g("lr"), 0.0)
        _check_float("weight_decay", g("weight_decay"), 0.0, strict=False)
        self.weights_choice = g("weights")
        if self.weights_choice not in ("best", "last"):
            raise ConfigError(f"weights must be 'best' or 'last', got {self.weights_choice!r}")
        val = g("validation")
        self.sw_batch_size = _check_int("validation#sw_batch_size", val["sw_batch_size"], 1)
        self.overlap = float(val["overlap"])
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"validation#overlap must be in [0, 1), got {self.overlap!r}")
        self.ogr_cases = _check_int("validation#ogr_cases", val["ogr_cases"], 1)
        self.max_val_cases = _check_int(
            "validation#max_cases", val.get("max_cases"), 1, allow_none=True
        )
        self.amp = bool(g("amp"))
        self.progress = bool(g("progress"))
        threads = g("num_threads")
        self._prev_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(_check_int("num_threads", threads, 1))
        self.total_steps = self.epochs * self.steps_per_epoch
        # read here (a bad reference is a config error, not blamed on the MLflow store later)
        self.experiment = str(_config_value(p, "experiment"))
        run_name = _config_value(p, "run_name")
        self.run_name = None if run_name is None else str(run_name)

    def _resolve_device(self) -> None:
        want = str(self.parser.get_parsed_content("device")).lower()
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want not in ("cpu", "cuda") and not want.startswith("cuda:"):
            raise ConfigError(f"device must be cpu, cuda or auto, got {want!r}")
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device cuda requested but torch sees no CUDA device")
        if want == "cuda" and self.world > 1:
            want = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.device = torch.device(want)
        self.parser["device"] = str(self.device)
        if self.amp and self.device.type != "cuda":
            raise ConfigError("--amp needs --device cuda (mixed precision is CUDA-only here)")

    def _check_outputs(self) -> None:
        g = self.parser.get_parsed_content
        self.bundle_root = Path(g("bundle_root")).expanduser().absolute()
        self.output_dir = Path(g("output_dir")).expanduser().absolute()
        self.cache_dir = Path(g("cache_dir")).expanduser().absolute()
        uri = g("tracking_uri")
        # the default store follows output_dir (not frozen into the config: a resumed copy of a
        # checkpoint elsewhere writes to its own folder's store)
        self.tracking_uri = str(uri) if uri else default_tracking_uri(self.output_dir)
        if self.is_main:
            _check_writable(self.output_dir, "output folder")
            _check_writable(self.bundle_root / "models", "bundle models folder")
            try:
                self.lock = FolderLock(self.output_dir).acquire()
            except FolderLocked as err:
                raise ConfigError(str(err)) from err
            if self.lock.took_over:
                old = self.lock.took_over
                self._say(
                    f"output folder {self.output_dir}: taking over the lock left by pid "
                    f"{old.get('pid')} on {old.get('host')} (started {old.get('started')}), "
                    "which is no longer running"
                )
            try:
                check_tracking_uri(self.tracking_uri)
            except ValueError as err:
                raise ConfigError(str(err)) from err

    def _seed(self) -> None:
        from monai.utils import set_determinism

        if self.parser.get_parsed_content("deterministic"):
            set_determinism(seed=self.seed)
        else:
            torch.manual_seed(self.seed)

    # ------------------------------------------------------------------ data
    def _dataset_path(self) -> Path:
        ds = self.parser.get_parsed_content("dataset")
        if ds.get("path"):
            return Path(ds["path"]).expanduser()
        spec = phantom_spec(self.parser)
        size = _check_int("dataset#phantoms#size", spec.get("size"), 16)
        _check_int("dataset#phantoms#cases", spec.get("cases"), 2)
        if size < self.patch_size:
            raise ConfigError(
                f"dataset#phantoms#size ({size}) must be >= patch_size ({self.patch_size})"
            )
        folder = phantom_cache_path(self.cache_dir, spec)
        if self.is_main and not (folder / "dataset.json").is_file():
            self._write_phantoms(folder, spec)
        barrier()
        return folder

    def _write_phantoms(self, folder: Path, spec: Mapping[str, Any]) -> None:
        _check_writable(self.cache_dir, "cache folder")
        cached_phantoms(folder, spec, progress=self.progress)  # shared with compare

    def _build_data(self) -> None:
        from segmerge.data import load_dataset, validate_dataset

        g = self.parser.get_parsed_content
        ds = g("dataset")
        path = self._dataset_path()
        try:
            spec = load_dataset(
                path, et_label=int(ds["et_label"]), allow_missing=bool(ds.get("allow_missing"))
            )
        except ValueError as err:
            raise ConfigError(f"dataset {path}: {err}") from err
        cavity = bool(ds.get("resection_cavity", False))
        problems = (
            validate_dataset(spec, int(ds["et_label"]), resection_cavity=cavity)
            if self.is_main
            else []
        )
        bad = {getattr(pr, "case", None) for pr in problems}
        if problems and not ds.get("skip_invalid"):
            listing = "\n  ".join(str(pr) for pr in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ConfigError(
                f"dataset {path} has {len(problems)} problem(s) (--skip-invalid skips those "
                f"cases):\n  {listing}{more}"
            )
        self.skipped_cases = sorted(str(c) for c in bad if c is not None)
        if self.skipped_cases:
            shown = ", ".join(self.skipped_cases[:20])
            more = (
                f" and {len(self.skipped_cases) - 20} more" if len(self.skipped_cases) > 20 else ""
            )
            self._say(
                f"--skip-invalid: leaving out {len(self.skipped_cases)} case(s) of {path}: "
                f"{shown}{more} (problems: check-data {path})"
            )
        train_items = [c for c in spec.training if c.get("case_id") not in bad]
        val_items = [c for c in spec.validation if c.get("case_id") not in bad]
        if self.world > 1:  # every rank must drop the same cases
            box = broadcast_object(
                [[c["case_id"] for c in train_items], [c["case_id"] for c in val_items]]
            )
            train_items = [c for c in spec.training if c["case_id"] in set(box[0])]
            val_items = [c for c in spec.validation if c["case_id"] in set(box[1])]
        if not train_items:
            raise ConfigError(f"dataset {path}: no valid training case")
        if not val_items:
            raise ConfigError(f"dataset {path}: no validation case (needed for validation/OGR)")
        if self.max_val_cases:
            val_items = val_items[: self.max_val_cases]
        self.data_summary = {
            "path": str(path),
            "layout": spec.layout,
            "et_label": int(ds["et_label"]),
            "n_training": len(train_items),
            "n_validation": len(val_items),
            "n_skipped_invalid": len(spec.training)
            + len(spec.validation)
            - len(train_items)
            - len(val_items),
            "skipped_cases": self.skipped_cases,
        }
        try:
            train_tf = g("train_transforms")
            val_tf = g("val_transforms")
        except Exception as err:
            raise ConfigError(f"invalid transforms: {_root_message(err)}") from err
        from monai.data import CacheDataset, DataLoader

        cache_rate = float(g("cache_rate"))
        self.train_ds = SeededCacheDataset(
            train_items, train_tf, cache_rate=cache_rate, num_workers=None, progress=False
        )
        self.val_ds = CacheDataset(val_items, val_tf, cache_rate=cache_rate, progress=False)
        heldout = CacheDataset(train_items[: self.ogr_cases], val_tf, progress=False)
        roi = [self.patch_size] * 3
        self.ogr_train_patches = [crop_around_tumour(heldout[i], roi) for i in range(len(heldout))]
        n_val = min(self.ogr_cases, len(self.val_ds))
        self.ogr_val_patches = [crop_around_tumour(self.val_ds[i], roi) for i in range(n_val)]
        self.n_train = len(train_items)
        self._loader_cls = DataLoader

    def _loader(self, start_step: int):
        sampler = StreamSampler(
            self.n_train,
            self.batch_size,
            self.total_steps,
            start_step=start_step,
            seed=self.seed,
            rank=self.rank,
            world=self.world,
        )
        return self._loader_cls(
            self.train_ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    # ------------------------------------------------------------------ tracking
    def _run_to_continue(self) -> tuple[str | None, str]:
        """On resume: the MLflow run to reopen (None: a new one) and the line that says so."""
        old = self.resumed_run_id
        if not old:
            return None, "resume: the checkpoint names no MLflow run; starting a new run"
        from mlflow.tracking import MlflowClient

        bound_http_requests()
        try:
            run = MlflowClient(tracking_uri=self.tracking_uri).get_run(old)
        except Exception as err:
            if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise ConfigError(
                    f"MLflow store {self.tracking_uri}: {_root_message(err)}"
                ) from err
            return None, (
                f"resume: the checkpoint's MLflow run {old} is not in {self.tracking_uri}; a new "
                f"run continues the checkpoint (tag segmerge.resumed_from={old})"
            )
        status = run.info.status
        complete = run.data.tags.get("segmerge.completed", "true") == "true"
        if status == "FINISHED" and complete and not self.continue_run:
            return None, (
                f"resume: MLflow run {old} is finished; a new run continues the checkpoint (tag "
                f"segmerge.resumed_from={old}; --continue-run reopens the finished run instead)"
            )
        return old, f"resume: continuing MLflow run {old} (it was {status})"

    def _start_tracking(self) -> None:
        self.checkpoint_root = self.output_dir / "checkpoints"
        enabled = self.is_main
        reopen, note = None, ""
        if self.resume_state is not None and self.is_main:
            reopen, note = self._run_to_continue()
        tags = {
            **run_tags_from_env(),
            "segmerge.command": "train",
            "segmerge.world_size": str(self.world),
            "segmerge.completed": "false",
        }
        self.resumed_from = None
        if self.resume_state is not None and reopen is None and self.resumed_run_id:
            self.resumed_from = str(self.resumed_run_id)
            tags["segmerge.resumed_from"] = self.resumed_from
        try:
            self.tracker = Tracker(
                self.tracking_uri,
                experiment=self.experiment,
                run_name=self.run_name,
                run_id=reopen,
                enabled=enabled,
                # $SEGMERGE_RUN_TAGS (a JSON object) adds tags to a new run: compare passes
                # mlflow.parentRunId and its study tags so each training nests under the study
                tags=tags,
                say=self._say,
            )
        except (TrackingError, ConfigError) as err:
            raise ConfigError(str(err)) from err
        run_id = self.tracker.run_id
        if self.world > 1:
            run_id = broadcast_object(run_id)
        self.run_id = run_id
        self.checkpoint_dir = self.checkpoint_root / str(run_id)
        if not self.is_main:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.checkpoint_dir.glob(".*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        try:
            if reopen is None:
                self._log_params()
            if self.resume_state is not None:
                self._say(note)
                self._record_resume()
        except TrackingError as err:  # the store broke right after the run was created
            self.tracker.resilient = True
            self.tracker.end("FAILED")
            raise ConfigError(str(err)) from err
        # from here on a failing store does not stop training (metrics are kept and retried)
        self.tracker.resilient = True
        self.tracker.on_failure = self._on_tracking_failure

    def _record_resume(self) -> None:
        """Copy the source's best.pt into a new run's folder; record changed settings."""
        source = self.resume_path.parent if self.resume_path is not None else None
        best = source / "best.pt" if source is not None else None
        if (
            best is not None
            and best.is_file()
            and source.resolve() != self.checkpoint_dir.resolve()
        ):
            shutil.copyfile(best, self.checkpoint_dir / "best.pt")
        it = self.iteration
        tags = {f"segmerge.resumed_at_step.{it}": str(self.resume_path)}
        if self.resume_changes:
            text = ", ".join(
                f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(self.resume_changes.items())
            )
            tags[f"segmerge.resume_changes.{it}"] = text[:5000]
            self._say(f"resume: changed settings (recorded in the run): {text}")
            self.tracker.log_text(
                json.dumps(self.resolved, indent=2, default=repr),
                f"config/resolved-from-step-{it}.json",
            )
        self.tracker.set_tags(tags)

    def _on_tracking_failure(self, reason: str) -> None:
        """The store failed during the run (said once by the tracker): keep a checkpoint now."""
        if getattr(self, "train_started", False):
            self.save_checkpoint()

    def _log_params(self) -> None:
        import mlflow
        import monai

        import segmerge

        raw = self.parser.get()
        resolved = self.resolved
        params: dict[str, Any] = {"config": resolved}
        params["aggregator_repr"] = repr(self.aggregator)
        params["train_step_repr"] = repr(self.train_step)
        params["network_repr"] = repr(self.network).splitlines()[0] + "..."
        params["n_parameters"] = sum(p.numel() for p in self.network.parameters())
        params["data"] = self.data_summary
        params["versions"] = {
            "segmerge": getattr(segmerge, "__version__", "0"),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "mlflow": mlflow.__version__,
            "python": sys.version.split()[0],
        }
        params["world_size"] = self.world
        params["device"] = str(self.device)
        self.tracker.log_params(params)
        self.tracker.log_text(json.dumps(raw, indent=2, default=repr), "config/train.json")
        self.tracker.log_text(json.dumps(resolved, indent=2, default=repr), "config/resolved.json")

    # ================================================================== checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "aggregator": self.aggregator.state_dict(),
            "train_step": self.train_step.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "ogr": self.ogr.state_dict(),
            "metrics": self.metrics.state_dict(),
            "objectives": getattr(self.objectives, "state_dict", dict)(),  # subset draws
            "rng": rng_state(),
            "iteration": int(self.iteration),
            "epoch": int(self.iteration // self.steps_per_epoch),
            "best": dict(self.best),
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "config": json.dumps(self.resolved, default=repr),
            "config_expressions": list(self.resolved_expressions),
            "config_derived": dict(self.resolved_derived),
        }

    def save_checkpoint(self, best: bool = False) -> Path | None:
        """Write ``last.pt`` (and ``best.pt``) atomically; rank 0 only."""
        if not self.is_main:
            return None
        state = self._state()
        path = atomic_torch_save(state, self.checkpoint_dir / "last.pt")
        if best:
            atomic_torch_save(state, self.checkpoint_dir / "best.pt")
        return path

    def _check_resume_changes(self, state: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Settings that differ from the checkpoint's: refused unless in RESUME_MAY_CHANGE."""
        stored = stored_config(state, self.resume_path)
        if int(state.get("format", 1)) >= 2:
            now: Mapping[str, Any] = self.resolved
        else:  # format 1 stored the raw configuration
            raw = decode_literal(self.parser.get())
            now = {k: v for k, v in raw.items() if k not in ("_comment", "imports")}
            stored = {k: v for k, v in stored.items() if k not in ("_comment", "imports")}
        changes = changed_settings(stored, now)
        refused = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
        if refused:
            listing = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in sorted(refused.items()))
            raise ConfigError(
                f"--resume {self.resume_path}: {listing} differ from the checkpoint's settings; "
                "the continued run would not be the run it continues. Start a new training for "
                f"that (a resume may change: {', '.join(RESUME_MAY_CHANGE)})"
            )
        return changes

    def _check_network_state(self, weights: Mapping[str, Any]) -> None:
        """A short message when the checkpoint's weights are not this network's."""
        own = self.network.state_dict()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        shapes = [
            k
            for k in own
            if k in weights and tuple(getattr(weights[k], "shape", ())) != tuple(own[k].shape)
        ]
        if missing or unexpected or shapes:
            parts = []
            for what, keys in (("missing", missing), ("unexpected", unexpected)):
                if keys:
                    parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
            if shapes:
                k = shapes[0]
                parts.append(
                    f"{len(shapes)} of another shape (e.g. {k}: "
                    f"{tuple(weights[k].shape)} vs {tuple(own[k].shape)})"
                )
            raise ConfigError(
                f"--resume {self.resume_path}: the checkpoint's network is not this one: "
                + ", ".join(parts)
                + " parameter tensors"
            )

    def _restore(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state.get("model"), Mapping):
            raise ConfigError(f"--resume {self.resume_path}: the checkpoint holds no model weights")
        self._check_network_state(state["model"])
        try:
            self.network.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler"):
                self.scheduler.load_state_dict(state["scheduler"])
            self.aggregator.load_state_dict(state["aggregator"])
            self.train_step.load_state_dict(state["train_step"])
            if hasattr(self.objectives, "load_state_dict"):
                self.objectives.load_state_dict(state.get("objectives", {}))
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(
                f"--resume {self.resume_path}: checkpoint does not match this configuration "
                f"({_root_message(err)})"
            ) from err
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.ogr.load_state_dict(state["ogr"])
        self.metrics.load_state_dict(state.get("metrics", {}))
        set_rng_state(state["rng"])
        self.iteration = int(state["iteration"])
        self.best = dict(state["best"])
        self.resumed_run_id = state.get("run_id")
        if self.iteration > self.total_steps:
            raise ConfigError(
                f"--resume: checkpoint is at step {self.iteration}, beyond epochs x "
                f"steps_per_epoch = {self.total_steps}"
            )

    # ================================================================== the loop
    def _iteration(self, engine: Any, batch: Mapping[str, Any]) -> Any:
        """One per-objective step (``SupervisedTrainer(iteration_update=...)``)."""
        image = _as_tensor(batch["image"]).to(self.device, non_blocking=True)
        label = _as_tensor(batch["label"]).to(self.device, non_blocking=True)
        avail = batch.get("available")
        if avail is not None:
            avail = _as_tensor(avail).to(self.device).bool().reshape(image.shape[0], -1)
        self.network.train()
        with torch.autocast(self.device.type, enabled=self.amp):
            outputs = self.network(image, avail)
            named = self.objectives(outputs, label, avail)
        reference = self._reference_loss(engine.state.iteration) if self._needs_ref else None
        if getattr(self.train_step, "jacobian", "parameters") == "outputs":
            # the objectives' inputs; heads the network derives from other heads (the shared
            # U-Net's fused.d* = mean of modality.*) are left out so no path counts twice
            derived = set(getattr(self.network, "derived_outputs", ()))
            heads = {k: v for k, v in outputs.items() if k not in derived}
            report = self.train_step.step(named, reference, outputs=heads)
        else:
            report = self.train_step.step(named, reference)
        if self.scheduler is not None:
            self.scheduler.step()
        self.iteration = engine.state.iteration
        return report

    def _reference_loss(self, step: int) -> torch.Tensor:
        """Fused validation loss on a fixed patch (Gradient-Blending's gradient estimator)."""
        patch = self.ogr_val_patches[step % len(self.ogr_val_patches)]
        image = patch["image"][None].to(self.device)
        label = patch["label"][None].to(self.device)
        avail = patch.get("available")
        avail = None if avail is None else avail[None].to(self.device)
        with torch.autocast(self.device.type, enabled=self.amp):
            outputs = self.network(image, avail)
            named = self.objectives({"fused.d0": outputs["fused.d0"]}, label, avail)
        return named.losses.sum()

    def _on_iteration(self, engine: Any) -> None:
        report = engine.state.output
        it = engine.state.iteration
        self.metrics.add(report)
        if self.bar is not None:
            self.bar.update(1)
        if it % self.log_every == 0 or it == self.total_steps:
            self._flush(it)
        stop = self._stop_requested(it)
        if stop:
            self.interrupted = True
            self.save_checkpoint()
            engine.terminate()
            return
        if self.checkpoint_every and it % self.checkpoint_every == 0:
            self.save_checkpoint()

    def _stop_requested(self, it: int) -> bool:
        if self.world == 1:
            return self._signal is not None
        if it % self.log_every:
            return False
        # one tiny all_reduce per logging interval: ranks must stop at the same step
        flag = torch.tensor([1.0 if self._signal is not None else 0.0], device=self.device)
        all_reduce(flag)
        return bool(flag.item() > 0)

    def _flush(self, it: int) -> None:
        now = time.time()
        steps = it - self._last_flush_it
        values = self.metrics.flush()  # the one host sync of the interval
        if steps > 0:  # training time only: validation pauses are subtracted
            busy = now - self._last_flush_t - self._paused_s
            values["perf/steps_per_second"] = steps / max(busy, 1e-9)
        self._paused_s = 0.0
        values["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self._last_flush_t, self._last_flush_it = now, it
        self.tracker.add_metrics(values, step=it)
        self.tracker.flush()
        if self.bar is not None and "loss/total" in values:
            self.bar.set_postfix(
                loss=f"{values['loss/total']:.3f}",
                skipped=int(values.get("train/skipped_steps", 0)),
                refresh=False,
            )

    def _on_epoch(self, engine: Any) -> None:
        epoch = engine.state.epoch
        if epoch % self.val_every == 0 or epoch == self.epochs:
            self._validate(epoch)
        else:
            self.save_checkpoint()
        if self.stop_after and epoch >= self._start_epoch + self.stop_after and epoch < self.epochs:
            self._stop_reason = f"stop_after={self.stop_after} epochs"
            engine.terminate()

    def _validate(self, epoch: int) -> ValidationResult:
        t0 = time.time()
        try:
            return self._validate_now(epoch)
        finally:
            self._paused_s += time.time() - t0

    def _validate_now(self, epoch: int) -> ValidationResult:
        it = self.iteration
        result = validate(
            self.network,
            self.val_ds,
            [self.patch_size] * 3,
            self.device,
            sw_batch_size=self.sw_batch_size,
            overlap=self.overlap,
            amp=self.amp,
        )
        train_l = head_losses(self.network, self.objectives, self.ogr_train_patches, self.device)
        val_l = head_losses(self.network, self.objectives, self.ogr_val_patches, self.device)
        values = result.metrics()
        values.update({f"heldout_loss/{k}": v for k, v in train_l.items()})
        values.update({f"val_loss/{k}": v for k, v in val_l.items()})
        train_h, val_h = heads_of(train_l), heads_of(val_l)
        ogr = self.ogr.observe(train_h, val_h)
        values.update({f"ogr/{h}": v for h, v in ogr.items() if math.isfinite(v)})
        if isinstance(self.aggregator, ObservesValidation):
            weights = self.aggregator.observe_validation(train_h, val_h)
            values.update({f"blending/weight/{h}": w for h, w in weights.items()})
        values["epoch"] = epoch
        self.last_result = result
        self._last_val_it = it
        is_best = result.dice["mean"] > self.best["metric"]
        if is_best:
            self.best = {
                "metric": result.dice["mean"],
                "epoch": epoch,
                "dice": dict(result.dice),
                "hd95": dict(result.hd95),
            }
            values["val/best_dice_mean"] = result.dice["mean"]
        self.tracker.log_metrics(values, step=it)
        self._log_window_matrices(epoch)
        self.save_checkpoint(best=is_best)
        self._say(
            f"epoch {epoch} step {it}: val Dice "
            + " ".join(f"{k}={v:.3f}" for k, v in result.dice.items())
            + f" (best {self.best['metric']:.3f} at epoch {self.best['epoch']})"
        )
        return result

    def _log_window_matrices(self, epoch: int) -> None:
        """Cosine / alpha / weight matrices of the steps since the last validation, as artifacts
        (``matrices/epoch_<n>/``: labelled heatmaps, JSON and CSV; any number of objectives)."""
        from segmerge.engine import plots

        window = self.metrics.take_window()
        if not self.is_main or not window["names"]:
            return
        folder = Path(tempfile.mkdtemp(prefix="segmerge-matrices-"))
        try:
            files = plots.matrix_artifacts(window, folder, title=f"epoch {epoch}")
            self.tracker.log_artifacts(files, f"matrices/epoch_{epoch:03d}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _handle_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None:  # second Ctrl-C: stop now (run() ends the MLflow run)
            raise KeyboardInterrupt
        self._signal = signum
        self._say(f"signal {signal.Signals(signum).name}: saving a checkpoint and stopping")

    def _say(self, line: str) -> None:
        """A log line on rank 0 (through the progress bar when there is one)."""
        if not self.is_main:
            return
        if getattr(self, "bar", None) is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    # ================================================================== run
    def run(self) -> TrainResult:
        """Train (from the checkpoint's step when resuming), then finish the run."""
        from ignite.engine import Events
        from monai.engines import SupervisedTrainer

        t0 = time.time()
        self._needs_ref = self.aggregator.needs_reference
        self.notes: list[str] = []
        self._last_val_it = -1
        start = self.iteration
        self._start_epoch = start // self.steps_per_epoch
        self._last_flush_t, self._last_flush_it = time.time(), start
        self._paused_s = 0.0
        self.last_result: ValidationResult | None = None
        self._signal: int | None = None
        self.bar = None
        if self.is_main and self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total_steps,
                initial=start,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
                file=sys.stderr,
            )
        old_handlers = {}
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._handle_signal)
        try:
            if start < self.total_steps:
                trainer = SupervisedTrainer(
                    device=self.device,
                    max_epochs=self.epochs,
                    train_data_loader=self._loader(start),
                    network=self.network,
                    optimizer=self.optimizer,
                    loss_function=self.objectives,
                    epoch_length=self.steps_per_epoch,
                    iteration_update=self._iteration,
                    decollate=False,
                )
                trainer.state.iteration = start
                trainer.state.epoch = start // self.steps_per_epoch
                trainer.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)
                trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch)
                self.train_started = True
                trainer.run()
                self.iteration = trainer.state.iteration
            return self._finish(t0)
        except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, no new checkpoint
            self.interrupted = True
            line = (
                "second interrupt: stopped at once without a new checkpoint; the last one "
                f"({self.checkpoint_dir / 'last.pt'}) is kept"
            )
            self._say(line)
            self.notes.append(line)
            return self._finish(t0, abrupt=True)
        except Exception as err:
            raise self._fail(err) from err
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if self.bar is not None:
                self.bar.close()
            torch.set_num_threads(self._prev_threads)  # in-process callers keep their setting
            self.close()
            if self._owns_group and dist.is_initialized():
                dist.destroy_process_group()

    def _fail(self, err: BaseException) -> TrainingFailed:
        """Mark the MLflow run FAILED and describe what went wrong, for exit status 1."""
        import errno

        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            what = f"the disk is full ({err.filename or self.output_dir}: {err.strerror})"
        elif isinstance(err, OSError):
            what = f"a file could not be written or read: {err}"
        else:
            what = _root_message(err)
        last = self.checkpoint_dir / "last.pt" if hasattr(self, "checkpoint_dir") else None
        kept = (
            f"; the last checkpoint ({last}) is kept: --resume continues from it"
            if last is not None and last.is_file()
            else ""
        )
        ended = ""
        if self.is_main and hasattr(self, "tracker"):
            ended = "" if self.tracker.end("FAILED") else " (the store did not take the status)"
        message = (
            f"training stopped at step {self.iteration}: {what}; MLflow run {self.run_id} marked "
            f"FAILED{ended}{kept}"
        )
        return TrainingFailed(message)

    def _end_run(self, status: str, result: TrainResult) -> None:
        """Give the MLflow run its final status; say so when the store does not take it."""
        if not self.is_main:
            return
        if not self.tracker.end(status):
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
            self._say(line)
            result.notes.append(line)

    def _finish(self, t0: float, abrupt: bool = False) -> TrainResult:
        result = TrainResult(
            run_id=self.run_id,
            tracking_uri=self.tracking_uri,
            checkpoint_dir=self.checkpoint_dir,
            iteration=self.iteration,
            interrupted=self.interrupted,
            rank=self.rank,
            resumed_from=self.resumed_from,
            notes=self.notes,
        )
        stopped_early = self.interrupted or self._stop_reason is not None
        if stopped_early:
            self._end_run("KILLED" if self.interrupted else "FINISHED", result)
            result.wall_s = time.time() - t0 + self.setup_s
            return result
        best_file = self.checkpoint_dir / "best.pt"
        use_best = self.weights_choice == "best" and best_file.is_file()
        if not use_best and self._last_val_it != self.iteration:
            # resumed after the last validation, or no best.pt: measure what is published
            self._validate(self.iteration // self.steps_per_epoch)
        weights = self.network.state_dict()
        if use_best and self.is_main:
            best_state = load_checkpoint(best_file)
            weights = best_state["model"]
            best = dict(best_state.get("best") or self.best)  # the metrics of these weights
            result.dice, result.hd95 = dict(best["dice"]), dict(best["hd95"])
            result.best_epoch = int(best["epoch"])
            result.weights = "best"
        elif self.last_result is not None:
            result.dice, result.hd95 = dict(self.last_result.dice), dict(self.last_result.hd95)
            result.best_epoch = self.iteration // self.steps_per_epoch
            result.weights = "last"
        if self.is_main:
            cpu_weights = {k: v.detach().cpu() for k, v in weights.items()}
            models = self.bundle_root / "models"
            # this run's own copy first (its MLflow artifact), then the bundle's, each atomic
            result.run_model_path = atomic_torch_save(
                cpu_weights, models / str(self.run_id) / "model.pt"
            )
            result.model_path = atomic_torch_save(cpu_weights, models / "model.pt")
            # the network these weights fit, as data, so predict and the bundle rebuild it
            network = json.dumps(self.resolved["network_def"], indent=1) + "\n"
            write_text_atomic(result.run_model_path.with_name(NETWORK_RECORD), network)
            write_text_atomic(result.model_path.with_name(NETWORK_RECORD), network)
            self._log_artifacts(result.run_model_path)
            self.tracker.set_tags(
                {
                    "segmerge.weights": result.weights or self.weights_choice,
                    "segmerge.weights_epoch": result.best_epoch,
                    "segmerge.completed": "true",
                }
            )
            self._end_run("FINISHED", result)
        barrier()
        result.wall_s = time.time() - t0 + self.setup_s
        return result

    def _log_artifacts(self, model_path: Path) -> None:
        from segmerge.engine import plots

        self.tracker.retry_now()  # the end of the run: worth one more try of a failing store
        folder = Path(tempfile.mkdtemp(prefix="segmerge-artifacts-"))
        try:
            files = []
            names, cosine, alpha = self.metrics.mean_matrices()
            if names:
                files.append(
                    plots.matrix_heatmap(
                        cosine, names, "cosine similarity (training mean)", folder / "cosine.png"
                    )
                )
                files.append(
                    plots.matrix_heatmap(
                        alpha,
                        names,
                        "conflict coefficients α (training mean)",
                        folder / "alpha.png",
                        vmin=None,
                        vmax=None,
                    )
                )
            keys = self.tracker.metric_keys()
            for prefix, title in (
                ("ogr/", "OGR per head"),
                ("weight/", "aggregation weight per objective"),
            ):
                series = {
                    k[len(prefix) :]: self.tracker.metric_history(k)
                    for k in keys
                    if k.startswith(prefix)
                }
                if series:
                    name = prefix.strip("/") + "_curves.png"
                    files.append(
                        plots.curves(series, title, folder / name, ylabel=prefix.strip("/"))
                    )
            if self.last_result is not None and self.last_result.example:
                ex = self.last_result.example
                files.append(
                    plots.validation_montage(
                        ex["image"],
                        ex["label"],
                        ex["pred"],
                        folder / "validation_montage.png",
                        title="validation case 0",
                    )
                )
            self.tracker.log_artifacts(files, "plots")
            if not self.tracker.log_artifact(model_path, "model") and self.is_main:
                line = f"MLflow run {self.run_id}: the weights were not uploaded (they are in {model_path})"
                self._say(line)
                self.notes.append(line)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _jacobian_option(train_step_cls: type, jacobian: Any) -> dict[str, Any]:
    """``{"jacobian": ...}`` for ``TrainStep`` (``parameters`` | ``outputs``), checked early."""
    import inspect

    if jacobian not in ("parameters", "outputs"):
        raise ConfigError(f"jacobian must be 'parameters' or 'outputs', got {jacobian!r}")
    if "jacobian" in inspect.signature(train_step_cls).parameters:
        return {"jacobian": jacobian}
    if jacobian != "parameters":
        raise ConfigError(
            "--jacobian outputs needs TrainStep(jacobian=...), which this segmerge.step does not "
            "offer yet; use --jacobian parameters (the exact Jacobian)"
        )
    return {}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


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


def _config_value(parser: ConfigParser, cid: str) -> Any:
    """``parser.get_parsed_content(cid)`` with a failure reported as a ConfigError naming ``cid``."""
    try:
        return parser.get_parsed_content(cid)
    except Exception as err:
        raise ConfigError(f"{cid}: cannot be resolved ({_root_message(err)})") from err


def _root_message(err: BaseException) -> str:
    """The innermost exception message (ConfigParser wraps instantiation errors)."""
    seen = err
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    return f"{type(seen).__name__}: {seen}"


def train(
    parser: ConfigParser, resume: str | os.PathLike | None = None, resume_state: dict | None = None
) -> TrainResult:
    """Set up and run one training; see :class:`Trainer`."""
    trainer = Trainer(parser, resume=resume, resume_state=resume_state)
    trainer.setup()
    return trainer.run()


def format_summary(result: TrainResult) -> str:
    """The Dice/HD95 table and the ``mlflow ui`` command printed at the end."""
    lines = []
    if result.dice:
        lines.append(f"validation (epoch {result.best_epoch}):  region   Dice    HD95")
        for region in (*REGIONS, "mean"):
            if region in result.dice:
                lines.append(
                    f"{'':>26}{region:<7}{result.dice[region]:.4f}  {result.hd95.get(region, float('nan')):.2f}"
                )
    if result.model_path is not None:
        which = f" ({result.weights} weights, epoch {result.best_epoch})" if result.weights else ""
        lines.append(
            f"weights: {result.model_path}{which}; this run's copy: {result.run_model_path}"
        )
    if result.resumed_from:
        lines.append(f"continues MLflow run {result.resumed_from} (tag segmerge.resumed_from)")
    if result.checkpoint_dir is not None:
        lines.append(f"checkpoints: {result.checkpoint_dir}")
    if result.run_id:
        lines.append(f"MLflow run {result.run_id}; open it with:")
        lines.append(f"  {ui_command(result.tracking_uri)}")
    return "\n".join(lines)
