"""The study's outputs: ``results.md`` (tables, statistics, verdicts) and ``results.json``.

Everything here is a pure function of the per-run summaries (:class:`MethodSummary`, one per
method x seed) and the metric histories read back from MLflow, so the report can be rebuilt from
a finished study folder without training anything. The statistics are those of
:mod:`segmerge.study.stats`.

``results.json`` (pinned keys; :func:`study_statistics` gives ``methods``, ``endpoints``,
``primary_endpoint``)::

    study_id, command, budget, seeds, reference, alpha, network, objectives, data, n_cases,
    machine, jobs, devices, threads_per_job, wall_seconds (this invocation), run_seconds_total
    (training + evaluation of every finished run, over all invocations), experiment, tracking_uri,
    parent_run_id, plots, primary_endpoint, endpoints: {key: description},
    methods: {<method>: {
        status: "ok" | "partial" | "failed" | "missing",
        seeds: {"<seed>": {status, run_id, error, train_seconds, eval_seconds, steps_per_second,
                           weights_sha256, scores: {<score>: value}, evaluation: {...}}},
        scores: {<score>: {mean, ci_low, ci_high, n}},        # over seeds, 95% Student t
        comparison: {<endpoint>: {difference, ci_low, ci_high, p_value, p_adjusted, verdict,
                                  n_pairs}} | null,            # null for the reference itself
        verdict: "better" | "worse" | "indistinguishable" | null,   # primary endpoint
        verdict_line: str}}

Scores per seed (means over the validation cases): ``dice_<r>_subsets`` / ``hd95_<r>_subsets``
(averaged over the 15 subsets of sequences), ``dice_<r>_full`` / ``hd95_<r>_full`` (all four
sequences) for r in wt, tc, et, mean; ``dice_mean_over_subsets`` is the primary endpoint, paired
per (validation case x seed) with the reference; ``dice_mean_full`` is compared the same way.

The plots are drawn by :mod:`segmerge.study.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segmerge.conventions import REGIONS
from segmerge.objectives.names import FUSED, head_of
from segmerge.study.evaluation import ALL_SEQUENCES, T1CE_MISSING, EvaluationResult
from segmerge.study.stats import compare_with_reference, seed_interval

__all__ = [
    "MethodSummary",
    "History",
    "ENDPOINTS",
    "PRIMARY_ENDPOINT",
    "seed_scores",
    "method_means",
    "study_statistics",
    "study_markdown",
]

History = list[tuple[int, float]]
"""``(step, value)`` pairs of one metric, ordered by step."""


@dataclass
class MethodSummary:
    """What the report needs about one method.

    Attributes:
        method: aggregator name.
        seed: training seed of this run.
        status: ``"ok"`` or ``"failed"``.
        run_id: MLflow run id (``None`` if training never started a run).
        evaluation: scores per subset (``None`` if it failed before evaluation).
        train_seconds: wall time of the training subprocess(es).
        eval_seconds: wall time of the evaluation.
        steps_per_second: mean of the run's ``perf/steps_per_second`` history.
        error: what went wrong (failed methods).
        histories: metric key -> history (``conflict/n_pairs``, ``ogr/<head>``).
        weights_sha256: digest of the trained weights (equal runs give equal digests).
        seed_histories: in a :func:`method_means` summary, the histories of every finished seed.
    """

    method: str
    seed: int = 0
    status: str = "ok"
    run_id: str | None = None
    evaluation: EvaluationResult | None = None
    train_seconds: float = float("nan")
    eval_seconds: float = float("nan")
    steps_per_second: float = float("nan")
    error: str | None = None
    histories: dict[str, History] = field(default_factory=dict)
    weights_sha256: str | None = None
    seed_histories: list[dict[str, History]] = field(default_factory=list)


def fmt(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or an en dash when it is missing or not finite."""
    return (
        f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"
    )


