"""``python -m segmerge train``: parse options, check them, train, print the summary.

Examples::

    python -m segmerge train
    python -m segmerge train --aggregator gradcraft --r 0.5 --e 0.0 --b 0.0 --epochs 20
    python -m segmerge train --data /data/BraTS2021 --patch-size 96 --device cuda --amp
    python -m segmerge train --resume runs/checkpoints/<run id>/last.pt
    torchrun --nproc_per_node 2 -m segmerge train --device cpu

Exit status: 0 on success, 2 on a configuration or input error (reported before training),
130 when interrupted (a checkpoint was saved; ``--resume`` continues).
"""

from __future__ import annotations

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
        if opts.resume:
            from segmerge.engine.checkpoint import load_checkpoint, resolve_resume_path

            path = resolve_resume_path(opts.resume)
            resume_state = load_checkpoint(path)
            checkpoint = (resume_state, path)  # its configuration is data, never evaluated
            opts.resume = str(path)
        parser = load_config(opts, checkpoint=checkpoint)
        from segmerge.engine.trainer import Trainer, format_summary

        trainer = Trainer(parser, resume=opts.resume, resume_state=resume_state)
        trainer.setup()  # every input check happens here, before the first step
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"segmerge train: error: {err}", file=sys.stderr)
        return 2
    result = trainer.run()
    if result.rank != 0:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(
            f"interrupted at step {result.iteration}; checkpoint saved. Continue with:\n"
            f"  python -m segmerge train --resume {result.checkpoint_dir}/last.pt",
            file=sys.stderr,
        )
        return 130
    print(format_summary(result))
    return 0
