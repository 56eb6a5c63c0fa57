"""Read ``configs/inference.json`` with MONAI's ``ConfigParser``, the way ``monai.bundle run`` does.

``python -m segmerge predict`` and ``evaluate --subsets`` go through :func:`build_predictor`, so
they run exactly the network, transforms and inferer that the bundle command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from segmerge.bundle_paths import bundle_root, config_file
from segmerge.inference.predictor import BratsPredictor

__all__ = ["default_config", "load_bundle_config", "build_predictor"]


def default_config() -> Path:
    """``inference.json`` of ``$SEGMERGE_CONFIGS``, ``./configs`` or the checkout's ``configs/``
    (:func:`segmerge.bundle_paths.config_dir`); its folder's parent is the bundle root."""
    return config_file("inference.json")


def load_bundle_config(
    config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ConfigParser:
    """Parse the inference config (and ``metadata.json`` beside it) with optional overrides.

    Args:
        config_file: path of ``inference.json``; default: :func:`default_config`.
        overrides: id -> value pairs, MONAI syntax (``"network_def#features": [4, 8]``); values are
            set as given, so objects (a ``torch.nn.Module``) are accepted too.

    Returns:
        The parser, not yet instantiated.
    """
    explicit = config_file is not None
    config_file = Path(config_file) if config_file is not None else default_config()
    if not config_file.is_file():
        raise FileNotFoundError(f"bundle config {config_file} not found (pass --config PATH)")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    meta = config_file.parent / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    # one rule for train, predict, evaluate and the bundle (segmerge.bundle_paths.bundle_root)
    parser["bundle_root"] = str(bundle_root(config_file if explicit else None, "inference.json"))
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def build_predictor(config_file: str | Path | None = None, **overrides: Any) -> BratsPredictor:
    """Instantiate the config's ``predictor`` (network, weights, transforms, inferer).

    Args:
        config_file: path of ``inference.json``; default: :func:`default_config`.
        **overrides: id -> value pairs as in :func:`load_bundle_config` (e.g.
            ``model_path="models/model.pt"``, ``device="cpu"``, ``overwrite=True``).
    """
    parser = load_bundle_config(config_file, overrides)
    try:
        predictor = parser.get_parsed_content("predictor")
    except RuntimeError as err:
        # MONAI wraps every instantiation error in "Failed to instantiate component ..."; surface
        # our own readable causes (missing weights, weights of another network, bad values).
        cause: BaseException | None = err.__cause__
        while cause is not None and not isinstance(cause, (FileNotFoundError, ValueError)):
            cause = cause.__cause__
        if cause is not None:
            raise type(cause)(str(cause)) from err
        raise
    if not isinstance(predictor, BratsPredictor):
        raise TypeError(
            f"{config_file}: 'predictor' must build a BratsPredictor, got {type(predictor).__name__}"
        )
    return predictor
