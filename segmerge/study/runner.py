"""Run the comparison: train every method x seed alike, evaluate each on all subsets, report.

A *run* of the study is one (method, seed). Each trains in its own subprocess,
``python -m segmerge train --aggregator <method> --seed <seed> ...`` (exactly what a user runs;
the process gives its memory back when it ends), with the study's data, budget and extra options,
into ``<output>/methods/<method>/seed-<seed>``, and is then scored in a second subprocess
(``python -m segmerge.study.evaluation``) on the validation cases with every non-empty subset of
sequences (:mod:`segmerge.study.evaluation`). ``--jobs N`` (CPU) or ``--devices cuda:0,cuda:1``
runs N of them at once, one per job / device, with the cores split between the jobs
(jobs x threads <= cores); each run's result depends only on its method, seed and settings, not on
what runs beside it.

MLflow: one *parent* run per study (run name ``compare <study id>``, tag ``segmerge.study``) and
one nested run per method x seed (tag ``mlflow.parentRunId``, plus ``method``, ``seed``,
``network``, ``objectives``, ``budget``), so ``mlflow ui`` shows the study as one expandable row;
the parent run holds ``results.md``, ``results.json`` and the plots as artifacts.

Output folder::

    study.json                              study id, parent run id, the setup every run shares
    data/phantoms/                          generated dataset (when no --data)
    validation.json                         the validation cases that are scored
    mlflow.db, artifacts/                   default MLflow store
    methods/<m>/seed-<s>/train.log          the training command's output (appended on resume)
    methods/<m>/seed-<s>/train.json         written when training finished
    methods/<m>/seed-<s>/evaluation/        robustness.csv / robustness.md, evaluation.json
    methods/<m>/seed-<s>/result.json        written when the run is done: skipped on re-runs
    results.md, results.json, plots/*.png   (see :mod:`segmerge.study.report`)

Re-running the same command resumes: finished runs are skipped, a run whose training was
interrupted continues from its last checkpoint (same MLflow run), a trained but unevaluated run is
only evaluated; more seeds or methods can be added to a study later. ``--overwrite`` retrains the
requested runs.
"""

from __future__ import annotations

import concurrent.futures as futures
import datetime as _dt
import hashlib
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segmerge.atomic import write_text_atomic
from segmerge.study.budgets import Budget
from segmerge.study.evaluation import EvaluationResult, write_validation_datalist
from segmerge.study.report import (
    PLOT_FILES,
    MethodSummary,
    method_means,
    study_markdown,
    study_statistics,
    write_plots,
)

__all__ = [
    "StudySettings",
    "Study",
    "StudyError",
    "atomic_write_json",
    "method_train_command",
    "cpu_cores",
]

STUDY_TAG = "segmerge.study"
HISTORY_KEYS = ("conflict/n_pairs",)
HISTORY_PREFIXES = ("ogr/",)


class StudyError(ValueError):
    """The study cannot start: bad option, unusable output folder, mismatching earlier study."""


class _Stopped(Exception):
    """A run ended because the study is being interrupted (not a failure of the run)."""


def atomic_write_json(path: str | Path, content: Any) -> Path:
    """Write JSON atomically (see :mod:`segmerge.atomic`)."""
    return write_text_atomic(path, json.dumps(content, indent=2, default=str) + "\n")


