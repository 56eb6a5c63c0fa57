"""ONNX export of a segmerge network with its availability input, and ONNX Runtime inference.

``python -m monai.bundle onnx_export network_def ...`` exports ``network_def`` called with the image
alone: that graph treats all four sequences as present (MONAI's exporter feeds the network one
random input). :func:`export_onnx` exports the network with both of its inputs, so any subset of
sequences works exactly as in PyTorch:

* ``image``: ``(B, 4, H, W, D)`` float32, channels in ``MODALITIES`` order (absent ones zero);
* ``available``: ``(B, 4)`` bool, which sequences are real;
* output ``pred``: ``(B, 3, H, W, D)`` region logits (``wt``, ``tc``, ``et``).

Batch and spatial sizes are dynamic (any size the network takes, e.g. multiples of 16).
:class:`OnnxRuntimeNetwork` runs such a model with ONNX Runtime's CPU provider and is called like
the PyTorch network (``net(x, available)``), which is how ``predict --backend onnxruntime`` uses it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segmerge.conventions import MODALITIES, REGIONS

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "AvailabilityWrapper",
    "OnnxRuntimeNetwork",
    "export_onnx",
]

INPUT_NAMES = ("image", "available")
OUTPUT_NAMES = ("pred",)
_DYNAMIC_AXES = {
    "image": {0: "batch", 2: "h", 3: "w", 4: "d"},
    "available": {0: "batch"},
    "pred": {0: "batch", 2: "h", 3: "w", 4: "d"},
}


class AvailabilityWrapper(nn.Module):
    """``forward(image, available)`` with both inputs required (the exported signature).

    Args:
        network: a segmerge network (``forward(x, available=None)`` -> region logits in eval mode).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Region logits of ``image`` given the availability mask."""
        return self.network(image, available.bool())


def export_onnx(
    network: nn.Module,
    path: str | Path | None = None,
    example_size: int = 32,
    opset_version: int | None = None,
) -> bytes:
    """Export ``network`` (eval mode, CPU copy) to ONNX with the inputs ``image`` and ``available``.

    Uses PyTorch's TorchScript-based exporter (``dynamo=False``): a few seconds for segmerge's
    networks where the ``torch.export`` path takes over a minute, with the same operators.

    Args:
        network: the PyTorch network (weights loaded).
        path: where to write the ``.onnx`` file; ``None`` only returns the bytes.
        example_size: edge of the cubic example input used for tracing (a size the network takes).
        opset_version: ONNX opset; ``None`` for PyTorch's default.

    Returns:
        The serialised ONNX model.
    """
    was_training = network.training
    param = next(network.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    module = AvailabilityWrapper(network).cpu().eval()
    image = torch.zeros(1, len(MODALITIES), example_size, example_size, example_size)
    available = torch.ones(1, len(MODALITIES), dtype=torch.bool)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # the TorchScript exporter warns about its deprecation and traced Python branches on
            # shapes; the parity test (tests/test_onnx.py) checks the result on other shapes.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (image, available),
                buffer,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=_DYNAMIC_AXES,
                opset_version=opset_version,
                dynamo=False,
            )
    finally:
        network.to(device).train(was_training)
    data = buffer.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data


class OnnxRuntimeNetwork:
    """An ONNX model from :func:`export_onnx` run by ONNX Runtime on the CPU, called like the net.

    Args:
        model: serialised ONNX model (bytes) or the path of a ``.onnx`` file.
        threads: intra-op threads (default: ``torch.get_num_threads()``, as PyTorch would use).
        require_available: refuse a graph without the ``available`` input (one exported by
            ``monai.bundle onnx_export``, or of a network that ignores availability); with
            ``False`` such a graph is fed the image alone.
    """

    def __init__(
        self, model: bytes | str | Path, threads: int | None = None, require_available: bool = True
    ) -> None:
        import onnxruntime as ort  # optional dependency: the `export` extra

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(
            source, sess_options=options, providers=["CPUExecutionProvider"]
        )
        names = tuple(i.name for i in self.session.get_inputs())
        self.takes_available = names == INPUT_NAMES
        if not self.takes_available and (require_available or names != INPUT_NAMES[:1]):
            raise ValueError(
                f"ONNX model inputs are {names}, expected {INPUT_NAMES} (export it with "
                "segmerge.inference.onnx.export_onnx)"
            )

    def __call__(self, x: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
        """Region logits ``(B, 3, ...)`` as a CPU float tensor."""
        if available is None:
            available = torch.ones(x.shape[0], len(MODALITIES), dtype=torch.bool)
        feeds = {"image": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)}
        if self.takes_available:
            feeds["available"] = np.ascontiguousarray(available.detach().cpu().numpy().astype(bool))
        (out,) = self.session.run(list(OUTPUT_NAMES), feeds)
        if out.shape[1] != len(REGIONS):
            raise ValueError(
                f"ONNX model returned {out.shape[1]} channels, expected {len(REGIONS)}"
            )
        return torch.from_numpy(out)
