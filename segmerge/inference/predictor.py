"""Predict BraTS label maps in each input's own geometry; one implementation for both entry points.

``python -m monai.bundle run --config_file configs/inference.json ...`` and
``python -m segmerge predict ...`` both build :class:`BratsPredictor` from ``configs/inference.json``.

Per case: read the available sequences (MONAI ``LoadImaged``), stack them with the availability
mask (``segmerge.data.StackModalitiesd``, the training pipeline's own), reorient to RAS and resample to the training spacing, normalise, run sliding-window
inference with gaussian blending, apply the sigmoid, invert the spatial transforms with MONAI's
``Invertd`` (back to the input's voxel grid), threshold the three region channels, convert regions
to BraTS labels, and write uint8 NIfTI with the reference sequence's own header (hence exactly its
shape and affine). MONAI's ``SaveImaged`` is not used to write: it refuses affines whose voxel axes
are permuted relative to world axes (sagittal/coronal acquisitions), see docs/README.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from segmerge.atomic import atomic_destination, inside, write_text_atomic
from segmerge.conventions import MODALITIES, REGIONS, check_et_label, regions_to_labels
from segmerge.data import check_case, load_volume, open_volume
from segmerge.inference.cases import CaseInputs, discover_cases

__all__ = [
    "BratsPredictor",
    "CaseResult",
    "PredictionReport",
    "PredictionFailed",
    "load_weights",
    "atomic_save_nifti",
    "check_device",
    "probabilities_path",
]

logger = logging.getLogger("segmerge.inference")

PROBABILITIES_SUFFIX = "_probabilities"
BACKENDS = ("pytorch", "onnxruntime")
"""Inference backends of :class:`BratsPredictor`."""
AFFINE_TOLERANCE_MM = 1e-3
"""Largest affine difference between two sequences of a case still read as one grid."""


class PredictionFailed(SystemExit):
    """Raised by :meth:`BratsPredictor.raise_on_failures`; a ``SystemExit`` so that the bundle
    command ends with a non-zero status and the summary instead of a traceback."""


def probabilities_path(output_dir: str | Path, case_id: str) -> Path:
    """Where the optional probability map of ``case_id`` is written (inside ``output_dir``)."""
    return inside(output_dir, f"{case_id}{PROBABILITIES_SUFFIX}.nii.gz")


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, refused with a clear message when that device does not exist.

    Raises:
        ValueError: not a device name, CUDA asked for where torch sees none, or a CUDA index
            beyond the visible devices.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1 ...)") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but torch sees no CUDA device (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} requested but torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def atomic_save_nifti(image: nib.Nifti1Image, path: str | Path) -> None:
    """Save a NIfTI image atomically (temporary name ending in ``.nii.gz``, then ``os.replace``)."""
    # nibabel picks compression from the extension, so the temporary name keeps ".nii.gz"
    with atomic_destination(path, suffix=".tmp.nii.gz") as tmp:
        nib.save(image, tmp)


def load_weights(
    network: torch.nn.Module, path: str | Path, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a state dict written by training into ``network`` (in place) and return it.

    Accepts a plain state dict or a checkpoint dict holding it under ``network``, ``model`` or
    ``state_dict``.

    Args:
        network: the module built from the config's ``network_def``.
        path: ``models/model.pt`` or another state-dict file.
        device: where the tensors are mapped while loading.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state dict of this network.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model weights {path} not found: train first (`python -m segmerge train` writes "
            "models/model.pt) or pass --model PATH"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for non-checkpoint files
        raise ValueError(f"{path}: not a readable PyTorch state dict ({err})") from err
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("network", "model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    # Compare keys and shapes first: torch's own message lists every key, unreadable for a user.
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(
        k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or reshaped:
        parts = [
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for what, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", reshaped),
            )
            if keys
        ]
        raise ValueError(
            f"{path}: weights do not fit the network of the bundle config (was it trained with the "
            f"same network_def as configs/train.json?): {'; '.join(parts)}"
        )
    network.load_state_dict(state)
    return network


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class CaseResult:
    """Outcome of one case.

    Attributes:
        case_id: case name.
        status: ``"predicted"``, ``"kept"`` (existing prediction, no ``--overwrite``) or ``"failed"``.
        used: sequences given to the network (``MODALITIES`` order).
        error: why the case failed.
        seconds: wall time split into ``read``, ``inference``, ``write``.
        replaced: why an earlier output of this case was predicted again without ``--overwrite``
            (damaged or incomplete), if it was.
    """

    case_id: str
    status: str
    used: tuple[str, ...] = ()
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    replaced: str | None = None


@dataclass
class PredictionReport:
    """All cases of one run, with a printable summary."""

    output_dir: Path
    results: list[CaseResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CaseResult]:
        """Cases that could not be predicted."""
        return [r for r in self.results if r.status == "failed"]

    def summary(self) -> str:
        """Counts per status, then one line per failure."""
        counts = {
            s: sum(r.status == s for r in self.results) for s in ("predicted", "kept", "failed")
        }
        lines = [
            f"{len(self.results)} case(s): {counts['predicted']} predicted, {counts['kept']} kept "
            f"(existing prediction, use --overwrite to replace), {counts['failed']} failed -> {self.output_dir}"
        ]
        partial = [
            r for r in self.results if r.status == "predicted" and len(r.used) < len(MODALITIES)
        ]
        for r in partial:
            lines.append(f"  {r.case_id}: predicted from {'+'.join(r.used)} only")
        for r in self.results:
            if r.replaced:
                lines.append(f"  {r.case_id}: predicted again, the earlier output was {r.replaced}")
        if self.failures:
            lines.append("failed cases:")
            lines += [f"  {r.case_id}: {r.error}" for r in self.failures]
        return "\n".join(lines)


def _earlier_prediction_problem(case_id: str, output_dir: Path, probabilities: bool) -> str | None:
    """Why the existing outputs of ``case_id`` are not a complete prediction, or ``None``.

    Complete: the sidecar ``.json`` parses and names the label map, the label map passes the
    header check and decompresses entirely to the recorded shape, and the probability map
    exists when this run writes one (``probabilities``). Anything else (a run killed by a full disk between the
    two files, a truncated file) is predicted again rather than kept.
    """
    sidecar_path = inside(output_dir, f"{case_id}.json")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except FileNotFoundError:
        return f"incomplete ({sidecar_path.name} missing)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"incomplete ({sidecar_path.name} unreadable: {type(err).__name__})"
    if not isinstance(sidecar, dict) or sidecar.get("prediction") != f"{case_id}.nii.gz":
        return f"incomplete ({sidecar_path.name} does not describe {case_id}.nii.gz)"
    try:
        labels, _ = load_volume(inside(output_dir, f"{case_id}.nii.gz"))
    except Exception as err:  # nibabel/gzip raise many types for truncated files
        return f"damaged ({case_id}.nii.gz unreadable: {type(err).__name__}: {err})"[:300]
    if list(labels.shape) != list(sidecar.get("shape", labels.shape))[:3]:
        return f"damaged ({case_id}.nii.gz has shape {list(labels.shape)}, sidecar says {sidecar.get('shape')})"
    if probabilities and not probabilities_path(output_dir, case_id).is_file():
        return f"incomplete ({probabilities_path(output_dir, case_id).name} missing)"
    return None

def _kept_sequences(case: CaseInputs, output_dir: Path) -> list[str]:
    try:
        used = json.loads(inside(output_dir, f"{case.case_id}.json").read_text())
        return [m for m in MODALITIES if m in used.get("sequences_used", [])]
    except (OSError, ValueError, AttributeError):
        return [m for m in MODALITIES if m in case.images]


class BratsPredictor:
    """Sliding-window BraTS prediction written in each input's own geometry.

    Args:
        network: module with ``forward(x, available)`` returning ``(B, 3, H, W, D)`` region logits
            in eval mode.
        preprocessing: MONAI dict transform turning ``{"case_id", <modality>: path, ...}`` into
            ``{"image": MetaTensor (4, H, W, D), "available": (4,) bool}``; its spatial transforms
            are inverted by ``postprocessing``.
        inferer: MONAI inferer (``SlidingWindowInferer`` with ``mode="gaussian"`` in the config).
        postprocessing: MONAI dict transform applied to ``{"pred": logits (3, ...), "image": ...}``
            that returns region probabilities in the input's voxel grid (``Activationsd`` +
            ``Invertd`` in the config).
        model_path: state dict to load into ``network``; ``None`` keeps the network as given.
        device: where the network runs (``"cpu"``, ``"cuda:0"``, a ``torch.device``).
        et_label: label written for enhancing tumour (4 for BraTS <= 2022, 3 for 2023+).
        threshold: probability above which a region voxel is on.
        probabilities: also write ``<case>_probabilities.nii.gz`` (float32, last axis = regions).
        overwrite: replace existing predictions (otherwise they are kept and the case skipped).
        image_key: key of the stacked image.
        pred_key: key of the prediction.
        backend: ``"pytorch"`` or ``"onnxruntime"`` (CPU only: the network, weights loaded, is
            exported once to ONNX with its availability input, :mod:`segmerge.inference.onnx`,
            and each window runs in ONNX Runtime).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        preprocessing: Callable[[dict], dict],
        inferer: Inferer,
        postprocessing: Callable[[dict], dict],
        model_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        et_label: int = 4,
        threshold: float = 0.5,
        probabilities: bool = False,
        overwrite: bool = False,
        image_key: str = "image",
        pred_key: str = "pred",
        backend: str = "pytorch",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.device = check_device(device)
        self.network = network.to(self.device)
        self.model_path = Path(model_path) if model_path is not None else None
        if self.model_path is not None:
            load_weights(self.network, self.model_path, self.device)
        self.network.eval()
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.et_label = check_et_label(et_label)
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1), got {threshold!r}")
        self.threshold = float(threshold)
        self.probabilities = bool(probabilities)
        self.overwrite = bool(overwrite)
        self.image_key = image_key
        self.pred_key = pred_key
        self.last_report: PredictionReport | None = None
        self._sha: str | None = None
        self.backend = backend
        self._net: Callable[..., torch.Tensor] = self.network
        if backend == "onnxruntime":
            if self.device.type != "cpu":
                raise ValueError(
                    f"backend onnxruntime runs on the CPU, got device {self.device} (use --device cpu)"
                )
            from segmerge.inference.onnx import OnnxRuntimeNetwork, export_onnx

            size = int(np.min(getattr(inferer, "roi_size", None) or [32]))
            self._net = OnnxRuntimeNetwork(export_onnx(self.network, example_size=size))

    # -- one case, in steps that evaluation reuses ------------------------------------------------
    def check_inputs(self, case: CaseInputs) -> nib.Nifti1Image:
        """Validate ``case`` and return the reference image (first available sequence).

        The check is :func:`segmerge.data.check_case`, the one ``check-data`` and training run
        (header against file size, 3-D or ``(X, Y, Z, 1)``, one grid, finite and non-constant
        intensities); labels are not read.

        Raises:
            ValueError: every problem of the case, each naming the file and the rule.
        """
        if case.problem:
            raise ValueError(case.problem)
        problems = check_case(
            case.item, "testing", self.et_label, True, AFFINE_TOLERANCE_MM, labels=False
        )
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))
        ref_key = next(m for m in MODALITIES if m in case.images)
        return open_volume(case.images[ref_key])

    def prepare(self, case: CaseInputs) -> dict[str, Any]:
        """Load and preprocess the sequences of ``case`` (network-space image + availability)."""
        data: dict[str, Any] = {"case_id": case.case_id}
        data.update({k: str(v) for k, v in case.images.items()})
        try:
            return self.preprocessing(data)
        except Exception as err:
            # MONAI wraps transform errors in a long chain; keep the innermost, readable cause
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            reason = f"{type(cause).__name__}: {cause}".rstrip(": ")  # a bare MemoryError has no text
            raise ValueError(
                f"case {case.case_id}: cannot read/preprocess inputs: {reason}"
            ) from err

    @torch.no_grad()
    def infer(self, data: dict[str, Any], use: Sequence[str] | None = None) -> torch.Tensor:
        """Region probabilities ``(3, H, W, D)`` in the input's voxel grid.

        Args:
            data: output of :meth:`prepare`.
            use: restrict the network to these sequences (others zeroed and marked unavailable);
                ``None`` uses every sequence the case has.
        """
        image: MetaTensor = data[self.image_key]
        available = torch.as_tensor(data["available"], dtype=torch.bool).clone()
        x = image.as_tensor().clone()
        if use is not None:
            unknown = sorted(set(use) - set(MODALITIES))
            if unknown:
                raise ValueError(f"unknown sequence(s) {unknown}; valid: {', '.join(MODALITIES)}")
            keep = torch.tensor([m in use for m in MODALITIES])
            available &= keep
            x[~keep] = 0.0
        if not bool(available.any()):
            raise ValueError(
                f"case {data.get('case_id', '?')}: none of the requested sequences {use} is available"
            )
        x = x.unsqueeze(0).to(self.device)
        mask = available.unsqueeze(0).to(self.device)

        def forward(patch: torch.Tensor) -> torch.Tensor:
            # The sliding window batches sw_batch_size patches of the same case together, so the
            # case's availability row is repeated to the patch batch size.
            return self._net(patch, mask.expand(patch.shape[0], -1))

        logits = self.inferer(x, forward)
        pred = MetaTensor(logits[0].float().cpu(), meta=dict(image.meta))
        # Invertd reads the spatial transforms applied to the image from data[image_key]
        post = self.postprocessing({self.pred_key: pred, self.image_key: image})
        return torch.as_tensor(post[self.pred_key])

    def to_labels(self, probabilities: torch.Tensor) -> np.ndarray:
        """Threshold region probabilities and convert to a uint8 BraTS label map."""
        regions = (probabilities > self.threshold).cpu().numpy()
        return regions_to_labels(regions, self.et_label)

    def predict_case(self, case: CaseInputs, output_dir: str | Path) -> CaseResult:
        """Predict one case into ``output_dir``; never raises for problems of the case itself."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        seconds: dict[str, float] = {}
        replaced = None
        try:
            target = inside(output_dir, f"{case.case_id}.nii.gz")
            if target.exists() and not self.overwrite:
                replaced = _earlier_prediction_problem(case.case_id, output_dir, self.probabilities)
                if replaced is None:
                    return CaseResult(case.case_id, "kept", tuple(_kept_sequences(case, output_dir)))
                logger.warning("%s: earlier output %s: predicting again", case.case_id, replaced)
            t0 = time.perf_counter()
            ref = self.check_inputs(case)
            data = self.prepare(case)
            t1 = time.perf_counter()
            probs = self.infer(data)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # honest timing split: wait for the GPU here
            t2 = time.perf_counter()
            used = tuple(m for m, a in zip(MODALITIES, data["available"].tolist()) if a)
            self._write(case, ref, probs, used, output_dir)
            t3 = time.perf_counter()
            seconds = {"read": t1 - t0, "inference": t2 - t1, "write": t3 - t2}
        except Exception as err:  # one bad case must not stop the others; reported in the summary
            logger.error("%s: failed: %s", case.case_id, err)
            return CaseResult(
                case.case_id, "failed", error=str(err), seconds=seconds, replaced=replaced
            )
        logger.info(
            "%s: predicted from %s in %.2f s -> %s",
            case.case_id,
            "+".join(used),
            sum(seconds.values()),
            target,
        )
        return CaseResult(case.case_id, "predicted", used, seconds=seconds, replaced=replaced)

    def _write(
        self,
        case: CaseInputs,
        ref: nib.Nifti1Image,
        probs: torch.Tensor,
        used: Sequence[str],
        output_dir: Path,
    ) -> None:
        labels = self.to_labels(probs)
        grid = tuple(ref.shape[:3])  # an (X, Y, Z, 1) input gets an (X, Y, Z) label map
        if labels.shape != grid:
            raise RuntimeError(
                f"case {case.case_id}: prediction has shape {labels.shape} but the input has {ref.shape} "
                "(spatial inversion failed)"
            )
        # The reference sequence's header (copied) carries its exact sform/qform: passing affine=None
        # keeps those fields as they are instead of re-deriving them, so the affine reads back equal.
        header = ref.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_data_shape(grid)
        header["descrip"] = b"segmerge BraTS labels"
        atomic_save_nifti(
            nib.Nifti1Image(labels, None, header), inside(output_dir, f"{case.case_id}.nii.gz")
        )
        if self.probabilities:
            prob_header = ref.header.copy()
            prob_header.set_data_dtype(np.float32)
            prob_header.set_data_shape((*grid, len(REGIONS)))
            prob_header["descrip"] = ("segmerge region probabilities " + ",".join(REGIONS)).encode()
            volume = np.moveaxis(probs.cpu().numpy().astype(np.float32), 0, -1)
            atomic_save_nifti(
                nib.Nifti1Image(volume, None, prob_header),
                probabilities_path(output_dir, case.case_id),
            )
        sidecar = {
            "case_id": case.case_id,
            "prediction": f"{case.case_id}.nii.gz",
            "sequences_used": list(used),
            "sequences_missing": [m for m in MODALITIES if m not in used],
            "inputs": {k: str(v) for k, v in case.images.items()},
            "et_label": self.et_label,
            "threshold": self.threshold,
            "regions": list(REGIONS),
            "probabilities": probabilities_path(output_dir, case.case_id).name
            if self.probabilities
            else None,
            "model": str(self.model_path) if self.model_path else None,
            "model_sha256": self._model_sha256(),
            "shape": list(grid),
        }
        write_text_atomic(
            inside(output_dir, f"{case.case_id}.json"), json.dumps(sidecar, indent=2) + "\n"
        )

    def _model_sha256(self) -> str | None:
        if self.model_path is None:
            return None
        if self._sha is None:  # once per predictor, not once per case
            self._sha = _sha256(self.model_path)
        return self._sha

    # -- a whole dataset --------------------------------------------------------------------------
    def predict_dataset(self, dataset_dir: str | Path, output_dir: str | Path) -> PredictionReport:
        """Predict every case of a BraTS folder or datalist into ``output_dir``.

        Cases that fail are reported and skipped; :meth:`raise_on_failures` (the bundle's
        ``finalize``) turns them into a non-zero exit status after the others are written.
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        cases = discover_cases(dataset_dir, exclude=[output_dir])
        logger.info(
            "predicting %d case(s) from %s on %s with weights %s",
            len(cases),
            dataset_dir,
            self.device,
            self.model_path if self.model_path else "as given (no model_path)",
        )
        report = PredictionReport(output_dir)
        for case in cases:
            report.results.append(self.predict_case(case, output_dir))
        self.last_report = report
        logger.info("%s", report.summary())  # the one summary (the CLI does not print it again)
        return report

    def raise_on_failures(self) -> None:
        """Raise :class:`PredictionFailed` (exit status 1) if the last run had failed cases."""
        if self.last_report is not None and self.last_report.failures:
            raise PredictionFailed(
                f"{len(self.last_report.failures)} case(s) failed:\n"
                + "\n".join(f"  {r.case_id}: {r.error}" for r in self.last_report.failures)
            )
