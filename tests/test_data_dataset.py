"""Phantom datasets on disk: layouts, auto-detection, determinism, splits, CLI, preview."""

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segmerge.conventions import MODALITIES
from segmerge.data import (
    DatasetError,
    case_file_names,
    load_dataset,
    make_phantom_case,
    split_cases,
    write_phantom_dataset,
)
from segmerge.data.cli import check_data_main, phantoms_main
from segmerge.data.phantom_io import case_seed


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ds2021(tmp_path_factory):
    out = tmp_path_factory.mktemp("p2021")
    write_phantom_dataset(out, 5, size=32, seed=3, progress=False)
    return out


def test_brats2021_layout_and_datalist(ds2021):
    case = ds2021 / "BraTS2021_00002"
    names = sorted(p.name for p in case.iterdir())
    assert names == sorted(
        f"BraTS2021_00002_{s}.nii.gz" for s in ("flair", "t1", "t1ce", "t2", "seg")
    )
    img = nib.load(case / "BraTS2021_00002_t1ce.nii.gz")
    seg = nib.load(case / "BraTS2021_00002_seg.nii.gz")
    assert img.get_data_dtype() == np.float32 and seg.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, seg.affine) and img.header.get_xyzt_units()[0] == "mm"
    # Files hold exactly the in-memory case.
    mem = make_phantom_case(size=32, seed=case_seed(3, 2))
    assert np.array_equal(np.asanyarray(img.dataobj), mem.images["t1ce"])
    assert np.array_equal(np.asanyarray(seg.dataobj), mem.label)
    dl = json.loads((ds2021 / "dataset.json").read_text())
    assert len(dl["training"]) == 4 and len(dl["validation"]) == 1
    assert set(dl["training"][0]) == {"case_id", *MODALITIES, "label"}
    assert not Path(dl["training"][0]["flair"]).is_absolute()


def test_auto_detect_datalist_folder_file_and_brats2021(ds2021, tmp_path):
    by_folder = load_dataset(ds2021)
    by_file = load_dataset(ds2021 / "dataset.json")
    assert by_folder.layout == by_file.layout == "datalist"
    assert [i["case_id"] for i in by_folder.validation] == [
        i["case_id"] for i in by_file.validation
    ]
    for it in by_folder.all_items():
        assert all(
            Path(it[k]).is_file() and Path(it[k]).is_absolute() for k in (*MODALITIES, "label")
        )
    # The same folder without dataset.json is recognised as BraTS 2021.
    plain = tmp_path / "plain"
    shutil.copytree(ds2021, plain)
    (plain / "dataset.json").unlink()
    spec = load_dataset(plain, val_fraction=0.4)
    assert spec.layout == "brats2021" and len(spec.training) == 3 and len(spec.validation) == 2
    wrapped = tmp_path / "archive"
    wrapped.mkdir()
    shutil.copytree(plain, wrapped / "BraTS2021_TrainingData")
    assert len(load_dataset(wrapped)) == 5
    # A case without seg becomes a testing case.
    next((plain / "BraTS2021_00004").glob("*_seg.nii.gz")).unlink()
    spec = load_dataset(plain)
    assert [i["case_id"] for i in spec.testing] == [
        "BraTS2021_00004"
    ] and "label" not in spec.testing[0]


def test_brats2023_layout_et3_and_detection(tmp_path):
    path = write_phantom_dataset(
        tmp_path / "g", 3, size=32, seed=1, et_label=3, layout="brats2023", progress=False
    )
    names = sorted(p.name for p in (path.parent / "BraTS-GLI-00001-000").iterdir())
    assert names == sorted(
        f"BraTS-GLI-00001-000-{s}.nii.gz" for s in ("t2f", "t1n", "t1c", "t2w", "seg")
    )
    path.unlink()
    spec = load_dataset(path.parent, et_label=3)
    assert spec.layout == "brats2023" and len(spec) == 3
    item = spec.all_items()[0]
    assert item["flair"].endswith("-t2f.nii.gz") and item["t1ce"].endswith("-t1c.nii.gz")
    labels = set()
    for it in spec.all_items():
        labels |= set(np.unique(np.asanyarray(nib.load(it["label"]).dataobj)).tolist())
    assert 3 in labels and 4 not in labels


