"""Unit tests of the engine's parts that need no training: checkpoints, metrics, sampling, logging."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from segmerge.conventions import HD95_EMPTY
from segmerge.engine.checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state
from segmerge.engine.metrics_buffer import StepMetrics
from segmerge.engine.sampling import SeededCacheDataset, StreamSampler
from segmerge.engine.tracking import check_tracking_uri, flatten_params, ui_command
from segmerge.engine.validation import crop_around_tumour, heads_of, region_scores


def test_checkpoint_roundtrip_is_weights_only_and_restores_random_streams(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    state = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": rng_state(),
        "iteration": 3,
    }
    path = atomic_torch_save(state, tmp_path / "ck" / "last.pt")
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    loaded = load_checkpoint(path)  # weights_only=True inside
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]
    assert torch.equal(loaded["model"]["weight"], net.weight.detach())
    assert loaded["iteration"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_load_checkpoint_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a segmerge training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(tmp_path / "corrupt.pt")


def test_region_scores_follow_brats_empty_conventions():
    pred = torch.zeros(1, 3, 12, 12, 12, dtype=torch.bool)
    gt = torch.zeros_like(pred)
    pred[0, 0, 2:6, 2:6, 2:6] = True  # wt: overlap 3/4 along one axis
    gt[0, 0, 3:7, 2:6, 2:6] = True
    pred[0, 1, 1:3, 1:3, 1:3] = True  # tc: prediction only
    # et: both empty
    dice, hd = region_scores(pred, gt)
    inter = (pred[0, 0] & gt[0, 0]).sum().item()
    expected = 2 * inter / (pred[0, 0].sum().item() + gt[0, 0].sum().item())
    assert dice[0, 0].item() == pytest.approx(expected)
    assert hd[0, 0].item() == pytest.approx(1.0)
    assert dice[0, 1].item() == 0.0 and hd[0, 1].item() == pytest.approx(HD95_EMPTY)
    assert dice[0, 2].item() == 1.0 and hd[0, 2].item() == 0.0


def test_crop_around_tumour_is_centred_and_padded():
    image = torch.zeros(4, 20, 20, 20)
    label = torch.zeros(3, 20, 20, 20)
    label[0, 15:18, 15:18, 15:18] = 1
    patch = crop_around_tumour({"image": image, "label": label}, [8, 8, 8])
    assert patch["image"].shape == (4, 8, 8, 8)
    assert patch["label"][0].sum() == 27  # the whole tumour is inside
    small = crop_around_tumour({"image": image[:, :6], "label": label[:, :6]}, [8, 8, 8])
    assert small["image"].shape == (4, 8, 8, 8)


def test_heads_of_maps_objectives_to_prediction_heads():
    losses = {"fused.d0": 1.0, "fused.d1": 2.0, "modality.flair": 3.0, "modality.t1ce": 4.0}
    assert heads_of(losses) == {"fused": 1.0, "flair": 3.0, "t1ce": 4.0}


def test_stream_sampler_resume_and_ranks_agree_with_one_process():
    full = list(StreamSampler(5, batch_size=2, total_steps=6, seed=3))
    assert len(full) == 12
    assert full == list(StreamSampler(5, batch_size=2, total_steps=6, seed=3))
    assert list(StreamSampler(5, 2, 6, start_step=4, seed=3)) == full[8:]
    # every pass over the cases is a permutation
    assert sorted(i for i, _ in full[:5]) == list(range(5))
    assert full != list(StreamSampler(5, 2, 6, seed=4))
    # 2 ranks with batch 1 see, step by step, what one process with batch 2 sees
    r0 = list(StreamSampler(5, 1, 6, seed=3, rank=0, world=2))
    r1 = list(StreamSampler(5, 1, 6, seed=3, rank=1, world=2))
    merged = [x for pair in zip(r0, r1) for x in pair]
    assert merged == full


def test_seeded_dataset_augmentation_depends_only_on_the_seed():
    from monai.transforms import Compose, RandGaussianNoised

    data = [{"x": torch.zeros(1, 4, 4, 4)} for _ in range(3)]
    ds = SeededCacheDataset(data, Compose([RandGaussianNoised("x", prob=1.0)]), progress=False)
    a = ds[(1, 11)]["x"]
    ds[(2, 99)]  # another draw in between must not change what seed 11 gives
    b = ds[(1, 11)]["x"]
    c = ds[(1, 12)]["x"]
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert not torch.equal(torch.as_tensor(a), torch.as_tensor(c))


def _report(names, losses, weights, cosine=None, alpha=None, n=None, skipped=0):
    k = len(names)
    return SimpleNamespace(
        names=names,
        losses=torch.tensor(losses),
        weights=torch.tensor(weights),
        norms=torch.ones(k) if cosine is not None else None,
        cosine=cosine,
        alpha=alpha,
        n_conflicts=None if n is None else torch.tensor(n),
        grad_norm=torch.tensor(2.0),
        skipped_total=torch.tensor(skipped),
        refreshed=cosine is not None,
    )


def test_step_metrics_interval_means_per_name():
    m = StepMetrics()
    cos = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
    alpha = torch.tensor([[0.0, 0.25], [0.75, 0.0]])
    m.add(_report(["a", "b"], [1.0, 3.0], [0.5, 0.5], cos, alpha, n=1))
    m.add(_report(["a"], [2.0], [1.0], skipped=1))  # amortised step, one row only
    out = m.flush()
    assert out["loss/a"] == pytest.approx(1.5)
    assert out["loss/b"] == pytest.approx(3.0)
    assert out["loss/total"] == pytest.approx((4.0 + 2.0) / 2)
    assert out["weight/a"] == pytest.approx(0.75)
    assert out["cosine/a__b"] == pytest.approx(-0.5)
    assert "cosine/b__a" not in out
    assert out["conflict/alpha/a__b"] == pytest.approx(0.25)
    assert out["conflict/alpha/b__a"] == pytest.approx(0.75)
    assert out["conflict/n_pairs"] == 1
    assert out["train/skipped_steps"] == 1
    assert out["perf/refresh_fraction"] == 0.5
    assert m.flush() == {}
    names, c, a = m.mean_matrices()
    assert names == ["a", "b"] and c[0, 1] == c[1, 0] == pytest.approx(-0.5)
    restored = StepMetrics()
    restored.load_state_dict(m.state_dict())
    assert torch.equal(restored.mean_matrices()[2], a)


def test_flatten_params_flat_keys_and_truncation():
    flat = flatten_params({"net": {"features": [8, 16], "norm": "instance"}, "long": "x" * 7000})
    assert flat["net/features"] == "[8, 16]"
    assert flat["net/norm"] == "instance"
    assert len(flat["long"]) <= 6000 and flat["long"].endswith("[truncated]")


def test_tracking_uri_checks(tmp_path):
    with pytest.raises(ValueError, match="plain folder"):
        check_tracking_uri(str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        check_tracking_uri(f"sqlite:///{blocker}/sub/mlflow.db")
    with pytest.raises(ValueError, match="cannot be reached"):
        check_tracking_uri("http://127.0.0.1:9", timeout=2.0)
    check_tracking_uri(f"sqlite:///{tmp_path}/ok/mlflow.db")
    assert ui_command("sqlite:////a/b.db") == "mlflow ui --backend-store-uri sqlite:////a/b.db"
