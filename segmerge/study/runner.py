"""Run the comparison: train every method alike, evaluate each on all subsets, report.

Each method trains in its own subprocess, ``python -m segmerge train --aggregator <method> ...``
(exactly what a user runs; the process ends and gives its memory back before the next method),
with the study's data, seed, budget and extra options, into ``<output>/methods/<method>`` and one
shared MLflow experiment (run name = method). The trained weights are then scored on the
validation cases with every non-empty subset of sequences (:mod:`segmerge.study.evaluation`),
the run is tagged with the study id and given the study metrics, and ``result.json`` is written.

Output folder::

    study.json                     study id and the setup every method shares
    data/phantoms/                 generated dataset (when no --data)
    validation.json                the validation cases that are scored
    mlflow.db, artifacts/          default MLflow store
    methods/<method>/train.log     the training command's output (appended on resume)
    methods/<method>/train.json    written when training finished
    methods/<method>/evaluation/   robustness.csv / robustness.md (as ``evaluate --subsets all``)
    methods/<method>/result.json   written when the method is done: it is then skipped on re-runs
    results.md, results.json, plots/*.png

Re-running the same command resumes: finished methods are skipped, a method whose training was
interrupted continues from its last checkpoint (same MLflow run), a trained but unevaluated
method is only evaluated. ``--overwrite`` retrains the requested methods.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
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
from segmerge.study.evaluation import EvaluationResult, evaluate_model, write_validation_datalist
from segmerge.study.report import PLOT_FILES, MethodSummary, results_markdown, write_plots

__all__ = ["StudySettings", "Study", "StudyError", "atomic_write_json", "method_train_command"]

STUDY_TAG = "segmerge.study"
METHOD_TAG = "segmerge.study.method"
HISTORY_KEYS = ("conflict/n_pairs",)
HISTORY_PREFIXES = ("ogr/",)


class StudyError(ValueError):
    """The study cannot start: bad option, unusable output folder, mismatching earlier study."""


def atomic_write_json(path: str | Path, content: Any) -> Path:
    """Write JSON atomically (see :mod:`segmerge.atomic`)."""
    return write_text_atomic(path, json.dumps(content, indent=2, default=str) + "\n")


def _atomic_write_text(path: Path, text: str) -> Path:
    return write_text_atomic(path, text)


@dataclass
class StudySettings:
    """Everything one study run needs.

    Attributes:
        methods: aggregator names, in the order trained and reported.
        budget: the budget preset.
        output: study folder.
        data: dataset (datalist or BraTS folder); ``None`` generates the budget's phantoms.
        seed: seed of every training.
        tracking_uri: MLflow store (default ``sqlite:///<output>/mlflow.db``).
        experiment: MLflow experiment holding the runs.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``None`` (the training config's default).
        extra: further ``python -m segmerge train`` options, given to every method after the
            budget's (so they win).
        overwrite: retrain the requested methods even if they finished.
        config_dir: configs folder (``train.json``, ``aggregators/``, ``compare.json``).
        command: the command line, for the report.
    """

    methods: list[str]
    budget: Budget
    output: Path
    data: Path | None = None
    seed: int = 0
    tracking_uri: str | None = None
    experiment: str = "segmerge-compare"
    device: str | None = None
    extra: list[str] = field(default_factory=list)
    overwrite: bool = False
    config_dir: Path | None = None
    command: str = ""


def method_train_command(
    settings: StudySettings, method: str, data: Path, tracking_uri: str
) -> list[str]:
    """The ``python -m segmerge train`` command of one method (list of arguments)."""
    folder = settings.output / "methods" / method
    cmd = [sys.executable, "-m", "segmerge", "train", "--aggregator", method]
    cmd += ["--data", str(data), "--seed", str(settings.seed)]
    cmd += ["--output", str(folder), "--bundle_root", str(folder)]
    cmd += ["--tracking-uri", tracking_uri, "--experiment", settings.experiment]
    cmd += ["--run_name", method, "--progress", "false"]
    if settings.device:
        cmd += ["--device", settings.device]
    return cmd + settings.budget.train_args() + list(settings.extra)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine() -> str:
    import torch

    text = f"{platform.node() or 'host'}: {platform.machine()} {platform.processor() or ''}".strip()
    text += f", {os.cpu_count()} CPU core(s), torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


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

    # ================================================================= preparation
    def prepare(self, dry_run: bool = False) -> None:
        """Check every input and set up the folder, data and MLflow experiment (no training).

        Args:
            dry_run: only check the methods and training options (nothing is written);
                ``self.data`` is then the path the data will have.

        Raises:
            StudyError: unknown method or training option, unusable output or store, an
                earlier study with another setup in the folder.
        """
        from segmerge.engine import ConfigError, available_aggregators, load_config, parse_argv
        from segmerge.engine.config import closest, default_config_dir

        self.config_dir = Path(self.s.config_dir or default_config_dir()).absolute()
        known = available_aggregators(self.config_dir)
        if not self.s.methods:
            raise StudyError("--methods: give at least one method")
        for m in self.s.methods:
            if m not in known:
                raise StudyError(
                    f"--methods: unknown method {m!r}{closest(m, known)}; available: "
                    f"{', '.join(known)}"
                )
        dupes = sorted({m for m in self.s.methods if self.s.methods.count(m) > 1})
        if dupes:
            raise StudyError(f"--methods: {', '.join(dupes)} listed more than once")
        if self.s.data is not None and not Path(self.s.data).exists():
            raise StudyError(f"--data {self.s.data}: no such file or folder")
        self.tracking_uri = self.s.tracking_uri or f"sqlite:///{self.out / 'mlflow.db'}"
        # Resolve every method's training configuration now: a typo in an extra option fails
        # here, with the engine's suggestion, not after the first method trained for minutes.
        self.data = Path(self.s.data).absolute() if self.s.data else self.out / "data" / "phantoms"
        self.configs = {}
        for m in self.s.methods:
            argv = method_train_command(self.s, m, self.data, self.tracking_uri)[4:]
            try:
                self.configs[m] = load_config(parse_argv(argv), self.config_dir)
            except ConfigError as err:
                raise StudyError(f"training options for {m}: {err}") from err
        first = self.configs[self.s.methods[0]]
        self.et_label = int(first.get_parsed_content("dataset#et_label"))
        if dry_run:
            return
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

    def _signature(self) -> dict[str, Any]:
        return {
            "budget": self.s.budget.name,
            "budget_settings": {
                "phantoms": self.s.budget.phantoms,
                "train": self.s.budget.train,
                "evaluation": self.s.budget.evaluation,
            },
            "seed": self.s.seed,
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
                    f"(differs in: {', '.join(diffs)}); every method of a study must share it. "
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
        self.study_id = str(record["study_id"])

    def _dataset(self) -> Path:
        if self.s.data is not None:
            return Path(self.s.data).absolute()
        folder = self.out / "data" / "phantoms"
        if (folder / "dataset.json").is_file():
            return folder
        from segmerge.data import write_phantom_dataset

        spec = dict(self.s.budget.phantoms)
        self.log(
            f"writing {spec.get('cases')} phantom case(s) of {spec.get('size')}³ to {folder} ..."
        )
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".phantoms.", dir=folder.parent))
        try:
            write_phantom_dataset(
                tmp,
                cases=int(spec.get("cases", 20)),
                size=int(spec.get("size", 64)),
                seed=int(spec.get("seed", 0)),
                et_label=self.et_label,
                layout=str(spec.get("layout", "brats2021")),
                val_fraction=float(spec.get("val_fraction", 0.2)),
                workers=max(1, min(8, os.cpu_count() or 1)),
                progress=False,
            )
            os.replace(tmp, folder)  # the dataset appears whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def _validation_cases(self) -> None:
        from segmerge.data import load_dataset

        try:
            spec = load_dataset(self.data, et_label=self.et_label)
        except ValueError as err:
            raise StudyError(f"dataset {self.data}: {err}") from err
        if not spec.validation:
            raise StudyError(
                f"dataset {self.data}: no validation case; the study evaluates every method on the "
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
        client.set_experiment_tag(self.experiment_id, STUDY_TAG, self.study_id)

    # ================================================================= one method
    def method_dir(self, method: str) -> Path:
        """``<output>/methods/<method>``."""
        return self.out / "methods" / method

    def _run_ids(self, method: str) -> list[str]:
        ckpt = self.method_dir(method) / "checkpoints"
        if not ckpt.is_dir():
            return []
        return sorted(p.name for p in ckpt.iterdir() if p.is_dir())

    def _discard(self, method: str) -> None:
        """Remove an earlier attempt: its folder and its MLflow run(s)."""
        for run_id in self._run_ids(method):
            try:
                self._mlflow().delete_run(run_id)
            except Exception as err:  # a run already gone is fine
                self.log(f"  note: could not delete earlier MLflow run {run_id}: {err}")
        shutil.rmtree(self.method_dir(method), ignore_errors=True)

    def _train(self, method: str, label: str) -> dict[str, Any]:
        folder = self.method_dir(method)
        last = [folder / "checkpoints" / r / "last.pt" for r in self._run_ids(method)]
        last = [p for p in last if p.is_file()]
        if len(last) == 1:
            cmd = [sys.executable, "-m", "segmerge", "train", "--resume", str(last[0])]
            self.log(f"{label} resuming the interrupted training from {last[0]}")
        else:
            if folder.exists():
                self._discard(method)
            cmd = method_train_command(self.s, method, self.data, self.tracking_uri)
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / "train.log"
        self.log(f"{label} training (log: {log_path})")
        env = dict(os.environ, PYTHONUNBUFFERED="1", SEGMERGE_CONFIGS=str(self.config_dir))
        t0 = time.perf_counter()
        cpu0 = _children_cpu()
        with open(log_path, "a") as log_file:
            log_file.write(f"$ {' '.join(cmd)}\n")
            log_file.flush()
            # Own session: a Ctrl-C in the terminal reaches this process only, which forwards
            # exactly one SIGINT (a second one would make the trainer stop without saving).
            proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                # the trainer saves a checkpoint at the end of its current step, then exits
                try:
                    proc.send_signal(signal.SIGINT)
                    proc.wait(timeout=300)
                except (subprocess.TimeoutExpired, OSError):
                    proc.kill()
                    proc.wait()
                raise
        seconds = time.perf_counter() - t0
        cpu_seconds = _children_cpu() - cpu0
        runs = self._run_ids(method)
        run_id = runs[0] if len(runs) == 1 else None
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(
                f"training exited with status {code} after {seconds:.0f} s; last lines of "
                f"{log_path}:\n    " + "\n    ".join(tail),
            )
        if run_id is None:
            raise RuntimeError(
                f"training finished but no single run folder in {folder}/checkpoints"
            )
        record = {
            "method": method,
            "run_id": run_id,
            "train_seconds": seconds,
            "train_cpu_seconds": cpu_seconds,
            "command": cmd,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(folder / "train.json", record)
        return record

    def _trained_config(self, folder: Path, run_id: str) -> tuple[dict[str, Any], int, int, str]:
        """Network definition, patch size, ET label and device of the trained run."""
        from monai.bundle import ConfigParser

        from segmerge.engine import load_checkpoint

        ckpt = folder / "checkpoints" / run_id / "last.pt"
        parser = ConfigParser()
        parser.read_config(json.loads(load_checkpoint(ckpt)["config"]))
        network_def = parser.get("network_def")
        patch = int(parser.get_parsed_content("patch_size"))
        et_label = int(parser.get_parsed_content("dataset#et_label"))
        device = str(parser.get("device", "cpu"))
        return dict(network_def), patch, et_label, device

    def _evaluate(self, method: str, run_id: str) -> EvaluationResult:
        folder = self.method_dir(method)
        network_def, patch, et_label, device = self._trained_config(folder, run_id)
        ev = self.s.budget.evaluation
        import torch

        threads = torch.get_num_threads()
        if ev.get("num_threads"):
            torch.set_num_threads(int(ev["num_threads"]))
        try:
            return self._evaluate_with(folder, network_def, patch, et_label, device, ev)
        finally:
            torch.set_num_threads(threads)

    def _evaluate_with(
        self,
        folder: Path,
        network_def: dict[str, Any],
        patch: int,
        et_label: int,
        device: str,
        ev: dict[str, Any],
    ) -> EvaluationResult:
        return evaluate_model(
            folder / "models" / "model.pt",
            self.val_datalist,
            network_def,
            roi_size=int(ev.get("roi_size") or patch),
            et_label=et_label,
            device=device,
            overlap=float(ev.get("overlap", 0.25)),
            sw_batch_size=int(ev.get("sw_batch_size", 1)),
            out_dir=folder / "evaluation",
            config_file=self.config_dir / "inference.json",
        )

    def _tag_and_log(self, method: str, run_id: str, evaluation: EvaluationResult | None) -> None:
        from mlflow.entities import Metric, RunTag

        client = self._mlflow()
        tags = [
            RunTag(STUDY_TAG, self.study_id),
            RunTag(METHOD_TAG, method),
            RunTag("segmerge.study.budget", self.s.budget.name),
            RunTag("segmerge.study.output", str(self.out)),
        ]
        metrics = []
        if evaluation is not None:
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, 0) for k, v in evaluation.mlflow_metrics().items()]
        client.log_batch(run_id, metrics=metrics, tags=tags)

    def run_method(self, method: str, label: str = "") -> MethodSummary:
        """Train (unless already trained), evaluate and record one method; never raises."""
        folder = self.method_dir(method)
        result_path = folder / "result.json"
        label = label or f"{method}:"
        if self.s.overwrite and folder.exists():
            self._discard(method)
        if result_path.is_file():
            try:
                summary = self._summary_from_file(result_path)
                self.log(f"{label} already done (run {summary.run_id}); skipped")
                return summary
            except (ValueError, KeyError, json.JSONDecodeError):
                self.log(f"{label} unreadable {result_path}: redoing the method")
        run_id: str | None = None
        stage = "training"
        try:
            train_path = folder / "train.json"
            if train_path.is_file():
                train = json.loads(train_path.read_text())
                self.log(f"{label} already trained (run {train['run_id']}); evaluating only")
            else:
                train = self._train(method, label)
            run_id = str(train["run_id"])
            stage = "evaluation"
            self.log(
                f"{label} trained in {train['train_seconds']:.0f} s; evaluating 15 subsets "
                f"on {self.n_val} validation case(s)"
            )
            t0, cpu0 = time.perf_counter(), time.process_time()
            evaluation = self._evaluate(method, run_id)
            eval_seconds = time.perf_counter() - t0
            eval_cpu_seconds = time.process_time() - cpu0
            stage = "MLflow logging"
            self._tag_and_log(method, run_id, evaluation)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # one method's failure is reported; the others still run
            if run_id is None:
                runs = self._run_ids(method)
                run_id = runs[0] if len(runs) == 1 else None
            if run_id is not None:
                try:
                    self._tag_and_log(method, run_id, None)
                    self._mlflow().set_tag(run_id, "segmerge.study.failed", stage)
                except Exception:  # noqa: S110 - the failure itself is what gets reported
                    pass
            message = f"{stage} failed: {err}"
            self.log(f"{label} FAILED — {message}")
            return MethodSummary(method, status="failed", run_id=run_id, error=message)
        record = {
            "method": method,
            "study_id": self.study_id,
            "run_id": run_id,
            "train_seconds": float(train["train_seconds"]),
            "eval_seconds": eval_seconds,
            "train_cpu_seconds": train.get("train_cpu_seconds"),
            "eval_cpu_seconds": eval_cpu_seconds,
            "evaluation": evaluation.to_dict(),
        }
        atomic_write_json(result_path, record)
        full, rob = evaluation.full, evaluation.robustness()
        self.log(
            f"{label} Dice WT {full.dice['wt']:.3f} TC {full.dice['tc']:.3f} ET {full.dice['et']:.3f}"
            f" mean {full.dice['mean']:.3f}; over subsets {rob['dice_mean_over_subsets']:.3f}, "
            f"worst {rob['worst_subset']} {rob['worst_dice']:.3f} ({eval_seconds:.0f} s)"
        )
        return self._summary_from_file(result_path)

    @staticmethod
    def _summary_from_file(path: Path) -> MethodSummary:
        record = json.loads(path.read_text())
        return MethodSummary(
            method=str(record["method"]),
            run_id=record.get("run_id"),
            evaluation=EvaluationResult.from_dict(record["evaluation"]),
            train_seconds=float(record.get("train_seconds", float("nan"))),
            eval_seconds=float(record.get("eval_seconds", float("nan"))),
        )

    # ================================================================= the whole study
    def _histories(self, summary: MethodSummary) -> None:
        """Read the conflict / OGR / speed histories of the method's run back from MLflow."""
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

    def report(self, summaries: Sequence[MethodSummary]) -> Path:
        """Write ``results.md``, ``results.json`` and the plots; returns ``results.md``."""
        for s in summaries:
            self._histories(s)
        plots = write_plots(summaries, self.out / "plots")
        meta = {
            "study_id": self.study_id,
            "command": self.s.command,
            "budget": self.s.budget.name,
            "seed": self.s.seed,
            "data": str(self.data),
            "n_cases": self.n_val,
            "machine": _machine(),
            "experiment": self.s.experiment,
            "tracking_uri": self.tracking_uri,
        }
        rel = {k: str(p.relative_to(self.out)) for k, p in plots.items()}
        md = _atomic_write_text(self.out / "results.md", results_markdown(summaries, meta, rel))
        atomic_write_json(
            self.out / "results.json",
            {
                **meta,
                "methods": [
                    {
                        "method": s.method,
                        "status": s.status,
                        "run_id": s.run_id,
                        "error": s.error,
                        "train_seconds": s.train_seconds,
                        "eval_seconds": s.eval_seconds,
                        "steps_per_second": s.steps_per_second,
                        "evaluation": s.evaluation.to_dict() if s.evaluation else None,
                        "robustness": s.evaluation.robustness() if s.evaluation else None,
                    }
                    for s in summaries
                ],
                "plots": rel,
            },
        )
        return md

    def run(self) -> list[MethodSummary]:
        """Prepare, run every method (failures reported, the rest still run), write the report."""
        self.prepare()
        n = len(self.s.methods)
        self.log(
            f"study {self.study_id}: {n} method(s) {', '.join(self.s.methods)}; budget "
            f"{self.s.budget.name}; seed {self.s.seed}; data {self.data} ({self.n_val} validation "
            f"case(s)); output {self.out}"
        )
        summaries = []
        previous = None
        if threading.current_thread() is threading.main_thread():
            # SIGTERM stops like Ctrl-C: the running training saves its checkpoint first
            previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            for i, m in enumerate(self.s.methods, 1):
                summaries.append(self.run_method(m, label=f"[{i}/{n}] {m}:"))
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        md = self.report(summaries)
        self.log(f"results: {md}; plots in {self.out / 'plots'} ({', '.join(PLOT_FILES.values())})")
        from segmerge.engine import ui_command

        self.log(f"MLflow: {ui_command(self.tracking_uri)}  (experiment {self.s.experiment})")
        return summaries
