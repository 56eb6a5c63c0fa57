"""Contract tests of segmerge.nets: names, shapes, masking, gradient reach, export."""

from __future__ import annotations

import pytest
import torch

from segmerge.conventions import MODALITIES
from segmerge.nets import NETWORKS, DynUNetDS, MultiModalDSNet, build_network

TINY = {"features": (4, 8, 8, 16), "deep_supervision": 3}
S = 16  # spatial size: divisible by 2^3


def tiny_net(**kw) -> MultiModalDSNet:
    return MultiModalDSNet(**{**TINY, **kw})


def inputs(batch: int = 2, size: int = S) -> torch.Tensor:
    return torch.randn(batch, len(MODALITIES), size, size, size)


def test_train_mode_names_and_shapes():
    net = tiny_net(aux_level=1)
    out = net(inputs())
    expected = ["fused.d0", "fused.d1", "fused.d2"] + [f"modality.{m}" for m in MODALITIES]
    assert list(out) == expected == net.output_names()
    for name, t in out.items():
        scale = net.output_scales()[name]
        assert t.shape == (2, 3, S // scale, S // scale, S // scale), name
    assert out["modality.t2"].shape[2:] == (S // 2,) * 3  # aux_level=1: half resolution


def test_eval_returns_fused_d0_only_and_skips_aux_compute():
    net = tiny_net()
    x = inputs()
    calls: list[str] = []
    for name, module in [("aux", m) for m in net.aux_heads.values()] + [
        ("d1", net.heads["d1"]),
        ("d2", net.heads["d2"]),
    ]:
        module.register_forward_hook(lambda *_, n=name: calls.append(n))
    net.eval()
    with torch.no_grad():
        y = net(x)
        assert calls == []  # no auxiliary or coarse head ran in eval
        heads = net.forward_heads(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, S, S, S)
    torch.testing.assert_close(y, heads["fused.d0"], rtol=0, atol=0)
    assert calls.count("aux") == len(MODALITIES)


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_unavailable_modality_has_no_influence(fusion):
    net = tiny_net(fusion=fusion).eval()
    x = inputs()
    available = torch.tensor([[True, False, True, True], [True, True, True, True]])
    x_other = x.clone()
    x_other[0, 1] = torch.randn(S, S, S) * 5 + 3  # new values in the missing channel
    x_nan = x.clone()
    x_nan[0, 1] = float("nan")
    with torch.no_grad():
        ref = net(x, available)
        assert torch.equal(ref, net(x_other, available))
        assert torch.equal(ref[0], net(x_nan, available)[0])
        # Feeding zeros as if present is a different thing: the zero image is averaged in.
        x_zero = x.clone()
        x_zero[0, 1] = 0.0
        assert not torch.allclose(ref[0], net(x_zero)[0])
        # Sample 1 has everything available: unaffected by sample 0's mask.
        torch.testing.assert_close(ref[1], net(x)[1])


def test_mean_fusion_is_mean_over_available_encoders():
    net = tiny_net()
    x = inputs()
    mask = torch.tensor([[True, False, False, False], [False, True, False, True]])
    fused, per_mod = net._encode(x, mask)
    for level in range(len(TINY["features"])):
        torch.testing.assert_close(fused[level][0], per_mod[0][level][0])
        torch.testing.assert_close(
            fused[level][1], (per_mod[1][level][1] + per_mod[3][level][1]) / 2
        )
    nothing = torch.zeros(2, 4, dtype=torch.bool)
    fused, _ = net._encode(x, nothing)
    assert all(torch.equal(f, torch.zeros_like(f)) for f in fused)  # count clamped to 1


def grads_by_name(net: torch.nn.Module, loss: torch.Tensor) -> dict[str, bool]:
    net.zero_grad(set_to_none=True)
    loss.backward()
    return {
        n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in net.named_parameters()
    }


def test_gradient_reach_of_modality_and_fused_heads():
    net = tiny_net()
    x = inputs()
    out = net(x)
    reached = grads_by_name(net, out["modality.flair"].square().mean())
    own = ("encoders.flair.", "aux_heads.flair.")
    assert all(reached[n] for n in reached if n.startswith(own))
    assert not any(reached[n] for n in reached if not n.startswith(own))

    out = net(x)
    reached = grads_by_name(net, out["fused.d0"].square().mean())
    assert not any(reached[n] for n in reached if n.startswith("aux_heads."))
    for m in MODALITIES:
        assert any(reached[n] for n in reached if n.startswith(f"encoders.{m}."))
    assert all(reached[n] for n in reached if n.startswith(("decoder.", "heads.d0.")))


def test_parameter_groups_name_the_structure():
    groups = tiny_net().parameter_groups()
    expected = {f"encoders.{m}" for m in MODALITIES} | {f"aux_heads.{m}" for m in MODALITIES}
    assert set(groups) == expected | {"decoder", "heads"}
    assert all(n.startswith(g) for g, names in groups.items() for n in names)


def test_trace_and_script_export_in_eval():
    net = tiny_net().eval()
    x = inputs()
    with torch.no_grad():
        ref = net(x)
        traced = torch.jit.trace(net, (x,), check_trace=False)
        x2 = inputs()
        torch.testing.assert_close(traced(x2), net(x2))
        torch.testing.assert_close(traced(x), ref)
    # Scripting compiles every submodule: a two-modality, three-level net keeps it quick.
    small = MultiModalDSNet(modalities=("flair", "t2"), features=(4, 8, 8), deep_supervision=2)
    small.eval()
    x = torch.randn(1, 2, 8, 8, 8)
    available = torch.tensor([[True, False]])
    scripted = torch.jit.script(small)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, available), small(x, available))


