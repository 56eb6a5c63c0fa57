"""Where the bundle's ``configs/`` folder is, for every command that reads one.

The repository root is a MONAI bundle, so its configs live in ``configs/`` beside the package, not
inside it. A checkout (or an editable install) finds them there; a regular install (the Docker
image, ``pip install .``) has the package alone and must be told: ``$SEGMERGE_CONFIGS``.

Lookup order, the same for ``train``, ``compare``, ``predict`` and ``evaluate``:

1. ``$SEGMERGE_CONFIGS`` when set (an error if the file is not there: a wrong setting is never
   silently replaced by another folder);
2. ``./configs`` when it holds the file (a copy of the bundle you run from);
3. the ``configs/`` of the checkout this package was imported from.

The bundle *root* (``models/model.pt``) follows one rule too, :func:`bundle_root`: ``train``
writes into the current folder (``bundle_root`` ``.`` in ``train.json``), and ``predict``,
``evaluate`` and the bundle's ``inference.json`` read the current folder's ``models/model.pt``
when it has one; otherwise the root of the configs folder in use. An explicit ``--config FILE``
means the bundle that holds that file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from segmerge.overrides import find_expression

__all__ = [
    "CONFIGS_ENV",
    "CHECKOUT",
    "MODEL_FILE",
    "NETWORK_RECORD",
    "bundle_root",
    "config_dir",
    "config_file",
    "read_network_record",
]

CONFIGS_ENV = "SEGMERGE_CONFIGS"
CHECKOUT = Path(__file__).resolve().parents[1]
"""The folder holding the package; the bundle root when running from a checkout."""
MODEL_FILE = Path("models") / "model.pt"
"""The published weights, relative to the bundle root."""
NETWORK_RECORD = "network.json"
"""Written by ``train`` beside every ``model.pt``: the resolved ``network_def`` those weights fit
(plain JSON), so that ``predict`` and the bundle rebuild the network that was trained."""


def config_dir(needs: str = "train.json") -> Path:
    """The bundle configs folder that holds ``needs`` (see the module docstring for the order).

    Raises:
        FileNotFoundError: naming every folder looked at and how to point at the right one.
    """
    env = os.environ.get(CONFIGS_ENV)
    if env:
        folder = Path(env).expanduser()
        if not (folder / needs).is_file():
            raise FileNotFoundError(
                f"${CONFIGS_ENV}={env}: {folder / needs} does not exist; "
                f"{CONFIGS_ENV} must name the bundle's configs folder (the one holding {needs})"
            )
        return folder.absolute()
    looked = [Path.cwd() / "configs", CHECKOUT / "configs"]
    for folder in looked:
        if (folder / needs).is_file():
            return folder
    raise FileNotFoundError(
        f"no bundle configs folder with {needs}: looked in "
        + " and ".join(str(f) for f in looked)
        + f"; run from the segmerge repository, or set {CONFIGS_ENV} to its configs folder"
    )


def config_file(name: str) -> Path:
    """``config_dir(name) / name``: e.g. ``config_file("inference.json")``."""
    return config_dir(name) / name


def bundle_root(config: str | os.PathLike | None = None, needs: str = "inference.json") -> Path:
    """The bundle root whose ``models/model.pt`` a command uses (see the module docstring).

    Args:
        config: a config file named explicitly (``--config``): its bundle (the folder above its
            ``configs/``) is the root. ``None``: the current folder when it holds
            ``models/model.pt`` or ``configs/<needs>``, else the root of :func:`config_dir`.
        needs: the config file the command reads (for the lookup of :func:`config_dir`).
    """
    if config is not None:
        return Path(config).expanduser().resolve().parent.parent
    here = Path.cwd()
    if (here / MODEL_FILE).is_file() or (here / "configs" / needs).is_file():
        return here
    return config_dir(needs).resolve().parent


def read_network_record(model_path: str | os.PathLike) -> dict | None:
    """The ``network_def`` recorded beside ``model_path`` (:data:`NETWORK_RECORD`), or ``None``.

    The record is data: it is refused when it holds anything MONAI's ``ConfigParser`` would
    evaluate (``$``/``@``/``%``) or a ``_target_`` outside ``segmerge.nets``, so loading weights
    never runs code from disk.

    Raises:
        ValueError: naming the file and the rule it breaks.
    """
    path = Path(model_path).with_name(NETWORK_RECORD)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable network record ({err})") from err
    target = record.get("_target_") if isinstance(record, dict) else None
    if not isinstance(target, str) or not target.startswith("segmerge.nets."):
        raise ValueError(f"{path}: '_target_' is {target!r}; a network of segmerge.nets expected")
    bad = find_expression(record)
    if bad is not None:
        raise ValueError(f"{path}: holds {bad!r}, an expression; a network record is data only")
    return record
