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
    results.md, results.json, plots/*.png   (see :mod:`segmerge.study.report`, :mod:`segmerge.study.plots`)

Re-running the same command resumes: finished runs are skipped, a run whose training was
interrupted continues from its last checkpoint (same MLflow run), a trained but unevaluated run is
only evaluated; more seeds or methods can be added to a study later. ``--overwrite`` retrains the
requested runs.

The parts: :mod:`segmerge.study.processes` (the jobs, the child processes, stopping them),
:mod:`segmerge.study.training` (one run's training command or resume), :mod:`segmerge.study.scoring`
(its evaluation subprocess), :mod:`segmerge.study.tracking` (the MLflow runs) and
:mod:`segmerge.study.folder` (study.json, the data, the validation cases); :class:`Study` is the
schedule.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segmerge.aggregation import AGGREGATORS
from segmerge.atomic import write_text_atomic
from segmerge.conventions import suggest
from segmerge.engine import ConfigError, load_config, parse_argv, ui_command
from segmerge.engine.config import default_config_dir
from segmerge.study.budgets import Budget
from segmerge.study.common import StudyError, atomic_write_json
from segmerge.study.evaluation import EvaluationResult
from segmerge.study.folder import open_study_record, study_dataset, validation_cases
from segmerge.study.plots import PLOT_FILES, write_plots
from segmerge.study.processes import Processes, Stopped, pid_alive
from segmerge.study.report import MethodSummary, method_means, study_markdown, study_statistics
from segmerge.study.scoring import Evaluator, weights_sha256
from segmerge.study.tracking import StudyTracking
from segmerge.study.training import Trainer, method_train_command, run_dir

__all__ = [
    "StudySettings",
    "Study",
    "StudyError",
    "atomic_write_json",
    "method_train_command",
    "cpu_cores",
]


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

    def signature(self, tracking_uri: str) -> dict[str, Any]:
        """The setup every run of one study shares (kept in ``study.json``)."""
        return {
            "budget": self.budget.name,
            "budget_settings": {
                "phantoms": self.budget.phantoms,
                "train": self.budget.train,
                "evaluation": self.budget.evaluation,
            },
            "data": str(Path(self.data).absolute()) if self.data else "phantoms",
            "device": self.device,
            "extra": list(self.extra),
            "experiment": self.experiment,
            "tracking_uri": tracking_uri,
        }

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


def _machine() -> str:
    text = f"{platform.node() or 'host'}: {platform.machine()} {platform.processor() or ''}".strip()
    text += f", {os.cpu_count()} CPU core(s), torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.device_count()} x GPU {torch.cuda.get_device_name(0)}"
    return text


def describe_setup(parser: Any, preset: str | None = None) -> dict[str, str]:
    """``network`` and ``objectives`` of a resolved training configuration, as short text for
    the MLflow tags and the report (``late: MultiModalDSNet(aux_decoder=shared, fusion=mean)``,
    ``ObjectiveSet(subsets=all, ...)``); ``preset`` is the ``--network`` preset name, if any."""

    def short(section: str) -> str:
        try:
            part = parser.get(section)
        except Exception:  # noqa: BLE001 - a configuration without that section
            part = None
        if not isinstance(part, dict):
            return str(part)
        target = str(part.get("_target_", "?")).rsplit(".", 1)[-1]
        details = [
            f"{k}={part[k]}"
            for k in sorted(part)
            if "subset" in k or k in ("fusion", "aux_decoder")  # what tells two studies apart
        ]
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
    """One comparison study in one output folder (see the module docstring): the schedule of its
    runs; each run is trained by a :class:`~segmerge.study.training.Trainer`, scored by an
    :class:`~segmerge.study.scoring.Evaluator` and recorded in MLflow by a
    :class:`~segmerge.study.tracking.StudyTracking`, as child processes of
    :class:`~segmerge.study.processes.Processes`.

    Args:
        settings: what to run.
        log: where progress lines go (default: print to stdout).
    """

    def __init__(self, settings: StudySettings, log: Callable[[str], None] | None = None) -> None:
        self.s = settings
        self.out = Path(settings.output).expanduser().absolute()
        self.s.output = self.out
        self.log = log or (lambda text: print(text, flush=True))
        self.processes = Processes()
        self.parent_run_id: str | None = None

    # ================================================================= preparation
    def units(self) -> list[tuple[str, int]]:
        """Every (method, seed), seed-major: all methods of the first seed come first, so an
        interrupted study already has comparable runs."""
        return [(m, s) for s in self.s.seeds for m in self.s.methods]

    def run_dir(self, method: str, seed: int) -> Path:
        """``<output>/methods/<method>/seed-<seed>``."""
        return run_dir(self.out, method, seed)

    def prepare(self, dry_run: bool = False) -> None:
        """Check every input and set up the folder, data and MLflow experiment (no training).

        Args:
            dry_run: only check the methods and training options (nothing is written);
                ``self.data`` is then the path the data will have.

        Raises:
            StudyError: unknown method or training option, bad seeds or jobs, unusable output or
                store, an earlier study with another setup in the folder, a run still training.
        """
        self.config_dir = Path(self.s.config_dir or default_config_dir()).absolute()
        known = sorted(AGGREGATORS)  # the registry is the one list of method names
        if not self.s.methods:
            raise StudyError("--methods: give at least one method")
        for m in self.s.methods:
            if m not in known:
                raise StudyError(
                    f"--methods: unknown method {m!r}{suggest(m, known, cutoff=0.5)}; available: "
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
                if pid and pid_alive(pid, self.run_dir(m, s)):
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
        signature = self.s.signature(self.tracking_uri)
        self.record = open_study_record(self.out, signature, self.s.overwrite, self.log)
        self.study_id = str(self.record["study_id"])
        self.data = study_dataset(
            self.s.data,
            self.out,
            self.s.budget.phantoms,
            self.et_label,
            max(1, min(8, cpu_cores())),
            self.log,
        )
        self.n_val, self.val_datalist = validation_cases(self.data, self.et_label, self.out)
        labels = {"budget": self.s.budget.name, **self.setup}
        self.tracking = StudyTracking(
            self.tracking_uri,
            self.s.experiment,
            self.study_id,
            labels,
            self.out,
            self.processes.lock,
            self.log,
        )
        self.tracking.open_experiment()
        self.tracking.open_parent_run(self.record, self.s.methods, self.s.seeds)
        self.parent_run_id = self.tracking.parent_run_id
        self.trainer = Trainer(
            self.s,
            self.data,
            self.tracking_uri,
            self.config_dir,
            self.threads,
            self.processes,
            self.tracking,
            self.log,
        )
        self.evaluator = Evaluator(
            self.s.budget.evaluation,
            self.val_datalist,
            self.config_dir,
            self.threads,
            self.processes,
        )

    # ================================================================= one run
    def run_one(self, method: str, seed: int, device: str | None, label: str) -> MethodSummary:
        """Train (unless already trained), evaluate and record one (method, seed).

        Never raises for a failure of the run (it is reported in the summary); raises
        :class:`~segmerge.study.processes.Stopped` when the study is being interrupted.
        """
        folder = self.run_dir(method, seed)
        result_path = folder / "result.json"
        if self.s.overwrite and folder.exists():
            self.trainer.discard(method, seed)
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
                train = self.trainer.train(method, seed, device, label)
            run_id = str(train["run_id"])
            stage = "evaluation"
            self.log(
                f"{label} trained in {train['train_seconds']:.0f} s; evaluating 15 subsets "
                f"on {self.n_val} validation case(s)"
            )
            t0 = time.perf_counter()
            evaluation = self.evaluator.evaluate(
                (method, seed), folder, run_id, device, train.get("result")
            )
            eval_seconds = time.perf_counter() - t0
            stage = "MLflow logging"
            self.tracking.tag_and_log(method, seed, run_id, evaluation)
            digest = weights_sha256(folder / "models" / "model.pt")
        except Stopped:
            raise
        except Exception as err:  # one run's failure is reported; the others still run
            if self.processes.stopping:
                raise Stopped() from err
            if run_id is None:
                runs = self.trainer.run_ids(method, seed)
                run_id = runs[0] if len(runs) == 1 else None
            if run_id is not None:
                self.tracking.mark_failed(method, seed, run_id, stage)
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
    def report(self, runs: Sequence[MethodSummary], wall_seconds: float = float("nan")) -> Path:
        """Write ``results.md``, ``results.json`` and the plots, attach them to the parent MLflow
        run; returns ``results.md``."""
        for r in runs:
            self.tracking.read_histories(r)
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
        self.tracking.log_parent(stats, [md, js, *plots.values()])
        return md

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

        def work(i: int, method: str, seed: int, device: str | None) -> MethodSummary:
            return self.run_one(method, seed, device, f"[{i}/{len(units)}] {method} seed {seed}:")

        t0 = time.perf_counter()
        summaries = self.processes.schedule(
            units, self.slots, work, lambda: self.tracking.set_parent_status("KILLED")
        )
        runs = [s for s in summaries if s is not None]
        md = self.report(runs, wall_seconds=time.perf_counter() - t0)
        self.tracking.set_parent_status(
            "FINISHED" if all(r.status == "ok" for r in runs) else "FAILED"
        )
        self.log(f"results: {md}; plots in {self.out / 'plots'} ({', '.join(PLOT_FILES.values())})")
        self.log(
            f"MLflow: {ui_command(self.tracking_uri)}  (experiment {self.s.experiment}, parent "
            f"run {self.parent_run_id})"
        )
        return runs
