"""check-data: deliberately broken datasets, every problem listed together."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from segmerge.data import (
    DatasetError,
    filter_valid,
    load_dataset,
    save_nifti,
    val_transforms,
    validate_dataset,
    write_phantom_dataset,
)
from segmerge.data.cli import check_data_main


def _f(root, i, suffix):
    cid = f"BraTS2021_{i:05d}"
    return root / cid / f"{cid}_{suffix}.nii.gz"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    write_phantom_dataset(root, 8, size=24, seed=7, progress=False)
    (root / "dataset.json").unlink()  # exercise BraTS-folder detection
    return root


@pytest.fixture(scope="module")
def broken(clean, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken") / "ds"
    shutil.copytree(clean, root)
    # 0: truncated .nii.gz
    p = _f(root, 0, "flair")
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    # 1: shape mismatch
    img = nib.load(_f(root, 1, "t2"))
    save_nifti(_f(root, 1, "t2"), np.asanyarray(img.dataobj)[:, :, :20], img.affine)
    # 2: affine mismatch (origin shifted 2 mm)
    img = nib.load(_f(root, 2, "t1"))
    aff = img.affine.copy()
    aff[0, 3] += 2.0
    save_nifti(_f(root, 2, "t1"), np.asanyarray(img.dataobj), aff)
    # 3: a 3 in an ET = 4 dataset
    img = nib.load(_f(root, 3, "seg"))
    lab = np.asanyarray(img.dataobj).copy()
    lab[lab == 2] = 3
    save_nifti(_f(root, 3, "seg"), lab, img.affine)
    # 4: NaN voxels
    img = nib.load(_f(root, 4, "t1ce"))
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, :5] = np.nan
    save_nifti(_f(root, 4, "t1ce"), data, img.affine)
    # 5: missing file
    _f(root, 5, "t2").unlink()
    # 6: empty (all-zero) sequence
    img = nib.load(_f(root, 6, "flair"))
    save_nifti(_f(root, 6, "flair"), np.zeros(img.shape, np.float32), img.affine)
    return root


EXPECTED = {
    "BraTS2021_00000": ("flair", "file loads"),
    "BraTS2021_00001": ("t2", "shape matches"),
    "BraTS2021_00002": ("t1", "affine matches"),
    "BraTS2021_00003": ("seg", "label values in {0, 1, 2, 4}"),
    "BraTS2021_00004": ("t1ce", "finite intensities"),
    "BraTS2021_00005": ("t2", "file exists"),
    "BraTS2021_00006": ("flair", "sequence not empty"),
}


def test_clean_dataset_has_no_problem(clean):
    spec = load_dataset(clean)
    assert spec.layout == "brats2021"
    assert validate_dataset(spec) == []


def test_every_problem_listed_with_case_file_rule_value(broken):
    problems = validate_dataset(load_dataset(broken))
    by_case = {}
    for p in problems:
        by_case.setdefault(p.case, []).append(p)
    assert set(by_case) == set(EXPECTED), problems
    for case, (suffix, rule) in EXPECTED.items():
        assert any(
            p.file.endswith(f"_{suffix}.nii.gz") and rule in p.rule for p in by_case[case]
        ), by_case[case]
    label_problem = next(p for p in by_case["BraTS2021_00003"] if "label" in p.rule)
    assert label_problem.value.startswith("3 (") and "voxels" in label_problem.value
    assert "5 NaN" in by_case["BraTS2021_00004"][0].value
    assert "BraTS2021_00003" in str(label_problem)
    valid, skipped = filter_valid(load_dataset(broken, val_fraction=0).training, problems)
    assert [v["case_id"] for v in valid] == ["BraTS2021_00007"]
    assert skipped == sorted(EXPECTED)


def test_check_data_cli_lists_all_and_fails(broken, capsys):
    assert check_data_main([str(broken), "--quiet"]) == 1
    out = capsys.readouterr().out
    for case in EXPECTED:
        assert case in out
    assert "BraTS2021_00007" not in out


def test_allow_missing_gives_availability_mask(clean, tmp_path):
    root = tmp_path / "incomplete"
    shutil.copytree(clean, root)
    _f(root, 1, "t2").unlink()
    assert any(p.rule == "file exists" for p in validate_dataset(load_dataset(root)))
    spec = load_dataset(root, allow_missing=True, val_fraction=0)
    assert validate_dataset(spec) == []
    assert check_data_main([str(root), "--allow-missing", "--quiet"]) == 0
    item = next(i for i in spec.training if i["case_id"] == "BraTS2021_00001")
    assert item["t2"] is None
    out = val_transforms()(item)
    assert out["available"].tolist() == [True, True, True, False]
    assert torch.count_nonzero(out["image"][3]) == 0 and torch.count_nonzero(out["image"][0]) > 0


def test_empty_folder_and_unreadable_datalist(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty folder"):
        load_dataset(empty)
    assert check_data_main([str(empty), "--quiet"]) == 1
    assert "empty folder" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('{"training": [ {"flair": ')
    with pytest.raises(DatasetError, match="unreadable datalist"):
        load_dataset(bad)
    assert check_data_main([str(bad), "--quiet"]) == 1
    assert "unreadable datalist" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no BraTS case folders"):
        load_dataset(tmp_path / "other")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope")


def test_datalist_missing_label_and_duplicate_ids(clean, tmp_path):
    items = load_dataset(clean, val_fraction=0).training[:2]
    dl = {
        "training": [{k: v for k, v in items[0].items() if k != "label"}, items[1], dict(items[1])]
    }
    (tmp_path / "d.json").write_text(json.dumps(dl))
    # two items with one case id: refused where the datalist is read, naming both items
    with pytest.raises(DatasetError, match=r"d.json: training\[1\] and training\[2\] both have"):
        load_dataset(tmp_path / "d.json", val_fraction=0)
    dl["training"].pop()
    (tmp_path / "d.json").write_text(json.dumps(dl))
    problems = validate_dataset(load_dataset(tmp_path / "d.json", val_fraction=0))
    rules = {(p.case, p.rule) for p in problems}
    assert (items[0]["case_id"], "training cases have a label") in rules


def test_gzip_header_is_deterministic(clean):
    raw = _f(clean, 0, "seg").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\x00\x00\x00\x00"  # gzip mtime 0
    assert gzip.decompress(raw)[344:348] == b"n+1\x00"  # NIfTI-1 single-file magic
