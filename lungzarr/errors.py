"""Exceptions lungzarr raises for bad input.

Every error carries what a person needs to act on it: the patient, the stage,
the offending file and what to do about it. The pipeline records them in the
store's failures table and goes on with the next patient.
"""
from __future__ import annotations

import errno

__all__ = ["LungzarrError", "PatientError", "RunConfigError", "RunStopError", "StoreLockedError",
           "environment_reason", "stops_the_run"]


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


class RunStopError(LungzarrError):
    """The run cannot go on: a write failed for a reason that is the machine's, not the patient's.

    A full disk, a read-only file system, a store that stopped answering: every
    later patient would fail alike, so the run stops at the first one, with one
    message (the CLI exits with code 2). What was committed is kept, nothing is
    recorded as a patient's failure, and the same command resumes.
    """


class StoreLockedError(LungzarrError):
    """Another lungzarr process is writing to the same store."""


#: errno values after which no later write can succeed either: the run stops (:func:`stops_the_run`).
_RUN_STOPPING_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _where(exc: OSError, context: str | None) -> str:
    names = [repr(str(n)) for n in (exc.filename, exc.filename2) if n is not None]
    if names:
        return " and ".join(names)
    return f"the device ({context})" if context else "the device"


def environment_reason(exc: BaseException, *, context: str | None = None) -> str | None:
    """What the machine did wrong, in one sentence with the fix; None when ``exc`` is not the machine's.

    An :class:`OSError` with an errno (a full disk, a read-only file system, a
    permission, an input/output error...) or a :class:`MemoryError` is not a
    defect of lungzarr or of the patient's data: it gets its own message, never
    "unexpected ... please report". ``context`` says where, when the error
    names no file (``"writing store 'cohort.zarr'"``).

    Examples
    --------
    >>> environment_reason(OSError(28, "No space left on device", "/data/s.zarr"))[:46]
    "no space left on '/data/s.zarr': free space th"
    """
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return ("out of memory (MemoryError): this patient's arrays did not fit in the worker's memory; check "
                "the scan's size in its headers (a PixelSpacing or slice count far from a chest CT's), or "
                "lower --batch-size or give each worker more memory")
    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    where, code = _where(exc, context), exc.errno
    if code == errno.ENOSPC:
        return (f"no space left on {where}: free space there (or pass a STORE on a larger disk) and run the "
                f"same command again")
    if code == errno.EDQUOT:
        return f"disk quota exceeded on {where}: free space or raise the quota, and run the same command again"
    if code == errno.EROFS:
        return (f"{where} is on a read-only file system: pass a STORE on a writable disk (or remount it) and run "
                f"the same command again")
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied on {where}: give this user access there, or copy the data to a place it can use"
    if code in (errno.EMFILE, errno.ENFILE):
        return "too many open files: raise the limit (`ulimit -n 4096`) or lower --batch-size"
    if code == errno.EIO:
        return (f"input/output error on {where}: the disk or the network share failed; check it and run the same "
                f"command again")
    name = errno.errorcode.get(code, str(code))
    return f"{exc.strerror or exc} ({name}) on {where}; check that path and run the same command again"


def stops_the_run(exc: BaseException) -> bool:
    """True when no later patient could succeed after ``exc`` either (a full disk, a read-only file system)."""
    return isinstance(exc, OSError) and exc.errno in _RUN_STOPPING_ERRNOS


def _rebuild_patient_error(reason, patient, stage, file):
    return PatientError(reason, patient=patient, stage=stage, file=file)
