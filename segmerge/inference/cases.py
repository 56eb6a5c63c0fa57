"""The cases to predict, read by :func:`segmerge.data.load_dataset` (the one dataset reader).

Prediction inputs differ from training inputs in two ways that matter here: a case may have only
some of the four sequences (the network takes an availability mask), and labels are optional.
So discovery reads the dataset with ``allow_missing=True`` and no validation split, exactly as
``train`` and ``check-data`` read it (same layouts, BraTS 2021 and 2023 names and datalist keys,
same case-id rule, same refusal of duplicate ids and broken ``dataset.json`` files); every case
then goes through :func:`segmerge.data.check_case`, the validation ``check-data`` and training
run, before it is predicted (see :meth:`segmerge.inference.BratsPredictor.check_inputs`).

Accepted inputs: a BraTS 2021 / 2023 folder of case folders, a datalist JSON, or a folder holding
``dataset.json`` (see :func:`segmerge.data.load_dataset`). A subfolder that holds no case files is
reported as a case that cannot be predicted (a misnamed case must not vanish silently), except
the prediction output folder itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from segmerge.conventions import BRATS2021_SUFFIX, BRATS2023_SUFFIX, MODALITIES
from segmerge.data import load_dataset

__all__ = ["CaseInputs", "discover_cases", "case_id_from_path"]

NIFTI_EXTENSIONS = (".nii.gz", ".nii")


@dataclass
class CaseInputs:
    """One case to predict.

    Attributes:
        case_id: name used for ``<output>/<case_id>.nii.gz`` (follows the case-id rule).
        images: modality name -> image path, only for the sequences the dataset gives.
        label: ground-truth path if the dataset provides one.
        problem: why this case cannot be predicted (``None`` when it may be).
    """

    case_id: str
    images: dict[str, Path] = field(default_factory=dict)
    label: Path | None = None
    problem: str | None = None

    @property
    def available(self) -> tuple[bool, ...]:
        """Availability flags in ``MODALITIES`` order."""
        return tuple(m in self.images for m in MODALITIES)

    @property
    def item(self) -> dict:
        """The case as a :mod:`segmerge.data` case dict (absent sequences ``None``)."""
        out: dict = {"case_id": self.case_id}
        out.update({m: str(self.images[m]) if m in self.images else None for m in MODALITIES})
        if self.label is not None:
            out["label"] = str(self.label)
        return out


def _strip_nifti(name: str) -> str | None:
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def case_id_from_path(path: str | Path) -> str:
    """Case name of a BraTS file: ``BraTS2021_00001_flair.nii.gz`` -> ``BraTS2021_00001``.

    Files without a known modality/label suffix keep their name without the NIfTI extension.
    """
    stem = _strip_nifti(Path(path).name) or Path(path).name
    suffixes = set(BRATS2021_SUFFIX.values()) | set(BRATS2023_SUFFIX.values())
    match = re.match(r"^(.*)[_-](" + "|".join(sorted(suffixes)) + r")$", stem)
    return match.group(1) if match else stem


def _case(item: dict) -> CaseInputs:
    return CaseInputs(
        case_id=item["case_id"],
        images={m: Path(item[m]) for m in MODALITIES if item.get(m) is not None},
        label=Path(item["label"]) if item.get("label") else None,
    )


def discover_cases(
    path: str | Path, exclude: Sequence[str | os.PathLike] = ()
) -> list[CaseInputs]:
    """List the cases of a BraTS-layout folder or datalist, in the dataset's (sorted) order.

    Args:
        path: a datalist JSON file, a folder of BraTS case folders, or a folder holding
            ``dataset.json``.
        exclude: folders not to read as cases (the prediction output folder).

    Returns:
        One :class:`CaseInputs` per case (training, validation and testing items of a datalist,
        labelled and unlabelled case folders), then one with ``problem`` set per subfolder that
        holds no case files.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: (:class:`segmerge.data.DatasetError`) ``path`` is no dataset, its datalist is
            unreadable or names an unknown key, a case id breaks the rule or two cases share one.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"input {path} does not exist (expected a BraTS folder or a datalist JSON)"
        )
    spec = load_dataset(path, allow_missing=True, val_fraction=0.0, exclude=exclude)
    cases = [_case(item) for item in spec.all_items()]
    for folder in spec.ignored:
        expected = ", ".join(f"{folder.name}_{BRATS2021_SUFFIX[m]}.nii.gz" for m in MODALITIES)
        cases.append(
            CaseInputs(
                folder.name,
                problem=f"{folder}: not a case folder, no input sequence found (expected at least "
                f"one of {expected}, or the BraTS 2023 -t2f/-t1n/-t1c/-t2w names)",
            )
        )
    return cases
