"""segmerge.study: the aggregator comparison (``python -m segmerge compare``).

Every method trains once per seed, each in its own ``python -m segmerge train`` subprocess on the
same data, network and budget (:mod:`segmerge.study.budgets`, ``configs/compare.json``), several
at once with ``--jobs`` / ``--devices`` (:mod:`segmerge.study.runner`); each run is scored on the
validation cases with all 15 subsets of sequences (:mod:`segmerge.study.evaluation`) and nested
under the study's parent MLflow run; :mod:`segmerge.study.stats` compares every method with the
reference (sum) per validation case x seed and :mod:`segmerge.study.report` writes
``results.md``, ``results.json`` and the plots.
"""

from segmerge.study.budgets import (
    Budget,
    default_methods,
    get_budget,
    load_study_config,
    study_defaults,
)
from segmerge.study.evaluation import (
    ALL_SEQUENCES,
    T1CE_MISSING,
    EvaluationResult,
    SubsetScores,
    evaluate_model,
    write_validation_datalist,
)
from segmerge.study.plots import write_plots
from segmerge.study.report import MethodSummary, method_means, study_markdown, study_statistics
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
    "method_means",
    "method_train_command",
    "study_defaults",
    "study_markdown",
    "study_statistics",
    "write_plots",
    "write_validation_datalist",
]
