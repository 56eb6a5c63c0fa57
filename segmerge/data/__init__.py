"""segmerge.data: BraTS-like phantoms, dataset loading/validation and MONAI transforms.

Phantoms on real anatomy (MNI152 from nilearn's wheel)::

    python -m segmerge phantoms --out data/phantoms --cases 120 --size 96 --seed 0
    python -m segmerge check-data data/phantoms
"""

from segmerge.atomic import write_bytes_atomic
from segmerge.data.anatomy import Anatomy, mni_anatomy
from segmerge.data.dataset import (
    LAYOUTS,
    DatasetError,
    DatasetSpec,
    DatasetWarning,
    case_file_names,
    case_id_for,
    check_case_id,
    load_dataset,
    split_cases,
)
from segmerge.data.nifti import save_nifti
from segmerge.data.phantom import PhantomCase, make_phantom_case
from segmerge.data.phantom_io import (
    cached_phantoms,
    case_seed,
    phantom_cache_dir,
    write_phantom_dataset,
    write_preview,
)
from segmerge.data.transforms import (
    CheckLabeld,
    LabelToRegionsd,
    OneThreadCompose,
    RandModalityDropoutd,
    StackModalitiesd,
    inference_transforms,
    train_transforms,
    val_transforms,
)
from segmerge.data.validate import (
    MAX_VOXELS,
    Problem,
    check_case,
    filter_valid,
    format_problems,
    load_volume,
    open_volume,
    validate_dataset,
)

__all__ = [
    "LAYOUTS",
    "MAX_VOXELS",
    "Anatomy",
    "CheckLabeld",
    "DatasetError",
    "DatasetSpec",
    "DatasetWarning",
    "LabelToRegionsd",
    "OneThreadCompose",
    "PhantomCase",
    "Problem",
    "RandModalityDropoutd",
    "StackModalitiesd",
    "cached_phantoms",
    "case_file_names",
    "case_id_for",
    "case_seed",
    "check_case",
    "check_case_id",
    "filter_valid",
    "format_problems",
    "inference_transforms",
    "load_dataset",
    "load_volume",
    "make_phantom_case",
    "mni_anatomy",
    "open_volume",
    "phantom_cache_dir",
    "save_nifti",
    "split_cases",
    "train_transforms",
    "val_transforms",
    "validate_dataset",
    "write_bytes_atomic",
    "write_phantom_dataset",
    "write_preview",
]
