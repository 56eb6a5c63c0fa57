"""Small helpers shared by the segmerge.step tests (no tests here).

The real aggregators and objective set, and a tiny late-fusion deep-supervised 3D network with the same head names as
``segmerge.nets.MultiModalDSNet`` (``fused.d0``, ``fused.d1``, ``modality.<m>``) and a loss
function producing stacked named objectives, so the step can be tested in a fraction of a
second. Each modality has its own encoder and auxiliary head; the fused decoder sees the
availability-masked mean of the encoders' features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segmerge.aggregation import build_aggregator
from segmerge.objectives import NamedLosses, ObjectiveSet

MODS = ("flair", "t1", "t1ce", "t2")


class TinyDSNet(nn.Module):
    """Per-modality conv encoders, masked-mean fusion, two fused depths, one aux head per modality."""

    def __init__(self, width: int = 4, regions: int = 3) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(
            {m: nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.GELU()) for m in MODS}
        )
        self.aux = nn.ModuleDict({m: nn.Conv3d(width, regions, 1) for m in MODS})
        self.decoder = nn.Sequential(nn.Conv3d(width, width, 3, padding=1), nn.GELU())
        self.head0 = nn.Conv3d(width, regions, 1)
        self.head1 = nn.Conv3d(width, regions, 1)
        self.unused = nn.Linear(2, 2)  # reached by no objective

    def forward(self, x: Tensor, available: Tensor | None = None) -> dict[str, Tensor]:
        b = x.shape[0]
        if available is None:
            available = torch.ones(b, len(MODS), dtype=torch.bool, device=x.device)
        feats = {m: self.encoders[m](x[:, i : i + 1]) for i, m in enumerate(MODS)}
        present = [i for i, _ in enumerate(MODS) if bool(available[:, i].any())]
        a = available.to(x.dtype)
        fused = sum(feats[MODS[i]] * a[:, i].view(b, 1, 1, 1, 1) for i in present)
        fused = fused / a.sum(1).clamp_min(1).view(b, 1, 1, 1, 1)
        h = self.decoder(fused)
        out = {"fused.d0": self.head0(h), "fused.d1": self.head1(F.avg_pool3d(h, 2))}
        for i in present:
            out[f"modality.{MODS[i]}"] = self.aux[MODS[i]](feats[MODS[i]])
        return out


OBJECTIVES = ObjectiveSet()


def named_losses(outputs: dict[str, Tensor], target: Tensor) -> NamedLosses:
    """The real objective set (per-sample-mean Dice + BCE rows, so a batch split over ranks
    averages exactly)."""
    return OBJECTIVES(outputs, target)


def batch(n: int = 2, size: int = 12, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic images (n, 4, s, s, s) and region targets (n, 3, s, s, s)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, size, generator=g)
    target = (torch.rand(n, 3, size, size, size, generator=g) > 0.7).float()
    return x, target


def SumAgg():  # noqa: N802 - reads like the class it builds
    """The real Sum aggregator."""
    return build_aggregator("sum")


def GMDAgg():  # noqa: N802
    """The real GMD aggregator (identity order, masked merge)."""
    return build_aggregator("gmd")
