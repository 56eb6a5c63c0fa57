"""Lesion-wise BraTS metrics against the official ``brats-evaluation`` package (the oracle).

The oracle (AGPL) is a test-only extra (``pip install .[oracle]``, which CI installs); segmerge
itself never imports it. Phantoms are small label maps (24 x 20 x 22) with known lesions: empty
maps, a single lesion, a lesion split in two by the prediction, false positives only, several
lesions, for the three label schemes (BraTS 2021 ET = 4, 2023 ET = 3, 2024+ with the resection
cavity 4). Isotropic cases go through ``evaluate_single_exam`` on NIfTI files exactly as the
official command does; anisotropic ones through the evaluator's array API with the voxel size
given (from files the package reads arrays in SimpleITK's z, y, x order but pairs them with the
x, y, z spacing, so its millimetre distances are only right for isotropic voxels).
"""

from __future__ import annotations

import math
import warnings

import nibabel as nib
import numpy as np
import pytest

from segmerge.conventions import REGIONS, labels_to_regions
from segmerge.inference.evaluate import case_metrics
from segmerge.inference.lesionwise import (
    HD95_INF_AS,
    LESION_KEYS,
    region_lesion_metrics,
    surface_distances,
)

SHAPE = (24, 20, 22)

# our key -> (official result key); tp/fp/fn/f1 and the global and lesion-wise means
OFFICIAL = {
    "global_dice": "global_bin_dsc",
    "global_hd95": "global_bin_hd95",
    "nsd": "global_bin_nsd",
    "lesion_dice": "sq_dsc",
    "lesion_hd95": "sq_hd95",
    "lesion_nsd": "sq_nsd",
    "lesion_tp": "tp",
    "lesion_fp": "fp",
    "lesion_fn": "fn",
    "lesion_f1": "rq",
}


def _box(lab: np.ndarray, lo, hi, value: int) -> None:
    lab[tuple(slice(a, b) for a, b in zip(lo, hi))] = value


def _tumour(lab: np.ndarray, lo, et: int) -> None:
    """A 3-layer lesion at ``lo``: edema shell, necrosis, enhancing core (all regions hit)."""
    x, y, z = lo
    _box(lab, (x, y, z), (x + 7, y + 7, z + 7), 2)
    _box(lab, (x + 1, y + 1, z + 1), (x + 6, y + 6, z + 6), 1)
    _box(lab, (x + 2, y + 2, z + 2), (x + 5, y + 5, z + 5), et)


