"""Stage ``segment``: the legacy per-slice lung segmentation → ``lungs``, ``segmented``; the crop box."""
from __future__ import annotations

from lungzarr.pipeline.stage import Stage
from lungzarr.pipeline.stages._common import DIMS_2MM, encoded, task_slices

__all__ = ["SEGMENT"]


def _crop_box_task(store_path, patient):
    from lungzarr.algorithms.crop import legacy_crop_box
    from lungzarr.io.storage import CohortStore

    lungs = CohortStore(store_path, mode="r").load_patient(patient, ["lungs"]).lungs.values
    return {"crop_box": legacy_crop_box(lungs)}


def _prepare(store, patient, _, options):
    import xarray as xr

    from lungzarr.algorithms.segment import segment_lungs

    # Only hu_2mm's graph is needed here: no Dataset (coordinates, every variable's metadata) in the client.
    hu_2mm = store.lazy_array(patient, "hu_2mm")
    lungs, segmented = segment_lungs(hu_2mm.rechunk({0: task_slices(options.chunk_slices)}))
    out = xr.Dataset({
        "lungs": (DIMS_2MM, lungs, {"long_name": "lung mask (DSB2017 per-slice segmentation, "
                                                 "docs/algorithms.md §3)"}),
        "segmented": (DIMS_2MM, segmented, {"units": "HU", "long_name": "hu_2mm inside the lungs, -2000 outside"}),
    })
    pending = store.prepare_stage(patient, "segment", encoded(out, options.chunk_slices),
                                  record={"algorithm": "seperate_lungs_cv2 (docs/algorithms.md §3)"})
    # The crop box needs the whole mask: a worker takes it from the written mask once it is written
    # (a few hundred kB of bool), in the same computation, so the client never waits on it.
    return pending.then(_crop_box_task, str(store.path), patient)


SEGMENT = Stage(
    name="segment",
    requires=("ingest",),
    prepare=_prepare,
    summary="per-slice lung segmentation of hu_2mm → lungs, segmented; the legacy crop box",
    arrays=("lungs", "segmented"),
)
