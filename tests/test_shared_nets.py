"""Networks whose modality objectives share parameters (issue 12): the shared-weight U-Net, the
shared auxiliary decoder, and subset objectives through the real training step.

Reach and the shared mask are read with segmerge.step's own graph machinery; cosines come from
real phantom batches; DDP and resume run the real TrainStep with drawn subsets.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segmerge.aggregation import build_aggregator
from segmerge.conventions import MODALITIES, labels_to_regions
from segmerge.data import make_phantom_case
from segmerge.nets import MultiModalDSNet, SharedModalityUNet
from segmerge.objectives import NamedLosses, ObjectiveSet, RegionLoss
from segmerge.objectives.names import modality_subsets, parse_objective, subset_label
from segmerge.step import TrainStep, graph_reach, objective_roots, shared_bits


def tiny_shared(**kw) -> SharedModalityUNet:
    torch.manual_seed(0)
    kw.setdefault("features", (4, 8, 8))
    kw.setdefault("deep_supervision", 2)
    return SharedModalityUNet(**kw)


@functools.lru_cache(maxsize=2)
def phantom_batch(n: int = 2, size: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real phantom cases: z-scored sequences (MODALITIES order) and region targets."""
    images, targets = [], []
    for i in range(n):
        case = make_phantom_case(size=size, seed=seed + i)
        chans = []
        for m in MODALITIES:
            img = case.images[m].astype(np.float32)
            brain = img > 0
            chans.append((img - img[brain].mean()) / (img[brain].std() + 1e-6) * brain)
        images.append(torch.from_numpy(np.stack(chans)))
        targets.append(torch.as_tensor(labels_to_regions(case.label)).float())
    return torch.stack(images), torch.stack(targets)


def row_gradients(nl: NamedLosses, params: list[torch.Tensor], names: list[str]) -> torch.Tensor:
    """(len(names), D) gradients of the named rows, each through its own edge of the stack."""
    rows = []
    roots = objective_roots(nl.losses)
    for root in [roots[nl.names.index(n)] for n in names]:
        grads = torch.autograd.grad(
            [root], params, [torch.ones(())], retain_graph=True, allow_unused=True
        )
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]
            )
        )
    return torch.stack(rows)


def cosines(J: torch.Tensor) -> torch.Tensor:
    unit = J / J.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return unit @ unit.T


# ---------------------------------------------------------------------------- the network


def test_contract_names_scales_and_eval_fusion_of_available():
    net = tiny_shared()
    x = torch.randn(2, 4, 16, 16, 16)
    out = net(x)
    assert list(out) == net.output_names()
    assert net.output_names()[:2] == ["fused.d0", "fused.d1"]
    assert "modality.t1ce" in out and "modality.t1ce.d1" in out
    for name, t in out.items():
        assert t.shape == (2, 3, *(16 // net.output_scales()[name],) * 3)
    available = torch.tensor([[True, False, True, True], [False, False, False, True]])
    # a missing sequence's channel, even NaN, changes nothing
    x_nan = x.clone()
    x_nan[0, 1] = float("nan")
    x_nan[1, :3] = float("nan")
    net.eval()
    with torch.no_grad():
        y = net(x_nan, available)
        heads = net.forward_heads(x, available)
    assert y.shape == (2, 3, 16, 16, 16) and bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, heads["fused.d0"])
    expected0 = (
        heads["modality.flair"][0] + heads["modality.t1ce"][0] + heads["modality.t2"][0]
    ) / 3
    torch.testing.assert_close(y[0], expected0)
    torch.testing.assert_close(y[1], heads["modality.t2"][1])


def test_parameters_are_shared_except_per_modality_norms():
    net = tiny_shared()
    groups = net.parameter_groups()
    assert set(groups) == {"shared"} | {f"norm.{m}" for m in MODALITIES}
    assert all(".norm" not in n for n in groups["shared"])
    sizes = {
        m: sum(dict(net.named_parameters())[n].numel() for n in groups[f"norm.{m}"])
        for m in MODALITIES
    }
    assert len(set(sizes.values())) == 1 and sizes["flair"] > 0
    with pytest.raises(ValueError, match="fusion must be one of"):
        SharedModalityUNet(fusion="mean")


@pytest.mark.parametrize("fusion", ["logits", "features"])
def test_script_and_trace_export_equal_eager(fusion):
    net = tiny_shared(
        modalities=("flair", "t2"), features=(4, 8), deep_supervision=1, fusion=fusion
    ).eval()
    x = torch.randn(1, 2, 8, 8, 8)
    available = torch.tensor([[False, True]])
    with torch.no_grad():
        scripted = torch.jit.script(net)
        torch.testing.assert_close(scripted(x, available), net(x, available))
        traced = torch.jit.trace(net, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), net(x))
    scripted.train()
    heads = scripted(x, available)  # TorchScript in train mode: a plain dict of the heads
    assert set(heads) == set(net.output_names())


