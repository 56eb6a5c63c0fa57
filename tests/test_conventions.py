import numpy as np
import pytest
import torch

from segmerge.conventions import (
    MODALITIES,
    REGIONS,
    check_et_label,
    label_set,
    labels_to_regions,
    regions_to_labels,
)


def test_names_and_order_are_the_documented_ones():
    assert MODALITIES == ("flair", "t1", "t1ce", "t2")
    assert REGIONS == ("wt", "tc", "et")


@pytest.mark.parametrize("et", [4, 3])
def test_regions_are_nested_and_round_trip(et):
    rng = np.random.default_rng(0)
    lab = rng.choice(np.array(label_set(et), dtype=np.uint8), size=(6, 5, 4))
    reg = labels_to_regions(lab, et)
    wt, tc, etm = reg
    assert (etm <= tc).all() and (tc <= wt).all()
    assert wt.sum() == (lab > 0).sum()
    assert np.array_equal(regions_to_labels(reg, et), lab)
    t = torch.from_numpy(lab)
    assert torch.equal(labels_to_regions(t, et), torch.from_numpy(reg))
    assert torch.equal(regions_to_labels(torch.from_numpy(reg), et), t)


def test_region_priority_when_channels_disagree():
    # ET on wins over everything; TC without ET is NCR; WT alone is edema.
    reg = np.zeros((3, 4), dtype=bool)
    reg[:, 0] = [True, True, True]
    reg[:, 1] = [True, True, False]
    reg[:, 2] = [True, False, False]
    reg[:, 3] = [False, False, True]  # ET alone (not nested) still labelled ET
    assert regions_to_labels(reg, 4).tolist() == [4, 1, 2, 4]


def test_invalid_et_label_names_the_value():
    with pytest.raises(ValueError, match="et_label.*got 2"):
        check_et_label(2)


def test_validation_and_evaluation_report_the_same_hd95_in_mm_on_an_anisotropic_case():
    """Issue 11 #5: validation logged HD95 in voxels, evaluation in mm, into the same run."""
    from monai.data import MetaTensor

    from segmerge.engine.validation import validate
    from segmerge.inference.evaluate import region_metrics

    shape, zooms = (24, 20, 16), (1.0, 1.0, 3.0)
    gt = np.zeros(shape, np.uint8)
    gt[4:18, 4:16, 3:12] = 2
    gt[6:14, 6:12, 5:10] = 1
    gt[8:12, 8:10, 6:9] = 4
    pred = np.roll(gt, 1, axis=2)  # one voxel off along the 3 mm axis
    affine = np.diag([*zooms, 1.0])

    class Fixed(torch.nn.Module):  # region logits of `pred`, whatever the input
        def forward(self, x, available=None):
            logits = (torch.as_tensor(labels_to_regions(pred)).float() * 2 - 1) * 20
            return logits[None].expand(x.shape[0], -1, -1, -1, -1)

    case = {
        "image": MetaTensor(torch.ones(4, *shape), affine=torch.as_tensor(affine)),
        "label": torch.as_tensor(labels_to_regions(gt)).float(),
        "available": torch.ones(4, dtype=torch.bool),
    }
    val = validate(Fixed(), [case], shape, torch.device("cpu"), sw_batch_size=1)
    ev = region_metrics(pred, gt, zooms)
    for r in REGIONS:
        assert val.hd95[r] == pytest.approx(ev[f"hd95_{r}"], abs=1e-5), r
        assert val.dice[r] == pytest.approx(ev[f"dice_{r}"], abs=1e-6), r
    assert ev["hd95_wt"] == pytest.approx(3.0)  # mm, not voxels
    assert region_metrics(pred, gt, (1.0, 1.0, 1.0))["hd95_wt"] == pytest.approx(1.0)


def test_suggest_and_case_id_rule():
    from segmerge.conventions import case_id_problem, suggest

    assert suggest("flari", MODALITIES) == " (did you mean 'flair'?)"
    assert suggest("zzzz", MODALITIES) == ""
    assert case_id_problem("BraTS2021_00001") is None
    for bad in ("../x", "a/b", "a\\b", "", " ", "x\x1b", 3):
        assert case_id_problem(bad), bad
