"""Explicit registry of the segmerge networks."""

from __future__ import annotations

from typing import Any

from torch import nn

from segmerge.nets._common import suggest
from segmerge.nets.dynunet import DynUNetDS
from segmerge.nets.multimodal import MultiModalDSNet
from segmerge.nets.shared import SharedModalityUNet

__all__ = ["NETWORKS", "build_network"]

NETWORKS: dict[str, type[nn.Module]] = {
    "multimodal": MultiModalDSNet,
    "late": MultiModalDSNet,
    "shared": SharedModalityUNet,
    "dynunet": DynUNetDS,
}
"""Network name -> class (``late`` is ``multimodal``'s name on the train command line). All
follow the contract ``forward(x, available=None)``."""


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered network by name.

    Args:
        name: a key of ``NETWORKS`` (``"multimodal"``/``"late"``, ``"shared"``, ``"dynunet"``).
        **kwargs: constructor arguments of that network.

    Returns:
        The network module (in train mode, as constructed).
    """
    if name not in NETWORKS:
        raise ValueError(
            f"unknown network {name!r}; valid: {sorted(NETWORKS)}" + suggest(name, NETWORKS)
        )
    return NETWORKS[name](**kwargs)