def md_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1
) -> list[str]:
    """Lines of a markdown table; columns from ``right_from`` on are right-aligned (numbers)."""
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


ENDPOINTS: dict[str, str] = {
    "dice_mean_over_subsets": "mean Dice (WT, TC, ET) averaged over the 15 subsets of sequences",
    "dice_mean_full": "mean Dice (WT, TC, ET) with all four sequences",
}
"""Scores compared with the reference per (validation case x seed)."""

PRIMARY_ENDPOINT = "dice_mean_over_subsets"
"""The endpoint of the one-line verdicts (what missing-modality papers report first)."""

_REGIONS_MEAN = (*REGIONS, "mean")


def seed_scores(evaluation: EvaluationResult) -> dict[str, float]:
    """One run's scores (means over the validation cases): ``dice_<r>_subsets``,
    ``dice_<r>_full``, ``hd95_<r>_subsets``, ``hd95_<r>_full`` for r in wt, tc, et, mean, and the
    endpoints ``dice_mean_over_subsets`` (= ``dice_mean_subsets``) and ``dice_mean_full``."""
    subsets = list(evaluation.subsets.values())
    out: dict[str, float] = {}
    for r in _REGIONS_MEAN:
        out[f"dice_{r}_subsets"] = float(np.mean([s.dice[r] for s in subsets]))
        out[f"dice_{r}_full"] = float(evaluation.full.dice[r])
        out[f"hd95_{r}_subsets"] = float(np.mean([s.hd95[r] for s in subsets]))
        out[f"hd95_{r}_full"] = float(evaluation.full.hd95[r])
    out["dice_mean_over_subsets"] = out["dice_mean_subsets"]
    return out


def method_means(runs: Sequence[MethodSummary], methods: Sequence[str]) -> list[MethodSummary]:
    """One summary per method for the plots: subset scores averaged over its finished seeds,
    the histories of its first finished seed (and of all, ``seed_histories``), mean train time
    and speed."""
    out = []
    for m in methods:
        mine = [r for r in runs if r.method == m]
        ok = [r for r in mine if r.evaluation is not None]
        if not ok:
            errors = "; ".join(f"seed {r.seed}: {r.error}" for r in mine if r.error)
            out.append(MethodSummary(m, status="failed", error=errors or "no finished run"))
            continue
        first = ok[0]
        finite = [r.steps_per_second for r in ok if math.isfinite(r.steps_per_second)]
        out.append(
            MethodSummary(
                m,
                seed=first.seed,
                run_id=first.run_id,
                evaluation=EvaluationResult.mean_of([r.evaluation for r in ok]),  # type: ignore[misc]
                train_seconds=float(np.mean([r.train_seconds for r in ok])),
                eval_seconds=float(np.mean([r.eval_seconds for r in ok])),
                steps_per_second=float(np.mean(finite)) if finite else float("nan"),
                histories=first.histories,
                seed_histories=[r.histories for r in ok],
            )
        )
    return out


def _pairs(
    runs: Mapping[tuple[str, int], MethodSummary], method: str, reference: str, seeds: Sequence[int]
) -> dict[str, tuple[list[float], list[float]]]:
    """Endpoint -> (method's, reference's) per-case scores over the seeds both finished."""
    out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in ENDPOINTS}
    for seed in seeds:
        a, b = runs.get((method, seed)), runs.get((reference, seed))
        if a is None or b is None or a.evaluation is None or b.evaluation is None:
            continue
        ca, cb = a.evaluation.case_scores(), b.evaluation.case_scores()
        for case in sorted(set(ca) & set(cb)):
            for key in ENDPOINTS:
                out[key][0].append(ca[case][key])
                out[key][1].append(cb[case][key])
    return out


