"""Late-fusion multimodal U-Net with deep supervision and one auxiliary head per modality.

Structure (parameter-name prefixes in brackets, so the training step can read the structure)::

    x[:, m] -> encoder of m [encoders.<m>.levels.<l>]       one per modality, levels 0..L
              level 0 a full-resolution stem, levels 1..L stride-2 UnetBasicBlocks;
              features E_m,l at resolution 1/2^l
    fusion at every level l:  F_l = sum_m a_m E_m,l / max(1, sum_m a_m)     (fusion="mean")
              a_m the availability mask; a missing sequence is masked out, not averaged in as 0
    decoder [decoder.ups.<i>]  h_L = F_L,  h_l = UnetUpBlock(h_{l+1}, skip F_l)  (i = L-1-l)
    heads   [heads.d<l>]       fused.d<l> = 1x1x1 conv of h_l, l = 0 .. deep_supervision-1
    aux     [aux_heads.<m>]    modality.<m>: a light decoder on E_m only (levels L .. aux_level)
                               predicting the regions at resolution 1/2^aux_level
            [aux_decoder]      aux_decoder="shared" (RFNet's decoder_sep, mmFormer, M2FTrans): ONE
                               such decoder, its weights shared by all modalities, applied to each
                               modality's features E_m in turn

Train mode returns every head by name; eval mode returns only ``fused.d0`` (full resolution)
and computes neither the coarser fused heads nor the auxiliary decoders.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.blocks import Convolution, UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import nn

from segmerge.conventions import MODALITIES, REGIONS
from segmerge.nets._common import (
    ContractNet,
    check_choice,
    fused_heads,
    init_contract,
    up_block,
)
from segmerge.nets._onednn import use_onednn_convs

__all__ = ["MultiModalDSNet", "ModalityEncoder", "AuxDecoder"]

FUSIONS = ("mean", "max")
STEMS = ("conv", "block")
AUX_DECODERS = ("separate", "shared")


class ModalityEncoder(nn.Module):
    """Single-channel 3D encoder: a full-resolution stem, then one stride-2 ``UnetBasicBlock`` per level.

    Args:
        features: width of each level (level 0 at full resolution).
        norm: MONAI normalisation spec.
        act: MONAI activation spec.
        dropout: dropout probability inside the blocks (None or 0 for none).
        stem: level 0 as ``"conv"`` (one 3x3x3 conv + norm + act) or ``"block"`` (a
            two-conv ``UnetBasicBlock``). Full-resolution convolutions dominate the cost on
            CPU; ``"conv"`` saves about a fifth of the network's FLOPs.
    """

    def __init__(
        self,
        features: Sequence[int],
        norm: str | tuple,
        act: str | tuple,
        dropout: float | None,
        stem: str = "conv",
    ) -> None:
        super().__init__()
        levels: list[nn.Module] = []
        in_ch = 1
        for level, width in enumerate(features):
            if level == 0 and stem == "conv":
                levels.append(
                    Convolution(
                        spatial_dims=3,
                        in_channels=1,
                        out_channels=width,
                        kernel_size=3,
                        norm=norm,
                        act=act,
                        dropout=dropout,
                        bias=False,  # followed by a normalisation
                    )
                )
                in_ch = width
                continue
            levels.append(
                UnetBasicBlock(
                    spatial_dims=3,
                    in_channels=in_ch,
                    out_channels=width,
                    kernel_size=3,
                    stride=1 if level == 0 else 2,
                    norm_name=norm,
                    act_name=act,
                    dropout=dropout,
                )
            )
            in_ch = width
        self.levels = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the features of every level, finest first."""
        feats: list[torch.Tensor] = []
        for block in self.levels:
            x = block(x)
            feats.append(x)
        return feats


