"""segmerge.nets: segmentation networks with named deep-supervision and modality heads.

Contract: ``forward(x, available=None)`` with ``x`` ``(B, 4, H, W, D)`` in ``MODALITIES`` order
and ``available`` ``(B, 4)`` bool; eval mode returns one ``(B, 3, H, W, D)`` tensor of region
logits, train mode a dict of named head logits (``fused.d0``, ``fused.d1``, ...,
``modality.flair``, ...). ``forward_heads`` returns that dict in either mode.
"""

from segmerge.nets.dynunet import DynUNetDS
from segmerge.nets.multimodal import AuxDecoder, ModalityEncoder, MultiModalDSNet
from segmerge.nets.registry import NETWORKS, build_network

__all__ = [
    "NETWORKS",
    "AuxDecoder",
    "DynUNetDS",
    "ModalityEncoder",
    "MultiModalDSNet",
    "build_network",
]
