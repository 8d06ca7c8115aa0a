"""A checked volume file (:class:`VolumeSeries`, the interface of a DICOM Series) and its voxels read a
block of slices at a time into the store's (z, y, x) int16 HU."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungzarr.errors import PatientError
from lungzarr.io.locations import describe_error, is_url
from lungzarr.io.plausible import int16_hu
from lungzarr.io.volumes.formats import _WRITE_IN_HU, _error, volume_stem
from lungzarr.io.volumes.metaimage import _copied
from lungzarr.io.volumes.nifti import _nifti_load
from lungzarr.volume import Grid, files_token, z_chunks


@dataclass
class VolumeSeries:
    """One patient's volume file, checked and placed in the store's convention (header only).

    Satisfies the interface the ingest stage reads (that of
    :class:`lungzarr.io.dicom.Series`): ``patient``, ``source``, ``grid``,
    ``shape``, ``z_positions``, ``sop_instance_uids``, :meth:`provenance`,
    :meth:`warning_records` and :meth:`to_hu`.

    Attributes
    ----------
    patient : str
    path : str
        The volume file (the ``.mhd`` header for MetaImage).
    files : tuple of str
        Every file the pixels come from (``.mhd`` and its ``.raw``), for task names.
    format : {"metaimage", "nifti"}
    grid : Grid
        In patient LPS mm, (z, y, x), every step positive.
    axes : tuple of (int, bool)
        For the store's (z, y, x): the file axis (0 = i, fastest) it comes from and whether it is flipped.
    file_shape : tuple of int
        The file's (i, j, k) size.
    header : dict
        What the file said (direction, spacing, origin, value scaling), for :meth:`provenance`.
    """

    patient: str
    path: str
    files: tuple[str, ...]
    format: str
    grid: Grid
    axes: tuple[tuple[int, bool], ...]
    file_shape: tuple[int, ...]
    header: dict = field(default_factory=dict)
    user_warnings: list[dict] = field(default_factory=list)
    #: For objects on object storage: each file's metadata (size, ETag, LastModified) by URL, taken where
    #: the header was read (a worker), for the task names.
    file_infos: dict | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def source(self) -> str:
        """The file the patient was read from (named in errors)."""
        return self.path

    @property
    def folder(self) -> str:
        """Alias of :attr:`source` (the DICOM Series' name for it)."""
        return self.path

    @property
    def series_uid(self) -> str:
        """The file stem: LUNA16 names each ``.mhd`` by its SeriesInstanceUID, which evaluation matches."""
        return volume_stem(Path(self.path).name)

    @property
    def z_positions(self) -> np.ndarray:
        """Patient z (mm) of each slice, ascending."""
        return self.grid.axis(0)

    @property
    def sop_instance_uids(self):
        """None: a volume file keeps no per-slice SOPInstanceUID."""
        return None

    def provenance(self) -> dict:
        """JSON-serialisable attrs describing where the volume came from and how it was turned."""
        names = "ijk"
        applied = {dim: f"file axis {names[a]}{' flipped' if flip else ''}"
                   for dim, (a, flip) in zip(("z", "y", "x"), self.axes)}
        return {
            "patient": self.patient,
            "source_file": self.path,
            "source_files": list(self.files),
            "source_format": self.format,
            "series_instance_uid": self.series_uid,
            "series_number": None,
            "acquisition_number": None,
            "selection_reason": f"the volume file {Path(self.path).name!r} ({self.format}); series UID = "
                                f"file stem",
            "orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            "coordinate_system": "LPS",
            "axes_applied": applied,
            "spacing_mm": list(self.grid.spacing),
            "origin_mm": list(self.grid.origin),
            "step_mm": list(self.grid.step),
            **self.header,
            "n_files_used": len(self.files),
            "n_files_skipped": 0,
            "skipped_files": [],
            "warnings": [r["reason"] for r in self.user_warnings],
            "dropped_edge_slices": [],
        }

    def warning_records(self) -> list[dict]:
        """What a user must see in ``lungzarr status``: ``{"file", "reason"}`` dicts."""
        return [dict(r) for r in self.user_warnings]

    def to_hu(self, *, chunk_slices: int = 16, store=None):
        """The volume as a lazy int16 dask array (z, y, x) of HU, ``chunk_slices`` slices a block.

        Each block reads only its own slices when computed. The task names are
        a ``tokenize`` of the patient, every file's resolved path, size and
        mtime, the axis mapping, the chunking and ``store`` (the resolved store
        path), so two patients, a rewritten file or another store never share a
        key in one distributed session.
        """
        import dask.array as da
        from dask.base import tokenize

        nz, ny, nx = self.shape
        token = tokenize(self.patient, files_token(self.files, infos=self.file_infos), self.format, self.axes,
                         self.file_shape, chunk_slices, None if store is None else str(store))
        # A MetaImage object is read by SimpleITK from a local copy (it reads paths only): one task copies
        # the files once and reads the whole volume, instead of every block copying the whole file again.
        whole = is_url(self.path) and self.format == "metaimage"
        hu = da.map_blocks(
            _read_block,
            chunks=((nz,) if whole else z_chunks(nz, chunk_slices), (ny,), (nx,)),
            dtype=np.int16,
            meta=np.empty((0, 0, 0), dtype=np.int16),
            name=f"read-{self.format}-{token}",
            path=self.path,
            fmt=self.format,
            axes=self.axes,
            file_shape=self.file_shape,
            patient=self.patient,
            files=self.files,
        )
        return hu.rechunk((z_chunks(nz, chunk_slices), (ny,), (nx,))) if whole else hu


def _file_region(path, fmt, start, size):
    """The file's voxels ``start[a] : start[a] + size[a]`` along file axes (i, j, k), as an (i, j, k) array."""
    if fmt == "metaimage":
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        # ITK streams uncompressed MetaImage: only this region's bytes are read.
        reader.SetExtractIndex([int(s) for s in start])
        reader.SetExtractSize([int(s) for s in size])
        return sitk.GetArrayFromImage(reader.Execute()).transpose(2, 1, 0)
    # Slicing the proxy reads only the region's bytes: seek + read in a .nii (byte-range requests for an
    # object); a .nii.gz is decompressed from its start up to the region (gzip cannot seek), never as a whole.
    proxy = _nifti_load(path).dataobj
    index = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, size))
    if len(proxy.shape) == 4:
        index = index + (0,)
    return np.asarray(proxy[index])


