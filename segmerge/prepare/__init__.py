"""segmerge.prepare: raw scans -> BraTS-ready cases with SimpleITK (offline).

    python -m segmerge prepare --input raw_scans --output prepared
    python -m segmerge predict --prepare --input raw_scans --output predictions

See :mod:`segmerge.prepare.pipeline` for the stages and the output layout, and
:mod:`segmerge.prepare.restore` for mapping predictions back to the scanner's geometry.
"""

from segmerge.prepare.io import PrepareError, RawCase, RawSequence, find_sequences
from segmerge.prepare.naming import DEFAULT_NAMES, load_names, match_name
from segmerge.prepare.pipeline import (
    CaseOutcome,
    PrepareOptions,
    PrepareReport,
    prepare_case,
    prepare_dataset,
)

__all__ = [
    "DEFAULT_NAMES",
    "CaseOutcome",
    "PrepareError",
    "PrepareOptions",
    "PrepareReport",
    "RawCase",
    "RawSequence",
    "find_sequences",
    "load_names",
    "match_name",
    "prepare_case",
    "prepare_dataset",
]
