"""Tests of segmerge.objectives: exact values, names per availability, depth weights, reach."""

from __future__ import annotations

import math

import pytest
import torch

from segmerge.conventions import MODALITIES
from segmerge.nets import MultiModalDSNet
from segmerge.objectives import (
    NamedLosses,
    ObjectiveSet,
    RegionLoss,
    head_losses,
    head_of,
    objective_names,
    resize_target,
)

MODALITY_ROWS = [f"modality.{m}" for m in MODALITIES]


def fake_outputs(batch: int = 2, size: int = 8, depths: int = 3, aux_scale: int = 4):
    """Stand-in for a network's train-mode output: random logits that require grad."""
    out = {
        f"fused.d{d}": torch.randn(batch, 3, *(size // 2**d,) * 3, requires_grad=True)
        for d in range(depths)
    }
    out.update(
        {
            f"modality.{m}": torch.randn(batch, 3, *(size // aux_scale,) * 3, requires_grad=True)
            for m in MODALITIES
        }
    )
    return out


def fake_target(batch: int = 2, size: int = 8) -> torch.Tensor:
    return (torch.rand(batch, 3, size, size, size) > 0.6).float()


def hand_loss(logits: torch.Tensor, target: torch.Tensor, wd: float, wb: float) -> list[float]:
    """Per-sample Dice + BCE written out element by element (plain Python floats)."""
    out = []
    s = 1e-5
    for b in range(logits.shape[0]):
        dice_terms, bce_terms = [], []
        for c in range(logits.shape[1]):
            xs = logits[b, c].flatten().tolist()
            ts = target[b, c].flatten().tolist()
            ps = [1 / (1 + math.exp(-x)) for x in xs]
            inter = sum(p * t for p, t in zip(ps, ts))
            dice_terms.append(1 - (2 * inter + s) / (sum(ps) + sum(ts) + s))
            bce_terms += [-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in zip(ps, ts)]
        out.append(wd * sum(dice_terms) / len(dice_terms) + wb * sum(bce_terms) / len(bce_terms))
    return out


def test_region_loss_matches_hand_computation():
    logits = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64)
    target = (torch.rand(2, 3, 2, 2, 2) > 0.5).to(torch.uint8)  # labels of any dtype are cast
    target[1, 2] = 0  # an empty region
    per_sample = RegionLoss(dice_weight=0.7, bce_weight=1.3)(logits, target)
    expected = hand_loss(logits, target.double(), 0.7, 1.3)
    torch.testing.assert_close(per_sample.double(), torch.tensor(expected, dtype=torch.float64))

    nl = ObjectiveSet(dice_weight=0.7, bce_weight=1.3)({"fused.d0": logits}, target)
    assert nl.names == ["fused.d0"]
    torch.testing.assert_close(nl.losses[0].double(), torch.tensor(sum(expected) / 2).double())


def test_names_and_heads():
    assert objective_names(("flair", "t2"), depths=2) == [
        "fused.d0",
        "fused.d1",
        "modality.flair",
        "modality.t2",
    ]
    assert [head_of(n) for n in objective_names(depths=1)] == ["fused", *MODALITIES]
    with pytest.raises(ValueError, match="is not 'fused.d<l>'"):
        head_of("fusd.d0")


def row_reach(nl: NamedLosses, name: str, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Which of ``tensors`` the row ``name`` reaches, through its own input edge of the stack.

    Differentiating ``nl.losses[k]`` would hand zeros to every stacked row; the training step
    separates rows through the stack node's input edges, as done here.
    """
    edge = torch.autograd.graph.GradientEdge(
        *nl.losses.grad_fn.next_functions[nl.names.index(name)]
    )
    keys = list(tensors)
    grads = torch.autograd.grad(
        [edge], [tensors[k] for k in keys], [torch.ones(())], retain_graph=True, allow_unused=True
    )
    return {k for k, g in zip(keys, grads) if g is not None}


def test_all_rows_stacked_last_and_graph_kept():
    outputs = fake_outputs()
    nl = ObjectiveSet(depth_weights="nnunet")(outputs, fake_target())
    assert nl.names == ["fused.d0", "fused.d1", "fused.d2", *MODALITY_ROWS]
    assert nl.losses.shape == (7,) and nl.losses.requires_grad
    # Contract with the step: stack of the K rows is the last op (weights applied before).
    assert nl.losses.grad_fn.name() == "StackBackward0"
    assert len(nl.losses.grad_fn.next_functions) == 7
    assert row_reach(nl, "modality.flair", outputs) == {"modality.flair"}
    assert row_reach(nl, "fused.d1", outputs) == {"fused.d1"}


def test_absent_modality_rows_left_out_and_partial_rows_masked():
    outputs = fake_outputs(batch=3)
    target = fake_target(batch=3)
    available = torch.tensor(
        [[True, False, True, True], [True, False, False, True], [True, False, True, True]]
    )
    objectives = ObjectiveSet()
    nl = objectives(outputs, target, available)
    assert nl.names == [
        "fused.d0",
        "fused.d1",
        "fused.d2",
        "modality.flair",
        "modality.t1ce",
        "modality.t2",
    ]

    # t1ce is available in samples 0 and 2 only: its row averages over those two.
    small = resize_target(target, outputs["modality.t1ce"].shape[2:])
    per_sample = RegionLoss()(outputs["modality.t1ce"], small)
    torch.testing.assert_close(nl.as_dict()["modality.t1ce"], (per_sample[0] + per_sample[2]) / 2)
    torch.testing.assert_close(
        nl.as_dict()["modality.flair"], RegionLoss()(outputs["modality.flair"], small).mean()
    )

    # A precomputed host-side list of present modalities decides the rows the same way.
    assert objectives(outputs, target, available, present=["flair", "t1ce", "t2"]).names == nl.names
    only = objectives(outputs, target, present=["t2"])
    assert only.names == ["fused.d0", "fused.d1", "fused.d2", "modality.t2"]
    with pytest.raises(ValueError, match="did you mean 't1ce'"):
        objectives(outputs, target, present=["t1c"])


def test_depth_weights():
    outputs = fake_outputs()
    target = fake_target()
    equal = ObjectiveSet(depth_weights="equal")(outputs, target)
    nnunet = ObjectiveSet(depth_weights="nnunet")(outputs, target)
    explicit = ObjectiveSet(depth_weights=[1.0, 0.25, 0.0])(outputs, target)
    w = torch.tensor([1.0, 0.5, 0.25])
    w = w * 3 / w.sum()  # 1/2^d normalised to mean 1 over the fused rows
    torch.testing.assert_close(nnunet.losses[:3], equal.losses[:3] * w)
    torch.testing.assert_close(nnunet.losses[3:], equal.losses[3:])  # modality rows unweighted
    torch.testing.assert_close(
        explicit.losses[:3], equal.losses[:3] * torch.tensor([1.0, 0.25, 0.0])
    )
    with pytest.raises(ValueError, match="did you mean 'nnunet'"):
        ObjectiveSet(depth_weights="nnunett")


def test_coarse_rows_use_downsampled_targets():
    target = torch.zeros(1, 3, 4, 4, 4)
    target[:, :, 1, 1, 1] = 1.0  # one voxel in the 2x2x2 block at the origin
    assert resize_target(target, (2, 2, 2), "max")[0, 0, 0, 0, 0] == 1
    assert resize_target(target, (2, 2, 2), "area")[0, 0, 0, 0, 0] == pytest.approx(1 / 8)
    assert resize_target(target, (2, 2, 2), "nearest")[0, 0, 0, 0, 0] == 1  # block centre
    assert resize_target(target, (4, 4, 4)) is target
    with pytest.raises(ValueError, match="did you mean 'max'"):
        resize_target(target, (2, 2, 2), "maxx")

    outputs = {"fused.d0": torch.randn(1, 3, 4, 4, 4), "fused.d1": torch.randn(1, 3, 2, 2, 2)}
    for mode in ("nearest", "max", "area"):
        nl = ObjectiveSet(target_resize=mode)(outputs, target)
        expected = RegionLoss()(outputs["fused.d1"], resize_target(target, (2, 2, 2), mode))
        torch.testing.assert_close(nl.losses[1], expected[0])


def test_head_losses():
    outputs = fake_outputs()
    target = fake_target()
    available = torch.tensor([[True, True, False, True]] * 2)
    objectives = ObjectiveSet(depth_weights="nnunet")
    heads = objectives.head_losses(outputs, target, available)
    assert list(heads) == ["fused", "flair", "t1", "t2"]
    rows = ObjectiveSet()(outputs, target, available).as_dict()
    torch.testing.assert_close(heads["fused"], rows["fused.d0"])  # unweighted d0 row
    torch.testing.assert_close(heads["t2"], rows["modality.t2"])
    plain = head_losses(outputs["fused.d0"], target)  # one eval-mode tensor = the fused head
    assert list(plain) == ["fused"]
    torch.testing.assert_close(plain["fused"], rows["fused.d0"])


def test_bad_inputs_raise_clear_errors():
    objectives = ObjectiveSet()
    outputs = fake_outputs()
    with pytest.raises(ValueError, match="did you mean 't1ce'"):
        objectives({"modality.t1c": outputs["modality.t1"]}, fake_target())
    with pytest.raises(ValueError, match=r"head 'fused.d0' has shape \(2, 3, 8, 8, 8\)"):
        objectives(outputs, fake_target(batch=3))
    with pytest.raises(ValueError, match="available must be"):
        objectives(outputs, fake_target(), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="one per name"):
        NamedLosses(["a", "b"], torch.zeros(3))


def test_with_network_dropping_a_modality_and_reach():
    net = MultiModalDSNet(features=(4, 8, 8, 16))
    x = torch.randn(2, 4, 16, 16, 16)
    available = torch.tensor([[True, True, True, False], [True, True, True, False]])
    nl = ObjectiveSet()(net(x, available), fake_target(size=16), available)
    assert "modality.t2" not in nl.names and len(nl) == 6
    assert bool(torch.isfinite(nl.losses).all())
    params = dict(net.named_parameters())
    reached = row_reach(nl, "modality.t1", params)
    own = {n for n in params if n.startswith(("encoders.t1.", "aux_heads.t1."))}
    assert reached == own
    assert len(row_reach(nl, "fused.d0", params)) > len(own)


def test_autocast_bf16_losses_are_float32_and_finite():
    net = MultiModalDSNet(features=(4, 8, 8, 16))
    # 32³, not 16³: CPU autocast runs instance norm in bf16, and over the 2³ voxels of the
    # deepest level of a 16³ input its variance occasionally came out non-finite (about 1 run in
    # 30, depending on the threads' summation order). Training patches are never that small, and
    # TrainStep skips a step whose loss or gradients are non-finite (test_step.py).
    x = torch.randn(2, 4, 32, 32, 32)
    available = torch.tensor([[True, False, True, True], [True, True, True, True]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = net(x, available)
        nl = ObjectiveSet(depth_weights="nnunet")(outputs, fake_target(size=32), available)
    assert outputs["fused.d0"].dtype == torch.bfloat16  # the network did run in bf16
    assert nl.losses.dtype == torch.float32 and bool(torch.isfinite(nl.losses).all())
    nl.total().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.grad is not None)


def test_early_fusion_outputs_give_depth_rows_only():
    outputs = {k: v for k, v in fake_outputs().items() if k.startswith("fused.")}
    target = fake_target()
    available = torch.tensor([[True, False, False, False], [False, False, True, False]])
    nl = ObjectiveSet()(outputs, target, available)
    assert nl.names == ["fused.d0", "fused.d1", "fused.d2"]
    # Fused rows average over every sample whatever the mask (the network handles missing inputs).
    torch.testing.assert_close(nl.losses, ObjectiveSet()(outputs, target).losses)


def test_subset_rows_of_late_fusion_heads_keep_fused_rows_and_check_depths():
    outputs = fake_outputs()  # fused.d0-d2 and modality.* at quarter resolution (depth 0 names)
    target = fake_target()
    nl = ObjectiveSet(subsets="singles+full", fused=True)(outputs, target)
    assert nl.names == [
        "fused.d0", "fused.d1", "fused.d2",
        *(f"subset.{m}" for m in MODALITIES), "subset.flair+t1+t1ce+t2",
    ]  # fmt: skip
    quarter = resize_target(target, (2, 2, 2))
    full = sum(outputs[f"modality.{m}"] for m in MODALITIES) / 4
    torch.testing.assert_close(nl.losses[-1], RegionLoss()(full, quarter).mean())
    # fused=None (auto): the full set's subset row is the fused row at depth 0, not twice
    assert "fused.d0" not in ObjectiveSet(subsets="all")(outputs, target).names
    with pytest.raises(ValueError, match="subset_depths asks for depth 1"):
        ObjectiveSet(subsets="all", subset_depths=[1])(outputs, target)
    # absent from the batch: subsets of absent modalities only have no row
    available = torch.tensor([[True, False, False, False], [True, False, False, False]])
    names = ObjectiveSet(subsets="all", fused=False)(outputs, target, available).names
    assert len(names) == 8 and all("flair" in n for n in names)
