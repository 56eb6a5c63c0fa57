"""MONAI transforms: channels by name, RAS, normalisation, regions, patches, modality dropout."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader

from segmerge.conventions import MODALITIES, labels_to_regions
from segmerge.data import (
    CheckLabeld,
    RandModalityDropoutd,
    StackModalitiesd,
    load_dataset,
    save_nifti,
    train_transforms,
    val_transforms,
    write_phantom_dataset,
)
from segmerge.engine.sampling import SeededCacheDataset, StreamSampler


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("tds")
    return load_dataset(write_phantom_dataset(root, 4, size=32, seed=11, progress=False))


def test_val_output_contract_normalisation_and_regions(spec):
    item = spec.validation[0]
    out = val_transforms()(item)
    img, lab = out["image"], out["label"]
    assert img.shape == (4, 32, 32, 32) and img.dtype == torch.float32
    assert lab.shape == (3, 32, 32, 32) and lab.dtype == torch.float32
    assert out["available"].dtype == torch.bool and out["available"].all()
    assert out["case_id"] == item["case_id"]
    raw = {m: np.asanyarray(nib.load(item[m]).dataobj) for m in MODALITIES}
    for c, m in enumerate(MODALITIES):  # channel c is modality m, whatever the file order
        brain = torch.from_numpy(raw[m] != 0)
        x = img[c][brain]
        assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
        assert torch.count_nonzero(img[c][~brain]) == 0
        corr = np.corrcoef(x.numpy(), raw[m][brain.numpy()])[0, 1]
        assert corr > 0.99, (m, corr)
    expected = labels_to_regions(np.asanyarray(nib.load(item["label"]).dataobj), 4)
    assert torch.equal(lab.bool(), torch.from_numpy(expected))


def test_orientation_is_canonical_ras(spec, tmp_path):
    item = spec.validation[0]
    flipped = {"case_id": item["case_id"]}
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = 31  # voxel i -> 31 - i
    for key in (*MODALITIES, "label"):
        img = nib.load(item[key])
        flipped[key] = str(tmp_path / f"{key}.nii.gz")
        save_nifti(flipped[key], np.asanyarray(img.dataobj)[::-1], img.affine @ flip)
    a, b = val_transforms()(item), val_transforms()(flipped)
    assert torch.allclose(a["image"], b["image"], atol=1e-5)
    assert torch.equal(a["label"], b["label"])
    assert np.allclose(np.asarray(a["image"].affine), np.asarray(b["image"].affine), atol=1e-4)


def test_train_patches_biased_to_tumour_and_padded(spec):
    t = train_transforms(patch_size=16, pos=1.0, neg=0.0, seed=1)
    for item in spec.training:
        (s,) = t(item)
        assert s["image"].shape == (4, 16, 16, 16) and s["label"].shape == (3, 16, 16, 16)
        assert s["label"][0].sum() > 0  # centred on tumour
        lab = s["label"].bool()
        assert not (lab[2] & ~lab[1]).any() and not (lab[1] & ~lab[0]).any()
        assert type(s["image"]) is torch.Tensor  # plain tensors for training
    (big,) = train_transforms(patch_size=40, seed=0)(spec.training[0])
    assert big["image"].shape == (4, 40, 40, 40) and big["label"].shape == (3, 40, 40, 40)


def test_modality_dropout_keeps_a_random_nonempty_proper_subset(spec):
    t = train_transforms(patch_size=16, modality_dropout=1.0, seed=3)
    seen = set()
    for s in (s for _ in range(6) for item in spec.training for s in t(item)):
        avail = s["available"]
        assert 1 <= int(avail.sum()) <= 3
        seen.add(tuple(avail.tolist()))
        for c in range(4):
            nonzero = torch.count_nonzero(s["image"][c]) > 0
            assert bool(nonzero) == bool(avail[c])
    assert len(seen) >= 4
    (s,) = train_transforms(patch_size=16, modality_dropout=0.0, seed=3)(spec.training[0])
    assert s["available"].all()


def test_dropout_transform_edge_cases():
    d = {"image": torch.ones(4, 2, 2, 2), "available": torch.tensor([False, True, False, False])}
    out = RandModalityDropoutd(prob=1.0)(d)
    assert out["available"].tolist() == [False, True, False, False]  # one modality: never dropped
    assert out["image"][0].abs().sum() == 0 and out["image"][1].abs().sum() == 8
    with pytest.raises(ValueError, match="probability"):
        RandModalityDropoutd(prob=1.5)


def test_bad_cases_fail_with_their_name():
    d = {"case_id": "c7", "flair": torch.ones(1, 4, 4, 4), "t2": torch.ones(1, 4, 4, 3)}
    with pytest.raises(ValueError, match="case c7: t2 has shape 4×4×3 but flair has 4×4×4"):
        StackModalitiesd()(d)
    with pytest.raises(ValueError, match=r"case c8: label has values \[3\]"):
        CheckLabeld(et_label=4)({"case_id": "c8", "label": torch.tensor([[0, 3, 4]])})
    assert CheckLabeld(et_label=3)({"case_id": "c8", "label": torch.tensor([[0, 3, 1]])})


def test_training_loader_batches_and_cache_stays_intact(spec):
    """The engine's training loader (TrainingData.loader) over these transforms."""
    t = train_transforms(patch_size=16, modality_dropout=1.0, seed=0)
    ds = SeededCacheDataset(spec.training, t, progress=False)
    loader = DataLoader(ds, batch_size=2, sampler=StreamSampler(len(ds), 2, 2, seed=0))
    before = loader.dataset._cache[0]["image"].clone()
    batches = [b for _ in range(2) for b in loader]
    assert batches[0]["image"].shape == (2, 4, 16, 16, 16) and batches[0]["label"].shape == (
        2,
        3,
        16,
        16,
        16,
    )
    assert batches[0]["available"].shape == (2, 4) and batches[0]["available"].dtype == torch.bool
    assert isinstance(batches[0]["case_id"], list) and len(batches[0]["case_id"]) == 2
    assert torch.equal(loader.dataset._cache[0]["image"], before)
    with pytest.raises(ValueError, match="no training cases"):
        StreamSampler(0, 2, 2)


