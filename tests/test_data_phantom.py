"""Phantom realism (quantitative), variety, determinism and speed."""

import time

import numpy as np
import pytest

from segmerge.conventions import MODALITIES, labels_to_regions
from segmerge.data import make_phantom_case, mni_anatomy

SEEDS = range(12)


@pytest.fixture(scope="module")
def cases():
    return [make_phantom_case(size=40, seed=s) for s in SEEDS]


def _median(case, modality, region):
    return float(np.median(case.images[modality][region]))


def test_case_structure_and_types(cases):
    c = cases[0]
    assert set(c.images) == set(MODALITIES)
    for m in MODALITIES:
        assert c.images[m].shape == (40, 40, 40) and c.images[m].dtype == np.float32
    assert c.label.dtype == np.uint8 and c.label.shape == (40, 40, 40)
    assert c.affine.shape == (4, 4)
    assert set(np.unique(c.label)) <= {0, 1, 2, 4}


def test_affine_reflects_physical_size_of_the_brain():
    anat = mni_anatomy(48)
    # The template's brain box is ~145 x 181 x 155 mm at 1 mm; 48 voxels must span it.
    extent = anat.spacing * 47
    assert np.allclose(extent, [144, 180, 154], atol=2.0), extent
    assert np.allclose(np.abs(np.diag(anat.affine)[:3]), anat.spacing)
    # World origin inside the MNI box (RAS, mm).
    assert -100 < anat.affine[0, 3] < -50


def test_contrasts_within_each_case(cases):
    checked_et = 0
    for c in cases:
        lab = c.label
        wm = (c.tissues["wm"] > 0.9) & (lab == 0)
        csf = (c.tissues["csf"] > 0.7) & (lab == 0)
        edema = lab == 2
        assert wm.sum() > 50 and csf.sum() > 10 and edema.sum() > 0
        # Edema bright in FLAIR, CSF dark in FLAIR and bright in T2, relative to white matter.
        assert _median(c, "flair", edema) > 1.1 * _median(c, "flair", wm), c.info
        assert _median(c, "flair", csf) < 0.6 * _median(c, "flair", wm)
        assert _median(c, "t2", csf) > 1.5 * _median(c, "t2", wm)
        # GM darker than WM in T1 (real template contrast).
        gm = (c.tissues["gm"] > 0.8) & (lab == 0)
        assert _median(c, "t1", gm) < _median(c, "t1", wm)
        et = lab == 4
        if et.sum() >= 3:
            checked_et += 1
            assert _median(c, "t1ce", et) > 1.1 * _median(c, "t1ce", edema), c.info
        # Background is zero (skull-stripped), brain is positive.
        assert np.all(c.images["t1"][~c.tissues["wm"].astype(bool) & (c.images["flair"] == 0)] == 0)
    assert checked_et >= 6


def test_regions_nested_and_volumes_vary(cases):
    volumes = []
    for c in cases:
        wt, tc, et = labels_to_regions(c.label, 4)
        assert not np.any(et & ~tc) and not np.any(tc & ~wt)
        assert wt.any()
        volumes.append(c.info["wt_cc"])
    volumes = np.array(volumes)
    assert volumes.max() > 3 * volumes.min(), volumes
    assert volumes.min() > 1.0 and volumes.max() < 250.0
    centres = np.array([c.info["center_vox"] for c in cases])
    assert len({tuple(x) for x in centres}) == len(cases)
    # Both hemispheres (x axis is left-right in RAS).
    mid = 20
    assert (centres[:, 0] < mid).any() and (centres[:, 0] >= mid).any()


def test_some_cases_without_enhancing_or_necrosis():
    infos = [make_phantom_case(size=24, seed=s).info for s in range(60)]
    no_et = sum(not i["has_et"] for i in infos)
    no_ncr = sum(not i["has_necrosis"] for i in infos)
    assert 1 <= no_et <= 15, no_et  # ~10 %
    assert 2 <= no_ncr <= 20, no_ncr  # ~15 %