def _to_int16(values, patient, path) -> np.ndarray:
    return int16_hu(values, patient=patient, file=str(path), fix=_WRITE_IN_HU)


def _read_slices(path, fmt, axes, file_shape, z0, z1, patient, *, local=None) -> np.ndarray:
    """Store slices ``z0:z1`` (z, y, x) as int16 HU; read from ``local`` (a local copy of ``path``) when given."""
    (az, fz), (ay, fy), (ax, fx) = axes
    nz = file_shape[az]
    start, size = [0, 0, 0], list(file_shape)
    # A flipped z axis: store slice z is file slice nz - 1 - z.
    start[az], size[az] = ((nz - z1) if fz else z0), z1 - z0
    try:
        block = _file_region(local or path, fmt, start, size)
    except PatientError:
        raise
    except Exception as exc:
        raise _error(f"cannot read slices {z0}..{z1 - 1} ({describe_error(exc)}); the file is truncated "
                     f"or damaged: replace it", patient, path) from exc
    block = block.transpose(az, ay, ax)
    flips = tuple(slice(None, None, -1) if f else slice(None) for f in (fz, fy, fx))
    return _to_int16(np.ascontiguousarray(block[flips]), patient, path)


def _read_block(*, path, fmt, axes, file_shape, patient, files=None, block_info=None):
    (z0, z1), _, _ = block_info[None]["array-location"]
    if is_url(path) and fmt == "metaimage":
        with _copied(files or (path,), patient, path) as local:
            return _read_slices(path, fmt, axes, file_shape, z0, z1, patient, local=local)
    return _read_slices(path, fmt, axes, file_shape, z0, z1, patient)
