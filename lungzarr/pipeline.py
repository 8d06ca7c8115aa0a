"""Cohort stages as dask graphs over patients, resumable, failures recorded.

Every stage follows one pattern: for each patient not yet done, a *prepare*
function reads what it needs lazily from the store (or the DICOM folder),
builds the stage's lazy xarray Dataset and starts its write (metadata only);
the graph is computed on the dask scheduler and the patient's stage is marked
complete as soon as its voxels are written. :func:`stream_stages` moves each
patient on to its next stage at once, with at most ``batch_size`` patients in
flight per stage, so stages of different patients overlap on a cluster. A
patient that fails is recorded with the reason and the cohort goes on.
"""
from __future__ import annotations

import os
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from lungzarr._version import __version__
from lungzarr.errors import LungzarrError, PatientError
from lungzarr.volume import Grid

__all__ = [
    "StageSummary",
    "find_patients",
    "ingest_dataset",
    "ingest",
    "stream_stages",
]


@dataclass
class StageSummary:
    """What a stage did for a cohort."""

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    #: INPUT entries not used as patients (``file``, ``reason``): set on the ingest stage's summary.
    ignored: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict:
        return {"stage": self.stage, "done": len(self.done), "skipped": len(self.skipped),
                "failed": len(self.failed), "seconds": round(self.seconds, 3)}


def find_patients(input_dir, *, patients: Iterable[str] | None = None) -> list[tuple[str, Path]]:
    """Patient folders of an INPUT folder: ``[(patient_id, folder), ...]``.

    The ``patients`` of :func:`lungzarr.inputs.scan_input`, which also
    returns the entries not used (archives, hidden folders, loose files).

    Parameters
    ----------
    input_dir : path
    patients : iterable of str, optional
        Keep only these identifiers; an unknown one is an error.
    """
    from lungzarr.inputs import scan_input

    return scan_input(input_dir, patients=patients).patients


def _record_input(store, scan) -> list[dict]:
    """Record what INPUT holds besides patient folders; return the archives' failure records.

    Warnings (stage ``input``) of entries of this INPUT folder that are gone are cleared.
    """
    from lungzarr.inputs import INPUT_STAGE

    current = {entry.name: entry for entry in scan.ignored}
    folder = os.path.abspath(scan.input_dir)
    for old in store.warnings():
        if old.get("stage") == INPUT_STAGE and old.get("patient") not in current \
                and os.path.dirname(os.path.abspath(old.get("file") or "")) == folder:
            store.record_warnings(old["patient"], INPUT_STAGE, [])
    for name, entry in current.items():
        store.record_warnings(name, INPUT_STAGE, [entry.as_record()])
    failed = []
    for err in scan.archives:
        store.record_failure(err, stage="ingest")
        failed.append(err.as_record())
    return failed


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


