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

Subset rows (``subsets=``, GMD's objectives): one row per modality subset S, the loss of the
prediction fused from S alone, ``z_S = sum_{m in S} a_m z_m / max(1, sum_{m in S} a_m)`` (the
mean of the *available* per-modality logits of S, ``a`` the availability mask), at each chosen
depth. The per-modality logits are the network's ``modality.<m>[.d<l>]`` outputs, computed once
per forward; each subset is re-fused from them (partial sums shared between subsets), never by
another forward. A feature-fusion network (``SharedModalityUNet(fusion="features")``) returns a
``SubsetHeads`` dict instead: each subset's row is the loss of its ``subset_logits`` (the shared
decoder on the masked mean of S's encoder features), one decoder pass per subset, the encoders
not rerun. ``subsets="all"`` gives the 2^M - 1 subsets, ``"singles+full"`` the M singletons
and the full set, an int k draws k of the proper subsets per call plus the full set (see
:meth:`ObjectiveSet.draw`). Rows are named ``subset.flair+t1ce`` (depth 0), ``subset.t2.d1``...
(:mod:`segmerge.objectives.names`). In subset mode the fused rows are kept only at depths without
subset rows (``fused=None``), since for a logit-fusion network ``fused.d<l>`` is the full set's
subset row; a network with its own fused decoder (``MultiModalDSNet``) sets ``fused=True``.

Missing modalities: a modality absent from every sample of the batch has no row (the names
say which rows exist); likewise a subset none of whose modalities is in the batch. A modality present in only some samples is averaged over those samples
only (a masked mean, no branching on tensor values). Fused rows average over all samples: the
fused path handles missing inputs itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from segmerge.conventions import MODALITIES
from segmerge.objectives._subsets import SubsetDraws, fused_subsets
from segmerge.objectives.losses import RESIZE_MODES, RegionLoss, resize_target
from segmerge.objectives.names import (
    FUSED,
    MODALITY,
    SUBSET,
    check_modality_names,
    format_objective,
    modality_subsets,
    parse_objective,
    suggest,
)

__all__ = ["DEPTH_WEIGHTINGS", "SUBSET_CHOICES", "NamedLosses", "ObjectiveSet", "head_losses"]

DEPTH_WEIGHTINGS = ("equal", "nnunet")
SUBSET_CHOICES = ("all", "singles+full")
"""Named subset selections; an int k (draw k proper subsets per step plus the full set) too."""


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


# ---------------------------------------------------------------------- argument checks
def _check_subsets(
    subsets: str | int | None, modalities: Sequence[str], n_proper: int
) -> str | int | None:
    """``subsets=`` checked (a digit string taken as its int)."""
    if isinstance(subsets, str) and subsets.isdigit():
        subsets = int(subsets)
    if subsets is None or subsets in SUBSET_CHOICES:
        pass
    elif isinstance(subsets, int) and not isinstance(subsets, bool):
        if not 1 <= subsets <= n_proper:
            raise ValueError(
                f"subsets={subsets!r}: an int k must be between 1 and {n_proper} (the proper "
                f"non-empty subsets of {len(modalities)} modalities); use 'all' for all"
            )
    else:
        raise ValueError(
            f"subsets must be None, one of {SUBSET_CHOICES} or an int k, got {subsets!r}"
            + suggest(str(subsets), SUBSET_CHOICES)
        )
    return subsets


def _check_subset_depths(subset_depths: Sequence[int] | None) -> tuple[int, ...] | None:
    """``subset_depths=`` checked and sorted."""
    if subset_depths is None:
        return None
    depths = tuple(int(d) for d in subset_depths)
    if not depths or any(d < 0 for d in depths) or len(set(depths)) != len(depths):
        raise ValueError(f"subset_depths must list distinct depths >= 0, got {subset_depths!r}")
    return tuple(sorted(depths))


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(seed)


def _check_depth_weights(depth_weights: str | Sequence[float]) -> str | tuple[float, ...]:
    """``depth_weights=`` checked: a name of :data:`DEPTH_WEIGHTINGS` or a tuple of floats."""
    if isinstance(depth_weights, str):
        if depth_weights not in DEPTH_WEIGHTINGS:
            raise ValueError(
                f"depth_weights must be one of {DEPTH_WEIGHTINGS} or a list of floats, "
                f"got {depth_weights!r}" + suggest(depth_weights, DEPTH_WEIGHTINGS)
            )
        return depth_weights
    weights = tuple(float(w) for w in depth_weights)
    if not weights or any(w < 0 for w in weights):
        raise ValueError(
            f"explicit depth_weights must be non-negative floats, got {depth_weights!r}"
        )
    return weights


def _check_target_resize(target_resize: str) -> str:
    if target_resize not in RESIZE_MODES:
        raise ValueError(
            f"target_resize must be one of {RESIZE_MODES}, got {target_resize!r}"
            + suggest(target_resize, RESIZE_MODES)
        )
    return target_resize


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
        subsets: None (rows per head: ``fused.d*``, ``modality.*``), ``"all"`` (every non-empty
            modality subset), ``"singles+full"`` (each modality alone and all together) or an
            int k (k proper subsets drawn per training call, plus the full set). Default None.
        subset_depths: depths that get subset rows (None: every depth at which all modalities
            have a head). Default None.
        fused: whether ``fused.d*`` heads give rows: True, False, or None (every fused head
            without subsets; with subsets only at depths that have no subset rows).
        seed: seed of the subset draws (int ``subsets``); identical on every rank.
    """

    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        depth_weights: str | Sequence[float] = "equal",
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        target_resize: str = "nearest",
        subsets: str | int | None = None,
        subset_depths: Sequence[int] | None = None,
        fused: bool | None = None,
        seed: int = 0,
    ) -> None:
        self.modalities = check_modality_names(modalities)
        self._all_subsets = modality_subsets(self.modalities)
        self.subsets = _check_subsets(subsets, self.modalities, len(self._all_subsets) - 1)
        self.subset_depths = _check_subset_depths(subset_depths)
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, true or false, got {fused!r}")
        self.fused = fused
        self._draws = SubsetDraws(self._all_subsets, _check_seed(seed))
        self.depth_weights = _check_depth_weights(depth_weights)
        self.target_resize = _check_target_resize(target_resize)
        self.loss = RegionLoss(dice_weight=dice_weight, bce_weight=bce_weight)

    def __repr__(self) -> str:
        return (
            f"ObjectiveSet(modalities={self.modalities!r}, depth_weights={self.depth_weights!r}, "
            f"dice_weight={self.loss.dice_weight!r}, bce_weight={self.loss.bce_weight!r}, "
            f"target_resize={self.target_resize!r}, subsets={self.subsets!r}, "
            f"subset_depths={self.subset_depths!r}, fused={self.fused!r}, seed={self.seed!r})"
        )

    # ------------------------------------------------------------------ subsets
    def subset_choice(self, draw: bool = False) -> list[tuple[str, ...]]:
        """The subsets that get rows, in canonical order (:func:`modality_subsets`).

        Args:
            draw: for an int ``subsets``: draw k proper subsets (advancing :attr:`draws`);
                when False every subset is returned (held-out losses).
        """
        if self.subsets is None:
            return []
        if self.subsets == "all" or (isinstance(self.subsets, int) and not draw):
            return list(self._all_subsets)
        if self.subsets == "singles+full":
            return [s for s in self._all_subsets if len(s) in (1, len(self.modalities))]
        return self.draw()

    def draw(self) -> list[tuple[str, ...]]:
        """Draw k proper subsets plus the full set for the next training call.

        Draw n uses a generator seeded from ``(seed, n)`` only, so every rank (same seed, same
        number of calls) draws the same subsets, and restoring :meth:`state_dict` (the count)
        continues the sequence exactly (see :class:`SubsetDraws`).
        """
        return self._draws.draw(int(self.subsets))  # type: ignore[arg-type]

    @property
    def draws(self) -> int:
        """Subset draws done so far (the checkpointable state)."""
        return self._draws.count

    @draws.setter
    def draws(self, value: int) -> None:
        self._draws.count = value

    @property
    def seed(self) -> int:
        """Seed of the subset draws (fixed at construction)."""
        return self._draws.seed

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: the number of subset draws done (plain ints)."""
        return self._draws.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty dict resets the draws)."""
        self._draws.load_state_dict(state)

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
            return _check_present(present, self.modalities)
        if available is None:
            return list(self.modalities)
        _check_available(available, None, self.modalities)
        # The one host-side read of the mask per step: decides which rows exist.
        flags = available.bool().any(dim=0).tolist()
        return [m for m, on in zip(self.modalities, flags) if on]

    def _rows(
        self,
        outputs: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        available: torch.Tensor | None,
        present: Iterable[str] | None,
        weighted: bool,
        fused_depths: Sequence[int] | None = None,
        use_subsets: bool = True,
        draw: bool = False,
    ) -> list[tuple[str, torch.Tensor]]:
        if not outputs:
            raise ValueError("outputs is empty: expected named heads such as 'fused.d0'")
        target = _check_target(outputs, target)
        depths, mod_depths = _split_outputs(outputs, self.modalities)
        if fused_depths is not None:
            depths = [d for d in depths if d in fused_depths]
            mod_depths = {d: v for d, v in mod_depths.items() if d in fused_depths}
        if available is not None:
            _check_available(available, target.shape[0], self.modalities)
        present_mods: set[str] = set(self.modalities)
        if mod_depths:  # no modality heads (early fusion): no need to read the mask at all
            present_mods = set(self.present_modalities(available, present))

        subsets: list[tuple[str, ...]] = []
        sub_depths: list[int] = []
        if use_subsets and self.subsets is not None:
            sub_depths = _subset_row_depths(mod_depths, self.modalities, self.subset_depths)
            if sub_depths:
                subsets = [s for s in self.subset_choice(draw) if present_mods.intersection(s)]
        if self.fused is False:
            depths = []
        elif self.fused is None and use_subsets and self.subsets is not None:
            depths = [d for d in depths if d not in sub_depths]

        per_sample = _per_sample_loss(self.loss, target, self.target_resize)
        column = partial(_column, available, self.modalities)
        rows: list[tuple[str, torch.Tensor]] = []
        weights = self.depth_weight_values(depths) if weighted else [1.0] * len(depths)
        for d, w in zip(depths, weights):
            row = per_sample(outputs[format_objective(FUSED, (), d)]).mean()
            rows.append((f"{FUSED}.d{d}", _weighted(row, w)))
        if subsets:
            rows += self._subset_rows(outputs, subsets, sub_depths, per_sample, column, weighted)
            return rows
        mod_weights = dict(zip(mod_depths, self.depth_weight_values(list(mod_depths))))
        for d, mods in mod_depths.items():
            w = mod_weights[d] if weighted else 1.0
            for m in mods:
                if m not in present_mods:
                    continue
                name = format_objective(MODALITY, (m,), d)
                loss = per_sample(outputs[name])
                rows.append((name, _weighted(_masked_mean(loss, column(m, loss.device)), w)))
        return rows

    def _subset_rows(
        self,
        outputs: Mapping[str, torch.Tensor],
        subsets: list[tuple[str, ...]],
        depths: Sequence[int],
        per_sample: Callable[[torch.Tensor], torch.Tensor],
        column: Callable[[str, torch.device], torch.Tensor | None],
        weighted: bool,
    ) -> list[tuple[str, torch.Tensor]]:
        """Rows ``subset.<S>[.d<l>]``: the loss of the prediction fused from S (module docstring)."""
        rows: list[tuple[str, torch.Tensor]] = []
        weights = self.depth_weight_values(list(depths)) if weighted else [1.0] * len(depths)
        for d, w in zip(depths, weights):
            z = outputs[format_objective(MODALITY, (self.modalities[0],), d)]
            cols = {m: column(m, z.device) for m in self.modalities}
            for subset, (fused, count) in fused_subsets(outputs, subsets, d, cols).items():
                # samples where at least one modality of S is available (all without a mask)
                row = _masked_mean(per_sample(fused), None if count is None else count > 0)
                name = format_objective(SUBSET, subset, d, self.modalities)
                rows.append((name, _weighted(row, w)))
        return rows

    # ------------------------------------------------------------------ public API
    def __call__(
        self,
        outputs: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        available: torch.Tensor | None = None,
        present: Iterable[str] | None = None,
        draw: bool | None = None,
    ) -> NamedLosses:
        """Loss rows of every head in ``outputs`` (or of every subset, with ``subsets``).

        Args:
            outputs: train-mode network output ``{name: (B, C, h, w, d) logits}``.
            target: ``(B, C, H, W, D)`` region masks (any dtype; cast to float) at the
                resolution of ``fused.d0``; coarser heads get a downsampled copy.
            available: ``(B, M)`` bool availability mask (columns in ``modalities`` order),
                or None for "every modality present in every sample".
            present: optional host-side list of modality names present in the batch (it must
                agree with ``available``); avoids reading ``available`` on the host when it
                already lives on the GPU.
            draw: with an int ``subsets``: whether this call draws its k subsets (advancing
                the draw count) or evaluates every subset. None: draw when autograd is
                enabled (a training step), not under ``torch.no_grad`` (held-out losses), so
                validation never moves the draw sequence.

        Returns:
            ``NamedLosses`` with rows ``fused.d*`` (depth-weighted) then ``modality.*``, or,
            with ``subsets``, the kept ``fused.d*`` rows then ``subset.*`` depth by depth.
        """
        if draw is None:
            draw = torch.is_grad_enabled()
        rows = self._rows(outputs, target, available, present, weighted=True, draw=bool(draw))
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
        heads = {}
        for n, t in outputs.items():
            parsed = parse_objective(n)
            if parsed.depth == 0 and parsed.kind != SUBSET:  # not a decoded subset's head
                heads[n] = t
        rows = self._rows(
            heads, target, available, present, weighted=False, fused_depths=(0,),
            use_subsets=False,
        )  # fmt: skip
        return {(FUSED if n.startswith(FUSED) else n.split(".", 1)[1]): r for n, r in rows}


def _check_present(present: Iterable[str], modalities: Sequence[str]) -> list[str]:
    """``present=`` checked against ``modalities``, returned in their order."""
    names = set(present)
    unknown = names - set(modalities)
    if unknown:
        bad = sorted(unknown)[0]
        raise ValueError(
            f"present lists unknown modality {bad!r}; valid: {modalities}"
            + suggest(bad, modalities)
        )
    return [m for m in modalities if m in names]


def _check_available(available: torch.Tensor, batch: int | None, modalities: Sequence[str]) -> None:
    ok = available.dim() == 2 and available.shape[1] == len(modalities)
    if batch is not None:
        ok = ok and available.shape[0] == batch
    if not ok:
        raise ValueError(
            f"available must be (B, {len(modalities)}) with columns {modalities}"
            f"{'' if batch is None else f' and B = {batch}'}, got shape {tuple(available.shape)}"
        )


def _split_outputs(
    outputs: Mapping[str, torch.Tensor], modalities: Sequence[str]
) -> tuple[list[int], dict[int, list[str]]]:
    """Fused depths (sorted) and, per depth, the modalities (in order) with a head there."""
    depths: list[int] = []
    mods: dict[int, set[str]] = {}
    for name in outputs:
        try:
            parsed = parse_objective(name)
        except ValueError as err:
            raise ValueError(f"output {name!r}: {err}") from None
        if parsed.kind == FUSED:
            depths.append(parsed.depth)
        elif parsed.kind == SUBSET and hasattr(outputs, "subset_logits"):
            continue  # a feature-fusion network's subset heads decoded by an earlier call
        elif parsed.kind == MODALITY:
            m = parsed.modalities[0]
            if m not in modalities:
                raise ValueError(
                    f"output {name!r} names a modality outside {modalities}"
                    + suggest(m, modalities)
                )
            mods.setdefault(parsed.depth, set()).add(m)
        else:
            raise ValueError(
                f"output {name!r}: networks output 'fused.d<l>' and 'modality.<m>[.d<l>]' "
                "heads; subset rows are made by the objective set"
            )
    ordered = {d: [m for m in modalities if m in mods[d]] for d in sorted(mods)}
    return sorted(depths), ordered


def _check_target(outputs: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
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


# ---------------------------------------------------------------------- row building
def _subset_row_depths(
    mod_depths: Mapping[int, Sequence[str]],
    modalities: Sequence[str],
    subset_depths: Sequence[int] | None,
) -> list[int]:
    """Depths that get subset rows: ``subset_depths``, or every depth with a head of every
    modality; an asked depth without all heads is an error."""
    complete = [d for d, v in mod_depths.items() if len(v) == len(modalities)]
    if subset_depths is None:
        return complete
    missing = [d for d in subset_depths if d not in complete]
    if missing:
        raise ValueError(
            f"subset_depths asks for depth {missing[0]} but the outputs have no "
            f"'modality.<m>' head of every modality there (depths with all: {complete})"
        )
    return list(subset_depths)


def _per_sample_loss(
    loss: RegionLoss, target: torch.Tensor, mode: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample ``loss`` of logits against ``target`` resized to their size (``mode``), one
    resize per distinct head size."""
    resized: dict[tuple[int, ...], torch.Tensor] = {}

    def per_sample(logits: torch.Tensor) -> torch.Tensor:
        size = tuple(logits.shape[2:])
        if size not in resized:
            resized[size] = resize_target(target, size, mode)
        return loss(logits, resized[size])

    return per_sample


def _masked_mean(loss: torch.Tensor, col: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-sample ``loss`` over the samples in bool ``col`` (all samples for None)."""
    if col is None:
        return loss.mean()
    # Masked mean over the samples in ``col``: torch.where (not a product) so a
    # non-finite loss of an excluded sample cannot leak in; clamp avoids 0/0.
    total = torch.where(col, loss, torch.zeros_like(loss)).sum()
    return total / col.sum().clamp(min=1).to(loss.dtype)


def _column(
    available: torch.Tensor | None, modalities: Sequence[str], m: str, device: torch.device
) -> torch.Tensor | None:
    """Modality ``m``'s bool availability column on ``device`` (None without a mask)."""
    if available is None:
        return None
    return available[:, modalities.index(m)].to(device=device, dtype=torch.bool)


def _weighted(row: torch.Tensor, w: float) -> torch.Tensor:
    return row * w if w != 1.0 else row


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
