"""The MONAI bundle: metadata, config consistency, and the `python -m monai.bundle` commands.

The subprocess tests run the real commands a user types (offline: the schema copy is shipped),
with a freshly initialised network of the configured widths saved as the model (trained weights
are never committed).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch
from test_inference_helpers import blob_case, digests, write_case

from segmerge.conventions import MODALITIES, REGIONS
from segmerge.inference import load_bundle_config

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "configs" / "metadata.json"
DEFAULT_CONFIG = ROOT / "configs" / "inference.json"
SCHEMA = ROOT / "configs" / "schema" / "meta_schema_20240725.json"
TRAIN = ROOT / "configs" / "train.json"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A state dict of a freshly initialised network built from the config's network_def."""
    net = load_bundle_config().get_parsed_content("network_def")
    path = tmp_path_factory.mktemp("models") / "model.pt"
    torch.save(net.state_dict(), path)
    return path


# -- static checks ---------------------------------------------------------------------------------
def test_metadata_describes_named_channels():
    meta = json.loads(META.read_text())
    fmt = meta["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert image["num_channels"] == len(MODALITIES)
    assert [image["channel_def"][str(i)] for i in range(len(MODALITIES))] == list(MODALITIES)
    assert pred["num_channels"] == len(REGIONS)
    assert [pred["channel_def"][str(i)] for i in range(len(REGIONS))] == list(REGIONS)
    assert meta["schema"].endswith("/" + SCHEMA.name)


def test_shipped_schema_accepts_metadata_and_rejects_broken_copies():
    schema = json.loads(SCHEMA.read_text())
    meta = json.loads(META.read_text())
    jsonschema.validate(meta, schema)
    broken = copy.deepcopy(meta)
    del broken["network_data_format"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = copy.deepcopy(meta)
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_inference_network_matches_training():
    assert TRAIN.is_file(), "configs/train.json is the training config the weights come from"
    train_def = json.loads(TRAIN.read_text())["network_def"]
    infer_def = json.loads(DEFAULT_CONFIG.read_text())["network_def"]
    assert infer_def == train_def
    # and the built networks hold the same parameters (a training state dict loads)
    infer_net = load_bundle_config().get_parsed_content("network_def")
    train_parser = load_bundle_config(overrides={"network_def": train_def})
    train_net = train_parser.get_parsed_content("network_def")
    infer_net.load_state_dict(train_net.state_dict())
    # the sliding window sees what training validated with: windows of the training patch size
    patch = json.loads(TRAIN.read_text())["patch_size"]
    assert json.loads(DEFAULT_CONFIG.read_text())["roi_size"] == [patch] * 3


def test_config_uses_gaussian_sliding_window_and_monai_ids():
    config = json.loads(DEFAULT_CONFIG.read_text())
    for key in ("imports", "bundle_root", "device", "dataset_dir", "output_dir", "network_def"):
        assert key in config
    for key in ("initialize", "run", "finalize"):
        assert isinstance(config[key], list) and config[key]
    assert config["inferer"]["_target_"] == "SlidingWindowInferer"
    assert config["inferer"]["mode"] == "gaussian"
    assert config["network_def"]["_target_"].startswith("segmerge.")


# -- the monai.bundle commands ---------------------------------------------------------------------
# The checks of the MONAI model zoo's CI (Project-MONAI/model-zoo, ci/verify_bundle.py `verify`
# in "full" mode, and ci/verify_properties.py), in its order and with its arguments, on a copy
# laid out as models/<bundle>/: necessary files (configs/metadata.json, LICENSE) and preferred
# files (models/model.pt, configs/inference.json); version in the changelog; metadata against
# the schema (offline: the shipped copy stands in for eval/schema.json, which CI downloads);
# inference properties (monai.bundle's create_workflow + check_properties: every required id of
# InferProperties, optional ids referenced correctly); data shape (verify_net_in_out with
# DEFAULT arguments: n=1, p=1, any=1, default device); TorchScript export (ckpt_export to
# models/verify_model.ts from models/model.pt). Weights are a fresh network's, as the CI's
# _produce_fake_weights makes them.
MODEL_ZOO_CHECKS = """
import json, os, sys
from monai.bundle import ckpt_export, create_workflow, verify_metadata, verify_net_in_out
import torch

bundle_path = sys.argv[1]
configs = os.path.join(bundle_path, "configs")
meta_file = os.path.join(configs, "metadata.json")
for f in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
    assert os.path.exists(os.path.join(bundle_path, f)), f"necessary file {f} is not existing."
print("directory is verified correctly.")
metadata = json.load(open(meta_file))
assert "version" in metadata and "changelog" in metadata
assert metadata["version"] in metadata["changelog"], "version missing from the changelog"
print("version and changelog are verified correctly.")
verify_metadata(meta_file=meta_file, filepath=os.path.join(bundle_path, "eval/schema.json"))
print("metadata format is verified correctly.")
workflow = create_workflow(
    workflow_type="inference", bundle_root=bundle_path,
    config_file=os.path.join(configs, "inference.json"),
    logging_file=os.path.join(configs, "logging.conf"), meta_file=meta_file,
)
missing = workflow.check_properties()
assert missing == [], f"check properties for workflow failed: {missing}"
print("properties are verified correctly.")
verify_net_in_out(
    net_id="network_def", meta_file=meta_file,
    config_file=os.path.join(bundle_path, "configs/inference.json"), bundle_root=bundle_path,
)
print("data shape is verified correctly.")
ckpt_export(
    net_id="network_def", filepath=os.path.join(bundle_path, "models/verify_model.ts"),
    ckpt_file=os.path.join(bundle_path, "models", "model.pt"), meta_file=meta_file,
    config_file=os.path.join(bundle_path, "configs/inference.json"), bundle_root=bundle_path,
)
torch.jit.load(os.path.join(bundle_path, "models/verify_model.ts"))
print("export weights into TorchScript module successfully.")
"""


@pytest.mark.slow
def test_model_zoo_checks(tmp_path, model_file):
    """The model zoo CI's bundle checks, as it runs them, all pass (offline)."""
    bundle = tmp_path / "models" / "segmerge_brats"
    shutil.copytree(ROOT / "configs", bundle / "configs")
    shutil.copy(ROOT / "LICENSE", bundle / "LICENSE")
    (bundle / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "README.md", bundle / "docs" / "README.md")
    (bundle / "models").mkdir()
    shutil.copy(model_file, bundle / "models" / "model.pt")
    (bundle / "eval").mkdir()
    shutil.copy(SCHEMA, bundle / "eval" / "schema.json")
    script = tmp_path / "verify_bundle_checks.py"
    script.write_text(MODEL_ZOO_CHECKS)
    proc = _run(str(script), str(bundle), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for line in (
        "directory is verified correctly.",
        "version and changelog are verified correctly.",
        "metadata is verified with no error",
        "properties are verified correctly.",
        "data shape of network is verified with no error",
        "export weights into TorchScript module successfully.",
    ):
        assert line in out, line
    assert "skipped downloading" in out  # the schema copy was used, nothing fetched


def test_metadata_shapes_fit_the_network_at_every_n():
    """`16*n` (metadata) is what the network takes: n = 1 (the tools' default) and the window."""
    meta = json.loads(META.read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == ["16*n"] * 3
    net = load_bundle_config().get_parsed_content("network_def").eval()
    roi = json.loads(DEFAULT_CONFIG.read_text())["roi_size"]
    assert all(r % 16 == 0 for r in roi)
    with torch.no_grad():
        for n in (1, 2):
            out = net(torch.zeros(1, len(MODALITIES), 16 * n, 16 * n, 16 * n))
            assert out.shape == (1, len(REGIONS), 16 * n, 16 * n, 16 * n)


def test_ckpt_export_torchscript(model_file, tmp_path):
    ts = tmp_path / "model.ts"
    proc = _run(
        "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(ts), "--ckpt_file", str(model_file),
        "--meta_file", str(META), "--config_file", str(DEFAULT_CONFIG), "--bundle_root", str(ROOT),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripted = torch.jit.load(str(ts), map_location="cpu")
    net = load_bundle_config().get_parsed_content("network_def")
    net.load_state_dict(torch.load(model_file, weights_only=True))
    net.eval()
    x = torch.randn(1, len(MODALITIES), 16, 16, 16)
    available = torch.tensor([[True, False, True, True]])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, available), net(x, available))
        torch.testing.assert_close(scripted(x), net(x))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle_in")
    images, affine = blob_case(shape=(24, 26, 20), zooms=(1.2, 1.0, 1.5))
    write_case(root, "full", images, affine)
    write_case(root, "no_t1ce", {k: v for k, v in images.items() if k != "t1ce"}, affine)
    folder = write_case(root, "broken", images, affine)
    (folder / "broken_t2.nii.gz").write_bytes(b"not a nifti file")
    return root


def test_bundle_run_and_segmerge_predict_agree(dataset, model_file, tmp_path):
    before = digests(dataset)
    out_bundle, out_cli = tmp_path / "bundle", tmp_path / "cli"
    proc = _run(
        "-m", "monai.bundle", "run",
        "--config_file", str(DEFAULT_CONFIG), "--bundle_root", str(ROOT),
        "--dataset_dir", str(dataset), "--output_dir", str(out_bundle),
        "--model_path", str(model_file), "--device", "cpu", "--roi_size", "[32,32,32]",
    )  # fmt: skip
    assert proc.returncode != 0, "a failed case must make the exit status non-zero"
    text = proc.stdout + proc.stderr
    assert "broken" in text and "1 case(s) failed" in text

    proc = _run(
        "-m", "segmerge", "predict", "--input", str(dataset), "--output", str(out_cli),
        "--model", str(model_file), "--device", "cpu", "--set", "roi_size=[32,32,32]",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "broken" in proc.stdout and "failed" in proc.stdout
    assert digests(dataset) == before, "inputs were modified"

    for case_id, used in (("full", list(MODALITIES)), ("no_t1ce", ["flair", "t1", "t2"])):
        src = nib.load(dataset / case_id / f"{case_id}_flair.nii.gz")
        a, b = nib.load(out_bundle / f"{case_id}.nii.gz"), nib.load(out_cli / f"{case_id}.nii.gz")
        for img in (a, b):
            assert img.shape == src.shape and np.array_equal(img.affine, src.affine)
            assert img.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        for out in (out_bundle, out_cli):
            sidecar = json.loads((out / f"{case_id}.json").read_text())
            assert sidecar["sequences_used"] == used
            assert sidecar["model_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert not (out_bundle / "broken.nii.gz").exists()
