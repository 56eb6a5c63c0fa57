"""segmerge.inference: MONAI bundle prediction (``configs/inference.json``) and evaluation.

Commands::

    python -m monai.bundle run --config_file configs/inference.json --bundle_root . \
        --dataset_dir IN --output_dir OUT
    python -m segmerge predict --input IN --output OUT [--model models/model.pt]
    python -m segmerge evaluate --pred OUT --gt GT [--subsets all --model PATH --input IN]
"""

# the public name of segmerge.atomic.write_text_atomic in this package (no wrapper of its own)
from segmerge.atomic import write_text_atomic as atomic_write_text
from segmerge.inference.bundle import build_predictor, default_config, load_bundle_config
from segmerge.inference.cases import CaseInputs, case_id_from_path, discover_cases
from segmerge.inference.evaluate import (
    CONVENTIONS,
    EvaluationResult,
    all_subsets,
    evaluate_predictions,
    evaluate_subsets,
    ground_truth_files,
    region_metrics,
    write_evaluation,
    write_robustness,
)
from segmerge.inference.predictor import (
    BratsPredictor,
    CaseResult,
    PredictionFailed,
    PredictionReport,
    atomic_save_nifti,
    load_weights,
    probabilities_path,
)

__all__ = [
    "CONVENTIONS",
    "default_config",
    "EvaluationResult",
    "all_subsets",
    "evaluate_predictions",
    "evaluate_subsets",
    "ground_truth_files",
    "region_metrics",
    "write_evaluation",
    "write_robustness",
    "BratsPredictor",
    "CaseInputs",
    "CaseResult",
    "PredictionFailed",
    "PredictionReport",
    "atomic_save_nifti",
    "atomic_write_text",
    "build_predictor",
    "case_id_from_path",
    "discover_cases",
    "load_bundle_config",
    "load_weights",
    "probabilities_path",
]
