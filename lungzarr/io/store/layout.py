"""The store's layout: the names of its groups and attributes, and the small helpers every part uses.

The layout itself (which group holds what) is described in :mod:`lungzarr.io.store`.
"""
from __future__ import annotations

import datetime as _dt
import re

import numpy as np

from lungzarr.errors import PatientError
from lungzarr.volume import Grid

STAGES_KEY = "lungzarr:stages"
FAILURES_KEY = "lungzarr:failures"
WARNINGS_KEY = "lungzarr:warnings"
DAMAGE_KEY = "lungzarr:damage"
PATIENTS_GROUP = "patients"
TABLES_GROUP = "tables"
STAGING_GROUP = "staging"
#: One small document per patient with failures, damage or warnings (:mod:`lungzarr.io.store.records`).
RECORDS_GROUP = "records"
TABLE_POINTER_KEY = "lungzarr:tables"
CONSOLIDATED_KEY = "consolidated_metadata"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_patient_id(patient: str) -> str:
    """Return ``patient`` if it can name a store group, else raise PatientError."""
    if not isinstance(patient, str) or not _ID_PATTERN.match(patient) or patient.startswith("__"):
        raise PatientError(f"patient id {patient!r} cannot name a store group: use letters, digits, '.', '_' "
                           f"and '-' only, starting with a letter or digit (rename the folder)",
                           patient=str(patient))
    if patient.lower() == "zarr.json":  # a group's own metadata file in the store's folder of patients
        raise PatientError(f"patient id {patient!r} is the name of Zarr's metadata file and cannot name a "
                           f"store group: rename the folder (e.g. to the patient's id)", patient=patient)
    return patient


def _jsonable(value):
    """Attrs must be JSON: numpy scalars and tuples become plain Python."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _check_stage_name(stage) -> None:
    # The stage list lives in the pipeline's registry; the store keeps a marker for any named stage.
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"stage must be a non-empty string, got {stage!r}")


def grid_from_attrs(attrs: dict, key: str = "grid_2mm") -> Grid:
    """The :class:`~lungzarr.volume.Grid` a patient group recorded under ``key`` (``grid_2mm``, ``grid_native``)."""
    g = attrs[key]
    return Grid(tuple(g["shape"]), tuple(g["origin_mm"]), tuple(g["step_mm"]))
