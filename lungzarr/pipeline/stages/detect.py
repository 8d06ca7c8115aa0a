"""Stage ``detect``: the d8 UNet over every 8-slice window of ``hu_2mm`` → ``nodule_prob``."""
from __future__ import annotations

from contextlib import nullcontext

from lungzarr.pipeline.stage import Stage
from lungzarr.pipeline.stages._common import DIMS_2MM, encoded, task_slices

__all__ = ["DETECT"]


def _prepare(store, patient, _, options):
    import xarray as xr

    from lungzarr.model.engines import get_version, resolve_engine
    from lungzarr.model.geometry import detection_crop, predicted_slices
    from lungzarr.model.infer import annotate_gpu, predict_nodule_prob

    # Only hu_2mm's graph is needed here: no Dataset (coordinates, every variable's metadata) in the client.
    hu_2mm = store.lazy_array(patient, "hu_2mm")
    gpu = annotate_gpu if options.gpu else nullcontext
    engine = resolve_engine(options.engine, gpu=options.gpu)
    with gpu():
        # Few large predict calls (a GPU idles on 16-window calls); stored in the usual chunks.
        # Tasks of whole store chunks (the last one may take a short remainder): no rechunk to write.
        prob = predict_nodule_prob(hu_2mm.rechunk({0: task_slices(options.chunk_slices)}), weights=options.weights,
                                   batch_size=options.infer_batch, precision=options.precision, engine=engine)
    predicted = [int(predicted_slices(hu_2mm.shape[0]).start), int(predicted_slices(hu_2mm.shape[0]).stop)]
    out = xr.Dataset({"nodule_prob": (DIMS_2MM, prob, {
        "long_name": "d8 UNet nodule probability (values < 0.5 stored as 0)",
        "predicted_slices": predicted,
        "detection_crop_rows_cols": [int(n) for n in detection_crop(hu_2mm.shape)],
    })})
    weights = getattr(options.weights, "requested", options.weights)  # shipped: what the user passed
    record = {"precision": options.precision, "weights": str(weights or "default"),
              "predicted_slices": predicted, "gpu": bool(options.gpu),
              "engine": engine, "engine_version": get_version(engine)}
    # to_zarr(compute=False) optimises and re-wraps the graph, which drops the annotation made
    # above: annotate the write too, so every task of the stage keeps the GPU restriction.
    with gpu():
        return store.prepare_stage(patient, "detect", encoded(out, options.chunk_slices), record=record)


DETECT = Stage(
    name="detect",
    requires=("segment",),
    prepare=_prepare,
    summary="the d8 UNet over every 8-slice window of hu_2mm → nodule_prob (on GPU workers when there are any)",
    placement="gpu",
    uses_model=True,
    arrays=("nodule_prob",),
)
