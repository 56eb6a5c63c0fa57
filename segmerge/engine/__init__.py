"""segmerge.engine: the training application (``python -m segmerge train``).

Configuration (MONAI bundle data + command line), MONAI ``SupervisedTrainer`` with the
per-objective step as ``iteration_update``, validation (sliding-window Dice/HD95, per-head losses,
OGR), batched MLflow logging, atomic checkpoints and resume; see ``docs/architecture.md`` for
which module does what.
"""

from segmerge.engine.checkpoint import (
    TrainingState,
    atomic_torch_save,
    load_checkpoint,
    resolve_resume_path,
    rng_state,
    set_rng_state,
)
from segmerge.engine.config import (
    ConfigError,
    TrainOptions,
    available_aggregators,
    load_config,
    parse_argv,
)
from segmerge.engine.metrics_buffer import StepMetrics
from segmerge.engine.result import RESULT_NAME, read_result, write_result
from segmerge.engine.sampling import SeededCacheDataset, StreamSampler
from segmerge.engine.settings import Settings
from segmerge.engine.tracking import Tracker, check_tracking_uri, default_tracking_uri, ui_command
from segmerge.engine.trainer import Trainer, TrainResult, format_summary, phantom_cache_path, train
from segmerge.engine.validation import ValidationResult, region_scores, validate

__all__ = [
    "RESULT_NAME",
    "ConfigError",
    "Settings",
    "TrainingState",
    "read_result",
    "write_result",
    "SeededCacheDataset",
    "StepMetrics",
    "StreamSampler",
    "TrainOptions",
    "TrainResult",
    "Trainer",
    "Tracker",
    "ValidationResult",
    "atomic_torch_save",
    "available_aggregators",
    "check_tracking_uri",
    "default_tracking_uri",
    "format_summary",
    "load_checkpoint",
    "load_config",
    "parse_argv",
    "phantom_cache_path",
    "region_scores",
    "resolve_resume_path",
    "rng_state",
    "set_rng_state",
    "train",
    "ui_command",
    "validate",
]
