"""End-to-end ``segmerge train`` on tiny phantoms: outputs, MLflow (also over a real server),
exact resume, and SIGKILL / SIGINT handling."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from segmerge.engine.checkpoint import load_checkpoint
from segmerge.engine.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def tiny(cache: Path, *extra: str) -> list[str]:
    """Smallest useful settings: 32³ phantoms, 16³ patches, a 3-level network."""
    return [
        "--progress", "false", "--num_threads", "1", "--cache_dir", str(cache),
        "--dataset#phantoms#cases", "5", "--dataset#phantoms#size", "32",
        "--patch-size", "16", "--batch-size", "1",
        "--network_def#features", "[4, 8, 16]", "--network_def#deep_supervision", "2",
        "--network_def#aux_level", "1", "--validation#ogr_cases", "2",
        "--epochs", "2", "--steps-per-epoch", "2", "--val_every", "1", "--log_every", "1",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("phantom-cache")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the tests that do not test the default location (creating a store
    runs MLflow's schema migrations: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("bundle")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(tiny(cache, "--bundle_root", str(root)))
    return code, out.getvalue(), root


def _client(root: Path | None = None, uri: str | None = None, experiment: str = "segmerge"):
    from mlflow.tracking import MlflowClient

    uri = uri or f"sqlite:///{root / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def test_default_run_writes_bundle_weights_checkpoints_and_prints_summary(default_run):
    code, stdout, root = default_run
    assert code == 0
    assert "mlflow ui --backend-store-uri sqlite:///" in stdout
    assert str(root / "runs" / "mlflow.db") in stdout
    for region in ("wt", "tc", "et", "mean"):
        assert f" {region} " in stdout
    weights = torch.load(root / "models" / "model.pt", weights_only=True)
    from segmerge.nets import MultiModalDSNet

    net = MultiModalDSNet(features=[4, 8, 16], deep_supervision=2, aux_level=1)
    assert set(weights) == set(net.state_dict())
    net.load_state_dict(weights)
    (ckdir,) = (root / "runs" / "checkpoints").iterdir()
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(ckdir / name)
        for key in ("model", "optimizer", "scheduler", "aggregator", "train_step", "rng", "run_id"):
            assert key in state
    last = load_checkpoint(ckdir / "last.pt")
    assert last["iteration"] == 4 and last["epoch"] == 2
    assert last["run_id"] == ckdir.name


def test_mlflow_run_holds_params_metrics_and_artifacts(default_run):
    _, _, root = default_run
    client, runs = _client(root)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["aggregator_repr"] == "GMD(order='identity', seed=0)"
    assert params["config/network_def/features"] == "[4, 8, 16]"
    assert params["config/output_dir"] == f"{root}/runs"  # expressions resolved
    assert params["config/lr_scheduler/T_max"] == "4"
    assert int(params["data/n_training"]) + int(params["data/n_validation"]) == 5
    assert "versions/monai" in params
    keys = set(run.data.metrics)
    names = [
        "fused.d0",
        "fused.d1",
        "modality.flair",
        "modality.t1",
        "modality.t1ce",
        "modality.t2",
    ]
    for n in names:
        assert {f"loss/{n}", f"weight/{n}", f"grad_norm/{n}", f"val_loss/{n}"} <= keys
    assert "cosine/fused.d0__modality.t1ce" in keys
    assert "conflict/alpha/modality.t1ce__fused.d0" in keys
    assert {"conflict/n_pairs", "lr", "perf/steps_per_second", "train/skipped_steps"} <= keys
    assert {f"ogr/{h}" for h in ("fused", "flair", "t1", "t1ce", "t2")} <= keys
    assert {f"val/dice/{r}" for r in ("wt", "tc", "et", "mean")} <= keys
    assert {f"val/hd95/{r}" for r in ("wt", "tc", "et", "mean")} <= keys
    rid = run.info.run_id
    loss_steps = [m.step for m in client.get_metric_history(rid, "loss/fused.d0")]
    assert sorted(loss_steps) == [1, 2, 3, 4]  # log_every=1
    dice = client.get_metric_history(rid, "val/dice/wt")
    assert sorted(m.step for m in dice) == [2, 4]  # val_every=1, 2 steps per epoch
    assert all(0.0 <= m.value <= 1.0 for m in dice)
    ogr_steps = [m.step for m in client.get_metric_history(rid, "ogr/fused")]
    assert ogr_steps == [4]  # OGR needs two validations
    plots = {a.path for a in client.list_artifacts(rid, "plots")}
    assert {
        "plots/cosine.png",
        "plots/alpha.png",
        "plots/ogr_curves.png",
        "plots/weight_curves.png",
        "plots/validation_montage.png",
    } <= plots
    assert {a.path for a in client.list_artifacts(rid, "model")} == {"model/model.pt"}
    local = Path(client.download_artifacts(rid, "config/train.json"))
    assert json.loads(local.read_text())["aggregator"]["_target_"] == "segmerge.aggregation.GMD"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_mlflow_server_serves_the_run_over_rest(default_run):
    _, _, root = default_run
    _, runs = _client(root)
    rid = runs[0].info.run_id
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'runs' / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, "mlflow server exited"
            assert time.time() < deadline, "mlflow server did not start within 120 s"
            time.sleep(1)
        q = urllib.parse.urlencode({"run_id": rid, "metric_key": "val/dice/wt"})
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/metrics/get-history?{q}") as r:
            history = json.load(r)["metrics"]
        assert sorted(m["step"] for m in history) == [2, 4]
        q = urllib.parse.urlencode({"run_uuid": rid, "path": "config/train.json"})
        with urllib.request.urlopen(f"{base}/get-artifact?{q}") as r:
            config = json.loads(r.read())
        assert config["aggregator"]["_target_"] == "segmerge.aggregation.GMD"
        # the engine also writes to a remote server (and its start-up probes accept it)
        from segmerge.engine.tracking import Tracker, check_tracking_uri

        check_tracking_uri(base)

        t = Tracker(base, experiment="remote-check")
        t.log_metrics({"x/y": 1.5}, step=3)
        t.end()
        with urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/runs/get?{urllib.parse.urlencode({'run_id': t.run_id})}"
        ) as r:
            metrics = json.load(r)["run"]["data"]["metrics"]
        assert metrics == [
            {"key": "x/y", "value": 1.5, "timestamp": metrics[0]["timestamp"], "step": 3}
        ]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path, cache, store):
    common = tiny(cache, "--epochs", "4", "--steps-per-epoch", "1", "--val_every", "2")
    common += ["--tracking-uri", store]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*common, "--bundle_root", str(a), "--experiment", "resume-a"]) == 0
    assert (
        main([*common, "--bundle_root", str(b), "--experiment", "resume-b", "--stop_after", "2"])
        == 0
    )
    (ck_b,) = (b / "runs" / "checkpoints").iterdir()
    half = load_checkpoint(ck_b / "last.pt")
    assert half["iteration"] == 2
    assert not (b / "models" / "model.pt").exists()  # stopped early: nothing published yet
    assert main(["--resume", str(ck_b / "last.pt"), "--progress", "false"]) == 0
    (ck_a,) = (a / "runs" / "checkpoints").iterdir()
    full, resumed = load_checkpoint(ck_a / "last.pt"), load_checkpoint(ck_b / "last.pt")
    assert resumed["iteration"] == full["iteration"] == 4
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert resumed["run_id"] == half["run_id"] == ck_b.name  # the same MLflow run continued
    client, runs = _client(uri=store, experiment="resume-b")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    dice = client.get_metric_history(runs[0].info.run_id, "val/dice/wt")
    assert sorted(m.step for m in dice) == [2, 4]


def _spawn(args: list[str]) -> subprocess.Popen:
    # passive OpenMP waiting: spinning threads crawl when the 2 cores are shared
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.Popen(
        [sys.executable, "-m", "segmerge", "train", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_iteration(path: Path, above: int, proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file():
            it = load_checkpoint(path)["iteration"]
            if it > above:
                return it
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training exited early ({proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"no checkpoint beyond step {above} within {timeout} s")


def test_sigkill_then_sigint_then_resume(tmp_path, cache, store):
    args = tiny(
        cache, "--bundle_root", str(tmp_path), "--epochs", "200", "--steps-per-epoch", "2",
        "--checkpoint_every", "1", "--val_every", "100", "--log_every", "2",
        "--tracking-uri", store, "--experiment", "faults",
    )  # fmt: skip
    args[args.index("--progress") + 1] = "true"
    ckroot = tmp_path / "runs" / "checkpoints"
    # 1) SIGKILL after the first checkpoints: the last one stays readable
    p1 = _spawn(args)
    deadline = time.time() + 240
    while not (ckroot.is_dir() and any(ckroot.iterdir())):
        assert p1.poll() is None and time.time() < deadline, "no checkpoint folder"
        time.sleep(0.5)
    (ckdir,) = ckroot.iterdir()
    last = ckdir / "last.pt"
    it1 = _wait_for_iteration(last, 1, p1, timeout=240)
    p1.send_signal(signal.SIGKILL)
    p1.wait(timeout=30)
    assert p1.returncode == -signal.SIGKILL
    killed = load_checkpoint(last)
    assert killed["iteration"] >= it1
    # 2) resume, then SIGINT: a checkpoint is saved and the process exits cleanly with 130
    p2 = _spawn(["--resume", str(last)])
    it2 = _wait_for_iteration(last, killed["iteration"], p2, timeout=240)
    p2.send_signal(signal.SIGINT)
    out, err = p2.communicate(timeout=120)
    assert p2.returncode == 130, err[-3000:]
    assert "checkpoint saved" in err and "--resume" in err
    assert "loss=" in err and "step" in err  # the progress bar showed the loss
    stopped = load_checkpoint(last)
    assert stopped["iteration"] >= it2
    assert stopped["run_id"] == killed["run_id"] == ckdir.name
    client, runs = _client(uri=store, experiment="faults")
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    # 3) resume to a shortened end in-process: same run, finished
    end_epoch = stopped["iteration"] // 2 + 1
    assert main(["--resume", str(last), "--epochs", str(end_epoch), "--progress", "false"]) == 0
    final = load_checkpoint(last)
    assert final["iteration"] == end_epoch * 2
    assert final["run_id"] == ckdir.name
    _, runs = _client(uri=store, experiment="faults")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_torchrun_two_processes_one_mlflow_run(tmp_path, cache, store):
    torchrun = Path(sys.executable).with_name("torchrun")
    args = tiny(cache, "--bundle_root", str(tmp_path), "--tracking-uri", store)
    args += ["--experiment", "torchrun", "--device", "cpu"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "segmerge", "train", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("mlflow ui --backend-store-uri") == 1  # rank 0 reports
    client, runs = _client(uri=store, experiment="torchrun")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["world_size"] == "2"
    # one logged value per step: rank 0 alone wrote the metrics
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/fused.d0")) == [
        1,
        2,
        3,
        4,
    ]
    (ckdir,) = (tmp_path / "runs" / "checkpoints").iterdir()
    assert ckdir.name == run.info.run_id
    assert load_checkpoint(ckdir / "last.pt")["iteration"] == 4
    assert (tmp_path / "models" / "model.pt").is_file()


def test_skip_invalid_trains_without_the_broken_case(tmp_path, cache, store, capsys):
    import shutil

    (src,) = [p for p in cache.iterdir() if p.name.startswith("phantoms-")]
    data = tmp_path / "data"
    shutil.copytree(src, data)
    spec = json.loads((data / "dataset.json").read_text())
    broken = spec["training"][0]
    (data / broken["t2"]).write_bytes(b"truncated")
    args = tiny(cache, "--bundle_root", str(tmp_path), "--tracking-uri", store, "--data", str(data))
    args += ["--experiment", "skip-invalid", "--epochs", "1", "--steps-per-epoch", "1"]
    assert main(args) == 2  # refused before training without --skip-invalid
    capsys.readouterr()
    assert main([*args, "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert f"--skip-invalid: leaving out 1 case(s) of {data}: {broken['case_id']}" in err
    _, runs = _client(uri=store, experiment="skip-invalid")
    params = runs[0].data.params
    assert params["data/n_skipped_invalid"] == "1"
    assert json.loads(params["data/skipped_cases"]) == [broken["case_id"]]
    assert int(params["data/n_training"]) == len(spec["training"]) - 1
