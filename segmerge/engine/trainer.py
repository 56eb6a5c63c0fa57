"""The training application behind ``python -m segmerge train``.

Run it::

    python -m segmerge train                                  # embedded default (GMD, phantoms)
    python -m segmerge train --aggregator gradcraft --r 0.5 --epochs 20 --data /data/brats21
    torchrun --nproc_per_node 2 -m segmerge train --device cpu   # gloo on CPU, NCCL on GPU
    python -m segmerge train --resume runs/checkpoints/<run id>/last.pt

One step is MONAI's ``SupervisedTrainer`` with ``iteration_update=`` replaced by the
per-objective step (:class:`~segmerge.engine.parts.Iteration`). :meth:`Trainer.setup` checks
everything a bad input could break before the first step: the settings
(:class:`~segmerge.engine.settings.Settings`), the output folders, the components
(:mod:`~segmerge.engine.parts`), the data (:mod:`~segmerge.engine.training_data`), a resumed
checkpoint (:mod:`~segmerge.engine.checkpoint`) and the MLflow run
(:mod:`~segmerge.engine.mlflow_run`). :meth:`Trainer.run` is the schedule: the ignite handlers of
:mod:`~segmerge.engine.handlers`, the loop, then the published weights and the run's end.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.utils import set_determinism

from segmerge.engine.checkpoint import (
    RESUME_MAY_CHANGE,
    TrainingState,
    check_resume_changes,
    load_checkpoint,
    resolved_config,
)
from segmerge.engine.config import ConfigError
from segmerge.engine.dist import barrier, init_from_env, rank_world
from segmerge.engine.handlers import (
    Checkpointer,
    Console,
    MetricFlusher,
    Progress,
    StopAfterEpochs,
    StopOnSignal,
    Validator,
)
from segmerge.engine.lock import FolderLock
from segmerge.engine.mlflow_run import MlflowRun, run_params
from segmerge.engine.outputs import claim_outputs, publish_weights
from segmerge.engine.parts import Iteration, build_parts
from segmerge.engine.result import TrainingFailed, TrainResult, format_summary
from segmerge.engine.settings import Settings
from segmerge.engine.training_data import (
    build_data,
    dataset_location,
    phantom_cache_path,
    phantom_spec,
)

__all__ = [
    "RESUME_MAY_CHANGE", "Trainer", "TrainingFailed", "TrainResult", "dataset_location",
    "format_summary", "phantom_cache_path", "phantom_spec", "train",
]  # fmt: skip
"""``RESUME_MAY_CHANGE``, ``TrainResult``, ``TrainingFailed``, ``format_summary`` and the dataset
helpers live in their modules (``checkpoint``, ``result``, ``training_data``), named here too."""


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
        self.interrupted = False
        self.lock: FolderLock | None = None
        self.progress = Progress()
        self.notes: list[str] = []

    # ================================================================== setup
    def setup(self) -> None:
        """Everything that can fail on bad input, before the first training step."""
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output folder's lock (idempotent)."""
        lock, self.lock = self.lock, None
        if lock is not None:
            lock.release()

    def _setup(self) -> None:
        t0 = time.time()
        self._owns_group = init_from_env(str(self.parser.get("device", "auto")))
        self.rank, self.world = rank_world()
        self.is_main = self.rank == 0
        p = self.parser
        self.console = Console(self.is_main)
        self.settings = s = Settings.from_parser(p, self.world)
        self._prev_threads = torch.get_num_threads()
        if s.num_threads is not None:
            torch.set_num_threads(s.num_threads)
        self.device = s.device
        if self.is_main:
            self.lock = claim_outputs(s, self.console.say)
        if p.get_parsed_content("deterministic"):
            set_determinism(seed=s.seed)
        else:
            torch.manual_seed(s.seed)
        self.parts, self.data = build_parts(
            p, s, lambda: build_data(p, s, self.rank, self.world, self.console.say)
        )
        # the configuration as data (checkpoints, MLflow params): resolved once, RNG-neutral
        self.resolved = resolved_config(p)
        resume = None
        if self.resume_state is not None:
            resume = self._restore(self.resume_state)
        self.run_log = MlflowRun.start(
            s, self.rank, self.world, self.console.say,
            lambda: run_params(self.parts, self.resolved[0], self.data.summary, self.world, s.device),
            p.get(), self.resolved[0], resume,
        )  # fmt: skip
        self.run_id, self.checkpoint_dir = self.run_log.run_id, self.run_log.checkpoint_dir
        self.tracking_uri, self.resumed_from = s.tracking_uri, self.run_log.resumed_from
        self.checkpointer = Checkpointer(
            self.checkpoint_state, self.checkpoint_dir, self.is_main, s.checkpoint_every
        )
        self.run_log.tracker.on_failure = self.checkpointer.on_store_failure
        self.setup_s = time.time() - t0

    def _restore(self, raw: dict) -> dict:
        """Check and load the checkpoint; returns what the MLflow run records of the resume."""
        changes = check_resume_changes(raw, self.resume_path, self.parser.get(), self.resolved[0])
        try:
            state = TrainingState.from_dict(raw, self.resume_path)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.parts.restore(state, self.resume_path)
        self.progress.iteration, self.progress.best = state.iteration, dict(state.best)
        if state.iteration > self.settings.total_steps:
            raise ConfigError(
                f"--resume: checkpoint is at step {state.iteration}, beyond epochs x "
                f"steps_per_epoch = {self.settings.total_steps}"
            )
        return {
            "path": self.resume_path, "run_id": state.run_id, "continue_run": self.continue_run,
            "iteration": state.iteration, "changes": changes,
        }  # fmt: skip

    def checkpoint_state(self) -> TrainingState:
        """The checkpoint of the current step."""
        s, prog = self.settings, self.progress
        return self.parts.state(
            prog.iteration, s.steps_per_epoch, prog.best, self.run_id, s.tracking_uri,
            self.resolved,
        )  # fmt: skip

    def save_checkpoint(self, best: bool = False) -> Path | None:
        """Write ``last.pt`` (and ``best.pt``) atomically; rank 0 only."""
        return self.checkpointer.save(best)

    # ================================================================== run
    def run(self) -> TrainResult:
        """Train (from the checkpoint's step when resuming), then finish the run."""
        t0 = time.time()
        s, parts, start = self.settings, self.parts, self.progress.iteration
        flusher = MetricFlusher(
            s, parts.metrics, self.run_log.tracker, parts.optimizer, self.console, start
        )
        self.validator = Validator(
            s, parts, self.data, self.progress, self.run_log, self.checkpointer, self.console,
            on_pause=flusher.pause,
        )  # fmt: skip
        stop = StopOnSignal(s, self.world, self.checkpointer, self.console)
        stop_after = StopAfterEpochs(s, start // s.steps_per_epoch)
        with stop.installed(), self.console.progress_bar(s.progress, s.total_steps, start):
            try:
                if start < s.total_steps:
                    engine = SupervisedTrainer(
                        device=s.device, max_epochs=s.epochs,
                        train_data_loader=self.data.loader(s, start, self.rank, self.world),
                        network=parts.network, optimizer=parts.optimizer,
                        loss_function=None,  # MONAI requires it; Iteration computes the loss
                        epoch_length=s.steps_per_epoch, decollate=False,
                        iteration_update=Iteration(parts, s.device, s.amp, self.data.ogr_val_patches),
                    )  # fmt: skip
                    engine.state.iteration = start
                    engine.state.epoch = start // s.steps_per_epoch
                    engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
                    for handler in (flusher, stop, self.checkpointer, self.validator, stop_after):
                        handler.attach(engine)
                    engine.run()
                    self.progress.iteration = engine.state.iteration
                self.interrupted = stop.interrupted
                return self._finish(t0, stopped=self.interrupted or stop_after.reason is not None)
            except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, no new checkpoint
                self.interrupted = True
                line = (
                    "second interrupt: stopped at once without a new checkpoint; the last one "
                    f"({self.checkpoint_dir / 'last.pt'}) is kept"
                )
                self.console.say(line)
                self.notes.append(line)
                return self._finish(t0, stopped=True)
            except Exception as err:
                raise self._fail(err) from err
            finally:
                torch.set_num_threads(self._prev_threads)  # in-process callers keep their setting
                self.close()
                if self._owns_group and dist.is_initialized():
                    dist.destroy_process_group()

    def _count(self, engine: SupervisedTrainer) -> None:
        self.progress.iteration = engine.state.iteration

    def _fail(self, err: BaseException) -> TrainingFailed:
        """Mark the MLflow run FAILED and describe what went wrong, for exit status 1."""
        taken = not self.is_main or self.run_log.tracker.end("FAILED")
        return TrainingFailed.of(
            err, self.progress.iteration, self.run_id, self.settings.output_dir,
            self.checkpoint_dir / "last.pt", taken,
        )  # fmt: skip

    def _finish(self, t0: float, stopped: bool = False) -> TrainResult:
        s, prog = self.settings, self.progress
        config = self.resolved[0]
        result = TrainResult(
            run_id=self.run_id, tracking_uri=s.tracking_uri, checkpoint_dir=self.checkpoint_dir,
            iteration=prog.iteration, interrupted=self.interrupted, rank=self.rank,
            resumed_from=self.resumed_from, notes=self.notes, network_def=config["network_def"],
            patch_size=s.patch_size, et_label=int(self.data.summary["et_label"]),
            device=str(s.device),
        )  # fmt: skip
        if stopped:
            result.notes += self.run_log.end("KILLED" if self.interrupted else "FINISHED")
            result.wall_s = time.time() - t0 + self.setup_s
            return result
        best_file = self.checkpoint_dir / "best.pt"
        use_best = s.weights == "best" and best_file.is_file()
        if not use_best and prog.last_val_iteration != prog.iteration:
            # resumed after the last validation, or no best.pt: measure what is published
            self.validator.validate(prog.iteration // s.steps_per_epoch)
        weights = self.parts.network.state_dict()
        if use_best and self.is_main:
            best_state = load_checkpoint(best_file)
            weights = best_state["model"]
            best = dict(best_state.get("best") or prog.best)  # the metrics of these weights
            result.dice, result.hd95 = dict(best["dice"]), dict(best["hd95"])
            result.best_epoch, result.weights = int(best["epoch"]), "best"
        elif prog.last_result is not None:
            result.dice, result.hd95 = dict(prog.last_result.dice), dict(prog.last_result.hd95)
            result.best_epoch, result.weights = prog.iteration // s.steps_per_epoch, "last"
        if self.is_main:
            self._publish(result, {k: v.detach().cpu() for k, v in weights.items()})
            result.notes += self.run_log.end("FINISHED")
        barrier()
        result.wall_s = time.time() - t0 + self.setup_s
        return result

    def _publish(self, result: TrainResult, weights: dict) -> None:
        """The weights and their network (:func:`publish_weights`), the run's artifacts, tags."""
        result.run_model_path, result.model_path = publish_weights(
            weights, self.settings.bundle_root, self.run_id, self.resolved[0]["network_def"]
        )
        line = self.run_log.publish(
            self.parts.metrics, self.progress.last_result, result.run_model_path,
            result.weights or self.settings.weights, result.best_epoch,
        )  # fmt: skip
        if line is not None:
            self.notes.append(line)


def train(
    parser: ConfigParser, resume: str | os.PathLike | None = None, resume_state: dict | None = None
) -> TrainResult:
    """Set up and run one training; see :class:`Trainer`."""
    trainer = Trainer(parser, resume=resume, resume_state=resume_state)
    trainer.setup()
    return trainer.run()
