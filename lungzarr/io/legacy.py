"""Readers for the original pipeline's output folders (no Zarr).

The original (and the tjvananne refactor) left one ``.npz`` per patient in
sibling folders of an input directory::

    INPUT/stage1_2x2x2/<patient>.npz                 unsegmented 2 mm HU (int16)
    INPUT/stage1_segmented_2x2x2/<patient>.npz       segmented 2 mm HU (-2000 outside)
    INPUT/stage1_segmented_2x2x2_crop/<patient>.npz  the same, cropped to the lungs
    INPUT/stage1_2x2x2_mpred3_8/<patient>.npz        window probability maps (Z-8, 1, 1, H', W')
    INPUT/stage1_2x2x2_mpred3_8/<patient>.csv        detection box by_min, by_max, bx_min, bx_max
    INPUT/stage1_labels.csv                          id,cancer

Each array is ``arr_0`` of its ``.npz``. These readers hand the arrays back
as they are; importing them into a store is the storage layer's job.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungzarr.errors import PatientError

__all__ = [
    "LegacyPatient",
    "read_legacy_patient",
    "list_legacy_patients",
    "read_legacy_labels",
    "LEGACY_FOLDERS",
    "UNKNOWN_LABEL",
]

#: The label the original wrote for a patient missing from the labels CSV.
UNKNOWN_LABEL = -777

#: Folder names per stage prefix ("stage1", "stage2").
LEGACY_FOLDERS = {
    "hu": "{stage}_2x2x2",
    "segmented": "{stage}_segmented_2x2x2",
    "segmented_crop": "{stage}_segmented_2x2x2_crop",
    "prob_windows": "{stage}_2x2x2_mpred3_8",
}


@dataclass(frozen=True)
class LegacyPatient:
    """One patient's arrays from the original layout.

    Attributes
    ----------
    patient : str
        Patient id (file stem).
    hu : ndarray of int16 or None
        Unsegmented 2 mm volume (``stage1_2x2x2``); None where not kept.
    segmented : ndarray of int16 or None
        Segmented 2 mm volume, -2000 outside the lungs.
    segmented_crop : ndarray of int16 or None
        The segmented volume cropped to the lungs (docs/algorithms.md §4).
    prob_windows : ndarray of float32 or None
        One probability map per 8-slice window, shape (Z-8, 1, 1, H', W');
        window ``i`` belongs to slice ``i + 4``; values < 0.5 were zeroed.
    box : dict or None
        Detection box of ``prob_windows``: ``by_min, by_max, bx_min, bx_max``.
    cancer : int
        Label from the labels CSV; -777 when the patient is not listed.
    """

    patient: str
    hu: np.ndarray | None
    segmented: np.ndarray | None
    segmented_crop: np.ndarray | None
    prob_windows: np.ndarray | None
    box: dict | None
    cancer: int


def _load_npz(path: Path, patient: str) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as archive:
            if "arr_0" not in archive.files:
                raise PatientError(f"{path.name!r} has no 'arr_0' array (found {archive.files!r}); "
                                   "is it an output of the original pipeline?",
                                   patient=patient, stage="import-legacy", file=path)
            return archive["arr_0"]
    except (OSError, ValueError) as exc:
        raise PatientError(f"cannot read {path.name!r}: {exc}; re-create the file or remove it",
                           patient=patient, stage="import-legacy", file=path) from exc


def _read_box(path: Path, patient: str) -> dict | None:
    if not path.exists():
        return None
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        first = next(iter(row))  # the unnamed index column holds the patient id
        if row[first] == patient:
            try:
                return {key: int(row[key]) for key in ("by_min", "by_max", "bx_min", "bx_max")}
            except (KeyError, ValueError) as exc:
                raise PatientError(f"box CSV {path.name!r} needs integer columns by_min, by_max, "
                                   f"bx_min, bx_max ({exc!r})", patient=patient,
                                   stage="import-legacy", file=path) from exc
    raise PatientError(f"box CSV {path.name!r} has no row for this patient",
                       patient=patient, stage="import-legacy", file=path)


def read_legacy_labels(path) -> dict[str, int]:
    """``{patient: cancer}`` from a labels CSV with columns ``id,cancer``."""
    path = Path(path)
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"id", "cancer"} <= set(reader.fieldnames):
            raise ValueError(f"labels CSV {str(path)!r} must have columns 'id' and 'cancer', "
                             f"got {reader.fieldnames!r}")
        return {row["id"]: int(row["cancer"]) for row in reader}


def read_legacy_patient(input_dir, patient: str, *, stage: str = "stage1",
                        labels: dict[str, int] | None = None) -> LegacyPatient:
    """Read one patient's arrays from the original layout.

    Parameters
    ----------
    input_dir : path
        Folder holding ``stage1_2x2x2/``, ``stage1_segmented_2x2x2/``, ...
        and ``stage1_labels.csv``.
    patient : str
        Patient id (the ``.npz`` stem).
    stage : str, optional
        Folder prefix, ``"stage1"`` or ``"stage2"``.
    labels : dict, optional
        Already read labels (see :func:`read_legacy_labels`); default: read
        ``{stage}_labels.csv`` if present (absent: every label is -777).

    Raises
    ------
    PatientError
        When none of the patient's files exists, or a file cannot be read.
    """
    root = Path(input_dir)
    folders = {key: root / name.format(stage=stage) for key, name in LEGACY_FOLDERS.items()}
    arrays = {key: _load_npz(folder / f"{patient}.npz", patient) for key, folder in folders.items()}
    if all(value is None for value in arrays.values()):
        raise PatientError(f"no {patient}.npz in any of {sorted(LEGACY_FOLDERS)!r} folders under "
                           f"{str(root)!r}; check the patient id and the input folder",
                           patient=patient, stage="import-legacy", file=root)
    box = _read_box(folders["prob_windows"] / f"{patient}.csv", patient)
    if arrays["prob_windows"] is not None and box is None:
        raise PatientError("probability maps without their box CSV; the crop of the maps "
                           "is unknown", patient=patient, stage="import-legacy",
                           file=folders["prob_windows"] / f"{patient}.csv")
    if labels is None:
        labels_csv = root / f"{stage}_labels.csv"
        labels = read_legacy_labels(labels_csv) if labels_csv.exists() else {}
    return LegacyPatient(patient=patient, hu=arrays["hu"], segmented=arrays["segmented"],
                         segmented_crop=arrays["segmented_crop"],
                         prob_windows=arrays["prob_windows"], box=box,
                         cancer=int(labels.get(patient, UNKNOWN_LABEL)))


def list_legacy_patients(input_dir, *, stage: str = "stage1") -> list[str]:
    """Sorted ids of the patients with at least one ``.npz`` in the legacy folders."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input_dir {str(root)!r} is not a folder")
    patients = set()
    for name in LEGACY_FOLDERS.values():
        folder = root / name.format(stage=stage)
        if folder.is_dir():
            patients.update(path.stem for path in folder.glob("*.npz"))
    return sorted(patients)
