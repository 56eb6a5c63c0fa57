"""Several finished studies of the same budget and data, one per seed, in one table.

``python -m segmerge compare --combine runs/compare-cpu,runs/compare-cpu-seed1`` reads each
folder's ``results.json`` and writes ``combined.md`` and ``combined.json``: per method the mean and
the spread (min-max) over seeds of the validation Dice and of the mean Dice over the 15 subsets,
each seed's value, and the method's rank within each seed. It also sets the largest difference
between methods (within a seed) beside the largest difference between seeds (within a method):
a difference between aggregators smaller than what the seed alone moves is not evidence.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segmerge.atomic import write_text_atomic
from segmerge.conventions import REGIONS
from segmerge.study.evaluation import EvaluationResult
from segmerge.study.report import fmt, md_table

__all__ = ["load_study_results", "combine_studies", "combined_markdown", "write_combined"]

_SAME = ("budget", "n_cases")
"""What must agree between the studies combined, with the data (see :func:`_same_data`)."""


def load_study_results(folder: str | Path) -> dict[str, Any]:
    """``<folder>/results.json`` of a finished ``compare`` run.

    Raises:
        FileNotFoundError: no results.json there (the study did not finish).
        ValueError: the file is not a study's results.
    """
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: --combine takes folders of finished `compare` runs"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    missing = [k for k in ("seed", "methods", "data", *_SAME) if k not in data]
    if missing:
        raise ValueError(f"{path}: not a study's results.json (missing {', '.join(missing)})")
    data["folder"] = str(folder)
    return data


def _generated(study: Mapping[str, Any]) -> bool:
    """Whether the study trained on the phantoms it generated itself (``<output>/data/phantoms``)."""
    own = Path(study["folder"]) / "data" / "phantoms"
    return Path(study["data"]).resolve() == own.resolve()


def _validation_digest(study: Mapping[str, Any]) -> str | None:
    """SHA-256 over the bytes of every file of the validation cases, in case order."""
    path = Path(study["folder"]) / "validation.json"
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    for case in sorted(json.loads(path.read_text())["validation"], key=lambda c: c["case_id"]):
        digest.update(case["case_id"].encode())
        for key in sorted(k for k in case if k != "case_id"):
            file = Path(case[key])
            if not file.is_file():
                return None
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _same_data(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Same dataset path, or each study's own phantoms of the same budget with byte-identical
    validation cases (each study folder generates its own copy)."""
    if a["data"] == b["data"]:
        return True
    if not (_generated(a) and _generated(b)):
        return False
    digest = _validation_digest(a)
    return digest is not None and digest == _validation_digest(b)


def _scores(method: Mapping[str, Any]) -> dict[str, float] | None:
    if method.get("status") != "ok" or not method.get("evaluation"):
        return None
    result = EvaluationResult.from_dict(method["evaluation"])
    out = {f"dice_{r}": float(result.full.dice[r]) for r in (*REGIONS, "mean")}
    out["subsets"] = float(result.robustness()["dice_mean_over_subsets"])
    return out


