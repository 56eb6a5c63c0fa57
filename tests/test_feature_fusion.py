"""SharedModalityUNet(fusion="features") (issue 12 item 1 and 3): the shared encoder runs once per
modality, the masked mean of the available modalities' features at every level feeds one shared
decoder, and subset objectives rerun only the decoder per subset.

The direct computations below use the network's modules one by one (encoder blocks, decoder
levels, heads) and an explicit sum / count, not the network's own fusion code.
"""

from __future__ import annotations

import pytest
import torch

from segmerge.aggregation import build_aggregator
from segmerge.conventions import MODALITIES
from segmerge.nets import SharedModalityUNet
from segmerge.nets.shared import SubsetHeads
from segmerge.objectives import ObjectiveSet, RegionLoss, resize_target
from segmerge.objectives.names import modality_subsets, parse_objective, subset_label
from segmerge.step import TrainStep


def tiny(**kw) -> SharedModalityUNet:
    torch.manual_seed(0)
    kw.setdefault("features", (4, 8, 8))
    kw.setdefault("deep_supervision", 2)
    kw.setdefault("fusion", "features")
    return SharedModalityUNet(**kw)


def batch(b: int = 3, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, size, generator=gen)
    t = (torch.rand(b, 3, size, size, size, generator=gen) > 0.7).float()
    return x, t


AVAILABLE = torch.tensor(
    [[True, False, True, True], [False, False, False, True], [True, True, True, True]]
)


def direct_heads(
    net: SharedModalityUNet, x: torch.Tensor, available: torch.Tensor, subset: tuple[str, ...]
) -> list[torch.Tensor]:
    """Encoder per modality, mean of the available features of ``subset``, decoder, heads."""
    feats = {}
    for idx, m in enumerate(net.modalities):
        h = x[:, idx : idx + 1] * available[:, idx].view(-1, 1, 1, 1, 1)
        levels = []
        for block in net.encoder:
            h = block(h, m)
            levels.append(h)
        feats[m] = levels
    cols = torch.stack([available[:, net.modalities.index(m)] for m in subset], 1).float()
    count = cols.sum(1).clamp(min=1).view(-1, 1, 1, 1, 1)
    fused = [
        sum(cols[:, j].view(-1, 1, 1, 1, 1) * feats[m][lvl] for j, m in enumerate(subset)) / count
        for lvl in range(len(net.encoder))
    ]
    h, level, dec = fused[-1], len(fused) - 2, []
    for up in net.decoder:
        h = up.block(torch.cat([up.up(h), fused[level]], 1), "fused")
        dec.insert(0, h)
        level -= 1
    return [head(dec[d]) for d, head in enumerate(net.heads.values())]


def test_subset_rows_equal_features_mean_then_decoder_then_loss():
    net = tiny()
    x, t = batch()
    x[1, :3] = float("nan")  # missing sequences' channels (NaN) reach nothing
    out = net(x, AVAILABLE)
    assert isinstance(out, SubsetHeads)
    nl = ObjectiveSet(subsets="all", subset_depths=[0, 1], fused=False)(out, t, AVAILABLE)
    assert len(nl) == 30 and bool(torch.isfinite(nl.losses).all())
    x0 = torch.nan_to_num(x)
    loss = RegionLoss()
    for name, row in zip(nl.names, nl.losses):
        parsed = parse_objective(name)
        logits = direct_heads(net, x0, AVAILABLE, parsed.modalities)[parsed.depth]
        size = logits.shape[2:]
        target = resize_target(t, tuple(size), "nearest")  # the objective set's own resize
        per = loss(logits, target)
        seen = AVAILABLE[:, [net.modalities.index(m) for m in parsed.modalities]].any(1)
        torch.testing.assert_close(row, per[seen].mean(), msg=name)


def test_eval_output_with_all_available_is_the_full_subset_head():
    net = tiny()
    x, _ = batch()
    out = net(x)  # train mode
    full = out.subset_logits(MODALITIES)
    torch.testing.assert_close(full[0], out["fused.d0"])
    torch.testing.assert_close(
        full[0], direct_heads(net, x, torch.ones(3, 4, dtype=torch.bool), MODALITIES)[0]
    )
    net.eval()
    with torch.no_grad():
        y = net(x)
        y_masked = net(x, AVAILABLE)
        heads = net.forward_heads(x, AVAILABLE)
    assert y.shape == (3, 3, 16, 16, 16)
    torch.testing.assert_close(y, full[0].detach())  # instance norm, no dropout: same function
    torch.testing.assert_close(y_masked, heads["fused.d0"])
    # sample 1 has only t2: the full set's head there is the t2 singleton's
    torch.testing.assert_close(y_masked[1], heads["modality.t2"][1])
    flair_t2 = heads.subset_logits(("t2", "flair"))[0]
    torch.testing.assert_close(flair_t2[2], direct_heads(net, x, AVAILABLE, ("flair", "t2"))[0][2])


