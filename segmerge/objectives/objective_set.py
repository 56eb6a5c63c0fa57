"""The named objective set: one loss row per prediction head and depth.

Rows, in order: ``fused.d0, fused.d1, ...`` (the fused deep-supervision heads, coarser with
depth), then ``modality.<m>`` for each modality in ``modalities`` order that has an auxiliary
head in the outputs and is present in the batch. Every row is ``RegionLoss`` (sigmoid Dice +
BCE) of that head against the region target downsampled to the head's resolution.

Depth weights (applied by scaling each ``fused.d<d>`` row):

* ``"equal"``: w_d = 1.
* ``"nnunet"``: w_d = 2^-d, normalised so that the fused weights have mean 1
  (``w_d = n * 2^-d / sum_e 2^-e`` over the n fused rows). nnU-Net normalises them to sum 1
  because its weighted sum replaces a single loss; here each row is its own objective next to
  the (unit-weight) modality rows, so the mean-1 normalisation keeps the fused rows' total
  the same as with ``"equal"`` and only shifts weight toward full resolution.
* a sequence of floats indexed by depth.

Missing modalities: a modality absent from every sample of the batch has no row (the names
say which rows exist). A modality present in only some samples is averaged over those samples
only (a masked mean, no branching on tensor values). Fused rows average over all samples: the
fused path handles missing inputs itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from segmerge.conventions import MODALITIES
from segmerge.objectives.losses import RESIZE_MODES, RegionLoss, resize_target
from segmerge.objectives.names import FUSED, MODALITY, parse_name, suggest

__all__ = ["DEPTH_WEIGHTINGS", "NamedLosses", "ObjectiveSet", "head_losses"]

DEPTH_WEIGHTINGS = ("equal", "nnunet")


@dataclass(frozen=True)
class NamedLosses:
    """Loss rows with their names.

    Attributes:
        names: objective names, one per row (``fused.d0``, ..., ``modality.flair``, ...).
        losses: ``(K,)`` stacked 0-d losses, still attached to the autograd graph.

    ``ObjectiveSet`` builds ``losses`` with ``torch.stack`` as the last operation (row weights
    are applied before), so the stack node's K input edges are the per-row graph roots: the
    training step differentiates those, because differentiating ``losses[k]`` would send zero
    gradients into every row and make each objective seem to reach every parameter.
    """

    names: list[str]
    losses: torch.Tensor

    def __post_init__(self) -> None:
        if self.losses.dim() != 1 or self.losses.shape[0] != len(self.names):
            raise ValueError(
                f"losses must be a ({len(self.names)},) vector, one per name, "
                f"got shape {tuple(self.losses.shape)}"
            )

    def __len__(self) -> int:
        return len(self.names)

    def as_dict(self, detach: bool = True) -> dict[str, torch.Tensor]:
        """``{name: 0-d loss}``; detached by default (for logging: no ``.item()`` sync here)."""
        losses = self.losses.detach() if detach else self.losses
        return dict(zip(self.names, losses.unbind(0)))

    def total(self) -> torch.Tensor:
        """Sum of the rows (the plain summed-loss baseline), attached to the graph."""
        return self.losses.sum()


class ObjectiveSet:
    """Turns a network's named head logits into named loss rows.

    ``__call__(outputs, target, available=None, present=None) -> NamedLosses``.

    Args:
        modalities: modality names in the order of ``available``'s columns and of the
            ``modality.*`` rows. Default ``MODALITIES``.
        depth_weights: ``"equal"``, ``"nnunet"`` (1/2^d with mean 1, see the module docstring)
            or a sequence of floats indexed by depth. Default ``"equal"``.
        dice_weight: weight of the sigmoid Dice term in every row. Default 1.
        bce_weight: weight of the BCE term in every row. Default 1.
        target_resize: how targets are downsampled to coarser heads: ``"nearest"`` (nnU-Net),
            ``"max"`` or ``"area"`` (see :func:`resize_target`). Default ``"nearest"``.
    """

    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        depth_weights: str | Sequence[float] = "equal",
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        target_resize: str = "nearest",
    ) -> None:
        self.modalities = tuple(str(m) for m in modalities)
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be unique, got {modalities!r}")
        if isinstance(depth_weights, str):
            if depth_weights not in DEPTH_WEIGHTINGS:
                raise ValueError(
                    f"depth_weights must be one of {DEPTH_WEIGHTINGS} or a list of floats, "
                    f"got {depth_weights!r}" + suggest(depth_weights, DEPTH_WEIGHTINGS)
                )
            self.depth_weights: str | tuple[float, ...] = depth_weights
        else:
            weights = tuple(float(w) for w in depth_weights)
            if not weights or any(w < 0 for w in weights):
                raise ValueError(
                    f"explicit depth_weights must be non-negative floats, got {depth_weights!r}"
                )
            self.depth_weights = weights
        if target_resize not in RESIZE_MODES:
            raise ValueError(
                f"target_resize must be one of {RESIZE_MODES}, got {target_resize!r}"
                + suggest(target_resize, RESIZE_MODES)
            )
        self.target_resize = target_resize
        self.loss = RegionLoss(dice_weight=dice_weight, bce_weight=bce_weight)

    def __repr__(self) -> str:
        return (
            f"ObjectiveSet(modalities={self.modalities!r}, depth_weights={self.depth_weights!r}, "
            f"dice_weight={self.loss.dice_weight!r}, bce_weight={self.loss.bce_weight!r}, "
            f"target_resize={self.target_resize!r})"
        )

    # ------------------------------------------------------------------ weights and rows
    def depth_weight_values(self, depths: Sequence[int]) -> list[float]:
        """Weights of the fused rows at the given depths (see the module docstring).

        Args:
            depths: depth indices of the fused heads present, e.g. ``[0, 1, 2]``.
        """
        depths = list(depths)
        if self.depth_weights == "equal":
            return [1.0] * len(depths)
        if self.depth_weights == "nnunet":
            raw = [2.0**-d for d in depths]
            return [len(raw) * r / sum(raw) for r in raw]
        explicit = self.depth_weights
        if depths and max(depths) >= len(explicit):
            raise ValueError(
                f"depth_weights lists {len(explicit)} values but the outputs have depth {max(depths)}"
            )
        return [explicit[d] for d in depths]

    def present_modalities(
        self, available: torch.Tensor | None = None, present: Iterable[str] | None = None
    ) -> list[str]:
        """Modalities available in at least one sample, in ``modalities`` order.

        Args:
            available: ``(B, M)`` bool mask. Reading it is a host read: free when the mask is
                still on the CPU as the data loader yields it, one device sync per step if it
                was already moved to the GPU (then pass ``present`` instead).
            present: precomputed names (e.g. by the data loader); takes precedence.
        """
        if present is not None:
            names = set(present)
            unknown = names - set(self.modalities)
            if unknown:
                bad = sorted(unknown)[0]
                raise ValueError(
                    f"present lists unknown modality {bad!r}; valid: {self.modalities}"
                    + suggest(bad, self.modalities)
                )
            return [m for m in self.modalities if m in names]
        if available is None:
            return list(self.modalities)
        self._check_available(available, None)
        # The one host-side read of the mask per step: decides which rows exist.
        flags = available.bool().any(dim=0).tolist()
        return [m for m, on in zip(self.modalities, flags) if on]

    def _check_available(self, available: torch.Tensor, batch: int | None) -> None:
        ok = available.dim() == 2 and available.shape[1] == len(self.modalities)
        if batch is not None:
            ok = ok and available.shape[0] == batch
        if not ok:
            raise ValueError(
                f"available must be (B, {len(self.modalities)}) with columns {self.modalities}"
                f"{'' if batch is None else f' and B = {batch}'}, got shape {tuple(available.shape)}"
            )

    def _split_outputs(self, outputs: Mapping[str, torch.Tensor]) -> tuple[list[int], list[str]]:
        """Fused depths (sorted) and modalities (in order) that have a head in ``outputs``."""
        depths: list[int] = []
        mods: set[str] = set()
        for name in outputs:
            kind, value = parse_name(name)
            if kind == FUSED:
                depths.append(int(value))
            elif value not in self.modalities:
                raise ValueError(
                    f"output {name!r} names a modality outside {self.modalities}"
                    + suggest(str(value), self.modalities)
                )
            else:
                mods.add(str(value))
        return sorted(depths), [m for m in self.modalities if m in mods]

    def _check_target(
        self, outputs: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        if target.dim() != 5:
            raise ValueError(
                f"target must be (B, C, H, W, D) region masks, got shape {tuple(target.shape)}"
            )
        for name, logits in outputs.items():
            if logits.dim() != 5 or logits.shape[:2] != target.shape[:2]:
                raise ValueError(
                    f"head {name!r} has shape {tuple(logits.shape)}; expected (B, C) = "
                    f"{tuple(target.shape[:2])} as in the target {tuple(target.shape)}"
                )
        return target.float()

    def _rows(
        self,
        outputs: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        available: torch.Tensor | None,
        present: Iterable[str] | None,
        weighted: bool,
        fused_depths: Sequence[int] | None = None,
    ) -> list[tuple[str, torch.Tensor]]:
        if not outputs:
            raise ValueError("outputs is empty: expected named heads such as 'fused.d0'")
        target = self._check_target(outputs, target)
        depths, mods = self._split_outputs(outputs)
        if fused_depths is not None:
            depths = [d for d in depths if d in fused_depths]
        if available is not None:
            self._check_available(available, target.shape[0])
        if mods:  # no modality heads (early fusion): no need to read the mask at all
            present_mods = set(self.present_modalities(available, present))
            mods = [m for m in mods if m in present_mods]

        resized: dict[tuple[int, ...], torch.Tensor] = {}  # one resize per distinct head size

        def per_sample(name: str) -> torch.Tensor:
            logits = outputs[name]
            size = tuple(logits.shape[2:])
            if size not in resized:
                resized[size] = resize_target(target, size, self.target_resize)
            return self.loss(logits, resized[size])

        rows: list[tuple[str, torch.Tensor]] = []
        weights = self.depth_weight_values(depths) if weighted else [1.0] * len(depths)
        for d, w in zip(depths, weights):
            row = per_sample(f"{FUSED}.d{d}").mean()
            rows.append((f"{FUSED}.d{d}", row * w if w != 1.0 else row))
        for m in mods:
            name = f"{MODALITY}.{m}"
            loss = per_sample(name)
            if available is None:
                rows.append((name, loss.mean()))
                continue
            # Masked mean over the samples where m is available: torch.where (not a product)
            # so a non-finite loss of an excluded sample cannot leak in; clamp avoids 0/0.
            col = available[:, self.modalities.index(m)].to(device=loss.device, dtype=torch.bool)
            total = torch.where(col, loss, torch.zeros_like(loss)).sum()
            rows.append((name, total / col.sum().clamp(min=1).to(loss.dtype)))
        return rows

    # ------------------------------------------------------------------ public API
    def __call__(
        self,
        outputs: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        available: torch.Tensor | None = None,
        present: Iterable[str] | None = None,
    ) -> NamedLosses:
        """Loss rows of every head in ``outputs``.

        Args:
            outputs: train-mode network output ``{name: (B, C, h, w, d) logits}``.
            target: ``(B, C, H, W, D)`` region masks (any dtype; cast to float) at the
                resolution of ``fused.d0``; coarser heads get a downsampled copy.
            available: ``(B, M)`` bool availability mask (columns in ``modalities`` order),
                or None for "every modality present in every sample".
            present: optional host-side list of modality names present in the batch (it must
                agree with ``available``); avoids reading ``available`` on the host when it
                already lives on the GPU.

        Returns:
            ``NamedLosses`` with rows ``fused.d*`` (depth-weighted) then ``modality.*``.
        """
        rows = self._rows(outputs, target, available, present, weighted=True)
        return NamedLosses([n for n, _ in rows], torch.stack([r for _, r in rows]))

    def head_losses(
        self,
        outputs: Mapping[str, torch.Tensor] | torch.Tensor,
        target: torch.Tensor,
        available: torch.Tensor | None = None,
        present: Iterable[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One unweighted loss per prediction head: ``fused`` (the ``fused.d0`` row) and each modality.

        For held-out losses (Gradient-Blending's OGR). Get every head in eval mode with the
        network's ``forward_heads``; a plain tensor is taken as ``fused.d0``.

        Args:
            outputs: named head logits, or one full-resolution logits tensor.
            target: ``(B, C, H, W, D)`` region masks.
            available: ``(B, M)`` bool mask or None.
            present: optional host-side list of modalities present.

        Returns:
            ``{"fused": 0-d loss, "<modality>": 0-d loss, ...}`` (modalities absent from the
            batch left out; no depth weight applied).
        """
        if isinstance(outputs, torch.Tensor):
            outputs = {f"{FUSED}.d0": outputs}
        heads = {n: t for n, t in outputs.items() if n == f"{FUSED}.d0" or not n.startswith(FUSED)}
        rows = self._rows(heads, target, available, present, weighted=False, fused_depths=(0,))
        return {(FUSED if n.startswith(FUSED) else n.split(".", 1)[1]): r for n, r in rows}


def head_losses(
    outputs: Mapping[str, torch.Tensor] | torch.Tensor,
    target: torch.Tensor,
    available: torch.Tensor | None = None,
    objectives: ObjectiveSet | None = None,
) -> dict[str, torch.Tensor]:
    """Per-head losses with a given (or a default) :class:`ObjectiveSet`; see its ``head_losses``.

    Args:
        outputs: named head logits (``forward_heads``) or one logits tensor (``fused.d0``).
        target: ``(B, C, H, W, D)`` region masks.
        available: ``(B, M)`` bool mask or None.
        objectives: the objective set to use; default ``ObjectiveSet()``.
    """
    return (objectives or ObjectiveSet()).head_losses(outputs, target, available)
