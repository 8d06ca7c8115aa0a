"""What an INPUT folder holds: the patients, and every other entry with why it is not used.

Nothing in INPUT is dropped silently. A patient is a sub-folder of INPUT (a
DICOM folder), a volume file in INPUT (``<id>.mhd`` with its ``<id>.raw``,
``<id>.mha``, ``<id>.nii``, ``<id>.nii.gz``; the id is the file stem), or INPUT
itself, when it holds (DICOM) files directly and no sub-folder or volume
file. One INPUT may mix them. Every other
entry is reported: an archive (``P1.zip``) is a failure of the patient it
would be (``P1``), since its scan is missing from the run; a hidden folder, a
loose file or anything else is a warning. The pipeline records both in the
store, so ``lungzarr status`` shows them.

INPUT may also be an object-storage prefix (``s3://bucket/cohort/``, any
fsspec URL): the same rules on its listing (objects and the prefixes below
it; there are no links). The patients' paths are then
:class:`lungzarr.io.locations.ObjectPath` objects; the workers read them by URL.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from lungzarr.errors import LungzarrError, PatientError, RunConfigError
from lungzarr.io.locations import as_location, check_no_credentials, describe_error, is_url, parent_of
from lungzarr.io.volumes import METAIMAGE_DATA_SUFFIXES, metaimage_data_files, missing_reader, volume_stem
from lungzarr.volume import strip_suffix

__all__ = ["InputEntry", "InputScan", "scan_input", "find_patients", "record_input", "ARCHIVE_SUFFIXES",
           "INPUT_STAGE"]

#: File name endings read as archives (longest first, so ``.tar.gz`` wins over ``.gz``).
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tgz", ".tbz2", ".txz", ".zip", ".tar",
                    ".7z", ".rar", ".gz", ".bz2", ".xz", ".zst")
#: The stage name under which INPUT entries that are not used are recorded as warnings.
INPUT_STAGE = "input"

_HIDDEN_FOLDER = "hidden folder: not read; rename it without the leading '.' to include it"
_HIDDEN_FILE = "hidden file: not read (patients are the sub-folders of INPUT)"
_OWN_STORE = ("the STORE of this run (or its lock file), inside INPUT: not read as a patient (a STORE beside "
              "INPUT keeps the two apart)")


@dataclass(frozen=True)
class InputEntry:
    """An entry of INPUT that is not used as a patient folder.

    Attributes
    ----------
    name : str
        The entry's name in INPUT.
    path : pathlib.Path
    reason : str
        Why it is not used and what to do to include it.
    """

    name: str
    path: Path
    reason: str

    def as_record(self) -> dict:
        """The entry as a warning record (``file``, ``reason``)."""
        return {"file": str(self.path), "reason": self.reason}


@dataclass
class InputScan:
    """The result of :func:`scan_input`.

    Attributes
    ----------
    patients : list of (patient_id, path)
        The patients, sorted by id: DICOM folders and volume files (what
        :func:`lungzarr.pipeline.find_patients` returns).
    archives : list of PatientError
        One per archive that stands where a patient folder should be: the
        patient is the archive's stem, the file the archive.
    ignored : list of InputEntry
        Every other entry not used (hidden folders, loose files, archives
        beside the folder they would unpack to).
    """

    input_dir: Path
    patients: list[tuple[str, Path]] = field(default_factory=list)
    archives: list[PatientError] = field(default_factory=list)
    ignored: list[InputEntry] = field(default_factory=list)


def archive_stem(name: str) -> str | None:
    """The name without its archive ending (``P1.tar.gz`` -> ``P1``), or None when it is no archive."""
    return strip_suffix(name, ARCHIVE_SUFFIXES)


def _is_patient_dir(p: Path) -> bool:
    # A dangling link to a patient folder is kept, so it is recorded as a failure, not lost.
    return p.is_dir() or (p.is_symlink() and not p.exists() and volume_stem(p.name) is None)


def _is_volume_file(p: Path) -> bool:
    # A dangling link named like a volume file is that patient (its failure says the file is missing).
    return volume_stem(p.name) is not None and not p.is_dir() and (p.is_file() or p.is_symlink())


def _archive_error(p: Path, stem: str, input_dir: Path) -> PatientError:
    verb = "unzip" if p.name.lower().endswith(".zip") else "unpack"
    return PatientError(f"{p.name!r} is an archive: lungzarr does not read archives; {verb} it into "
                        f"{str(input_dir / stem)}/ and run again", patient=stem, stage="ingest", file=str(p))


def _loose_file_reason(p: Path) -> str:
    if p.suffix.lower() in METAIMAGE_DATA_SUFFIXES:
        return ("a MetaImage data file that no .mhd header in INPUT names: not read; put its .mhd beside it "
                "(patients are the sub-folders and volume files of INPUT)")
    if p.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return ("a file directly in INPUT, beside the patient folders: not read; move it into its patient's "
                "folder")
    return ("a file, not a patient folder or volume file: not read (patients are the sub-folders of INPUT and its "
            ".mhd/.mha/.nii/.nii.gz files)")


def scan_input(input_dir, *, patients: Iterable[str] | None = None, store=None) -> InputScan:
    """Sort the entries of an INPUT folder into patients, archives and entries not used.

    Every volume file (``.mhd``, ``.mha``, ``.nii``, ``.nii.gz``) is a patient
    whose id is the file stem (LUNA16's ``<seriesuid>.mhd`` is patient
    ``<seriesuid>``); the ``.raw`` a ``.mhd`` names belongs to it. A second
    scan of one id (``P1/`` and ``P1.nii.gz``, or ``P1.mhd`` and
    ``P1.nii.gz``) is listed as not used: the folder, else the first file
    in name order, is read. Every sub-folder of ``input_dir`` is a patient (the old
    ``input/stage1/<patient>/`` layout; nested ``study/series`` folders below
    it are searched when the patient is read), except hidden ones (name
    starting with ``'.'``), which are listed as not used. A folder that holds
    files directly and no (visible) sub-folder is one patient itself. An
    archive (``.zip``, ``.tar``, ``.tgz`` ...) is never read: it is the
    failure of the patient named by its stem, unless that patient's folder is
    there too (then the archive is only listed as not used).

    Parameters
    ----------
    input_dir : path
    patients : iterable of str, optional
        Keep only these identifiers (archives count as the patient they
        would be); an unknown one is an error.
    store : path or str, optional
        The run's STORE: when it (or its ``NAME.lock``) lies in INPUT, it is
        listed as not used instead of being read as a patient.

    Returns
    -------
    InputScan
        A local INPUT's paths are absolute, so that the paths recorded in the
        store are found from any working directory.

    Raises
    ------
    LungzarrError
        When ``input_dir`` does not exist, is a file, holds no patient or
        ``patients`` names one it does not hold; a RunConfigError when a
        chosen volume file needs a library that is not installed, or when a
        URL carries credentials (it is not echoed).
    """
    if is_url(input_dir):
        check_no_credentials(str(input_dir), what="INPUT")  # never echoed: the URL holds a secret
        return _scan_url(as_location(input_dir), patients, store)
    # Absolute: the paths recorded in the store (each slice's ``dicom_file``, a failure's file) are found again
    # from any working directory (``export --format dicom-seg``).
    return _scan(Path(os.path.abspath(as_location(input_dir))), patients, store)


def _scan_url(input_dir, patients, store) -> InputScan:
    """:func:`scan_input` of a prefix: a listing that fails is one run-level error naming the URL."""
    try:
        return _scan(input_dir, patients, store)
    except LungzarrError:
        raise
    except Exception as exc:  # botocore/fsspec raise many kinds: no credentials, access denied, no bucket
        raise LungzarrError(f"cannot list INPUT {str(input_dir)!r} ({describe_error(exc)}); check the URL and "
                            f"the credentials and endpoint in the environment (e.g. AWS_ACCESS_KEY_ID, "
                            f"AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for s3://)") from None


def _is_store(entry, store) -> bool:
    """Whether an INPUT entry is the run's STORE or its ``NAME.lock`` (every spelling: links, ``..``)."""
    if store is None:
        return False
    if is_url(entry) or is_url(store):
        name = str(store).rstrip("/")
        return str(entry).rstrip("/") in (name, name + ".lock")
    real, own = os.path.realpath(str(entry)), os.path.realpath(str(store))
    return real in (own, own + ".lock")


