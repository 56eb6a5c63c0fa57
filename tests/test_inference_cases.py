"""Missing sequences, bad cases, overwrite and atomic writes of the predictor."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from test_inference_helpers import (
    ShiftThresholdNet,
    blob_case,
    digests,
    make_predictor,
    write_case,
)

from segmerge.conventions import MODALITIES
from segmerge.inference import PredictionFailed, discover_cases


@pytest.fixture()
def mixed(tmp_path):
    """full, no_t1ce (file absent), only_t2, empty (no file), corrupt (flair is not NIfTI),
    mismatch (t2 of another shape), shifted (t1 2 mm off)."""
    root = tmp_path / "in"
    images, affine = blob_case(shape=(20, 22, 18))
    write_case(root, "full", images, affine)
    write_case(root, "no_t1ce", {k: v for k, v in images.items() if k != "t1ce"}, affine)
    write_case(root, "only_t2", {"t2": images["t2"]}, affine)
    (root / "empty").mkdir()
    folder = write_case(root, "corrupt", images, affine)
    (folder / "corrupt_flair.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream")
    write_case(root, "mismatch", {**images, "t2": images["t2"][:, :, :10]}, affine)
    write_case(root, "shifted", {k: v for k, v in images.items() if k != "t1"}, affine)
    moved = affine.copy()
    moved[0, 3] += 2.0
    write_case(root, "shifted", {"t1": images["t1"]}, moved)
    return root


def test_discovery_reports_cases_without_sequences(mixed):
    cases = {c.case_id: c for c in discover_cases(mixed)}
    assert set(cases) == {"full", "no_t1ce", "only_t2", "empty", "corrupt", "mismatch", "shifted"}
    assert cases["no_t1ce"].available == (True, True, False, True)
    assert cases["only_t2"].available == (False, False, False, True)
    assert "empty" in cases["empty"].problem and "no input sequence" in cases["empty"].problem
    assert cases["full"].problem is None


def test_subsets_are_predicted_through_the_mask_and_failures_reported(mixed, tmp_path):
    out = tmp_path / "out"
    net = ShiftThresholdNet()
    predictor = make_predictor(network=net)
    before = digests(mixed)
    report = predictor.predict_dataset(mixed, out)
    assert digests(mixed) == before, "inputs were modified"

    status = {r.case_id: r.status for r in report.results}
    assert status == {
        "full": "predicted",
        "no_t1ce": "predicted",
        "only_t2": "predicted",
        "empty": "failed",
        "corrupt": "failed",
        "mismatch": "failed",
        "shifted": "failed",
    }
    # the network saw exactly the availability of each predicted case (cases run in sorted order)
    masks = {tuple(m[0].tolist()) for m in net.seen_available}
    assert masks == {
        (True, True, True, True),
        (True, True, False, True),
        (False, False, False, True),
    }

    sidecar = json.loads((out / "no_t1ce.json").read_text())
    assert sidecar["sequences_used"] == ["flair", "t1", "t2"]
    assert sidecar["sequences_missing"] == ["t1ce"]
    assert json.loads((out / "only_t2.json").read_text())["sequences_used"] == ["t2"]

    errors = {r.case_id: r.error for r in report.failures}
    assert "corrupt_flair.nii.gz" in errors["corrupt"]
    # the messages of segmerge.data.check_case, the validation check-data and train run
    assert "shape matches the case's other files — found t2 20×22×10 but flair 20×22×18" in (
        errors["mismatch"]
    )
    assert "affine matches the case's other files" in errors["shifted"]
    summary = report.summary()
    for case_id in ("empty", "corrupt", "mismatch", "shifted"):
        assert case_id in summary
    assert not (out / "empty.nii.gz").exists() and not (out / "corrupt.nii.gz").exists()
    # nothing half-written is left behind
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []

    with pytest.raises(PredictionFailed) as info:
        predictor.raise_on_failures()
    assert info.value.code and "4 case(s) failed" in str(info.value.code)


def test_existing_predictions_are_kept_unless_overwrite(tmp_path):
    root = tmp_path / "in"
    images, affine = blob_case(shape=(20, 22, 18))
    write_case(root, "a", images, affine)
    out = tmp_path / "out"
    out.mkdir()
    sentinel = nib.Nifti1Image(np.full((20, 22, 18), 7, np.uint8), affine)
    nib.save(sentinel, out / "a.nii.gz")
    # a complete earlier prediction: label map + its sidecar (damaged ones: test_reliability_data)
    sidecar = {"prediction": "a.nii.gz", "shape": [20, 22, 18], "sequences_used": ["t2"]}
    (out / "a.json").write_text(json.dumps(sidecar))

    report = make_predictor().predict_dataset(root, out)
    assert [r.status for r in report.results] == ["kept"]
    assert report.results[0].used == ("t2",)  # what the kept prediction was made from
    assert np.all(np.asarray(nib.load(out / "a.nii.gz").dataobj) == 7)

    report = make_predictor(overwrite=True).predict_dataset(root, out)
    assert [r.status for r in report.results] == ["predicted"]
    assert not np.any(np.asarray(nib.load(out / "a.nii.gz").dataobj) == 7)


def test_probability_maps_match_the_labels(tmp_path):
    root = tmp_path / "in"
    images, affine = blob_case(shape=(20, 22, 18))
    write_case(root, "a", images, affine)
    out = tmp_path / "out"
    predictor = make_predictor(probabilities=True, et_label=3)
    assert not predictor.predict_dataset(root, out).failures
    prob = nib.load(out / "a_probabilities.nii.gz")
    labels = np.asarray(nib.load(out / "a.nii.gz").dataobj)
    assert prob.shape == (20, 22, 18, 3) and np.array_equal(prob.affine, affine)
    p = np.asarray(prob.dataobj)
    assert p.min() >= 0.0 and p.max() <= 1.0
    np.testing.assert_array_equal(labels == 3, p[..., 2] > 0.5)  # ET label as configured
    np.testing.assert_array_equal(labels > 0, p[..., 0] > 0.5)


def test_datalist_input_with_relative_paths(tmp_path):
    root = tmp_path / "in"
    images, affine = blob_case(shape=(20, 22, 18))
    write_case(root, "c1", images, affine)
    datalist = {
        "testing": [
            {m: f"c1/c1_{m}.nii.gz" for m in MODALITIES if m != "t1"},
            {"case_id": "ghost", "flair": "c9/c9_flair.nii.gz"},
        ]
    }
    (root / "list.json").write_text(json.dumps(datalist))
    report = make_predictor().predict_dataset(root / "list.json", tmp_path / "out")
    status = {r.case_id: r.status for r in report.results}
    assert status == {"c1": "predicted", "ghost": "failed"}
    assert "c9_flair.nii.gz: file exists — found no such file" in report.failures[0].error
    used = json.loads((tmp_path / "out" / "c1.json").read_text())["sequences_used"]
    assert used == ["flair", "t1ce", "t2"]


def test_bad_input_paths_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_cases(tmp_path / "nope")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: a datalist must be"):
        discover_cases(tmp_path / "bad.json")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no case folders"):
        discover_cases(tmp_path / "flat")


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_discovery_of_the_data_packages_layouts(tmp_path, layout):
    """Folders and datalists written by segmerge.data are found with all four sequences + label."""
    from segmerge.data import write_phantom_dataset

    datalist = write_phantom_dataset(tmp_path, cases=2, size=16, layout=layout, progress=False)
    for source in (datalist.parent, datalist):
        cases = discover_cases(source)
        assert len(cases) == 2
        for case in cases:
            assert case.problem is None, case.problem
            assert case.available == (True, True, True, True)
            assert case.label is not None and case.label.is_file()
    ids_folder = sorted(c.case_id for c in discover_cases(datalist.parent))
    ids_list = sorted(c.case_id for c in discover_cases(datalist))
    assert ids_folder == ids_list