def test_et_label_3_regions(tmp_path):
    spec3 = load_dataset(
        write_phantom_dataset(tmp_path, 2, size=24, seed=1, et_label=3, progress=False), et_label=3
    )
    outs = [val_transforms(et_label=3)(it) for it in spec3.all_items()]
    assert any(o["label"][2].sum() > 0 for o in outs)
    with_et = next(it for it, o in zip(spec3.all_items(), outs) if o["label"][2].sum() > 0)
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps a transform's error
        val_transforms(et_label=4)(with_et)
    assert "label has values [3]" in str(err.value.__cause__)


def test_several_patches_per_case(spec):
    samples = train_transforms(patch_size=16, num_samples=3, seed=2)(spec.training[0])
    assert len(samples) == 3
    for s in samples:
        assert set(s) == {"image", "label", "available", "case_id"}
        assert s["image"].shape == (4, 16, 16, 16)
    assert not torch.equal(samples[0]["image"], samples[1]["image"])


def test_one_thread_compose_restores_thread_count():
    import threading

    from segmerge.data.transforms import OneThreadCompose

    seen = []

    def probe(d):
        seen.append(torch.get_num_threads())
        return d

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        OneThreadCompose([probe])({"x": 1})
        assert seen == [1] and torch.get_num_threads() == 2
        t = threading.Thread(target=lambda: OneThreadCompose([probe])({"x": 1}))
        t.start()
        t.join()
        assert seen[1] == 2 and torch.get_num_threads() == 2  # other threads leave it alone
    finally:
        torch.set_num_threads(before)