def combine_studies(studies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-method statistics over the studies (one per seed).

    Args:
        studies: :func:`load_study_results` of each folder.

    Returns:
        ``{"seeds": [...], "studies": [...], "methods": {name: {metric: {"mean", "min", "max",
        "values"}, "ranks": [...]}}, "spread": {"between_methods", "between_seeds"}}``; a method
        missing or failed in some study is reported with the seeds it has.

    Raises:
        ValueError: fewer than two studies, a repeated seed, or studies of different budget, data
            or validation set (naming the folder that differs).
    """
    if len(studies) < 2:
        raise ValueError("--combine needs at least two study folders (one per seed)")
    first = studies[0]
    for study in studies[1:]:
        for key in _SAME:
            if study[key] != first[key]:
                raise ValueError(
                    f"{study['folder']}: {key} {study[key]!r} differs from {first['folder']}'s "
                    f"{first[key]!r}; only studies of the same budget and data combine"
                )
        if not _same_data(study, first):
            raise ValueError(
                f"{study['folder']}: data {study['data']!r} is not {first['folder']}'s "
                f"{first['data']!r} (nor the same generated phantoms with identical validation "
                "cases); only studies of the same budget and data combine"
            )
    seeds = [int(s["seed"]) for s in studies]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the studies repeat a seed ({seeds}); combine one study per seed")
    order: list[str] = []
    for study in studies:
        order += [m["method"] for m in study["methods"] if m["method"] not in order]
    per_seed = [{m["method"]: _scores(m) for m in study["methods"]} for study in studies]
    keys = [f"dice_{r}" for r in (*REGIONS, "mean")] + ["subsets"]
    methods: dict[str, Any] = {}
    for name in order:
        entry: dict[str, Any] = {}
        for key in keys:
            values = [s[name][key] if s.get(name) else float("nan") for s in per_seed]
            finite = [v for v in values if math.isfinite(v)]
            entry[key] = {
                "values": values,
                "mean": float(np.mean(finite)) if finite else float("nan"),
                "min": min(finite) if finite else float("nan"),
                "max": max(finite) if finite else float("nan"),
            }
        methods[name] = entry
    for seed_scores in per_seed:  # rank 1 = best mean Dice within that seed
        ranked = sorted(
            (n for n in order if seed_scores.get(n)), key=lambda n: -seed_scores[n]["dice_mean"]
        )
        for name in order:
            rank = ranked.index(name) + 1 if name in ranked else None
            methods[name].setdefault("ranks", []).append(rank)
    between_methods = []
    for seed_scores in per_seed:
        vals = [v["dice_mean"] for v in seed_scores.values() if v]
        between_methods.append(max(vals) - min(vals) if len(vals) > 1 else float("nan"))
    between_seeds = {
        n: methods[n]["dice_mean"]["max"] - methods[n]["dice_mean"]["min"] for n in order
    }
    return {
        "seeds": seeds,
        "studies": [
            {k: s.get(k) for k in ("folder", "study_id", "seed", "command")} for s in studies
        ],
        "budget": first["budget"],
        "data": first["data"],
        "n_cases": first["n_cases"],
        "machine": first.get("machine", ""),
        "methods": methods,
        "spread": {"between_methods": between_methods, "between_seeds": between_seeds},
    }


def _mean_range(stat: Mapping[str, Any]) -> str:
    return f"{fmt(stat['mean'])} ({fmt(stat['min'])}–{fmt(stat['max'])})"


def combined_markdown(combined: Mapping[str, Any]) -> str:
    """The text of ``combined.md``."""
    seeds = combined["seeds"]
    lines = [f"# Aggregator comparison over seeds {', '.join(map(str, seeds))}", ""]
    lines += [f"- budget: `{combined['budget']}`; data: `{combined['data']}` "
              f"({combined['n_cases']} validation case(s)); machine: {combined['machine']}"]  # fmt: skip
    lines += [f"- seed {s['seed']}: `{s['folder']}` (`{s['command']}`)" for s in combined["studies"]]
    lines += [
        "",
        "Validation Dice with all four sequences: mean over seeds (min–max); the last columns give "
        "each seed's mean Dice and the method's rank within that seed (1 = best).",
        "",
    ]
    header = ["method"] + [f"Dice {r.upper()}" for r in REGIONS] + ["Dice mean"]
    header += ["mean over 15 subsets"] + [f"seed {s}" for s in seeds] + ["ranks"]
    rows = []
    for name, entry in combined["methods"].items():
        row = [name] + [_mean_range(entry[f"dice_{r}"]) for r in (*REGIONS, "mean")]
        row.append(_mean_range(entry["subsets"]))
        row += [fmt(v) for v in entry["dice_mean"]["values"]]
        row.append(", ".join("–" if r is None else str(r) for r in entry["ranks"]))
        rows.append(row)
    lines += md_table(header, rows)
    spread = combined["spread"]
    worst_method = max(spread["between_methods"], default=float("nan"))
    finite_seeds = [v for v in spread["between_seeds"].values() if math.isfinite(v)]
    worst_seed = max(finite_seeds, default=float("nan"))
    lines += [
        "",
        "Largest difference in mean Dice between two methods trained with the same seed: "
        + ", ".join(f"seed {s}: {fmt(v)}" for s, v in zip(seeds, spread["between_methods"]))
        + f"; between two seeds of the same method: up to {fmt(worst_seed)} ("
        + ", ".join(f"{n} {fmt(v)}" for n, v in spread["between_seeds"].items())
        + ").",
    ]
    if math.isfinite(worst_method) and math.isfinite(worst_seed) and worst_method <= worst_seed:
        lines += [
            "",
            "The methods differ by less than the seed alone moves a method: these runs do not "
            "separate the aggregators.",
        ]
    return "\n".join(lines) + "\n"


def write_combined(folders: Sequence[str | Path], output: str | Path) -> tuple[Path, Path]:
    """Combine the studies in ``folders`` into ``<output>/combined.md`` and ``combined.json``."""
    combined = combine_studies([load_study_results(f) for f in folders])
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "combined.md", out / "combined.json"
    write_text_atomic(js, json.dumps(combined, indent=2) + "\n")
    write_text_atomic(md, combined_markdown(combined))
    return md, js