def _cases(et: int, rc: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (prediction, reference) label maps."""
    z = np.zeros(SHAPE, np.uint8)
    cases: dict[str, tuple[np.ndarray, np.ndarray]] = {"both_empty": (z, z)}
    ref = z.copy()
    _tumour(ref, (3, 3, 3), et)
    cases["empty_prediction"] = (z, ref)
    cases["perfect"] = (ref, ref)
    shifted = z.copy()
    _tumour(shifted, (4, 3, 2), et)
    cases["single_lesion_shifted"] = (shifted, ref)
    split = ref.copy()
    split[:, 6, :] = 0  # the prediction cuts the lesion in two: one match, one false positive
    cases["split_lesion"] = (split, ref)
    fp_only = z.copy()
    _box(fp_only, (15, 12, 14), (19, 15, 18), 2)
    _box(fp_only, (2, 14, 2), (4, 17, 5), et)
    cases["false_positive_only"] = (fp_only, z)
    several = ref.copy()
    _box(several, (16, 13, 14), (20, 17, 19), 2)  # a second lesion the prediction misses
    pred = shifted.copy()
    _box(pred, (17, 2, 15), (19, 5, 18), 1)  # and a false positive elsewhere
    cases["missed_and_false_positive"] = (pred, several)
    far = z.copy()
    _tumour(far, (14, 11, 13), et)
    cases["no_overlap"] = (far, ref)
    if rc:
        with_rc = ref.copy()
        _box(with_rc, (14, 2, 12), (20, 8, 20), 4)  # resection cavity: in no region
        pred_rc = shifted.copy()
        _box(pred_rc, (14, 12, 2), (18, 16, 6), 4)
        cases["resection_cavity"] = (pred_rc, with_rc)
    return cases


SCHEMES = {"brats2021": (4, False), "brats2023": (3, False), "brats2024": (3, True)}


@pytest.fixture(scope="module")
def oracle():
    be = pytest.importorskip(
        "brats_evaluation",
        reason="the official brats-evaluation package (test extra 'oracle') is not installed",
    )
    from panoptica import Panoptica_Evaluator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = Panoptica_Evaluator.load_from_config(str(be.config_path("gli")))
    return be, evaluator


def _to_official(labels: np.ndarray, et: int) -> np.ndarray:
    """The official adult-glioma config reads ET as 3 (and 4 as the cavity)."""
    out = labels.copy()
    if et == 4:
        out[labels == 4] = 3
    return out


def _official_values(res: dict, region: str) -> dict[str, float]:
    got = {}
    for ours, theirs in OFFICIAL.items():
        value = float(res[region][theirs])
        if "hd95" in ours and math.isinf(value):
            value = HD95_INF_AS  # the official parser's 373 (and ours) for infinity
        got[f"{ours}_{region}"] = value
    return got


def _assert_same(ours: dict, theirs: dict, label: str) -> None:
    for key, expected in theirs.items():
        actual = float(ours[key])
        if math.isnan(expected):
            assert math.isnan(actual), f"{label} {key}: {actual} != NaN"
        else:
            assert actual == pytest.approx(expected, rel=1e-9, abs=1e-9), f"{label} {key}"


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_equal_to_official_package_on_files(oracle, scheme, tmp_path):
    """Isotropic 1 mm phantoms through the official per-case function on NIfTI files."""
    be, evaluator = oracle
    et, rc = SCHEMES[scheme]
    for name, (pred, ref) in _cases(et, rc).items():
        p, r = tmp_path / f"{name}_pred.nii.gz", tmp_path / f"{name}_ref.nii.gz"
        nib.save(nib.Nifti1Image(_to_official(pred, et), np.eye(4)), p)
        nib.save(nib.Nifti1Image(_to_official(ref, et), np.eye(4)), r)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = be.evaluate_single_exam(str(p), str(r), name, evaluator)
        assert "error" not in res, res
        ours = case_metrics(pred, ref, (1.0, 1.0, 1.0), et, "lesionwise", rc)
        assert set(ours) == set(LESION_KEYS)
        for region in REGIONS:
            _assert_same(ours, _official_values(res, region), f"{scheme}/{name}")


def test_equal_to_official_package_anisotropic(oracle):
    """Millimetre distances with anisotropic voxels (array API, spacing passed explicitly)."""
    _, evaluator = oracle
    spacing = (1.2, 1.0, 1.5)
    for name, (pred, ref) in _cases(3, False).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = evaluator.evaluate(pred, ref, voxelspacing=spacing)
        res = {k: v.to_dict(True) for k, v in res.items()}
        ours = case_metrics(pred, ref, spacing, 3, "lesionwise")
        for region in REGIONS:
            _assert_same(ours, _official_values(res, region), f"anisotropic/{name}")


def test_known_values_without_the_oracle():
    """Hand-checkable values: a split lesion gives 1 TP + 1 FP; empty maps give NaN."""
    ref = np.zeros((12, 12, 12), bool)
    ref[2:8, 2:8, 2:8] = True
    split = ref.copy()
    split[:, 4, :] = False  # pieces of 6x2x6 and 6x3x6 voxels
    m = region_lesion_metrics(split, ref, (1.0, 1.0, 1.0))
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)
    assert m["f1"] == pytest.approx(1 / (1 + 0.5))
    assert m["dice"] == pytest.approx(2 * 108 / (108 + 216))  # the larger piece is matched
    assert m["global_dice"] == pytest.approx(2 * 180 / (180 + 216))
    empty = np.zeros_like(ref)
    m = region_lesion_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert all(math.isnan(m[k]) for k in ("dice", "hd95", "nsd", "f1", "global_dice"))
    m = region_lesion_metrics(ref, empty, (1.0, 1.0, 1.0))  # false positive only
    assert (m["tp"], m["fp"], m["fn"], m["f1"]) == (0, 1, 0, 0.0)
    assert m["dice"] == 0.0 and math.isinf(m["hd95"]) and m["nsd"] == 0.0
    d_ab, d_ba = surface_distances(ref, np.roll(ref, 2, axis=0), (2.0, 1.0, 1.0))
    assert d_ab.max() == pytest.approx(4.0) and d_ba.max() == pytest.approx(4.0)


def test_labels_outside_the_scheme_are_refused():
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:4, 2:4, 2:4] = 4
    with pytest.raises(ValueError, match=r"label value\(s\) \[4\]"):
        case_metrics(lab, lab, (1, 1, 1), et_label=3)  # BraTS 2023 has no label 4
    m = case_metrics(lab, lab, (1, 1, 1), et_label=3, resection_cavity=True)
    assert math.isnan(m["lesion_dice_wt"])  # the cavity is in no region
    with pytest.raises(ValueError, match="needs et_label 3"):
        case_metrics(lab, lab, (1, 1, 1), et_label=4, resection_cavity=True)


def test_validation_logs_lesionwise_means():
    """engine.validate: val/lesion_dice|lesion_hd95|lesion_f1/<region> next to Dice/HD95; a
    region empty in prediction and label of every case (NaN officially) is not logged."""
    import torch

    from segmerge.engine.validation import validate

    class Oracle(torch.nn.Module):  # predicts the label itself: logits +-10
        def __init__(self, label: torch.Tensor) -> None:
            super().__init__()
            self.label = label

        def forward(self, x, available=None):
            return (self.label[None].expand(x.shape[0], -1, -1, -1, -1) * 20.0 - 10.0).to(x)

    lab = np.zeros((16, 16, 16), np.uint8)
    lab[2:7, 2:7, 2:7] = 2
    lab[10:14, 10:14, 10:14] = 1  # WT: two lesions, TC: one, ET: none
    label = torch.as_tensor(labels_to_regions(lab, 4)).float()
    case = {"image": torch.zeros(4, 16, 16, 16), "label": label, "available": torch.ones(4)}
    result = validate(Oracle(label), [case], (16, 16, 16), torch.device("cpu"))
    values = result.metrics()
    assert values["val/lesion_dice/wt"] == 1.0 and values["val/lesion_f1/tc"] == 1.0
    assert values["val/lesion_hd95/wt"] == 0.0
    assert "val/lesion_dice/et" not in values and values["val/dice/et"] == 1.0


def test_resection_cavity_scheme_in_check_data_and_transforms(tmp_path):
    """BraTS 2024+ labels (ET 3, cavity 4): check-data and the label transforms accept them with
    the flag, refuse label 4 without it, and the cavity is in no region."""
    import torch
    from test_inference_helpers import phantom, write_case

    from segmerge.data.cli import check_data_main
    from segmerge.data.transforms import CheckLabeld, val_transforms

    case = phantom(32, 0)
    label = case.label.copy()
    label[label == 4] = 3
    label[:4, :4, :4] = 4  # a resection cavity in a corner
    write_case(tmp_path / "ds", "c2024", case.images, case.affine, label)
    base = [str(tmp_path / "ds"), "--et-label", "3", "--quiet", "--workers", "1"]
    assert check_data_main(base) == 1  # 4 is not a BraTS 2023 label
    assert check_data_main([*base, "--resection-cavity"]) == 0
    assert check_data_main([*base[:2], "4", *base[3:], "--resection-cavity"]) == 2
    with pytest.raises(ValueError, match=r"values \[4\]"):
        CheckLabeld("label", et_label=3)({"label": torch.as_tensor(label)})
    item = {"case_id": "c2024", "label": str(tmp_path / "ds/c2024/c2024_seg.nii.gz")}
    item.update({m: str(tmp_path / f"ds/c2024/c2024_{m}.nii.gz") for m in case.images})
    out = val_transforms(et_label=3, resection_cavity=True)(item)
    assert out["label"].shape[0] == len(REGIONS)
    # the cavity is in no region: WT counts exactly the voxels labelled 1, 2 or 3
    assert float(out["label"][0].sum()) == float(np.isin(label, (1, 2, 3)).sum())
    assert (label == 4).sum() == 64
