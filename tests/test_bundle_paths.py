"""Finding the bundle configs from a checkout, from a copy of the bundle, and from a regular install
(the package alone, as in the Docker image) through $SEGMERGE_CONFIGS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segmerge.bundle_paths import CHECKOUT, CONFIGS_ENV, bundle_root, config_dir, config_file
from segmerge.engine.config import default_config_dir
from segmerge.inference.bundle import load_bundle_config

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_configs_are_found_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIGS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert CHECKOUT == ROOT
    assert config_dir() == ROOT / "configs" == default_config_dir()
    assert config_file("inference.json") == ROOT / "configs" / "inference.json"


def test_a_bundle_copy_in_the_working_folder_wins_over_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIGS_ENV, raising=False)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    assert config_dir() == tmp_path / "configs"
    parser = load_bundle_config()
    assert Path(parser["bundle_root"]) == tmp_path.resolve()  # models/model.pt of that copy


def test_the_environment_variable_wins_and_a_wrong_one_is_an_error(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "configs", tmp_path / "elsewhere")
    monkeypatch.setenv(CONFIGS_ENV, str(tmp_path / "elsewhere"))
    assert config_dir("inference.json") == tmp_path / "elsewhere"
    monkeypatch.setenv(CONFIGS_ENV, str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match=r"SEGMERGE_CONFIGS=.*typo.*train\.json"):
        config_dir()  # never silently falls back to ./configs or the checkout


def test_a_regular_install_needs_and_uses_segmerge_configs(tmp_path):
    """The package copied alone (what `pip install .` and the Docker image hold), run from a folder
    without configs/: a clear error without $SEGMERGE_CONFIGS, working commands with it."""
    site, work = tmp_path / "site", tmp_path / "work"
    shutil.copytree(
        ROOT / "segmerge", site / "segmerge", ignore=shutil.ignore_patterns("__pycache__")
    )
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != CONFIGS_ENV}
    env["PYTHONPATH"] = str(site)

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "segmerge", *args],
            cwd=work, env={**env, **extra}, capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    missing = tmp_path / "no-cases"
    bare = run("predict", "--input", str(missing), "--output", str(work / "pred"))
    assert bare.returncode != 0
    assert "inference.json" in bare.stderr and CONFIGS_ENV in bare.stderr, bare.stderr

    pointed = {CONFIGS_ENV: str(ROOT / "configs")}
    train_help = run("train", "--help", **pointed)
    assert train_help.returncode == 0, train_help.stderr
    assert "gradcraft" in train_help.stdout and "--aggregator" in train_help.stdout
    weights = tmp_path / "none.pt"  # the config is read first, then the weights it names
    predict = run("predict", "--input", str(missing), "--output", str(work / "pred"),
                  "--model", str(weights), **pointed)  # fmt: skip
    assert predict.returncode != 0
    assert "none.pt" in predict.stderr and "inference.json" not in predict.stderr, predict.stderr


def test_the_current_folders_weights_win_over_the_checkouts(tmp_path, monkeypatch):
    """Issue 16 item 4: `train` writes ./models/model.pt; predict/evaluate must read that one, not
    the checkout's, and an explicit --config means the bundle that holds it."""
    monkeypatch.delenv(CONFIGS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert bundle_root() == ROOT  # nothing here: the checkout's bundle
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"weights")
    assert bundle_root() == tmp_path
    parser = load_bundle_config()
    assert Path(parser.get_parsed_content("model_path")) == tmp_path / "models" / "model.pt"
    other = tmp_path / "other"
    shutil.copytree(ROOT / "configs", other / "configs")
    explicit = load_bundle_config(other / "configs" / "inference.json")
    assert Path(explicit["bundle_root"]) == other.resolve()
