"""``python -m segmerge compare``: options, budgets, summaries, and a tiny 2-method study end to end.

The end-to-end study (budget ``tiny``: 24³ phantoms, 2 steps, 16³ patches) trains ``sum`` and
``mean`` in real ``python -m segmerge train`` subprocesses, evaluates both on the 15 subsets of
sequences, and is then re-run to check that finished methods are skipped, and re-run once more
with a third method whose configuration is broken to check that one failure is reported while
the others are kept.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from segmerge.study import (
    ALL_SEQUENCES,
    T1CE_MISSING,
    EvaluationResult,
    MethodSummary,
    results_markdown,
)
from segmerge.study.budgets import get_budget
from segmerge.study.cli import main, parse_args
from segmerge.study.evaluation import write_validation_datalist
from segmerge.study.report import PLOT_FILES

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ options and budgets
def test_parse_args_splits_study_options_from_training_options():
    opts, extra = parse_args(
        [
            "--methods",
            "sum,gmd",
            "--budget=tiny",
            "--lr",
            "0.001",
            "--amp",
            "--overwrite",
            "--network_def#features",
            "[4, 8]",
        ]
    )
    assert opts == {"methods": "sum,gmd", "budget": "tiny", "overwrite": True}
    assert extra == ["--lr", "0.001", "--amp", "--network_def#features", "[4, 8]"]
    with pytest.raises(ValueError, match="--seed needs a value"):
        parse_args(["--seed"])
    with pytest.raises(ValueError, match="unexpected argument 'sum'"):
        parse_args(["sum"])


def test_unknown_method_suggests_the_closest(tmp_path, capsys):
    code = main(["--methods", "sum,gradcarft", "--budget", "tiny", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown method 'gradcarft'" in err and "did you mean 'gradcraft'" in err
    assert not (tmp_path / "study.json").exists()  # nothing started


def test_unknown_budget_and_training_option_fail_before_training(tmp_path, capsys):
    assert main(["--budget", "cpuu", "--output", str(tmp_path)]) == 2
    assert "unknown budget 'cpuu'" in capsys.readouterr().err
    code = main(["--methods", "sum", "--budget", "tiny", "--output", str(tmp_path), "--lrr", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--lrr" in err and "did you mean '--lr'" in err
    assert not (tmp_path / "methods").exists()


def test_budget_train_args_are_json_and_presets_share_the_methods():
    tiny = get_budget("tiny")
    args = tiny.train_args()
    i = args.index("--network_def#features")
    assert json.loads(args[i + 1]) == tiny.train["network_def#features"]
    assert args[args.index("--epochs") + 1] == str(tiny.train["epochs"])
    for name in ("tiny", "cpu", "full"):
        b = get_budget(name)
        assert b.train["patch_size"] <= b.phantoms["size"], name  # a patch fits the phantoms


def test_dry_run_prints_one_identical_setup_per_method(tmp_path, capsys):
    code = main(
        ["--methods", "sum,pcgrad", "--budget", "tiny", "--output", str(tmp_path), "--dry-run"]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 2
    assert "--aggregator sum" in out[0] and "--aggregator pcgrad" in out[1]
    # everything but the method (and its folders / run name) is the same
    strip = [re.sub(r"(sum|pcgrad)", "M", line) for line in out]
    assert strip[0] == strip[1]
    assert not (tmp_path / "study.json").exists()


# ------------------------------------------------------------------ summaries and report
def _rows(base: float) -> list[dict]:
    from segmerge.inference import all_subsets

    rows = []
    for k, subset in enumerate(all_subsets()):
        value = base - 0.01 * k  # later (smaller) subsets score lower
        row = {"subset": "+".join(subset), "n_cases": 2}
        row.update({f"dice_{r}": value for r in ("wt", "tc", "et")})
        row.update({f"hd95_{r}": 10.0 + k for r in ("wt", "tc", "et")})
        rows.append(row)
    return rows


def test_evaluation_result_robustness_and_round_trip():
    ev = EvaluationResult.from_rows(_rows(0.9))
    assert len(ev.subsets) == 15 and ev.full.dice["mean"] == pytest.approx(0.9)
    rob = ev.robustness()
    assert rob["worst_subset"] == "t2"  # the last single-sequence subset
    assert rob["worst_dice"] == pytest.approx(0.9 - 0.14)
    assert rob["dice_mean_over_subsets"] == pytest.approx(0.9 - 0.07)
    again = EvaluationResult.from_dict(json.loads(json.dumps(ev.to_dict())))
    assert again.robustness() == rob and list(again.subsets) == list(ev.subsets)
    keys = ev.mlflow_metrics()
    assert keys["study/dice/mean"] == pytest.approx(0.9)
    assert "study/subset/flair-t1-t2/dice_mean" in keys
    assert not any("+" in k for k in keys)  # '+' is not a valid MLflow key character


def test_results_markdown_lists_methods_robustness_and_failures():
    good = MethodSummary("gmd", evaluation=EvaluationResult.from_rows(_rows(0.8)), run_id="r1")
    good.histories = {"conflict/n_pairs": [(1, 3.0), (2, 5.0)], "ogr/fused": [(2, 0.25)]}
    bad = MethodSummary("pcgrad", status="failed", error="training failed: boom")
    text = results_markdown([good, bad], {"study_id": "s1", "budget": "tiny"})
    row = next(line for line in text.splitlines() if line.startswith("| gmd | 0.800"))
    assert "0.800" in row
    t1ce = EvaluationResult.from_rows(_rows(0.8)).subsets[T1CE_MISSING].dice["mean"]
    assert f"{t1ce:.3f}" in text and T1CE_MISSING in text and ALL_SEQUENCES in text
    assert "| gmd | 4.00 | 5.00 | fused 0.25 |" in text
    assert "**pcgrad**: training failed: boom" in text


def test_validation_datalist_needs_labels(tmp_path):
    with pytest.raises(ValueError, match="at least one validation case"):
        write_validation_datalist([], tmp_path / "v.json")
    with pytest.raises(ValueError, match="case c1: no label"):
        write_validation_datalist([{"case_id": "c1", "flair": "a.nii.gz"}], tmp_path / "v.json")


# ------------------------------------------------------------------ the tiny study, end to end
def _table_rows(text: str, section: str) -> dict[str, list[str]]:
    block = text.split(section, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = {}
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("| method") and "---" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    args = ["--methods", "sum,mean", "--budget", "tiny", "--output", str(out), "--device", "cpu"]
    args += ["--experiment", "study-test"]
    code = main(args)
    return out, args, code


@pytest.mark.slow
def test_tiny_study_end_to_end(tiny_study):
    out, _, code = tiny_study
    assert code == 0, (out / "methods" / "sum" / "train.log").read_text()[-3000:]
    text = (out / "results.md").read_text()
    rows = _table_rows(text, "## Validation (all four sequences)")
    assert set(rows) == {"sum", "mean"}
    for method, cells in rows.items():
        dice = [float(c) for c in cells[:4]]  # WT, TC, ET, mean
        assert all(0.0 <= d <= 1.0 for d in dice), (method, dice)
        assert dice[3] == pytest.approx(sum(dice[:3]) / 3, abs=2e-3)
    robust = _table_rows(text, "## Robustness to missing sequences")
    assert set(robust) == {"sum", "mean"}
    for cells in robust.values():
        mean_over, worst = float(cells[0]), float(cells[2])
        assert 0.0 <= worst <= mean_over <= 1.0
    for name in PLOT_FILES.values():
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        import matplotlib.image

        img = matplotlib.image.imread(out / "plots" / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 50, name
    # the robustness files of `evaluate --subsets all` for each method
    for m in ("sum", "mean"):
        assert (out / "methods" / m / "evaluation" / "robustness.csv").is_file()
        result = json.loads((out / "methods" / m / "result.json").read_text())
        assert len(result["evaluation"]["subsets"]) == 15


@pytest.mark.slow
def test_tiny_study_runs_share_one_mlflow_experiment(tiny_study):
    from mlflow.tracking import MlflowClient

    out, _, code = tiny_study
    assert code == 0
    study_id = json.loads((out / "study.json").read_text())["study_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("study-test")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`segmerge.study` = '{study_id}'"
    )
    assert sorted(r.info.run_name for r in runs) == ["mean", "sum"]
    assert {r.info.experiment_id for r in runs} == {exp.experiment_id}
    for r in runs:
        assert r.data.tags["segmerge.study.method"] == r.info.run_name
        assert 0.0 <= r.data.metrics["study/dice/mean"] <= 1.0
        assert "conflict/n_pairs" in r.data.metrics  # the history the conflict plot reads
    summary = json.loads((out / "results.json").read_text())
    assert {m["run_id"] for m in summary["methods"]} == {r.info.run_id for r in runs}


@pytest.mark.slow
def test_rerun_skips_finished_methods_and_reports_a_failing_one(tiny_study, tmp_path, capsys):
    out, args, code = tiny_study
    assert code == 0
    before = {m: (out / "methods" / m / "result.json").stat().st_mtime_ns for m in ("sum", "mean")}
    logs = {m: (out / "methods" / m / "train.log").read_text() for m in ("sum", "mean")}
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 2
    for m in ("sum", "mean"):
        assert (out / "methods" / m / "result.json").stat().st_mtime_ns == before[m]
        assert (out / "methods" / m / "train.log").read_text() == logs[m]  # not retrained

    # a third method whose configuration cannot be built: reported, the others kept, exit 1
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    broken = {
        "aggregator": {
            "_target_": "segmerge.aggregation.build_aggregator",
            "name": "pcgrad",
            "order": "sideways",
        }
    }
    (configs / "aggregators" / "pcgrad.json").write_text(json.dumps(broken))
    mp = pytest.MonkeyPatch()
    mp.setenv("SEGMERGE_CONFIGS", str(configs))
    try:
        code = main([a if a != "sum,mean" else "sum,mean,pcgrad" for a in args])
    finally:
        mp.undo()
    captured = capsys.readouterr()
    assert code == 1
    assert "pcgrad" in captured.err and "failed" in captured.err
    text = (out / "results.md").read_text()
    assert "**pcgrad**: training failed" in text
    assert set(_table_rows(text, "## Validation (all four sequences)")) == {"sum", "mean"}
    assert not math.isnan(
        json.loads((out / "results.json").read_text())["methods"][0]["train_seconds"]
    )


# ------------------------------------------------------------------ several seeds
def _study_json(folder, seed: int, scores: dict[str, float], **meta) -> None:
    methods = [
        {"method": name, "status": "ok", "evaluation": EvaluationResult.from_rows(_rows(v)).to_dict()}
        for name, v in scores.items()
    ]
    data = {"study_id": f"s{seed}", "command": f"compare --seed {seed}", "seed": seed,
            "budget": "cpu", "data": "/d", "n_cases": 5, "machine": "m", "methods": methods}  # fmt: skip
    data.update(meta)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(data))


def test_combine_gives_mean_range_ranks_and_the_seed_spread(tmp_path, capsys):
    _study_json(tmp_path / "a", 0, {"sum": 0.50, "gmd": 0.52})
    _study_json(tmp_path / "b", 1, {"sum": 0.40, "gmd": 0.38})
    code = main(["--combine", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--output", str(tmp_path / "c")])
    assert code == 0, capsys.readouterr().err
    combined = json.loads((tmp_path / "c" / "combined.json").read_text())
    gmd = combined["methods"]["gmd"]
    assert gmd["dice_mean"]["mean"] == pytest.approx(0.45)
    assert (gmd["dice_mean"]["min"], gmd["dice_mean"]["max"]) == pytest.approx((0.38, 0.52))
    assert gmd["ranks"] == [1, 2] and combined["methods"]["sum"]["ranks"] == [2, 1]
    assert combined["spread"]["between_methods"] == pytest.approx([0.02, 0.02])
    assert combined["spread"]["between_seeds"]["gmd"] == pytest.approx(0.14)
    text = (tmp_path / "c" / "combined.md").read_text()
    assert "| gmd | 0.450 (0.380–0.520)" in text and "do not separate the aggregators" in text


def test_combine_refuses_mismatched_or_unfinished_studies(tmp_path, capsys):
    _study_json(tmp_path / "a", 0, {"sum": 0.5})
    _study_json(tmp_path / "b", 1, {"sum": 0.5}, budget="tiny")
    _study_json(tmp_path / "c", 0, {"sum": 0.5})
    out = ["--output", str(tmp_path / "o")]
    assert main(["--combine", f"{tmp_path / 'a'},{tmp_path / 'b'}", *out]) == 2
    assert "budget 'tiny' differs" in capsys.readouterr().err
    assert main(["--combine", f"{tmp_path / 'a'},{tmp_path / 'c'}", *out]) == 2
    assert "repeat a seed" in capsys.readouterr().err
    assert main(["--combine", f"{tmp_path / 'a'},{tmp_path / 'missing'}", *out]) == 2
    assert "missing/results.json does not exist" in capsys.readouterr().err
    assert main(["--combine", f"{tmp_path / 'a'},{tmp_path / 'c'}", "--seed", "3", *out]) == 2
    assert "takes --output alone" in capsys.readouterr().err
    assert not (tmp_path / "o" / "combined.md").exists()


def test_combine_reads_a_real_study_folder(tiny_study, tmp_path, capsys):
    out, _, code = tiny_study
    assert code == 0
    other = tmp_path / "seed1"
    data = json.loads((out / "results.json").read_text())
    _study_json(other, 1, {m["method"]: 0.3 for m in data["methods"]},
                budget=data["budget"], data=data["data"], n_cases=data["n_cases"])  # fmt: skip
    assert main(["--combine", f"{out},{other}", "--output", str(tmp_path / "c")]) == 0
    combined = json.loads((tmp_path / "c" / "combined.json").read_text())
    real = EvaluationResult.from_dict(data["methods"][0]["evaluation"]).full.dice["mean"]
    assert combined["seeds"] == [data["seed"], 1]
    assert combined["methods"]["sum"]["dice_mean"]["values"] == pytest.approx([real, 0.3])


def test_combine_accepts_each_studys_own_identical_phantoms_only(tmp_path, capsys):
    """Each study generates its phantoms in its own folder: those combine when the validation
    cases are byte-identical, and are refused when they are not."""

    def study(name: str, seed: int, content: bytes) -> Path:
        folder = tmp_path / name
        case = folder / "data" / "phantoms" / "c1"
        case.mkdir(parents=True)
        (case / "c1_seg.nii.gz").write_bytes(content)
        entry = {"case_id": "c1", "label": str(case / "c1_seg.nii.gz")}
        (folder / "validation.json").write_text(json.dumps({"validation": [entry]}))
        _study_json(folder, seed, {"sum": 0.5}, data=str(folder / "data" / "phantoms"))
        return folder

    a, b, c = study("a", 0, b"same"), study("b", 1, b"same"), study("c", 2, b"other")
    out = ["--output", str(tmp_path / "o")]
    assert main(["--combine", f"{a},{b}", *out]) == 0, capsys.readouterr().err
    assert main(["--combine", f"{a},{c}", *out]) == 2
    assert "identical validation cases" in capsys.readouterr().err
