"""Shared-weight modality U-Net (GMD's setting): one set of convolutions for every modality.

Structure (parameter-name prefixes in brackets, so reach and the shared mask read off them)::

    for each modality m (its own forward through the SAME convolutions):
        x_m = x[:, m] (zeroed where m is unavailable, so nothing non-finite enters a branch)
        encoder [encoder.<l>]    level 0 full resolution, levels 1..L stride 2
        decoder [decoder.<i>]    transposed conv x2, skip concat, two 3³ convs (i = L-1-l)
        heads   [heads.d<l>]     1x1x1 conv of decoder level l -> modality.<m>[.d<l>] logits
    every conv block normalises with modality m's own layer [...norm1.<m>, ...norm2.<m>]
    fusion:   fused.d<l> = sum_m a_m z_m,l / max(1, sum_m a_m)    (mean of the AVAILABLE logits)

``fusion="features"`` (HeMIS / RFNet-style mean fusion) fuses earlier: the shared encoder runs
once per modality, every skip feature and the bottleneck are fused by the same masked mean
``f_l = sum_m a_m e_m,l / max(1, sum_m a_m)``, and ONE shared decoder (one normalisation layer,
key ``fused``: every decoder parameter is shared) runs on the fused features. ``modality.<m>``
is then the decoder run on modality m's features alone (the singleton subset's head), and
``fused.d<l>`` is the full set's. The train-mode dict (:class:`SubsetHeads`) also decodes any
other subset on request (``subset_logits``), from the encoder features already computed:
``ObjectiveSet(subsets=...)`` uses it, so K subsets cost one encoder pass per modality and K
decoder passes, never K forwards. Reach stays exact: a subset's row reaches the encoder
normalisation of its own modalities only, and the decoder from every subset. With
``TrainStep(jacobian="outputs")`` the update is still exact (the decoded subset heads are in
the dict), but every subset row has a head tensor of its own, so the output-space Gramian is
diagonal and sees no conflict: use the parameter Jacobian (exact or ``refresh_every``) there.

Only the normalisation layers (their affine weights, running statistics for batch norm) are
modality-specific; every convolution and head is shared. The modalities are run as separate
branches rather than folded into one batch: a folded convolution would put every modality's
samples in one autograd node, so each objective's graph would seem to reach every modality's
normalisation and the shared mask would cover everything. Separate branches make reach exact by
construction (a subset objective reaches the normalisation of its own modalities only) at the
same FLOPs.

Train mode returns ``fused.d<l>`` (l < deep_supervision) and ``modality.<m>`` /
``modality.<m>.d<l>`` by name; eval mode returns ``fused.d0`` only (no coarser heads). With
``ObjectiveSet(subsets=...)`` the per-modality logits are re-fused per subset without another
forward (with ``fusion="features"``: the decoder is rerun per subset, see above).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.blocks.dynunet_block import get_conv_layer
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

from segmerge.conventions import MODALITIES, REGIONS
from segmerge.nets._common import (
    ContractNet,
    check_choice,
    fused_heads,
    init_contract,
)
from segmerge.nets._onednn import use_onednn_convs
from segmerge.objectives.names import FUSED, SUBSET, format_objective

__all__ = ["SharedModalityUNet", "SharedBlock", "SharedUp", "SubsetHeads", "fuse_logits"]

STEMS = ("conv", "block")
FUSIONS = ("logits", "features")
FUSED_NORM = "fused"
"""Key of the decoder's one normalisation layer with ``fusion="features"`` (no modality's)."""


def fuse_logits(per_modality: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean of the available modalities' logits: ``sum_m a_m z_m / max(1, sum_m a_m)``.

    Also the feature fusion of ``fusion="features"`` (any ``(B, C, ...)`` tensors).

    ``torch.where`` (not a product) so that an unavailable modality's logits, even non-finite,
    contribute exactly nothing; a sample with nothing available gets zero logits.

    Args:
        per_modality: M tensors ``(B, C, ...)``, in the column order of ``mask``.
        mask: ``(B, M)`` bool availability.
    """
    shape = [-1] + [1] * (per_modality[0].dim() - 1)
    acc = torch.zeros_like(per_modality[0])
    for idx, z in enumerate(per_modality):
        acc = acc + torch.where(mask[:, idx].view(shape), z, torch.zeros_like(z))
    count = mask.sum(dim=1).clamp(min=1).to(acc.dtype).view(shape)
    return acc / count


