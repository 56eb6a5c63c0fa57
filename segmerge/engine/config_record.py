"""The configuration a checkpoint holds, as data.

The configuration a checkpoint holds is the *resolved* one (every expression and reference
replaced by its plain value, :func:`resolved_config`), and :func:`restore_config` puts those values
back as literals over the bundle's own ``train.json``: nothing read from a checkpoint is ever
evaluated. Expressions that could not be resolved to data (``$@network_def.parameters()``) are
listed in the checkpoint and must be the bundle's own text, and so must every ``_target_`` and
other ``_key_`` (or, for ``_target_``, name a segmerge or ``torch.optim`` class).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from segmerge.engine.rng import rng_state, set_rng_state
from segmerge.overrides import interpretable, literal

__all__ = ["changed_settings", "resolved_config", "restore_config", "stored_config"]

_SAFE_TARGET = re.compile(r"^(segmerge\.(nets|objectives|aggregation|data)|torch\.optim)(\.\w+)+$")


def _plain(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _to_json(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def resolved_config(parser: Any) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """The configuration with every expression and reference replaced by its plain value.

    Components (``_target_``) stay as configured; an expression whose value is not plain data
    (``$@network_def.parameters()``) keeps its text and its id is listed. Resolving instantiates
    what the expressions refer to, so every random state is saved and restored around it.

    Args:
        parser: a ``monai.bundle.ConfigParser`` (the trusted configuration).

    Returns:
        ``(config, kept, derived)``: plain JSON data; the ids that kept their expression text;
        ``{id: expression text}`` of the ids whose value was computed by an expression (on resume
        they are computed again by the bundle's own expression when it is the same text, so that
        ``--bundle_root`` still moves ``output_dir``; otherwise the stored value is used).
    """
    kept: list[str] = []
    derived: dict[str, str] = {}
    saved = rng_state()

    def walk(cid: str, raw: Any) -> Any:
        if isinstance(raw, dict):
            return {k: walk(f"{cid}#{k}", v) for k, v in raw.items()}
        if isinstance(raw, list):
            return [walk(f"{cid}#{i}", v) for i, v in enumerate(raw)]
        if interpretable(raw):
            try:
                value = parser.get_parsed_content(cid)
            except Exception:  # an expression that needs runtime objects: keep its text
                value = None
                ok = False
            else:
                ok = _plain(value)
            if ok:
                derived[cid] = raw
                return _to_json(value)
            kept.append(cid)
            return raw
        return raw

    try:
        raw = parser.get()
        out = {k: walk(k, v) for k, v in raw.items() if k not in ("_comment", "imports")}
    finally:
        set_rng_state(saved)
    return out, kept, derived


def stored_config(state: Mapping[str, Any], source: str | os.PathLike) -> dict[str, Any]:
    """The configuration dict a checkpoint holds (plain JSON), with a clear error if absent."""
    text = state.get("config")
    if text is None:
        raise ValueError(
            f"checkpoint {source} holds no training configuration ('config'): it was not written "
            "by segmerge train and cannot be resumed"
        )
    try:
        config = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {source}: its configuration is not JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint {source}: its configuration is not a JSON object")
    return config


_MISSING = object()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def restore_config(parser: Any, state: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Put a checkpoint's configuration back over the trusted bundle configuration, as data.

    Every plain value is set as a literal (:func:`segmerge.overrides.literal`), except a value the
    bundle computes with the very expression that computed it in the stored run
    (``config_derived``): the bundle's expression is kept. An expression (format 2: the ids listed
    in ``config_expressions``; format 1: any ``$``/``@``/``%`` string) and every ``_key_`` must
    equal the bundle's own at that id, else the checkpoint is refused.

    Args:
        parser: the trusted ``ConfigParser`` (``train.json`` of this bundle), updated in place.
        state: the loaded checkpoint.
        source: the checkpoint path, for messages.

    Raises:
        ValueError: naming the id, the offending value and the rule.
    """
    config = stored_config(state, source)
    listed = state.get("config_expressions")
    expressions = None if int(state.get("format", 1)) < 2 else set(listed or [])
    derived = state.get("config_derived") or {}
    derived = derived if isinstance(derived, dict) else {}
    trusted = parser.get()

    def refuse(cid: str, value: Any, what: str) -> ValueError:
        return ValueError(
            f"checkpoint {source}: config id {cid!r} holds {what} {_short(value)} that is not "
            "this bundle's; checkpoints are data and segmerge never evaluates code read from "
            "them (resume with the bundle that wrote it, or pass that config file with --config)"
        )

    def same_text(a: Any, b: Any) -> bool:  # MONAI rewrites "#" and "::" into each other
        return (
            isinstance(a, str)
            and isinstance(b, str)
            and a.replace("::", "#") == b.replace("::", "#")
        )

    def merge(cid: str, base: Any, value: Any) -> Any:
        if cid in derived and base is not _MISSING and same_text(derived[cid], base):
            return base  # the bundle's own expression computes it again (text compared only)
        if isinstance(value, dict):
            sub = base if isinstance(base, dict) else {}
            out = {}
            for k, v in value.items():
                kid = f"{cid}#{k}"
                if k.startswith("_") and k.endswith("_"):
                    if sub.get(k, _MISSING) == v:
                        out[k] = v
                    elif k == "_target_" and isinstance(v, str) and _SAFE_TARGET.match(v):
                        out[k] = v
                    else:
                        raise refuse(kid, v, f"the component key {k}")
                    continue
                out[k] = merge(kid, sub.get(k, _MISSING), v)
            return out
        if isinstance(value, list):
            sub = base if isinstance(base, list) else []
            return [
                merge(f"{cid}#{i}", sub[i] if i < len(sub) else _MISSING, v)
                for i, v in enumerate(value)
            ]
        is_expr = cid in expressions if expressions is not None else interpretable(value)
        if is_expr:
            if base is _MISSING or not same_text(base, value):
                raise refuse(cid, value, "the expression")
            return base
        return literal(value)

    for key, value in config.items():
        if key in ("_comment", "imports"):
            continue  # the bundle's own imports are used
        parser[key] = merge(key, trusted.get(key, _MISSING), value)


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("::", "#")
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{id: (old, new)}`` for every leaf id whose value differs between two configurations."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(cid: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(f"{cid}#{k}" if cid else k, a.get(k, _MISSING), b.get(k, _MISSING))
        elif _norm(a) != _norm(b):  # MONAI rewrites "#" and "::" in ids into each other
            out[cid] = (None if a is _MISSING else a, None if b is _MISSING else b)

    walk("", dict(old), dict(new))
    return out
