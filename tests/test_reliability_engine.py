"""Reliability and security of the training side (issue 16): each test reproduces one defect of
the bad-input and fault campaign. The table in ``docs/reliability.md`` points here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from segmerge.engine.checkpoint import resolved_config, restore_config
from segmerge.engine.cli import main
from segmerge.engine.config import ConfigError, load_config, parse_argv, usage
from segmerge.overrides import decode_literal, literal, parse_assignments, to_config


def _marker_expression(marker: Path) -> str:
    return f"$__import__('pathlib').Path({str(marker)!r}).touch() or 0.003"


def _crafted_checkpoint(tmp_path: Path, config: dict, **extra) -> Path:
    state = {"model": {}, "iteration": 0, "config": json.dumps(config), **extra}
    path = tmp_path / "crafted.pt"
    torch.save(state, path)
    return path


def _resolved(*argv: str) -> tuple[dict, list[str]]:
    return resolved_config(load_config(parse_argv(list(argv))))


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
    config, kept = _resolved(*argv)
    state = {"format": 2, "config": json.dumps(config), "config_expressions": kept}
    parser = load_config(parse_argv([]), checkpoint=(state, "x.pt"))
    assert resolved_config(parser) == (config, kept)
    assert parser.get_parsed_content("run_name") == "@lr"
    assert repr(parser.get_parsed_content("aggregator")) == "GradCraft(r=0.25, e=0.0, b=0.0)"


def test_checkpoints_without_config_or_empty_give_a_reason(tmp_path, capsys):
    torch.save({"model": {}, "iteration": 0}, tmp_path / "noconfig.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert main(["--resume", str(tmp_path / "noconfig.pt")]) == 2
    assert "holds no training configuration ('config')" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "empty.pt")]) == 2
    assert "is empty (0 bytes)" in capsys.readouterr().err


# ------------------------------------------------------------------ security 3: values are literals
@pytest.mark.parametrize(
    "text", ["@lr", "$__import__('os').getpid()", "%train.json#lr", "a::b", "it's \\ \"q\" é"]
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


def test_the_rule_is_in_the_help():
    text = usage()
    assert "--expr" in text and "NOT evaluated unless --expr" in text
    assert "config files (configs/*.json, --config) are code" in text


def test_a_dollar_learning_rate_is_a_clear_value_error(tmp_path, capsys):
    args = ["--lr", "$1e-3", "--bundle_root", str(tmp_path), "--progress", "false"]
    assert main(args) == 2
    assert "lr must be a finite number > 0.0, got '$1e-3'" in capsys.readouterr().err


def test_run_name_reference_under_expr_is_a_config_error_not_the_store(tmp_path, capsys):
    args = ["--expr", "--run_name", "@nosuch", "--bundle_root", str(tmp_path)]
    assert main([*args, "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert "run_name" in err and "nosuch" in err and "MLflow store" not in err


def test_config_error_type():
    with pytest.raises(ConfigError, match="no such file"):
        load_config(parse_argv(["--config", "/nonexistent/extra.json"]))
