"""Every command the README shows is exercised here.

The quick ones run for real, in a temporary folder, with tiny settings substituted (32³ phantoms,
one short epoch); the long ones (your own data, GPUs, the 25-minute study) are checked as far as
they can be without their data or hardware: the options parse against the real configuration, or
the command's dry run succeeds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _bash_commands(text: str) -> list[str]:
    """Shell commands of the ```bash blocks of ``text``, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def readme_commands() -> list[str]:
    return _bash_commands(README.read_text())


def readme_sections() -> dict[str, list[str]]:
    """Commands of each ``## heading`` of the README, in order."""
    parts = re.split(r"^## ", README.read_text(), flags=re.M)[1:]
    return {p.partition("\n")[0].strip(): _bash_commands(p) for p in parts}


def readme_python() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


TINY_TRAIN = ["--steps-per-epoch", "2", "--patch-size", "32", "--batch-size", "1",
              "--num_threads", "1", "--progress", "false", "--val_every", "1"]  # fmt: skip
TINY_PHANTOMS = ["--dataset#phantoms#cases", "5", "--dataset#phantoms#size", "32",
                 "--dataset#phantoms#workers", "1"]  # fmt: skip


def _tiny(argv: list[str]) -> list[str]:
    """A README command at test size: 5 phantoms of 32³, one epoch of two 32³ steps."""
    subs = {"--size": "32", "--cases": "5", "--epochs": "1", "--workers": "1"}
    out = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] in subs and i + 1 < len(argv):
            out.append(subs[argv[i]])
            i += 2
            continue
        i += 1
    if "segmerge" in argv and "train" in argv:
        out += TINY_TRAIN + ([] if "--data" in argv else TINY_PHANTOMS)
        out += [] if "--epochs" in argv else ["--epochs", "1"]
    if out[0] == "torchrun":  # the one of this venv, as `source .venv/bin/activate` gives
        out[0] = str(Path(sys.executable).with_name("torchrun"))
    return [sys.executable if a == "python" else a for a in out]


def _run(argv: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    return proc


def _help(command: str) -> str:
    """``python -m segmerge <command> --help``, in process (the commands run for real below)."""
    from segmerge.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0, out.getvalue()
    return out.getvalue()


def test_readme_starts_with_the_two_commands():
    commands = readme_commands()
    assert commands[:2] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_shown_commands_use_real_options(tmp_path):
    """Each `python -m segmerge <cmd>` option shown exists in that command's --help; the bundle
    command's ids exist in configs/inference.json; the mlflow command is the one training prints.

    The quick ones also run end to end at test size below; this covers the ones that need data or
    GPUs this machine lacks."""
    from segmerge.cli import COMMANDS
    from segmerge.engine.tracking import default_tracking_uri, ui_command

    helps: dict[str, str] = {}
    for command in readme_commands():
        argv = shlex.split(command)
        if argv[:3] == ["python", "-m", "segmerge"]:
            sub = argv[3]
            assert sub in COMMANDS, command
            if sub in ("train", "compare"):
                continue  # checked against the real config below / by its dry run
            if sub not in helps:
                helps[sub] = _help(sub)
            for opt in (a for a in argv[4:] if a.startswith("--")):
                assert opt in helps[sub], f"{command}: {opt} is not an option of {sub}"
        elif argv[:4] == ["python", "-m", "monai.bundle", "run"]:
            config = (ROOT / argv[argv.index("--config_file") + 1]).read_text()
            for opt in (a for a in argv[4:] if a.startswith("--")):
                if opt not in ("--config_file", "--bundle_root"):
                    assert f'"{opt[2:]}"' in config, f"{command}: no id {opt[2:]}"
    assert {"phantoms", "check-data", "predict", "evaluate"} <= set(helps)
    shown = next(c for c in readme_commands() if c.startswith("mlflow ui"))
    printed = ui_command(default_tracking_uri(tmp_path / "runs"))
    assert printed == shown.replace("$PWD", str(tmp_path.resolve()))


def test_long_train_commands_parse_against_the_real_config():
    from segmerge.aggregation import aggregator_config
    from segmerge.engine.config import load_config, parse_argv

    long_ones = [c for c in readme_commands() if re.search(r"-m segmerge train", c)]
    assert len(long_ones) >= 5
    for command in long_ones:
        argv = shlex.split(command)
        rest = argv[argv.index("train") + 1 :]
        parser = load_config(parse_argv(rest))
        opts = dict(zip(rest[::2], rest[1::2]))
        if "--aggregator" in opts:
            target = aggregator_config(opts["--aggregator"])["_target_"]
            assert parser["aggregator"]["_target_"] == target, command
        for flag, value in opts.items():
            name = flag[2:].replace("-", "_")
            if name in ("r", "e", "b", "estimator", "warmup"):
                assert str(parser["aggregator"][name]) == value, command
            if name in ("epochs", "patch_size", "refresh_every"):
                assert str(parser[name]) == value, command


def test_a_bad_train_option_is_refused_with_a_suggestion():
    from segmerge.engine.config import ConfigError, load_config, parse_argv

    with pytest.raises(ConfigError, match="did you mean .--refresh-every"):
        load_config(parse_argv(["--refresh-evry", "4"]))


def test_compare_and_check_data_on_missing_data(tmp_path):
    compare = next(c for c in readme_commands() if " compare " in c)
    proc = _run(
        _tiny(shlex.split(compare)) + ["--dry-run", "--output", str(tmp_path / "study")],
        ROOT,
        120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from segmerge.study.budgets import default_methods, study_defaults

    seeds = study_defaults()["seeds"]
    assert len(seeds) >= 3  # the default study trains every method with >= 3 seeds
    for method in default_methods():
        lines = [ln for ln in proc.stdout.splitlines() if f"--aggregator {method} " in ln + " "]
        assert len(lines) == len(seeds), (method, lines)
    check = next(
        c for c in readme_commands() if c.startswith("python -m segmerge check-data /data/")
    )
    argv = [sys.executable if a == "python" else a for a in shlex.split(check)]
    argv[argv.index("/data/BraTS2021")] = str(tmp_path / "no-such-dataset")
    proc = _run(argv, tmp_path, 60)
    assert proc.returncode != 0 and "no-such-dataset" in (proc.stdout + proc.stderr)


def test_python_example_runs():
    import torch

    J = torch.randn(4, 50)
    mask = torch.rand(50) > 0.5
    names = ["fused.d0", "fused.d1", "modality.flair", "modality.t2"]
    train_before, val_before = (
        torch.tensor([1.0, 1.0, 1.0, 1.0]),
        torch.tensor([1.1, 1.05, 1.2, 1.1]),
    )
    train_after, val_after = torch.tensor([0.6, 0.8, 0.5, 0.7]), torch.tensor([0.9, 0.9, 1.1, 1.0])
    scope = dict(J=J, mask=mask, names=names, train_before=train_before, val_before=val_before,
                 train_after=train_after, val_after=val_after)  # fmt: skip
    (code,) = readme_python()
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["g"].shape == (50,) and torch.isfinite(scope["g"]).all()
    assert scope["result"].update.shape == (50,)
    assert torch.isclose(scope["w"].sum(), torch.tensor(1.0))


# -- the quick commands, run for real at test size ------------------------------------------------
@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory):
    """A working folder holding a copy of the bundle's configs, where the README's commands run as
    shown from the repository root (relative paths, default model location)."""
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "configs", work / "configs")
    return work


def _run_section(heading: str, cwd: Path, only: str = "") -> list[str]:
    commands = [c for c in readme_sections()[heading] if only in c]
    assert commands, f"README section {heading!r} shows no command"
    for command in commands:
        proc = _run(_tiny(shlex.split(command)), cwd, 600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return commands


def _same(logged: str, shown: str) -> bool:
    try:
        return float(logged) == float(shown)
    except ValueError:
        return logged == shown


def _cases(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def first_session(bundle_copy):
    _run_section("A first session", bundle_copy)
    return bundle_copy


def test_a_first_session_runs_as_shown(first_session):
    import nibabel as nib
    import numpy as np

    work = first_session
    cases = _cases(work / "data" / "phantoms")
    assert len(cases) == 5 and (work / "data" / "montage.png").stat().st_size > 0
    assert (work / "models" / "model.pt").is_file() and (work / "runs" / "mlflow.db").is_file()
    for case in cases:
        pred = nib.load(work / "predictions" / f"{case.name}.nii.gz")
        image = nib.load(case / f"{case.name}_flair.nii.gz")
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
        labels = np.asarray(pred.dataobj)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 4}
    metrics = json.loads((work / "predictions" / "metrics.json").read_text())
    assert metrics["n_cases"] == 5 and not metrics["missing_predictions"]
    assert all(0.0 <= metrics["mean"][f"dice_{r}"] <= 1.0 for r in ("wt", "tc", "et"))


def test_bundle_inference_and_evaluation_run_as_shown(first_session):
    work = first_session
    shutil.rmtree(work / "predictions")  # the bundle command writes them anew, predict replaces them
    _run_section("Bundle inference", work)
    for case in _cases(work / "data" / "phantoms"):
        assert (work / "predictions" / f"{case.name}.nii.gz").is_file(), case.name
        assert json.loads((work / "predictions" / f"{case.name}.json").read_text())
    _run_section("Evaluation", work)
    table = (work / "robustness" / "robustness.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 15, table  # header + every non-empty subset of the four sequences


def test_aggregator_examples_run_and_take_their_options(first_session):
    from mlflow.tracking import MlflowClient

    from segmerge.aggregation import aggregator_config

    work = first_session
    commands = _run_section("Choosing and tuning an aggregator", work)
    client = MlflowClient(f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segmerge")  # the default experiment of train
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    params = [r.data.params for r in runs[-len(commands) :]]
    assert len(params) == len(commands)
    for command, logged in zip(commands, params):
        opts = dict(zip(shlex.split(command)[4::2], shlex.split(command)[5::2]))
        target = aggregator_config(opts["--aggregator"])["_target_"]
        assert logged["config/aggregator/_target_"] == target, command
        for flag, value in opts.items():
            key = flag[2:].replace("-", "_")
            name = f"config/aggregator/{key}" if key != "refresh_every" else "config/refresh_every"
            if flag != "--aggregator":
                assert _same(logged[name], value), (command, name, logged.get(name))
        assert logged["config/dataset/path"] == "null"  # the cached phantoms, built once


def test_torchrun_on_cpu_runs_as_shown(first_session):
    """The CUDA line needs GPUs and BraTS data (parsed above); the CPU line runs: two processes,
    one MLflow run written by rank 0."""
    from mlflow.tracking import MlflowClient

    work = first_session
    client = MlflowClient(f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segmerge")  # the default experiment of train
    before = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    (command,) = _run_section("Multi-GPU with torchrun", work, only="--device cpu")
    new = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_id not in before]
    assert len(new) == 1, command
    assert new[0].data.tags["segmerge.world_size"] == "2" and new[0].info.status == "FINISHED"


def test_every_compare_line_is_a_valid_study(tmp_path):
    """Each `compare` line of the README's comparison section parses and plans its runs (a dry
    run: training them is the 90-minute study); the methods and seeds shown are the ones planned."""
    compares = [shlex.split(c) for c in readme_sections()["Comparing aggregators"]]
    assert compares, "no compare command in the README"
    for argv in compares:
        argv = [a for a in argv if a != "--data" and not a.startswith("/data/")]
        out = tmp_path / f"study{len(list(tmp_path.iterdir()))}"
        args = _tiny(argv)
        if "--output" in args:
            args[args.index("--output") + 1] = str(out)
        else:
            args += ["--output", str(out)]
        proc = _run(args + ["--dry-run"], ROOT, 120)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        if "--methods" in argv:
            for method in argv[argv.index("--methods") + 1].split(","):
                assert f"--aggregator {method}" in proc.stdout, (argv, method)
        if "--seeds" in argv:
            for seed in argv[argv.index("--seeds") + 1].split(","):
                assert f"--seed {seed}" in proc.stdout, (argv, seed)
