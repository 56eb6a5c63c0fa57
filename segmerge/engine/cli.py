"""``python -m segmerge train``: parse options, check them, train, print the summary.

Examples::

    python -m segmerge train
    python -m segmerge train --aggregator gradcraft --r 0.5 --e 0.0 --b 0.0 --epochs 20
    python -m segmerge train --data /data/BraTS2021 --patch-size 96 --device cuda --amp
    python -m segmerge train --resume runs/checkpoints/<run id>/last.pt
    torchrun --nproc_per_node 2 -m segmerge train --device cpu

Exit status (see ``docs/reliability.md``):

- 0: trained; weights published (a tracking store that failed on the way is reported, training
  still finished);
- 1: training stopped on an error after it started (disk full, a failure in a step): one line
  says what, the MLflow run is marked FAILED, the last checkpoint is kept;
- 2: a configuration or input error, reported before training (also: the output folder is in
  use by another training, an unusable tracking store, a checkpoint that cannot be resumed);
- 130: interrupted (SIGINT/SIGTERM): a checkpoint is saved and the run marked KILLED; a second
  Ctrl-C stops at once, keeping the last checkpoint. ``--resume`` continues.

When training ran (status 0 or 130), rank 0 writes the :class:`~segmerge.engine.result.TrainResult`
as JSON to ``<output>/checkpoints/<run id>/result.json`` (atomically;
:func:`segmerge.engine.result.read_result` reads it): ``compare`` reads it instead of the folders.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from segmerge.engine.config import ConfigError, load_config, parse_argv, usage

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``segmerge train`` with ``argv`` (the arguments after ``train``); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_argv(args)
        if opts.help:
            print(usage())
            return 0
        resume_state = None
        checkpoint = None
        if opts.continue_run and not opts.resume:
            raise ConfigError("--continue-run only applies with --resume CHECKPOINT")
        if opts.resume:
            # after parsing: --help stays fast
            from segmerge.engine.checkpoint import load_checkpoint, resolve_resume_path

            path = resolve_resume_path(opts.resume)
            resume_state = load_checkpoint(path)
            checkpoint = (resume_state, path)  # its configuration is data, never evaluated
            opts.resume = str(path)
        parser = load_config(opts, checkpoint=checkpoint)
        # after parsing: --help stays fast
        from segmerge.engine.trainer import Trainer, TrainingFailed, format_summary

        trainer = Trainer(
            parser,
            resume=opts.resume,
            resume_state=resume_state,
            continue_run=opts.continue_run,
        )
        trainer.setup()  # every input check happens here, before the first step
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"segmerge train: error: {err}", file=sys.stderr)
        return 2
    try:
        result = trainer.run()
    except TrainingFailed as err:
        print(f"segmerge train: error: {err}", file=sys.stderr)
        return err.exit_status
    if result.rank != 0:
        return 130 if result.interrupted else 0
    # after parsing: --help stays fast
    from segmerge.engine.result import write_result

    try:
        write_result(result)
    except OSError as err:
        print(f"segmerge train: error: the result could not be written: {err}", file=sys.stderr)
        return 1
    if result.interrupted:
        last = shlex.quote(str(result.checkpoint_dir / "last.pt"))
        abrupt = any(n.startswith("second interrupt") for n in result.notes)
        saved = "" if abrupt else "checkpoint saved. "
        print(
            f"interrupted at step {result.iteration}; {saved}Continue with:\n"
            f"  python -m segmerge train --resume {last}",
            file=sys.stderr,
        )
        return 130
    print(format_summary(result))
    return 0
