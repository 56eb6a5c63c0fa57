"""Validation: sliding-window Dice / HD95 per region, and per-head losses for OGR.

Empty-region conventions (BraTS, defined in :mod:`segmerge.conventions`): Dice is 1 when prediction and
ground truth are both empty and 0 when exactly one is; HD95 is 0 when both are empty and
``HD95_EMPTY`` (373.13) when exactly one is. Scores come from
:func:`segmerge.conventions.region_scores`, the function ``segmerge evaluate`` uses, with the voxel
spacing of each case's image affine: HD95 is in millimetres, as in evaluation.

Under torch.distributed each rank evaluates its share of the cases and the sums are all-reduced,
so every rank ends with the same numbers (Gradient-Blending's weights must agree on all ranks).

Next to them, the means of the official BraTS 2023+ lesion-wise metrics (lesion-wise Dice, HD95
in mm, lesion F1; :mod:`segmerge.inference.lesionwise`) are logged as
``val/lesion_dice/<r>``, ``val/lesion_hd95/<r>``, ``val/lesion_f1/<r>``: cases where the official
value is NaN (region empty in both) are left out of a mean, as the official parser does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from segmerge.conventions import REGIONS, region_scores, voxel_spacing
from segmerge.engine.dist import all_reduce as _all_reduce
from segmerge.engine.dist import rank_world as _rank_world
from segmerge.inference.lesionwise import lesion_metrics
from segmerge.objectives.names import ogr_head

LESION_MEANS = ("lesion_dice", "lesion_hd95", "lesion_f1")
"""Official lesion-wise metrics averaged at validation (the cheap part of the official set)."""

__all__ = [
    "ValidationResult",
    "region_scores",
    "validate",
    "head_losses",
    "crop_around_tumour",
    "heads_mode",
    "heads_of",
]


@dataclass
class ValidationResult:
    """Mean scores over the validation cases.

    Attributes:
        dice: region -> mean Dice (plus ``mean`` over regions).
        hd95: region -> mean HD95 in mm (plus ``mean``).
        n_cases: number of cases evaluated (all ranks).
        example: one case's ``image``, ``label`` and ``pred`` (CPU tensors) for the montage.
    """

    dice: dict[str, float]
    hd95: dict[str, float]
    n_cases: int
    example: dict[str, torch.Tensor] = field(default_factory=dict)
    lesion: dict[str, dict[str, float]] = field(default_factory=dict)
    """``lesion_dice`` / ``lesion_hd95`` / ``lesion_f1`` -> region -> mean (NaN: no case had it)."""

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        """Flat MLflow keys: ``val/dice/wt`` ... ``val/hd95/mean``, ``val/lesion_f1/et`` ...

        Lesion-wise means that are NaN (the region was empty in every case) are not logged.
        """
        out = {f"{prefix}/dice/{k}": v for k, v in self.dice.items()}
        out.update({f"{prefix}/hd95/{k}": v for k, v in self.hd95.items()})
        for name, values in self.lesion.items():
            out.update({f"{prefix}/{name}/{k}": v for k, v in values.items() if v == v})
        return out


def _available(batch: Mapping, image: torch.Tensor) -> torch.Tensor | None:
    avail = batch.get("available")
    if avail is None:
        return None
    avail = torch.as_tensor(avail, device=image.device).bool()
    return avail.reshape(image.shape[0], -1)


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    cases: Sequence[Mapping] | Iterable[Mapping],
    roi_size: Sequence[int],
    device: torch.device,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    amp: bool = False,
    example_index: int = 0,
) -> ValidationResult:
    """Sliding-window inference over whole validation volumes; Dice and HD95 per region.

    Args:
        model: network; called in eval mode as ``model(x, available)`` -> region logits.
        cases: sequence of transformed cases (``image (4, ...)``, ``label (3, ...)``,
            ``available (4,)``), each with or without a batch dimension; rank r takes cases
            r, r + world, ...
        roi_size: sliding-window size.
        device: where to run.
        sw_batch_size: windows per forward pass.
        overlap: window overlap.
        amp: autocast on CUDA.
        example_index: case kept (on rank 0) for the montage.
    """
    rank, world = _rank_world()
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, len(REGIONS), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    # lesion-wise: per metric and region, the sum of the non-NaN values and their count (CPU)
    lesion_sums = torch.zeros(2, len(LESION_MEANS), len(REGIONS), dtype=torch.float64)
    example: dict[str, torch.Tensor] = {}
    try:
        for i, case in enumerate(cases):
            if i % world != rank:
                continue
            image = torch.as_tensor(case["image"]).to(device)
            label = torch.as_tensor(case["label"]).to(device)
            if image.ndim == 4:
                image, label = image[None], label[None]
            avail = _available(case, image)

            def predictor(x: torch.Tensor, avail: torch.Tensor | None = avail) -> torch.Tensor:
                a = None if avail is None else avail[:1].expand(x.shape[0], -1)
                return model(x, a)

            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                logits = sliding_window_inference(
                    image,
                    list(roi_size),
                    sw_batch_size,
                    predictor,
                    overlap=overlap,
                    mode="gaussian",
                )
            pred = logits.float().sigmoid() > 0.5
            # HD95 in mm, with evaluation's function: the validation grid is the input's voxel
            # grid reoriented to RAS, whose affine the (Meta)tensor image carries
            affine = case["image"].affine if isinstance(case["image"], MetaTensor) else None
            if affine is not None and affine.ndim == 3:
                affine = affine[0]
            spacing = voxel_spacing(affine) if affine is not None else (1.0, 1.0, 1.0)
            dice, hd = region_scores(pred, label > 0.5, spacing)
            sums[0] += dice.sum(0).double()
            sums[1] += hd.sum(0).double()
            count += dice.shape[0]
            # connected components and matching run on the CPU (cc3d, scipy): one copy per case
            for p_case, t_case in zip(pred.cpu().numpy(), (label > 0.5).cpu().numpy()):
                scores = lesion_metrics(p_case, t_case, spacing)
                values = torch.tensor(
                    [[scores[f"{n}_{r}"] for r in REGIONS] for n in LESION_MEANS],
                    dtype=torch.float64,
                )
                seen = ~torch.isnan(values)
                lesion_sums[0] += torch.where(seen, values, torch.zeros_like(values))
                lesion_sums[1] += seen.double()
            if i == example_index and rank == 0:
                example = {
                    "image": image[0].float().cpu(),
                    "label": label[0].float().cpu(),
                    "pred": pred[0].float().cpu(),
                }
    finally:
        model.train(was_training)
    _all_reduce(sums)
    _all_reduce(count)
    lesion_sums = _all_reduce(lesion_sums.to(device)).cpu()
    n = max(float(count), 1.0)  # one sync per validation, not per case
    means = (sums / n).tolist()
    dice_d = dict(zip(REGIONS, means[0]))
    hd_d = dict(zip(REGIONS, means[1]))
    dice_d["mean"] = sum(means[0]) / len(REGIONS)
    hd_d["mean"] = sum(means[1]) / len(REGIONS)
    lesion_mean = (lesion_sums[0] / lesion_sums[1]).tolist()  # 0 / 0 -> NaN: not logged
    lesion: dict[str, dict[str, float]] = {}
    for j, name in enumerate(LESION_MEANS):
        row = dict(zip(REGIONS, lesion_mean[j]))
        seen = [v for v in row.values() if v == v]
        row["mean"] = sum(seen) / len(seen) if seen else float("nan")
        lesion[name] = row
    return ValidationResult(
        dice=dice_d, hd95=hd_d, n_cases=int(count), example=example, lesion=lesion
    )


class heads_mode:  # noqa: N801 - used as a context manager, reads like a function
    """Context: the network returns every head but behaves as in evaluation.

    Uses ``model.forward_heads`` when the network has it; otherwise puts the network in train mode
    with normalisation and dropout layers in eval mode (so no running statistic moves).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._was_training = model.training

    def __enter__(self) -> Callable[..., Mapping[str, torch.Tensor]]:
        fwd = getattr(self.model, "forward_heads", None)
        if callable(fwd):
            self.model.eval()
            return fwd
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.Dropout)):
                m.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self._was_training)


