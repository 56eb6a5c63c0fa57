"""Find the cases to predict in a BraTS-layout folder or a Decathlon-style datalist.

Prediction inputs differ from training inputs in two ways that matter here: a case may have only
some of the four sequences (the network takes an availability mask), and labels are optional.
So discovery never fails on a single case: each case comes back either with the sequences that
were found or with the reason it cannot be predicted, and the caller reports it and goes on.

Accepted inputs (see ``/work/shared/docs/conventions.md``):

- a folder of case folders, BraTS 2021 (``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``) or
  BraTS 2023 (``<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz``) naming, detected per file;
- a datalist JSON ``{"training": [...], "validation": [...], "testing": [...]}`` whose items map
  modality names (and optionally ``label`` and ``case_id``) to paths relative to the JSON's folder;
- a folder holding ``dataset.json`` and no case folders is read as that datalist.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from segmerge.conventions import BRATS2021_SUFFIX, BRATS2023_SUFFIX, MODALITIES

__all__ = ["CaseInputs", "discover_cases", "case_id_from_path"]

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
DATALIST_SECTIONS = ("training", "validation", "testing")


@dataclass
class CaseInputs:
    """One case to predict.

    Attributes:
        case_id: name used for ``<output>/<case_id>.nii.gz``.
        images: modality name -> image path, only for the sequences that were found.
        label: ground-truth path if the layout provides one.
        problem: why this case cannot be predicted (``None`` when it can).
    """

    case_id: str
    images: dict[str, Path] = field(default_factory=dict)
    label: Path | None = None
    problem: str | None = None

    @property
    def available(self) -> tuple[bool, ...]:
        """Availability flags in ``MODALITIES`` order."""
        return tuple(m in self.images for m in MODALITIES)


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


def _case_from_folder(folder: Path) -> CaseInputs:
    case = CaseInputs(case_id=folder.name)
    files = {}
    for f in sorted(folder.iterdir()):
        stem = _strip_nifti(f.name)
        if stem is not None and f.is_file():
            files[stem] = f
    # BraTS 2021 names files <case>_<suffix>, BraTS 2023 <case>-<suffix>; accept either per file.
    for key in (*MODALITIES, "label"):
        for sep, table in (("_", BRATS2021_SUFFIX), ("-", BRATS2023_SUFFIX)):
            stem = f"{folder.name}{sep}{table[key]}"
            if stem in files:
                if key == "label":
                    case.label = files[stem]
                else:
                    case.images[key] = files[stem]
                break
    if not case.images:
        expected = ", ".join(f"{folder.name}_{BRATS2021_SUFFIX[m]}.nii.gz" for m in MODALITIES)
        case.problem = (
            f"case {folder.name}: no input sequence found in {folder} "
            f"(expected at least one of {expected}, or the BraTS 2023 -t2f/-t1n/-t1c/-t2w names)"
        )
    return case


def _cases_from_datalist(path: Path) -> list[CaseInputs]:
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read datalist JSON ({err})") from err
    if not isinstance(content, dict) or not any(s in content for s in DATALIST_SECTIONS):
        raise ValueError(
            f"{path}: a datalist must be a JSON object with at least one of the lists "
            f"{DATALIST_SECTIONS}, found {type(content).__name__}"
            + (f" with keys {sorted(content)}" if isinstance(content, dict) else "")
        )
    root = path.parent
    cases: list[CaseInputs] = []
    seen: set[str] = set()
    for section in DATALIST_SECTIONS:
        items = content.get(section, [])
        if not isinstance(items, list):
            raise ValueError(
                f"{path}: '{section}' must be a list of cases, found {type(items).__name__}"
            )
        for index, item in enumerate(items):
            where = f"{path} {section}[{index}]"
            if not isinstance(item, dict):
                cases.append(CaseInputs(f"{section}_{index}", problem=f"{where}: not an object"))
                continue
            first = next(
                (item[k] for k in (*MODALITIES, "label") if isinstance(item.get(k), str)), None
            )
            case_id = str(
                item.get("case_id") or (case_id_from_path(first) if first else f"{section}_{index}")
            )
            if case_id in seen:
                continue  # listed in two sections: predict once
            seen.add(case_id)
            case = CaseInputs(case_id)
            missing_files = []
            for key in (*MODALITIES, "label"):
                value = item.get(key)
                if value is None:
                    continue
                full = (root / value) if not Path(value).is_absolute() else Path(value)
                if not full.is_file():
                    # A listed path that does not exist is a mistake in the datalist, not an
                    # absent sequence: reporting it beats silently predicting with fewer inputs.
                    missing_files.append(f"{key} file {full} does not exist")
                elif key == "label":
                    case.label = full
                else:
                    case.images[key] = full
            if missing_files:
                case.problem = f"case {case_id} ({where}): " + "; ".join(missing_files)
            elif not case.images:
                case.problem = (
                    f"case {case_id} ({where}): lists none of the sequences {', '.join(MODALITIES)}"
                )
            cases.append(case)
    return cases


def discover_cases(path: str | Path) -> list[CaseInputs]:
    """List the cases of a BraTS-layout folder or datalist, in a stable (sorted) order.

    Args:
        path: a datalist JSON file, a folder of BraTS case folders, or a folder whose only
            description is a ``dataset.json`` datalist.

    Returns:
        One :class:`CaseInputs` per case; cases that cannot be predicted carry ``problem``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is neither a datalist nor a folder with case folders.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"input {path} does not exist (expected a BraTS folder or a datalist JSON)"
        )
    if path.is_file():
        return _cases_from_datalist(path)
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        if (path / "dataset.json").is_file():
            return _cases_from_datalist(path / "dataset.json")
        raise ValueError(
            f"input {path}: no case folders found (expected <case>/<case>_flair.nii.gz ... or a "
            "datalist JSON)"
        )
    return [_case_from_folder(folder) for folder in folders]
