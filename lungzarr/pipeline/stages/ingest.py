"""Stage ``ingest``: a patient's scan (DICOM folder, MetaImage or NIfTI file) → ``hu`` (native grid, int16)
and ``hu_2mm`` (2 × 2 × 2 mm)."""
from __future__ import annotations

import warnings

import numpy as np

from lungzarr._version import __version__
from lungzarr.errors import PatientError
from lungzarr.model.geometry import MIN_SLICES_2MM
from lungzarr.pipeline.progress import prepare_chunked
from lungzarr.pipeline.stage import Stage
from lungzarr.pipeline.stages._common import encoded, task_slices

__all__ = ["INGEST", "ingest_dataset"]


def ingest_dataset(series, *, chunk_slices: int = 16, store=None, files=None):
    """The lazy ``hu`` + ``hu_2mm`` Dataset of one series (nothing decoded yet).

    ``series`` is any :class:`~lungzarr.volume.ScanSeries`: a DICOM
    :class:`~lungzarr.io.dicom.Series` or a :class:`~lungzarr.io.volumes.VolumeSeries`.

    Computed in tasks of :func:`task_slices` slices; stored in chunks of ``chunk_slices``.
    ``store`` (the resolved store path) goes into the decode task names, so the same
    files ingested into two stores in one session never share a key; ``files`` is
    ``dicom.files_token(series.paths)`` when taken already (see :func:`dicom.series_to_hu`).

    Raises
    ------
    PatientError
        When the 2 mm grid has fewer than :data:`~lungzarr.model.geometry.MIN_SLICES_2MM`
        slices: the model's windows could never run on it, so the patient is
        refused here, not after segmentation.
    """
    import xarray as xr

    from lungzarr.algorithms.resample import resample_to_2mm

    per_task = task_slices(chunk_slices)
    # files: the DICOM files' token taken on the worker that read the headers (volume files name their own).
    hu = series.to_hu(chunk_slices=per_task, store=store, **({} if files is None else {"files": files}))
    hu_2mm, grid_2mm = resample_to_2mm(hu, series.grid, chunk_slices=per_task)
    if grid_2mm.shape[0] < MIN_SLICES_2MM:
        extent = abs(series.grid.step[0]) * (series.shape[0] - 1)
        raise PatientError(f"the series covers {extent:g} mm in z ({series.shape[0]} slices), "
                           f"{grid_2mm.shape[0]} slices at 2 mm: the d8 nodule windows need at least "
                           f"{MIN_SLICES_2MM} ({2 * MIN_SLICES_2MM} mm); use a series that covers the chest",
                           patient=series.patient, stage="ingest", file=series.source)
    grid = series.grid
    coords = {
        # Patient LPS mm (x towards the left, y posterior, z head), whatever the input format.
        "z": ("z", np.asarray(series.z_positions, dtype=np.float64),
              {"units": "mm", "long_name": "patient z (LPS) of each slice"}),
        "y": ("y", grid.axis(1), {"units": "mm"}),
        "x": ("x", grid.axis(2), {"units": "mm"}),
        "z2": ("z2", grid_2mm.axis(0), {"units": "mm", "long_name": "z of the 2 mm grid (zoom's true step)"}),
        "y2": ("y2", grid_2mm.axis(1), {"units": "mm"}),
        "x2": ("x2", grid_2mm.axis(2), {"units": "mm"}),
    }
    uids = series.sop_instance_uids
    if uids is not None:  # DICOM only: LIDC XML marks slices by SOPInstanceUID
        coords["sop_instance_uid"] = ("z", np.array(uids, dtype=object))
        # Each slice's file (a coordinate, not an attr: it stays out of the store's consolidated metadata);
        # the DICOM SEG export references these images.
        coords["dicom_file"] = ("z", np.array([str(p) for p in series.paths], dtype=object))
    ds = xr.Dataset(
        {
            "hu": (("z", "y", "x"), hu, {"units": "HU", "long_name": "CT in Hounsfield units, native grid"}),
            "hu_2mm": (("z2", "y2", "x2"), hu_2mm,
                       {"units": "HU", "long_name": "CT resampled to 2 x 2 x 2 mm (cubic spline, mirror)"}),
        },
        coords=coords,
    )
    ds.attrs = {
        **series.provenance(),
        "grid_native": {"shape": list(grid.shape), "origin_mm": list(grid.origin), "step_mm": list(grid.step)},
        "grid_2mm": {"shape": list(grid_2mm.shape), "origin_mm": list(grid_2mm.origin),
                     "step_mm": list(grid_2mm.step)},
        "lungzarr_version": __version__,
    }
    return encoded(ds, chunk_slices)


def _read_series_task(folder, patient, strict=False):
    """The series of a patient's INPUT entry (headers only): on a worker when prefetched.

    A volume file (``.mhd``/``.mha``/``.nii``/``.nii.gz``) is read by
    :mod:`lungzarr.io.volumes`, anything else as a DICOM folder.
    """
    from lungzarr.io import dicom, volumes
    from lungzarr.io.locations import as_location

    where = as_location(folder)  # a URL stays one (Path would turn s3://b/k into s3:/b/k)
    if volumes.volume_stem(where.name) is not None and not where.is_dir():
        return volumes.read_volume(folder, patient=patient)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return dicom.read_series(folder, patient=patient, strict=strict)


def _read_series_and_files_task(folder, patient, strict=False):
    """The series and the ``files_token`` of its files (a stat and a resolve per file, which the
    decode task names need): both on the worker when prefetched."""
    from lungzarr.io import dicom

    series = _read_series_task(folder, patient, strict)
    return series, (series.files_token() if isinstance(series, dicom.Series) else None)


def _prefetch(client, patient, folder, strict, compute_options):
    """Read a patient's headers and stat its files on the workers (~0.4 s of pydicom per 300 slices),
    so the client only builds graphs."""
    return client.submit(_read_series_and_files_task, str(folder), patient, strict, pure=False,
                         **(compute_options or {}))


def _prepare(store, patient, payload, options):
    # payload: the patient's folder, or what _prefetch read: its (series, files), or the future of them
    if hasattr(payload, "result"):
        payload = payload.result()
    if isinstance(payload, tuple):
        series, files = payload
    else:
        series, files = _read_series_and_files_task(payload, patient, options.strict)
    # What the user must see (another patient's files, dropped edge slices, ignored files): whoever runs the
    # stage records them (Stage.records_warnings), replacing the last ingest's, so `lungzarr status` shows
    # what is true; also when the patient is refused below.
    warned = series.warning_records()
    try:
        ds = ingest_dataset(series, chunk_slices=options.chunk_slices, store=store.path.resolve(), files=files)
    except PatientError as exc:
        exc.warnings = list(warned)
        raise
    record = {"series_instance_uid": ds.attrs["series_instance_uid"],
              "selection_reason": ds.attrs["selection_reason"], "chunk_slices": options.chunk_slices}
    pending = prepare_chunked(store, patient, "ingest", ds, chunk_slices=options.chunk_slices, record=record,
                              new_group=True)
    pending.warnings = list(warned)  # and in the run's own output when the patient is done
    return pending


INGEST = Stage(
    name="ingest",
    requires=(),
    prepare=_prepare,
    summary="DICOM series or volume file → hu (native grid, int16) and hu_2mm (2 × 2 × 2 mm cubic spline)",
    arrays=("hu", "hu_2mm"),
    creates_patient=True,
    records_warnings=True,
    prefetch=_prefetch,
)