def cpu_cores() -> int:
    """CPU cores this process may use (its affinity where the OS tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class StudySettings:
    """Everything one study needs.

    Attributes:
        methods: aggregator names, in the order trained and reported.
        budget: the budget preset.
        output: study folder.
        seeds: training seeds; every method trains once per seed.
        data: dataset (datalist or BraTS folder); ``None`` generates the budget's phantoms.
        tracking_uri: MLflow store (default ``sqlite:///<output>/mlflow.db``).
        experiment: MLflow experiment holding the runs.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``None`` (the training config's default), for
            every job.
        devices: one device per job (``["cuda:0", "cuda:1"]``); overrides ``device``.
        jobs: runs at once (default 1; ``len(devices)`` when devices are given).
        reference: the method the others are compared with (``sum``).
        alpha: level of the verdicts.
        extra: further ``python -m segmerge train`` options, given to every run after the
            budget's (so they win).
        overwrite: retrain the requested runs even if they finished.
        config_dir: configs folder (``train.json``, ``compare.json``, ...).
        command: the command line, for the report.
    """

    methods: list[str]
    budget: Budget
    output: Path
    seeds: list[int] = field(default_factory=lambda: [0])
    data: Path | None = None
    tracking_uri: str | None = None
    experiment: str = "segmerge-compare"
    device: str | None = None
    devices: list[str] | None = None
    jobs: int | None = None
    reference: str = "sum"
    alpha: float = 0.05
    extra: list[str] = field(default_factory=list)
    overwrite: bool = False
    config_dir: Path | None = None
    command: str = ""

    def slots(self) -> list[str | None]:
        """The device of each job.

        Raises:
            StudyError: ``jobs`` < 1, or ``jobs`` given with ``devices`` and not equal to their
                number.
        """
        if self.devices:
            if self.jobs is not None and self.jobs != len(self.devices):
                raise StudyError(
                    f"--jobs {self.jobs} with --devices {','.join(self.devices)}: one job runs per "
                    "device; leave out --jobs or give as many devices"
                )
            return list(self.devices)
        jobs = 1 if self.jobs is None else int(self.jobs)
        if jobs < 1:
            raise StudyError(f"--jobs must be >= 1, got {jobs}")
        return [self.device] * jobs

    def threads(self) -> int:
        """Intra-op threads of each job: the budget's / extra ``num_threads`` (if any), at most
        ``cores // jobs`` so that the jobs together never oversubscribe the cores."""
        share = max(1, cpu_cores() // len(self.slots()))
        wanted = self.budget.train.get("num_threads")
        if "--num_threads" in self.extra:
            wanted = self.extra[self.extra.index("--num_threads") + 1]
        try:
            return max(1, min(share, int(wanted))) if wanted not in (None, "null") else share
        except (TypeError, ValueError) as err:
            raise StudyError(f"num_threads must be an integer, got {wanted!r}") from err


def method_train_command(
    settings: StudySettings,
    method: str,
    seed: int,
    data: Path,
    tracking_uri: str,
    device: str | None = None,
) -> list[str]:
    """The ``python -m segmerge train`` command of one (method, seed) (list of arguments)."""
    folder = settings.output / "methods" / method / f"seed-{seed}"
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


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _machine() -> str:
    import torch

    text = f"{platform.node() or 'host'}: {platform.machine()} {platform.processor() or ''}".strip()
    text += f", {os.cpu_count()} CPU core(s), torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.device_count()} x GPU {torch.cuda.get_device_name(0)}"
    return text


def weights_sha256(path: str | Path) -> str:
    """SHA-256 over a saved state dict's tensors (names and bytes, in name order): equal weights
    give equal digests whatever the pickling."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors only
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _pid_alive(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` runs and (where /proc tells) is a training of ``folder``."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OSError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.is_file():
        try:
            return str(folder) in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return True
    return True


def describe_setup(parser: Any, preset: str | None = None) -> dict[str, str]:
    """``network`` and ``objectives`` of a resolved training configuration, as short text for
    the MLflow tags and the report (``late: MultiModalDSNet(fusion=mean)``,
    ``ObjectiveSet(subsets=all, ...)``); ``preset`` is the ``--network`` preset name, if any."""

    def short(section: str) -> str:
        try:
            part = parser.get(section)
        except Exception:  # noqa: BLE001 - a configuration without that section
            part = None
        if not isinstance(part, dict):
            return str(part)
        target = str(part.get("_target_", "?")).rsplit(".", 1)[-1]
        details = [f"{k}={part[k]}" for k in sorted(part) if "subset" in k or k == "fusion"]
        return f"{target}({', '.join(details)})" if details else target

    network, objectives = short("network_def"), short("objectives")
    if preset:
        network = f"{preset}: {network}"
    return {"network": network, "objectives": objectives}


def _network_preset(settings: StudySettings) -> str | None:
    """The ``--network`` preset the trainings get (extra options win over the budget's)."""
    preset = settings.budget.train.get("network")
    for i, token in enumerate(settings.extra[:-1]):
        if token == "--network":
            preset = settings.extra[i + 1]
    return None if preset is None else str(preset)


class Study:
    """One comparison study in one output folder (see the module docstring).

    Args:
        settings: what to run.
        log: where progress lines go (default: print to stdout).
    """

    def __init__(self, settings: StudySettings, log: Callable[[str], None] | None = None) -> None:
        self.s = settings
        self.out = Path(settings.output).expanduser().absolute()
        self.s.output = self.out
        self.log = log or (lambda text: print(text, flush=True))
        self._client: Any = None
        self._lock = threading.Lock()  # MLflow client calls from the job threads
        self._stop = threading.Event()
        self._procs: dict[tuple[str, int], subprocess.Popen] = {}
        self.parent_run_id: str | None = None

    # ================================================================= preparation
    def units(self) -> list[tuple[str, int]]:
        """Every (method, seed), seed-major: all methods of the first seed come first, so an
        interrupted study already has comparable runs."""
        return [(m, s) for s in self.s.seeds for m in self.s.methods]

    def prepare(self, dry_run: bool = False) -> None:
        """Check every input and set up the folder, data and MLflow experiment (no training).

        Args:
            dry_run: only check the methods and training options (nothing is written);
                ``self.data`` is then the path the data will have.

        Raises:
            StudyError: unknown method or training option, bad seeds or jobs, unusable output or
                store, an earlier study with another setup in the folder, a run still training.
        """
        from segmerge.aggregation import AGGREGATORS
        from segmerge.engine import ConfigError, load_config, parse_argv
        from segmerge.engine.config import closest, default_config_dir

        self.config_dir = Path(self.s.config_dir or default_config_dir()).absolute()
        known = sorted(AGGREGATORS)  # the registry is the one list of method names
        if not self.s.methods:
            raise StudyError("--methods: give at least one method")
        for m in self.s.methods:
            if m not in known:
                raise StudyError(
                    f"--methods: unknown method {m!r}{closest(m, known)}; available: "
                    f"{', '.join(known)}"
                )
        for name, values in (("--methods", self.s.methods), ("--seeds", self.s.seeds)):
            dupes = sorted({str(v) for v in values if values.count(v) > 1})
            if dupes:
                raise StudyError(f"{name}: {', '.join(dupes)} listed more than once")
        if not self.s.seeds or any(int(s) < 0 for s in self.s.seeds):
            raise StudyError(f"--seeds: give one or more integers >= 0, got {self.s.seeds}")
        self.slots = self.s.slots()
        self.threads = self.s.threads()
        if self.s.data is not None and not Path(self.s.data).exists():
            raise StudyError(f"--data {self.s.data}: no such file or folder")
        self.tracking_uri = self.s.tracking_uri or f"sqlite:///{self.out / 'mlflow.db'}"
        # Resolve every method's training configuration now: a typo in an extra option fails
        # here, with the engine's suggestion, not after the first run trained for minutes.
        self.data = Path(self.s.data).absolute() if self.s.data else self.out / "data" / "phantoms"
        self.configs = {}
        for m in self.s.methods:
            cmd = method_train_command(self.s, m, self.s.seeds[0], self.data, self.tracking_uri)
            try:
                self.configs[m] = load_config(parse_argv(cmd[4:]), self.config_dir)
            except ConfigError as err:
                raise StudyError(f"training options for {m}: {err}") from err
        first = self.configs[self.s.methods[0]]
        self.et_label = int(first.get_parsed_content("dataset#et_label"))
        self.setup = describe_setup(first, _network_preset(self.s))
        if dry_run:
            return
        for m, s in self.units():
            pid_file = self.run_dir(m, s) / ".train.pid"
            if pid_file.is_file():
                pid = int(pid_file.read_text().strip() or 0)
                if pid and _pid_alive(pid, self.run_dir(m, s)):
                    raise StudyError(
                        f"{m} seed {s} is still training in {self.run_dir(m, s)} (pid {pid}, left "
                        "by an earlier compare); stop it or wait for it before resuming"
                    )
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.out, prefix=".write-test-"):
                pass
        except OSError as err:
            raise StudyError(f"--output {self.out} is not writable: {err}") from err
        self._load_or_create_study_record()
        self.data = self._dataset()
        self._validation_cases()
        self._experiment()
        self._parent_run()

    def _signature(self) -> dict[str, Any]:
        return {
            "budget": self.s.budget.name,
            "budget_settings": {
                "phantoms": self.s.budget.phantoms,
                "train": self.s.budget.train,
                "evaluation": self.s.budget.evaluation,
            },
            "data": str(Path(self.s.data).absolute()) if self.s.data else "phantoms",
            "device": self.s.device,
            "extra": list(self.s.extra),
            "experiment": self.s.experiment,
            "tracking_uri": self.tracking_uri,
        }

    def _load_or_create_study_record(self) -> None:
        path = self.out / "study.json"
        signature = self._signature()
        record: dict[str, Any] | None = None
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError:
                record = None
        if record is not None and record.get("signature") != signature:
            old = record.get("signature", {})
            diffs = [k for k in signature if old.get(k) != signature[k]]
            if not self.s.overwrite:
                raise StudyError(
                    f"--output {self.out} holds study {record.get('study_id')} with another setup "
                    f"(differs in: {', '.join(diffs)}); every run of a study must share it. "
                    "Use another --output, or --overwrite to start a new study there"
                )
            self.log(f"starting a new study in {self.out} (setup changed: {', '.join(diffs)})")
            shutil.rmtree(self.out / "methods", ignore_errors=True)
            record = None
        if record is None:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
            record = {
                "study_id": f"study-{stamp}-{uuid.uuid4().hex[:6]}",
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "signature": signature,
            }
            atomic_write_json(path, record)
        self.record = record
        self.study_id = str(record["study_id"])

    def _dataset(self) -> Path:
        if self.s.data is not None:
            return Path(self.s.data).absolute()
        folder = self.out / "data" / "phantoms"
        if (folder / "dataset.json").is_file():
            return folder
        from segmerge.data import cached_phantoms

        spec = {"cases": 20, "size": 64, **dict(self.s.budget.phantoms)}
        spec.update(et_label=self.et_label, workers=max(1, min(8, cpu_cores())))
        self.log(f"writing {spec['cases']} phantom case(s) of {spec['size']}³ to {folder} ...")
        cached_phantoms(folder, spec)  # the data package's cache, shared with train
        return folder

    def _validation_cases(self) -> None:
        from segmerge.data import load_dataset

        try:
            spec = load_dataset(self.data, et_label=self.et_label)
        except ValueError as err:
            raise StudyError(f"dataset {self.data}: {err}") from err
        if not spec.validation:
            raise StudyError(
                f"dataset {self.data}: no validation case; the study evaluates every run on the "
                "validation split"
            )
        self.n_val = len(spec.validation)
        self.val_datalist = write_validation_datalist(spec.validation, self.out / "validation.json")

    def _mlflow(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment(self) -> None:
        from segmerge.engine import check_tracking_uri

        try:
            check_tracking_uri(self.tracking_uri)
        except ValueError as err:
            raise StudyError(f"--tracking-uri: {err}") from err
        client = self._mlflow()
        exp = client.get_experiment_by_name(self.s.experiment)
        if exp is None:
            location = None
            if self.tracking_uri.startswith("sqlite:///"):  # artifacts beside the store, as train
                location = str(Path(self.tracking_uri[len("sqlite:///") :]).parent / "artifacts")
            self.experiment_id = client.create_experiment(
                self.s.experiment, artifact_location=location
            )
        else:
            self.experiment_id = exp.experiment_id

    def _parent_tags(self) -> dict[str, str]:
        return {
            STUDY_TAG: self.study_id,
            "segmerge.study.role": "parent",
            "budget": self.s.budget.name,
            "network": self.setup["network"],
            "objectives": self.setup["objectives"],
            "methods": ",".join(self.s.methods),
            "seeds": ",".join(map(str, self.s.seeds)),
            "segmerge.study.output": str(self.out),
        }

    def _parent_run(self) -> None:
        """The study's parent MLflow run: created once, reused (set RUNNING) on every resume."""
        from mlflow.entities import RunTag

        client = self._mlflow()
        run_id = self.record.get("parent_run_id")
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.lifecycle_stage != "active":
                    run_id = None
            except Exception:  # noqa: BLE001 - deleted or from another store: start a new one
                run_id = None
        if run_id:
            client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(
                self.experiment_id, run_name=f"compare {self.study_id}", tags=self._parent_tags()
            )
            run_id = run.info.run_id
            self.record["parent_run_id"] = run_id
            atomic_write_json(self.out / "study.json", self.record)
        tags = [RunTag(k, v) for k, v in self._parent_tags().items()]
        client.log_batch(run_id, tags=tags)
        self.parent_run_id = str(run_id)

    # ================================================================= one run
    def run_dir(self, method: str, seed: int) -> Path:
        """``<output>/methods/<method>/seed-<seed>``."""
        return self.out / "methods" / method / f"seed-{seed}"

    def _run_tags(self, method: str, seed: int) -> dict[str, str]:
        tags = {
            STUDY_TAG: self.study_id,
            "method": method,
            "seed": str(seed),
            "budget": self.s.budget.name,
            "network": self.setup["network"],
            "objectives": self.setup["objectives"],
        }
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags

    def _run_ids(self, method: str, seed: int) -> list[str]:
        ckpt = self.run_dir(method, seed) / "checkpoints"
        if not ckpt.is_dir():
            return []
        return sorted(p.name for p in ckpt.iterdir() if p.is_dir())

    def _discard(self, method: str, seed: int) -> None:
        """Remove an earlier attempt: its folder and its MLflow run(s)."""
        for run_id in self._run_ids(method, seed):
            try:
                with self._lock:
                    self._mlflow().delete_run(run_id)
            except Exception as err:  # a run already gone is fine
                self.log(f"  note: could not delete earlier MLflow run {run_id}: {err}")
        shutil.rmtree(self.run_dir(method, seed), ignore_errors=True)

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", SEGMERGE_CONFIGS=str(self.config_dir))
        threads = str(self.threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        env.update(extra or {})
        return env

    def _subprocess(
        self, key: tuple[str, int], cmd: list[str], log_path: Path, env: dict[str, str]
    ) -> int:
        """Run ``cmd`` with its output appended to ``log_path``; its pid in ``.train.pid``."""
        pid_file = log_path.parent / ".train.pid"
        with open(log_path, "a") as log_file:
            log_file.write(f"$ {' '.join(cmd)}\n")
            log_file.flush()
            with self._lock:
                if self._stop.is_set():
                    raise _Stopped()
                # Own session: a Ctrl-C in the terminal reaches the study only, which forwards
                # exactly one SIGINT (a second one would make the trainer stop without saving).
                proc = subprocess.Popen(
                    cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
                self._procs[key] = proc
            pid_file.write_text(f"{proc.pid}\n")
            try:
                code = proc.wait()
            finally:
                with self._lock:
                    self._procs.pop(key, None)
                pid_file.unlink(missing_ok=True)
        if self._stop.is_set() and code != 0:
            raise _Stopped()
        return code

    def _train(self, method: str, seed: int, device: str | None, label: str) -> dict[str, Any]:
        folder = self.run_dir(method, seed)
        last = [folder / "checkpoints" / r / "last.pt" for r in self._run_ids(method, seed)]
        last = [p for p in last if p.is_file()]
        if len(last) == 1:
            cmd = [sys.executable, "-m", "segmerge", "train", "--resume", str(last[0])]
            self.log(f"{label} resuming the interrupted training from {last[0]}")
        else:
            if folder.exists():
                self._discard(method, seed)
            cmd = method_train_command(self.s, method, seed, self.data, self.tracking_uri, device)
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / "train.log"
        self.log(f"{label} training on {device or 'the default device'} (log: {log_path})")
        env = self._env({"SEGMERGE_RUN_TAGS": json.dumps(self._run_tags(method, seed))})
        t0 = time.perf_counter()
        code = self._subprocess((method, seed), cmd, log_path, env)
        seconds = time.perf_counter() - t0
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(
                f"training exited with status {code} after {seconds:.0f} s; last lines of "
                f"{log_path}:\n    " + "\n    ".join(tail),
            )
        from segmerge.engine.result import find_result, read_result

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

    def _trained_config(
        self, folder: Path, run_id: str, result_path: str | None = None
    ) -> tuple[dict[str, Any], int, int, str]:
        """Network definition, patch size, ET label and device of the trained run.

        Read as data from the training's result (``result.json``, written by ``segmerge train``;
        a study trained by a version that wrote none: the checkpoint's resolved configuration,
        format 2): nothing in it is evaluated, and a value that is still an expression, or a
        ``_target_`` outside segmerge's networks, is refused (a file on disk must never run code).
        """
        from segmerge.engine import load_checkpoint, read_result
        from segmerge.engine.checkpoint import stored_config
        from segmerge.overrides import find_expression

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
                f"{source}: 'network_def#_target_' is {target!r}; expected a network "
                "of segmerge.nets"
            )
        patch = values["patch_size"]
        patch = patch[0] if isinstance(patch, list) and patch else patch
        return dict(network_def), int(patch), int(values["dataset#et_label"]), str(values["device"])

    def _evaluate(
        self, method: str, seed: int, run_id: str, device: str | None, result: str | None = None
    ) -> EvaluationResult:
        """Score the trained weights in a ``python -m segmerge.study.evaluation`` subprocess
        (``result``: the training's ``result.json``)."""
        folder = self.run_dir(method, seed)
        network_def, patch, et_label, trained_on = self._trained_config(folder, run_id, result)
        ev = self.s.budget.evaluation
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
        env = self._env({"OMP_NUM_THREADS": str(spec["num_threads"])})
        code = self._subprocess((method, seed), cmd, out_dir / "evaluation.log", env)
        if code != 0:
            tail = (out_dir / "evaluation.log").read_text(errors="replace").strip()
            raise RuntimeError(
                f"evaluation exited with status {code}; last lines of {out_dir / 'evaluation.log'}"
                ":\n    " + "\n    ".join(tail.splitlines()[-10:])
            )
        return EvaluationResult.from_dict(json.loads((out_dir / "evaluation.json").read_text()))

    def _tag_and_log(
        self, method: str, seed: int, run_id: str, evaluation: EvaluationResult | None
    ) -> None:
        from mlflow.entities import Metric, RunTag

        tags = [RunTag(k, v) for k, v in self._run_tags(method, seed).items()]
        tags.append(RunTag("segmerge.study.output", str(self.out)))
        metrics = []
        if evaluation is not None:
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, 0) for k, v in evaluation.mlflow_metrics().items()]
        with self._lock:
            self._mlflow().log_batch(run_id, metrics=metrics, tags=tags)

    def run_one(self, method: str, seed: int, device: str | None, label: str) -> MethodSummary:
        """Train (unless already trained), evaluate and record one (method, seed).

        Never raises for a failure of the run (it is reported in the summary); raises
        :class:`_Stopped` when the study is being interrupted.
        """
        folder = self.run_dir(method, seed)
        result_path = folder / "result.json"
        if self.s.overwrite and folder.exists():
            self._discard(method, seed)
        if result_path.is_file():
            try:
                summary = self._summary_from_file(result_path)
                self.log(f"{label} already done (run {summary.run_id}); skipped")
                return summary
            except (ValueError, KeyError, json.JSONDecodeError):
                self.log(f"{label} unreadable {result_path}: redoing the run")
        run_id: str | None = None
        stage = "training"
        try:
            train_path = folder / "train.json"
            if train_path.is_file():
                train = json.loads(train_path.read_text())
                self.log(f"{label} already trained (run {train['run_id']}); evaluating only")
            else:
                train = self._train(method, seed, device, label)
            run_id = str(train["run_id"])
            stage = "evaluation"
            self.log(
                f"{label} trained in {train['train_seconds']:.0f} s; evaluating 15 subsets "
                f"on {self.n_val} validation case(s)"
            )
            t0 = time.perf_counter()
            evaluation = self._evaluate(method, seed, run_id, device, train.get("result"))
            eval_seconds = time.perf_counter() - t0
            stage = "MLflow logging"
            self._tag_and_log(method, seed, run_id, evaluation)
            digest = weights_sha256(folder / "models" / "model.pt")
        except _Stopped:
            raise
        except Exception as err:  # one run's failure is reported; the others still run
            if self._stop.is_set():
                raise _Stopped() from err
            if run_id is None:
                runs = self._run_ids(method, seed)
                run_id = runs[0] if len(runs) == 1 else None
            if run_id is not None:
                try:
                    self._tag_and_log(method, seed, run_id, None)
                    with self._lock:
                        self._mlflow().set_tag(run_id, "segmerge.study.failed", stage)
                except Exception:  # noqa: S110 - the failure itself is what gets reported
                    pass
            message = f"{stage} failed: {err}"
            self.log(f"{label} FAILED — {message}")
            return MethodSummary(method, status="failed", run_id=run_id, error=message, seed=seed)
        record = {
            "method": method,
            "seed": seed,
            "study_id": self.study_id,
            "run_id": run_id,
            "train_seconds": float(train["train_seconds"]),
            "eval_seconds": eval_seconds,
            "weights_sha256": digest,
            "evaluation": evaluation.to_dict(),
        }
        atomic_write_json(result_path, record)
        full, rob = evaluation.full, evaluation.robustness()
        self.log(
            f"{label} Dice WT {full.dice['wt']:.3f} TC {full.dice['tc']:.3f} ET {full.dice['et']:.3f}"
            f" mean {full.dice['mean']:.3f}; over subsets {rob['dice_mean_over_subsets']:.3f} "
            f"({eval_seconds:.0f} s evaluation)"
        )
        return self._summary_from_file(result_path)

    @staticmethod
    def _summary_from_file(path: Path) -> MethodSummary:
        record = json.loads(path.read_text())
        return MethodSummary(
            method=str(record["method"]),
            seed=int(record["seed"]),
            run_id=record.get("run_id"),
            evaluation=EvaluationResult.from_dict(record["evaluation"]),
            train_seconds=float(record.get("train_seconds", float("nan"))),
            eval_seconds=float(record.get("eval_seconds", float("nan"))),
            weights_sha256=record.get("weights_sha256"),
        )

    # ================================================================= the whole study
    def _histories(self, summary: MethodSummary) -> None:
        """Read the conflict / OGR / speed histories of the run back from MLflow."""
        if summary.run_id is None:
            return
        client = self._mlflow()
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

    def report(self, runs: Sequence[MethodSummary], wall_seconds: float = float("nan")) -> Path:
        """Write ``results.md``, ``results.json`` and the plots, attach them to the parent MLflow
        run; returns ``results.md``."""
        for r in runs:
            self._histories(r)
        stats = study_statistics(
            runs, self.s.methods, self.s.seeds, reference=self.s.reference, alpha=self.s.alpha
        )
        per_method = method_means(runs, self.s.methods)
        plots = write_plots(per_method, self.out / "plots")
        meta = {
            "study_id": self.study_id,
            "command": self.s.command,
            "budget": self.s.budget.name,
            "seeds": list(self.s.seeds),
            "reference": self.s.reference,
            "alpha": self.s.alpha,
            "network": self.setup["network"],
            "objectives": self.setup["objectives"],
            "data": str(self.data),
            "n_cases": self.n_val,
            "machine": _machine(),
            "jobs": len(self.slots),
            "devices": [d or "default" for d in self.slots],
            "threads_per_job": self.threads,
            "wall_seconds": wall_seconds,
            "run_seconds_total": float(
                sum(r.train_seconds + r.eval_seconds for r in runs if r.status == "ok")
            ),
            "experiment": self.s.experiment,
            "tracking_uri": self.tracking_uri,
            "parent_run_id": self.parent_run_id,
        }
        rel = {k: str(p.relative_to(self.out)) for k, p in plots.items()}
        md = write_text_atomic(
            self.out / "results.md", study_markdown(stats, meta, rel, per_method)
        )
        js = atomic_write_json(self.out / "results.json", {**meta, **stats, "plots": rel})
        self._log_parent(stats, [md, js, *plots.values()])
        return md

    def _log_parent(self, stats: dict[str, Any], files: Sequence[Path]) -> None:
        from mlflow.entities import Metric, RunTag

        if not self.parent_run_id:
            return
        client = self._mlflow()
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

    def _set_parent_status(self, status: str) -> None:
        if self.parent_run_id:
            try:
                self._mlflow().set_terminated(self.parent_run_id, status=status)
            except Exception as err:  # noqa: BLE001
                self.log(f"  note: could not close the parent MLflow run: {err}")

    def _interrupt_children(self) -> None:
        self._stop.set()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            try:
                proc.send_signal(signal.SIGINT)  # the trainer checkpoints, then exits
            except OSError:
                pass
        deadline = time.monotonic() + 300
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self) -> list[MethodSummary]:
        """Prepare, run every (method, seed) on the jobs (failures reported, the rest still
        run), write the report. Raises ``KeyboardInterrupt`` (after every running training saved
        its checkpoint) when interrupted."""
        self.prepare()
        units = self.units()
        self.log(
            f"study {self.study_id}: {len(self.s.methods)} method(s) {', '.join(self.s.methods)} "
            f"x seed(s) {', '.join(map(str, self.s.seeds))} = {len(units)} run(s) on "
            f"{len(self.slots)} job(s) of {self.threads} thread(s); budget {self.s.budget.name}; "
            f"network {self.setup['network']}; objectives {self.setup['objectives']}; data "
            f"{self.data} ({self.n_val} validation case(s)); output {self.out}"
        )
        free: queue.Queue[str | None] = queue.Queue()
        for slot in self.slots:
            free.put(slot)

        def job(i: int, method: str, seed: int) -> MethodSummary | None:
            if self._stop.is_set():
                return None
            device = free.get()
            try:
                label = f"[{i}/{len(units)}] {method} seed {seed}:"
                return self.run_one(method, seed, device, label)
            except _Stopped:
                return None
            finally:
                free.put(device)

        previous = None
        if threading.current_thread() is threading.main_thread():
            # SIGTERM stops like Ctrl-C: the running trainings save their checkpoints first
            previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        t0 = time.perf_counter()
        pool = futures.ThreadPoolExecutor(max_workers=len(self.slots), thread_name_prefix="job")
        try:
            pending = [pool.submit(job, i, m, s) for i, (m, s) in enumerate(units, 1)]
            while not all(f.done() for f in pending):
                futures.wait(pending, timeout=0.5)
            summaries = [f.result() for f in pending]
        except KeyboardInterrupt:
            self._interrupt_children()
            pool.shutdown(wait=True, cancel_futures=True)
            self._set_parent_status("KILLED")
            raise
        finally:
            pool.shutdown(wait=True)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        runs = [s for s in summaries if s is not None]
        md = self.report(runs, wall_seconds=time.perf_counter() - t0)
        self._set_parent_status("FINISHED" if all(r.status == "ok" for r in runs) else "FAILED")
        self.log(f"results: {md}; plots in {self.out / 'plots'} ({', '.join(PLOT_FILES.values())})")
        from segmerge.engine import ui_command

        self.log(
            f"MLflow: {ui_command(self.tracking_uri)}  (experiment {self.s.experiment}, parent "
            f"run {self.parent_run_id})"
        )
        return runs