@pytest.mark.parametrize("fusion", ["logits", "features"])
def test_bundle_verify_net_in_out_with_default_arguments(tmp_path, fusion):
    """MONAI's bundle check on the shared network (inference.json with its network_def), with
    either fusion."""
    import json

    from monai.bundle import verify_net_in_out

    from segmerge.bundle_paths import config_dir

    folder = config_dir("inference.json")
    cfg = json.loads((folder / "inference.json").read_text())
    cfg["network_def"] = {
        "_target_": "segmerge.nets.SharedModalityUNet",
        "features": [4, 8, 8, 16],
        "fusion": fusion,
    }
    path = tmp_path / "inference.json"
    path.write_text(json.dumps(cfg))
    verify_net_in_out(
        net_id="network_def", meta_file=str(folder / "metadata.json"), config_file=str(path),
        device="cpu", n=1,
    )  # fmt: skip


# ---------------------------------------------------------------------------- objectives


def test_subset_rows_equal_mean_of_available_logits_then_loss():
    net = tiny_shared()
    x, t = torch.randn(3, 4, 16, 16, 16), (torch.rand(3, 3, 16, 16, 16) > 0.7).float()
    available = torch.tensor([[True, False, True, True], [False, True, False, False], [True] * 4])
    out = net(x, available)
    nl = ObjectiveSet(subsets="all", subset_depths=[0, 1], fused=False)(out, t, available)
    assert len(nl) == 30 and len(set(nl.names)) == 30
    loss = RegionLoss()
    for depth, suffix in ((0, ""), (1, ".d1")):
        target = torch.nn.functional.interpolate(t, scale_factor=0.5**depth, mode="nearest-exact")
        for subset in modality_subsets():
            per_sample, kept = [], []
            for b in range(3):
                have = [m for m in subset if bool(available[b, MODALITIES.index(m)])]
                if not have:
                    continue
                z = sum(out[f"modality.{m}{suffix}"][b] for m in have) / len(have)
                per_sample.append(loss(z[None], target[b : b + 1])[0])
                kept.append(b)
            expected = torch.stack(per_sample).mean()
            row = nl.losses[nl.names.index(f"subset.{subset_label(subset)}{suffix}")]
            torch.testing.assert_close(row, expected)


def test_subset_names_stable_unique_and_parsed_back():
    net = tiny_shared(deep_supervision=1)
    x, t = torch.randn(1, 4, 16, 16, 16), (torch.rand(1, 3, 16, 16, 16) > 0.7).float()
    out = net(x)
    objectives = ObjectiveSet(subsets="all")
    names = objectives(out, t).names
    assert len(names) == 15 and len(set(names)) == 15
    assert names == objectives(net(x), t).names  # stable between calls
    assert names[0] == "subset.flair" and names[-1] == "subset.flair+t1+t1ce+t2"
    assert "subset.flair+t1ce" in names and "subset.t1ce+flair" not in names
    for name in names:
        parsed = parse_objective(name, MODALITIES)
        assert parsed.kind == "subset" and parsed.depth == 0
    singles = ObjectiveSet(subsets="singles+full")(out, t).names
    assert singles == [f"subset.{m}" for m in MODALITIES] + ["subset.flair+t1+t1ce+t2"]
    with pytest.raises(ValueError, match="between 1 and 14"):
        ObjectiveSet(subsets=15)
    with pytest.raises(ValueError, match="did you mean 'all'"):
        ObjectiveSet(subsets="al")


