"""MONAI dictionary transforms for multimodal BraTS cases (the training loader over them is
:class:`segmerge.engine.training_data.TrainingData`).

Input: case dicts from :func:`segmerge.data.load_dataset` (paths keyed by modality name; a
``None`` modality is absent). Output samples::

    {"image": (4, H, W, D) float32 in MODALITIES order, "label": (3, H, W, D) float32 regions in
     REGIONS order (WT, TC, ET), "available": (4,) bool, "case_id": str}

Deterministic steps come first (load, stack, RAS orientation, label check, padding to the patch,
patch-centre indices, per-channel normalisation over brain voxels) so that
:class:`monai.data.CacheDataset` caches them; random steps (tumour-biased patch, flips, intensity
scale/shift, modality dropout) follow. The cached label stays a 1-channel uint8 map (12x smaller
than three float32 region channels); it becomes region channels after the crop. Cache cost per
96³ case: ~14 MB image + 0.9 MB label + ~3 MB patch-centre indices.
"""

from __future__ import annotations

import threading as threading_mod
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)

from segmerge.conventions import MODALITIES, check_et_label, label_set, labels_to_regions

IMAGE, LABEL, AVAILABLE = "image", "label", "available"
FG_INDICES, BG_INDICES = LABEL + "_fg_indices", LABEL + "_bg_indices"  # FgBgToIndicesd's names


def _shape(x) -> str:
    return "×".join(str(int(s)) for s in x.shape[-3:])


class StackModalitiesd(MapTransform):
    """Stack the loaded modality channels into ``image`` (zeros for absent ones) + ``available``.

    Written by hand because MONAI's ``ConcatItemsd`` cannot fill a missing key with zeros or
    record which channels are real. Shapes are checked here so a bad case fails with its name.

    Args:
        modalities: modality keys in channel order (default ``MODALITIES``).
        image_key: output key of the stacked image.
        available_key: output key of the (C,) bool availability mask.
    """

    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        image_key: str = IMAGE,
        available_key: str = AVAILABLE,
    ) -> None:
        super().__init__(keys=list(modalities), allow_missing_keys=True)
        self.modalities, self.image_key, self.available_key = (
            list(modalities),
            image_key,
            available_key,
        )

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        case = d.get("case_id", "?")
        present = [m for m in self.modalities if d.get(m) is not None]
        if not present:
            raise ValueError(
                f"case {case}: no modality available (all of {self.modalities} absent)"
            )
        ref = d[present[0]]
        for m in present[1:]:
            if tuple(d[m].shape[1:]) != tuple(ref.shape[1:]):
                raise ValueError(
                    f"case {case}: {m} has shape {_shape(d[m])} but {present[0]} has {_shape(ref)}"
                )
        chans = [
            torch.as_tensor(d[m])[0]
            if d.get(m) is not None
            else torch.zeros(ref.shape[1:], dtype=torch.float32)
            for m in self.modalities
        ]
        image = torch.stack(chans).float()
        if isinstance(ref, MetaTensor):
            image = MetaTensor(
                image, meta=dict(ref.meta), applied_operations=list(ref.applied_operations)
            )
        for m in self.modalities:
            d.pop(m, None)
        d[self.image_key] = image
        d[self.available_key] = torch.tensor(
            [m in present for m in self.modalities], dtype=torch.bool
        )
        return d


