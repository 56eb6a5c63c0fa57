"""ONNX: export with the availability input, ONNX Runtime vs PyTorch on a phantom case for every
subset of sequences, ``predict --backend onnxruntime``, and ``python -m monai.bundle onnx_export``.

Networks are the bundle's ``network_def`` with fresh seeded weights (trained weights are never
committed); the phantom is a 32^3 case of ``segmerge.data``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_inference_helpers import make_predictor, phantom, write_case

from segmerge.conventions import MODALITIES, REGIONS
from segmerge.inference import load_bundle_config

ort = pytest.importorskip("onnxruntime", reason="the 'export' extra (onnxruntime) is not installed")
from segmerge.inference.onnx import OnnxRuntimeNetwork, export_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
# several subsets of every size (all 15 cost ~2 min of CPU on the shared 2-core box)
SUBSETS = [
    MODALITIES,
    ("flair", "t1", "t2"),
    ("t1ce", "t2"),
    ("flair",),
    ("t1",),
]


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    net = load_bundle_config().get_parsed_content("network_def").eval()
    # non-trivial normalisation/bias values so the comparison is not between near-zero maps
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def onnx_net(network):
    return OnnxRuntimeNetwork(export_onnx(network))


def _image() -> torch.Tensor:
    case = phantom(32, 0)
    x = np.stack([case.images[m] for m in MODALITIES]).astype(np.float32)
    x = (x - x.mean(axis=(1, 2, 3), keepdims=True)) / (x.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
    return torch.from_numpy(x)[None]


def test_onnx_runtime_matches_pytorch_for_every_subset(network, onnx_net):
    """Subsets of every size: absent sequences zeroed and flagged, as the predictor feeds them."""
    image = _image()
    spread = []
    for subset in SUBSETS:
        keep = torch.tensor([[m in subset for m in MODALITIES]])
        x = image * keep[:, :, None, None, None]
        with torch.no_grad():
            ref = network(x, keep)
        out = onnx_net(x, keep)
        assert out.shape == ref.shape == (1, len(REGIONS), 32, 32, 32)
        diff = float((out - ref).abs().max())
        assert diff < TOL, f"{'+'.join(subset)}: max abs diff {diff}"
        spread.append(ref)
    # the subsets really change the output (availability is an input, not baked in)
    assert float((spread[0] - spread[-1]).abs().max()) > 1e-2


def test_dynamic_batch_and_spatial_size(network, onnx_net):
    x = torch.randn(2, len(MODALITIES), 48, 32, 16)
    available = torch.tensor([[True, True, True, True], [False, False, True, False]])
    with torch.no_grad():
        ref = network(x, available)
    assert float((onnx_net(x, available) - ref).abs().max()) < TOL


def test_absent_sequence_with_nan_cannot_reach_the_output(network, onnx_net):
    """The export zeroes absent sequences in the input (its fusion multiplies by the weights):
    NaN/inf in an absent channel changes nothing, as in PyTorch's masked fusion."""
    image = _image()
    keep = torch.tensor([[True, False, True, False]])
    x = image.clone()
    x[:, 1], x[:, 3] = float("nan"), float("inf")
    with torch.no_grad():
        ref = network(image * keep[:, :, None, None, None], keep)
    out = onnx_net(x, keep)
    assert bool(torch.isfinite(out).all())
    assert float((out - ref).abs().max()) < TOL


def test_export_form_of_the_default_network(network):
    """export_onnx writes MultiModalDSNet's cheaper export form (docs/benchmarks.md): one Where
    (absent sequences zeroed in the input) instead of one per sequence and level, and every
    decoder level's upsampling folded with its first convolution into a 4x4x4 transposed conv."""
    import onnx

    graph = onnx.load_from_string(export_onnx(network)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Where") == 1
    kernels = [
        list(a.ints) for n in graph.node if n.op_type == "ConvTranspose" for a in n.attribute
        if a.name == "kernel_shape"
    ]  # fmt: skip
    assert kernels == [[4, 4, 4]] * (len(network.features) - 1)


def test_predict_backend_onnxruntime(network, tmp_path):
    """The predictor with backend onnxruntime gives PyTorch's probabilities on a case without
    T1ce, and refuses a GPU device."""
    case = phantom(32, 0)
    images = {m: v for m, v in case.images.items() if m != "t1ce"}
    write_case(tmp_path / "in", "p", images, case.affine)
    from segmerge.inference import discover_cases

    (inputs,) = discover_cases(tmp_path / "in")
    torch_pred = make_predictor(network=network)
    onnx_pred = make_predictor(network=network, backend="onnxruntime")
    assert onnx_pred.backend == "onnxruntime"
    # each predictor inverts its own preprocessing (MONAI ties the inverse to the transforms)
    a = torch_pred.infer(torch_pred.prepare(inputs))
    b = onnx_pred.infer(onnx_pred.prepare(inputs))
    assert float((a - b).abs().max()) < TOL
    from segmerge.inference import build_predictor

    with pytest.raises(ValueError, match="backend must be one of"):
        build_predictor(model_path=None, device="cpu", backend="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        build_predictor(model_path=None, device="meta", backend="onnxruntime")


def test_onnx_model_with_other_inputs_is_refused(tmp_path):
    bad = tmp_path / "bad.onnx"
    torch.onnx.export(
        torch.nn.Conv3d(4, 3, 1), (torch.zeros(1, 4, 8, 8, 8),), str(bad), dynamo=False
    )
    with pytest.raises(ValueError, match="expected \\('image', 'available'\\)"):
        OnnxRuntimeNetwork(bad)


@pytest.mark.slow
def test_monai_bundle_onnx_export(network, tmp_path):
    """`python -m monai.bundle onnx_export` with its defaults: a graph of the image alone (all
    sequences present), equal to PyTorch's output on the metadata's 16^3 input."""
    ckpt, out = tmp_path / "model.pt", tmp_path / "model.onnx"
    torch.save(network.state_dict(), ckpt)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [
            sys.executable, "-m", "monai.bundle", "onnx_export", "network_def",
            "--filepath", str(out), "--ckpt_file", str(ckpt),
            "--meta_file", str(ROOT / "configs" / "metadata.json"),
            "--config_file", str(ROOT / "configs" / "inference.json"),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    x = torch.randn(1, len(MODALITIES), 16, 16, 16)
    (got,) = session.run(None, {inp.name: x.numpy()})
    with torch.no_grad():
        ref = network(x)
    assert float((torch.from_numpy(got) - ref).abs().max()) < TOL