class SharedBlock(nn.Module):
    """Two 3³ convolutions shared by every modality, each followed by that modality's norm + act.

    Written by hand because MONAI's ``UnetBasicBlock`` has one normalisation per block; this is
    that block with one normalisation layer per modality (MONAI's ``get_norm_layer``).

    Args:
        in_channels: input width.
        out_channels: output width.
        stride: stride of the first convolution (2 to downsample).
        modalities: modality names, one normalisation layer each.
        norm: MONAI normalisation spec.
        act: MONAI activation spec.
        dropout: dropout after each activation (0 for none).
        n_convs: 1 (stem) or 2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        modalities: Sequence[str],
        norm: str | tuple,
        act: str | tuple,
        dropout: float,
        n_convs: int = 2,
    ) -> None:
        super().__init__()
        self.conv1 = get_conv_layer(
            3, in_channels, out_channels, kernel_size=3, stride=stride, conv_only=True
        )
        self.norm1 = nn.ModuleDict(
            {m: get_norm_layer(norm, spatial_dims=3, channels=out_channels) for m in modalities}
        )
        self.two = n_convs == 2
        self.conv2 = (
            get_conv_layer(3, out_channels, out_channels, kernel_size=3, stride=1, conv_only=True)
            if self.two
            else nn.Identity()
        )
        self.norm2 = nn.ModuleDict(
            {
                m: get_norm_layer(norm, spatial_dims=3, channels=out_channels)
                if self.two
                else nn.Identity()
                for m in modalities
            }
        )
        self.act = get_act_layer(act)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Run the shared convolutions with ``modality``'s normalisation layers."""
        h = self.conv1(x)
        out = h
        for name, norm_a in self.norm1.items():  # ModuleDict lookup by a variable key, scriptable
            if name == modality:
                out = norm_a(h)
        h = self.drop(self.act(out))
        if self.two:
            h = self.conv2(h)
            out = h
            for name, norm_b in self.norm2.items():
                if name == modality:
                    out = norm_b(h)
            h = self.drop(self.act(out))
        return h


class SharedUp(nn.Module):
    """Decoder level: shared transposed conv (x2), skip concat, a :class:`SharedBlock`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        modalities: Sequence[str],
        norm: str | tuple,
        act: str | tuple,
        dropout: float,
    ) -> None:
        super().__init__()
        self.up = get_conv_layer(
            3, in_channels, out_channels, kernel_size=2, stride=2, conv_only=True,
            is_transposed=True,
        )  # fmt: skip
        self.block = SharedBlock(2 * out_channels, out_channels, 1, modalities, norm, act, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, modality: str) -> torch.Tensor:
        """Upsample ``x``, concatenate ``skip`` and convolve with ``modality``'s norms."""
        return self.block(torch.cat([self.up(x), skip], dim=1), modality)