def crop_around_tumour(
    case: Mapping, size: Sequence[int], divisor: int = 1
) -> dict[str, torch.Tensor]:
    """A fixed patch of ``size`` centred on the whole tumour (or the volume centre).

    Deterministic, so the same patches are scored at every validation (OGR needs comparable
    losses). Volumes smaller than ``size`` are zero-padded.
    """
    image = torch.as_tensor(case["image"])
    label = torch.as_tensor(case["label"])
    spatial = image.shape[1:]
    wt = label[0] > 0.5
    if bool(wt.any()):
        centre = [int(idx.float().mean()) for idx in torch.nonzero(wt, as_tuple=True)]
    else:
        centre = [s // 2 for s in spatial]
    slices = []
    pads = []
    for c, s, p in zip(centre, spatial, size):
        start = min(max(c - p // 2, 0), max(s - p, 0))
        stop = min(start + p, s)
        slices.append(slice(start, stop))
        pads.append(p - (stop - start))
    img = image[(slice(None), *slices)]
    lab = label[(slice(None), *slices)]
    if any(pads):
        pad = []
        for extra in reversed(pads):
            pad += [0, extra]
        img = torch.nn.functional.pad(img, pad)
        lab = torch.nn.functional.pad(lab, pad)
    out = {"image": img, "label": lab}
    if case.get("available") is not None:
        out["available"] = torch.as_tensor(case["available"]).bool().reshape(-1)
    return out


@torch.no_grad()
def head_losses(
    model: torch.nn.Module,
    objectives: Callable[..., object],
    patches: Sequence[Mapping[str, torch.Tensor]],
    device: torch.device,
    batch_size: int = 2,
) -> dict[str, float]:
    """Mean loss of every objective (head) over fixed patches, averaged over ranks.

    Args:
        model: network (its ``forward_heads`` or a train-mode call gives the named heads).
        objectives: ``ObjectiveSet``: ``(outputs, target, available) -> NamedLosses``.
        patches: fixed patches from :func:`crop_around_tumour`; rank r takes r, r + world, ...
        device: where to run.
        batch_size: patches per forward pass.

    Returns:
        objective name -> mean loss (every rank gets the same dict).
    """
    rank, world = _rank_world()
    mine = [p for i, p in enumerate(patches) if i % world == rank]
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with heads_mode(model) as forward:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            image = torch.stack([c["image"] for c in chunk]).to(device)
            label = torch.stack([c["label"] for c in chunk]).to(device)
            avail = (
                torch.stack([c["available"] for c in chunk]).to(device)
                if all("available" in c for c in chunk)
                else None
            )
            outputs = forward(image, avail)
            named = objectives(outputs, label, avail)
            for name, loss in zip(named.names, named.losses):
                totals[name] = totals.get(name, 0) + loss.detach().double() * len(chunk)
                counts[name] = counts.get(name, 0) + len(chunk)
    names = sorted(set(totals) | set(_names_of(objectives, model)))
    vec = torch.zeros(2, len(names), dtype=torch.float64, device=device)
    for j, name in enumerate(names):
        if name in totals:
            vec[0, j] = totals[name]
            vec[1, j] = counts[name]
    _all_reduce(vec)
    rows = vec.tolist()  # the one host sync of this call
    return {n: rows[0][j] / rows[1][j] for j, n in enumerate(names) if rows[1][j] > 0}


def heads_of(losses: Mapping[str, float]) -> dict[str, float]:
    """Objective losses -> one loss per prediction head, for OGR.

    The fused head's loss is that of its full-resolution objective ``fused.d0`` (or of the
    full-set subset row); a modality head's is ``modality.<m>``'s (or ``subset.<m>``'s); see
    :func:`segmerge.objectives.names.ogr_head`. Keys are head names: ``fused``, ``flair``...
    """
    out: dict[str, float] = {}
    for name, value in losses.items():
        head = ogr_head(name)
        if head is not None and head not in out:
            out[head] = float(value)
    return out


def _names_of(objectives: object, model: torch.nn.Module) -> list[str]:
    for obj in (objectives, model):
        fn = getattr(obj, "output_names", None) or getattr(obj, "names", None)
        if callable(fn):
            try:
                return list(fn())
            except TypeError:
                continue
        if isinstance(fn, (list, tuple)):
            return list(fn)
    return []
