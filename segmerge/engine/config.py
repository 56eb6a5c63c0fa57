"""Training configuration: MONAI bundle data plus command-line overrides, checked before training.

The configuration is ``configs/train.json`` parsed with :class:`monai.bundle.ConfigParser`, then
the chosen aggregator's component from ``segmerge.aggregation.AGGREGATORS`` (``--aggregator NAME``:
``_target_`` the class, its signature's hyper-parameters with their defaults), then the command line.
Command-line options are of three kinds, tried in this order:

1. named options (``--epochs 3``, ``--data PATH``...), listed in :data:`NAMED_OPTIONS`, each an
   alias of one config id;
2. hyper-parameters of the chosen aggregator (``--r 0.5`` sets ``aggregator#r``);
3. any config id, MONAI style (``--lr 0.001``, ``--network_def#features "[8,16,32,64]"``).

Anything else is an error that names the closest valid option. Values are literals (the rule of
:mod:`segmerge.overrides`, shared with ``predict`` and ``compare``): JSON, then a Python literal,
otherwise the string typed; ``$``/``@``/``%`` values are evaluated by MONAI only with ``--expr``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from segmerge.aggregation import AGGREGATORS, aggregator_config, aggregator_usage
from segmerge.bundle_paths import config_dir
from segmerge.conventions import suggest
from segmerge.overrides import EXPRESSION_HELP, RULE_HELP, parse_value, to_config

__all__ = [
    "NAMED_OPTIONS", "FLAGS", "ConfigError", "TrainOptions", "default_config_dir",
    "available_aggregators", "parse_argv", "load_config", "config_ids", "closest", "usage",
]  # fmt: skip

# named option -> config id (``None``: handled by the engine, not a config id)
NAMED_OPTIONS: dict[str, str | None] = {
    "data": "dataset#path",
    "aggregator": None,
    "network": None,
    "subsets": "objectives#subsets",
    "jacobian": "jacobian",
    "epochs": "epochs",
    "steps_per_epoch": "steps_per_epoch",
    "batch_size": "batch_size",
    "patch_size": "patch_size",
    "output": "output_dir",
    "tracking_uri": "tracking_uri",
    "experiment": "experiment",
    "device": "device",
    "amp": "amp",
    "refresh_every": "refresh_every",
    "resume": None,
    "seed": "seed",
    "skip_invalid": "dataset#skip_invalid",
    "allow_missing": "dataset#allow_missing",
    "resection_cavity": "dataset#resection_cavity",
    "continue_run": None,
    "config": None,
    "bundle_root": "bundle_root",
    "expr": None,
}
"""Named command-line options (dashes or underscores) and the config id each one sets."""

FLAGS: tuple[str, ...] = (
    "amp", "skip_invalid", "allow_missing", "resection_cavity", "continue_run", "help", "expr",
)  # fmt: skip
"""Options that take no value (their presence means ``True``)."""

_HELP = {
    "data": "dataset: datalist JSON or BraTS 2021/2023 folder (default: cached phantoms)",
    "aggregator": "gradient aggregator, one of those listed below (default gmd)",
    "network": "network preset, one of configs/networks/*.json: late or shared",
    "subsets": "objectives per modality subset: all, singles+full, <k> drawn per step, none",
    "jacobian": "per-objective gradients w.r.t. parameters (exact) or outputs",
    "epochs": "number of epochs",
    "steps_per_epoch": "optimizer steps per epoch",
    "batch_size": "patches per step (per process under torchrun)",
    "patch_size": "edge of the cubic training patch / sliding window (voxels)",
    "output": "folder for checkpoints and the local MLflow store",
    "tracking_uri": "MLflow tracking URI (default sqlite:///<output>/mlflow.db)",
    "experiment": "MLflow experiment name",
    "device": "cpu, cuda or auto",
    "amp": "mixed precision (CUDA only)",
    "refresh_every": "recompute the Jacobian every N steps (1 = exact)",
    "resume": "checkpoint file (or folder holding last.pt) to continue from",
    "seed": "random seed",
    "skip_invalid": "skip invalid cases instead of stopping (they are named)",
    "allow_missing": "accept cases with absent sequence files (trained with those missing)",
    "resection_cavity": "BraTS 2024+ labels: 4 is the resection cavity (in no region; with --dataset#et_label 3)",
    "continue_run": "with --resume: reopen the checkpoint's MLflow run even if it is finished",
    "config": "extra JSON/YAML config file(s) merged over the defaults",
    "bundle_root": "bundle folder (models/model.pt is written there)",
    "expr": EXPRESSION_HELP,
}


class ConfigError(ValueError):
    """A command-line option, config id or configuration value is invalid."""


@dataclass
class TrainOptions:
    """What the command line asked for, before it is merged into the configuration.

    Attributes:
        aggregator: aggregator override file name (``None``: the config's default).
        resume: checkpoint to resume from.
        config_files: extra config files merged after the defaults.
        overrides: ``(option, value)`` pairs in command-line order (option without dashes).
        help: whether ``--help`` was given.
        expressions: whether ``--expr`` was given (``$``/``@``/``%`` values are evaluated).
    """

    aggregator: str | None = None
    network: str | None = None
    resume: str | None = None
    continue_run: bool = False
    config_files: list[str] = field(default_factory=list)
    overrides: list[tuple[str, Any]] = field(default_factory=list)
    help: bool = False
    expressions: bool = False


def default_config_dir() -> Path:
    """The bundle's ``configs`` folder: ``$SEGMERGE_CONFIGS``, ``./configs``, or the checkout's
    (:func:`segmerge.bundle_paths.config_dir`)."""
    return config_dir("train.json")


def available_aggregators(config_dir: Path | None = None) -> list[str]:
    """The registered aggregation methods (``segmerge.aggregation.AGGREGATORS``; ``config_dir``
    is accepted for compatibility and not read)."""
    return list(AGGREGATORS)


def closest(word: str, candidates: Sequence[str]) -> str:
    """`` (did you mean '<x>'?)`` for the closest candidate, or an empty string
    (:func:`segmerge.conventions.suggest` with this module's cutoff, 0.5)."""
    return suggest(word, candidates, cutoff=0.5)


def parse_argv(argv: Sequence[str]) -> TrainOptions:
    """Split ``argv`` into named options and overrides (no config needed yet).

    Args:
        argv: arguments after ``train``, e.g. ``["--epochs", "2", "--aggregator", "gradcraft"]``.

    Raises:
        ConfigError: a positional argument, or an option without its value.
    """
    opts = TrainOptions()
    i = 0
    args = list(argv)
    while i < len(args):
        token = args[i]
        if token in ("-h", "--help"):
            opts.help = True
            i += 1
            continue
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: options are written --name value")
        name, eq, inline = token[2:].partition("=")
        key = name.replace("-", "_") if "#" not in name else name
        if eq:
            value: Any = inline
            i += 1
        elif key in FLAGS:
            value = True
            i += 1
        else:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
                raise ConfigError(f"option --{name} needs a value")
            value = args[i + 1]
            i += 2
        if key == "aggregator":
            opts.aggregator = str(value)
        elif key == "network":
            opts.network = str(value)
        elif key == "resume":
            opts.resume = str(value)
        elif key == "config":
            opts.config_files.append(str(value))
        elif key == "expr":
            opts.expressions = parse_value(value) is True
        elif key == "continue_run":
            opts.continue_run = parse_value(value) is True
        else:
            opts.overrides.append((key, value))
    return opts


def config_ids(config: Any, prefix: str = "") -> Iterator[str]:
    """Every id of a nested config (``a``, ``a#b``, ``a#0``...), depth first."""
    if isinstance(config, Mapping):
        items: Iterator[tuple[Any, Any]] = iter(config.items())
    elif isinstance(config, list):
        items = iter(enumerate(config))
    else:
        return
    for key, value in items:
        cid = f"{prefix}#{key}" if prefix else str(key)
        yield cid
        yield from config_ids(value, cid)


def _target_accepts(component: Mapping, key: str) -> bool:
    """Whether the ``_target_`` of a config component takes a keyword argument ``key``."""
    target = component.get("_target_")
    if not isinstance(target, str) or "." not in target:
        return False
    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
        params = inspect.signature(obj).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    return key in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _resolve_key(parser: ConfigParser, key: str) -> str:
    """Map a command-line option name to the config id it sets, or raise with a suggestion."""
    if key in NAMED_OPTIONS and NAMED_OPTIONS[key] is not None:
        return str(NAMED_OPTIONS[key])
    config = parser.get()
    aggregator = config.get("aggregator", {})
    if isinstance(aggregator, Mapping) and key in aggregator and not key.startswith("_"):
        return f"aggregator#{key}"
    ids = list(config_ids(config))
    if key in ids:
        return key
    parent, _, leaf = key.rpartition("#")
    if parent in ids:
        comp = parser.get(parent)
        if isinstance(comp, Mapping) and _target_accepts(comp, leaf):
            return key
    candidates = [f"--{n.replace('_', '-')}" for n in NAMED_OPTIONS] + [f"--{c}" for c in ids]
    if isinstance(aggregator, Mapping):
        candidates += [f"--{k}" for k in aggregator if not k.startswith("_")]
    name = f"--{key.replace('_', '-')}" if "#" not in key else f"--{key}"
    hint = closest(name, candidates) or closest(f"--{key}", candidates)
    raise ConfigError(f"unknown option or config id {name!r}{hint}")


def load_config(
    opts: TrainOptions,
    config_dir: Path | None = None,
    base_config: Mapping[str, Any] | None = None,
    checkpoint: tuple[Mapping[str, Any], str | Path] | None = None,
) -> ConfigParser:
    """Read ``train.json``, the aggregator override and extra files, then apply the overrides.

    Args:
        opts: parsed command line.
        config_dir: folder holding ``train.json`` (default
            :func:`default_config_dir`).
        base_config: start from this configuration instead of ``train.json`` (trusted: it is
            code, like a config file).
        checkpoint: ``(state, path)`` of a checkpoint to resume: its resolved configuration is
            put back over ``train.json`` as data (:func:`segmerge.engine.checkpoint.restore_config`,
            nothing in it is evaluated) before the command line is applied.

    Returns:
        A ConfigParser holding the merged (not yet instantiated) configuration.

    Raises:
        ConfigError: unknown aggregator, option or config id; unreadable config file.
    """
    folder = config_dir or default_config_dir()
    parser = ConfigParser()
    if base_config is not None:
        parser.read_config(dict(base_config))
    else:
        base = folder / "train.json"
        if not base.is_file():
            raise ConfigError(f"training config not found: {base}")
        parser.read_config(str(base))
    files = list(opts.config_files)
    for extra in files:
        if not Path(extra).is_file():
            raise ConfigError(f"--config {extra}: no such file")
    if checkpoint is not None:
        from segmerge.engine.checkpoint import restore_config  # cycle: checkpoint imports config

        # config files are code: merged first, so that the checkpoint's data may refer to them
        for extra in files:
            _merge_file(parser, Path(extra))
        files = []
        try:
            restore_config(parser, checkpoint[0], checkpoint[1])
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if opts.aggregator is not None:
        try:
            parser["aggregator"] = aggregator_config(opts.aggregator)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if opts.network is not None:  # a preset: network_def and the objectives that fit it
        presets = sorted(p.stem for p in (folder / "networks").glob("*.json"))
        name = opts.network.lower()
        if name not in presets:
            raise ConfigError(
                f"unknown network {opts.network!r}{closest(name, presets)}; "
                f"available: {', '.join(presets)}"
            )
        _merge_file(parser, folder / "networks" / f"{name}.json")
    for extra in files:
        _merge_file(parser, Path(extra))
    for key, value in opts.overrides:
        parser[_resolve_key(parser, key)] = to_config(value, opts.expressions)
    return parser


def _merge_file(parser: ConfigParser, path: Path) -> None:
    """Merge a config file: top-level ids replace, dicts that are not components update."""
    try:
        extra = ConfigParser.load_config_file(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    for key, value in extra.items():
        parser[key] = value


def usage(config_dir: Path | None = None) -> str:
    """Help text of ``python -m segmerge train``."""
    lines = [
        "usage: python -m segmerge train [--option value ...] [--<config id> value ...]",
        "       torchrun --nproc_per_node N -m segmerge train [...]",
        "",
        "options:",
    ]
    for name, text in _HELP.items():
        flag = f"--{name.replace('_', '-')}"
        lines.append(f"  {flag:<18} {text}")
    lines += [
        "",
        "aggregators and their hyper-parameters (options too, e.g. --aggregator gradcraft --r 0.5):",
        aggregator_usage(),
        "any config id of configs/train.json is an option too: --lr 0.001, --network_def#features "
        "'[8,16,32,64]'",
        f"values: {RULE_HELP}; config files (configs/*.json, --config) are code, as in MONAI",
    ]
    return "\n".join(lines)