def study_statistics(
    runs: Sequence[MethodSummary],
    methods: Sequence[str],
    seeds: Sequence[int],
    reference: str = "sum",
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The ``methods`` block of ``results.json`` (see the module docstring) and the endpoints.

    Per method: each seed's run and scores, mean and 95% interval over seeds, and the paired
    comparison with ``reference`` per (validation case x seed), Holm-adjusted over the methods
    compared (per endpoint), with a verdict at ``alpha``.
    """
    by_key = {(r.method, r.seed): r for r in runs}
    entries: dict[str, Any] = {}
    for m in methods:
        seed_entries: dict[str, Any] = {}
        per_seed: list[dict[str, float]] = []
        for seed in seeds:
            r = by_key.get((m, seed))
            if r is None:
                seed_entries[str(seed)] = {"status": "missing"}
                continue
            scores = seed_scores(r.evaluation) if r.evaluation is not None else None
            if scores is not None:
                per_seed.append(scores)
            seed_entries[str(seed)] = {
                "status": r.status,
                "run_id": r.run_id,
                "error": r.error,
                "train_seconds": r.train_seconds,
                "eval_seconds": r.eval_seconds,
                "steps_per_second": r.steps_per_second,
                "weights_sha256": r.weights_sha256,
                "scores": scores,
                "evaluation": r.evaluation.to_dict() if r.evaluation is not None else None,
            }
        n_ok = len(per_seed)
        status = "ok" if n_ok == len(seeds) else ("partial" if n_ok else "failed")
        if all(e["status"] == "missing" for e in seed_entries.values()):
            status = "missing"
        keys = list(per_seed[0]) if per_seed else []
        entries[m] = {
            "status": status,
            "seeds": seed_entries,
            "scores": {k: seed_interval([s[k] for s in per_seed]).to_dict() for k in keys},
            "comparison": None,
            "verdict": None,
            "verdict_line": "",
        }
    others = [m for m in methods if m != reference]
    paired = {m: _pairs(by_key, m, reference, seeds) for m in others}
    for key in ENDPOINTS:
        usable = {m: p[key] for m, p in paired.items() if p[key][0]}
        results = compare_with_reference(usable, alpha=alpha) if usable else {}
        for m in others:
            comp = results.get(m)
            if entries[m]["comparison"] is None:
                entries[m]["comparison"] = {}
            entries[m]["comparison"][key] = comp.to_dict() if comp is not None else None
    for m in methods:
        entries[m]["verdict_line"] = _verdict_line(m, entries[m], reference, alpha)
        comp = (entries[m]["comparison"] or {}).get(PRIMARY_ENDPOINT)
        entries[m]["verdict"] = comp["verdict"] if comp else None
    return {"primary_endpoint": PRIMARY_ENDPOINT, "endpoints": dict(ENDPOINTS), "methods": entries}


def _verdict_line(method: str, entry: Mapping[str, Any], reference: str, alpha: float) -> str:
    if method == reference:
        return f"**{method}**: the reference"
    comp = (entry.get("comparison") or {}).get(PRIMARY_ENDPOINT)
    if comp is None:
        return f"**{method}**: no verdict (no finished run pairs with a finished {reference} run)"
    word = {"better": "better than", "worse": "worse than"}.get(
        comp["verdict"], "indistinguishable from"
    )
    return (
        f"**{method}**: {word} {reference} at α = {alpha:g} — Δ mean Dice over the 15 subsets "
        f"{comp['difference']:+.3f} (95% bootstrap CI {comp['ci_low']:+.3f} to "
        f"{comp['ci_high']:+.3f}), Wilcoxon p = {comp['p_value']:.3g}, Holm-adjusted "
        f"p = {comp['p_adjusted']:.3g}, {comp['n_pairs']} case × seed pairs"
    )


def _interval(stat: Mapping[str, Any] | None) -> str:
    if not stat:
        return "–"
    if not math.isfinite(stat.get("ci_low", float("nan"))):
        return fmt(stat["mean"])
    return f"{fmt(stat['mean'])} [{fmt(stat['ci_low'])}, {fmt(stat['ci_high'])}]"


def study_markdown(
    stats: Mapping[str, Any],
    meta: Mapping[str, Any],
    plots: Mapping[str, str] | None = None,
    per_method: Sequence[MethodSummary] | None = None,
) -> str:
    """The text of ``results.md``.

    Args:
        stats: :func:`study_statistics` output.
        per_method: :func:`method_means` output, for the conflict / OGR table (first seed's
            histories); ``None`` leaves that table out.
        meta: ``study_id``, ``command``, ``budget``, ``seeds``, ``reference``, ``alpha``,
            ``network``, ``objectives``, ``data``, ``n_cases``, ``machine``, ``jobs``,
            ``wall_seconds``, ``experiment``, ``tracking_uri``, ``parent_run_id``.
        plots: plot kind -> path relative to ``results.md`` (see :data:`PLOT_FILES`).
    """
    methods: Mapping[str, Any] = stats["methods"]
    ref = str(meta.get("reference", "sum"))
    alpha = float(meta.get("alpha", 0.05))
    seeds = list(meta.get("seeds", []))
    ok = {m: e for m, e in methods.items() if e["scores"]}
    wall = meta.get("wall_seconds", float("nan"))
    total = float(meta.get("run_seconds_total", float("nan")))
    lines = [f"# Aggregator comparison — study `{meta.get('study_id', '?')}`", ""]
    lines += [
        f"- command: `{meta.get('command', '')}`",
        f"- budget: `{meta.get('budget', '')}`; seeds {', '.join(map(str, seeds))}; network "
        f"`{meta.get('network', '')}`; objectives `{meta.get('objectives', '')}`",
        f"- data: `{meta.get('data', '')}` ({meta.get('n_cases', '?')} validation case(s))",
        f"- machine: {meta.get('machine', '')}; {meta.get('jobs', 1)} job(s) at once; wall time "
        f"of this invocation {fmt(wall / 60 if isinstance(wall, (int, float)) else wall, 1)} min; "
        f"training + evaluation of all runs {fmt(total / 60, 1)} min",
        f"- MLflow: experiment `{meta.get('experiment', '')}` in `{meta.get('tracking_uri', '')}`"
        f", parent run `{meta.get('parent_run_id', '')}` (one nested run per method × seed)",
        "",
        "Same data, network and budget for every run; each method trains once per seed. Scores "
        "are means over the validation cases; intervals are 95% Student-t intervals over the "
        "seeds. HD95 in mm (0 when prediction and truth are both empty, 373.13 when exactly one "
        "is).",
        "",
        f"## Verdicts against `{ref}` (α = {alpha:g}, Holm-corrected over the methods)",
        "",
        "Paired per (validation case × seed): the difference in mean Dice over the 15 subsets, "
        "its 95% bootstrap interval, and a two-sided Wilcoxon signed-rank test.",
        "",
    ]
    lines += [f"- {e['verdict_line']}" for e in methods.values()]
    lines += ["", "## The field's table (mean over seeds)", ""]
    header = ["method"] + [f"Dice {r.upper()} (15)" for r in REGIONS] + ["Dice mean (15)"]
    header += [f"Dice {r.upper()} (all 4)" for r in REGIONS] + ["Dice mean (all 4)"]
    header += [f"HD95 {r.upper()} (15)" for r in REGIONS]
    header += [f"HD95 {r.upper()} (all 4)" for r in REGIONS]
    rows = []
    for m, e in ok.items():
        sc = e["scores"]
        row = [m] + [fmt(sc[f"dice_{r}_subsets"]["mean"]) for r in _REGIONS_MEAN]
        row += [fmt(sc[f"dice_{r}_full"]["mean"]) for r in _REGIONS_MEAN]
        row += [fmt(sc[f"hd95_{r}_subsets"]["mean"], 2) for r in REGIONS]
        row += [fmt(sc[f"hd95_{r}_full"]["mean"], 2) for r in REGIONS]
        rows.append(row)
    lines += md_table(header, rows) if rows else ["(no method finished)"]
    lines += [
        "",
        "(15) = averaged over the 15 non-empty subsets of flair, t1, t1ce, t2; (all 4) = with "
        "every sequence.",
        "",
        "## Per seed, with the 95% interval over seeds",
        "",
    ]
    header = ["method", "seeds done"] + [f"seed {s}" for s in seeds]
    header += ["mean over 15 subsets [95% CI]", "all four [95% CI]"]
    rows = []
    for m, e in methods.items():
        cells = [m, str(sum(1 for v in e["seeds"].values() if v.get("scores")))]
        for s in seeds:
            sc = e["seeds"].get(str(s), {}).get("scores")
            cells.append(fmt(sc[PRIMARY_ENDPOINT]) if sc else "–")
        cells += [
            _interval(e["scores"].get(PRIMARY_ENDPOINT)),
            _interval(e["scores"].get("dice_mean_full")),
        ]
        rows.append(cells)
    lines += md_table(header, rows, right_from=1)
    lines += ["", f"## Paired comparison with `{ref}`", ""]
    header = ["method", "endpoint", "Δ", "95% CI", "Wilcoxon p", "Holm p", "verdict", "pairs"]
    rows = []
    for m, e in methods.items():
        for key, comp in (e.get("comparison") or {}).items():
            if comp is None:
                rows.append([m, key, "–", "–", "–", "–", "no pairs", "0"])
                continue
            rows.append(
                [
                    m,
                    key,
                    f"{comp['difference']:+.3f}",
                    f"{comp['ci_low']:+.3f} to {comp['ci_high']:+.3f}",
                    f"{comp['p_value']:.3g}",
                    f"{comp['p_adjusted']:.3g}",
                    comp["verdict"],
                    str(comp["n_pairs"]),
                ]
            )
    lines += md_table(header, rows, right_from=2) if rows else [f"(no method besides {ref})"]
    first = next(iter(ok.values()), None)
    if first is not None:
        seed0 = next(v for v in first["seeds"].values() if v.get("evaluation"))
        subsets = list(seed0["evaluation"]["subsets"])
        lines += ["", "## Mean Dice per subset of sequences (mean over seeds)", ""]
        header = ["sequences"] + list(ok)
        rows = []
        for name in subsets:
            cells = [name]
            for e in ok.values():
                vals = [
                    v["evaluation"]["subsets"][name]["dice"]["mean"]
                    for v in e["seeds"].values()
                    if v.get("evaluation") and name in v["evaluation"]["subsets"]
                ]
                cells.append(fmt(float(np.mean(vals))) if vals else "–")
            rows.append(cells)
        lines += md_table(header, rows)
        lines += ["", f"`{T1CE_MISSING}` is the subset without T1ce; `{ALL_SEQUENCES}` has all."]
    lines += ["", "## Runs", ""]
    header = ["method", "seed", "status", "train s", "eval s", "steps/s", "weights sha256"]
    rows = []
    for m, e in methods.items():
        for s, v in e["seeds"].items():
            digest = v.get("weights_sha256") or ""
            rows.append(
                [
                    m,
                    s,
                    v.get("status", "–"),
                    fmt(v.get("train_seconds", float("nan")), 0),
                    fmt(v.get("eval_seconds", float("nan")), 0),
                    fmt(v.get("steps_per_second", float("nan")), 2),
                    digest[:12] or "–",
                ]
            )
    lines += md_table(header, rows, right_from=3)
    if per_method:
        lines += ["", "## Gradient conflicts and OGR over training (first seed)", ""]
        header = ["method", "conflicting pairs (mean)", "conflicting pairs (last)", "OGR (last)"]
        rows = []
        for summary in per_method:
            conf = [v for _, v in summary.histories.get("conflict/n_pairs", [])]
            ogr = {
                k[4:]: h[-1][1]
                for k, h in sorted(summary.histories.items())
                if k.startswith("ogr/") and h
            }
            rows.append(
                [
                    summary.method,
                    fmt(float(np.mean(conf)), 2) if conf else "–",
                    fmt(conf[-1], 2) if conf else "–",
                    ", ".join(f"{k} {fmt(v, 2)}" for k, v in ogr.items()) or "–",
                ]
            )
        lines += md_table(header, rows)
        lines += ["", "## What the aggregators saw over training (mean over seeds)", ""]
        lines += [
            "Means over the logged steps of each run, then over the seeds. cos: cosine between "
            "objective gradients (mean and minimum over the pairs); conflicting: fraction of "
            "pairs with a negative cosine; "
            "mean abs α: mean magnitude of the method's conflict coefficients (GMD / PCGrad "
            "projections, GradCraft's weights of the conflicting pairs; 0 where it has none); "
            "fused share: the fused heads' part of the update weights (sum of their weights "
            "over the sum of all), beside its value under equal weights.",
            "",
        ]
        lines += md_table(DIAGNOSTICS_HEADER, [diagnostics_row(s) for s in per_method])
    failed = [
        (m, s, v["error"]) for m, e in methods.items() for s, v in e["seeds"].items()
        if v.get("error")
    ]  # fmt: skip
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- **{m}** seed {s}: {err}" for m, s, err in failed]
    if plots:
        lines += ["", "## Plots", ""]
        titles = {
            "dice": "Dice per region (mean over seeds)",
            "robustness": "Mean Dice per subset of sequences (mean over seeds)",
            "conflicts": "Conflicting pairs over training (first seed)",
            "ogr": "OGR over training (first seed)",
        }
        for kind, rel in plots.items():
            lines += [f"![{titles.get(kind, kind)}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


DIAGNOSTICS_HEADER = [
    "method",
    "cos (mean)",
    "cos (min)",
    "conflicting",
    "mean abs α",
    "fused share",
    "equal-weight share",
]


def _history_mean(h: Mapping[str, History], keys: Sequence[str], magnitude=False) -> float | None:
    vals = [abs(v) if magnitude else v for k in keys for _, v in h.get(k, [])]
    return float(np.mean(vals)) if vals else None


def _fused_share(h: Mapping[str, History]) -> tuple[float | None, float | None]:
    """Mean over steps of the fused heads' part of the weights, and its equal-weight value."""
    weights = {k[len("weight/") :]: dict(v) for k, v in h.items() if k.startswith("weight/")}
    fused = [n for n in weights if head_of(n) == FUSED]
    if not (weights and fused):
        return None, None
    steps = sorted(set.intersection(*(set(w) for w in weights.values())))
    per_step = [
        sum(weights[n][t] for n in fused) / total
        for t in steps
        if (total := sum(w[t] for w in weights.values())) > 0
    ]
    if not per_step:
        return None, None
    return float(np.mean(per_step)), len(fused) / len(weights)


def _diagnostics(h: Mapping[str, History]) -> list[float | None]:
    alpha = [k for k in h if k.startswith("conflict/alpha/")]
    return [
        _history_mean(h, ["cosine/mean"]),
        _history_mean(h, ["cosine/min"]),
        _history_mean(h, ["conflict/fraction"]),
        _history_mean(h, alpha, magnitude=True),
        *_fused_share(h),
    ]


def diagnostics_row(summary: MethodSummary) -> list[str]:
    """One row of the "what the aggregators saw" table: each figure is the mean over the logged
    steps of one run, then the mean over the method's seeds (``seed_histories``; the summary's
    own ``histories`` when that is empty)."""
    per_seed = [_diagnostics(h) for h in (summary.seed_histories or [summary.histories])]
    cells = []
    for column in zip(*per_seed):
        vals = [v for v in column if v is not None]
        cells.append(fmt(float(np.mean(vals))) if vals else "–")
    return [summary.method, *cells]
