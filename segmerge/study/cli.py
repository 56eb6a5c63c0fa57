"""``python -m segmerge compare``: train every aggregator x seed alike, evaluate, compare, plot.

Examples::

    python -m segmerge compare --budget cpu --jobs 2 --output runs/compare-cpu   # default study
    python -m segmerge compare --methods sum,gmd,upgrad --seeds 0,1,2 --jobs 2 --budget cpu \
        --output runs/compare-3
    python -m segmerge compare --budget full --devices cuda:0,cuda:1 --data /data/BraTS2021
    python -m segmerge compare --methods sum,gmd --seeds 0,1 --budget tiny --output /tmp/smoke
    python -m segmerge compare --budget cpu --lr 0.001      # extra options go to every training

Options not listed in ``--help`` are passed to every ``python -m segmerge train`` (after the
budget's own settings, so they win); they are checked against the training configuration before
anything trains. Re-running the same command skips finished runs (per method x seed) and resumes
an interrupted one. Exit status: 0 when every run finished, 1 when any failed (the others still
ran and the report lists the failure), 2 on a bad option, 130 when interrupted.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "parse_args", "usage", "parse_int_list"]

_FLAGS = ("overwrite", "dry_run", "help")
_OPTIONS = {
    "methods": "comma-separated aggregators (default: configs/compare.json's 'methods')",
    "seeds": "comma-separated training seeds, each method trains once per seed (default: "
    "compare.json's 'seeds', 0,1,2)",
    "seed": "a single seed (same as --seeds S)",
    "jobs": "trainings at once on this machine, the cores split between them (default 1)",
    "devices": "DEV,DEV,...: one job per device, e.g. cuda:0,cuda:1 (instead of --jobs)",
    "data": "datalist JSON or BraTS folder (default: the budget's phantoms, generated once)",
    "budget": "tiny | cpu | full (configs/compare.json; default cpu)",
    "output": "study folder (default runs/compare-<budget>)",
    "tracking_uri": "MLflow store (default sqlite:///<output>/mlflow.db)",
    "experiment": "MLflow experiment holding the study's runs (default segmerge-compare)",
    "device": "cpu | cuda | cuda:N for every job (default: the training config's, auto)",
    "overwrite": "retrain the requested runs even if they finished",
    "dry_run": "print the training command of every method x seed and stop",
}


def usage() -> str:
    """Help text."""
    lines = [
        "usage: python -m segmerge compare [--methods a,b,...] [--seeds 0,1,2] [--jobs N]",
        "                                  [--devices cuda:0,cuda:1] [--budget tiny|cpu|full]",
        "                                  [--data PATH] [--output DIR] [--tracking-uri URI]",
        "                                  [--experiment NAME] [--device DEV] [--overwrite]",
        "                                  [--dry-run] [--<train option> VALUE ...]",
        "",
        "options:",
    ]
    for name, text in _OPTIONS.items():
        lines.append(f"  --{name.replace('_', '-'):<16} {text}")
    lines += [
        "",
        "any other --option VALUE is a `python -m segmerge train` option given to every run",
        "(e.g. --lr 0.001, --refresh-every 2); see `python -m segmerge train --help`.",
        "results.json / results.md: per method the per-seed scores, mean and 95% interval over",
        "seeds, and the paired comparison with the reference (sum): difference per validation",
        "case x seed with a 95% bootstrap interval, Wilcoxon p, Holm-adjusted p and a verdict.",
    ]
    return "\n".join(lines)


def parse_int_list(option: str, text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``.

    Raises:
        ValueError: an item that is not an integer >= 0, naming the option.
    """
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = [int(t) for t in items]
    except ValueError as err:
        raise ValueError(f"--{option} takes integers separated by commas, got {text!r}") from err
    if not values or any(v < 0 for v in values):
        raise ValueError(f"--{option} takes integers >= 0 separated by commas, got {text!r}")
    return values


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
    # after parsing: --help stays fast
    from segmerge.study.budgets import default_methods, get_budget, study_defaults
    from segmerge.study.runner import Study, StudyError, StudySettings, method_train_command

    try:
        budget = get_budget(str(opts.get("budget", "cpu")))
        defaults = study_defaults()
        methods_text = opts.get("methods")
        methods = (
            [m.strip() for m in str(methods_text).split(",") if m.strip()]
            if methods_text is not None
            else default_methods()
        )
        if "seed" in opts and "seeds" in opts:
            raise StudyError("give --seeds or --seed, not both")
        seeds = defaults["seeds"]
        if "seeds" in opts or "seed" in opts:
            key = "seeds" if "seeds" in opts else "seed"
            seeds = parse_int_list(key, str(opts[key]))
            if key == "seed" and len(seeds) != 1:
                raise StudyError(f"--seed takes one seed, got {opts['seed']!r} (use --seeds)")
        jobs = None
        if "jobs" in opts:
            try:
                jobs = int(str(opts["jobs"]))
            except ValueError as err:
                raise StudyError(f"--jobs must be an integer, got {opts['jobs']!r}") from err
        devices = None
        if opts.get("devices"):
            devices = [d.strip() for d in str(opts["devices"]).split(",") if d.strip()]
            if opts.get("device"):
                raise StudyError("give --devices (one per job) or --device, not both")
        settings = StudySettings(
            methods=methods,
            budget=budget,
            output=Path(str(opts.get("output", f"runs/compare-{budget.name}"))),
            seeds=seeds,
            data=Path(str(opts["data"])) if opts.get("data") else None,
            tracking_uri=str(opts["tracking_uri"]) if opts.get("tracking_uri") else None,
            experiment=str(opts.get("experiment", "segmerge-compare")),
            device=str(opts["device"]) if opts.get("device") else None,
            devices=devices,
            jobs=jobs,
            reference=defaults["reference"],
            alpha=defaults["alpha"],
            extra=extra,
            overwrite=bool(opts.get("overwrite")),
            command="python -m segmerge compare " + shlex.join(args),
        )
        study = Study(settings)
        if opts.get("dry_run"):
            study.prepare(dry_run=True)
            slots = settings.slots()
            for i, (m, seed) in enumerate(study.units()):
                cmd = method_train_command(
                    settings, m, seed, study.data, study.tracking_uri, slots[i % len(slots)]
                )
                print(shlex.join(cmd))
            return 0
        runs = study.run()
    except (StudyError, ValueError, FileNotFoundError) as err:
        print(f"segmerge compare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "segmerge compare: interrupted; run the same command again to resume "
            "(finished runs are kept, an interrupted training continues from its checkpoint)",
            file=sys.stderr,
        )
        return 130
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        print(
            f"segmerge compare: {len(failed)} of {len(runs)} run(s) failed: "
            + ", ".join(f"{r.method} seed {r.seed}" for r in failed),
            file=sys.stderr,
        )
        return 1
    return 0
