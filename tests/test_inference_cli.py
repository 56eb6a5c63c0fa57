"""`python -m segmerge predict` argument errors (in-process; the happy path runs in test_bundle)."""

from __future__ import annotations

import torch

from segmerge.inference import load_bundle_config
from segmerge.inference.cli import predict_main


def _predict(tmp_path, model: str) -> int:
    return predict_main(
        ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", str(tmp_path / model)]
    )


def test_missing_model_names_the_file_and_the_fix(tmp_path, capsys):
    assert _predict(tmp_path, "m.pt") == 2
    err = capsys.readouterr().err
    assert "m.pt not found" in err and "segmerge train" in err


def test_missing_input_and_bad_override(tmp_path, capsys):
    net = load_bundle_config().get_parsed_content("network_def")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    base = [
        "--output",
        str(tmp_path / "o"),
        "--model",
        str(tmp_path / "model.pt"),
        "--device",
        "cpu",
    ]
    assert predict_main(["--input", str(tmp_path / "nope"), *base]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    assert predict_main(["--input", str(tmp_path), *base, "--set", "roi_size"]) == 2
    assert "--set expects ID=VALUE" in capsys.readouterr().err


def test_weights_of_another_network_are_refused(tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    assert _predict(tmp_path, "other.pt") == 2
    assert "weights do not fit the network" in capsys.readouterr().err