def _scan(input_dir, patients, store=None) -> InputScan:
    if not input_dir.exists():
        raise LungzarrError(f"INPUT folder {str(input_dir)!r} does not exist; pass the folder that holds one "
                            f"sub-folder per patient")
    if not input_dir.is_dir():
        raise LungzarrError(f"INPUT {str(input_dir)!r} is a file; pass the folder that holds one sub-folder "
                            f"per patient")
    entries = sorted(input_dir.iterdir())
    # The run's own STORE (and its lock file) inside INPUT is no patient: skipped, and said once.
    own = [p for p in entries if _is_store(p, store)]
    entries = [p for p in entries if p not in own]
    if not entries:
        what = "holds only the STORE of this run" if own else "is empty"
        raise LungzarrError(f"INPUT folder {str(input_dir)!r} {what}; put one folder of DICOM files per "
                            f"patient in it")
    scan = InputScan(input_dir)
    scan.ignored = [InputEntry(p.name, p, _OWN_STORE) for p in own]
    hidden = [p for p in entries if p.name.startswith(".")]
    visible = [p for p in entries if not p.name.startswith(".")]
    subdirs = [p for p in visible if _is_patient_dir(p)]
    volumes = [p for p in visible if _is_volume_file(p)]
    data_files = {d.name for p in volumes for d in metaimage_data_files(p)}
    archives = [(p, archive_stem(p.name)) for p in visible
                if p.is_file() and not _is_volume_file(p) and archive_stem(p.name)]
    loose = [p for p in visible if p.is_file() and not _is_volume_file(p) and not archive_stem(p.name)
             and p.name not in data_files]
    if not subdirs and not volumes and loose:
        # The folder of one patient's files: everything in it belongs to that patient (the DICOM reader
        # decides about each file), so nothing here is listed.
        scan.patients = [(input_dir.name, input_dir)]
    else:
        scan.patients = [(p.name, p) for p in subdirs]
        folders = {p.name for p in subdirs}
        for p in volumes:
            stem = volume_stem(p.name)
            if stem in folders:
                scan.ignored.append(InputEntry(p.name, p, f"a second scan of patient {stem!r}, whose folder "
                                                          f"{str(input_dir / stem)!r} is used: not read; rename "
                                                          f"it to read it as another patient"))
            elif any(pid == stem for pid, _ in scan.patients):
                used = next(q for pid, q in scan.patients if pid == stem)
                scan.ignored.append(InputEntry(p.name, p, f"a second scan of patient {stem!r} ({used.name!r} "
                                                          f"is used): not read; rename it to read it as "
                                                          f"another patient"))
            else:
                scan.patients.append((stem, p))
        scan.patients.sort(key=lambda item: item[0])
        used_for = dict(scan.patients)
        for p, stem in archives:
            if stem in used_for:
                what = "patient folder" if stem in folders else "volume file of the patient"
                scan.ignored.append(InputEntry(p.name, p, f"archive beside the {what} "
                                                          f"{str(used_for[stem])!r}, which is used: not read"))
            elif any(err.patient == stem for err in scan.archives):
                scan.ignored.append(InputEntry(p.name, p, f"a second archive of patient {stem!r}: not read"))
            else:
                scan.archives.append(_archive_error(p, stem, input_dir))
        for p in loose:
            scan.ignored.append(InputEntry(p.name, p, _loose_file_reason(p)))
        for p in hidden:
            scan.ignored.append(InputEntry(p.name, p, _HIDDEN_FOLDER if p.is_dir() else _HIDDEN_FILE))
        for p in visible:
            if not (_is_patient_dir(p) or p.is_file()):
                scan.ignored.append(InputEntry(p.name, p, "neither a folder nor a regular file: not read"))
        scan.ignored.sort(key=lambda e: e.name)
        if not scan.patients and not scan.archives:
            listed = ", ".join(repr(e.name) for e in scan.ignored[:5])
            raise LungzarrError(f"INPUT folder {str(input_dir)!r} holds no patient folder, only entries that are "
                                f"not read ({listed}); put one folder of DICOM files (or one "
                                f".mhd/.nii.gz file) per patient in it")
    if patients is not None:
        wanted = list(patients)
        known = {pid for pid, _ in scan.patients} | {err.patient for err in scan.archives}
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise LungzarrError(f"--patients {unknown!r} not found in {str(input_dir)!r} "
                                f"(it has {len(known)} patient folder(s), e.g. {sorted(known)[:3]!r})")
        keep = set(wanted)
        scan.patients = [(pid, folder) for pid, folder in scan.patients if pid in keep]
        scan.archives = [err for err in scan.archives if err.patient in keep]
    _check_readers(scan)
    return scan


