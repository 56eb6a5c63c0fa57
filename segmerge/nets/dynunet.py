"""MONAI ``DynUNet`` (early fusion, deep supervision) wrapped to the segmerge network contract."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet
from torch.nn.functional import interpolate

from segmerge.conventions import MODALITIES, REGIONS
from segmerge.nets._common import ContractNet, init_contract

__all__ = ["DynUNetDS"]


class DynUNetDS(ContractNet):
    """Early-fusion MONAI ``DynUNet`` with deep supervision, returning named heads.

    The modalities are stacked as input channels (early fusion); ``available`` is only used to
    zero the channels of missing modalities (the data loader already does so; this makes the
    network safe on any input). There are no per-modality heads, so its objectives are per
    depth only.

    Train mode returns ``{"fused.d0": ..., "fused.d1": ..., ...}`` by unbinding DynUNet's stacked
    deep-supervision output. Note that MONAI upsamples every deep-supervision head to full
    resolution (``interpolate``, nearest) before stacking, so all ``fused.d*`` are full
    resolution here. Eval mode returns one tensor ``(B, out_channels, H, W, D)``.

    Args:
        modalities: modality names in input channel order (default ``MODALITIES``).
        out_channels: region channels (default 3).
        features: filters per level, finest first; ``len(features) - 1`` stride-2 levels.
            Default ``(16, 32, 64, 128)``.
        deep_supervision: number of fused heads including ``fused.d0``; between 1 and
            ``len(features) - 1``. Default 3.
        norm: MONAI normalisation spec. Default ``("instance", {"affine": True})`` (DynUNet's).
        dropout: dropout probability. Default 0.
        res_block: use residual blocks (``UnetResBlock``). Default False.
    """

    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        out_channels: int = len(REGIONS),
        features: Sequence[int] = (16, 32, 64, 128),
        deep_supervision: int = 3,
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float = 0.0,
        res_block: bool = False,
    ) -> None:
        super().__init__()
        init_contract(
            self, modalities, out_channels, features, deep_supervision, norm, dropout,
            res_block=bool(res_block),
        )  # fmt: skip
        mods, feats, depth = self.modalities, self.features, len(self.features) - 1
        self.net = DynUNet(
            spatial_dims=3,
            in_channels=len(mods),
            out_channels=self.out_channels,
            kernel_size=[3] * len(feats),
            strides=[1] + [2] * depth,
            upsample_kernel_size=[2] * depth,
            filters=list(feats),
            dropout=float(dropout) if dropout else None,
            norm_name=norm,
            # DynUNet needs deep_supr_num >= 1 to build heads; with one fused head we switch
            # deep supervision off instead.
            deep_supervision=self.deep_supervision > 1,
            deep_supr_num=max(1, self.deep_supervision - 1),
            res_block=res_block,
        )

    @torch.jit.unused
    def output_names(self) -> list[str]:
        """Names of the train-mode outputs, in objective order."""
        return [f"fused.d{d}" for d in range(self.deep_supervision)]

    @torch.jit.unused
    def output_scales(self) -> dict[str, int]:
        """Downsampling factor of each train-mode output (all 1: MONAI upsamples the heads)."""
        return {name: 1 for name in self.output_names()}

    def _masked_input(self, x: torch.Tensor, available: torch.Tensor | None) -> torch.Tensor:
        self._check(x)
        if available is None:
            return x
        missing = ~self._mask(x, available)
        return x.masked_fill(missing[:, :, None, None, None], 0.0)

    def forward_heads(
        self, x: torch.Tensor, available: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every fused head's logits by name, whatever the mode (all at full resolution)."""
        out = self.net(self._masked_input(x, available))
        if out.dim() == 6:  # train mode with deep supervision: (B, heads, C, H, W, D)
            return {f"fused.d{d}": t for d, t in enumerate(out.unbind(dim=1))}
        heads = {"fused.d0": out}
        if self.deep_supervision > 1:
            # Eval mode: DynUNet still computed its supervision heads and kept them in net.heads.
            for d, feat in enumerate(self.net.heads[: self.deep_supervision - 1]):
                heads[f"fused.d{d + 1}"] = interpolate(feat, out.shape[2:])
        return heads

    def _forward_eval(self, x: torch.Tensor, available: torch.Tensor | None) -> torch.Tensor:
        """Eval mode: one ``(B, C, H, W, D)`` logits tensor; missing modalities' channels zeroed."""
        return self.net(self._masked_input(x, available))