def test_default_network_size_is_small():
    n_params = sum(p.numel() for p in MultiModalDSNet().parameters())
    assert 0.5e6 <= n_params <= 1.5e6, n_params


@pytest.mark.parametrize(
    ("kwargs", "call", "message"),
    [
        ({}, lambda n: n(torch.zeros(1, 3, S, S, S)), "3 channels but the network expects 4"),
        ({}, lambda n: n(torch.zeros(1, 4, S, S, 12)), "divisible by 8"),
        ({}, lambda n: n(inputs(1), torch.ones(1, 3, dtype=torch.bool)), "available must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_net(**kwargs))


def test_bad_configuration_raises_clear_errors():
    with pytest.raises(ValueError, match="deep_supervision must be between 1 and"):
        tiny_net(deep_supervision=4)
    with pytest.raises(ValueError, match="did you mean 'mean'"):
        tiny_net(fusion="maen")
    with pytest.raises(ValueError, match="did you mean 'instance'"):
        tiny_net(norm="instnce")


def test_registry_builds_and_suggests():
    assert set(NETWORKS) == {"multimodal", "late", "shared", "dynunet"}
    assert isinstance(build_network("multimodal", **TINY), MultiModalDSNet)
    with pytest.raises(ValueError, match="did you mean 'dynunet'"):
        build_network("dynunett")


def test_dynunet_ds_contract():
    net = DynUNetDS(features=(4, 8, 8, 16), deep_supervision=3)
    x = inputs()
    out = net(x)
    assert list(out) == ["fused.d0", "fused.d1", "fused.d2"] == net.output_names()
    assert all(t.shape == (2, 3, S, S, S) for t in out.values())  # MONAI upsamples its heads
    net.eval()
    available = torch.tensor([[True, True, False, True]] * 2)
    x_zero = x.clone()
    x_zero[:, 2] = 0.0
    with torch.no_grad():
        y = net(x, available)
        assert isinstance(y, torch.Tensor) and y.shape == (2, 3, S, S, S)
        torch.testing.assert_close(y, net(x_zero), rtol=0, atol=0)  # missing channel zeroed
        assert not torch.allclose(y, net(x))
        heads = net.forward_heads(x)
        assert list(heads) == ["fused.d0", "fused.d1", "fused.d2"]
        traced = torch.jit.trace(net, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), net(x))
