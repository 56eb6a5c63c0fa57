"""segmerge.data: BraTS-like phantoms, dataset loading/validation and MONAI transforms.

Phantoms on real anatomy (MNI152 from nilearn's wheel)::

    python -m segmerge phantoms --out data/phantoms --cases 120 --size 96 --seed 0
    python -m segmerge check-data data/phantoms
"""

from segmerge.data.anatomy import Anatomy, mni_anatomy
from segmerge.data.dataset import (
    LAYOUTS,
    DatasetError,
    DatasetSpec,
    case_file_names,
    case_id_for,
    load_dataset,
    split_cases,
)
from segmerge.data.nifti import save_nifti, write_bytes_atomic
from segmerge.data.phantom import PhantomCase, make_phantom_case
from segmerge.data.phantom_io import case_seed, write_phantom_dataset, write_preview
from segmerge.data.transforms import (
    CheckLabeld,
    LabelToRegionsd,
    OneThreadCompose,
    RandModalityDropoutd,
    StackModalitiesd,
    make_dataloader,
    train_transforms,
    val_transforms,
)
from segmerge.data.validate import Problem, filter_valid, format_problems, validate_dataset

__all__ = [
    "LAYOUTS",
    "Anatomy",
    "CheckLabeld",
    "DatasetError",
    "DatasetSpec",
    "LabelToRegionsd",
    "OneThreadCompose",
    "PhantomCase",
    "Problem",
    "RandModalityDropoutd",
    "StackModalitiesd",
    "case_file_names",
    "case_id_for",
    "case_seed",
    "filter_valid",
    "format_problems",
    "load_dataset",
    "make_dataloader",
    "make_phantom_case",
    "mni_anatomy",
    "save_nifti",
    "split_cases",
    "train_transforms",
    "val_transforms",
    "validate_dataset",
    "write_bytes_atomic",
    "write_phantom_dataset",
    "write_preview",
]
