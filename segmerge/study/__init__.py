"""segmerge.study: the aggregator comparison (``python -m segmerge compare``).

Every method trains in its own ``python -m segmerge train`` subprocess on the same data, seed,
network and budget (:mod:`segmerge.study.budgets`, ``configs/compare.json``), is scored on the
validation cases with all 15 subsets of sequences (:mod:`segmerge.study.evaluation`), and is
tagged in one MLflow experiment; :mod:`segmerge.study.report` writes ``results.md`` and the plots.
"""

from segmerge.study.budgets import Budget, default_methods, get_budget, load_study_config
from segmerge.study.evaluation import (
    ALL_SEQUENCES,
    T1CE_MISSING,
    EvaluationResult,
    SubsetScores,
    evaluate_model,
    write_validation_datalist,
)
from segmerge.study.report import MethodSummary, results_markdown, write_plots
from segmerge.study.runner import (
    Study,
    StudyError,
    StudySettings,
    atomic_write_json,
    method_train_command,
)

__all__ = [
    "ALL_SEQUENCES",
    "T1CE_MISSING",
    "Budget",
    "EvaluationResult",
    "MethodSummary",
    "Study",
    "StudyError",
    "StudySettings",
    "SubsetScores",
    "atomic_write_json",
    "default_methods",
    "evaluate_model",
    "get_budget",
    "load_study_config",
    "method_train_command",
    "results_markdown",
    "write_plots",
    "write_validation_datalist",
]
