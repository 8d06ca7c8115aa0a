"""Stage ``lungs3d``: the 3-D lung mask beside the legacy one → ``lung_labels`` (0 / 1 right / 2 left).

The legacy ``segment`` stage, its crop box and the DSB2017 export are untouched;
this stage only adds ``lung_labels`` and the per-side lung measures of the
patient table (docs/algorithms.md; :mod:`lungzarr.algorithms.lungs3d`).
"""
from __future__ import annotations

from lungzarr.pipeline.stage import Stage
from lungzarr.pipeline.progress import prepare_chunked
from lungzarr.pipeline.stages._common import DIMS_2MM, task_slices

__all__ = ["LUNGS3D"]


def _measures_task(store_path, patient):
    """Per-side volume, mean HU and emphysema share, from the written mask (becomes the stage record)."""
    import numpy as np

    from lungzarr.algorithms.lungs3d import lung_side_measures
    from lungzarr.io.store import CohortStore, grid_from_attrs

    ds = CohortStore(store_path, mode="r").load_patient(patient, ["lung_labels", "hu_2mm"])
    step = np.abs(grid_from_attrs(ds.attrs).step)
    return lung_side_measures(ds.lung_labels.values, ds.hu_2mm.values, spacing=tuple(float(s) for s in step))


def _prepare(store, patient, _, options):
    import numpy as np
    import xarray as xr

    from lungzarr.algorithms.lungs3d import KEEP_NODULE_MM, lung_labels_dask
    from lungzarr.io.store import grid_from_attrs

    # Only hu_2mm's graph and the group attrs: no Dataset (coordinates, every variable's metadata) in the client.
    grid = grid_from_attrs(store.patient_attrs(patient))
    labels = lung_labels_dask(store.lazy_array(patient, "hu_2mm", z_chunk=task_slices(options.chunk_slices)),
                              spacing=tuple(float(s) for s in np.abs(grid.step)), x_step=float(grid.step[2]))
    out = xr.Dataset({"lung_labels": (DIMS_2MM, labels, {
        "long_name": "3-D lung mask: 0 outside, 1 right lung, 2 left lung (no airway, no bowel gas)",
        "flag_values": [0, 1, 2], "flag_meanings": "outside right_lung left_lung"})})
    pending = prepare_chunked(store, patient, "lungs3d", out, chunk_slices=options.chunk_slices,
                              record={"algorithm": "lungzarr.algorithms.lungs3d",
                                          "keep_nodule_mm": KEEP_NODULE_MM})
    return pending.then(_measures_task, str(store.path), patient)


LUNGS3D = Stage(
    name="lungs3d",
    requires=("ingest",),
    prepare=_prepare,
    summary="3-D lung mask of hu_2mm (right/left, no airway, no bowel gas) → lung_labels; per-side lung measures",
    arrays=("lung_labels",),
)
