"""segmerge.nets: segmentation networks with named deep-supervision and modality heads.

Contract: ``forward(x, available=None)`` with ``x`` ``(B, 4, H, W, D)`` in ``MODALITIES`` order
and ``available`` ``(B, 4)`` bool; eval mode returns one ``(B, 3, H, W, D)`` tensor of region
logits, train mode a dict of named head logits (``fused.d0``, ``fused.d1``, ...,
``modality.flair``, ...). ``forward_heads`` returns that dict in either mode.

``MultiModalDSNet`` (late fusion: one encoder per modality, aux decoders separate or shared) and
``SharedModalityUNet`` (one U-Net whose convolutions every modality shares, modality-specific
normalisation, fusion of the available modalities' logits) are the two multimodal networks.
Both run their 3D convolutions through oneDNN in eager eval mode on CPU (``OneDNNConv3d``, made by
``use_onednn_convs``; PyTorch's own heuristic falls back to a slow kernel at batch 1).
"""

from segmerge.nets._onednn import OneDNNConv3d, use_onednn_convs
from segmerge.nets.dynunet import DynUNetDS
from segmerge.nets.multimodal import AuxDecoder, ModalityEncoder, MultiModalDSNet
from segmerge.nets.registry import NETWORKS, build_network
from segmerge.nets.shared import SharedModalityUNet, fuse_logits

__all__ = [
    "NETWORKS",
    "AuxDecoder",
    "DynUNetDS",
    "ModalityEncoder",
    "MultiModalDSNet",
    "OneDNNConv3d",
    "SharedModalityUNet",
    "build_network",
    "fuse_logits",
    "use_onednn_convs",
]
