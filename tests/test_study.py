"""``python -m segmerge compare``: options, budgets, statistics assembly, and a tiny study end to end.

The end-to-end study (budget ``tiny``: 24³ phantoms, 2 steps, 16³ patches) trains ``sum`` and
``mean`` x seeds 0 and 1 in real ``python -m segmerge train`` subprocesses, two at a time
(``--jobs 2``). It is killed (SIGTERM) as soon as its first run finished and then re-run, which
must skip that run and finish the others; one run is then retrained alone (``--jobs 1``) and must
give the same weights. The parent / nested MLflow runs are checked, and a last re-run with a third
method whose run cannot be evaluated checks that one failure is reported while the others are kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from segmerge.study import (
    ALL_SEQUENCES,
    T1CE_MISSING,
    EvaluationResult,
    MethodSummary,
    StudySettings,
    method_means,
    study_markdown,
    study_statistics,
)
from segmerge.study.budgets import get_budget, study_defaults
from segmerge.study.cli import main, parse_args, parse_int_list
from segmerge.study.evaluation import write_validation_datalist
from segmerge.study.plots import PLOT_FILES
from segmerge.study.runner import StudyError, cpu_cores
from segmerge.study.scoring import trained_config

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


def test_dry_run_prints_one_identical_setup_per_method_and_seed(tmp_path, capsys):
    code = main(
        ["--methods", "sum,pcgrad", "--seeds", "0,3", "--budget", "tiny", "--output",
         str(tmp_path), "--dry-run"]
    )  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 4
    assert "--aggregator sum" in out[0] and "--aggregator pcgrad" in out[1]
    assert "--seed 0 " in out[0] and "--seed 3 " in out[3] and "seed-3" in out[3]
    # everything but the method and seed (and their folders / run name) is the same
    strip = [re.sub(r"(sum|pcgrad)", "M", re.sub(r"seed[ -]?\d", "S", line)) for line in out]
    assert len(set(strip)) == 1
    assert not (tmp_path / "study.json").exists()


def test_seeds_jobs_and_devices_options(tmp_path, capsys):
    assert parse_int_list("seeds", "0, 1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match="--seeds takes integers"):
        parse_int_list("seeds", "0,x")
    base = ["--methods", "sum", "--budget", "tiny", "--output", str(tmp_path), "--dry-run"]
    assert main([*base, "--seeds", "1,1"]) == 2
    assert "--seeds: 1 listed more than once" in capsys.readouterr().err
    assert main([*base, "--seeds", "0", "--seed", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--jobs", "0"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
    assert main([*base, "--devices", "cuda:0,cuda:1", "--jobs", "3"]) == 2
    assert "one job runs per device" in capsys.readouterr().err
    # the default study: compare.json's methods and seeds (at least 3)
    defaults = study_defaults()
    assert len(defaults["seeds"]) >= 3 and defaults["reference"] == "sum"


def test_jobs_split_the_cores_between_them(monkeypatch):
    import segmerge.study.runner as runner

    budget = get_budget("cpu")
    monkeypatch.setattr(runner, "cpu_cores", lambda: 16)
    s = StudySettings(methods=["sum"], budget=budget, output=Path("x"), jobs=4)
    # the budget asks 1 thread per training; 4 jobs x 1 <= 16
    assert s.threads() == min(4, int(budget.train.get("num_threads") or 4))
    s = StudySettings(methods=["sum"], budget=budget, output=Path("x"), jobs=4,
                      extra=["--num_threads", "8"])  # fmt: skip
    assert s.threads() == 4  # capped at cores // jobs
    s = StudySettings(
        methods=["sum"], budget=budget, output=Path("x"), devices=["cuda:0", "cuda:1"]
    )
    assert s.slots() == ["cuda:0", "cuda:1"] and s.threads() <= 8
    monkeypatch.setattr(runner, "cpu_cores", lambda: 2)
    for jobs in (1, 2, 3):
        s = StudySettings(methods=["sum"], budget=budget, output=Path("x"), jobs=jobs,
                          extra=["--num_threads", "8"])  # fmt: skip
        assert len(s.slots()) * s.threads() <= max(2, jobs), jobs
    with pytest.raises(StudyError, match="--jobs must be >= 1"):
        StudySettings(methods=["sum"], budget=budget, output=Path("x"), jobs=0).slots()
    assert cpu_cores() >= 1


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


def _evaluation(case_values: dict[str, float]) -> EvaluationResult:
    """Cases whose Dice is ``v - 0.01 * k`` on the k-th subset, for every region."""
    from segmerge.inference import all_subsets

    cases = {}
    for case, v in case_values.items():
        cases[case] = {}
        for k, subset in enumerate(all_subsets()):
            metrics = {f"dice_{r}": v - 0.01 * k for r in ("wt", "tc", "et")}
            metrics.update({f"hd95_{r}": 5.0 for r in ("wt", "tc", "et")})
            cases[case]["+".join(subset)] = metrics
    mean = float(np.mean(list(case_values.values())))
    return EvaluationResult.from_rows(_rows(mean), cases)


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
    per_case = _evaluation({"c1": 0.8, "c2": 0.6})
    scores = EvaluationResult.from_dict(json.loads(json.dumps(per_case.to_dict()))).case_scores()
    assert scores["c1"]["dice_mean_full"] == pytest.approx(0.8)
    assert scores["c2"]["dice_mean_over_subsets"] == pytest.approx(0.6 - 0.07)
    mean = EvaluationResult.mean_of([EvaluationResult.from_rows(_rows(v)) for v in (0.5, 0.7)])
    assert mean.full.dice["wt"] == pytest.approx(0.6)


def _runs(shift: float, failed_seed: int | None = None) -> list[MethodSummary]:
    """sum and gmd over 3 seeds x 4 cases; gmd = sum + shift + a small case term (-0.0015,
    -0.0005, 0.0005, 0.0015: it cancels in the mean)."""
    runs = []
    for seed in range(3):
        base = {f"c{i}": 0.5 + 0.05 * i - 0.02 * seed for i in range(4)}
        runs.append(
            MethodSummary("sum", seed=seed, evaluation=_evaluation(base), run_id=f"s{seed}")
        )
        if seed == failed_seed:
            runs.append(MethodSummary("gmd", seed=seed, status="failed", error="boom"))
            continue
        moved = {c: v + shift + 0.001 * (i - 1.5) for i, (c, v) in enumerate(base.items())}
        runs.append(
            MethodSummary("gmd", seed=seed, evaluation=_evaluation(moved), run_id=f"g{seed}")
        )
    return runs


def test_study_statistics_pair_cases_and_seeds_and_give_verdicts():
    stats = study_statistics(_runs(0.05), ["sum", "gmd"], [0, 1, 2])
    gmd, ref = stats["methods"]["gmd"], stats["methods"]["sum"]
    assert ref["comparison"] is None and ref["verdict"] is None and gmd["status"] == "ok"
    comp = gmd["comparison"]["dice_mean_over_subsets"]
    assert comp["n_pairs"] == 12  # 4 cases x 3 seeds
    assert comp["difference"] == pytest.approx(0.05)
    assert comp["ci_low"] <= comp["difference"] <= comp["ci_high"]
    assert comp["p_value"] == pytest.approx(2 / 2**12)  # all 12 positive: exact two-sided p
    assert comp["p_adjusted"] == comp["p_value"]  # one method compared: Holm changes nothing
    assert comp["verdict"] == gmd["verdict"] == "better"
    assert "better than sum" in gmd["verdict_line"]
    seeds = gmd["seeds"]
    assert set(seeds) == {"0", "1", "2"}
    assert seeds["1"]["scores"]["dice_mean_full"] == pytest.approx(0.575 - 0.02 + 0.05)
    interval = gmd["scores"]["dice_mean_full"]
    assert interval["n"] == 3 and interval["ci_low"] < interval["mean"] < interval["ci_high"]
    same = study_statistics(_runs(0.0, failed_seed=2), ["sum", "gmd"], [0, 1, 2])["methods"]
    # differences -0.0015, -0.0005, 0.0005, 0.0015 per seed: symmetric, Wilcoxon p = 1
    assert same["gmd"]["status"] == "partial" and same["gmd"]["seeds"]["2"]["error"] == "boom"
    assert same["gmd"]["comparison"]["dice_mean_full"]["n_pairs"] == 8
    assert same["gmd"]["verdict"] == "indistinguishable"
    assert same["gmd"]["comparison"]["dice_mean_full"]["p_value"] > 0.5  # (float noise in ties)


def test_study_markdown_has_the_fields_table_intervals_and_verdicts():
    stats = study_statistics(_runs(-0.05, failed_seed=1), ["sum", "gmd"], [0, 1, 2])
    meta = {"study_id": "s1", "budget": "tiny", "seeds": [0, 1, 2], "reference": "sum"}
    per_method = method_means(_runs(-0.05, failed_seed=1), ["sum", "gmd"])
    per_method[1].histories = {"conflict/n_pairs": [(1, 3.0), (2, 5.0)], "ogr/fused": [(2, 0.25)]}
    text = study_markdown(stats, meta, per_method=per_method)
    assert "| gmd | 4.00 | 5.00 | fused 0.25 |" in text
    assert "**gmd**: worse than sum at α = 0.05" in text
    field = _table_rows(text, "## The field's table")
    assert set(field) == {"sum", "gmd"}
    sum_seeds = [0.5 + 0.05 * 1.5 - 0.02 * s for s in range(3)]  # mean over the 4 cases
    assert float(field["sum"][7]) == pytest.approx(np.mean(sum_seeds), abs=1e-3)  # mean, all 4
    assert float(field["sum"][3]) == pytest.approx(np.mean(sum_seeds) - 0.07, abs=1e-3)
    per_seed = _table_rows(text, "## Per seed")
    assert per_seed["gmd"][0] == "2" and per_seed["gmd"][2] == "–"  # seed 1 failed
    assert "[" in per_seed["sum"][4]  # mean [low, high]
    assert "**gmd** seed 1: boom" in text and T1CE_MISSING in text and ALL_SEQUENCES in text


def test_study_markdown_reports_what_the_aggregators_saw():
    stats = study_statistics(_runs(-0.05), ["sum", "gmd"], [0, 1, 2])
    meta = {"study_id": "s1", "budget": "tiny", "seeds": [0, 1, 2], "reference": "sum"}
    per_method = method_means(_runs(-0.05), ["sum", "gmd"])
    per_method[1].histories = {
        "cosine/mean": [(5, 0.2), (10, 0.4)],
        "cosine/min": [(5, -0.5), (10, -0.1)],
        "conflict/fraction": [(5, 0.25), (10, 0.75)],
        "conflict/alpha/fused.d0__modality.t1": [(5, -0.4), (10, 0.0)],
        "conflict/alpha/modality.t1__fused.d0": [(5, 0.2), (10, 0.2)],
        # fused share per step: 3 / (3 + 1) = 0.75 at step 5, 1 / (1 + 3) = 0.25 at step 10
        "weight/fused.d0": [(5, 3.0), (10, 1.0)],
        "weight/modality.t1": [(5, 1.0), (10, 3.0)],
    }
    per_method[1].seed_histories = [per_method[1].histories]
    rows = _table_rows(
        study_markdown(stats, meta, per_method=per_method), "## What the aggregators saw"
    )
    assert rows["gmd"] == ["0.300", "-0.300", "0.500", "0.200", "0.500", "0.500"]
    assert rows["sum"] == ["–"] * 6  # no histories read: nothing invented
    # with several seeds: the mean over seeds of each run's mean (a seed without a key is left out)
    first = per_method[1].histories
    per_method[1].seed_histories = [first, {"cosine/mean": [(5, 0.9)], "weight/fused.d0": []}]
    rows = _table_rows(
        study_markdown(stats, meta, per_method=per_method), "## What the aggregators saw"
    )
    assert rows["gmd"] == ["0.600", "-0.300", "0.500", "0.200", "0.500", "0.500"]


def test_method_means_keeps_every_seeds_histories():
    runs = _runs(-0.05)
    for i, r in enumerate(runs):
        r.histories = {"cosine/mean": [(1, float(i))]}
    gmd = method_means(runs, ["sum", "gmd"])[1]
    mine = [r for r in runs if r.method == "gmd" and r.evaluation is not None]
    assert gmd.seed_histories == [r.histories for r in mine] and len(mine) == 3
    assert gmd.histories == mine[0].histories  # the plots keep the first seed


def test_validation_datalist_needs_labels(tmp_path):
    with pytest.raises(ValueError, match="at least one validation case"):
        write_validation_datalist([], tmp_path / "v.json")
    with pytest.raises(ValueError, match="case c1: no label"):
        write_validation_datalist([{"case_id": "c1", "flair": "a.nii.gz"}], tmp_path / "v.json")


# ------------------------------------------------------------------ the tiny study, end to end
def _table_rows(text: str, section: str) -> dict[str, list[str]]:
    block = text.split(section, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("| method") and "---" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


RUNS = [("sum", 0), ("mean", 0), ("sum", 1), ("mean", 1)]


def _run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "methods" / method / f"seed-{seed}"


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The 2 x 2 study with --jobs 2, killed after its first finished run, then resumed."""
    out = tmp_path_factory.mktemp("study")
    args = ["--methods", "sum,mean", "--seeds", "0,1", "--budget", "tiny", "--jobs", "2"]
    args += ["--output", str(out), "--device", "cpu", "--experiment", "study-test"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "segmerge", "compare", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 300
    done: list[tuple[str, int]] = []
    while not done and proc.poll() is None and time.monotonic() < deadline:
        done = [r for r in RUNS if (_run_dir(out, *r) / "result.json").is_file()]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    first_output = proc.communicate(timeout=300)[0]
    killed = {
        "code": proc.returncode,
        "output": first_output,
        "done": [r for r in RUNS if (_run_dir(out, *r) / "result.json").is_file()],
        "logs": {r: (_run_dir(out, *r) / "train.log").read_text() for r in done},
        "mtimes": {r: (_run_dir(out, *r) / "result.json").stat().st_mtime_ns for r in done},
    }
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(args)
    return out, args, code, killed, buf.getvalue()


@pytest.mark.slow
def test_killed_study_resumes_without_retraining_finished_runs(tiny_study):
    out, _, code, killed, printed = tiny_study
    assert killed["done"], killed["output"][-3000:]  # at least one run finished before the kill
    assert len(killed["done"]) < len(RUNS) or killed["code"] == 0
    if len(killed["done"]) < len(RUNS):
        assert killed["code"] == 130, killed["output"][-3000:]
        assert "interrupted; run the same command again" in killed["output"]
    assert code == 0, printed[-3000:]
    for run in killed["logs"]:
        assert (_run_dir(out, *run) / "train.log").read_text() == killed["logs"][run]
        assert (_run_dir(out, *run) / "result.json").stat().st_mtime_ns == killed["mtimes"][run]
        assert f"{run[0]} seed {run[1]}: already done" in printed
    for run in RUNS:
        assert (_run_dir(out, *run) / "result.json").is_file(), run
        assert not (_run_dir(out, *run) / ".train.pid").exists()


@pytest.mark.slow
def test_tiny_study_end_to_end(tiny_study):
    out, _, code, _, printed = tiny_study
    assert code == 0, printed[-3000:]
    text = (out / "results.md").read_text()
    rows = _table_rows(text, "## The field's table")
    assert set(rows) == {"sum", "mean"}
    for method, cells in rows.items():
        dice = [float(c) for c in cells[:8]]  # WT, TC, ET, mean over subsets; then all four
        assert all(0.0 <= d <= 1.0 for d in dice), (method, dice)
        assert dice[3] == pytest.approx(sum(dice[:3]) / 3, abs=2e-3)
        assert dice[7] == pytest.approx(sum(dice[4:7]) / 3, abs=2e-3)
    assert "**mean**:" in text and "from sum" in text or "than sum" in text
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["jobs"] == 2
    assert results["primary_endpoint"] == "dice_mean_over_subsets"
    for method in ("sum", "mean"):
        entry = results["methods"][method]
        assert entry["status"] == "ok" and set(entry["seeds"]) == {"0", "1"}
        for seed in ("0", "1"):
            scores = entry["seeds"][seed]["scores"]
            assert 0.0 <= scores["dice_mean_over_subsets"] <= 1.0
            assert len(entry["seeds"][seed]["evaluation"]["subsets"]) == 15
        assert entry["scores"]["dice_mean_over_subsets"]["n"] == 2
    comp = results["methods"]["mean"]["comparison"]["dice_mean_over_subsets"]
    n_val = results["n_cases"]
    assert comp["n_pairs"] == 2 * n_val
    assert set(comp) == {"difference", "ci_low", "ci_high", "p_value", "p_adjusted",
                         "verdict", "n_pairs"}  # fmt: skip
    assert 0.0 <= comp["p_value"] <= comp["p_adjusted"] <= 1.0
    assert comp["verdict"] in ("better", "worse", "indistinguishable")
    for name in PLOT_FILES.values():
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        import matplotlib.image

        img = matplotlib.image.imread(out / "plots" / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 50, name
    for run in RUNS:  # the robustness files of `evaluate --subsets all` for each run
        assert (_run_dir(out, *run) / "evaluation" / "robustness.csv").is_file()


@pytest.mark.slow
def test_a_run_alone_gives_the_weights_it_gave_beside_another(tiny_study, tmp_path):
    """Jobs in parallel give the same results as one after another: the run that finished
    first in the --jobs 2 study (trained beside another run, never resumed) is retrained alone
    with --jobs 1 (in the same MLflow store, another experiment: no second store to create)."""
    out, args, code, killed, _ = tiny_study
    assert code == 0 and killed["done"]
    method, seed = killed["done"][0]
    assert (_run_dir(out, method, seed) / "train.log").read_text().count("$ ") == 1
    alone = tmp_path / "alone"
    argv = ["--methods", method, "--seeds", str(seed), "--budget", "tiny", "--jobs", "1"]
    argv += ["--output", str(alone), "--device", "cpu", "--data", str(out / "data" / "phantoms")]
    argv += ["--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", "--experiment", "alone"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0, buf.getvalue()[-3000:]
    a = json.loads((_run_dir(out, method, seed) / "result.json").read_text())
    b = json.loads((_run_dir(alone, method, seed) / "result.json").read_text())
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["evaluation"]["subsets"] == b["evaluation"]["subsets"]


@pytest.mark.slow
def test_study_is_one_parent_mlflow_run_with_a_nested_run_per_method_and_seed(tiny_study):
    from mlflow.tracking import MlflowClient

    out, _, code, _, _ = tiny_study
    assert code == 0
    record = json.loads((out / "study.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("study-test")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`segmerge.study` = '{record['study_id']}'"
    )
    parents = [r for r in runs if r.data.tags.get("segmerge.study.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.run_id == record["parent_run_id"]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r is not parent]
    assert sorted((r.data.tags["method"], int(r.data.tags["seed"])) for r in children) == sorted(
        RUNS
    )
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.run_name == f"{r.data.tags['method']}-seed{r.data.tags['seed']}"
        assert r.data.tags["budget"] == "tiny"
        assert r.data.tags["network"] and r.data.tags["objectives"]
        assert 0.0 <= r.data.metrics["study/dice/mean"] <= 1.0
        assert "conflict/n_pairs" in r.data.metrics  # the history the conflict plot reads
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {f"plots/{name}" for name in PLOT_FILES.values()} <= plots
    assert "sum/dice_mean_over_subsets" in parent.data.metrics
    results = json.loads((out / "results.json").read_text())
    assert results["parent_run_id"] == parent.info.run_id
    ids = {v["run_id"] for m in results["methods"].values() for v in m["seeds"].values()}
    assert ids == {r.info.run_id for r in children}


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_reports_a_failing_one(tiny_study, capsys):
    """Last of the module: it re-runs the study with a third method (seed 0 only)."""
    out, args, code, _, _ = tiny_study
    assert code == 0
    logs = {r: (_run_dir(out, *r) / "train.log").read_text() for r in RUNS}
    # pcgrad seed 0 "trained" into a run that does not exist: its evaluation must fail
    broken = _run_dir(out, "pcgrad", 0)
    broken.mkdir(parents=True)
    (broken / "train.json").write_text(json.dumps({"run_id": "no-such-run", "train_seconds": 1.0}))
    argv = [a if a != "sum,mean" else "sum,mean,pcgrad" for a in args]
    argv[argv.index("0,1")] = "0"
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 1
    assert "pcgrad seed 0" in captured.err and "failed" in captured.err
    assert captured.out.count("skipped") == 2
    for r in RUNS:
        assert (_run_dir(out, *r) / "train.log").read_text() == logs[r]  # not retrained
    text = (out / "results.md").read_text()
    assert "**pcgrad** seed 0: evaluation failed" in text
    assert "**pcgrad**: no verdict" in text
    assert set(_table_rows(text, "## The field's table")) == {"sum", "mean"}
    assert json.loads((out / "results.json").read_text())["methods"]["pcgrad"]["status"] == "failed"


def test_trained_config_is_read_as_data(tmp_path):
    """The study reads a trained run's network, patch and ET label from its checkpoint as data: a
    checkpoint holding an expression (which MONAI's ConfigParser would run) is refused, and the
    marker file that expression would create never appears (issue 16, security 2)."""
    import json

    from segmerge.engine import atomic_torch_save

    marker = tmp_path / "pwned"
    good = {
        "network_def": {"_target_": "segmerge.nets.MultiModalDSNet", "features": [8, 16, 32]},
        "patch_size": 32,
        "dataset": {"et_label": 3},
        "device": "cpu",
    }
    ckdir = tmp_path / "run" / "checkpoints" / "r1"
    ckdir.mkdir(parents=True)
    atomic_torch_save(
        {"format": 2, "model": {}, "iteration": 1, "config": json.dumps(good)}, ckdir / "last.pt"
    )
    net, patch, et, device = trained_config(tmp_path / "run", "r1")
    assert (net["_target_"], patch, et, device) == ("segmerge.nets.MultiModalDSNet", 32, 3, "cpu")
    evil = dict(good, patch_size=f"$open({str(marker)!r}, 'w').write('x') or 32")
    atomic_torch_save(
        {"format": 2, "model": {}, "iteration": 1, "config": json.dumps(evil)}, ckdir / "last.pt"
    )
    with pytest.raises(ValueError, match="patch_size.*expression"):
        trained_config(tmp_path / "run", "r1")
    foreign = dict(good, network_def={"_target_": "os.system", "command": "true"})
    atomic_torch_save(
        {"format": 2, "model": {}, "iteration": 1, "config": json.dumps(foreign)}, ckdir / "last.pt"
    )
    with pytest.raises(ValueError, match="segmerge.nets"):
        trained_config(tmp_path / "run", "r1")
    assert not marker.exists()


def test_describe_setup_names_what_tells_two_studies_apart():
    from monai.bundle import ConfigParser

    from segmerge.study.runner import describe_setup

    net = {"_target_": "segmerge.nets.MultiModalDSNet", "fusion": "mean", "features": [8, 16]}
    objectives = {"_target_": "segmerge.objectives.ObjectiveSet", "subsets": "all"}
    plain = describe_setup(ConfigParser({"network_def": net, "objectives": objectives}), "late")
    shared = describe_setup(
        ConfigParser({"network_def": {**net, "aux_decoder": "shared"}, "objectives": objectives})
    )
    assert plain == {
        "network": "late: MultiModalDSNet(fusion=mean)",
        "objectives": "ObjectiveSet(subsets=all)",
    }
    assert shared["network"] == "MultiModalDSNet(aux_decoder=shared, fusion=mean)"
