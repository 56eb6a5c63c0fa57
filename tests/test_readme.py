"""Every command the README shows is exercised here.

The quick ones run for real, in a temporary folder, with tiny settings substituted (32³ phantoms,
one short epoch); the long ones (your own data, GPUs, the 30-minute study) are checked as far as
they can be without their data or hardware: the options parse against the real configuration, or
the command's dry run succeeds.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def readme_commands() -> list[str]:
    """Shell commands of the README's ```bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def readme_python() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _tiny(argv: list[str], tmp: Path) -> list[str]:
    """Shrink a README command to test size."""
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
    model = str(tmp / "models" / "model.pt")
    if argv[:3] == ["python", "-m", "segmerge"]:
        cmd = argv[3]
        if cmd == "train":
            out += ["--steps-per-epoch", "2", "--patch-size", "32", "--batch-size", "1",
                    "--num_threads", "1", "--progress", "false", "--val_every", "1"]  # fmt: skip
        elif cmd == "predict" or (cmd == "evaluate" and "--subsets" in argv):
            out += ["--model", model, "--set", "roi_size=[32,32,32]"]
    elif argv[:3] == ["python", "-m", "monai.bundle"]:
        out += ["--model_path", model, "--roi_size", "[32,32,32]"]
    return [sys.executable if a == "python" else a for a in out]


def _run(argv: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    return proc


def test_readme_starts_with_the_two_commands():
    commands = readme_commands()
    assert commands[:2] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_shown_commands_use_real_options(tmp_path):
    """Each `python -m segmerge <cmd>` option shown exists in that command's --help; the bundle
    command's ids exist in configs/inference.json; the mlflow command is the one training prints.

    (The same commands run end to end, at test size, in test_engine*, test_inference*,
    test_bundle* and test_data*.)"""
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
                proc = _run([sys.executable, "-m", "segmerge", sub, "--help"], ROOT, 120)
                assert proc.returncode == 0, proc.stderr
                helps[sub] = proc.stdout
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
    from segmerge.engine.config import load_config, parse_argv

    long_ones = [c for c in readme_commands() if re.search(r"-m segmerge train", c)]
    assert len(long_ones) >= 5
    for command in long_ones:
        argv = shlex.split(command)
        rest = argv[argv.index("train") + 1 :]
        parser = load_config(parse_argv(rest))
        opts = dict(zip(rest[::2], rest[1::2]))
        if "--aggregator" in opts:
            assert parser["aggregator"]["name"] == opts["--aggregator"], command
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
        _tiny(shlex.split(compare), tmp_path) + ["--dry-run", "--output", str(tmp_path / "study")],
        ROOT,
        120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for method in ("sum", "mean", "pcgrad", "gmd", "gradcraft", "blending"):
        assert f"--aggregator {method}" in proc.stdout, method
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
