"""Low-level volume and chunk helpers shared by every stage.

Nothing here reads file contents (only `files_token` stats files) or touches Zarr; everything is plain numpy / dask
arithmetic on arrays and grids, so any module may import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Grid",
    "ScanSeries",
    "resampled_shape",
    "resample_grid",
    "rescale_n",
    "normalize_hu",
    "z_chunks",
    "files_token",
    "object_version",
    "is_url",
    "strip_suffix",
    "TARGET_SPACING_MM",
]

#: The isotropic spacing the DSB2017 pipeline resamples to.
TARGET_SPACING_MM = 2.0


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid in patient millimetre coordinates.

    Parameters
    ----------
    shape : tuple of int
        Number of voxels along (z, y, x).
    origin : tuple of float
        Patient coordinate (mm) of voxel (0, 0, 0) along (z, y, x).
    step : tuple of float
        Signed distance (mm) between neighbouring voxel centres along (z, y, x).
    """

    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    step: tuple[float, float, float]
    _coords: dict = field(default=None, repr=False, compare=False)

    def axis(self, i: int) -> np.ndarray:
        """Voxel-centre coordinates (mm) along axis ``i`` (0 = z, 1 = y, 2 = x)."""
        return self.origin[i] + np.arange(self.shape[i], dtype=np.float64) * self.step[i]

    def to_mm(self, index) -> np.ndarray:
        """Patient coordinates (mm) of fractional voxel indices ``(..., 3)``."""
        index = np.asarray(index, dtype=np.float64)
        return np.asarray(self.origin) + index * np.asarray(self.step)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Unsigned voxel size (mm) along (z, y, x)."""
        return tuple(abs(s) for s in self.step)


def resampled_shape(shape, spacing, target: float = TARGET_SPACING_MM) -> tuple[int, ...]:
    """Shape of a volume resampled to ``target`` mm, as the original computed it.

    ``new_shape = round(shape * spacing / target)`` with numpy's half-to-even
    rounding (10 slices of 2.5 mm give 12, 12 slices of 1.25 mm give 8).

    Parameters
    ----------
    shape : sequence of int
        Native shape (z, y, x).
    spacing : sequence of float
        Native voxel size (mm) along (z, y, x).
    target : float, optional
        Target voxel size in mm.
    """
    shape = np.asarray(shape, dtype=np.float64)
    spacing = np.abs(np.asarray(spacing, dtype=np.float64))
    if shape.shape != spacing.shape:
        raise ValueError(f"shape {tuple(shape)!r} and spacing {tuple(spacing)!r} differ in length")
    if np.any(spacing <= 0):
        raise ValueError(f"spacing must be positive, got {tuple(spacing)!r}")
    new_shape = np.round(shape * (spacing / target))
    return tuple(int(n) for n in new_shape)


def resample_grid(grid: Grid, new_shape) -> Grid:
    """The grid that ``scipy.ndimage.zoom`` puts ``grid`` on at ``new_shape``.

    zoom is corner-aligned: output voxel ``k`` sits at input position
    ``k * (n_in - 1) / (n_out - 1)``, so the true step is that factor times the
    native step, not exactly the target spacing (docs/algorithms.md §2).
    """
    steps = []
    for n_in, n_out, step in zip(grid.shape, new_shape, grid.step):
        factor = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        steps.append(step * factor)
    return Grid(tuple(int(n) for n in new_shape), tuple(grid.origin), tuple(steps))


def rescale_n(n: float, factor: float) -> int:
    """``max(1, round(n / factor))``: iteration counts scaled to the image size."""
    return max(1, int(round(n / factor)))


def normalize_hu(hu) -> np.ndarray:
    """Normalise HU for the d8 network: ``clip((HU + 1000) / 1400, 0, 1) - 0.028``.

    Computed in float64 and returned as float32, as the original did (§5).
    """
    x = (np.asarray(hu, dtype=np.float64) + 1000.0) / 1400.0
    x = np.clip(x, 0.0, 1.0) - 0.028
    return x.astype(np.float32)


def z_chunks(n: int, size: int) -> tuple[int, ...]:
    """Chunk sizes splitting ``n`` slices into blocks of at most ``size``."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size!r}")
    if n <= 0:
        return (0,)
    full, rest = divmod(n, size)
    return (size,) * full + ((rest,) if rest else ())


@runtime_checkable
class ScanSeries(Protocol):
    """What the ingest stage reads from one patient's scan, whatever its format.

    :class:`lungzarr.io.dicom.Series` (a DICOM folder) and
    :class:`lungzarr.io.volumes.VolumeSeries` (a MetaImage or NIfTI file)
    satisfy it. ``grid`` is in patient LPS mm, (z, y, x), z ascending;
    ``to_hu`` is a lazy int16 dask array whose task names derive from the
    patient, the resolved files (path, size, mtime) and ``store``;
    ``sop_instance_uids`` is None where the format keeps none.
    """

    patient: str
    grid: Grid

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def source(self) -> str: ...

    @property
    def z_positions(self) -> np.ndarray: ...

    @property
    def sop_instance_uids(self) -> list[str] | None: ...

    def provenance(self) -> dict: ...

    def warning_records(self) -> list[dict]: ...

    def to_hu(self, *, chunk_slices: int = 16, store=None): ...


def files_token(paths, *, infos=None) -> list[tuple]:
    """``(resolved path, st_size, st_mtime_ns)`` of each file: what a task key must depend on.

    A header value (SeriesInstanceUID, SOPInstanceUID) is not enough: two folders
    can hold copies of one series, one of them damaged, and dask merges equal keys
    silently, so one patient would be stored with the other's pixels.

    An object-storage URL (``s3://...``, any fsspec URL) gives ``(url, size,
    version)``, the object analogue: ``version`` holds what the store says
    changes when the object is rewritten (ETag and LastModified on S3;
    generation/md5 on GCS; etag/last_modified on Azure; mtime elsewhere).
    ``infos`` maps a URL to the listing entry that found it (so a folder of
    objects costs one listing, not a request per object); a URL without one
    is asked for its metadata.
    """
    from pathlib import Path

    out = []
    for path in paths:
        text = str(path)
        if is_url(text):
            info = (infos or {}).get(text)
            if info is None:
                import fsspec.core

                fs, key = fsspec.core.url_to_fs(text)
                info = fs.info(key)
            out.append((text, int(info.get("size") or info.get("Size") or 0), object_version(info)))
            continue
        resolved = Path(path).resolve()
        st = resolved.stat()
        out.append((str(resolved), int(st.st_size), int(st.st_mtime_ns)))
    return out


#: Listing fields that change when an object is rewritten, by fsspec backend (S3, GCS, Azure, local/other).
_VERSION_FIELDS = ("ETag", "LastModified", "VersionId", "generation", "md5Hash", "updated", "etag",
                   "last_modified", "version_id", "mtime", "created")


def object_version(info: dict) -> tuple:
    """``((field, value), ...)`` of the fields of an object's listing entry that change when it is rewritten."""
    return tuple((k, str(info[k])) for k in _VERSION_FIELDS if info.get(k) not in (None, ""))


def is_url(text) -> bool:
    """True for ``scheme://...`` (an fsspec URL) other than ``file://`` (a local path)."""
    import re

    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", str(text))
    return bool(m) and m.group(1).lower() not in ("file", "local")


def strip_suffix(name: str, suffixes) -> str | None:
    """``name`` without the first of ``suffixes`` it ends with (case-insensitive), or None.

    ``suffixes`` longest first where one ends another (``.nii.gz`` before ``.gz``); a name that is only
    the suffix gives None.
    """
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return None