def stream_stages(store, items, stages, prepares: dict, *, decide: Callable, batch_size: int = 4, client=None,
                  progress: Callable | None = None, compute_options: dict | None = None,
                  prefetch: Callable | None = None) -> list[StageSummary]:
    """Stream patients through several stages, each patient as soon as its previous stage is committed.

    A patient's next stage is submitted the moment its previous one is
    committed, while other patients are still in earlier stages, so on a
    cluster the stages overlap: the UNet of one patient runs on the GPU
    worker while the CPU workers ingest and segment the next ones. Each stage
    has at most ``batch_size`` patients in flight, so what the workers hold
    does not grow with the cohort (patients between stages wait on disk).

    Parameters
    ----------
    store : CohortStore
    items : list of (patient_id, payload)
        ``payload`` goes to the first stage's prepare; later stages get None.
    stages : list of str
        In order.
    prepares : dict
        ``prepares[stage](store, patient, payload) -> PendingStage``.
    decide : callable
        ``decide(patient, stage)`` returns ``"run"``, ``"skip"`` (done
        already: go on to the next stage) or ``"blocked"`` (a stage it needs
        is missing: not run, nor any later stage).
    batch_size : int
        Patients in flight per stage.
    client : distributed.Client, optional
        Without one, each patient's stage is computed in turn on the current
        dask scheduler (same order, no overlap).
    progress : callable, optional
        ``progress(stage, total)`` returning that stage's
        ``callback(event, patient)``, event in {"done", "skipped", "failed",
        "blocked"}; every patient gives each stage exactly one event.
    compute_options : dict, optional
        ``compute_options[stage]``: extra keyword arguments of
        ``client.compute`` for that stage (e.g. ``workers=``).
    prefetch : callable, optional
        ``prefetch(patient, payload) -> payload`` for the first stage, called
        for the next ``2 * batch_size`` waiting patients that are due, so
        slow per-patient reads (the DICOM headers) start on the workers
        before the patient's turn; its prepare gets what prefetch returned.

    Returns
    -------
    list of StageSummary, one per stage
    """
    from collections import deque

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    items = list(items)
    summaries = [StageSummary(stage) for stage in stages]
    notify = [(progress(stage, len(items)) if progress else None) or (lambda event, patient: None)
              for stage in stages]
    queues = [deque() for _ in stages]
    queues[0].extend(items)
    in_flight = [0] * len(stages)
    first_start = [None] * len(stages)
    last_end = [None] * len(stages)
    ready = deque()  # (stage index, pending, get_result) of finished computations without a client
    if client is not None:
        from distributed import as_completed

        finished = as_completed()
        by_key = {}

    def forward(i, patient):
        if i + 1 < len(stages):
            queues[i + 1].append((patient, None))

    def drop(i, patient):
        for j in range(i + 1, len(stages)):
            notify[j]("blocked", patient)

    def fail(i, patient, exc):
        err = _as_patient_error(exc, patient, stages[i])
        store.record_failure(err, stage=stages[i])
        summaries[i].failed.append(err.as_record())
        notify[i]("failed", patient)
        drop(i, patient)

    def submit(i, pending):
        first_start[i] = first_start[i] or time.perf_counter()
        in_flight[i] += 1
        if client is not None:
            options = (compute_options or {}).get(stages[i], {})
            future = client.compute(pending.delayed, optimize_graph=False, **options)
            by_key[future.key] = (i, pending)
            finished.add(future)
            return
        try:
            result = pending.compute()
            ready.append((i, pending, lambda: result))
        except Exception as exc:  # raised again where the result is taken
            ready.append((i, pending, _raiser(exc)))

    prefetched = set()

    def prefetch_ahead():
        for k, (patient, payload) in enumerate(list(queues[0])[:2 * batch_size]):
            if patient in prefetched:
                continue
            prefetched.add(patient)
            try:
                if decide(patient, stages[0]) == "run":
                    queues[0][k] = (patient, prefetch(patient, payload))
            except Exception:  # decided again, and reported, at the patient's turn
                pass

    def admit():
        # Later stages first: patients already in flight finish before new ones start.
        for i in reversed(range(len(stages))):
            while queues[i] and in_flight[i] < batch_size:
                if i == 0 and prefetch is not None:
                    prefetch_ahead()
                patient, payload = queues[i].popleft()
                try:
                    decision = decide(patient, stages[i])
                    if decision == "blocked":
                        notify[i]("blocked", patient)
                        drop(i, patient)
                        continue
                    if decision == "skip":
                        summaries[i].skipped.append(patient)
                        notify[i]("skipped", patient)
                        forward(i, patient)
                        continue
                    pending = prepares[stages[i]](store, patient, payload)
                except Exception as exc:  # one broken patient never stops the cohort
                    fail(i, patient, exc)
                    continue
                submit(i, pending)

    while True:
        admit()
        if not any(in_flight):
            if any(queues):
                continue  # skipped patients moved on to a later stage's queue
            break
        if client is not None:
            future = next(finished)
            i, pending = by_key.pop(future.key)
            get_result = future.result
        else:
            i, pending, get_result = ready.popleft()
        in_flight[i] -= 1
        last_end[i] = time.perf_counter()
        # Each patient's stage is committed as soon as its own voxels are written.
        try:
            pending.add_record(get_result())
            pending.commit()
        except Exception as exc:
            pending.discard()
            fail(i, pending.patient, exc)
            continue
        summaries[i].done.append(pending.patient)
        notify[i]("done", pending.patient)
        forward(i, pending.patient)
    for i, summary in enumerate(summaries):
        if first_start[i] is not None and last_end[i] is not None:
            summary.seconds = last_end[i] - first_start[i]
    return summaries


def _raiser(exc):
    def get_result():
        raise exc
    return get_result


# ---------------------------------------------------------------------- ingest

#: Slices per dask task in the pipeline's stages, at least; the store keeps ``chunk_slices`` per chunk
#: and each task writes whole chunks. Fewer, larger tasks: on 300-slice patients, 64-slice tasks cut the
#: client process's CPU (it runs the scheduler) from 0.61 to 0.11 s per ingested patient and the workers'
#: from 5.1 to 3.6 CPU-s (less halo recomputed, less per-task overhead).
TASK_SLICES = 64


