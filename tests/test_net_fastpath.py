"""The eval-mode CPU fast path of the networks (segmerge.nets._onednn): oneDNN convolutions.

It must be taken (eval, eager, CPU float32, batch 1), equal the fallback convolution within
1e-5 for every subset of available sequences, keep training bit-identical, read the live weights
(no stale state after an update) and leave TorchScript alone.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from segmerge.nets import MultiModalDSNet, OneDNNConv3d, SharedModalityUNet, use_onednn_convs

NETS = {
    "late": lambda: MultiModalDSNet(),
    "late-shared-aux-max-block": lambda: MultiModalDSNet(
        aux_decoder="shared", fusion="max", stem="block"
    ),
    "shared": lambda: SharedModalityUNet(),
}
CONV_KERNELS = ("aten::mkldnn_convolution", "aten::slow_conv3d_forward")
"""The two CPU kernels of a float32 3D convolution: oneDNN and PyTorch's im2col + GEMM fallback."""
SUBSETS = [torch.tensor([bits], dtype=torch.bool) for bits in itertools.product([0, 1], repeat=4)]


def _net(name: str) -> nn.Module:
    torch.manual_seed(0)
    return NETS[name]()


def _plain(net: nn.Module) -> nn.Module:
    """A copy with the stock ``nn.Conv3d`` class back in place of :class:`OneDNNConv3d`."""
    twin = copy.deepcopy(net)
    for sub in twin.modules():
        if type(sub) is OneDNNConv3d:
            sub.__class__ = nn.Conv3d
    return twin


def _conv_ops(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key in CONV_KERNELS}


@pytest.mark.parametrize("name", list(NETS))
def test_every_conv3d_is_converted_and_keys_unchanged(name):
    net = _net(name)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(type(m) is OneDNNConv3d for m in convs)
    plain = _plain(net)
    assert list(net.state_dict()) == list(plain.state_dict())
    # the converted network loads a state dict of the stock one and vice versa
    net.load_state_dict(plain.state_dict())
    plain.load_state_dict(net.state_dict())


@pytest.mark.parametrize("name", list(NETS))
def test_eval_at_batch_one_runs_onednn_and_matches_the_fallback(name):
    net = _net(name).eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        ops = _conv_ops(lambda: net(x))
        assert ops == {"aten::mkldnn_convolution"}, ops
        with torch.backends.mkldnn.flags(enabled=False):  # PyTorch's switch: fast path off too
            ref = net(x)
            assert _conv_ops(lambda: net(x)) == {"aten::slow_conv3d_forward"}
        out = net(x)
    assert (out - ref).abs().max() <= 1e-5
    # the stock class (no fast path) at batch 1 takes the fallback convolution, same result
    with torch.no_grad():
        assert (_plain(net).eval()(x) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["late", "shared"])
def test_eval_every_subset_matches_the_fallback_and_ignores_missing_channels(name):
    net = _net(name).eval()
    plain = _plain(net).eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        for available in SUBSETS:
            out = net(x, available)
            assert (out - plain(x, available)).abs().max() <= 1e-5, available
            # a missing sequence's channel (NaN here) changes nothing: the dropout semantics
            x_nan = x.clone()
            x_nan[:, ~available[0]] = float("nan")
            assert torch.equal(net(x_nan, available), out), available
            heads = net.forward_heads(x, available)
            assert torch.equal(heads["fused.d0"], out)


@pytest.mark.parametrize("name", list(NETS))
def test_train_mode_is_bit_identical_to_the_stock_convolution(name):
    net = _net(name).train()
    plain = _plain(net).train()
    x = torch.randn(1, 4, 16, 16, 16)
    available = torch.tensor([[True, False, True, True]])
    assert _conv_ops(lambda: net(x, available)) == {"aten::slow_conv3d_forward"}
    outs = []
    for model in (net, plain):
        heads = model(x, available)
        sum((v**2).mean() for v in heads.values()).backward()
        outs.append((heads, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (h1, g1), (h2, g2) = outs
    assert h1.keys() == h2.keys() and all(torch.equal(h1[k], h2[k]) for k in h1)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)


def test_fast_path_reads_the_live_weights():
    net = _net("late").eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        before = net(x)
        for p in net.parameters():
            p.mul_(1.25).add_(0.01)  # in place, as an optimizer step does
        after = net(x)
        assert not torch.allclose(before, after)
        assert (after - _plain(net).eval()(x)).abs().max() <= 1e-5
        other = _net("late")
        for p in other.parameters():
            p.add_(0.05)
        net.load_state_dict(other.state_dict())
        loaded = net(x)
        assert (loaded - _plain(net).eval()(x)).abs().max() <= 1e-5
        assert not torch.allclose(loaded, after)


def test_fast_path_is_off_for_float64_and_under_autocast():
    net = _net("late").eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        double = copy.deepcopy(net).double()
        assert _conv_ops(lambda: double(x.double())) == {"aten::slow_conv3d_forward"}
    # under CPU autocast the stock convolution's own (autocast) path runs: results identical
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        ref = _plain(net).eval()(x)
    assert out.dtype == ref.dtype and torch.equal(out, ref)


def test_scripted_network_takes_the_stock_path_and_agrees():
    net = _net("late").eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 4, 16, 16, 16)
    available = torch.tensor([[True, True, False, True]])
    with torch.no_grad():
        assert _conv_ops(lambda: scripted(x, available)) == {"aten::slow_conv3d_forward"}
        assert (scripted(x, available) - net(x, available)).abs().max() <= 1e-5


def test_use_onednn_convs_converts_any_network_and_leaves_subclasses_alone():
    class Custom(nn.Conv3d):
        pass

    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), Custom(4, 4, 3), nn.ConvTranspose3d(4, 2, 2))
    assert use_onednn_convs(net) is net
    assert [type(m) for m in net] == [OneDNNConv3d, Custom, nn.ConvTranspose3d]
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        assert _conv_ops(lambda: net[0].eval()(x)) == {"aten::mkldnn_convolution"}


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_records_the_stock_convolution(strict):
    net = use_onednn_convs(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.LeakyReLU())).eval()
    x = torch.randn(1, 2, 8, 8, 8)
    program = torch.export.export(net, (x,), strict=strict)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.conv3d.default" in ops and not any("mkldnn" in op for op in ops), ops
    assert torch.allclose(program.module()(x), net(x), atol=1e-5)