class SubsetHeads(dict):
    """Train-mode heads of a ``fusion="features"`` network: a plain ``{name: logits}`` dict that
    can also decode any modality subset from the encoder features of the same forward pass.

    ``subset_logits(subset)`` returns ``{depth: logits}`` for the decoder run on the masked mean
    of the subset's features (availability from the forward pass); the full set and singletons
    are the ``fused.d<l>`` / ``modality.<m>[.d<l>]`` heads already there, any other subset costs
    one decoder pass and is stored in the dict as ``subset.<S>[.d<l>]`` (so a caller that takes
    the dict's tensors as the network's outputs, e.g. ``TrainStep(jacobian="outputs")``, sees
    every tensor the rows are computed from). ObjectiveSet uses it for subset rows.
    """

    def __init__(
        self,
        heads: dict[str, torch.Tensor],
        modalities: Sequence[str],
        decode: Callable[[list[int]], list[torch.Tensor]],
    ) -> None:
        super().__init__(heads)
        self.modalities = tuple(modalities)
        self._decode = decode

    def subset_logits(self, subset: Sequence[str]) -> dict[int, torch.Tensor]:
        """``{depth: (B, C, ...) logits}`` of the prediction fused from ``subset`` alone."""
        unknown = [m for m in subset if m not in self.modalities]
        if not subset or unknown:
            raise ValueError(
                f"subset {tuple(subset)!r} must be a non-empty set of {self.modalities}"
            )
        idx = sorted({self.modalities.index(m) for m in subset})
        depths = [int(k.rsplit(".d", 1)[1]) for k in self if k.startswith(FUSED + ".d")]
        if len(idx) == len(self.modalities):
            return {d: self[f"{FUSED}.d{d}"] for d in depths}
        if len(idx) == 1:
            m = self.modalities[idx[0]]
            return {d: self[f"modality.{m}" + (f".d{d}" if d else "")] for d in depths}
        mods = [self.modalities[i] for i in idx]
        names = {d: format_objective(SUBSET, mods, d, self.modalities) for d in depths}
        if names[depths[0]] not in self:
            for d, logits in enumerate(self._decode(idx)):
                self[names[d]] = logits
        return {d: self[names[d]] for d in depths}


