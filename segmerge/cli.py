"""Command-line entry: ``python -m segmerge <command> [options]``.

Commands (each lives in the package that owns it; the registry is an explicit dict):

    python -m segmerge train       [--aggregator gmd ...]   # segmerge.engine
    python -m segmerge phantoms    --out DIR --cases N      # segmerge.data
    python -m segmerge check-data  PATH                     # segmerge.data
    python -m segmerge predict     --input IN --output OUT  # segmerge.inference
    python -m segmerge evaluate    --pred OUT --gt GT       # segmerge.inference
    python -m segmerge compare     [--budget cpu]           # segmerge.study
    python -m segmerge prepare     --input RAW --output OUT # segmerge.prepare
"""

from __future__ import annotations

import importlib
import sys

from segmerge.hints import suggest

# command -> "module:function"; each function takes argv (list[str]) and returns an exit status.
COMMANDS: dict[str, str] = {
    "train": "segmerge.engine.cli:main",
    "phantoms": "segmerge.data.cli:phantoms_main",
    "check-data": "segmerge.data.cli:check_data_main",
    "predict": "segmerge.inference.cli:predict_main",
    "evaluate": "segmerge.inference.cli:evaluate_main",
    "compare": "segmerge.study.cli:main",
    "prepare": "segmerge.prepare.cli:main",
}


def _usage() -> str:
    lines = ["usage: python -m segmerge <command> [options]", "", "commands:"]
    lines += [f"  {name}" for name in COMMANDS]
    lines.append("\n`python -m segmerge <command> --help` shows a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        hint = suggest(command, COMMANDS, clause=True)
        print(f"segmerge: unknown command '{command}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[command].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)
