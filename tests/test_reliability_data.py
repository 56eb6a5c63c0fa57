"""Bad input to check-data, train and predict: one reader and one validation for all (issue 16).

Each test reproduces a defect of the reliability campaign (the number in its docstring) on tiny
volumes; every one of them failed before the shared reader/validation/atomic-writer fixes.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_inference_helpers import blob_case, make_predictor, phantom, write_case

from segmerge.conventions import BRATS2023_SUFFIX, MODALITIES
from segmerge.data import (
    DatasetError,
    DatasetWarning,
    check_case,
    load_dataset,
    validate_dataset,
)
from segmerge.data.cli import check_data_main
from segmerge.inference import CaseInputs, load_bundle_config
from segmerge.inference.cli import predict_main

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (20, 22, 18)


def _datalist(path: Path, items: list[dict], split: str = "testing") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({split: items}))
    return path


def _case_items(root: Path, name: str = "a") -> dict:
    images, affine = blob_case(shape=SHAPE)
    write_case(root, name, images, affine)
    return {m: f"{name}/{name}_{m}.nii.gz" for m in MODALITIES}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A freshly initialised network of the bundle config, saved as weights."""
    net = load_bundle_config().get_parsed_content("network_def")
    path = tmp_path_factory.mktemp("models") / "model.pt"
    torch.save(net.state_dict(), path)
    return path


# -- security 1: case ids are file names ----------------------------------------------------------
@pytest.mark.parametrize(
    "case_id", ["../../victim/settings", "a/b", "a\\b", "..", "", "bad\x00id", "new\nline"]
)
def test_bad_case_ids_are_refused_where_the_datalist_is_read(tmp_path, case_id):
    """#1: one rule, applied by load_dataset (which check-data, train and predict all call)."""
    items = _case_items(tmp_path / "in")
    dl = _datalist(tmp_path / "in" / "list.json", [{"case_id": case_id, **items}])
    with pytest.raises(DatasetError) as info:
        load_dataset(dl)
    msg = str(info.value)
    assert "list.json testing[0]" in msg and repr(case_id) in msg and "case id is a plain name" in msg


def test_predict_and_check_data_refuse_a_traversing_case_id_and_write_nothing(
    tmp_path, capsys, model_file
):
    """#1: ``../../victim/settings`` created folders and overwrote victim/settings.json."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "settings.json").write_text('{"keep": true}')
    items = _case_items(tmp_path / "in")
    dl = _datalist(tmp_path / "in" / "list.json", [{"case_id": "../../victim/settings", **items}])
    out = tmp_path / "in" / "out" / "preds"
    argv = ["--input", str(dl), "--output", str(out), "--model", str(model_file)]
    assert predict_main([*argv, "--device", "cpu"]) == 2
    assert "case_id '../../victim/settings' contains '..'" in capsys.readouterr().err
    assert json.loads((victim / "settings.json").read_text()) == {"keep": True}
    assert sorted(p.name for p in victim.iterdir()) == ["settings.json"]
    assert check_data_main([str(dl), "--quiet"]) == 1
    assert "contains '..'" in capsys.readouterr().out


def test_train_refuses_a_traversing_case_id_before_training(tmp_path, capsys, monkeypatch):
    """#1: train reads datasets through the same reader (exit 2, the rule named)."""
    from segmerge.engine.cli import main as train_main

    images, affine = blob_case(shape=SHAPE)
    write_case(tmp_path / "in", "a", images, affine, (images["flair"] > 0.5).astype(np.uint8))
    item = {m: f"a/a_{m}.nii.gz" for m in MODALITIES} | {"label": "a/a_seg.nii.gz"}
    bad = [{"case_id": "../../victim", **item}, {"case_id": "b", **item}]
    dl = _datalist(tmp_path / "in" / "l.json", bad, split="training")
    monkeypatch.chdir(tmp_path)
    assert train_main(["--data", str(dl), "--output", "o", "--device", "cpu"]) == 2
    assert "l.json training[0]: case_id '../../victim' contains '..'" in capsys.readouterr().err
    assert not (tmp_path.parent / "victim").exists()


