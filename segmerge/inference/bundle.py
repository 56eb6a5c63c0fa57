"""Read ``configs/inference.json`` with MONAI's ``ConfigParser``, the way ``monai.bundle run`` does.

``python -m segmerge predict`` and ``evaluate --subsets`` go through :func:`build_predictor`, so
they run exactly the network, transforms and inferer that the bundle command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.data import Dataset

from segmerge.bundle_paths import bundle_root, config_file, read_network_record
from segmerge.inference.cases import discover_cases
from segmerge.inference.predictor import BratsPredictor

__all__ = [
    "BundleCases",
    "default_config",
    "load_bundle_config",
    "build_predictor",
    "trained_network",
]


class BundleCases(Dataset):
    """The bundle's ``dataset`` (a MONAI ``Dataset``): the cases of ``dataset_dir``, preprocessed.

    MONAI's inference workflow properties require a ``dataset`` id (``monai.bundle``'s
    ``check_properties``, run by the model zoo's CI). Each item is the case dict of
    :meth:`BratsPredictor.prepare` (``case_id`` and the paths of the sequences the case has)
    through ``transform`` (the config's ``preprocessing``). The folder is read on first use, not
    when the config is parsed, so the property check works without data.

    Args:
        dataset_dir: BraTS-layout folder or datalist.
        transform: the config's ``preprocessing``.
    """

    def __init__(self, dataset_dir: str | Path, transform: Any = None) -> None:
        self.dataset_dir = Path(dataset_dir)
        self._cases: list[dict[str, Any]] | None = None
        super().__init__(data=[], transform=transform)

    @property
    def data(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Case dicts, discovered once (cases that cannot be predicted are left out)."""
        if self._cases is None:
            self._cases = [
                {"case_id": c.case_id, **{k: str(v) for k, v in c.images.items()}}
                for c in discover_cases(self.dataset_dir)
                if c.problem is None and c.images
            ]
        return self._cases

    @data.setter
    def data(self, value: Any) -> None:  # MONAI's constructor assigns data=[]: ignored
        del value


def trained_network(model_path: str | Path | None, network_def: Any) -> Any:
    """The network the weights at ``model_path`` were trained with.

    ``train`` writes the resolved ``network_def`` beside every ``model.pt``
    (:data:`segmerge.bundle_paths.NETWORK_RECORD`); when that record is there the network is built
    from it (read as data, :func:`segmerge.bundle_paths.read_network_record`), so a bundle trained
    with ``--network shared`` or other widths predicts without restating them. Otherwise the
    config's own ``network_def`` is used. The bundle's ``network`` id calls this.

    Args:
        model_path: the weights to be loaded (``None``: none, the config's network is used).
        network_def: the config's instantiated ``network_def`` (the fallback).
    """
    record = None if model_path is None else read_network_record(model_path)
    if record is None:
        return network_def
    return ConfigParser({"network": record}).get_parsed_content("network")


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
    if any(key == "network_def" or key.startswith("network_def#") for key in overrides or {}):
        # a network stated explicitly wins over the record written beside the weights
        parser["network"] = "$@network_def.to(@device)"
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
