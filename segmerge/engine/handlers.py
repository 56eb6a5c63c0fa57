"""The ignite event handlers of a training, each attached with ``attach(engine)``.

On ``ITERATION_COMPLETED``, in this order: :class:`MetricFlusher` (buffer the step's report,
send the metrics every ``log_every`` steps), :class:`StopOnSignal` (SIGINT/SIGTERM: checkpoint
and stop, at the same step on every rank), :class:`Checkpointer` (``last.pt`` every
``checkpoint_every`` steps). On ``EPOCH_COMPLETED``: :class:`Validator` (every ``val_every``
epochs and at the last: Dice/HD95, held-out losses, OGR, the aggregator's validation
observation, ``best.pt``; a checkpoint otherwise), then :class:`StopAfterEpochs`.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from tqdm.auto import tqdm

from segmerge.aggregation import ObservesValidation
from segmerge.engine.checkpoint import TrainingState, atomic_torch_save
from segmerge.engine.dist import all_reduce
from segmerge.engine.metrics_buffer import StepMetrics
from segmerge.engine.mlflow_run import MlflowRun
from segmerge.engine.parts import Parts
from segmerge.engine.settings import Settings
from segmerge.engine.tracking import Tracker
from segmerge.engine.training_data import TrainingData
from segmerge.engine.validation import ValidationResult, head_losses, heads_of, validate

__all__ = [
    "Checkpointer",
    "Console",
    "MetricFlusher",
    "Progress",
    "StopAfterEpochs",
    "StopOnSignal",
    "Validator",
]


def _no_best() -> dict[str, Any]:
    return {"metric": -1.0, "epoch": -1, "dice": {}, "hd95": {}}


@dataclass
class Progress:
    """Where the training is: steps done, the best validation, the last one."""

    iteration: int = 0
    best: dict[str, Any] = field(default_factory=_no_best)
    last_result: ValidationResult | None = None
    last_val_iteration: int = -1


class Console:
    """Log lines on rank 0, through the progress bar while there is one."""

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main
        self.bar: Any = None

    def say(self, line: str) -> None:
        """Write ``line`` to stderr (rank 0 only)."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    @contextmanager
    def progress_bar(self, enabled: bool, total: int, initial: int) -> Iterator[Any]:
        """A tqdm bar of the steps (rank 0 and ``enabled`` only; else None)."""
        if self.is_main and enabled:
            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="step",
                dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
            )  # fmt: skip
        try:
            yield self.bar
        finally:
            if self.bar is not None:
                self.bar.close()
            self.bar = None