class AuxDecoder(nn.Module):
    """Light per-modality decoder: up blocks from the bottleneck to ``aux_level``, then a 1x1 head.

    Reuses the modality's own encoder features as skips, so it sees that modality alone.

    Args:
        features: the encoder widths (levels 0..L).
        aux_level: resolution level of the output (0 = full, 1 = half, ...).
        out_channels: number of region channels.
        norm: MONAI normalisation spec.
        act: MONAI activation spec.
        dropout: dropout probability (None for none).
    """

    def __init__(
        self,
        features: Sequence[int],
        aux_level: int,
        out_channels: int,
        norm: str | tuple,
        act: str | tuple,
        dropout: float | None,
    ) -> None:
        super().__init__()
        top = len(features) - 1
        self.aux_level = aux_level
        self.ups = nn.ModuleList(
            up_block(features[level + 1], features[level], norm, act, dropout)
            for level in range(top - 1, aux_level - 1, -1)
        )
        self.out = UnetOutBlock(
            spatial_dims=3, in_channels=features[aux_level], out_channels=out_channels
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Decode one modality's encoder features ``feats`` (finest first) to region logits."""
        h = feats[-1]
        level = len(feats) - 2
        for up in self.ups:
            h = up(h, feats[level])
            level -= 1
        return self.out(h)


def _composable(up: nn.Module) -> bool:
    """Whether :func:`_up_export` can fold ``up``'s transposed conv into its first conv."""
    if not isinstance(up, UnetUpBlock):
        return False
    tconv, conv1 = up.transp_conv.conv, up.conv_block.conv1.conv
    return (
        isinstance(tconv, nn.ConvTranspose3d)
        and isinstance(conv1, nn.Conv3d)
        and tconv.bias is None
        and tconv.groups == 1 == conv1.groups
        and tuple(tconv.kernel_size) == (2, 2, 2) == tuple(tconv.stride)
        and tuple(tconv.padding) == (0, 0, 0) == tuple(tconv.output_padding)
        and tuple(tconv.dilation) == (1, 1, 1) == tuple(conv1.dilation)
        and tuple(conv1.kernel_size) == (3, 3, 3)
        and tuple(conv1.stride) == (1, 1, 1)
        and tuple(conv1.padding) == (1, 1, 1)
        and conv1.padding_mode == "zeros"
    )


def _up_export(up: nn.Module, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``up(h, skip)`` (a MONAI ``UnetUpBlock``) as ONNX export writes it: the same values, fewer MACs.

    The block is ``conv1(cat(convT(h), skip))`` then norm, activation, conv2, norm, activation;
    ``convT`` (2x2x2, stride 2, no bias) and the half of ``conv1`` (3x3x3, padding 1) that reads
    its output are both linear, so they compose into one 4x4x4 transposed convolution of ``h``
    (stride 2, padding 1; zero padding of the upsampled map is zero padding of ``h``):
    ``conv1(cat(u, s)) = convT4(h) + conv(s)``. It runs on the coarse grid, and skips the concat:
    2.2 ms less per 32^3 window on ONNX Runtime (1 thread, docs/benchmarks.md), equal within
    float32 rounding (tests/test_onnx.py). Any other block is run as is.
    """
    if not _composable(up):
        return up(h, skip)
    tconv, block = up.transp_conv.conv, up.conv_block
    conv1 = block.conv1.conv
    c_up = tconv.out_channels
    # computed from the weights' values (numpy), so the export stores the kernel as a constant
    w_t = tconv.weight.detach().cpu().double().numpy()  # (c_in, c_up, 2, 2, 2)
    w_up = conv1.weight.detach().cpu().double().numpy()[:, :c_up, ::-1, ::-1, ::-1]
    kernel = np.zeros((w_t.shape[0], conv1.out_channels, 4, 4, 4))
    for a, b, c in np.ndindex(2, 2, 2):
        kernel[:, :, a : a + 3, b : b + 3, c : c + 3] += np.einsum(
            "im,omxyz->ioxyz", w_t[:, :, a, b, c], w_up
        )
    kernel_t = torch.from_numpy(kernel).to(dtype=h.dtype, device=h.device)
    out = torch.nn.functional.conv_transpose3d(h, kernel_t, stride=2, padding=1)
    out = out + torch.nn.functional.conv3d(skip, conv1.weight[:, c_up:], conv1.bias, padding=1)
    out = block.lrelu(block.norm1(out))
    return block.lrelu(block.norm2(block.conv2(out)))


class MultiModalDSNet(ContractNet):
    """Per-modality encoders, availability-masked fusion, deep-supervised decoder, aux heads.

    ``forward(x, available=None)``: ``x`` is ``(B, M, H, W, D)`` with the modalities in
    ``modalities`` order, ``available`` a ``(B, M)`` bool mask (None = all present). In eval mode
    it returns one ``(B, out_channels, H, W, D)`` tensor of region logits (for sliding-window
    inference, MONAI bundle checks and ``torch.jit.trace``/``script`` export); in train mode a
    dict of named head logits: ``fused.d0`` (full resolution), ``fused.d1`` (half), ...,
    ``modality.<m>`` at resolution ``1/2**aux_level``. :meth:`forward_heads` returns that dict in
    either mode (used for held-out per-head losses).

    In eager eval mode on CPU (float32) every 3D convolution runs through oneDNN at any batch
    size (:class:`~segmerge.nets.OneDNNConv3d`; PyTorch itself falls back to a kernel 3-13x slower
    at batch 1, the sliding window's): the same logits to float32 rounding, with the live
    weights. Train mode, TorchScript, tracing/ONNX export, ``torch.compile`` and CUDA take
    ``nn.Conv3d``'s own path.

    Fusion (at every encoder level): ``"mean"`` is the mean over the available modalities'
    features (denominator = number available, clamped to >= 1, so a sample with nothing available
    gets zero features); ``"max"`` is the element-wise max over the available ones (zero if none).
    A missing modality is masked with ``masked_fill``, so its channel values (even NaN) cannot
    reach the fused path.

    Args:
        modalities: modality names in input channel order (default ``MODALITIES``).
        out_channels: region channels predicted by every head (default 3: ``wt, tc, et``).
        features: encoder widths per level, finest first; ``len(features) - 1`` stride-2
            downsamplings, so patch sizes must be divisible by ``2 ** (len(features) - 1)``.
            The fusion decoder uses the same widths. Default ``(8, 16, 32, 64)``.
        deep_supervision: number of fused heads ``fused.d0 .. fused.d{n-1}``, between 1 and
            ``len(features) - 1``. Default 3.
        norm: MONAI normalisation name or ``(name, kwargs)``. Default ``"instance"``.
        dropout: dropout probability inside every conv block. Default 0.
        fusion: ``"mean"`` or ``"max"`` (masked by availability). Default ``"mean"``.
        stem: full-resolution level of each encoder: ``"conv"`` (one conv, the cheap default)
            or ``"block"`` (two convs, nnU-Net style). Default ``"conv"``.
        aux_level: resolution level of the auxiliary modality heads (0 = full resolution,
            1 = half, ...); lower is more accurate and more expensive. Default 2 (quarter).
        act: MONAI activation spec. Default leaky ReLU (slope 0.01), as in nnU-Net.
        aux_decoder: ``"separate"`` (one auxiliary decoder per modality, the default) or
            ``"shared"`` (one decoder whose weights every modality's head uses, RFNet style:
            the ``modality.*`` objectives then share the aux decoder's parameters).
    """

    __constants__ = ["shared_aux"]  # a TorchScript constant: the unused aux branch is dropped

    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        out_channels: int = len(REGIONS),
        features: Sequence[int] = (8, 16, 32, 64),
        deep_supervision: int = 3,
        norm: str | tuple = "instance",
        dropout: float = 0.0,
        fusion: str = "mean",
        aux_level: int = 2,
        stem: str = "conv",
        act: str | tuple = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        aux_decoder: str = "separate",
    ) -> None:
        super().__init__()
        check_choice("aux_decoder", aux_decoder, AUX_DECODERS)
        check_choice("fusion", fusion, FUSIONS)
        check_choice("stem", stem, STEMS)
        init_contract(
            self, modalities, out_channels, features, deep_supervision, norm, dropout,
            fusion=fusion, aux_level=int(aux_level), stem=stem, aux_decoder=aux_decoder,
        )  # fmt: skip
        mods, feats = self.modalities, self.features
        depth = len(feats) - 1
        if not 0 <= int(aux_level) <= depth:
            raise ValueError(f"aux_level must be between 0 and {depth}, got {aux_level!r}")
        drop = float(dropout) if dropout else None
        self.fusion = fusion
        self.aux_level = int(aux_level)

        self.encoders = nn.ModuleDict(
            {m: ModalityEncoder(feats, norm, act, drop, stem) for m in mods}
        )
        self.decoder = nn.Module()
        # decoder.ups[i] goes from level depth-i to level depth-i-1 (coarsest first).
        self.decoder.ups = nn.ModuleList(
            up_block(feats[level + 1], feats[level], norm, act, drop)
            for level in range(depth - 1, -1, -1)
        )
        self.heads = fused_heads(feats, self.deep_supervision, self.out_channels)
        self.aux_decoder_kind = aux_decoder
        self.shared_aux = aux_decoder == "shared"
        # "separate": aux_heads.<m>; "shared": one aux_decoder and an empty aux_heads (the
        # scripted forward reads both attributes)
        self.aux_heads = nn.ModuleDict(
            {}
            if self.shared_aux
            else {
                m: AuxDecoder(feats, self.aux_level, self.out_channels, norm, act, drop)
                for m in mods
            }
        )
        self.aux_decoder = (
            AuxDecoder(feats, self.aux_level, self.out_channels, norm, act, drop)
            if self.shared_aux
            else nn.Identity()
        )
        self.mod_list = list(mods)
        use_onednn_convs(self)  # eval on CPU: convolutions through oneDNN at batch 1 (_onednn)

    @torch.jit.unused
    def output_names(self) -> list[str]:
        """Names of the train-mode outputs, in objective order."""
        return [f"fused.d{d}" for d in range(self.deep_supervision)] + [
            f"modality.{m}" for m in self.modalities
        ]

    @torch.jit.unused
    def output_scales(self) -> dict[str, int]:
        """Downsampling factor of each train-mode output relative to the input (1 = full)."""
        scales = {f"fused.d{d}": 2**d for d in range(self.deep_supervision)}
        scales.update({f"modality.{m}": 2**self.aux_level for m in self.modalities})
        return scales

    @torch.jit.unused
    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names by component: ``encoders.<m>``, ``aux_heads.<m>`` (or ``aux_decoder``
        when shared), ``decoder``, ``heads``.

        ``modality.<m>`` reaches exactly ``encoders.<m>`` and ``aux_heads.<m>`` (with a shared
        aux decoder: ``encoders.<m>`` and ``aux_decoder``); every ``fused.d<l>`` reaches all
        encoders, part of the decoder and its own head.
        """
        groups: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            key = ".".join(parts[:2]) if parts[0] in ("encoders", "aux_heads") else parts[0]
            groups.setdefault(key, []).append(name)
        return groups

    # ------------------------------------------------------------------ forward
    def _encode(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Run every encoder and fuse the available ones level by level."""
        if not torch.jit.is_scripting():  # (TorchScript does not compile this branch)
            if self.fusion == "mean" and torch.onnx.is_in_onnx_export():
                return self._encode_export(x, mask)
        per_mod: list[list[torch.Tensor]] = []
        for idx, enc in enumerate(self.encoders.values()):
            per_mod.append(enc(x[:, idx : idx + 1]))
        fused: list[torch.Tensor] = []
        # Written by hand (no MONAI block for masked fusion): masked_fill, not multiplication,
        # so that a missing channel's features - even inf/NaN - contribute exactly nothing.
        for level in range(len(self.features)):
            if self.fusion == "max":
                # -inf for missing entries; a sample with nothing available is reset to 0 below.
                acc = per_mod[0][level].masked_fill(~mask[:, 0].view(-1, 1, 1, 1, 1), float("-inf"))
                for idx in range(1, len(per_mod)):
                    missing = ~mask[:, idx].view(-1, 1, 1, 1, 1)
                    acc = torch.maximum(
                        acc, per_mod[idx][level].masked_fill(missing, float("-inf"))
                    )
                acc = acc.masked_fill(~mask.any(dim=1).view(-1, 1, 1, 1, 1), 0.0)
            else:
                acc = per_mod[0][level].masked_fill(~mask[:, 0].view(-1, 1, 1, 1, 1), 0.0)
                for idx in range(1, len(per_mod)):
                    missing = ~mask[:, idx].view(-1, 1, 1, 1, 1)
                    acc = acc + per_mod[idx][level].masked_fill(missing, 0.0)
                count = mask.sum(dim=1).clamp(min=1).to(acc.dtype).view(-1, 1, 1, 1, 1)
                acc = acc / count
            fused.append(acc)
        return fused, per_mod

    @torch.jit.unused
    def _encode_export(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """The ``"mean"`` fusion as ONNX export writes it: the same values, cheaper operators.

        ONNX Runtime's ``Where`` with a ``(B, 1, 1, 1, 1)`` condition is slow: the 16 of the
        masked fusion (one per sequence and level) took 1.3 ms of a 32^3 window (1 thread, ORT
        profiler; docs/benchmarks.md), their broadcast ``Mul`` here 0.3 ms and the one ``Where``
        on the input 0.1 ms. So the missing sequences are zeroed once in the input
        (one ``Where`` on ``(B, M, ...)``: a NaN in an absent channel cannot reach an encoder), and
        each level is ``sum_m E_m * (a_m / max(1, sum a))``: a finite feature times 0 is exactly
        0, so a missing sequence still contributes nothing. Equal to :meth:`_encode`'s within
        float32 rounding (tests/test_onnx.py); only ``torch.onnx.export`` takes this path.
        """
        x = x.masked_fill(~mask.view(mask.shape[0], mask.shape[1], 1, 1, 1), 0.0)
        weight = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
        weight = weight.view(weight.shape[0], weight.shape[1], 1, 1, 1, 1)
        per_mod: list[list[torch.Tensor]] = []
        for idx, enc in enumerate(self.encoders.values()):
            per_mod.append(enc(x[:, idx : idx + 1]))
        fused: list[torch.Tensor] = []
        for level in range(len(self.features)):
            acc = per_mod[0][level] * weight[:, 0]
            for idx in range(1, len(per_mod)):
                acc = acc + per_mod[idx][level] * weight[:, idx]
            fused.append(acc)
        return fused, per_mod

    def _decode(self, fused: list[torch.Tensor], n_levels: int) -> list[torch.Tensor]:
        """Decoder outputs of levels ``0 .. n_levels-1``, finest first (every up block runs)."""
        top = len(fused) - 1
        h = fused[top]
        outs: list[torch.Tensor] = []
        level = top - 1
        for up in self.decoder.ups:
            if torch.jit.is_scripting():
                h = up(h, fused[level])
            elif torch.onnx.is_in_onnx_export():
                h = _up_export(up, h, fused[level])
            else:
                h = up(h, fused[level])
            outs.insert(0, h)
            level -= 1
        return outs[:n_levels]

    def forward_heads(
        self, x: torch.Tensor, available: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every head's logits by name, whatever the mode (see the class docstring)."""
        self._check(x)
        mask = self._mask(x, available)
        fused, per_mod = self._encode(x, mask)
        dec = self._decode(fused, self.deep_supervision)
        out: dict[str, torch.Tensor] = {}
        for level, head in enumerate(self.heads.values()):
            out["fused.d" + str(level)] = head(dec[level])
        if self.shared_aux:
            for idx, name in enumerate(self.mod_list):
                out["modality." + name] = self.aux_decoder(per_mod[idx])
        else:
            idx = 0
            for name, aux in self.aux_heads.items():
                out["modality." + name] = aux(per_mod[idx])
                idx += 1
        return out

    def _forward_eval(self, x: torch.Tensor, available: torch.Tensor | None) -> torch.Tensor:
        """Eval mode: ``fused.d0`` alone, without the coarser heads and the aux decoders."""
        self._check(x)
        mask = self._mask(x, available)
        fused, _ = self._encode(x, mask)
        dec = self._decode(fused, 1)
        return self.heads["d0"](dec[0])