def test_every_output_path_is_checked_even_without_the_reader(tmp_path):
    """#1: a CaseInputs built by hand (not through load_dataset) cannot write outside either."""
    root = tmp_path / "in"
    items = _case_items(root)
    case = CaseInputs("../escaped", images={m: root / p for m, p in items.items()})
    result = make_predictor().predict_case(case, tmp_path / "out")
    assert result.status == "failed" and "outside" in result.error
    assert not (tmp_path / "escaped.nii.gz").exists() and not (tmp_path / "escaped.json").exists()


# -- #11: one data path ---------------------------------------------------------------------------
def _brats2023_datalist(root: Path) -> Path:
    """A labelled case and an unlabelled one, keyed with the BraTS 2023 names."""
    entries = []
    for i, name in enumerate(["c0", "c1"]):
        case = phantom(32, i)
        write_case(root, name, case.images, case.affine, case.label if i < 1 else None)
        item = {
            BRATS2023_SUFFIX[m]: f"{name}/{name}_{s}.nii.gz"
            for m, s in (("flair", "flair"), ("t1", "t1"), ("t1ce", "t1ce"), ("t2", "t2"))
        }
        if i < 1:
            item["seg"] = f"{name}/{name}_seg.nii.gz"
        entries.append(item)
    path = root / "brats2023.json"
    path.write_text(json.dumps({"training": entries[:1], "testing": entries[1:]}))
    return path


