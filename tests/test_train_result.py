"""The engine's typed seams without a training: the settings (checked once), the checkpoint state
(format 2 on disk, unchanged), the training result file and the study reading it as data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from segmerge.engine import ConfigError, Settings, TrainingState, load_config, parse_argv
from segmerge.engine.checkpoint import atomic_torch_save, load_checkpoint
from segmerge.engine.result import (
    RESULT_NAME,
    TrainResult,
    find_result,
    read_result,
    write_result,
)

# the keys the trainer of format 2 has always written, in its order (old checkpoints resume)
FORMAT_2_KEYS = [
    "format", "model", "optimizer", "scheduler", "aggregator", "train_step", "scaler", "ogr",
    "metrics", "objectives", "rng", "iteration", "epoch", "best", "run_id", "tracking_uri",
    "config", "config_expressions", "config_derived",
]  # fmt: skip


def _settings(*argv: str) -> Settings:
    return Settings.from_parser(load_config(parse_argv(["--device", "cpu", *argv])))


def test_settings_are_read_once_frozen_and_resolved():
    s = _settings("--epochs", "3", "--steps-per-epoch", "5", "--refresh-every", "2")
    assert (s.epochs, s.total_steps, s.refresh_every, s.jacobian) == (3, 15, 2, "parameters")
    assert s.device == torch.device("cpu") and s.output_dir.is_absolute()
    assert s.tracking_uri.startswith("sqlite:///") and s.checkpoint_root.name == "checkpoints"
    with pytest.raises(AttributeError):
        s.epochs = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--refresh-every", "0"], "refresh_every must be an integer >= 1, got 0"),
        (["--epochs", "1.5"], "epochs must be an integer >= 1, got 1.5"),
        (["--lr", "-1"], "lr must be a finite number > 0.0, got -1"),
        (["--validation#overlap", "1.0"], "validation#overlap must be in [0, 1), got 1.0"),
        (["--weights", "best2"], "weights must be 'best' or 'last', got 'best2'"),
        (["--device", "tpu"], "device must be cpu, cuda or auto, got 'tpu'"),
        (["--jacobian", "both"], "jacobian must be 'parameters' or 'outputs', got 'both'"),
    ],
)
def test_each_bad_setting_is_one_config_error_naming_id_rule_and_value(argv, message):
    with pytest.raises(ConfigError) as err:
        _settings(*argv)
    assert str(err.value) == message


def _format_2_state() -> dict:
    """A checkpoint dict as the trainer wrote it before the state became a type."""
    values = {
        "format": 2, "model": {"w": torch.arange(3.0)}, "optimizer": {"state": {}},
        "scheduler": {}, "aggregator": {"n": 1}, "train_step": {"step": 4}, "scaler": {},
        "ogr": {"h": [1.0]}, "metrics": {}, "objectives": {}, "rng": {"torch": torch.get_rng_state()},
        "iteration": 4, "epoch": 2, "best": {"metric": 0.5, "epoch": 2, "dice": {}, "hd95": {}},
        "run_id": "abc", "tracking_uri": "sqlite:////tmp/x.db", "config": "{}",
        "config_expressions": ["optimizer#params"], "config_derived": {"output_dir": "$@x"},
    }  # fmt: skip
    assert list(values) == FORMAT_2_KEYS
    return values


def test_training_state_keeps_the_format_2_dict_key_for_key(tmp_path):
    old = _format_2_state()
    atomic_torch_save(old, tmp_path / "last.pt")
    state = TrainingState.from_dict(load_checkpoint(tmp_path / "last.pt"), tmp_path / "last.pt")
    again = state.to_dict()
    assert list(again) == FORMAT_2_KEYS
    for key, value in old.items():
        if isinstance(value, dict) and "w" in value:
            assert torch.equal(again[key]["w"], value["w"])
        elif key == "rng":
            assert torch.equal(again[key]["torch"], value["torch"])
        else:
            assert again[key] == value, key


def test_training_state_of_a_format_1_checkpoint_and_a_broken_one():
    old = _format_2_state()
    for key in ("format", "scheduler", "scaler", "metrics", "objectives", "config_derived"):
        del old[key]  # what format 1 (older versions) did not write
    state = TrainingState.from_dict(old, "old.pt")
    assert state.format == 1 and state.scheduler == {} and state.config_derived == {}
    broken = _format_2_state()
    del broken["ogr"]
    with pytest.raises(ValueError, match=r"--resume broken.pt: the checkpoint holds no 'ogr'"):
        TrainingState.from_dict(broken, "broken.pt")
    with pytest.raises(ValueError, match="holds no model weights"):
        TrainingState.from_dict({**_format_2_state(), "model": None}, "m.pt")


def _result(folder: Path) -> TrainResult:
    return TrainResult(
        run_id="r1", tracking_uri="sqlite:////tmp/m.db", dice={"wt": 0.5, "mean": 0.4},
        hd95={"wt": 3.0, "mean": float("inf")}, best_epoch=2, model_path=folder / "model.pt",
        weights="best", checkpoint_dir=folder / "checkpoints" / "r1", iteration=8,
        network_def={"_target_": "segmerge.nets.MultiModalDSNet", "features": [4, 8, 16]},
        patch_size=16, et_label=3, device="cpu",
    )  # fmt: skip


def test_result_file_round_trip_and_lookup(tmp_path):
    assert find_result(tmp_path) is None
    result = _result(tmp_path)
    path = write_result(result)
    assert path == tmp_path / "checkpoints" / "r1" / RESULT_NAME
    assert find_result(tmp_path) == path
    assert read_result(path) == result  # paths come back as Path, inf as inf
    assert not list(path.parent.glob(".*.tmp"))  # written atomically
    write_result(TrainResult("r2", "u", checkpoint_dir=tmp_path / "checkpoints" / "r2"))
    with pytest.raises(ValueError, match="more than one training result"):
        find_result(tmp_path)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a segmerge train result"):
        read_result(tmp_path / "bad.json")


def test_the_study_reads_the_trained_network_from_the_result_as_data(tmp_path):
    """As for checkpoints (test_study): a result holding an expression, or a network outside
    segmerge.nets, is refused before anything could evaluate it."""
    from segmerge.study.scoring import trained_config

    marker = tmp_path / "pwned"
    good = _result(tmp_path)
    path = write_result(good)
    net, patch, et, device = trained_config(tmp_path, "r1", str(path))
    assert (net, patch, et, device) == (good.network_def, 16, 3, "cpu")
    data = good.to_dict()
    data["patch_size"] = f"$open({str(marker)!r}, 'w').write('x') or 16"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="patch_size.*expression"):
        trained_config(tmp_path, "r1", str(path))
    data = dict(good.to_dict(), network_def={"_target_": "os.system", "command": "true"})
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="segmerge.nets"):
        trained_config(tmp_path, "r1", str(path))
    assert not marker.exists()