class _LabelTransform(MapTransform):
    """Base of the transforms that read a BraTS label map with a given enhancing-tumour label."""

    def __init__(
        self, keys: KeysCollection = LABEL, et_label: int = 4, allow_missing_keys: bool = True
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.et_label = check_et_label(et_label)


class CheckLabeld(_LabelTransform):
    """Refuse label values outside ``{0, 1, 2, et_label}`` with the case's name.

    Written by hand: MONAI has no label-set check, and a silently accepted 3 in an ET = 4
    dataset would train ET as background.

    Args:
        keys: label key(s).
        et_label: enhancing-tumour label value (4 or 3).
        allow_missing_keys: skip cases without a label (testing data).
        resection_cavity: also accept 4 = resection cavity (BraTS 2024+, et_label 3; the cavity
            is in no region, :func:`segmerge.conventions.labels_to_regions`).
    """

    def __init__(
        self,
        keys: KeysCollection = LABEL,
        et_label: int = 4,
        allow_missing_keys: bool = True,
        resection_cavity: bool = False,
    ) -> None:
        super().__init__(keys, et_label, allow_missing_keys)
        self.resection_cavity = bool(resection_cavity)
        label_set(self.et_label, self.resection_cavity)  # a valid scheme

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        allowed = torch.tensor(label_set(self.et_label, self.resection_cavity))
        for key in self.key_iterator(d):
            values = torch.unique(torch.as_tensor(d[key]))
            bad = values[~torch.isin(values, allowed.to(values.dtype))]
            if bad.numel():
                raise ValueError(
                    f"case {d.get('case_id', '?')}: {key} has values {bad.tolist()} outside "
                    f"{list(label_set(self.et_label, self.resection_cavity))} "
                    f"(et_label={self.et_label}, resection_cavity={self.resection_cavity})"
                )
        return d


class LabelToRegionsd(_LabelTransform):
    """BraTS label map (1, H, W, D) -> float32 region channels (3, H, W, D) in ``REGIONS`` order.

    Uses :func:`segmerge.conventions.labels_to_regions` (MONAI's
    ``ConvertToMultiChannelBasedOnBratsClassesd`` fixes the label values and orders TC, WT, ET).

    Args:
        keys: label key(s).
        et_label: enhancing-tumour label value (4 or 3).
        allow_missing_keys: skip cases without a label.
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            regions = labels_to_regions(torch.as_tensor(lab)[0], self.et_label).float()
            if isinstance(lab, MetaTensor):
                regions = MetaTensor(
                    regions, meta=dict(lab.meta), applied_operations=list(lab.applied_operations)
                )
            d[key] = regions
        return d


class RandModalityDropoutd(RandomizableTransform, MapTransform):
    """With probability ``prob``, keep a random non-empty proper subset of the available channels.

    Every proper non-empty subset of the available modalities is equally likely (at least one
    channel is dropped, at least one kept). Dropped and originally absent channels are set to 0
    on every call, also when no dropout happens, because earlier intensity shifts touch them.
    Written by hand: MONAI has no availability-aware channel dropout.

    Args:
        keys: image key(s) whose channels follow ``available``.
        available_key: key of the (C,) bool mask, updated in place of the old one.
        prob: probability of dropping modalities in a sample.
    """

    def __init__(
        self, keys: KeysCollection = IMAGE, available_key: str = AVAILABLE, prob: float = 0.0
    ) -> None:
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"modality dropout probability must be in [0, 1], got {prob}")
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.available_key = available_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        avail = torch.as_tensor(d[self.available_key], dtype=torch.bool).clone()
        self.randomize(None)
        idx = torch.nonzero(avail).flatten().tolist()
        if self._do_transform and len(idx) > 1:
            # Subset code in [1, 2^k - 2]: bit i keeps available channel idx[i].
            code = int(self.R.randint(1, 2 ** len(idx) - 1))
            for bit, ch in enumerate(idx):
                avail[ch] = bool((code >> bit) & 1)
        d[self.available_key] = avail
        for key in self.key_iterator(d):
            img = d[key]
            d[key] = img * avail.to(img.dtype).view(
                -1, *([1] * (img.ndim - 1))
            )  # out of place: cached data stay intact
        return d


def _load_steps(et_label: int, allow_missing_label: bool, resection_cavity: bool = False) -> list:
    keys = list(MODALITIES)
    return [
        LoadImaged(
            keys=keys,
            image_only=True,
            ensure_channel_first=True,
            allow_missing_keys=True,
            dtype=np.float32,
        ),
        LoadImaged(
            keys=LABEL,
            image_only=True,
            ensure_channel_first=True,
            allow_missing_keys=allow_missing_label,
            dtype=np.uint8,
        ),
        StackModalitiesd(),
        Orientationd(keys=[IMAGE, LABEL], axcodes="RAS", labels=None, allow_missing_keys=True),
        CheckLabeld(LABEL, et_label=et_label, resection_cavity=resection_cavity),
    ]


def _normalise() -> NormalizeIntensityd:
    # Per channel over brain voxels only: skull-stripped background stays exactly 0.
    return NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True)


class _DropNone(MapTransform):
    """Remove ``None`` modality entries so loaders skip them (absent files, ``allow_missing``)."""

    def __init__(self) -> None:
        super().__init__(keys=[*MODALITIES, LABEL], allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        return {k: v for k, v in dict(data).items() if not (k in self.keys and v is None)}


class OneThreadCompose(Compose):
    """``Compose`` that runs its transforms with one torch thread when called in the main thread.

    Patch-sized tensors gain nothing from intra-op threads, and on a busy 2-core machine the
    thread hand-offs dominate: measured 8 ms CPU per 48³ training sample with 1 thread against
    114 ms with 2. With ``num_workers=0`` the loader runs between training steps (never during
    one), so the training step keeps its thread count. Cache-filling threads and loader worker
    processes are left alone (worker processes already use one thread).

    Args:
        *args: as :class:`monai.transforms.Compose`.
        **kwargs: as :class:`monai.transforms.Compose`.
    """

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        n = torch.get_num_threads()
        if n == 1 or threading_mod.current_thread() is not threading_mod.main_thread():
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        torch.set_num_threads(1)
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        finally:
            torch.set_num_threads(n)


def train_transforms(
    patch_size: int | Sequence[int] = 64,
    modality_dropout: float = 0.0,
    et_label: int = 4,
    pos: float = 1.0,
    neg: float = 1.0,
    num_samples: int = 1,
    flip_prob: float = 0.5,
    scale_intensity: float = 0.1,
    shift_intensity: float = 0.1,
    intensity_prob: float = 1.0,
    seed: int | None = 0,
    resection_cavity: bool = False,
) -> Compose:
    """Training pipeline: deterministic prefix (cacheable), then random patch and augmentation.

    Args:
        patch_size: edge (int) or shape of the random patches; smaller volumes are zero-padded.
        modality_dropout: probability that a sample keeps only a random non-empty proper subset
            of its available modalities (``available`` records which).
        et_label: enhancing-tumour label value (4 or 3).
        pos: relative weight of patches centred on tumour (WT) voxels...
        neg: ...versus patches centred anywhere else (``pos=neg=1``: half the patches on tumour).
        num_samples: patches per case per epoch (a case then yields a list of samples).
        flip_prob: probability of a flip along each axis.
        scale_intensity: per-channel intensity scale factor range ``1 ± scale_intensity``.
        shift_intensity: per-channel intensity offset range ``± shift_intensity`` (after z-scoring).
        intensity_prob: probability of each intensity augmentation.
        seed: random state of the pipeline (None leaves MONAI's default).
        resection_cavity: labels use 4 = resection cavity (BraTS 2024+, et_label 3).

    Returns:
        A ``Compose`` producing ``image`` (4, *patch) float32, ``label`` (3, *patch) float32,
        ``available`` (4,) bool and ``case_id``.
    """
    et_label = check_et_label(et_label)
    patch = [int(patch_size)] * 3 if isinstance(patch_size, int) else [int(p) for p in patch_size]
    keys = [IMAGE, LABEL]
    steps = [
        _DropNone(),
        *_load_steps(et_label, allow_missing_label=False, resection_cavity=resection_cavity),
        SpatialPadd(keys=keys, spatial_size=patch),
        # Patch centres, computed once and cached (they cost ~20 % of every random sample
        # otherwise): tumour voxels, and non-tumour voxels inside the brain (raw intensity > 0 in
        # some channel, hence before normalisation).
        FgBgToIndicesd(keys=LABEL, image_key=IMAGE, image_threshold=0.0),
        _normalise(),
        # Plain tensors from here: training needs no affine, and MetaTensor bookkeeping slows
        # every random step.
        EnsureTyped(keys=keys, track_meta=False),
        # --- random part (CacheDataset caches everything above) ---
        RandCropByPosNegLabeld(
            keys=keys,
            label_key=LABEL,
            spatial_size=patch,
            pos=pos,
            neg=neg,
            num_samples=num_samples,
            fg_indices_key=FG_INDICES,
            bg_indices_key=BG_INDICES,
        ),
        DeleteItemsd(keys=[FG_INDICES, BG_INDICES]),
        LabelToRegionsd(LABEL, et_label=et_label),
        *[RandFlipd(keys=keys, prob=flip_prob, spatial_axis=a) for a in range(3)],
        RandScaleIntensityd(
            keys=IMAGE, factors=scale_intensity, prob=intensity_prob, channel_wise=True
        ),
        RandShiftIntensityd(
            keys=IMAGE, offsets=shift_intensity, prob=intensity_prob, channel_wise=True
        ),
        RandModalityDropoutd(IMAGE, prob=modality_dropout),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
    ]
    compose = OneThreadCompose(steps)
    if seed is not None:
        compose.set_random_state(seed=int(seed))
    return compose


def val_transforms(
    et_label: int = 4, require_label: bool = False, resection_cavity: bool = False
) -> Compose:
    """Validation / inference pipeline: whole volumes, deterministic.

    Args:
        et_label: enhancing-tumour label value (4 or 3).
        require_label: fail on cases without a label (testing cases pass through without one).
        resection_cavity: labels use 4 = resection cavity (BraTS 2024+, et_label 3).

    Returns:
        A ``Compose`` producing ``image`` (4, H, W, D) float32 MetaTensor (RAS, with the affine),
        ``label`` (3, H, W, D) float32 when the case has one, ``available`` (4,) bool, ``case_id``.
    """
    et_label = check_et_label(et_label)
    return Compose(
        [
            _DropNone(),
            *_load_steps(
                et_label, allow_missing_label=not require_label, resection_cavity=resection_cavity
            ),
            _normalise(),
            LabelToRegionsd(LABEL, et_label=et_label),
            RandModalityDropoutd(IMAGE, prob=0.0),  # zero absent channels (no-op otherwise)
        ]
    )


def inference_transforms(
    modalities: Sequence[str] = MODALITIES,
    pixdim: Sequence[float] = (0.0, 0.0, 0.0),
    image_key: str = IMAGE,
    available_key: str = AVAILABLE,
) -> Compose:
    """Prediction pipeline, the ``preprocessing`` that ``configs/inference.json`` references.

    Load the sequences a case has (``(X, Y, Z, 1)`` files become one channel), stack them with
    the availability mask (:class:`StackModalitiesd`, as in training), reorient to RAS, resample
    to ``pixdim`` (``0`` keeps an axis's own spacing), z-score each channel over brain voxels (as
    in training). Every spatial step is invertible: the config's ``Invertd`` brings the prediction
    back to the input's voxel grid. The case is validated before (:func:`~segmerge.data.check_case`
    in :meth:`segmerge.inference.BratsPredictor.check_inputs`).

    Args:
        modalities: modality keys in network channel order.
        pixdim: target voxel size in mm per axis (``0``: unchanged).
        image_key: output key of the stacked image.
        available_key: output key of the ``(C,)`` bool availability mask.

    Returns:
        A ``Compose`` turning ``{"case_id", <modality>: path, ...}`` into ``image`` (C, H, W, D)
        float32 MetaTensor and ``available``.
    """
    return Compose(
        [
            LoadImaged(
                keys=list(modalities),
                reader="NibabelReader",
                image_only=True,
                ensure_channel_first=True,
                allow_missing_keys=True,
            ),
            StackModalitiesd(modalities, image_key=image_key, available_key=available_key),
            Orientationd(keys=image_key, axcodes="RAS", labels=None),
            Spacingd(keys=image_key, pixdim=list(pixdim), mode="bilinear"),
            NormalizeIntensityd(keys=image_key, nonzero=True, channel_wise=True),
        ]
    )