@pytest.mark.slow
def test_a_brats2023_keyed_datalist_that_trains_is_predicted_by_predict_and_the_bundle(
    tmp_path, model_file
):
    """Issue 11: ``predict`` reported that such a datalist "lists none of the sequences"."""
    dl = _brats2023_datalist(tmp_path / "in")
    spec = load_dataset(dl)  # what train reads ...
    assert validate_dataset(spec) == []  # ... and validates: accepted
    assert spec.training[0]["label"].endswith("c0_seg.nii.gz") and len(spec.testing) == 1
    assert all(spec.all_items()[i][m] for i in range(2) for m in MODALITIES)

    out_cli, out_bundle = tmp_path / "cli", tmp_path / "bundle"
    argv = ["--input", str(dl), "--output", str(out_cli), "--model", str(model_file)]
    assert predict_main([*argv, "--device", "cpu", "--set", "roi_size=[32,32,32]"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run",
         "--config_file", str(ROOT / "configs" / "inference.json"), "--bundle_root", str(ROOT),
         "--dataset_dir", str(dl), "--output_dir", str(out_bundle),
         "--model_path", str(model_file), "--device", "cpu", "--roi_size", "[32,32,32]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for cid in ("c0", "c1"):
        a = nib.load(out_cli / f"{cid}.nii.gz")
        b = nib.load(out_bundle / f"{cid}.nii.gz")
        assert a.shape == (32, 32, 32)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        used = json.loads((out_cli / f"{cid}.json").read_text())["sequences_used"]
        assert used == list(MODALITIES)


def _write_volume(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def test_trailing_singleton_axis_is_accepted_by_check_data_and_predict(tmp_path):
    """#11: (X, Y, Z, 1) volumes: train accepted them, predict refused them."""
    images, affine = blob_case(shape=SHAPE)
    write_case(tmp_path / "in", "a", images, affine)
    flair = tmp_path / "in" / "a" / "a_flair.nii.gz"
    _write_volume(flair, images["flair"][..., None], affine)
    assert nib.load(flair).shape == (*SHAPE, 1)
    assert check_case(load_dataset(tmp_path / "in").testing[0]) == []
    report = make_predictor(probabilities=True).predict_dataset(tmp_path / "in", tmp_path / "out")
    assert not report.failures, report.summary()
    out = nib.load(tmp_path / "out" / "a.nii.gz")
    assert out.shape == SHAPE and np.array_equal(out.affine, affine)
    assert nib.load(tmp_path / "out" / "a_probabilities.nii.gz").shape == (*SHAPE, 3)


def test_a_broken_dataset_json_in_a_folder_is_reported_by_all(tmp_path, capsys, model_file):
    """#11: predict ignored a broken dataset.json beside the case folders; train reported it."""
    _case_items(tmp_path / "in")
    (tmp_path / "in" / "dataset.json").write_text("{ not json")
    with pytest.raises(DatasetError, match="dataset.json: unreadable datalist"):
        load_dataset(tmp_path / "in")
    assert check_data_main([str(tmp_path / "in"), "--quiet"]) == 1
    assert "unreadable datalist" in capsys.readouterr().out
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--device", "cpu"]
    code = predict_main([*argv, "--model", str(model_file)])
    assert code == 2 and "dataset.json: unreadable datalist" in capsys.readouterr().err


@pytest.mark.parametrize("fault", ["nan_inf", "all_zero"])
def test_non_finite_or_empty_sequences_fail_the_case_in_predict_as_in_train(tmp_path, fault):
    """#11: one NaN and two ±Inf voxels in FLAIR gave an all-zero prediction reported as
    "predicted" with exit 0; train refused the same case."""
    images, affine = blob_case(shape=SHAPE)
    bad = images["flair"].copy()
    if fault == "nan_inf":
        bad[3, 4, 5], bad[6, 7, 8], bad[9, 10, 11] = np.nan, np.inf, -np.inf
    else:
        bad[:] = 0.0
    write_case(tmp_path / "in", "bad", {**images, "flair": bad}, affine)
    write_case(tmp_path / "in", "good", images, affine)
    rule = "finite intensities" if fault == "nan_inf" else "sequence not empty"
    spec = load_dataset(tmp_path / "in")
    assert {p.rule.split(" (")[0] for p in validate_dataset(spec)} == {rule}  # train's check
    report = make_predictor().predict_dataset(tmp_path / "in", tmp_path / "out")
    status = {r.case_id: r.status for r in report.results}
    assert status == {"bad": "failed", "good": "predicted"}
    assert rule in report.failures[0].error and "bad_flair.nii.gz" in report.failures[0].error
    assert not (tmp_path / "out" / "bad.nii.gz").exists()


def test_duplicate_case_ids_are_an_error_naming_both_items(tmp_path, capsys, model_file):
    """#12: 3 listed, 2 predicted, exit 0."""
    items = _case_items(tmp_path / "in")
    other = _case_items(tmp_path / "in", "b")
    dl = tmp_path / "in" / "list.json"
    dl.write_text(
        json.dumps(
            {
                "training": [{"case_id": "x", **items}],
                "testing": [{"case_id": "b", **other}, {"case_id": "x", **other}],
            }
        )
    )
    argv = ["--input", str(dl), "--output", str(tmp_path / "o"), "--model", str(model_file)]
    code = predict_main([*argv, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "training[0] and testing[1] both have case_id 'x'" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def _header_bomb(path: Path, shape: tuple[int, ...], payload: int = 8) -> Path:
    """A NIfTI whose header declares ``shape`` float32 voxels but holds ``payload`` bytes."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_data_offset(352)
    raw = hdr.binaryblock + b"\x00" * 4 + b"\x00" * payload
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


@pytest.mark.parametrize(
    ("name", "shape", "rule"),
    [
        ("big.nii.gz", (10000, 10000, 10000), "volume within"),
        ("big.nii.gz", (800, 800, 800), "volume within"),
        ("fake.nii.gz", (600, 600, 600), "header's volume fits the file size"),
        ("short.nii", (64, 64, 64), "header's volume fits the file size"),
    ],
)
def test_header_is_checked_against_the_file_before_reading(tmp_path, name, shape, rule):
    """#13: a 111-byte file declaring 800³ cost ~500 MB per worker; 10000³ a bare MemoryError."""
    images, affine = blob_case(shape=SHAPE)
    write_case(tmp_path / "in", "a", images, affine)
    (tmp_path / "in" / "a" / "a_t2.nii.gz").unlink()
    t2 = _header_bomb(tmp_path / "in" / "a" / ("a_t2" + name[name.index(".") :]), shape)
    assert t2.stat().st_size < 1000
    problems = check_case(load_dataset(tmp_path / "in").testing[0])
    assert [(p.file, p.rule.startswith(rule)) for p in problems] == [(str(t2), True)]
    assert "×".join(map(str, shape)) in problems[0].value
    report = make_predictor().predict_dataset(tmp_path / "in", tmp_path / "out")
    assert report.failures and rule in report.failures[0].error and t2.name in report.failures[0].error


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_predict_on_cuda_without_cuda_is_a_clean_error(tmp_path, capsys, model_file):
    """#14: a traceback (train gives a clean error)."""
    _case_items(tmp_path / "in")
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--device", "cuda"]
    code = predict_main([*argv, "--model", str(model_file)])
    assert code == 2
    assert "device cuda requested but torch sees no CUDA device" in capsys.readouterr().err


def test_damaged_earlier_predictions_are_predicted_again_and_complete_ones_kept(tmp_path):
    """#8: a ``.nii.gz`` without its ``.json`` (disk full) or a truncated file was kept, exit 0."""
    root, out = tmp_path / "in", tmp_path / "out"
    for name in ("no_json", "truncated", "complete"):
        _case_items(root, name)
    first = make_predictor().predict_dataset(root, out)
    assert not first.failures
    (out / "no_json.json").unlink()
    raw = (out / "truncated.nii.gz").read_bytes()
    (out / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    complete = (out / "complete.nii.gz").stat().st_mtime_ns

    again = make_predictor().predict_dataset(root, out)
    status = {r.case_id: r.status for r in again.results}
    assert status == {"complete": "kept", "no_json": "predicted", "truncated": "predicted"}
    why = {r.case_id: r.replaced for r in again.results}
    assert "no_json.json missing" in why["no_json"] and "unreadable" in why["truncated"]
    assert "predicted again" in again.summary()
    assert (out / "complete.nii.gz").stat().st_mtime_ns == complete
    for name in ("no_json", "truncated"):
        np.testing.assert_array_equal(
            np.asarray(nib.load(out / f"{name}.nii.gz").dataobj),
            np.asarray(nib.load(out / "complete.nii.gz").dataobj),  # same input, same output
        )
        assert json.loads((out / f"{name}.json").read_text())["prediction"] == f"{name}.nii.gz"


def test_unknown_datalist_keys_are_named(tmp_path):
    """#16: unknown datalist keys were never named (a misspelt 'flari' silently left FLAIR out)."""
    items = _case_items(tmp_path / "in")
    typo = {("flari" if k == "flair" else k): v for k, v in items.items()}
    with pytest.raises(DatasetError, match=r"testing\[0\]: unknown key 'flari' \(did you mean 'flair'"):
        load_dataset(_datalist(tmp_path / "in" / "typo.json", [typo]))
    with pytest.warns(DatasetWarning, match="unknown key 'comment' ignored"):
        spec = load_dataset(_datalist(tmp_path / "in" / "c.json", [{**items, "comment": "ok"}]))
    assert len(spec.testing) == 1


def test_a_listed_file_that_does_not_exist_is_reported_even_with_allow_missing(tmp_path):
    """A wrong path in a datalist is not an absent sequence (train and predict agree)."""
    items = _case_items(tmp_path / "in")
    dl = _datalist(tmp_path / "in" / "l.json", [{**items, "t2": "a/nope_t2.nii.gz"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = load_dataset(dl, allow_missing=True)
    problems = validate_dataset(spec)
    assert [(Path(p.file).name, p.rule) for p in problems] == [("nope_t2.nii.gz", "file exists")]


@pytest.mark.slow
def test_output_inside_input_is_not_a_case_and_the_summary_is_printed_once(tmp_path, model_file):
    """#16: ``--output`` inside ``--input`` always exited 1; the summary was printed twice."""
    root = tmp_path / "in"
    _case_items(root, "a")
    argv = [
        sys.executable, "-m", "segmerge", "predict", "--input", str(root),
        "--output", str(root / "preds"), "--model", str(model_file), "--device", "cpu",
        "--set", "roi_size=[32,32,32]",
    ]  # fmt: skip
    assert predict_main(argv[4:]) == 0  # in process: writes preds/ inside the input
    assert sorted(p.name for p in (root / "preds").iterdir()) == ["a.json", "a.nii.gz"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # as a user runs it (logging set up by the command): preds/ is not read as a case
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert text.count("1 case(s):") == 1, text[-3000:]
    assert "1 case(s): 0 predicted, 1 kept" in text


def test_check_data_names_subfolders_that_are_not_cases(tmp_path, capsys):
    """A misnamed case folder is named by check-data and reported by predict, never silent."""
    _case_items(tmp_path / "in", "a")
    (tmp_path / "in" / "notes").mkdir()
    assert check_data_main([str(tmp_path / "in"), "--quiet", "--allow-missing"]) == 0
    assert "1 subfolder(s) hold no case files and are not read: notes" in capsys.readouterr().err
    report = make_predictor().predict_dataset(tmp_path / "in", tmp_path / "out")
    assert {r.case_id: r.status for r in report.results} == {"a": "predicted", "notes": "failed"}
    assert "not a case folder" in report.failures[0].error