def task_slices(chunk_slices: int) -> int:
    """Slices per task for a store chunk of ``chunk_slices``: the smallest multiple >= TASK_SLICES."""
    chunk_slices = int(chunk_slices)
    if chunk_slices < 1:
        raise ValueError(f"chunk_slices must be >= 1, got {chunk_slices!r}")
    return chunk_slices * max(1, -(-TASK_SLICES // chunk_slices))


def ingest_dataset(series, *, chunk_slices: int = 16):
    """The lazy ``hu`` + ``hu_2mm`` Dataset of one series (nothing decoded yet).

    Computed in tasks of :func:`task_slices` slices; stored in chunks of ``chunk_slices``.
    """
    import xarray as xr

    from lungzarr import dicom
    from lungzarr.resample import resample_to_2mm

    per_task = task_slices(chunk_slices)
    hu = dicom.series_to_hu(series, chunk_slices=per_task)
    hu_2mm, grid_2mm = resample_to_2mm(hu, series.grid, chunk_slices=per_task)
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
    return _encoded(ds, chunk_slices)


def grid_from_attrs(attrs: dict, key: str = "grid_2mm") -> Grid:
    """The Grid a patient group recorded under ``key``."""
    g = attrs[key]
    return Grid(tuple(g["shape"]), tuple(g["origin_mm"]), tuple(g["step_mm"]))


def _read_series_task(folder, patient):
    """The series of a patient folder (headers only): on a worker when prefetched."""
    from lungzarr import dicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return dicom.read_series(folder, patient=patient)


def _series_prefetch(client, options: dict | None = None):
    """Read the next patients' DICOM headers on the workers (~0.4 s of pydicom per 300 slices),
    so the client, which also runs the scheduler, only builds graphs."""
    if client is None:
        return None

    def prefetch(patient, folder):
        return client.submit(_read_series_task, str(folder), patient, pure=False, **(options or {}))
    return prefetch


def _prepare_ingest(chunk_slices):
    def prepare(store, patient, payload):
        # payload: the patient's folder, or a future of its series (see _series_prefetch)
        if hasattr(payload, "result"):
            series = payload.result()
        else:
            series = _read_series_task(payload, patient)
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
    from lungzarr.checks import check_store
    from lungzarr.inputs import scan_input
    from lungzarr.storage import CohortStore

    scan = scan_input(input_dir, patients=patients)
    check_store(store_path)
    store = CohortStore(store_path)
    with store.lock():
        good, bad = _check_ids(store, scan.patients)
        bad = _record_input(store, scan) + bad
        (summary,) = stream_stages(
            store, good, ["ingest"], {"ingest": _prepare_ingest(chunk_slices)},
            decide=lambda patient, stage: _stage_decision(store, patient, stage, overwrite=overwrite),
            batch_size=batch_size, client=client, progress=lambda stage, total: progress,
            prefetch=_series_prefetch(client))
    summary.failed = bad + summary.failed
    summary.ignored = [entry.as_record() for entry in scan.ignored]
    return summary


def store_status(store_path) -> dict:
    """Per-stage counts, failures and size of a cohort store."""
    from lungzarr.storage import STAGES, CohortStore

    store = CohortStore(store_path, mode="r")
    patients = store.patients()
    failures = store.failures()
    done = [store.stages(p) for p in patients]
    stages = {stage: {"complete": sum(stage in d for d in done),
                      "failed": sum(1 for f in failures if f.get("stage") == stage)}
              for stage in STAGES}
    return {"n_patients": len(patients), "stages": stages, "failures": failures,
            "warnings": store.warnings(), "size_mb": store.size_bytes() / 1e6}


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

        from lungzarr.segment import segment_lungs

        ds = store.open_patient(patient)
        lungs, segmented = segment_lungs(ds.hu_2mm.data.rechunk({0: task_slices(chunk_slices)}))
        out = xr.Dataset({
            "lungs": (DIMS_2MM, lungs, {"long_name": "lung mask (DSB2017 per-slice segmentation, ALGORITHMS.md §3)"}),
            "segmented": (DIMS_2MM, segmented, {"units": "HU", "long_name": "hu_2mm inside the lungs, -2000 outside"}),
        })
        pending = store.prepare_stage(patient, "segment", _encoded(out, chunk_slices),
                                      record={"algorithm": "seperate_lungs_cv2 (ALGORITHMS.md §3)"})
        # The crop box needs the whole mask: a worker takes it from the written mask once it is written
        # (a few hundred kB of bool), in the same computation, so the client never waits on it.
        return pending.then(_crop_box_task, str(store.path), patient)
    return prepare


def _crop_box_task(store_path, patient):
    from lungzarr.crop import legacy_crop_box
    from lungzarr.storage import CohortStore

    return {"crop_box": legacy_crop_box(CohortStore(store_path, mode="r").open_patient(patient).lungs.values)}




def _prepare_detect(*, weights, precision, batch_size, chunk_slices, gpu):
    def prepare(store, patient, _):
        from contextlib import nullcontext

        import xarray as xr

        from lungzarr.infer import annotate_gpu, predict_nodule_prob, predicted_slices

        ds = store.open_patient(patient)
        hu_2mm = ds.hu_2mm.data
        with (annotate_gpu() if gpu else nullcontext()):
            # Few large predict calls (a GPU idles on 16-window calls); stored in the usual chunks.
            # Tasks of whole store chunks (the last one may take a short remainder): no rechunk to write.
            prob = predict_nodule_prob(hu_2mm.rechunk({0: task_slices(chunk_slices)}), weights=weights,
                                       batch_size=batch_size, precision=precision)
        predicted = predicted_slices(hu_2mm.shape[0])
        out = xr.Dataset({"nodule_prob": (DIMS_2MM, prob, {
            "long_name": "d8 UNet nodule probability (values < 0.5 stored as 0)",
            "predicted_slices": [int(predicted.start), int(predicted.stop)],
            "detection_crop_rows_cols": [int(hu_2mm.shape[1] % 4), int(hu_2mm.shape[2] % 4)],
        })})
        record = {"precision": precision, "weights": str(weights or "default"),
                  "predicted_slices": [int(predicted.start), int(predicted.stop)], "gpu": bool(gpu)}
        # to_zarr(compute=False) optimises and re-wraps the graph, which drops the annotation made
        # above: annotate the write too, so every task of the stage keeps the GPU restriction.
        with (annotate_gpu() if gpu else nullcontext()):
            return store.prepare_stage(patient, "detect", _encoded(out, chunk_slices), record=record)
    return prepare


def _unsegmented(ds):
    """``hu_2mm``; for legacy imports that never kept it, the segmented volume as §7's stand-in."""
    return ds.hu_2mm if "hu_2mm" in ds else ds.segmented


def _nodule_task(store_path, patient):
    """Compute one patient's nodule table on a worker and write it to the patient's ``nodules`` group."""
    from lungzarr.nodules import find_nodules, nodules_to_dataset
    from lungzarr.storage import CohortStore

    store = CohortStore(store_path)
    ds = store.open_patient(patient)
    grid = grid_from_attrs(ds.attrs)
    table = find_nodules(ds.nodule_prob.values, _unsegmented(ds).values, grid=grid, lungs=ds.lungs.values,
                         patient=patient)
    store.write_subgroup(patient, "nodules", nodules_to_dataset(table))
    kept = table[(table.threshold == 0.5) & table.passes_dsb_filter]
    return {"n_candidates": int(len(table)), "n_nodules_0.5_filtered": int(len(kept))}


def _prepare_nodules(store, patient, _):
    import dask

    return store.prepare_task(patient, "nodules",
                              dask.delayed(_nodule_task, pure=False)(str(store.path), patient),
                              record={"thresholds": "DSB2017 (0.5 ... 0.9999999)"})


def dsb2017_arrays(ds, *, patient: str | None = None):
    """The original's feature inputs from one patient's Dataset (ALGORITHMS.md §6).

    The unsegmented ``hu_2mm`` (or, for legacy imports without it, the
    segmented volume as §7's stand-in), ``segmented`` and ``nodule_prob``
    mapped back to windows (window i belongs to slice i + 4), cropped by the
    detection box and normalised: ``(images_norm, segmented_norm, pmav)``.
    """
    from lungzarr.features import dsb2017_inputs

    segmented = ds.segmented.values
    hu = _unsegmented(ds).values
    prob = ds.nodule_prob.values
    nz, ny, nx = prob.shape
    if nz < 9:
        raise PatientError(f"{nz} slices at 2 mm: the d8 windows need at least 9, so there are no features",
                           patient=patient, stage="features")
    windows = prob[4:nz - 4, ny % 4:, nx % 4:]
    return dsb2017_inputs(hu, segmented, windows)


def dsb2017_row(ds, *, fmt: str = "keras8_0313", cancer: int = -777, patient: str | None = None):
    """The original per-patient feature row (a 1-row DataFrame indexed by ``id``)."""
    from lungzarr.features import dsb2017_features

    images, segmented_norm, pmav = dsb2017_arrays(ds, patient=patient)
    return dsb2017_features(images, segmented_norm, pmav, cancer=cancer, fmt=fmt, patient=patient)


def _features_task(store_path, patient, cancer):
    """Patient-level measures on a worker: lung measures and the DSB2017 row, as a child group."""
    import xarray as xr

    from lungzarr.features import dsb2017_features, lung_measures
    from lungzarr.storage import CohortStore

    store = CohortStore(store_path)
    ds = store.open_patient(patient)
    images, segmented_norm, pmav = dsb2017_arrays(ds, patient=patient)
    row = dsb2017_features(images, segmented_norm, pmav, cancer=cancer, fmt="keras8_0313", patient=patient)
    # row.dtypes, not row[c] per column: 2525 column lookups cost a quarter of this task.
    integer = [str(c) for c, dtype in row.dtypes.items() if np.issubdtype(dtype, np.integer)]
    out = xr.Dataset({"value": (("feature",), row.iloc[0].to_numpy(dtype=np.float64))},
                     coords={"feature": np.array(list(row.columns), dtype=object)},
                     attrs={"format": "keras8_0313", "integer_features": integer, "cancer": int(cancer)})
    store.write_subgroup(patient, "dsb2017", out)
    measures = lung_measures(segmented_norm[4:-4])
    centre = measures.pop("centre")
    step = np.abs(grid_from_attrs(ds.attrs).step)
    lungs_ml = float(ds.lungs.sum().values) * float(np.prod(step)) / 1000.0
    return {"lung_volume_ml": lungs_ml, "cancer": int(cancer), **measures,
            "lung_centre_vox": [float(c) for c in centre]}


def _prepare_features(labels: dict | None):
    def prepare(store, patient, _):
        import dask

        # A labels CSV wins; a legacy import carries the label it was imported with.
        default = int(store.patient_attrs(patient).get("cancer", -777))
        cancer = default if labels is None else int(labels.get(patient, default))
        return store.prepare_task(patient, "features",
                                  dask.delayed(_features_task, pure=False)(str(store.path), patient, cancer),
                                  record={"format": "keras8_0313"})
    return prepare


def gather_tables(store) -> dict:
    """Rebuild the cohort-wide ``tables/nodules`` and ``tables/patients`` from the patient groups."""
    import pandas as pd

    from lungzarr.nodules import concat_nodule_tables, dataset_to_nodules

    nodule_tables, rows = [], []
    for patient in store.patients():
        attrs = store.patient_attrs(patient)
        stages = attrs.get("lungzarr:stages", {})
        if "nodules" in stages and store.has_subgroup(patient, "nodules"):
            nodule_tables.append(dataset_to_nodules(store.open_patient(patient, subgroup="nodules").load()))
        feat = stages.get("features", {})
        grid2 = attrs.get("grid_2mm", {})
        rows.append({
            "patient": patient,
            **{f"stage_{s}": s in stages for s in ("ingest", "segment", "detect", "nodules", "features")},
            "series_instance_uid": attrs.get("series_instance_uid", ""),
            "n_slices": int(attrs.get("grid_native", {}).get("shape", [0])[0]),
            "slice_spacing_mm": float((attrs.get("spacing_mm") or [np.nan])[0]),
            "shape_2mm": "x".join(str(n) for n in grid2.get("shape", [])),
            "lung_volume_ml": float(feat.get("lung_volume_ml", np.nan)),
            "n_nodules_0.5_filtered": int(stages.get("nodules", {}).get("n_nodules_0.5_filtered", -1)),
            "cancer": int(feat.get("cancer", -777)),
            **{k: float(feat.get(k, np.nan)) for k in
               ("lvol_0", "lvol_1", "lvol_2", "emphy_0", "emphy_1", "emphy_2", "emphy2_0", "emphy2_1", "emphy2_2")},
            **{f"lung_centre_{a}_vox": float((feat.get("lung_centre_vox") or [np.nan] * 3)[i])
               for i, a in enumerate("zyx")},
        })
    nodules = concat_nodule_tables(nodule_tables)
    patients = pd.DataFrame(rows)
    store.write_table("nodules", nodules, dim="nodule")
    store.write_table("patients", patients, dim="patient")
    return {"nodules": len(nodules), "patients": len(patients)}


#: The stages of a full run, in order.
RUN_STAGES = ("ingest", "segment", "detect", "nodules", "features")


def _stage_prepares(*, chunk_slices, weights, precision, infer_batch, gpu, label_map):
    return {
        "ingest": _prepare_ingest(chunk_slices),
        "segment": _prepare_segment(chunk_slices),
        "detect": _prepare_detect(weights=weights, precision=precision, batch_size=infer_batch,
                                  chunk_slices=chunk_slices, gpu=gpu),
        "nodules": _prepare_nodules,
        "features": _prepare_features(label_map),
    }


def _run_stages(store, items, stages, prepares, *, overwrite, batch_size, client, progress, gpu=False):
    """Stream ``items`` through ``stages`` (in RUN_STAGES order); the caller holds the lock."""
    prepares = {stage: prepares[stage] if stage == "ingest" else _depending_on(prepares[stage], _previous(stage))
                for stage in stages}

    def decide(patient, stage):
        return _stage_decision(store, patient, stage, overwrite=overwrite)

    placement = _cpu_stage_placement(client, stages, gpu)
    prefetch = _series_prefetch(client, placement.get("ingest")) if stages[0] == "ingest" else None
    summaries = stream_stages(store, items, list(stages), prepares, decide=decide, batch_size=batch_size,
                              client=client, progress=progress, compute_options=placement, prefetch=prefetch)
    gather_tables(store)
    return summaries


def _previous(stage):
    return RUN_STAGES[RUN_STAGES.index(stage) - 1] if stage != "ingest" else None


def _cpu_stage_placement(client, stages, gpu):
    """With GPU workers and CPU-only workers, keep the CPU stages off the GPU workers.

    A GPU worker's threads then only run the UNet stage, so the CPU stages of
    the next patients never delay a predict.
    """
    if client is None or not gpu:
        return {}
    workers = client.scheduler_info().get("workers", {})
    cpu_only = [address for address, info in workers.items() if not info.get("resources", {}).get("GPU", 0)]
    if not cpu_only:
        return {}
    return {stage: {"workers": cpu_only, "allow_other_workers": False} for stage in stages if stage != "detect"}


def _check_ids(store, items):
    good, bad = [], []
    for pid, folder in items:
        try:
            store.group_path(pid)
            good.append((pid, folder))
        except PatientError as exc:
            exc.file = str(folder)
            store.record_failure(exc, stage="ingest")
            bad.append(exc.as_record())
    return good, bad


def run(input_dir, store_path, *, labels=None, weights=None, chunk_slices: int = 16, batch_size: int = 4,
        precision: str = "fp32", patients: Iterable[str] | None = None, overwrite: bool = False, client=None,
        gpu: bool = False, infer_batch: int = 8, progress: Callable | None = None) -> list[StageSummary]:
    """DICOM folders to nodule and patient tables: every stage for every patient.

    Patients stream through the stages (:func:`stream_stages`): on a cluster,
    one patient's UNet overlaps the next patients' CPU stages.

    Parameters
    ----------
    input_dir, store_path : path
    labels : path, optional
        A labels CSV (``id,cancer``) for the DSB2017 ``cancer`` column.
    weights : path, optional
        d8 weights; default the shipped file (sha256 checked).
    chunk_slices, batch_size : int
        Slices per chunk; patients in flight per stage (bounds each worker's memory).
    precision : {"fp32", "bf16", "fp16"}
    patients : iterable of str, optional
    overwrite : bool
        Redo every stage of the selected patients.
    client : distributed.Client, optional
    gpu : bool
        Annotate the UNet tasks to run only on workers with a ``GPU`` resource,
        and keep the other stages on the CPU-only workers when there are any.
    infer_batch : int
        8-slice windows per UNet call.
    progress : callable, optional
        ``progress(stage, total)`` returning the per-patient callback of that stage.

    Returns
    -------
    list of StageSummary
    """
    from lungzarr.checks import check_run_config
    from lungzarr.inputs import scan_input
    from lungzarr.legacy import read_legacy_labels
    from lungzarr.storage import CohortStore

    scan = scan_input(input_dir, patients=patients)
    check_run_config(store=store_path, stages=RUN_STAGES, weights=weights, precision=precision)
    label_map = read_legacy_labels(labels) if labels is not None else None
    prepares = _stage_prepares(chunk_slices=chunk_slices, weights=weights, precision=precision,
                               infer_batch=infer_batch, gpu=gpu, label_map=label_map)
    store = CohortStore(store_path)
    with store.lock():
        good, bad = _check_ids(store, scan.patients)
        bad = _record_input(store, scan) + bad
        summaries = _run_stages(store, good, RUN_STAGES, prepares, overwrite=overwrite, batch_size=batch_size,
                                client=client, progress=progress, gpu=gpu)
    summaries[0].failed = bad + summaries[0].failed
    summaries[0].ignored = [entry.as_record() for entry in scan.ignored]
    return summaries


def process(store_path, stages, *, labels=None, weights=None, chunk_slices: int = 16, batch_size: int = 4,
            precision: str = "fp32", patients: Iterable[str] | None = None, overwrite: bool = False,
            client=None, gpu: bool = False, infer_batch: int = 8,
            progress: Callable | None = None) -> list[StageSummary]:
    """Run later stages (segment, detect, nodules, features) on the patients already in a store."""
    from lungzarr.checks import check_run_config
    from lungzarr.legacy import read_legacy_labels
    from lungzarr.storage import CohortStore

    unknown = [s for s in stages if s not in RUN_STAGES[1:]]
    if unknown:
        raise ValueError(f"stages must be among {RUN_STAGES[1:]!r}, got {unknown!r}")
    # A clear error when there is no store yet, or it cannot be written, or the weights are wrong.
    check_run_config(store=store_path, stages=stages, weights=weights, precision=precision, create=False)
    store = CohortStore(store_path)
    ids = store.patients()
    if patients is not None:
        missing = [p for p in patients if p not in ids]
        if missing:
            raise LungzarrError(f"--patients {missing!r} are not in store {str(store_path)!r}; ingest them first")
        ids = [p for p in ids if p in set(patients)]
    label_map = read_legacy_labels(labels) if labels is not None else None
    prepares = _stage_prepares(chunk_slices=chunk_slices, weights=weights, precision=precision,
                               infer_batch=infer_batch, gpu=gpu, label_map=label_map)
    ordered = [s for s in RUN_STAGES if s in stages]
    with store.lock():
        return _run_stages(store, [(p, None) for p in ids], ordered, prepares, overwrite=overwrite,
                           batch_size=batch_size, client=client, progress=progress, gpu=gpu)


def _stage_decision(store, patient, stage, *, overwrite: bool) -> str:
    """``"blocked"`` when the stage before is not complete; ``"run"`` when the stage is not complete, was
    computed from an older run of the stage before, or ``overwrite``; else ``"skip"``.

    The patient's stage markers are read once (the client process makes this call for every patient and stage).
    """
    stages = store.stages(patient)
    previous = _previous(stage)
    if previous is not None and previous not in stages:
        return "blocked"
    if overwrite or stage not in stages:
        return "run"
    if previous is not None and stages[stage].get("depends_on") != stages[previous].get("id"):
        return "run"
    return "skip"


def _depending_on(prepare, previous):
    """Record which completion of ``previous`` a stage was computed from."""
    def wrapped(store, patient, payload):
        dependency = store.stages(patient)[previous].get("id")
        pending = prepare(store, patient, payload)
        pending.record["depends_on"] = dependency
        return pending
    return wrapped


# ---------------------------------------------------------------------- exports

DSB2017_FORMATS = ("keras8_0313", "keras_0311", "base_8")


def _dsb_row_task(store_path, patient, fmt, cancer):
    from lungzarr.storage import CohortStore

    return dsb2017_row(CohortStore(store_path, mode="r").open_patient(patient), fmt=fmt, cancer=cancer,
                       patient=patient)


def export_dsb2017(store_path, out, *, fmt: str = "keras8_0313", labels=None, patients=None, client=None):
    """Write the original per-patient feature table (CSV, index ``id``) of every detected patient.

    Parameters
    ----------
    store_path : path
    out : path
        The CSV to write.
    fmt : {"keras8_0313", "keras_0311", "base_8"}
    labels : path, optional
        Labels CSV (``id,cancer``); patients not in it get ``cancer = -777``.
    patients : list of str, optional
    client : distributed.Client, optional

    Returns
    -------
    pandas.DataFrame
        The table written.
    """
    import dask

    from lungzarr.features import dsb2017_table
    from lungzarr.legacy import read_legacy_labels
    from lungzarr.storage import CohortStore

    if fmt not in DSB2017_FORMATS:
        raise ValueError(f"fmt must be one of {DSB2017_FORMATS!r}, got {fmt!r}")
    store = CohortStore(store_path, mode="r")
    label_map = read_legacy_labels(labels) if labels is not None else {}
    ids = [p for p in store.patients() if store.is_complete(p, "detect") and store.is_complete(p, "segment")
           and (patients is None or p in set(patients))]
    if not ids:
        raise LungzarrError(f"no patient of {str(store_path)!r} has completed detection; run `lungzarr run` or "
                            f"`lungzarr detect` first")
    tasks = [dask.delayed(_dsb_row_task, pure=True)(str(store.path), p, fmt, int(label_map.get(p, -777)))
             for p in ids]
    rows = (client.gather(client.compute(tasks)) if client is not None else dask.compute(*tasks))
    # One concat of all rows, as the original: a column is float where any patient has a value.
    table = dsb2017_table(list(rows))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out)
    return table


def export_nodules(store_path, out, *, threshold: float | None = None, filtered: bool = False):
    """Write the cohort nodule table to Parquet (``.parquet``) or CSV (any other suffix)."""
    from lungzarr.storage import read_nodules

    table = read_nodules(store_path)
    if threshold is not None:
        table = table[np.isclose(table["threshold"], threshold)]
    if filtered:
        table = table[table["passes_dsb_filter"]]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        table.to_parquet(out, index=False)
    else:
        table.to_csv(out, index=False)
    return table


# ---------------------------------------------------------------------- legacy import

def _legacy_dataset(legacy):
    """A patient Dataset from the old npz layout (2 mm grid only; positions in mm were never kept)."""
    import xarray as xr

    if legacy.segmented is None:
        raise PatientError("no stage1_segmented_2x2x2 volume for this patient; the legacy import needs it",
                           patient=legacy.patient, stage="ingest")
    nz, ny, nx = legacy.segmented.shape
    # The old layout lost ImagePositionPatient: index x 2 mm from 0 is the only honest grid.
    grid = Grid((nz, ny, nx), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    coords = {name: (name, grid.axis(i), {"units": "mm", "note": "legacy import: voxel index x 2 mm"})
              for i, name in enumerate(DIMS_2MM)}
    data = {"segmented": (DIMS_2MM, legacy.segmented.astype(np.int16)),
            "lungs": (DIMS_2MM, legacy.segmented != -2000)}
    if legacy.hu is not None:
        data["hu_2mm"] = (DIMS_2MM, legacy.hu.astype(np.int16))
    if legacy.prob_windows is not None:
        prob = np.zeros((nz, ny, nx), dtype=np.float32)
        windows = legacy.prob_windows[:, 0, 0] if legacy.prob_windows.ndim == 5 else legacy.prob_windows
        box = legacy.box or {"by_min": ny % 4, "by_max": ny, "bx_min": nx % 4, "bx_max": nx}
        prob[4:4 + windows.shape[0], box["by_min"]:box["by_max"], box["bx_min"]:box["bx_max"]] = windows
        data["nodule_prob"] = (DIMS_2MM, prob, {"predicted_slices": [4, 4 + windows.shape[0]],
                                                "source": "legacy stage1_2x2x2_mpred3_8 (un-flipped refactor)"})
    ds = xr.Dataset(data, coords=coords)
    ds.attrs = {"patient": legacy.patient, "source": "legacy DSB2017 layout", "cancer": int(legacy.cancer),
                "grid_2mm": {"shape": [nz, ny, nx], "origin_mm": [0.0, 0.0, 0.0], "step_mm": [2.0, 2.0, 2.0]},
                "hu_2mm_source": "stage1_2x2x2" if legacy.hu is not None else
                "absent: features use the segmented volume as stand-in (ALGORITHMS.md §7)",
                "lungzarr_version": __version__}
    return ds


def import_legacy(input_dir, store_path, *, stage: str = "stage1", overwrite: bool = False,
                  progress: Callable | None = None) -> StageSummary:
    """Read the old phase-2/3 outputs (``stage1_*`` npz folders, labels CSV) into a store.

    Each patient gets ``segmented``, ``lungs``, ``hu_2mm`` where it was kept and
    ``nodule_prob`` from the old window maps; its stages are marked as done
    so ``lungzarr run``-style stages (nodules, features) and exports work on it.
    """
    from lungzarr.checks import check_store
    from lungzarr.legacy import list_legacy_patients, read_legacy_patient
    from lungzarr.storage import CohortStore

    check_store(store_path)
    store = CohortStore(store_path)
    summary = StageSummary("import-legacy")
    start = time.perf_counter()
    notify = progress or (lambda event, patient: None)
    with store.lock():
        for patient in list_legacy_patients(input_dir, stage=stage):
            if not overwrite and store.is_complete(patient, "ingest"):
                summary.skipped.append(patient)
                notify("skipped", patient)
                continue
            try:
                legacy = read_legacy_patient(input_dir, patient, stage=stage)
                ds = _legacy_dataset(legacy)
                pending = store.prepare_stage(patient, "ingest", ds, new_group=True,
                                              record={"source": "import-legacy"})
                pending.compute()
                pending.commit()
                marks = ["segment"] + (["detect"] if "nodule_prob" in ds else [])
                for stage_name in marks:
                    store.prepare_task(patient, stage_name, None, record={"source": "import-legacy"}).commit()
                summary.done.append(patient)
                notify("done", patient)
            except Exception as exc:
                err = _as_patient_error(exc, patient, "import-legacy")
                store.record_failure(err, stage="import-legacy")
                summary.failed.append(err.as_record())
                notify("failed", patient)
        gather_tables(store)
    summary.seconds = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------- evaluation

def _store_detections(store, *, threshold: float, filtered: bool):
    from lungzarr.storage import read_nodules

    nodules = read_nodules(store.path)
    if not len(nodules):
        return nodules.assign(prob=[])
    rows = nodules[np.isclose(nodules.threshold, threshold)]
    if filtered:
        rows = rows[rows.passes_dsb_filter]
    return rows.assign(prob=rows.prob_max)


def evaluate_store(store_path, out_dir, *, lidc_xml=None, luna_csv=None, threshold: float = 0.5,
                   filtered: bool = False, min_readers: int = 3, min_diameter_mm: float = 3.0,
                   n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Score the store's nodules against reader annotations (LUNA16 rules).

    Parameters
    ----------
    store_path, out_dir : path
    lidc_xml : path, optional
        An LIDC-IDRI XML file or a folder searched for them; matched to
        patients by SeriesInstanceUID.
    luna_csv : path, optional
        A LUNA16 ``annotations.csv``; ``seriesuid`` matched likewise.
    threshold : float
        The nodule table's threshold whose components are the detections
        (scored by their largest probability).
    filtered : bool
        Keep only detections passing the original's filter.

    Returns
    -------
    dict
        ``result`` (EvaluationResult), ``files`` written, ``scans`` evaluated
        and ``unmatched`` patients without annotations.
    """
    import pandas as pd

    from lungzarr import evaluate as ev
    from lungzarr.storage import CohortStore

    if (lidc_xml is None) == (luna_csv is None):
        raise LungzarrError("give exactly one of --lidc-xml DIR_OR_FILE and --luna-csv FILE")
    store = CohortStore(store_path, mode="r")
    patients = [p for p in store.patients() if store.is_complete(p, "nodules")]
    if not patients:
        raise LungzarrError(f"no patient of {str(store_path)!r} has a nodule table; run `lungzarr run` first")
    by_series = {store.patient_attrs(p).get("series_instance_uid"): p for p in patients}
    truths, scans, unmatched = [], [], []
    if lidc_xml is not None:
        lidc_xml = Path(lidc_xml)
        files = [lidc_xml] if lidc_xml.is_file() else sorted(lidc_xml.rglob("*.xml"))
        xml_for = {}
        for f in files:
            marks = ev.read_lidc_xml(f)
            if marks.series_uid in by_series:
                xml_for[by_series[marks.series_uid]] = marks
        for p in patients:
            if p not in xml_for:
                unmatched.append(p)
                continue
            hu = store.open_patient(p)
            geometry = ev.SliceGeometry.from_axes(hu.x.values, hu.y.values, hu.z.values,
                                                  [str(u) for u in hu.sop_instance_uid.values])
            truths.append(ev.consensus_nodules(xml_for[p], geometry, patient=p, min_readers=min_readers,
                                               min_diameter_mm=min_diameter_mm))
            scans.append(p)
    else:
        truth = ev.read_luna_csv(luna_csv)
        truth = truth[truth.patient.isin(by_series)]
        truth = truth.assign(patient=truth.patient.map(by_series))
        truths.append(truth)
        # LUNA16 scores every listed scan: patients with no annotation are scans without nodules.
        scans = patients
    truth = pd.concat(truths, ignore_index=True) if truths else None
    if truth is None or not scans:
        raise LungzarrError(f"no annotation matches a patient of {str(store_path)!r} (by SeriesInstanceUID); "
                            f"check the XML folder / CSV")
    detections = _store_detections(store, threshold=threshold, filtered=filtered)
    detections = detections[detections.patient.isin(scans)]
    result = ev.evaluate_detections(detections, truth, n_scans=len(scans), scans=scans,
                                    n_bootstrap=n_bootstrap, seed=seed)
    files = ev.write_evaluation(result, out_dir, title=f"lungzarr — {Path(store_path).name}")
    return {"result": result, "files": files, "scans": scans, "unmatched": unmatched}
