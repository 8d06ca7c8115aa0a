"""Small synthetic DICOM patients for the ingest tests, and stores built from them (not a test module).

Volumes are tiny (12 slices of 64 x 64 by default) so a whole cohort of them
ingests in well under a second. Every helper writes real DICOM files with
:func:`lungzarr.io.dicom.write_series` and edits headers with pydicom, the way a
broken archive would look. :func:`detected_store` builds a store past the UNet
(a written probability map) for the tests of the stages and exports after it.
"""
from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pydicom

from lungzarr.io import dicom
from lungzarr.io.dicom import write_series

#: (slice spacing, row spacing, column spacing) of the phantoms, in mm.
SPACING = (2.5, 0.75, 0.75)


def phantom_volume(n_slices: int = 12, size: int = 64, *, seed: int = 0) -> np.ndarray:
    """A chest-like int16 HU volume: air, a soft-tissue body, two dark lungs, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:n_slices, 0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2.0
    r = np.hypot(y - c, (x - c) * 0.8)
    hu = np.full((n_slices, size, size), -1000.0)
    hu[r < 0.45 * size] = 40.0
    for side in (-1, 1):
        lung = np.hypot(y - c, x - c - side * 0.2 * size) < 0.15 * size
        hu[lung] = -850.0
    hu += rng.normal(0.0, 20.0, hu.shape) + 3.0 * z
    return np.clip(np.rint(hu), -1024, 3000).astype(np.int16)


def make_patient(folder, *, n_slices: int = 12, size: int = 64, spacing=SPACING, origin=(-100.0, -20.0, -30.0),
                 seed: int = 0, patient_id: str | None = None, **kwargs) -> list[Path]:
    """Write one phantom patient (an axial series) into ``folder``; return its files in z order.

    Its PatientID is ``patient_id``, default the folder's name (pass the patient folder's name when
    ``folder`` is a sub-folder of it: a folder holding several PatientIDs chooses its own patient's series).
    """
    return write_series(phantom_volume(n_slices, size, seed=seed), folder, spacing=spacing, origin=origin,
                        patient_id=Path(folder).name if patient_id is None else patient_id, **kwargs)


def edit_header(path, **values) -> None:
    """Set (or, with value None, delete) DICOM attributes of one file in place."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def truncate(path, *, keep_fraction: float = 0.99) -> int:
    """Cut the end off a file (its pixel data), as an interrupted download does; return the new size."""
    path = Path(path)
    data = path.read_bytes()
    keep = int(len(data) * keep_fraction)
    path.write_bytes(data[:keep])
    return keep


def copy_tree(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


@functools.lru_cache(maxsize=2)
def fixture_hu(folder: str):
    """A real fixture's HU through the lazy chunked path, decoded once per test session.

    Decoding the JPEG Lossless RICORD series costs ~3 s; several test modules use it.
    The array is read-only.
    """
    series = dicom.read_series(folder)
    hu = dicom.series_to_hu(series, chunk_slices=16).compute(scheduler="threads")
    hu.setflags(write=False)
    return hu, series.grid


@functools.lru_cache(maxsize=2)
def fixture_hu_2mm(folder: str):
    """A real fixture's HU resampled to 2 mm (the whole-volume zoom of :func:`fixture_hu`), once per session.

    The RICORD slab's zoom costs as much as its decoding; the resampling, segmentation and 3-D lung
    mask tests all read it. Returns ``(hu_2mm, grid_2mm)``; the array is read-only.
    """
    from lungzarr.algorithms.resample import resample_to_2mm_numpy

    hu_2mm, grid_2mm = resample_to_2mm_numpy(*fixture_hu(folder))
    hu_2mm.setflags(write=False)
    return hu_2mm, grid_2mm


def detected_store(base, blobs: dict, *, crops: dict | None = None, stages=("nodules",)) -> Path:
    """A real store whose ``nodule_prob`` is written by the test instead of predicted: ``base / "cohort.zarr"``.

    Chest phantoms as DICOM (24 x 96² at 2.5 x 2 x 2 mm; patient ``i``, counted from 1 in the order of
    ``blobs``, is seed ``i``) go through ingest and segment; each patient's map is then 0 but for its
    probability blobs, committed as the detect stage, and ``stages`` run on it. The UNet would take minutes
    on two cores; these tests are about what comes after it.

    Parameters
    ----------
    base : Path
        An empty folder: the DICOM go in ``input/``, the store is ``cohort.zarr``.
    blobs : dict
        ``{patient: [((z, y, x slices), value), ...]}``; the first voxel of each blob is its peak
        (``value + 0.03``, at most 0.999).
    crops : dict, optional
        ``{patient: "fixed" | "lungs"}``, the crop the detect record says the map was predicted on; a
        patient left out gets a record without one (as stores older than ``--crop`` and imported legacy maps).
    stages : sequence of str
        The stages run on the written maps.
    """
    import xarray as xr

    from lungzarr.algorithms.phantom import chest_phantom
    from lungzarr.io.store import CohortStore
    from lungzarr.pipeline import run
    from lungzarr.pipeline.stages._common import DIMS_2MM, encoded

    base = Path(base)
    for seed, pid in enumerate(blobs, start=1):
        hu, origin = chest_phantom(shape=(24, 96, 96), spacing=(2.5, 2.0, 2.0), seed=seed)
        write_series(hu, base / "input" / pid, spacing=(2.5, 2.0, 2.0), origin=origin, patient_id=pid)
    path = base / "cohort.zarr"
    run(base / "input", path, stages=["ingest", "segment"])
    cs = CohortStore(path)
    for p, patient_blobs in blobs.items():
        prob = np.zeros(cs.open_patient(p).lungs.shape, np.float32)
        for box, value in patient_blobs:
            prob[box] = value
            prob[tuple(slice(b.start, b.start + 1) for b in box)] = min(value + 0.03, 0.999)
        record = {"synthetic": True, **({"crop": crops[p]} if crops and p in crops else {})}
        pending = cs.prepare_stage(p, "detect", encoded(xr.Dataset({"nodule_prob": (DIMS_2MM, prob)}), 16),
                                   record=record)
        pending.compute()
        pending.commit()
    run(None, path, stages=list(stages))
    return path
