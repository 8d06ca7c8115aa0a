"""What an INPUT folder holds: one entry per patient."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from lungzarr.errors import LungzarrError

__all__ = ["find_patients"]


def find_patients(input_dir, *, patients: Iterable[str] | None = None) -> list[tuple[str, Path]]:
    """Patient folders of an INPUT folder: ``[(patient_id, folder), ...]``.

    Every sub-folder of ``input_dir`` is a patient (the old ``input/stage1/<patient>/``
    layout; nested ``study/series`` folders below it are searched when the
    patient is read). A folder that holds DICOM files directly and no
    sub-folder is one patient itself.

    Parameters
    ----------
    input_dir : path
    patients : iterable of str, optional
        Keep only these identifiers; an unknown one is an error.
    """
    input_dir = Path(input_dir)
    if not input_dir.exists():
        raise LungzarrError(f"INPUT folder {str(input_dir)!r} does not exist; pass the folder that holds one "
                            f"sub-folder per patient")
    if not input_dir.is_dir():
        raise LungzarrError(f"INPUT {str(input_dir)!r} is a file; pass the folder that holds one sub-folder "
                            f"per patient")
    # A dangling link to a patient folder is kept, so it is recorded as a failure, not lost.
    subdirs = sorted(p for p in input_dir.iterdir()
                     if (p.is_dir() or (p.is_symlink() and not p.exists())) and not p.name.startswith("."))
    if subdirs:
        found = [(p.name, p) for p in subdirs]
    elif any(p.is_file() for p in input_dir.iterdir()):
        found = [(input_dir.name, input_dir)]
    else:
        raise LungzarrError(f"INPUT folder {str(input_dir)!r} is empty; put one folder of DICOM files per "
                            f"patient in it")
    if patients is not None:
        wanted = list(patients)
        known = {pid for pid, _ in found}
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise LungzarrError(f"--patients {unknown!r} not found in {str(input_dir)!r} "
                                f"(it has {len(known)} patient folder(s), e.g. {sorted(known)[:3]!r})")
        found = [(pid, folder) for pid, folder in found if pid in set(wanted)]
    return found
