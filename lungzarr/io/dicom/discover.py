"""Finding a patient's DICOM files: below a folder (recursively) or below an object-storage prefix."""
from __future__ import annotations

import io
from pathlib import Path

from lungzarr.errors import PatientError
from lungzarr.io.dicom.headers import STAGE, read_header
from lungzarr.io.locations import describe_error, list_files, read_objects


def _is_dicom_file(path: Path, data: bytes | None = None) -> bool:
    """True when the file (or its bytes ``data``) has the DICM preamble, or parses as implicit-VR DICOM."""
    try:
        if data is not None:
            head = data[:132]
        else:
            with open(path, "rb") as fh:
                head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    # Old files without preamble: let pydicom try on the header only.
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data) if data is not None else path, stop_before_pixels=True, force=True,
                             specific_tags=["SOPClassUID", "Modality"])
    except Exception:
        return False
    return "SOPClassUID" in ds or "Modality" in ds


def find_dicom_files(folder, *, patient: str | None = None) -> tuple[list[Path], list[Path]]:
    """All DICOM files below ``folder`` (recursively) and the other files found.

    Parameters
    ----------
    folder : path
        A patient folder; nested ``study/series`` folders are searched too.
    patient : str, optional
        Patient identifier used in error messages.

    Raises
    ------
    PatientError
        If the folder does not exist, is empty or holds no DICOM file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise PatientError(f"folder does not exist: {str(folder)!r}; check the INPUT path",
                           patient=patient, stage=STAGE, file=folder)
    if not folder.is_dir():
        raise PatientError(f"{str(folder)!r} is a file, not a patient folder; pass the folder that holds the "
                           f"patient's DICOM files", patient=patient, stage=STAGE, file=folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise PatientError("the patient folder is empty; put the series' .dcm files in it or remove the folder",
                           patient=patient, stage=STAGE, file=folder)
    dicom, other = [], []
    for p in files:
        (dicom if _is_dicom_file(p) else other).append(p)
    if not dicom:
        raise PatientError(f"no DICOM file among the {len(files)} file(s) in the folder (e.g. {files[0].name!r}); "
                           f"put the series' DICOM files in it", patient=patient, stage=STAGE, file=folder)
    return dicom, other


def _find_remote_dicom(folder: str, patient):
    """The DICOM objects below a prefix, the other objects, their listing entries and the DICOM ones' headers.

    Each object is fetched once here (in concurrent batches, see
    :func:`lungzarr.io.locations.read_objects`) to tell DICOM from other files
    and to read its header from the same bytes, which are dropped at once (a
    batch in memory at a time). An object that cannot be fetched, or whose
    header is damaged, has its PatientError in place of a header, so it is
    reported like an unreadable local file (its URL named). Nothing is
    written to disk.
    """
    try:
        infos = list_files(folder)
    except FileNotFoundError:
        infos = {}
    except Exception as exc:
        raise PatientError(f"cannot list the patient folder ({describe_error(exc)}); check the URL and the "
                           f"credentials in the environment", patient=patient, stage=STAGE, file=folder) from exc
    urls = [u for u in infos if not any(part.startswith(".") for part in u[len(folder) + 1:].split("/"))]
    if not urls:
        raise PatientError("the patient folder is empty; put the series' .dcm files in it or remove the folder",
                           patient=patient, stage=STAGE, file=folder)
    dicom, other, parsed = [], [], {}
    for url, data in read_objects(urls):
        if isinstance(data, BaseException):
            dicom.append(url)
            parsed[url] = PatientError(f"cannot read the object ({describe_error(data)}); check that it exists "
                                       f"and that the credentials in the environment may read it",
                                       patient=patient, stage=STAGE, file=url)
        elif _is_dicom_file(url, data):
            dicom.append(url)
            try:
                parsed[url] = read_header(url, patient=patient, data=data)
            except PatientError as exc:
                parsed[url] = exc
        else:
            other.append(url)
    if not dicom:
        raise PatientError(f"no DICOM file among the {len(urls)} file(s) in the folder (e.g. {_name(urls[0])!r}); "
                           f"put the series' DICOM files in it", patient=patient, stage=STAGE, file=folder)
    return dicom, other, infos, parsed


def _name(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]
