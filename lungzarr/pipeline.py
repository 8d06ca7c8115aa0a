"""Cohort stages as dask graphs over patients, resumable, failures recorded.

Every stage follows one pattern (:func:`run_stage`): for each patient not yet
done, a *prepare* function reads what it needs lazily from the store (or the
DICOM folder), builds the stage's lazy xarray Dataset and starts its write
(metadata only); batches of at most ``batch_size`` patients are then computed
together on the dask scheduler, and each patient's stage is marked complete as
soon as its voxels are written. A patient that fails is recorded with the
reason and the cohort goes on.
"""
from __future__ import annotations

import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from lungzarr import __version__
from lungzarr.errors import LungzarrError, PatientError
from lungzarr.volume import Grid

__all__ = [
    "StageSummary",
    "find_patients",
    "ingest_dataset",
    "ingest",
    "run_stage",
]


@dataclass
class StageSummary:
    """What a stage did for a cohort."""

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict:
        return {"stage": self.stage, "done": len(self.done), "skipped": len(self.skipped),
                "failed": len(self.failed), "seconds": round(self.seconds, 3)}


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
    subdirs = sorted(p for p in input_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
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


# ---------------------------------------------------------------------- generic runner

def _as_patient_error(exc: BaseException, patient: str, stage: str) -> PatientError:
    if isinstance(exc, PatientError):
        if exc.patient is None:
            exc.patient = patient
        if exc.stage is None:
            exc.stage = stage
        return exc
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return PatientError(f"unexpected {type(exc).__name__}{at}: {exc} (please report this with the patient's data "
                        f"description)", patient=patient, stage=stage)


def run_stage(store, stage: str, items, prepare: Callable, *, overwrite: bool = False, batch_size: int = 4,
              client=None, progress: Callable | None = None) -> StageSummary:
    """Run one stage for many patients, a bounded batch at a time.

    Parameters
    ----------
    store : CohortStore
    stage : str
    items : list of (patient_id, payload)
        ``payload`` is passed to ``prepare`` (a folder for ingest, None after).
    prepare : callable
        ``prepare(store, patient, payload) -> PendingStage``; raises
        PatientError for a patient that cannot go through the stage.
    overwrite : bool
        Redo patients whose stage is complete.
    batch_size : int
        Patients whose voxels are computed at once; bounds memory.
    client : distributed.Client, optional
        Compute there; otherwise on the current dask scheduler.
    progress : callable, optional
        ``progress(event, patient)`` with event in {"done", "skipped", "failed"}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    summary = StageSummary(stage)
    start = time.perf_counter()
    notify = progress or (lambda event, patient: None)

    def fail(patient, exc):
        err = _as_patient_error(exc, patient, stage)
        store.record_failure(err, stage=stage)
        summary.failed.append(err.as_record())
        notify("failed", patient)

    todo = []
    for patient, payload in items:
        if not overwrite and store.is_complete(patient, stage):
            summary.skipped.append(patient)
            notify("skipped", patient)
        else:
            todo.append((patient, payload))

    for b in range(0, len(todo), batch_size):
        batch = []
        for patient, payload in todo[b:b + batch_size]:
            try:
                batch.append(prepare(store, patient, payload))
            except Exception as exc:  # one broken patient never stops the cohort
                fail(patient, exc)
        if client is not None:
            from distributed import as_completed

            futures = client.compute([p.delayed for p in batch], optimize_graph=False)
            by_key = {f.key: p for f, p in zip(futures, batch)}
            for future in as_completed(futures):
                pending = by_key[future.key]
                try:
                    pending.add_record(future.result())
                    pending.commit()
                    summary.done.append(pending.patient)
                    notify("done", pending.patient)
                except Exception as exc:
                    pending.discard()
                    fail(pending.patient, exc)
        else:
            for pending in batch:
                try:
                    pending.add_record(pending.compute())
                    pending.commit()
                    summary.done.append(pending.patient)
                    notify("done", pending.patient)
                except Exception as exc:
                    pending.discard()
                    fail(pending.patient, exc)
    summary.seconds = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------- ingest

def ingest_dataset(series, *, chunk_slices: int = 16):
    """The lazy ``hu`` + ``hu_2mm`` Dataset of one series (nothing decoded yet)."""
    import xarray as xr

    from lungzarr import dicom
    from lungzarr.resample import resample_to_2mm

    hu = dicom.series_to_hu(series, chunk_slices=chunk_slices)
    hu_2mm, grid_2mm = resample_to_2mm(hu, series.grid, chunk_slices=chunk_slices)
    grid = series.grid
    z_positions = np.array([h.position[2] for h in series.headers], dtype=np.float64)
    coords = {
        "z": ("z", z_positions, {"units": "mm", "long_name": "ImagePositionPatient z of each slice"}),
        "y": ("y", grid.axis(1), {"units": "mm"}),
        "x": ("x", grid.axis(2), {"units": "mm"}),
        "sop_instance_uid": ("z", np.array(dicom.sop_uids(series), dtype=object)),
        "z2": ("z2", grid_2mm.axis(0), {"units": "mm", "long_name": "z of the 2 mm grid (zoom's true step)"}),
        "y2": ("y2", grid_2mm.axis(1), {"units": "mm"}),
        "x2": ("x2", grid_2mm.axis(2), {"units": "mm"}),
    }
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
    for name in ("hu", "hu_2mm"):
        ds[name].encoding["chunks"] = tuple(c[0] for c in ds[name].data.chunks)
    return ds


def grid_from_attrs(attrs: dict, key: str = "grid_2mm") -> Grid:
    """The Grid a patient group recorded under ``key``."""
    g = attrs[key]
    return Grid(tuple(g["shape"]), tuple(g["origin_mm"]), tuple(g["step_mm"]))


def _prepare_ingest(chunk_slices):
    def prepare(store, patient, folder):
        from lungzarr import dicom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            series = dicom.read_series(folder, patient=patient)
        ds = ingest_dataset(series, chunk_slices=chunk_slices)
        record = {"series_instance_uid": ds.attrs["series_instance_uid"],
                  "selection_reason": ds.attrs["selection_reason"], "chunk_slices": chunk_slices}
        return store.prepare_stage(patient, "ingest", ds, record=record, new_group=True)
    return prepare


def ingest(input_dir, store_path, *, chunk_slices: int = 16, overwrite: bool = False,
           patients: Iterable[str] | None = None, batch_size: int = 4, client=None,
           progress: Callable | None = None) -> StageSummary:
    """Ingest every patient folder of ``input_dir`` into the cohort store.

    Writes ``hu`` (native grid) and ``hu_2mm`` per patient, chunk by chunk.
    Patients already ingested are skipped unless ``overwrite``; failures are
    recorded in the store and the others go on.
    """
    from lungzarr.storage import CohortStore

    items = find_patients(input_dir, patients=patients)
    store = CohortStore(store_path)
    bad_ids = []
    good = []
    for pid, folder in items:
        try:
            store.group_path(pid)
            good.append((pid, folder))
        except PatientError as exc:
            exc.file = str(folder)
            store.record_failure(exc, stage="ingest")
            bad_ids.append(exc.as_record())
    with store.lock():
        summary = run_stage(store, "ingest", good, _prepare_ingest(chunk_slices), overwrite=overwrite,
                            batch_size=batch_size, client=client, progress=progress)
    summary.failed = bad_ids + summary.failed
    return summary


def store_status(store_path) -> dict:
    """Per-stage counts, failures and size of a cohort store."""
    from lungzarr.storage import STAGES, CohortStore

    store = CohortStore(store_path, mode="r")
    patients = store.patients()
    failures = store.failures()
    stages = {}
    for stage in STAGES:
        stages[stage] = {"complete": sum(store.is_complete(p, stage) for p in patients),
                         "failed": sum(1 for f in failures if f.get("stage") == stage)}
    return {"n_patients": len(patients), "stages": stages, "failures": failures,
            "size_mb": store.size_bytes() / 1e6}


# ---------------------------------------------------------------------- later stages

DIMS_2MM = ("z2", "y2", "x2")


def _encoded(ds, chunk_slices):
    for name, var in ds.data_vars.items():
        if var.ndim == 3:
            var.encoding["chunks"] = (min(chunk_slices, var.shape[0]),) + tuple(var.shape[1:])
    return ds


def _prepare_segment(chunk_slices):
    def prepare(store, patient, _):
        import xarray as xr

        from lungzarr.crop import legacy_crop_box
        from lungzarr.segment import segment_lungs

        ds = store.open_patient(patient)
        lungs, segmented = segment_lungs(ds.hu_2mm.data)
        out = xr.Dataset({
            "lungs": (DIMS_2MM, lungs, {"long_name": "lung mask (DSB2017 per-slice segmentation, ALGORITHMS.md §3)"}),
            "segmented": (DIMS_2MM, segmented, {"units": "HU", "long_name": "hu_2mm inside the lungs, -2000 outside"}),
        })
        pending = store.prepare_stage(patient, "segment", _encoded(out, chunk_slices),
                                      record={"algorithm": "seperate_lungs_cv2 (ALGORITHMS.md §3)"})
        # The crop box needs the whole mask: take it from the written mask, cheaply (projections only).
        pending.before_commit = [lambda: {"crop_box": _jsonable_box(
            legacy_crop_box(store.open_patient(patient).lungs.data))}]
        return pending
    return prepare


def _jsonable_box(box):
    return {k: (v.item() if hasattr(v, "item") else (list(v) if isinstance(v, tuple) else v))
            for k, v in dict(box).items()}
