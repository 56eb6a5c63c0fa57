"""Configuration and command line of ``segmerge train``: parsing, overrides, early errors."""

from __future__ import annotations

import json

import pytest

from segmerge.aggregation import AGGREGATORS
from segmerge.engine.cli import main
from segmerge.engine.config import (
    ConfigError,
    available_aggregators,
    default_config_dir,
    load_config,
    parse_argv,
)


def _load(*argv: str):
    return load_config(parse_argv(list(argv)))


def test_named_options_flags_and_monai_style_ids():
    p = _load(
        "--epochs", "3", "--steps-per-epoch=7", "--amp", "--skip-invalid",
        "--network_def#features", "[4, 8, 16]", "--lr", "1e-4", "--data", "/x/y",
    )  # fmt: skip
    assert p["epochs"] == 3 and p["steps_per_epoch"] == 7
    assert p["amp"] is True and p["dataset"]["skip_invalid"] is True
    assert p["network_def"]["features"] == [4, 8, 16]
    assert p["lr"] == pytest.approx(1e-4)
    assert p["dataset"]["path"] == "/x/y"


def test_every_aggregator_file_builds_its_aggregator():
    names = available_aggregators()
    assert set(names) == set(AGGREGATORS)
    for name in names:
        p = _load("--aggregator", name)
        agg = p.get_parsed_content("aggregator")
        assert isinstance(agg, AGGREGATORS[name])  # blending: the class of its estimator


def test_aggregator_hyper_parameters_are_options():
    p = _load("--aggregator", "gradcraft", "--r", "0.25", "--b", "0.9")
    agg = p.get_parsed_content("aggregator")
    assert repr(agg) == "GradCraft(r=0.25, e=0.0, b=0.9)"
    # the default config's aggregator is GMD
    assert type(_load().get_parsed_content("aggregator")).__name__ == "GMD"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epoch", "3"], "did you mean '--epochs'"),
        (["--aggregator", "gradcraf"], "did you mean 'gradcraft'"),
        (["--network_def#featurs", "[4]"], "did you mean '--network_def#features'"),
        (["--aggregator", "gmd", "--r", "0.5"], "unknown option"),
        (["--objectives#bogus", "1"], "unknown option"),
    ],
)
def test_unknown_options_suggest_the_closest(argv, message):
    with pytest.raises(ConfigError, match=message):
        _load(*argv)


def test_keyword_of_a_component_target_is_accepted():
    p = _load("--objectives#target_resize", "area")
    assert p["objectives"]["target_resize"] == "area"


def test_option_without_value_and_positional_are_errors():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_argv(["--epochs"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_argv(["train.json"])


def test_train_json_is_valid_bundle_config():
    raw = json.loads((default_config_dir() / "train.json").read_text())
    assert raw["network_def"]["_target_"].startswith("segmerge.")
    assert raw["aggregator"]["_target_"] == "segmerge.aggregation.GMD"


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_help_lists_options(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--aggregator", "--resume", "--tracking-uri", "--refresh-every", "gradcraft"):
        assert opt in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--aggregator", "gradcraft", "--r", "1.5"], "r"),
        (["--epochs", "0"], "epochs must be an integer >= 1"),
        (["--refresh-every", "0"], "refresh_every"),
        (["--lr", "-1"], "lr must be"),
        (["--device", "tpu"], "device must be"),
        (["--amp", "--device", "cpu"], "--amp needs"),
        (["--tracking-uri", "file:///tmp/x"], "plain folder"),
        (["--patch-size", "20"], "multiple of 8"),
    ],
)
def test_bad_values_fail_before_training(tmp_path, capsys, extra, message):
    code, err = _run(capsys, "--bundle_root", str(tmp_path), "--progress", "false", *extra)
    assert code == 2
    assert message in err
    assert not (tmp_path / "cache").exists()  # no data was generated: it failed first
    assert not (tmp_path / "models" / "model.pt").exists()


def test_unwritable_output_and_store_fail_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = _run(capsys, "--bundle_root", str(tmp_path), "--output", str(blocker / "out"))
    assert code == 2 and "output folder" in err and "not writable" in err
    code, err = _run(
        capsys, "--bundle_root", str(tmp_path), "--tracking-uri", f"sqlite:///{blocker}/x/m.db"
    )
    assert code == 2 and "not writable" in err


def test_invalid_dataset_fails_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    case = data / "BraTS2021_00001"
    case.mkdir(parents=True)
    for m in ("flair", "t1", "t1ce", "t2", "seg"):
        (case / f"BraTS2021_00001_{m}.nii.gz").write_bytes(b"not a nifti file")
    code, err = _run(capsys, "--bundle_root", str(tmp_path), "--data", str(data))
    assert code == 2
    assert "BraTS2021_00001" in err
    assert not (tmp_path / "runs" / "checkpoints").exists()


def test_resection_cavity_scheme_reaches_the_training_transforms():
    """`--resection-cavity` (BraTS 2024+: ET 3, label 4 = resection cavity in no region) is a train
    flag that the training and validation transforms receive; without it label 4 is refused when
    ET is 3."""
    import numpy as np
    import torch

    from segmerge.data.transforms import CheckLabeld

    label = torch.as_tensor(np.array([[[0, 1, 2, 3, 4]]], dtype=np.uint8))
    p = _load("--dataset#et_label", "3", "--resection-cavity")
    assert p["dataset"]["resection_cavity"] is True
    for key in ("train_transforms", "val_transforms"):
        assert p.get_parsed_content(f"{key}#resection_cavity") is True
        check = next(t for t in p.get_parsed_content(key).transforms if isinstance(t, CheckLabeld))
        assert check({"label": label})["label"] is not None
    plain = _load("--dataset#et_label", "3")
    check = next(
        t for t in plain.get_parsed_content("train_transforms").transforms
        if isinstance(t, CheckLabeld)
    )  # fmt: skip
    with pytest.raises(ValueError, match="resection_cavity"):
        check({"label": label})