def test_no_et_case_has_core_labelled_necrotic():
    info_seed = next(s for s in range(60) if not make_phantom_case(size=24, seed=s).info["has_et"])
    c = make_phantom_case(size=24, seed=info_seed)
    assert not np.any(c.label == 4) and np.any(c.label == 1)


def test_deterministic_and_seed_dependent():
    a = make_phantom_case(size=32, seed=5)
    b = make_phantom_case(size=32, seed=5)
    c = make_phantom_case(size=32, seed=6)
    for m in MODALITIES:
        assert np.array_equal(a.images[m], b.images[m])
    assert np.array_equal(a.label, b.label)
    assert not np.array_equal(a.images["flair"], c.images["flair"])


def test_et_label_3():
    a = make_phantom_case(size=32, seed=1, et_label=4)
    b = make_phantom_case(size=32, seed=1, et_label=3)
    assert np.any(a.label == 4) and not np.any(b.label == 4)
    assert np.array_equal(a.label == 4, b.label == 3)
    with pytest.raises(ValueError, match="et_label"):
        make_phantom_case(size=32, seed=1, et_label=5)


def test_small_cases_are_fast():
    make_phantom_case(size=32, seed=0)  # template loaded once per process
    t0 = time.perf_counter()
    for s in range(5):
        make_phantom_case(size=32, seed=s)
    per_case = (time.perf_counter() - t0) / 5
    assert per_case < 0.5, per_case


def _distance_mm(case, size):
    sp = mni_anatomy(size).spacing
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1)
    return np.sqrt((((grid - np.array(case.info["center_vox"])) * sp) ** 2).sum(-1))


def test_edema_follows_white_matter_and_anatomy_is_pushed(cases):
    anat = mni_anatomy(40)
    for c in cases:
        r = _distance_mm(c, 40)
        edema = c.label == 2
        shell = (r <= r[edema].max()) & (c.label == 0) & (c.images["t1"] > 0)
        # Edema favours white matter compared with healthy tissue at the same distances.
        assert c.tissues["wm"][edema].mean() >= c.tissues["wm"][shell].mean(), c.info
        # Mass effect: tissue maps moved near the tumour, (almost) untouched far away.
        moved = np.abs(c.tissues["wm"] - anat.wm)
        assert moved[r < 20].max() > 0.1
        assert moved[r > 80].mean() < 0.02


def test_acquisition_noise_and_bias_present(cases):
    c = cases[1]
    wm = (c.tissues["wm"] > 0.95) & (c.label == 0)
    for m in MODALITIES:
        x = c.images[m][wm]
        cv = x.std() / x.mean()
        assert 0.01 < cv < 0.3, (m, cv)  # noise + bias, but WM stays recognisable
    # Independent noise per sequence: two sequences are not perfectly correlated inside WM.
    assert np.corrcoef(c.images["t1"][wm], c.images["t1ce"][wm])[0, 1] < 0.99


def test_phantom_cache_is_written_once_whole_and_with_plain_modes(tmp_path):
    """The cache train and compare share: published whole, folder 0755 / files 0644 under umask
    022 (tempfile's 0700 / 0600 leaked before, issue 16 #15), the engine's key kept."""
    import os
    import stat

    from segmerge.data import cached_phantoms, phantom_cache_dir
    from segmerge.engine.trainer import phantom_cache_path

    spec = {"cases": 2, "size": 16, "seed": 3, "et_label": 4, "workers": 1}
    folder = phantom_cache_dir(tmp_path / "cache", spec)
    assert folder == phantom_cache_path(tmp_path / "cache", spec)  # existing caches stay valid
    assert phantom_cache_dir(tmp_path / "cache", {**spec, "workers": 2}) == folder
    old = os.umask(0o022)
    try:
        datalist = cached_phantoms(folder, spec)
    finally:
        os.umask(old)
    assert datalist == folder / "dataset.json" and datalist.is_file()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary left
    before = {p: p.stat().st_mtime_ns for p in files}
    assert cached_phantoms(folder, spec) == datalist
    assert {p: p.stat().st_mtime_ns for p in files} == before  # written once
