"""Exceptions lungzarr raises for bad input.

Every error carries what a person needs to act on it: the patient, the stage,
the offending file and what to do about it. The pipeline records them in the
store's failures table and goes on with the next patient.
"""
from __future__ import annotations

__all__ = ["LungzarrError", "PatientError", "RunConfigError", "StoreLockedError"]


class LungzarrError(Exception):
    """Base class of every error lungzarr raises on purpose."""


class PatientError(LungzarrError):
    """One patient cannot go through a stage.

    Parameters
    ----------
    reason : str
        What is wrong and how to fix it, in one or two sentences.
    patient : str, optional
        Patient identifier (folder name).
    stage : str, optional
        Pipeline stage, e.g. ``"ingest"``.
    file : str, optional
        The file (or folder) that caused the error.
    """

    def __init__(self, reason: str, *, patient: str | None = None,
                 stage: str | None = None, file: str | None = None):
        self.reason = reason
        self.patient = patient
        self.stage = stage
        self.file = None if file is None else str(file)
        super().__init__(reason)

    def __reduce__(self):
        # Errors raised on dask workers travel back pickled: keep every field.
        return (_rebuild_patient_error, (self.reason, self.patient, self.stage, self.file))

    def __str__(self) -> str:
        where = []
        if self.patient is not None:
            where.append(f"patient {self.patient!r}")
        if self.stage is not None:
            where.append(f"stage {self.stage!r}")
        if self.file is not None:
            where.append(f"file {self.file!r}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return prefix + self.reason

    def as_record(self) -> dict:
        """The error as a row of the failures table."""
        return {"patient": self.patient, "stage": self.stage,
                "file": self.file, "reason": self.reason}


class RunConfigError(LungzarrError):
    """A run-level setting is wrong (store, weights, precision, scheduler).

    Raised once, before any patient is read: the run stops with one message
    (the CLI exits with code 2) instead of failing every patient alike.
    """


class StoreLockedError(LungzarrError):
    """Another lungzarr process is writing to the same store."""


def _rebuild_patient_error(reason, patient, stage, file):
    return PatientError(reason, patient=patient, stage=stage, file=file)