def test_byte_identical_and_independent_of_workers(ds2021, tmp_path):
    write_phantom_dataset(tmp_path / "again", 5, size=32, seed=3, workers=2, progress=False)
    assert _digest(tmp_path / "again") == _digest(ds2021)
    write_phantom_dataset(tmp_path / "other", 2, size=32, seed=4, progress=False)
    a = (ds2021 / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz").read_bytes()
    b = (tmp_path / "other" / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz").read_bytes()
    assert a != b


def test_split_is_deterministic_and_sane():
    ids = [f"c{i}" for i in range(10)]
    assert split_cases(ids, 0.2, 0) == split_cases(list(reversed(ids)), 0.2, 0)
    assert len(split_cases(ids, 0.2, 0)) == 2
    assert len(split_cases(ids[:2], 0.01, 0)) == 1 and len(split_cases(ids[:1], 0.5, 0)) == 0
    assert split_cases(ids, 0.0, 0) == set()
    with pytest.raises(ValueError, match="val_fraction"):
        split_cases(ids, 1.0)


def test_datalist_relative_paths_aliases_and_bad_forms(ds2021, tmp_path):
    case = ds2021 / "BraTS2021_00001"
    dl = {
        "training": [
            {
                "t2f": str(case / "BraTS2021_00001_flair.nii.gz"),
                "t1n": "x/t1.nii.gz",
                "t1c": "x/t1ce.nii.gz",
                "t2w": "x/t2.nii.gz",
                "seg": "x/seg.nii.gz",
            }
        ]
    }
    (tmp_path / "list.json").write_text(json.dumps(dl))
    spec = load_dataset(tmp_path / "list.json", val_fraction=0.0)
    item = spec.training[0]
    assert item["case_id"] == "BraTS2021_00001"
    assert item["t1"] == str(tmp_path / "x" / "t1.nii.gz") and item["label"] == str(
        tmp_path / "x" / "seg.nii.gz"
    )
    (tmp_path / "img.json").write_text(
        json.dumps({"training": [{"image": ["a", "b"], "label": "l"}]})
    )
    with pytest.raises(DatasetError, match="keyed by name"):
        load_dataset(tmp_path / "img.json")
    with pytest.raises(ValueError, match="unknown layout 'brats2022'.*did you mean"):
        case_file_names("brats2022", "x")


def test_cli_phantoms_with_preview_then_check_data(tmp_path, capsys):
    out, png = tmp_path / "cli", tmp_path / "montage.png"
    rc = phantoms_main(
        [
            "--out",
            str(out),
            "--cases",
            "2",
            "--size",
            "32",
            "--seed",
            "2",
            "--quiet",
            "--preview",
            str(png),
            "--layout",
            "brats2023",
            "--et-label",
            "3",
        ]
    )
    assert rc == 0 and (out / "dataset.json").is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "wrote 2 cases" in capsys.readouterr().out
    assert check_data_main([str(out), "--et-label", "3", "--quiet"]) == 0
    assert "OK: 2 cases" in capsys.readouterr().out
    assert check_data_main([str(out), "--quiet"]) == 1  # declared et_label 3, configured 4
    assert "declared et_label" in capsys.readouterr().out


def test_bad_arguments_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown layout"):
        write_phantom_dataset(tmp_path / "a", 2, size=24, layout="brats2020", progress=False)
    with pytest.raises(ValueError, match="cases must be at least 1"):
        write_phantom_dataset(tmp_path / "a", 0, size=24, progress=False)
    with pytest.raises(ValueError, match="et_label"):
        write_phantom_dataset(tmp_path / "a", 1, size=24, et_label=2, progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        write_phantom_dataset(tmp_path / "a", 1, size=24, val_fraction=1.5, progress=False)
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        write_phantom_dataset(tmp_path / "file", 1, size=24, progress=False)


def test_mixed_layouts_are_refused(ds2021, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(ds2021, mixed)
    (mixed / "dataset.json").unlink()
    write_phantom_dataset(tmp_path / "g", 1, size=24, layout="brats2023", progress=False)
    shutil.copytree(tmp_path / "g" / "BraTS-GLI-00000-000", mixed / "BraTS-GLI-00000-000")
    with pytest.raises(DatasetError, match="mix BraTS layouts"):
        load_dataset(mixed)
