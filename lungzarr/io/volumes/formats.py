"""Which files are volume files (:data:`VOLUME_SUFFIXES`), which library reads each format, and the refusal
every volume reader builds."""
from __future__ import annotations

from pathlib import Path

from lungzarr.errors import PatientError
from lungzarr.io import geometry
from lungzarr.volume import strip_suffix


STAGE = "ingest"

#: File name endings read as one patient's volume (longest first: ``.nii.gz`` before ``.gz``).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha")

#: Data files a ``.mhd`` header names (``<stem>.raw`` in LUNA16): part of that patient, not loose files.
METAIMAGE_DATA_SUFFIXES = (".raw", ".zraw")

#: The geometry rule (:mod:`lungzarr.io.geometry`, the same for DICOM): every voxel centre within this many
#: voxels (of each axis' spacing) of where the affine puts it; float32 NIfTI affines carry ~1e-7 of rounding.
OBLIQUE_TOLERANCE_VOXELS = geometry.TOLERANCE_VOXELS

#: What to do with a volume whose values are not HU.
_WRITE_IN_HU = ("write the volume in HU (HU = RescaleSlope x stored + RescaleIntercept, e.g. convert with dcm2niix "
                "or SimpleITK's DICOM reader, which apply it)")

_FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".mhd": "metaimage", ".mha": "metaimage"}

_PACKAGES = {"metaimage": ("SimpleITK", "`pip install SimpleITK` (or `pip install 'lungzarr[volumes]'`)"),
             "nifti": ("nibabel", "`pip install nibabel`")}


def volume_stem(name: str) -> str | None:
    """The patient id of a volume file name (``P1.nii.gz`` -> ``P1``), or None when it is no volume file."""
    return strip_suffix(name, VOLUME_SUFFIXES)


def is_volume_file(path) -> bool:
    """True for an existing regular file whose name ends in one of :data:`VOLUME_SUFFIXES`."""
    path = Path(path)
    return volume_stem(path.name) is not None and path.is_file()


def _format(path) -> str:
    lower = str(path).rstrip("/").rsplit("/", 1)[-1].lower()
    return next(fmt for suffix, fmt in _FORMATS.items() if lower.endswith(suffix))


def missing_reader(path) -> str | None:
    """What to install to read the volume file ``path``, or None when its library is importable."""
    import importlib.util

    module, install = _PACKAGES[_format(path)]
    return install if importlib.util.find_spec(module) is None else None


def _error(reason, patient, path):
    return PatientError(reason, patient=patient, stage=STAGE, file=str(path))
