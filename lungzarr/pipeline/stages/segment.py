"""Stage ``segment``: the legacy per-slice lung segmentation → ``lungs``, ``segmented``, the NGFF label image
``labels/lungs``; the crop box."""
from __future__ import annotations

from lungzarr.pipeline.stage import Stage
from lungzarr.pipeline.progress import prepare_chunked
from lungzarr.pipeline.stages._common import DIMS_2MM, task_slices

__all__ = ["SEGMENT"]


#: NGFF colour of the lung label (RGBA, 0-255): a translucent blue a viewer draws over the CT.
LUNG_LABEL_RGBA = (0, 160, 255, 110)


def _after_write_task(store_path, patient, chunk_slices):
    """From the written mask, on a worker: the crop box, and the NGFF label image ``labels/lungs``.

    The label image is a uint8 copy of ``lungs`` (1 = lung): NGFF dataset
    paths cannot point outside the label group, and the 2 mm mask is small
    (~5 MB at 180 x 170 x 170, a few hundred kB stored). Written before the
    stage's commit, so it is complete exactly when the stage is.
    """
    import numpy as np

    from lungzarr.algorithms.crop import legacy_crop_box
    from lungzarr.io.store import CohortStore

    store = CohortStore(store_path, mode="r+")  # made by the run's client: not looked for
    lungs = store.load_patient(patient, ["lungs"]).lungs.values
    store.write_labels(patient, "lungs", lungs.astype(np.uint8), chunk_slices=chunk_slices,
                       colors=[{"label-value": 1, "rgba": list(LUNG_LABEL_RGBA)}],
                       properties=[{"label-value": 1, "name": "lung",
                                    "source": "lungs (DSB2017 per-slice segmentation)"}])
    return {"crop_box": legacy_crop_box(lungs)}


def _prepare(store, patient, _, options):
    import xarray as xr

    from lungzarr.algorithms.segment import segment_lungs

    # Only hu_2mm's graph is needed here: no Dataset (coordinates, every variable's metadata) in the client.
    # Read in the tasks' z-chunks: one read task per task (lazy_array's z_chunk).
    hu_2mm = store.lazy_array(patient, "hu_2mm", z_chunk=task_slices(options.chunk_slices))
    lungs, segmented = segment_lungs(hu_2mm)
    out = xr.Dataset({
        "lungs": (DIMS_2MM, lungs, {"long_name": "lung mask (DSB2017 per-slice segmentation, "
                                                 "docs/algorithms.md §3)"}),
        "segmented": (DIMS_2MM, segmented, {"units": "HU", "long_name": "hu_2mm inside the lungs, -2000 outside"}),
    })
    pending = prepare_chunked(store, patient, "segment", out, chunk_slices=options.chunk_slices,
                              record={"algorithm": "seperate_lungs_cv2 (docs/algorithms.md §3)"})
    # The crop box needs the whole mask: a worker takes it from the written mask once it is written
    # (a few hundred kB of bool), in the same computation, so the client never waits on it; the same
    # task writes the mask's NGFF label image.
    return pending.then(_after_write_task, str(store.path), patient, options.chunk_slices)


SEGMENT = Stage(
    name="segment",
    requires=("ingest",),
    prepare=_prepare,
    summary="per-slice lung segmentation of hu_2mm → lungs, segmented (and NGFF labels/lungs); the legacy crop box",
    arrays=("lungs", "segmented"),
    subgroups=("labels/lungs",),
)
