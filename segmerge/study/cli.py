"""``python -m segmerge compare``: train every aggregator alike, evaluate, tabulate, plot.

Examples::

    python -m segmerge compare --budget cpu --output runs/compare-cpu          # ~25 min, 2 cores
    python -m segmerge compare --budget full --device cuda --data /data/BraTS2021
    python -m segmerge compare --methods sum,gmd --budget tiny --output /tmp/smoke
    python -m segmerge compare --budget cpu --lr 0.001      # extra options go to every training
    python -m segmerge compare --combine runs/compare-cpu,runs/compare-cpu-seed1 --output runs/seeds

Options not listed in ``--help`` are passed to every ``python -m segmerge train`` (after the
budget's own settings, so they win); they are checked against the training configuration before
anything trains. Re-running the same command skips finished methods and resumes an interrupted
one. Exit status: 0 when every method finished, 1 when any failed (the others still ran and the
report lists the failure), 2 on a bad option, 130 when interrupted.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "parse_args", "usage"]

_FLAGS = ("overwrite", "dry_run", "help")
_OPTIONS = {
    "methods": "comma-separated aggregators (default: sum,mean,pcgrad,gmd,gradcraft,blending)",
    "data": "datalist JSON or BraTS folder (default: the budget's phantoms, generated once)",
    "budget": "tiny | cpu | full (configs/compare.json; default cpu)",
    "seed": "seed of every training (default 0)",
    "output": "study folder (default runs/compare-<budget>)",
    "tracking_uri": "MLflow store (default sqlite:///<output>/mlflow.db)",
    "experiment": "MLflow experiment holding the runs (default segmerge-compare)",
    "device": "cpu | cuda | cuda:N (default: the training config's, auto)",
    "overwrite": "retrain the requested methods even if they finished",
    "dry_run": "print the training command of every method and stop",
    "combine": "DIR,DIR,...: tabulate finished studies of other seeds (mean, range, ranks) into "
    "<output>/combined.md and combined.json; trains nothing (default output runs/compare-combined)",
}


def usage() -> str:
    """Help text."""
    lines = [
        "usage: python -m segmerge compare [--methods a,b,...] [--budget tiny|cpu|full] [--data PATH]",
        "                                  [--seed S] [--output DIR] [--tracking-uri URI]",
        "                                  [--experiment NAME] [--device DEV] [--overwrite]",
        "                                  [--dry-run] [--<train option> VALUE ...]",
        "       python -m segmerge compare --combine DIR,DIR,... [--output DIR]",
        "",
        "options:",
    ]
    for name, text in _OPTIONS.items():
        lines.append(f"  --{name.replace('_', '-'):<16} {text}")
    lines += [
        "",
        "any other --option VALUE is a `python -m segmerge train` option given to every method",
        "(e.g. --lr 0.001, --refresh-every 2); see `python -m segmerge train --help`.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> tuple[dict[str, object], list[str]]:
    """Split ``argv`` into the study's own options and the extra training arguments.

    Returns:
        ``(options, extra)``: options by name (underscores), extra as given.

    Raises:
        ValueError: a positional argument or an option without its value.
    """
    opts: dict[str, object] = {}
    extra: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        if token in ("-h", "--help"):
            opts["help"] = True
            i += 1
            continue
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unexpected argument {token!r}: options are written --name value")
        name, eq, inline = token[2:].partition("=")
        key = name.replace("-", "_")
        if key in _FLAGS:
            if eq:
                raise ValueError(f"--{name} takes no value")
            opts[key] = True
            i += 1
            continue
        if eq:
            value, step = inline, 1
        elif i + 1 < len(args) and not (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
            value, step = args[i + 1], 2
        else:
            if key in _OPTIONS:
                raise ValueError(f"option --{name} needs a value")
            # a training flag such as --amp: passed on as given
            extra.append(token)
            i += 1
            continue
        if key in _OPTIONS:
            opts[key] = value
        else:
            extra += [token] if eq else [token, value]
        i += step
    return opts, extra


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m segmerge compare`` with ``argv`` (the arguments after ``compare``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts, extra = parse_args(args)
    except ValueError as err:
        print(f"segmerge compare: error: {err}\n\n{usage()}", file=sys.stderr)
        return 2
    if opts.get("help"):
        print(usage())
        return 0
    if opts.get("combine"):
        return _combine(opts, extra)
    from segmerge.study.budgets import default_methods, get_budget
    from segmerge.study.runner import Study, StudyError, StudySettings, method_train_command

    try:
        budget = get_budget(str(opts.get("budget", "cpu")))
        methods_text = opts.get("methods")
        methods = (
            [m.strip() for m in str(methods_text).split(",") if m.strip()]
            if methods_text is not None
            else default_methods()
        )
        try:
            seed = int(str(opts.get("seed", 0)))
        except ValueError as err:
            raise StudyError(f"--seed must be an integer, got {opts.get('seed')!r}") from err
        if seed < 0:
            raise StudyError(f"--seed must be >= 0, got {seed}")
        settings = StudySettings(
            methods=methods,
            budget=budget,
            output=Path(str(opts.get("output", f"runs/compare-{budget.name}"))),
            data=Path(str(opts["data"])) if opts.get("data") else None,
            seed=seed,
            tracking_uri=str(opts["tracking_uri"]) if opts.get("tracking_uri") else None,
            experiment=str(opts.get("experiment", "segmerge-compare")),
            device=str(opts["device"]) if opts.get("device") else None,
            extra=extra,
            overwrite=bool(opts.get("overwrite")),
            command="python -m segmerge compare " + shlex.join(args),
        )
        study = Study(settings)
        if opts.get("dry_run"):
            study.prepare(dry_run=True)
            for m in methods:
                print(shlex.join(method_train_command(settings, m, study.data, study.tracking_uri)))
            return 0
        summaries = study.run()
    except (StudyError, ValueError, FileNotFoundError) as err:
        print(f"segmerge compare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "segmerge compare: interrupted; run the same command again to resume "
            "(finished methods are kept, an interrupted training continues from its checkpoint)",
            file=sys.stderr,
        )
        return 130
    failed = [s for s in summaries if s.status != "ok"]
    if failed:
        print(
            f"segmerge compare: {len(failed)} of {len(summaries)} method(s) failed: "
            + ", ".join(s.method for s in failed),
            file=sys.stderr,
        )
        return 1
    return 0


def _combine(opts: dict[str, object], extra: list[str]) -> int:
    from segmerge.study.seeds import write_combined

    folders = [f.strip() for f in str(opts["combine"]).split(",") if f.strip()]
    unused = sorted(k for k in opts if k not in ("combine", "output")) + extra
    try:
        if unused:
            raise ValueError(
                f"--combine only reads finished studies; it takes --output alone, not {unused}"
            )
        md, _ = write_combined(folders, Path(str(opts.get("output", "runs/compare-combined"))))
    except (ValueError, FileNotFoundError) as err:
        print(f"segmerge compare: error: {err}", file=sys.stderr)
        return 2
    print(md.read_text())
    print(f"written: {md} and {md.with_suffix('.json')}")
    return 0
