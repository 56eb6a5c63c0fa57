"""One rule for values given on the command line, shared by ``train``, ``predict`` and ``compare``.

**Values are literals.** ``--lr 0.001``, ``--run_name @lr``, ``--set device=cpu``: a value is read
as JSON, else as a Python literal (``ast.literal_eval``: numbers, strings, lists, tuples, dicts),
else ``true``/``false``/``none``/``null``, and otherwise kept as the string typed. A value starting
with ``$``, ``@`` or ``%`` is *not* a MONAI expression, reference or macro: ``--run_name @lr``
names the run ``@lr``.

**Expressions only on request.** With ``--expr`` on the same command line, values starting with
``$`` (Python expression), ``@`` (reference to another config id) or ``%`` (macro) are handed to
MONAI's ``ConfigParser`` as they are and evaluated, as in a bundle config file. They run code.

Bundle config files (``configs/*.json``, ``--config FILE``) are code, as in MONAI: their ``$``
expressions are evaluated. Data read back from disk (checkpoints, sidecars, records) never is.

MONAI has no escape for a literal string that starts with ``$``/``@``/``%`` (or holds ``::``,
which it rewrites to ``#``), so :func:`literal` writes such a string as a Python string literal
expression built only from letters, digits and ``\\uXXXX`` escapes: ``ConfigParser`` then yields
exactly the original string, and nothing of the user's text is ever evaluated as code.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "EXPRESSION_FLAG",
    "EXPRESSION_HELP",
    "RULE_HELP",
    "decode_literal",
    "find_expression",
    "for_argparse",
    "interpretable",
    "literal",
    "parse_assignments",
    "parse_value",
    "to_config",
]

EXPRESSION_FLAG = "expr"
"""Name of the opt-in flag (``--expr``) that lets ``$``/``@``/``%`` values be evaluated."""

RULE_HELP = (
    "values are literals (JSON, else a Python literal, else the text as typed); a value "
    "starting with $, @ or % is NOT evaluated unless --expr is given"
)
EXPRESSION_HELP = (
    "evaluate values starting with $ (Python expression), @ (reference) or % (macro) as MONAI "
    "does in a bundle config file (they run code)"
)


def for_argparse(text: str) -> str:
    """``text`` as an ``argparse`` help string (which %-formats it: ``%`` is written ``%%``)."""
    return text.replace("%", "%%")


_PREFIXES = ("$", "@", "%")
_SAFE = re.compile(r"[A-Za-z0-9 _.,/+=-]")
_ENCODED = re.compile(r"^\$'(?:[A-Za-z0-9 _.,/+=-]|\\u[0-9a-f]{4}|\\U[0-9a-f]{8})*'$")


def interpretable(text: Any) -> bool:
    """Whether ``ConfigParser`` would read the string as other than itself (``$``, ``@``, ``%``
    prefix, or ``::`` which it rewrites to ``#``)."""
    return isinstance(text, str) and (text.startswith(_PREFIXES) or "::" in text)


def find_expression(value: Any) -> str | None:
    """The first string in ``value`` (nested dicts and lists) that ``ConfigParser`` would evaluate
    or rewrite (:func:`interpretable`), else ``None``: data read back from disk must have none."""
    if isinstance(value, dict):
        items: Iterable[Any] = value.values()
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        return value if interpretable(value) else None
    for item in items:
        found = find_expression(item)
        if found is not None:
            return found
    return None


def _encode(text: str) -> str:
    chars = []
    for ch in text:
        if _SAFE.fullmatch(ch):
            chars.append(ch)
        elif ord(ch) <= 0xFFFF:
            chars.append(f"\\u{ord(ch):04x}")
        else:
            chars.append(f"\\U{ord(ch):08x}")
    return "$'" + "".join(chars) + "'"


def literal(value: Any) -> Any:
    """``value`` as config content that ``ConfigParser`` resolves to exactly ``value``.

    Strings that MONAI would interpret (see :func:`interpretable`) become a string-literal
    expression made of safe characters and ``\\u`` escapes; containers are converted item by item;
    everything else is returned unchanged.
    """
    if isinstance(value, str):
        return _encode(value) if interpretable(value) else value
    if isinstance(value, (list, tuple)):
        return [literal(v) for v in value]
    if isinstance(value, Mapping):
        return {k: literal(v) for k, v in value.items()}
    return value


def decode_literal(value: Any) -> Any:
    """Undo :func:`literal` without evaluating anything (``ast.literal_eval`` of our encoding)."""
    if isinstance(value, str) and _ENCODED.match(value):
        return ast.literal_eval(value[1:])
    if isinstance(value, list):
        return [decode_literal(v) for v in value]
    if isinstance(value, Mapping):
        return {k: decode_literal(v) for k, v in value.items()}
    return value


def parse_value(text: Any) -> Any:
    """A command-line value as data: JSON, else a Python literal, else booleans/None, else text.

    Nothing is evaluated: ``ast.literal_eval`` only builds literals.
    """
    if not isinstance(text, str):
        return text
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("none", "null"):
        return None
    return text


def to_config(text: Any, expressions: bool = False) -> Any:
    """The config content for one command-line value under the rule of this module.

    Args:
        text: the value as typed (or already a Python value).
        expressions: ``--expr`` was given: a string starting with ``$``/``@``/``%`` is passed to
            MONAI unchanged (and evaluated there).
    """
    if expressions and isinstance(text, str) and text.startswith(_PREFIXES):
        return text
    return literal(parse_value(text))


def parse_assignments(
    pairs: Iterable[str], expressions: bool = False, option: str = "--set"
) -> dict[str, Any]:
    """``ID=VALUE`` pairs (``predict --set``) as ``{id: config content}`` under the same rule.

    Raises:
        ValueError: a pair without ``=`` or without an id.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} expects ID=VALUE (e.g. roi_size=[96,96,96]), got {pair!r}")
        out[key] = to_config(value, expressions)
    return out