class SharedModalityUNet(ContractNet):
    """Deep-supervised 3D U-Net shared by all modalities, modality-specific normalisation.

    ``forward(x, available=None)`` as :class:`~segmerge.nets.MultiModalDSNet`: ``x`` is
    ``(B, M, H, W, D)`` in ``modalities`` order, ``available`` a ``(B, M)`` bool mask (None = all
    present). Eval mode returns ``(B, out_channels, H, W, D)`` logits fused from the available
    modalities; train mode a dict ``fused.d<l>``, ``modality.<m>`` (full resolution) and
    ``modality.<m>.d<l>`` (l >= 1). See the module docstring for the structure.

    In eager eval mode on CPU (float32) every 3D convolution runs through oneDNN at any batch
    size (:class:`~segmerge.nets.OneDNNConv3d`; PyTorch itself falls back to a kernel 3-13x slower
    at batch 1, the sliding window's): the same logits to float32 rounding, with the live
    weights. Train mode, TorchScript, tracing/ONNX export, ``torch.compile`` and CUDA take
    ``nn.Conv3d``'s own path.

    Args:
        modalities: modality names in input channel order (default ``MODALITIES``).
        out_channels: region channels (default 3: ``wt, tc, et``).
        features: widths per level, finest first; patch sizes must be divisible by
            ``2 ** (len(features) - 1)``. Default ``(8, 16, 32, 64)``.
        deep_supervision: heads at depths ``0 .. n-1`` (1 to ``len(features) - 1``). Default 3.
        norm: MONAI normalisation spec; one layer per modality in every block. Default instance
            norm with affine parameters (the modality-specific parameters: without affine ones
            every parameter is shared). A JSON list ``["instance", {"affine": true}]`` works too.
        dropout: dropout probability after each activation. Default 0.
        fusion: ``"logits"``: mean of the available modalities' logits (the GMD paper's);
            ``"features"``: mean of the available modalities' encoder features at every level,
            one shared decoder on the fused features (HeMIS / RFNet-style; train mode returns
            :class:`SubsetHeads`). Default ``"logits"``.
        stem: level 0 as ``"conv"`` (one conv, the cheap default) or ``"block"`` (two convs).
        act: MONAI activation spec. Default leaky ReLU (slope 0.01).
    """

    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        out_channels: int = len(REGIONS),
        features: Sequence[int] = (8, 16, 32, 64),
        deep_supervision: int = 3,
        norm: str | tuple | list = ("instance", {"affine": True}),
        dropout: float = 0.0,
        fusion: str = "logits",
        stem: str = "conv",
        act: str | tuple = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
    ) -> None:
        super().__init__()
        if isinstance(norm, list):
            norm = tuple(norm)
        if isinstance(act, list):
            act = tuple(act)
        check_choice("fusion", fusion, FUSIONS)
        check_choice("stem", stem, STEMS)
        init_contract(
            self, modalities, out_channels, features, deep_supervision, norm, dropout,
            fusion=fusion, stem=stem,
        )  # fmt: skip
        for m in self.modalities:
            if "." in m or "+" in m:
                raise ValueError(f"modality name {m!r} must not contain '.' or '+'")
        if fusion == "features" and FUSED_NORM in self.modalities:
            raise ValueError(
                f"fusion='features': modality name {FUSED_NORM!r} is the decoder's own "
                "normalisation key; rename that modality"
            )
        feats = self.features
        depth = len(feats) - 1
        drop = float(dropout)
        self.fusion = fusion
        self.mod_list = list(self.modalities)
        blocks: list[nn.Module] = []
        in_ch = 1
        for level, width in enumerate(feats):
            n_convs = 1 if level == 0 and stem == "conv" else 2
            stride = 1 if level == 0 else 2
            blocks.append(
                SharedBlock(in_ch, width, stride, self.modalities, norm, act, drop, n_convs)
            )
            in_ch = width
        self.encoder = nn.ModuleList(blocks)
        # decoder[i] goes from level depth-i to level depth-i-1 (coarsest first); with feature
        # fusion it runs on fused features: one normalisation layer, shared like the convolutions
        self.dec_key = FUSED_NORM if fusion == "features" else ""
        dec_mods = (FUSED_NORM,) if fusion == "features" else self.modalities
        self.decoder = nn.ModuleList(
            SharedUp(feats[level + 1], feats[level], dec_mods, norm, act, drop)
            for level in range(depth - 1, -1, -1)
        )
        self.heads = fused_heads(feats, self.deep_supervision, self.out_channels)
        use_onednn_convs(self)  # eval on CPU: convolutions through oneDNN at batch 1 (_onednn)

    @torch.jit.unused
    def output_names(self) -> list[str]:
        """Train-mode output names: ``fused.d*`` then per-modality heads, depth by depth."""
        names = [f"fused.d{d}" for d in range(self.deep_supervision)]
        for d in range(self.deep_supervision):
            names += [f"modality.{m}" + (f".d{d}" if d else "") for m in self.modalities]
        return names

    @property
    @torch.jit.unused
    def derived_outputs(self) -> tuple[str, ...]:
        """Train-mode outputs computed from other outputs (``fused.d*``: means of ``modality.*``).

        None with ``fusion="features"``: every head is the decoder's own output.
        """
        if self.fusion == "features":
            return ()
        return tuple(f"fused.d{d}" for d in range(self.deep_supervision))

    @torch.jit.unused
    def output_scales(self) -> dict[str, int]:
        """Downsampling factor of each train-mode output relative to the input (1 = full)."""
        scales: dict[str, int] = {}
        for name in self.output_names():
            depth = int(name.rsplit(".d", 1)[1]) if ".d" in name else 0
            scales[name] = 2**depth
        return scales

    @torch.jit.unused
    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names: ``shared`` (convolutions, heads) and ``norm.<m>`` per modality."""
        groups: dict[str, list[str]] = {"shared": []}
        groups.update({f"norm.{m}": [] for m in self.modalities})
        for name, _ in self.named_parameters():
            parts = name.split(".")
            hit = [
                p for i, p in enumerate(parts[1:], 1)
                if parts[i - 1] in ("norm1", "norm2") and p in self.modalities
            ]  # fmt: skip
            groups[f"norm.{hit[0]}" if hit else "shared"].append(name)
        return groups

    # ------------------------------------------------------------------ forward
    def _encode(self, x: torch.Tensor, modality: str) -> list[torch.Tensor]:
        """One modality through the shared encoder: its features at every level (skips, bottleneck)."""
        feats: list[torch.Tensor] = []
        h = x
        for block in self.encoder:
            h = block(h, modality)
            feats.append(h)
        return feats

    def _decode(self, feats: list[torch.Tensor], key: str, n_heads: int) -> list[torch.Tensor]:
        """The shared decoder on encoder features (``key``: its normalisation layers' name)."""
        h = feats[-1]
        level = len(feats) - 2
        dec: list[torch.Tensor] = []
        for up in self.decoder:
            h = up(h, feats[level], key)
            dec.insert(0, h)
            level -= 1
        out: list[torch.Tensor] = []
        for depth, head in enumerate(self.heads.values()):
            if depth < n_heads:
                out.append(head(dec[depth]))
        return out

    def _fuse_decode(
        self, feats: list[list[torch.Tensor]], mask: torch.Tensor, idx: list[int], n_heads: int
    ) -> list[torch.Tensor]:
        """Decoder on the masked mean of modalities ``idx``' features at every level."""
        sel = mask[:, idx]
        fused = [fuse_logits([feats[i][lvl] for i in idx], sel) for lvl in range(len(feats[0]))]
        return self._decode(fused, self.dec_key, n_heads)

    def _run(
        self, x: torch.Tensor, available: torch.Tensor | None, n_heads: int
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Availability mask and, per modality, its head logits (logit fusion) or its encoder
        features (feature fusion; ``n_heads`` unused)."""
        self._check(x)
        mask = self._mask(x, available)
        run = [True for _ in self.mod_list]
        if not self.training and not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            # Eval only (not in training, not in an exported graph): a sequence absent from the
            # whole batch is not run, its logits would be masked out anyway. One host read of
            # the mask per forward; it saves up to 3/4 of the work on a missing-sequence input.
            run = mask.any(dim=0).tolist()
            if not any(run):
                run[0] = True
        features = self.fusion == "features"
        per_mod: list[list[torch.Tensor]] = []
        done: list[torch.Tensor] = []
        for idx, m in enumerate(self.mod_list):
            if run[idx]:
                # zeroed where unavailable: a missing channel (even NaN) cannot reach a gradient
                xm = x[:, idx : idx + 1].masked_fill(~mask[:, idx].view(-1, 1, 1, 1, 1), 0.0)
                enc = self._encode(xm, m)
                per_mod.append(enc if features else self._decode(enc, m, n_heads))
                done = per_mod[-1]
            else:
                per_mod.append([])
        for idx in range(len(per_mod)):
            if not run[idx]:
                per_mod[idx] = [torch.zeros_like(t) for t in done]
        return mask, per_mod

    def forward_heads(
        self, x: torch.Tensor, available: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every head's logits by name, whatever the mode (see the class docstring)."""
        mask, per_mod = self._run(x, available, self.deep_supervision)
        n = self.deep_supervision
        if self.fusion == "features":
            full = self._fuse_decode(per_mod, mask, list(range(len(self.mod_list))), n)
            single = [self._fuse_decode(per_mod, mask, [i], n) for i in range(len(self.mod_list))]
        else:
            full = [fuse_logits([p[depth] for p in per_mod], mask) for depth in range(n)]
            single = per_mod
        out: dict[str, torch.Tensor] = {}
        for depth in range(n):
            out["fused.d" + str(depth)] = full[depth]
        for depth in range(n):
            suffix = ".d" + str(depth) if depth > 0 else ""
            for idx, m in enumerate(self.mod_list):
                out["modality." + m + suffix] = single[idx][depth]
        if self.fusion == "features" and not torch.jit.is_scripting():
            return self._subset_heads(out, per_mod, mask)
        return out

    @torch.jit.unused
    def _subset_heads(
        self, out: dict[str, torch.Tensor], feats: list[list[torch.Tensor]], mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``out`` as :class:`SubsetHeads`, decoding further subsets from ``feats`` on request."""

        def decode(idx: list[int]) -> list[torch.Tensor]:
            return self._fuse_decode(feats, mask, idx, self.deep_supervision)

        return SubsetHeads(out, self.mod_list, decode)

    def _forward_eval(self, x: torch.Tensor, available: torch.Tensor | None) -> torch.Tensor:
        """Eval mode: the fused full-resolution logits ``fused.d0`` alone."""
        mask, per_mod = self._run(x, available, 1)
        if self.fusion == "features":
            return self._fuse_decode(per_mod, mask, list(range(len(self.mod_list))), 1)[0]
        return fuse_logits([p[0] for p in per_mod], mask)
