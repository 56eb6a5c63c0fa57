"""Reliability and security of the training side (issue 16): each test reproduces one defect of
the bad-input and fault campaign. The table in ``docs/reliability.md`` points here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from segmerge.engine.checkpoint import resolved_config, restore_config
from segmerge.engine.cli import main
from segmerge.engine.config import ConfigError, load_config, parse_argv, usage
from segmerge.overrides import decode_literal, literal, parse_assignments, to_config

TINY = [
    "--progress", "false", "--num_threads", "1", "--epochs", "1", "--steps-per-epoch", "1",
    "--dataset#phantoms#cases", "5", "--dataset#phantoms#size", "32", "--patch-size", "16",
    "--batch-size", "1", "--network_def#features", "[4, 8, 16]",
    "--network_def#deep_supervision", "2", "--network_def#aux_level", "1",
    "--validation#ogr_cases", "2", "--log_every", "1",
]  # fmt: skip
"""Smallest useful training (as in test_train_run), also a guard: a test that should stop before
training costs seconds if it does not."""


def _marker_expression(marker: Path) -> str:
    return f"$__import__('pathlib').Path({str(marker)!r}).touch() or 0.003"


def _crafted_checkpoint(tmp_path: Path, config: dict, **extra) -> Path:
    state = {"model": {}, "iteration": 0, "config": json.dumps(config), **extra}
    path = tmp_path / "crafted.pt"
    torch.save(state, path)
    return path


def _resolved(*argv: str) -> tuple[dict, list[str]]:
    config, kept, _ = resolved_config(load_config(parse_argv(list(argv))))
    return config, kept


# ------------------------------------------------------------------ security 2: checkpoints are data
@pytest.mark.parametrize("fmt", [1, 2])
def test_resume_never_evaluates_an_expression_stored_in_a_checkpoint(tmp_path, capsys, fmt):
    config, kept = _resolved()
    marker = tmp_path / "pwned"
    config["lr"] = _marker_expression(marker)
    extra = {"format": fmt, "config_expressions": [*kept, "lr"]} if fmt == 2 else {"format": 1}
    path = _crafted_checkpoint(tmp_path, config, **extra)
    assert main(["--resume", str(path), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "config id 'lr' holds the expression" in err and "never evaluates" in err


def test_an_unlisted_expression_is_a_literal_string_not_code(tmp_path, capsys):
    config, kept = _resolved()
    marker = tmp_path / "pwned"
    config["lr"] = _marker_expression(marker)  # format 2 and not listed: plain data
    path = _crafted_checkpoint(tmp_path, config, format=2, config_expressions=kept)
    assert main(["--resume", str(path), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "lr must be a finite number" in err


def test_a_foreign_component_target_in_a_checkpoint_is_refused(tmp_path):
    config, kept = _resolved()
    marker = tmp_path / "pwned"
    config["objectives"] = {"_target_": "pathlib.Path.touch", "self": str(marker)}
    state = {"format": 2, "config": json.dumps(config), "config_expressions": kept}
    parser = load_config(parse_argv([]))
    with pytest.raises(ValueError, match="objectives#_target_"):
        restore_config(parser, state, "x.pt")
    assert not marker.exists()


def test_a_stored_configuration_restores_to_the_same_resolved_values():
    argv = ["--aggregator", "gradcraft", "--r", "0.25", "--run_name", "@lr", "--lr", "0.002"]
    config, kept, derived = resolved_config(load_config(parse_argv(argv)))
    state = {"format": 2, "config": json.dumps(config), "config_expressions": kept}
    state["config_derived"] = derived
    parser = load_config(parse_argv([]), checkpoint=(state, "x.pt"))
    assert resolved_config(parser) == (config, kept, derived)
    # a derived value follows its inputs again (the bundle's expression, not a frozen copy)
    moved = load_config(parse_argv(["--bundle_root", "/elsewhere"]), checkpoint=(state, "x.pt"))
    assert moved.get_parsed_content("output_dir") == "/elsewhere/runs"
    state.pop("config_derived")  # without the record: the stored values, as data
    frozen = load_config(parse_argv(["--bundle_root", "/elsewhere"]), checkpoint=(state, "x.pt"))
    assert frozen.get_parsed_content("output_dir") == "./runs"
    assert parser.get_parsed_content("run_name") == "@lr"
    assert repr(parser.get_parsed_content("aggregator")) == "GradCraft(r=0.25, e=0.0, b=0.0)"


def test_an_old_format_checkpoint_resumes_with_only_the_real_changes():
    from segmerge.engine.checkpoint import changed_settings

    raw = load_config(parse_argv(["--epochs", "3"])).get()  # format 1 stored the raw config
    state = {"format": 1, "config": json.dumps(raw)}
    parser = load_config(parse_argv(["--epochs", "4"]), checkpoint=(state, "x.pt"))
    parser.get_parsed_content("train_transforms")  # MONAI rewrites '#' in ids to '::' in place
    now = {
        k: v for k, v in decode_literal(parser.get()).items() if k not in ("_comment", "imports")
    }
    old = {k: v for k, v in raw.items() if k not in ("_comment", "imports")}
    assert changed_settings(old, now) == {"epochs": (3, 4)}


def test_checkpoints_without_config_or_empty_give_a_reason(tmp_path, capsys):
    torch.save({"model": {}, "iteration": 0}, tmp_path / "noconfig.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert main(["--resume", str(tmp_path / "noconfig.pt")]) == 2
    assert "holds no training configuration ('config')" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "empty.pt")]) == 2
    assert "is empty (0 bytes)" in capsys.readouterr().err


# ------------------------------------------------------------------ security 3: values are literals
@pytest.mark.parametrize(
    "text", ["@lr", "$__import__('os').getpid()", "%train.json#lr", "a::b", 'it\'s \\ "q" é']
)
def test_command_line_strings_stay_what_was_typed(text):
    parser = load_config(parse_argv(["--run_name", text, "--experiment", text]))
    assert parser.get_parsed_content("run_name") == text
    assert parser.get_parsed_content("experiment") == text
    assert decode_literal(literal(text)) == text
    assert parse_assignments([f"name={text}"])["name"] == literal(text)


def test_expressions_only_with_expr(tmp_path):
    marker = tmp_path / "ran"
    code = f"$__import__('pathlib').Path({str(marker)!r}).touch() or 'x'"
    parser = load_config(parse_argv(["--run_name", code, "--lr", "$0.5 * 0.004"]))
    assert parser.get_parsed_content("run_name") == code
    assert parser.get_parsed_content("lr") == "$0.5 * 0.004"
    assert not marker.exists()
    parser = load_config(parse_argv(["--expr", "--run_name", "@lr", "--lr", "$0.5 * 0.004"]))
    assert parser.get_parsed_content("lr") == pytest.approx(0.002)
    assert parser.get_parsed_content("run_name") == pytest.approx(0.002)
    assert to_config("[1, 2]") == [1, 2] and to_config("1e-3") == 0.001
    assert to_config("@x", expressions=True) == "@x"


def test_the_rule_is_in_the_help(capsys):
    from segmerge.inference.cli import predict_main

    text = usage()
    assert "--expr" in text and "NOT evaluated unless --expr" in text
    assert "config files (configs/*.json, --config) are code" in text
    with pytest.raises(SystemExit) as done:  # argparse %-formats help: '%' must be escaped
        predict_main(["--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "a value starting with $, @ or % is NOT evaluated unless --expr" in out


def test_a_dollar_learning_rate_is_a_clear_value_error(tmp_path, capsys):
    args = [*TINY, "--lr", "$1e-3", "--bundle_root", str(tmp_path)]
    assert main(args) == 2
    assert "lr must be a finite number > 0.0, got '$1e-3'" in capsys.readouterr().err


def test_run_name_reference_under_expr_is_a_config_error_not_the_store(tmp_path, capsys):
    args = [*TINY, "--expr", "--run_name", "@nosuch", "--bundle_root", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "run_name" in err and "nosuch" in err and "MLflow store" not in err


def test_config_error_type():
    with pytest.raises(ConfigError, match="no such file"):
        load_config(parse_argv(["--config", "/nonexistent/extra.json"]))


# ------------------------------------------------------------------ small ones (item 16)
def test_mlflow_ui_command_is_quoted_and_unknown_schemes_are_named():
    from segmerge.engine.tracking import check_tracking_uri, ui_command

    assert ui_command("sqlite:////a b/mlflow.db") == (
        "mlflow ui --backend-store-uri 'sqlite:////a b/mlflow.db'"
    )
    with pytest.raises(ValueError, match="unsupported scheme 'ftp'"):
        check_tracking_uri("ftp://host/store")


def test_allow_missing_is_a_train_option():
    parser = load_config(parse_argv(["--allow-missing"]))
    assert parser.get_parsed_content("dataset#allow_missing") is True
    assert "--allow-missing" in usage()


# ------------------------------------------------------------------ item 5: one training per folder
def test_output_folder_lock_names_the_holder_and_takes_over_a_dead_one(tmp_path):
    import socket
    import subprocess
    import sys

    from segmerge.engine.lock import LOCK_NAME, FolderLock, FolderLocked

    held = FolderLock(tmp_path).acquire()
    try:
        with pytest.raises(FolderLocked) as info:
            FolderLock(tmp_path).acquire()
        text = str(info.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in text and "started 20" in text
    finally:
        held.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "h", "started": "t"}))
    with FolderLock(tmp_path) as lock:
        assert lock.took_over["pid"] == pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_second_training_into_a_locked_output_folder_is_refused(tmp_path, capsys):
    from segmerge.engine.lock import FolderLock

    # flock conflicts between two open files even in one process: hold it here, train "again"
    with FolderLock(tmp_path / "runs"):
        assert main([*TINY, "--bundle_root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"in use by another training (pid {os.getpid()} on" in err
    assert "give this one another --output" in err


# ------------------------------------------------------------------ item 9: unusable store at start
class _FakeServer:
    """A local HTTP server answering /health with 200 and the API with ``mode``: "hang" (sleeps
    up to ``hang_s``) or an HTTP status. Serves on 127.0.0.1 in a daemon thread; stops itself."""

    def __init__(self, mode: str | int, hang_s: float = 5.0) -> None:
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith("/health"):
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"OK")
                    return
                if outer.mode == "hang":
                    outer.stop.wait(hang_s)  # bounded: returns at hang_s or when stopped
                    return
                self.send_response(int(outer.mode))
                self.end_headers()

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.mode = mode
        self.stop = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(
    ("mode", "message"), [("hang", "cannot be reached"), (503, "answered 503")]
)
def test_a_store_that_answers_health_but_not_its_api_fails_fast(tmp_path, capsys, mode, message):
    import time

    with _FakeServer(mode) as server:
        t0 = time.monotonic()
        args = [*TINY, "--bundle_root", str(tmp_path), "--tracking-uri", server.uri]
        assert main(args) == 2
        elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert message in err and "REST API" in err and server.uri in err
    assert elapsed < 30, elapsed  # bounded by the 5 s probe timeout (plus setup)


# ------------------------------------------------------------------ item 9: store failing mid-run
def test_tracker_keeps_metrics_while_the_store_fails_and_sends_them_later(tmp_path, monkeypatch):
    from segmerge.engine import tracking

    said: list[str] = []
    failures: list[str] = []
    t = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="flaky", say=said.append)
    t.resilient, t.on_failure = True, failures.append
    real = t.client.log_batch
    broken = {"on": True}

    def flaky(*args, **kwargs):
        if broken["on"]:
            raise ConnectionError("store down")
        return real(*args, **kwargs)

    monkeypatch.setattr(t.client, "log_batch", flaky)
    for step in (1, 2, 3):
        t.add_metrics({"loss": float(step)}, step)
        assert t.flush() == 0
    assert t.pending == 3 and len(failures) == 1 and len(said) == 1
    assert "training continues" in said[0] and "store down" in said[0]
    assert t.dump_pending(tmp_path / "unsent.jsonl") == 3  # what a run still down at its end keeps
    rows = [json.loads(line) for line in (tmp_path / "unsent.jsonl").read_text().splitlines()]
    assert [(r["key"], r["step"], r["value"]) for r in rows] == [
        ("loss", i, float(i)) for i in (1, 2, 3)
    ]
    broken["on"] = False
    assert t.end("FINISHED")  # the final flush retries at once
    run = t.client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in t.client.get_metric_history(t.run_id, "loss")] == [1, 2, 3]
    assert t.pending == 0 and "answers again" in said[-1]


# ------------------------------------------------------------------ trainings (items 5, 6, 7, 9, 10)
def _runs(uri: str, experiment: str = "segmerge"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny training whose store failed once in the middle of the run."""
    import contextlib
    import io

    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("bundle x")  # a space: the printed mlflow ui line is quoted
    cache = tmp_path_factory.mktemp("cache")
    real = MlflowClient.log_batch
    calls = {"metrics": 0}

    def flaky(self, *args, **kwargs):
        if kwargs.get("metrics"):
            calls["metrics"] += 1
            if calls["metrics"] == 2:  # the store fails once in the middle of the run
                raise ConnectionError("store went away")
        return real(self, *args, **kwargs)

    out, err = io.StringIO(), io.StringIO()
    argv = [*TINY, "--epochs", "2", "--cache_dir", str(cache), "--bundle_root", str(root)]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(MlflowClient, "log_batch", flaky)
        with contextlib.redirect_stderr(err):
            code = main(argv)
    return code, out.getvalue(), err.getvalue(), root, cache