def test_drawn_subsets_seeded_resumable_and_all_without_grad():
    a, b = ObjectiveSet(subsets=3, seed=7), ObjectiveSet(subsets=3, seed=7)
    draws = [a.draw() for _ in range(5)]
    assert all(len(d) == 4 and d[-1] == tuple(MODALITIES) for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # the draw changes from step to step
    assert [b.draw() for _ in range(5)] == draws  # same seed, same sequence (every rank)
    c = ObjectiveSet(subsets=3, seed=7)
    c.load_state_dict(copy.deepcopy(a.state_dict()))
    a_next, c_next = a.draw(), c.draw()
    assert a_next == c_next
    other = ObjectiveSet(subsets=3, seed=8)
    assert [other.draw() for _ in range(5)] != draws  # the seed matters
    net = tiny_shared(deep_supervision=1)
    out = net(torch.randn(1, 4, 16, 16, 16))
    t = torch.zeros(1, 3, 16, 16, 16)
    before = c.draws
    with torch.no_grad():
        assert len(c(out, t)) == 15  # held-out losses: every subset, the draw count unchanged
    assert c.draws == before
    assert len(c(out, t)) == 4 and c.draws == before + 1


# ---------------------------------------------------------------------------- reach and cosines


@pytest.mark.parametrize("fusion", ["logits", "features"])
def test_reach_shared_mask_is_exactly_the_shared_tensors(fusion):
    """The shared tensors are reached by every subset row, a modality's norms only by the rows
    whose subset holds it; with feature fusion the decoder (and its own ``fused`` norms) is
    reached by every row."""
    net = tiny_shared(fusion=fusion)
    x, t = torch.randn(2, 4, 16, 16, 16), (torch.rand(2, 3, 16, 16, 16) > 0.7).float()
    nl = ObjectiveSet(subsets="all", subset_depths=[0], fused=False)(net(x), t)
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    reach = graph_reach(objective_roots(nl.losses), {id(p): j for j, p in enumerate(params)})

    def modality_of(pname: str) -> str | None:
        parts = pname.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in ("norm1", "norm2") and parts[i + 1] in MODALITIES:
                return parts[i + 1]
        return None

    deep_head = {n for n in names if n.startswith("heads.d1.")}
    decoder_norms = {n for n in names if n.startswith("decoder.") and ".norm" in n}
    if fusion == "features":  # one decoder on fused features, with its own shared norms
        assert decoder_norms and all(".fused." in n for n in decoder_norms)
    for row, bits in zip(nl.names, reach):
        subset = set(parse_objective(row).modalities)
        got = {names[j] for j in range(len(names)) if bits >> j & 1}
        want = {
            n for n in names
            if n not in deep_head and (modality_of(n) is None or modality_of(n) in subset)
        }  # fmt: skip
        assert got == want, row
        if fusion == "features":
            assert decoder_norms <= got
    shared = {names[j] for j in range(len(names)) if shared_bits(reach) >> j & 1}
    assert shared == {n for n in names if modality_of(n) is None and n not in deep_head}
    groups = net.parameter_groups()
    assert set(groups) == {"shared"} | {f"norm.{m}" for m in MODALITIES}
    assert shared == set(groups["shared"]) - deep_head


@pytest.mark.parametrize(
    ("make", "shared"),
    [
        (lambda: tiny_shared(deep_supervision=1), True),
        (lambda: MultiModalDSNet(features=(4, 8, 8), deep_supervision=1, aux_level=1,
                                 aux_decoder="shared"), True),
        (lambda: MultiModalDSNet(features=(4, 8, 8), deep_supervision=1, aux_level=1), False),
    ],
    ids=["shared-unet", "late-shared-aux", "late-separate-aux"],
)  # fmt: skip
def test_modality_objectives_cosines_on_phantoms(make, shared):
    torch.manual_seed(0)
    net = make()
    x, t = phantom_batch()
    nl = ObjectiveSet()(net(x), t)
    rows = [f"modality.{m}" for m in MODALITIES]
    cos = cosines(row_gradients(nl, list(net.parameters()), rows))
    off = cos[~torch.eye(len(rows), dtype=torch.bool)]
    if shared:
        assert bool((off.abs() > 1e-3).all()), cos
    else:  # separate encoders and aux decoders: disjoint parameters, exactly orthogonal
        assert bool((off == 0).all()), cos


def test_constructed_conflict_gmd_update_differs_from_sum():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, 8, generator=gen)
    t = (torch.rand(1, 3, 8, 8, 8, generator=gen) > 0.6).float()
    updates = {}
    for method in ("sum", "gmd"):
        net = tiny_shared(features=(4, 8), deep_supervision=1)
        start = [p.detach().clone() for p in net.parameters()]
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        step = TrainStep(net, opt, build_aggregator(method), strategy="loop")
        out = net(x)
        loss = RegionLoss()
        z_full = (out["modality.flair"] + out["modality.t2"]) / 2
        # the same prediction pulled toward the target and toward its complement: a conflict
        nl = NamedLosses(
            ["subset.flair+t2", "subset.flair+t2.inverse"],
            torch.stack([loss(z_full, t).mean(), loss(z_full, 1 - t).mean()]),
        )
        report = step.step(nl)
        assert float(report.cosine[0, 1]) < 0
        updates[method] = torch.cat(
            [(p.detach() - s).flatten() for p, s in zip(net.parameters(), start)]
        )
    assert float((updates["gmd"] - updates["sum"]).abs().max()) > 1e-6


