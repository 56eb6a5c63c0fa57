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