def _check_readers(scan: InputScan) -> None:
    """Stop the run once when a volume file's reading library is missing (it would fail every such patient)."""
    for pid, path in scan.patients:
        if volume_stem(path.name) is not None and not path.is_dir():
            need = missing_reader(path)
            if need is not None:
                raise RunConfigError(f"INPUT holds volume files such as {str(path)!r} (patient {pid!r}) and "
                                     f"the library that reads them is not installed: run {need}")


def find_patients(input_dir, *, patients: Iterable[str] | None = None) -> list[tuple[str, Path]]:
    """Patient folders of an INPUT folder: ``[(patient_id, folder), ...]``.

    The ``patients`` of :func:`scan_input`, which also returns the entries not
    used (archives, hidden folders, loose files).

    Parameters
    ----------
    input_dir : path
    patients : iterable of str, optional
        Keep only these identifiers; an unknown one is an error.
    """
    return scan_input(input_dir, patients=patients).patients


def record_input(store, scan: InputScan, *, stage: str) -> list[dict]:
    """Record what INPUT holds besides patient folders; return the archives' failure records (of ``stage``).

    Warnings (stage :data:`INPUT_STAGE`) of entries of this INPUT folder that are gone are cleared.
    """
    current = {entry.name: entry for entry in scan.ignored}
    folder = str(scan.input_dir) if is_url(scan.input_dir) else os.path.abspath(scan.input_dir)
    for old in store.warnings():
        if old.get("stage") == INPUT_STAGE and old.get("patient") not in current \
                and parent_of(old.get("file") or "") == folder:
            store.record_warnings(old["patient"], INPUT_STAGE, [])
    for name, entry in current.items():
        store.record_warnings(name, INPUT_STAGE, [entry.as_record()])
    failed = []
    for err in scan.archives:
        store.record_failure(err, stage=stage)
        failed.append(err.as_record())
    return failed