class MetricFlusher:
    """Buffer each step's report; every ``log_every`` steps (and at the last) send the means,
    ``lr`` and ``perf/steps_per_second`` (validation pauses excluded) in one batch."""

    def __init__(
        self, s: Settings, metrics: StepMetrics, tracker: Tracker, optimizer: Any,
        console: Console, start: int,
    ) -> None:  # fmt: skip
        self.s, self.metrics, self.tracker, self.optimizer = s, metrics, tracker, optimizer
        self.console = console
        self.last_t, self.last_it = time.time(), start
        self.paused_s = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` (a validation) out of the next throughput."""
        self.paused_s += seconds

    def __call__(self, engine: Engine) -> None:
        it = engine.state.iteration
        self.metrics.add(engine.state.output)
        bar = self.console.bar
        if bar is not None:
            bar.update(1)
        if it % self.s.log_every and it != self.s.total_steps:
            return
        now = time.time()
        steps = it - self.last_it
        values = self.metrics.flush()  # the one host sync of the interval
        if steps > 0:  # training time only: validation pauses are subtracted
            busy = now - self.last_t - self.paused_s
            values["perf/steps_per_second"] = steps / max(busy, 1e-9)
        self.paused_s = 0.0
        values["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.last_t, self.last_it = now, it
        self.tracker.add_metrics(values, step=it)
        self.tracker.flush()
        if bar is not None and "loss/total" in values:
            bar.set_postfix(
                loss=f"{values['loss/total']:.3f}",
                skipped=int(values.get("train/skipped_steps", 0)),
                refresh=False,
            )


class Checkpointer:
    """``last.pt`` (and ``best.pt``) in the run's folder, atomically, rank 0 only; attached, also
    every ``checkpoint_every`` steps."""

    def __init__(
        self, state: Callable[[], TrainingState], folder: Path, is_main: bool, every: int | None
    ) -> None:
        self.state, self.folder, self.is_main, self.every = state, folder, is_main, every
        self.armed = False  # set once training runs (a store failure then saves a checkpoint)

    def save(self, best: bool = False) -> Path | None:
        """Write ``last.pt`` (and ``best.pt``); returns ``last.pt`` (None on other ranks)."""
        if not self.is_main:
            return None
        state = self.state().to_dict()
        path = atomic_torch_save(state, self.folder / "last.pt")
        if best:
            atomic_torch_save(state, self.folder / "best.pt")
        return path

    def on_store_failure(self, reason: str) -> None:
        """The store failed during the run (said once by the tracker): keep a checkpoint now."""
        if self.armed:
            self.save()

    def attach(self, engine: Engine) -> None:
        self.armed = True
        if self.every:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._every)

    def _every(self, engine: Engine) -> None:
        if not engine.should_terminate and engine.state.iteration % self.every == 0:
            self.save()


class StopOnSignal:
    """SIGINT/SIGTERM: checkpoint and stop after the current step; a second one stops at once
    (``KeyboardInterrupt``). Under torchrun the ranks agree at each logging interval."""

    def __init__(
        self, s: Settings, world: int, checkpointer: Checkpointer, console: Console
    ) -> None:
        self.s, self.world, self.checkpointer, self.console = s, world, checkpointer, console
        self.signal: int | None = None
        self.interrupted = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT/SIGTERM while inside (main thread only), then restore the handlers."""
        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self.handle)
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second Ctrl-C: stop now (the trainer ends the MLflow run)
            raise KeyboardInterrupt
        self.signal = signum
        self.console.say(f"signal {signal.Signals(signum).name}: saving a checkpoint and stopping")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def requested(self, it: int) -> bool:
        """Whether to stop after step ``it`` (the same answer on every rank)."""
        if self.world == 1:
            return self.signal is not None
        if it % self.s.log_every:
            return False
        # one tiny all_reduce per logging interval: ranks must stop at the same step
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=self.s.device)
        all_reduce(flag)
        return bool(flag.item() > 0)

    def __call__(self, engine: Engine) -> None:
        if self.requested(engine.state.iteration):
            self.interrupted = True
            self.checkpointer.save()
            engine.terminate()


class StopAfterEpochs:
    """``stop_after=N``: end the run after N epochs of this process (the rest is for a resume)."""

    def __init__(self, s: Settings, start_epoch: int) -> None:
        self.s, self.start_epoch = s, start_epoch
        self.reason: str | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch, n = engine.state.epoch, self.s.stop_after
        if n and epoch >= self.start_epoch + n and epoch < self.s.epochs:
            self.reason = f"stop_after={n} epochs"
            engine.terminate()


class Validator:
    """Validation every ``val_every`` epochs and at the last one (a plain checkpoint after the
    other epochs): sliding-window Dice/HD95, held-out and validation losses per head, OGR, the
    aggregator's :class:`~segmerge.aggregation.ObservesValidation` weights, the step-matrix
    window, then ``last.pt`` and, on a new best mean Dice, ``best.pt``."""

    def __init__(
        self, s: Settings, parts: Parts, data: TrainingData, progress: Progress, run: MlflowRun,
        checkpointer: Checkpointer, console: Console, on_pause: Callable[[float], None],
    ) -> None:  # fmt: skip
        self.s, self.parts, self.data, self.progress, self.run = s, parts, data, progress, run
        self.checkpointer, self.console, self.on_pause = checkpointer, console, on_pause

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if epoch % self.s.val_every == 0 or epoch == self.s.epochs:
            self.validate(epoch)
        else:
            self.checkpointer.save()

    def validate(self, epoch: int) -> ValidationResult:
        """Validate now (also after training, when the published weights were not measured)."""
        t0 = time.time()
        try:
            return self._validate(epoch)
        finally:
            self.on_pause(time.time() - t0)

    def _validate(self, epoch: int) -> ValidationResult:
        s, p, d, prog = self.s, self.parts, self.data, self.progress
        it = prog.iteration
        result = validate(
            p.network, d.val_ds, [s.patch_size] * 3, s.device,
            sw_batch_size=s.sw_batch_size, overlap=s.overlap, amp=s.amp,
        )  # fmt: skip
        train_l = head_losses(p.network, p.objectives, d.ogr_train_patches, s.device)
        val_l = head_losses(p.network, p.objectives, d.ogr_val_patches, s.device)
        values = result.metrics()
        values.update({f"heldout_loss/{k}": v for k, v in train_l.items()})
        values.update({f"val_loss/{k}": v for k, v in val_l.items()})
        train_h, val_h = heads_of(train_l), heads_of(val_l)
        ogr = p.ogr.observe(train_h, val_h)
        values.update({f"ogr/{h}": v for h, v in ogr.items() if math.isfinite(v)})
        if isinstance(p.aggregator, ObservesValidation):
            weights = p.aggregator.observe_validation(train_h, val_h)
            values.update({f"blending/weight/{h}": w for h, w in weights.items()})
        values["epoch"] = epoch
        prog.last_result, prog.last_val_iteration = result, it
        is_best = result.dice["mean"] > prog.best["metric"]
        if is_best:
            prog.best = {
                "metric": result.dice["mean"],
                "epoch": epoch,
                "dice": dict(result.dice),
                "hd95": dict(result.hd95),
            }
            values["val/best_dice_mean"] = result.dice["mean"]
        self.run.tracker.log_metrics(values, step=it)
        self.run.log_window(p.metrics, epoch)
        self.checkpointer.save(best=is_best)
        self.console.say(
            f"epoch {epoch} step {it}: val Dice "
            + " ".join(f"{k}={v:.3f}" for k, v in result.dice.items())
            + f" (best {prog.best['metric']:.3f} at epoch {prog.best['epoch']})"
        )
        return result
