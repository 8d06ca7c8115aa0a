"""A validated DICOM series (:class:`Series`: headers only) and its volume as a lazy dask array of int16
HU, decoded a chunk of slices at a time (:func:`series_to_hu`)."""
from __future__ import annotations

from dataclasses import astuple, dataclass, field

import numpy as np

from lungzarr.io.dicom.decode import decode_slices_to_hu
from lungzarr.io.dicom.headers import SliceHeader
from lungzarr.volume import Grid, files_token, z_chunks


@dataclass
class Series:
    """A validated, sorted axial CT series of one patient (headers only).

    Attributes
    ----------
    patient : str
        Patient identifier (the folder name).
    folder : str
        The patient folder.
    headers : list of SliceHeader
        The chosen slices, sorted by ``ImagePositionPatient[2]`` ascending.
    grid : Grid
        Native voxel grid in patient millimetres.
    slice_spacing : float
        ``|z(slice 0) - z(slice 1)|``, the spacing the original resampled with.
    reason : str
        Why this series/acquisition was chosen.
    skipped : list of (str, str)
        Files not used, with the reason.
    """

    patient: str
    folder: str
    headers: list[SliceHeader]
    grid: Grid
    slice_spacing: float
    reason: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Broken slices dropped at either end of the stack: ``{"file", "reason"}``.
    dropped: list[dict] = field(default_factory=list)
    #: Records for the store's warnings table (see :meth:`warning_records`).
    user_warnings: list[dict] = field(default_factory=list)
    #: For a folder on object storage: each object's listing entry (size, ETag, LastModified), by URL,
    #: so :func:`files_token` needs no request per object.
    file_infos: dict | None = field(default=None, repr=False)
    #: :meth:`lungzarr.io.geometry.Placement.record`: the half-voxel rule's offsets, what the geometry is
    #: and the slices reoriented (for :meth:`provenance`).
    geometry: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def paths(self) -> list[str]:
        return [h.path for h in self.headers]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice spacing, PixelSpacing[0], PixelSpacing[1]) as the original used."""
        h0 = self.headers[0]
        ps = h0.pixel_spacing[::-1] if h0.reorient is not None and h0.reorient.transpose else h0.pixel_spacing
        return (self.slice_spacing, float(ps[0]), float(ps[1]))

    def provenance(self) -> dict:
        """JSON-serialisable attrs describing where the volume came from."""
        h0 = self.headers[0]
        return {
            "patient": self.patient,
            "source_folder": self.folder,
            "source_format": "dicom",
            "series_instance_uid": h0.series_uid,
            "series_number": h0.series_number,
            "acquisition_number": h0.acquisition,
            "selection_reason": self.reason,
            # The stored slices' orientation (every slice reoriented to it; see "geometry").
            "orientation": [float(np.sign(self.grid.step[2])), 0.0, 0.0, 0.0, float(np.sign(self.grid.step[1])), 0.0],
            "geometry": dict(self.geometry),
            "spacing_mm": list(self.spacing),
            "origin_mm": list(self.grid.origin),
            "step_mm": list(self.grid.step),
            "rescale_slopes": sorted({h.slope for h in self.headers}),
            "rescale_intercepts": sorted({h.intercept for h in self.headers}),
            "transfer_syntax": h0.transfer_syntax,
            "n_files_used": len(self.headers),
            "n_files_skipped": len(self.skipped),
            "skipped_files": [{"file": f, "reason": r} for f, r in self.skipped],
            "warnings": list(self.warnings),
            "dropped_edge_slices": [dict(r) for r in self.dropped],
        }

    def warning_records(self) -> list[dict]:
        """What a user must see in ``lungzarr status``: ``{"file", "reason"}`` dicts."""
        return [dict(r) for r in self.user_warnings]

    @property
    def source(self) -> str:
        """The patient folder (named in errors)."""
        return self.folder

    @property
    def z_positions(self) -> np.ndarray:
        """``ImagePositionPatient`` z (mm) of each slice, ascending."""
        return np.array([h.position[2] for h in self.headers], dtype=np.float64)

    @property
    def sop_instance_uids(self) -> list[str]:
        """SOPInstanceUID of each slice, in z order."""
        return sop_uids(self)

    def to_hu(self, *, chunk_slices: int = 16, store=None, files=None):
        """The lazy int16 HU dask array: :func:`series_to_hu`."""
        return series_to_hu(self, chunk_slices=chunk_slices, store=store, files=files)

    def files_token(self) -> list[tuple]:
        """:func:`files_token` of the slices (for objects: from the listing that found them)."""
        return files_token(self.paths, infos=self.file_infos)


def sop_uids(series: Series) -> list[str]:
    """SOPInstanceUID of each slice, in z order (to map annotations onto slices)."""
    return [h.sop_uid for h in series.headers]


class _Layouts:
    """The slices' :class:`PixelLayout` (or :class:`geometry.Reorientation`) in one opaque object: dask
    walks a tuple of dataclasses given to ``map_blocks`` field by field looking for collections
    (~0.8 CPU-s for 300 slices)."""

    __slots__ = ("layouts",)

    def __init__(self, layouts):
        self.layouts = tuple(layouts)

    def __getitem__(self, index):
        return self.layouts[index]


def _decode_block(*, paths, slopes, intercepts, patient, layouts=None, reorient=None, block_info=None):
    (z0, z1), _, _ = block_info[None]["array-location"]
    return decode_slices_to_hu(paths[z0:z1], slopes[z0:z1], intercepts[z0:z1], patient=patient,
                               layouts=None if layouts is None else layouts[z0:z1],
                               reorient=None if reorient is None else reorient[z0:z1])


def series_to_hu(series: Series, *, chunk_slices: int = 16, store=None, files=None):
    """The series as a lazy int16 dask array (z, y, x) of HU, ``chunk_slices`` slices a chunk.

    Each chunk decodes only its own files when computed, so writing the
    volume never holds more than a few chunks in memory: native slices straight
    from their bytes where the header located them (:attr:`SliceHeader.pixels`),
    the others with pydicom.

    Parameters
    ----------
    series : Series
    chunk_slices : int
    store : str or path, optional
        Where the volume is written (the pipeline passes the resolved store
        path). The task names are a ``tokenize`` of the patient, every file's
        resolved path, size and mtime, the rescale values, the chunking and
        this, so two patients, a rewritten file or another store never share
        a key in one distributed session.
    files : list, optional
        ``files_token(series.paths)`` taken already, when the headers were read
        (the pipeline stats the files on the worker that read them, not in the
        client that builds the graph); default: taken now.
    """
    import dask.array as da
    from dask.base import tokenize

    nz, ny, nx = series.shape
    slopes = tuple(h.slope for h in series.headers)
    intercepts = tuple(h.intercept for h in series.headers)
    if files is None:
        files = series.files_token()
    elif len(files) != len(series.paths):
        raise ValueError(f"files has {len(files)} entries for the {len(series.paths)} files of the series; pass "
                         f"files_token(series.paths)")
    reorient = tuple(h.reorient for h in series.headers)
    token = tokenize(series.patient, files, slopes, intercepts,
                     [None if op is None else astuple(op) for op in reorient],
                     chunk_slices, None if store is None else str(store))
    return da.map_blocks(
        _decode_block,
        chunks=(z_chunks(nz, chunk_slices), (ny,), (nx,)),
        dtype=np.int16,
        meta=np.empty((0, 0, 0), dtype=np.int16),
        name=f"decode-dicom-{token}",
        paths=tuple(series.paths),
        slopes=slopes,
        intercepts=intercepts,
        patient=series.patient,
        # Where each native slice's pixels lie (read from the headers, so from these files: the token).
        layouts=_Layouts(h.pixels for h in series.headers),
        # Each slice's flips/transpose from its own IOP (None: stored as the stack), applied on decode.
        reorient=None if not any(reorient) else _Layouts(reorient),
    )
