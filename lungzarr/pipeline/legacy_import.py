"""The old DSB2017 layout (``input/stage1_*`` npz folders, labels CSV) into a store."""
from __future__ import annotations

import time

import numpy as np

from lungzarr._version import __version__
from lungzarr.errors import PatientError
from lungzarr.model.geometry import WINDOW_CENTRE, detection_crop
from lungzarr.pipeline.runner import Progress, ProgressEvent, StageSummary, as_patient_error
from lungzarr.pipeline.stages._common import DIMS_2MM
from lungzarr.volume import Grid

__all__ = ["import_legacy"]

#: The progress stage name of an import (not a pipeline stage: it marks the stages it brings in).
IMPORT = "import-legacy"


def _legacy_dataset(legacy):
    """A patient Dataset from the old npz layout (2 mm grid only; positions in mm were never kept)."""
    import xarray as xr

    if legacy.segmented is None:
        raise PatientError("no stage1_segmented_2x2x2 volume for this patient; the legacy import needs it",
                           patient=legacy.patient, stage=IMPORT)
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
        rows, cols = detection_crop((nz, ny, nx))
        box = legacy.box or {"by_min": rows, "by_max": ny, "bx_min": cols, "bx_max": nx}
        first = WINDOW_CENTRE  # window i belongs to slice i + 4
        prob[first:first + windows.shape[0], box["by_min"]:box["by_max"], box["bx_min"]:box["bx_max"]] = windows
        data["nodule_prob"] = (DIMS_2MM, prob, {"predicted_slices": [first, first + windows.shape[0]],
                                                "source": "legacy stage1_2x2x2_mpred3_8 (un-flipped refactor)"})
    ds = xr.Dataset(data, coords=coords)
    ds.attrs = {"patient": legacy.patient, "source": "legacy DSB2017 layout", "cancer": int(legacy.cancer),
                "grid_2mm": {"shape": [nz, ny, nx], "origin_mm": [0.0, 0.0, 0.0], "step_mm": [2.0, 2.0, 2.0]},
                "hu_2mm_source": "stage1_2x2x2" if legacy.hu is not None else
                "absent: features use the segmented volume as stand-in (docs/algorithms.md §7)",
                "lungzarr_version": __version__}
    return ds


def import_legacy(input_dir, store_path, *, stage: str = "stage1", overwrite: bool = False,
                  progress: Progress | None = None) -> StageSummary:
    """Read the old phase-2/3 outputs (``stage1_*`` npz folders, labels CSV) into a store.

    Each patient gets ``segmented``, ``lungs``, ``hu_2mm`` where it was kept and
    ``nodule_prob`` from the old window maps; its ``ingest``, ``segment`` (and
    ``detect``) stages are marked as done, so the ``nodules`` and ``features``
    stages and the exports work on it. The label it had in ``stage1_labels.csv``
    is kept (the features stage and ``export`` use it when no ``--labels`` is given).
    """
    from lungzarr.io.legacy import list_legacy_patients, read_legacy_patient
    from lungzarr.io.store import CohortStore
    from lungzarr.pipeline.checks import check_store
    from lungzarr.pipeline.tables import gather_tables

    check_store(store_path)
    store = CohortStore(store_path)
    summary = StageSummary(IMPORT)
    start = time.perf_counter()
    notify = progress or (lambda event: None)
    with store.lock():
        patients = list_legacy_patients(input_dir, stage=stage)
        notify(ProgressEvent(IMPORT, "begin", total=len(patients)))
        for patient in patients:
            if not overwrite and store.is_complete(patient, "ingest"):
                summary.skipped.append(patient)
                notify(ProgressEvent(IMPORT, "skipped", patient=patient))
                continue
            began = time.perf_counter()
            try:
                legacy = read_legacy_patient(input_dir, patient, stage=stage)
                ds = _legacy_dataset(legacy)
                pending = store.prepare_stage(patient, "ingest", ds, new_group=True,
                                              record={"source": IMPORT})
                pending.compute()
                pending.commit()
                marks = ["segment"] + (["detect"] if "nodule_prob" in ds else [])
                for stage_name in marks:
                    store.prepare_task(patient, stage_name, None, record={"source": IMPORT}).commit()
                summary.done.append(patient)
                notify(ProgressEvent(IMPORT, "done", patient=patient, seconds=time.perf_counter() - began))
            except Exception as exc:
                err = as_patient_error(exc, patient, IMPORT)
                store.record_failure(err, stage=IMPORT)
                summary.failed.append(err.as_record())
                notify(ProgressEvent(IMPORT, "failed", patient=patient, seconds=time.perf_counter() - began))
        gather_tables(store)
    summary.seconds = summary.work_seconds = time.perf_counter() - start
    return summary
