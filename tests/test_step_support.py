"""Small helpers shared by the segmerge.step tests (no tests here).

A tiny late-fusion deep-supervised 3D network with the same head names as
``segmerge.nets.MultiModalDSNet`` (``fused.d0``, ``fused.d1``, ``modality.<m>``) and a loss
function producing stacked named objectives, so the step can be tested in a fraction of a
second. Each modality has its own encoder and auxiliary head; the fused decoder sees the
availability-masked mean of the encoders' features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODS = ("flair", "t1", "t1ce", "t2")


@dataclass
class Named:
    """Stand-in for segmerge.objectives.NamedLosses."""

    names: list[str]
    losses: Tensor


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


def objective(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample-mean soft Dice + BCE (so a batch split over ranks averages exactly)."""
    if logits.shape[2:] != target.shape[2:]:
        target = F.adaptive_max_pool3d(target, logits.shape[2:])
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).flatten(2).sum(-1)
    denom = (p + target).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (denom + 1)
    return bce + dice.mean()


def named_losses(outputs: dict[str, Tensor], target: Tensor) -> Named:
    """Objectives of every head present, in head order."""
    names = list(outputs)
    return Named(names, torch.stack([objective(outputs[n], target) for n in names]))


def batch(n: int = 2, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic images (n, 4, s, s, s) and region targets (n, 3, s, s, s)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, size, generator=g)
    target = (torch.rand(n, 3, size, size, size, generator=g) > 0.7).float()
    return x, target


class SumAgg:
    """Stand-in aggregator: plain sum of the rows."""

    masked_merge = False
    needs_reference = False

    def __call__(self, J, shared=None, names=None, reference=None):
        k = J.shape[0]
        return _result(J, torch.ones(k, dtype=J.dtype, device=J.device), shared, False)


class GMDAgg:
    """Stand-in K-space GMD (identity order, clamp to [-2, 1], masked merge)."""

    masked_merge = True
    needs_reference = False

    def __call__(self, J, shared=None, names=None, reference=None):
        G = J @ J.T
        k = G.shape[0]
        C = torch.eye(k, dtype=J.dtype, device=J.device)
        for i in range(k):
            for j in range(k):
                d = C[i] @ G[:, j]
                a = torch.where(G[j, j] > 0, d / G[j, j].clamp_min(1e-30), 0).clamp(-2, 1)
                C[i, j] = C[i, j] - torch.where(d < 0, a, 0)
        return _result(J, C.sum(0), shared, True)


def _result(J, c, shared, masked):
    from types import SimpleNamespace

    k = J.shape[0]
    update = c @ J
    if masked and shared is not None:
        update = torch.where(shared, update / k, update)
    nonfinite = ~torch.isfinite(J).all()
    return SimpleNamespace(
        update=update,
        weights=c,
        norms=J.norm(dim=1),
        cosine=torch.zeros(k, k),
        alpha=torch.zeros(k, k),
        n_conflicts=torch.zeros((), dtype=torch.int64),
        nonfinite=nonfinite,
    )