# ---------------------------------------------------------------------------- DDP and resume

STEPS = 2


def _train_drawn(rank: int, world: int, state: dict | None = None, steps: int = STEPS):
    """Tiny shared U-Net, GMD, 3 subsets drawn per step; each rank its half of the batch."""
    net = tiny_shared(features=(4, 8), deep_supervision=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    objectives = ObjectiveSet(subsets=3, seed=3)
    agg = build_aggregator("gmd")
    step = TrainStep(net, opt, agg, strategy="loop")
    start = 0
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step.load_state_dict(state["train_step"])
        agg.load_state_dict(state["aggregator"])
        objectives.load_state_dict(state["objectives"])
        start = state["step"]
    names = []
    per = 4 // world
    for s in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + s)
        x = torch.randn(4, 4, 8, 8, 8, generator=gen)
        t = (torch.rand(4, 3, 8, 8, 8, generator=gen) > 0.6).float()
        sl = slice(rank * per, (rank + 1) * per)
        nl = objectives(net(x[sl]), t[sl])
        names.append(nl.names)
        assert not bool(step.step(nl).skipped)
    snapshot = {
        "model": copy.deepcopy(net.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
        "train_step": copy.deepcopy(step.state_dict()),
        "aggregator": copy.deepcopy(agg.state_dict()),
        "objectives": objectives.state_dict(),
        "step": start + steps,
    }
    return [p.detach().clone() for p in net.parameters()], names, snapshot


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params, names, _ = _train_drawn(rank, world)
        torch.save({"params": params, "names": names}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_drawn_subsets_update_identically(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["names"] == r1["names"]
    assert len({tuple(n) for n in r0["names"]}) > 1  # subsets were drawn anew each step
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    start = [p.detach() for p in tiny_shared(features=(4, 8), deep_supervision=1).parameters()]
    assert any(not torch.equal(a, s) for a, s in zip(r0["params"], start))


def test_resume_with_drawn_subsets_is_exact():
    straight, names_straight, _ = _train_drawn(0, 1, steps=3)
    _, names_a, state = _train_drawn(0, 1, steps=2)
    resumed, names_b, _ = _train_drawn(0, 1, state=state, steps=1)
    assert names_a + names_b == names_straight
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_shared_subsets_gmd_validates_logs_diagnostics_and_predicts(tmp_path):
    """``train --network shared --subsets all --aggregator gmd`` at test size, then ``predict``."""
    import contextlib
    import io
    import json

    from mlflow.tracking import MlflowClient

    from segmerge.engine.cli import main
    from segmerge.inference.cli import predict_main

    root = tmp_path / "bundle"
    net_args = ["--network_def#features", "[4, 8, 16]", "--network_def#deep_supervision", "2"]
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(
            [
                "train", "--network", "shared", "--subsets", "all", "--aggregator", "gmd",
                "--progress", "false", "--num_threads", "1", "--cache_dir", str(tmp_path / "c"),
                "--dataset#phantoms#cases", "4", "--dataset#phantoms#size", "32",
                "--patch-size", "16", "--batch-size", "1", *net_args,
                "--validation#ogr_cases", "1", "--validation#max_cases", "1",
                "--epochs", "2", "--steps-per-epoch", "1", "--val_every", "1", "--log_every", "1",
                "--bundle_root", str(root),
            ][1:]
        )  # fmt: skip
    assert code == 0
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("segmerge").experiment_id])
    keys = set(run.data.metrics)
    # 15 subset rows at full resolution + fused.d1 (K = 16 > 8): summaries, no K² pair keys
    assert "loss/subset.flair-t1ce" in keys and "loss/fused.d1" in keys
    assert {"cosine/min", "cosine/mean", "conflict/fraction", "weights/entropy"} <= keys
    assert "cosine/min/subset.flair+t1+t1ce+t2".replace("+", "-") in keys
    assert not any(k.startswith("cosine/subset.") for k in keys)
    assert {"val/dice/wt", "ogr/fused", "ogr/flair"} <= keys  # OGR heads from subset rows
    assert "heldout_loss/subset.t2" in keys
    rid = run.info.run_id
    files = {a.path for a in client.list_artifacts(rid, "matrices/epoch_001")}
    assert {
        f"matrices/epoch_001/{f}" for f in ("cosine.png", "alpha.png", "matrices.json")
    } <= files
    numbers = json.loads(
        Path(client.download_artifacts(rid, "matrices/epoch_001/matrices.json")).read_text()
    )
    assert len(numbers["names"]) == 16 and "subset.flair+t1ce" in numbers["names"]
    assert len(numbers["cosine"]) == 16 and numbers["cosine"][0][0] == pytest.approx(1.0)
    # the bundle's weights serve predict as they are: train recorded the network beside them
    record = json.loads((root / "models" / "network.json").read_text())
    assert record["_target_"] == "segmerge.nets.SharedModalityUNet"
    assert record["features"] == [4, 8, 16] and record["deep_supervision"] == 2
    assert (root / "models" / rid / "network.json").read_text() == json.dumps(
        record, indent=1
    ) + "\n"
    (data,) = (tmp_path / "c").glob("phantoms-*")
    out = tmp_path / "pred"
    args = [
        "--input",
        str(data),
        "--output",
        str(out),
        "--model",
        str(root / "models" / "model.pt"),
    ]
    assert predict_main([*args, "--device", "cpu"]) == 0
    assert len(list(out.glob("*.nii.gz"))) == 4
    # the bundle command too (inference.json's network id reads the record)
    import subprocess
    import sys

    bundle = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         str(Path(__file__).resolve().parents[1] / "configs" / "inference.json"),
         "--bundle_root", str(root), "--dataset_dir", str(data),
         "--output_dir", str(tmp_path / "bundle-pred"), "--device", "$torch.device('cpu')"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bundle.returncode == 0, bundle.stderr[-2000:]
    assert len(list((tmp_path / "bundle-pred").glob("*.nii.gz"))) == 4


def test_network_record_is_data(tmp_path):
    """The network record beside the weights is read as data: an expression or a foreign
    ``_target_`` is refused by name; without a record the config's network is used."""
    import json

    from segmerge.bundle_paths import read_network_record
    from segmerge.inference.bundle import trained_network

    model = tmp_path / "model.pt"
    fallback = object()
    assert trained_network(model, fallback) is fallback
    record = tmp_path / "network.json"
    record.write_text(
        json.dumps(
            {
                "_target_": "segmerge.nets.SharedModalityUNet",
                "features": [4, 8, 16],
                "deep_supervision": 2,
            }
        )
    )
    assert type(trained_network(model, fallback)).__name__ == "SharedModalityUNet"
    marker = tmp_path / "pwned"
    record.write_text(json.dumps({"_target_": "segmerge.nets.SharedModalityUNet",
                                  "features": f"$open({str(marker)!r}, 'w') or [4, 8]"}))  # fmt: skip
    with pytest.raises(ValueError, match="network.json.*expression"):
        read_network_record(model)
    record.write_text(json.dumps({"_target_": "os.system", "command": "true"}))
    with pytest.raises(ValueError, match="segmerge.nets"):
        trained_network(model, fallback)
    assert not marker.exists()


def test_autocast_bf16_subset_objectives_are_float32_and_finite():
    """AMP on the shared U-Net (CPU bf16 autocast; CUDA fp16 runs the same code): the network runs
    in reduced precision, the 15 subset losses come out float32 and finite, and so do the gradients
    of the shared convolutions and of every modality's normalisation."""
    torch.manual_seed(0)
    net = SharedModalityUNet(features=[4, 8, 16], deep_supervision=2)
    x = torch.randn(2, 4, 32, 32, 32)  # 32³: the deepest level is 8³ (see test_objectives)
    available = torch.tensor([[True, False, True, True], [True, True, True, True]])
    target = (torch.rand(2, 3, 32, 32, 32) > 0.7).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = net(x, available)
        nl = ObjectiveSet(subsets="all")(outputs, target, available)
    assert outputs["modality.flair"].dtype == torch.bfloat16  # the network did run in bf16
    full_res = [n for n in nl.names if n.startswith("subset.") and ".d" not in n]
    assert len(full_res) == 15  # one row per subset at full resolution (plus coarser depths)
    assert nl.losses.dtype == torch.float32 and bool(torch.isfinite(nl.losses).all())
    nl.losses.sum().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads.values())
    assert any(g is not None and ".t1." in f".{n}." for n, g in grads.items())