@pytest.mark.slow
def test_store_failing_mid_run_does_not_stop_training_and_loses_nothing(finished):
    code, out, err, root, _ = finished
    assert code == 0, err[-2000:]
    assert err.count("training continues") == 1 and "store went away" in err
    client, (run,) = _runs(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == [1, 2]


@pytest.mark.slow
def test_weights_are_published_per_run_and_the_artifact_is_that_runs(finished):
    _, out, _, root, _ = finished
    client, (run,) = _runs(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    rid = run.info.run_id
    own = torch.load(root / "models" / rid / "model.pt", weights_only=True)
    latest = torch.load(root / "models" / "model.pt", weights_only=True)
    art = torch.load(client.download_artifacts(rid, "model/model.pt"), weights_only=True)
    assert all(torch.equal(own[k], latest[k]) and torch.equal(own[k], art[k]) for k in own)
    assert run.data.tags["segmerge.completed"] == "true"
    assert f"this run's copy: {root / 'models' / rid / 'model.pt'}" in out
    assert f"--backend-store-uri 'sqlite:///{root}/runs/mlflow.db'" in out


@pytest.mark.slow
def test_a_copied_checkpoint_resumed_elsewhere_leaves_the_original_run_alone(
    finished, tmp_path, capsys
):
    import shutil

    _, _, _, root, cache = finished
    uri = f"sqlite:///{root / 'runs' / 'mlflow.db'}"
    client, (original,) = _runs(uri)
    rid = original.info.run_id
    before = (original.info.end_time, original.data.metrics, original.data.tags)
    copy = tmp_path / "copy" / "last.pt"
    copy.parent.mkdir()
    shutil.copyfile(root / "runs" / "checkpoints" / rid / "last.pt", copy)
    shutil.copyfile(root / "runs" / "checkpoints" / rid / "best.pt", copy.parent / "best.pt")
    where = tmp_path / "elsewhere"
    base = ["--resume", str(copy), "--bundle_root", str(where), "--cache_dir", str(cache)]
    # changes that break exactness are refused, naming them
    assert main([*base, "--aggregator", "pcgrad"]) == 2
    assert "aggregator#_target_ ('segmerge.aggregation.GMD' -> 'segmerge.aggregation.PCGrad')" in (
        capsys.readouterr().err
    )
    assert main([*base, "--network_def#features", "[4, 8, 32]"]) == 2
    err = capsys.readouterr().err
    assert "network_def#features" in err and len(err.strip().splitlines()) == 1
    # an allowed change (epochs) continues in a new run of this folder's store, recorded
    assert main([*base, "--epochs", "3", "--progress", "false"]) == 0
    out, err = capsys.readouterr()
    assert f"MLflow run {rid} is not in sqlite:///{where}/runs/mlflow.db" in err
    assert "epochs 2 -> 3" in err
    _, (new,) = _runs(f"sqlite:///{where / 'runs' / 'mlflow.db'}")
    assert new.data.tags["segmerge.resumed_from"] == rid
    assert "epochs 2 -> 3" in new.data.tags["segmerge.resume_changes.2"]
    assert f"continues MLflow run {rid}" in out
    _, (again,) = _runs(uri)  # the original run: not reopened, not rewritten
    assert (again.info.status, again.info.end_time) == ("FINISHED", before[0])
    assert (again.data.metrics, again.data.tags) == before[1:]


@pytest.mark.slow
def test_a_checkpoint_of_another_network_gives_a_short_message(finished, tmp_path, capsys):
    _, _, _, root, cache = finished
    (ckdir,) = (root / "runs" / "checkpoints").iterdir()
    state = torch.load(ckdir / "last.pt", weights_only=True)
    first = next(iter(state["model"]))
    state["model"][first] = torch.zeros(3, 3)
    state["model"].pop(list(state["model"])[-1])
    torch.save(state, tmp_path / "other.pt")
    args = ["--resume", str(tmp_path / "other.pt"), "--bundle_root", str(tmp_path)]
    assert main([*args, "--cache_dir", str(cache), "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 missing" in err and "1 of another shape" in err


@pytest.mark.slow
def test_disk_full_before_and_during_training(finished, tmp_path, capsys, monkeypatch):
    import errno

    from segmerge.engine import handlers, outputs

    _, _, _, _, cache = finished
    args = [*TINY, "--cache_dir", str(cache), "--bundle_root", str(tmp_path)]

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as mp:  # the pre-check writes: an empty file would still fit
        mp.setattr(outputs.os, "fsync", full)
        assert main(args) == 2
    assert "is not writable: [Errno 28] No space left on device" in capsys.readouterr().err
    real = handlers.atomic_torch_save  # what the checkpoints are written with
    calls = {"n": 0}

    def fill(obj, path):
        calls["n"] += 1
        if calls["n"] > 1:  # the first checkpoint fits, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path)

    monkeypatch.setattr(handlers, "atomic_torch_save", fill)
    assert main([*args, "--epochs", "3", "--val_every", "3"]) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "marked FAILED" in err and "is kept" in err
    assert "Traceback" not in err
    _, (run,) = _runs(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_a_second_ctrl_c_during_validation_ends_cleanly(finished, tmp_path, capsys, monkeypatch):
    import signal

    from segmerge.engine import handlers

    _, _, _, _, cache = finished
    real = handlers.validate

    def impatient(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(handlers, "validate", impatient)
    args = [*TINY, "--cache_dir", str(cache), "--bundle_root", str(tmp_path)]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "second interrupt: stopped at once" in err and "Traceback" not in err
    _, (run,) = _runs(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_a_finished_run_is_reopened_only_with_continue_run(finished, tmp_path):
    from segmerge.engine.mlflow_run import run_to_continue

    _, _, _, root, _ = finished
    uri = f"sqlite:///{root / 'runs' / 'mlflow.db'}"
    _, (run,) = _runs(uri)
    rid = run.info.run_id
    for flag, expected in ((False, None), (True, rid)):  # only the decision, without a training
        reopen, line = run_to_continue(uri, rid, flag)
        assert reopen == expected
        assert ("is finished; a new run continues" in line) is (not flag)
    reopen, line = run_to_continue(f"sqlite:///{tmp_path / 'other.db'}", rid, False)
    assert reopen is None and f"MLflow run {rid} is not in" in line
