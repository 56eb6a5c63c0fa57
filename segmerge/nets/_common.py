"""Checks, constructor bookkeeping and the contract base class shared by the segmerge networks.

Every check here reads shapes and dtypes only (Python ints), never tensor values, so the
forward passes stay free of device syncs and trace cleanly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetUpBlock
from torch import nn

from segmerge.conventions import suggest  # the one "did you mean" (re-exported for nets)

NORM_NAMES = ("instance", "batch", "group", "layer", "instance_nvfuser", "syncbatch")
"""Normalisation names accepted by MONAI's ``get_norm_layer`` that make sense here."""


def check_norm(norm: str | tuple) -> str | tuple:
    """Validate a MONAI normalisation spec (``"instance"`` or ``("group", {"num_groups": 4})``).

    Args:
        norm: a name or a ``(name, kwargs)`` tuple as MONAI's ``get_norm_layer`` takes it.

    Returns:
        ``norm`` unchanged.
    """
    name = norm[0] if isinstance(norm, tuple) else norm
    if not isinstance(name, str) or name.lower() not in NORM_NAMES:
        raise ValueError(
            f"norm must be one of {NORM_NAMES} (or a (name, kwargs) tuple), got {norm!r}"
            + suggest(str(name).lower(), NORM_NAMES)
        )
    return norm


def check_choice(what: str, value: str, choices: Sequence[str]) -> str:
    """Raise ``ValueError`` naming ``what``, the choices and the nearest one unless ``value`` is one."""
    if value not in choices:
        raise ValueError(
            f"{what} must be one of {tuple(choices)}, got {value!r}" + suggest(value, choices)
        )
    return value


def check_features(features: Sequence[int], what: str = "features") -> tuple[int, ...]:
    """Validate a sequence of channel widths, one per resolution level (at least 2 levels)."""
    feats = tuple(int(f) for f in features)
    if len(feats) < 2 or any(f < 1 for f in feats):
        raise ValueError(
            f"{what} must list at least 2 positive widths (one per resolution level), got {features!r}"
        )
    return feats


def check_input(x: torch.Tensor, in_channels: int, divisor: int, names: Sequence[str]) -> None:
    """Raise a clear error if ``x`` is not ``(B, in_channels, H, W, D)`` with H, W, D divisible.

    Args:
        x: network input.
        in_channels: expected channel count (one per modality).
        divisor: every spatial size must be a multiple of this (``2 ** n_downsamplings``).
        names: modality names in channel order, quoted in the error.
    """
    if x.dim() != 5:
        raise ValueError(f"input must be (B, C, H, W, D), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"input has {x.shape[1]} channels but the network expects {in_channels} "
            f"(one per modality, in order {tuple(names)})"
        )
    for size in x.shape[2:]:
        if size % divisor != 0:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {divisor} "
                f"(2^depth for {divisor.bit_length() - 1} downsamplings); pad or crop the patch"
            )


def init_contract(
    net: nn.Module,
    modalities: Sequence[str],
    out_channels: int,
    features: Sequence[int],
    deep_supervision: int,
    norm: str | tuple,
    dropout: float,
    **options: object,
) -> None:
    """Check the arguments every segmerge network shares and set its contract attributes.

    Sets ``modalities``, ``out_channels``, ``features``, ``deep_supervision``, ``divisor``
    (``2 ** depth``: spatial sizes must be multiples) and ``_config`` (these arguments plus
    ``options``, the network's own, as :func:`describe` prints them).

    Raises:
        ValueError: naming the argument, its value and the rule it breaks.
    """
    mods = tuple(str(m) for m in modalities)
    if not mods or len(set(mods)) != len(mods):
        raise ValueError(f"modalities must be non-empty and unique, got {modalities!r}")
    feats = check_features(features)
    depth = len(feats) - 1
    if not 1 <= int(deep_supervision) <= depth:
        raise ValueError(
            f"deep_supervision must be between 1 and len(features) - 1 = {depth} "
            f"(one fused head per decoder level), got {deep_supervision!r}"
        )
    if int(out_channels) < 1:
        raise ValueError(f"out_channels must be >= 1, got {out_channels!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    check_norm(norm)
    net.modalities = mods
    net.out_channels = int(out_channels)
    net.features = feats
    net.deep_supervision = int(deep_supervision)
    net.divisor = 2**depth
    net._config = {
        "modalities": mods,
        "out_channels": net.out_channels,
        "features": feats,
        "deep_supervision": net.deep_supervision,
        "norm": norm,
        "dropout": float(dropout),
        **options,
    }


def describe(net: nn.Module) -> str:
    """``extra_repr`` of a network set up by :func:`init_contract`: its constructor arguments."""
    return ", ".join(f"{k}={v!r}" for k, v in net._config.items())


def up_block(
    in_channels: int, out_channels: int, norm: str | tuple, act: str | tuple, dropout: float | None
) -> UnetUpBlock:
    """One decoder level: MONAI's transposed-conv upsampling (x2), skip concat, two 3³ convs."""
    return UnetUpBlock(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=3,
        stride=1,
        upsample_kernel_size=2,
        norm_name=norm,
        act_name=act,
        dropout=dropout,
    )


def availability_mask(x: torch.Tensor, available: torch.Tensor | None, n_mod: int) -> torch.Tensor:
    """The ``(B, M)`` bool availability mask of a batch ``x`` (all present when ``None``).

    The shape is checked in eager mode (not while scripting or tracing). The mask comes from the
    data loader on the host: copying it to ``x``'s device is not a device sync.
    """
    if available is None:
        return torch.ones(x.shape[0], n_mod, dtype=torch.bool, device=x.device)
    if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
        if available.dim() != 2 or available.shape[0] != x.shape[0] or available.shape[1] != n_mod:
            raise ValueError(
                f"available must be (B, M) = ({x.shape[0]}, {n_mod}) bool, "
                f"got shape {tuple(available.shape)}"
            )
    return available.to(device=x.device, dtype=torch.bool)


def fused_heads(features: Sequence[int], n_heads: int, out_channels: int) -> nn.ModuleDict:
    """The fused heads ``d0 .. d{n_heads-1}``: a 1x1x1 convolution of decoder level ``l`` each."""
    return nn.ModuleDict(
        {
            f"d{level}": UnetOutBlock(
                spatial_dims=3, in_channels=features[level], out_channels=out_channels
            )
            for level in range(n_heads)
        }
    )


class ContractNet(nn.Module):
    """Base of the segmerge networks: the contract's ``forward`` and its shared helpers.

    A subclass sets the contract attributes with :func:`init_contract` and defines
    ``forward_heads(x, available)`` (every head's logits by name, whatever the mode) and
    ``_forward_eval(x, available)`` (the eval-mode region logits, ``fused.d0`` alone).
    """

    def extra_repr(self) -> str:
        return describe(self)

    def _check(self, x: torch.Tensor) -> None:
        """:func:`check_input` in eager mode (not while scripting or tracing)."""
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            check_input(x, len(self.modalities), self.divisor, self.modalities)

    def _mask(self, x: torch.Tensor, available: torch.Tensor | None) -> torch.Tensor:
        return availability_mask(x, available, len(self.modalities))

    def forward(
        self, x: torch.Tensor, available: torch.Tensor | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Train mode: dict of named head logits. Eval mode: ``fused.d0`` logits only.

        Args:
            x: ``(B, M, H, W, D)`` input, modalities in ``self.modalities`` order.
            available: ``(B, M)`` bool availability mask; None means every modality present.
        """
        if self.training:
            return self.forward_heads(x, available)
        return self._forward_eval(x, available)