def test_names_unique_stable_and_as_with_logit_fusion():
    x, t = batch(b=2)
    names = {}
    for fusion in ("logits", "features"):
        net = tiny(fusion=fusion, deep_supervision=3, features=(4, 8, 8, 8))
        out = net(x)
        assert list(out) == net.output_names()
        names[fusion] = ObjectiveSet(subsets="all", subset_depths=[0])(out, t).names
        # a second call on the same (now larger) dict gives the same rows
        assert ObjectiveSet(subsets="all", subset_depths=[0])(out, t).names == names[fusion]
    assert names["features"] == names["logits"]
    feats = names["features"]
    assert len(set(feats)) == len(feats) == 2 + 15
    assert feats[:2] == ["fused.d1", "fused.d2"]
    assert feats[2:] == [f"subset.{subset_label(s)}" for s in modality_subsets()]
    assert tiny().derived_outputs == ()  # no head is computed from another head


def test_encoders_once_decoder_once_per_subset():
    net = tiny()
    x, t = batch(b=2)
    calls = {"enc": 0, "dec": 0}
    net.encoder[0].register_forward_hook(lambda *a: calls.__setitem__("enc", calls["enc"] + 1))
    net.decoder[0].register_forward_hook(lambda *a: calls.__setitem__("dec", calls["dec"] + 1))
    out = net(x)
    assert calls == {"enc": 4, "dec": 5}  # the full set and the four singletons
    ObjectiveSet(subsets="all", subset_depths=[0, 1])(out, t)
    assert calls == {"enc": 4, "dec": 15}  # K = 15 subsets (x2 depths): 15 decoder passes
    objectives = ObjectiveSet(subsets=3, seed=1)
    drawn = objectives.subset_choice(draw=False)  # not drawn: every subset
    assert len(drawn) == 15
    calls.update(enc=0, dec=0)
    nl = objectives(net(x), t)
    rows = [parse_objective(n) for n in nl.names]
    mixed = {r.modalities for r in rows if r.kind == "subset" and 1 < len(r.modalities) < 4}
    assert calls == {"enc": 4, "dec": 5 + len(mixed)}


def test_outputs_jacobian_sees_every_decoded_subset_head():
    """jacobian='outputs' with Sum: the update is the summed gradient (mixed subsets included)."""
    x, t = batch(b=2)
    grads = {}
    for mode in ("direct", "outputs"):
        net = tiny(features=(4, 8), deep_supervision=1)
        objectives = ObjectiveSet(subsets="all")
        out = net(x)
        nl = objectives(out, t)
        if mode == "direct":
            nl.total().backward()
        else:
            opt = torch.optim.SGD(net.parameters(), lr=0.0)
            step = TrainStep(net, opt, build_aggregator("sum"), jacobian="outputs")
            step.step(nl, outputs=dict(out))
        grads[mode] = torch.cat([p.grad.flatten() for p in net.parameters()])
    torch.testing.assert_close(grads["outputs"], grads["direct"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("jacobian", ["parameters", "outputs"])
def test_two_gmd_steps_train(jacobian):
    net = tiny(features=(4, 8), deep_supervision=1)
    start = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    step = TrainStep(net, opt, build_aggregator("gmd"), jacobian=jacobian)
    objectives = ObjectiveSet(subsets="all")
    avail = torch.tensor([[True, True, False, True], [True, True, True, True]])
    for s in range(2):
        x, t = batch(b=2, size=8, seed=s)
        out = net(x, avail)
        nl = objectives(out, t, avail)
        assert len(nl) == 15
        report = step.step(nl, outputs=dict(out)) if jacobian == "outputs" else step.step(nl)
        assert not bool(report.skipped)
        assert bool(torch.isfinite(report.losses).all())
        off = report.cosine - torch.diag(torch.diagonal(report.cosine))
        if jacobian == "outputs":  # every subset its own head: a diagonal Gramian (documented)
            assert float(off.abs().max()) == 0.0
        else:  # the parameter Jacobian sees the shared encoder and decoder
            assert float(off.abs().max()) > 0.0
    moved = [bool((p.detach() - s).abs().max() > 0) for p, s in zip(net.parameters(), start)]
    assert all(moved)


# TorchScript, tracing and MONAI's bundle check with fusion='features', and reach / the shared
# mask: tests/test_shared_nets.py, parametrised over both fusions.


def test_errors_name_the_rule():
    with pytest.raises(ValueError, match="decoder's own normalisation"):
        SharedModalityUNet(modalities=("fused", "t2"), fusion="features")
    out = tiny()(batch(b=2)[0])
    with pytest.raises(ValueError, match="non-empty set"):
        out.subset_logits(("flair", "dwi"))
