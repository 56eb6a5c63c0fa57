"""Evaluation: region Dice/HD95 with the empty-region conventions, files, CLI, subset robustness."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from test_inference_helpers import ShiftThresholdNet, blob_case, make_predictor, write_case

from segmerge.conventions import HD95_EMPTY, MODALITIES
from segmerge.inference import all_subsets, evaluate_subsets, region_metrics
from segmerge.inference.cli import evaluate_main


def _cube(shape, lo, hi, value):
    out = np.zeros(shape, np.uint8)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return out


def test_empty_region_conventions():
    gt = _cube((12, 12, 12), (2, 2, 2), (6, 6, 6), 2)  # edema only: WT non-empty, TC/ET empty
    pred = gt.copy()
    pred[0, 0, 0] = 4  # one ET voxel where the ground truth has no ET
    m = region_metrics(pred, gt, (1.0, 1.0, 1.0))
    assert m["dice_tc"] == 0.0 and m["hd95_tc"] == HD95_EMPTY  # one empty (ET counts in TC)
    assert m["dice_et"] == 0.0 and m["hd95_et"] == HD95_EMPTY
    m = region_metrics(gt, gt, (1.0, 1.0, 1.0))
    assert m["dice_wt"] == 1.0 and m["hd95_wt"] == 0.0
    assert m["dice_tc"] == 1.0 and m["hd95_tc"] == 0.0  # both empty
    m = region_metrics(np.zeros_like(gt), gt, (1.0, 1.0, 1.0))
    assert m["dice_wt"] == 0.0 and m["hd95_wt"] == HD95_EMPTY


def test_values_and_spacing():
    shape = (16, 10, 10)
    gt = _cube(shape, (2, 2, 2), (6, 6, 6), 4)
    pred = _cube(shape, (4, 2, 2), (8, 6, 6), 4)  # shifted 2 voxels along axis 0: overlap half
    m = region_metrics(pred, gt, (2.0, 1.0, 1.0))
    for r in ("wt", "tc", "et"):
        assert m[f"dice_{r}"] == pytest.approx(0.5)
        # surface distances along axis 0 are multiples of 2 voxels x 2 mm
        assert m[f"hd95_{r}"] == pytest.approx(4.0)
    m1 = region_metrics(pred, gt, (1.0, 1.0, 1.0))
    assert m1["hd95_wt"] == pytest.approx(2.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        region_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))


def test_evaluate_cli_writes_csv_and_json(tmp_path):
    affine = np.diag([1.2, 1.0, 1.0, 1.0])
    gt_root, pred = tmp_path / "gt", tmp_path / "pred"
    pred.mkdir()
    shape = (16, 10, 10)
    gt_a = _cube(shape, (2, 2, 2), (6, 6, 6), 4)
    images = {m: np.ones(shape, np.float32) for m in MODALITIES}
    write_case(gt_root, "a", images, affine, gt_a)
    write_case(gt_root, "b", images, affine, gt_a)
    nib.save(nib.Nifti1Image(_cube(shape, (4, 2, 2), (8, 6, 6), 4), affine), pred / "a.nii.gz")
    # "b" has no prediction: scored as empty, listed, exit status 1

    status = evaluate_main(["--pred", str(pred), "--gt", str(gt_root)])
    assert status == 1
    rows = list(csv.DictReader(open(pred / "metrics.csv")))
    assert [r["case_id"] for r in rows] == ["a", "b", "mean", "std"]
    assert float(rows[0]["dice_et"]) == pytest.approx(0.5)
    assert float(rows[1]["dice_et"]) == 0.0 and rows[1]["status"] == "missing_prediction"
    assert float(rows[2]["dice_et"]) == pytest.approx(0.25)
    assert float(rows[1]["hd95_wt"]) == pytest.approx(HD95_EMPTY)
    content = json.loads((pred / "metrics.json").read_text())
    assert content["missing_predictions"] == ["b"]
    assert content["mean"]["hd95_et"] == pytest.approx((2 * 1.2 + HD95_EMPTY) / 2)
    assert content["conventions"]["hd95_one_empty"] == HD95_EMPTY
    assert content["conventions"]["dice_both_empty"] == 1.0

    nib.save(nib.Nifti1Image(gt_a, affine), pred / "b.nii.gz")
    assert (
        evaluate_main(["--pred", str(pred), "--gt", str(gt_root), "--out", str(tmp_path / "e")])
        == 0
    )
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["cases"][1]["dice_wt"] == 1.0


def test_evaluate_cli_rejects_missing_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--pred", str(tmp_path)])
    assert "--pred needs --gt" in capsys.readouterr().err
    assert evaluate_main(["--pred", str(tmp_path / "nope"), "--gt", str(tmp_path)]) == 2


def test_subsets_without_the_sequence_the_model_reads_fail(tmp_path):
    """The stand-in reads FLAIR only: every subset with FLAIR scores the same, every subset
    without it predicts nothing (Dice 0, HD95 373.13 on a non-empty ground truth)."""
    images, affine = blob_case(shape=(20, 22, 18))
    label = np.where(images["flair"] > 0.5, 2, 0).astype(np.uint8)
    write_case(tmp_path / "in", "a", images, affine, label)
    predictor = make_predictor(network=ShiftThresholdNet())
    rows = evaluate_subsets(predictor, tmp_path / "in", "all")
    assert len(rows) == 15 == len(all_subsets())
    assert len({r["subset"] for r in rows}) == 15
    with_flair = [r for r in rows if "flair" in r["subset"].split("+")]
    without = [r for r in rows if "flair" not in r["subset"].split("+")]
    assert len(with_flair) == 8 and len(without) == 7
    assert all(r["n_cases"] == 1 for r in rows)
    assert len({round(r["dice_wt"], 9) for r in with_flair}) == 1
    assert with_flair[0]["dice_wt"] > 0.3
    assert all(r["dice_wt"] == 0.0 and r["hd95_wt"] == HD95_EMPTY for r in without)
    assert rows[0]["subset"] == "flair+t1+t1ce+t2" and rows[0]["missing"] == "-"
    no_t1ce = next(r for r in rows if r["subset"] == "flair+t1+t2")
    assert no_t1ce["missing"] == "t1ce"


def test_subset_spec_errors(tmp_path):
    images, affine = blob_case(shape=(20, 22, 18))
    write_case(tmp_path / "in", "a", images, affine, np.zeros((20, 22, 18), np.uint8))
    with pytest.raises(ValueError, match="did not|use '\\+'-joined"):
        evaluate_subsets(make_predictor(), tmp_path / "in", "flair+pd")


def test_subsets_cli_with_the_configured_network(tmp_path):
    """`evaluate --subsets ... --model --input` end to end with a fresh network of the bundle
    (two subsets keep it cheap; all 15 are covered with the stand-in above)."""
    import torch

    from segmerge.inference import load_bundle_config

    net = load_bundle_config().get_parsed_content("network_def")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    images, affine = blob_case(shape=(16, 16, 16))
    label = np.where(images["flair"] > 0.5, 2, 0).astype(np.uint8)
    write_case(tmp_path / "in", "a", images, affine, label)
    out = tmp_path / "eval"
    argv = [
        "--subsets",
        "flair+t1+t2,t2",
        "--input",
        str(tmp_path / "in"),
        "--model",
        str(tmp_path / "model.pt"),
    ]
    argv += ["--device", "cpu", "--set", "roi_size=[16,16,16]", "--out", str(out)]
    assert evaluate_main(argv) == 0
    rows = list(csv.DictReader(open(out / "robustness.csv")))
    assert [r["subset"] for r in rows] == ["flair+t1+t2", "t2"]
    assert all(r["n_cases"] == "1" for r in rows)
    for r in rows:
        assert 0.0 <= float(r["dice_wt"]) <= 1.0
        assert 0.0 <= float(r["hd95_wt"]) <= HD95_EMPTY
    table = (out / "robustness.md").read_text()
    assert "| flair+t1+t2 | t1ce | 1 |" in table
    assert table.count("\n| ") == 3  # header + 2 subsets


def test_flat_ground_truth_folder_and_grid_mismatch(tmp_path):
    """--gt may be a folder of <case>.nii.gz; a prediction on another grid is an error, not a score."""
    shape = (12, 12, 12)
    gt_dir, pred = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred.mkdir()
    label = _cube(shape, (2, 2, 2), (6, 6, 6), 1)
    nib.save(nib.Nifti1Image(label, np.eye(4)), gt_dir / "x.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), gt_dir / "y_seg.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), pred / "x.nii.gz")
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    nib.save(nib.Nifti1Image(label, shifted), pred / "y.nii.gz")
    assert evaluate_main(["--pred", str(pred), "--gt", str(gt_dir)]) == 1
    content = json.loads((pred / "metrics.json").read_text())
    assert [c["case_id"] for c in content["cases"]] == ["x"]
    assert content["cases"][0]["dice_tc"] == 1.0 and content["cases"][0]["dice_et"] == 1.0
    assert "different affines" in content["errors"]["y"]


PINNED = [
    f"{name}_{r}"
    for name in ("dice", "hd95", "nsd", "lesion_dice", "lesion_hd95", "lesion_nsd", "lesion_tp")
    + ("lesion_fp", "lesion_fn", "lesion_f1")
    for r in ("wt", "tc", "et")
]


def test_metrics_choice_and_pinned_keys(tmp_path):
    """--metrics all writes every pinned key in each case row of metrics.csv and metrics.json;
    NaN (official lesion-wise value of an empty region) is JSON null and left out of the mean;
    legacy / lesionwise write only their own keys."""
    shape = (16, 12, 12)
    gt_root, pred = tmp_path / "gt", tmp_path / "pred"
    pred.mkdir()
    images = {m: np.ones(shape, np.float32) for m in MODALITIES}
    a = _cube(shape, (2, 2, 2), (6, 6, 6), 4)
    b = _cube(shape, (2, 2, 2), (6, 6, 6), 2)  # edema only: TC/ET empty in both
    write_case(gt_root, "a", images, np.eye(4), a)
    write_case(gt_root, "b", images, np.eye(4), b)
    split = a.copy()
    split[:, 4, :] = 0  # prediction splits the lesion: 1 TP, 1 FP
    nib.save(nib.Nifti1Image(split, np.eye(4)), pred / "a.nii.gz")
    nib.save(nib.Nifti1Image(b, np.eye(4)), pred / "b.nii.gz")
    assert evaluate_main(["--pred", str(pred), "--gt", str(gt_root)]) == 0
    rows = list(csv.DictReader(open(pred / "metrics.csv")))
    for key in PINNED:
        assert key in rows[0], key
    assert rows[0]["lesion_tp_et"] == "1" and rows[0]["lesion_fp_et"] == "1"
    assert float(rows[0]["lesion_f1_et"]) == pytest.approx(2 / 3)
    content = json.loads((pred / "metrics.json").read_text())
    case_b = content["cases"][1]
    assert case_b["lesion_dice_et"] is None and case_b["dice_et"] == 1.0  # official vs legacy
    assert case_b["lesion_dice_wt"] == 1.0 and case_b["lesion_f1_wt"] == 1.0
    assert content["mean"]["lesion_dice_et"] == pytest.approx(content["cases"][0]["lesion_dice_et"])
    assert content["metrics"] == "all"

    out = tmp_path / "legacy"
    argv = ["--pred", str(pred), "--gt", str(gt_root), "--out", str(out), "--metrics", "legacy"]
    assert evaluate_main(argv) == 0
    header = open(out / "metrics.csv").readline().strip().split(",")
    assert header == ["case_id", *[f"dice_{r}" for r in "wt tc et".split()],
                      *[f"hd95_{r}" for r in "wt tc et".split()], "status"]  # fmt: skip
    out = tmp_path / "lesion"
    argv[-3:] = [str(out), "--metrics", "lesionwise"]
    assert evaluate_main(argv) == 0
    header = open(out / "metrics.csv").readline().strip().split(",")
    assert "dice_wt" not in header and "lesion_f1_wt" in header and "nsd_et" in header


def test_resection_cavity_scheme(tmp_path):
    """BraTS 2024+: label 4 is the cavity (ET = 3) - accepted with --resection-cavity and in no
    region; without it, label 4 under --et-label 3 is a per-case error naming the value."""
    shape = (16, 12, 12)
    gt_dir, pred = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred.mkdir()
    gt = _cube(shape, (2, 2, 2), (6, 6, 6), 3)
    gt[10:14, 2:6, 2:6] = 4
    nib.save(nib.Nifti1Image(gt, np.eye(4)), gt_dir / "x.nii.gz")
    nib.save(nib.Nifti1Image(_cube(shape, (2, 2, 2), (6, 6, 6), 3), np.eye(4)), pred / "x.nii.gz")
    base = ["--pred", str(pred), "--gt", str(gt_dir), "--et-label", "3"]
    assert evaluate_main([*base, "--resection-cavity"]) == 0
    case = json.loads((pred / "metrics.json").read_text())["cases"][0]
    assert case["dice_wt"] == 1.0 and case["lesion_dice_wt"] == 1.0 and case["lesion_fn_wt"] == 0
    assert evaluate_main(base) == 1
    errors = json.loads((pred / "metrics.json").read_text())["errors"]
    assert "label value(s) [4]" in errors["x"]
    assert evaluate_main([*base[:-1], "4", "--resection-cavity"]) == 2  # cavity needs ET 3
