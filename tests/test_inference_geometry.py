"""Predictions come back in exactly the input's grid, and in the right place.

One synthetic case is written as-is and as re-gridded copies of itself: flipped (not RAS),
sagittal and coronal voxel orders (permuted axes), resampled (non-1 mm, anisotropic). Each copy
covers the same anatomy in world space, so its prediction must be the reference prediction carried
into that copy's grid: exactly for flips and permutations, up to resampling for the anisotropic
copy. An oblique copy keeps the voxels under a rotated affine and must keep the voxel labels. The
stand-in network is not flip/permutation symmetric, so skipping the reorientation to RAS is caught
(negative control).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from monai.data import MetaTensor
from monai.transforms import Spacing
from test_inference_helpers import (
    blob_case,
    dice,
    digests,
    make_predictor,
    permute_flip,
    resample_nearest,
    write_case,
)

from segmerge.conventions import labels_to_regions
from segmerge.inference import discover_cases

ANISO_ZOOMS = (1.6, 0.7, 1.3)
# name -> (axis permutation, flipped axes)
REORDERINGS = {
    "lps": ((0, 1, 2), (0, 1)),
    "sagittal": ((1, 2, 0), (1,)),
    "coronal": ((0, 2, 1), (2,)),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry")
    ref_images, ref_affine = blob_case()
    write_case(root, "ref", ref_images, ref_affine)
    for name, (perm, flips) in REORDERINGS.items():
        images = {}
        for key, arr in ref_images.items():
            images[key], affine = permute_flip(arr, ref_affine, perm, flips)
        write_case(root, name, images, affine)
    # anisotropic, non-native spacing, also flipped: MONAI resamples the images (bilinear)
    resample = Spacing(pixdim=ANISO_ZOOMS, mode="bilinear")
    images = {}
    for key, arr in ref_images.items():
        flipped, aff = permute_flip(arr, ref_affine, (0, 1, 2), (0,))
        out = resample(MetaTensor(flipped[None].copy(), affine=aff))
        images[key] = out[0].numpy()
        affine = out.affine.numpy()
    write_case(root, "aniso", images, affine)
    # oblique: the same voxels under an affine rotated 20 degrees about z (closest axes still RAS)
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rotation = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    write_case(root, "oblique", ref_images, rotation @ ref_affine)
    return root


@pytest.fixture(scope="module")
def predicted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("geometry_out")
    before = digests(dataset)
    report = make_predictor().predict_dataset(dataset, out)
    assert digests(dataset) == before, "inputs were modified"
    assert not report.failures, report.summary()
    return out


def _load(path):
    img = nib.load(str(path))
    return img, np.asarray(img.dataobj)


@pytest.mark.parametrize("name", ["ref", *REORDERINGS, "aniso", "oblique"])
def test_prediction_has_exactly_the_input_grid(dataset, predicted, name):
    ref_img, _ = _load(dataset / name / f"{name}_flair.nii.gz")
    out_img, labels = _load(predicted / f"{name}.nii.gz")
    assert out_img.shape == ref_img.shape
    assert np.array_equal(out_img.affine, ref_img.affine)
    assert out_img.get_data_dtype() == np.uint8 and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2, 4}


def test_reference_prediction_is_not_trivial(predicted):
    _, labels = _load(predicted / "ref.nii.gz")
    regions = labels_to_regions(labels)
    for r in regions:  # every region present, none covers the whole volume
        assert 0 < r.sum() < r.size / 2


@pytest.mark.parametrize("name", list(REORDERINGS))
def test_reordered_input_gives_the_reordered_prediction(dataset, predicted, name):
    perm, flips = REORDERINGS[name]
    _, ref_labels = _load(predicted / "ref.nii.gz")
    _, labels = _load(predicted / f"{name}.nii.gz")
    expected, _ = permute_flip(ref_labels, np.eye(4), perm, flips)
    assert np.array_equal(labels, expected)


def test_oblique_affine_keeps_the_voxel_prediction(predicted):
    """Same voxels, rotated affine: reorientation is the identity, so labels match voxel for voxel."""
    _, ref_labels = _load(predicted / "ref.nii.gz")
    _, labels = _load(predicted / "oblique.nii.gz")
    assert np.array_equal(labels, ref_labels)


def test_anisotropic_input_gives_the_resampled_prediction(dataset, predicted):
    ref_img, ref_labels = _load(predicted / "ref.nii.gz")
    img, labels = _load(predicted / "aniso.nii.gz")
    expected = resample_nearest(ref_labels, ref_img.affine, img.shape, img.affine)
    for got, want in zip(labels_to_regions(labels), labels_to_regions(expected)):
        assert want.sum() > 0
        assert dice(got, want) > 0.8


def test_resampling_to_a_training_spacing_and_back(dataset, tmp_path):
    """With ``pixdim`` set, Spacingd resamples to it and Invertd resamples back."""
    out = tmp_path / "out"
    report = make_predictor(pixdim=[1.0, 1.0, 1.0]).predict_dataset(dataset, out)
    assert not report.failures, report.summary()
    src, _ = _load(dataset / "aniso" / "aniso_t1.nii.gz")
    ref_img, ref_labels = _load(out / "ref.nii.gz")
    img, labels = _load(out / "aniso.nii.gz")
    assert img.shape == src.shape and np.array_equal(img.affine, src.affine)
    expected = resample_nearest(ref_labels, ref_img.affine, img.shape, img.affine)
    for got, want in zip(labels_to_regions(labels), labels_to_regions(expected)):
        assert dice(got, want) > 0.9


def test_negative_control_without_reorientation_the_check_fails(dataset, tmp_path):
    """Drop Orientationd: the sagittal copy is then predicted in the wrong orientation."""
    out = tmp_path / "out"
    predictor = make_predictor(drop=("Orientationd",))
    for name in ("ref", "sagittal"):
        case = next(c for c in discover_cases(dataset) if c.case_id == name)
        predictor.predict_case(case, out)
    _, ref_labels = _load(out / "ref.nii.gz")
    _, labels = _load(out / "sagittal.nii.gz")
    expected, _ = permute_flip(ref_labels, np.eye(4), *REORDERINGS["sagittal"])
    assert np.mean(labels == expected) < 0.95
