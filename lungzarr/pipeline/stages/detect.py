"""Stage ``detect``: the d8 UNet over every 8-slice window of ``hu_2mm`` → ``nodule_prob``."""
from __future__ import annotations

from contextlib import nullcontext

from lungzarr.pipeline.stage import Stage
from lungzarr.pipeline.progress import prepare_chunked
from lungzarr.pipeline.stages._common import DIMS_2MM, task_slices

__all__ = ["DETECT"]


def box_attrs(box: dict) -> dict:
    """The ``nodule_prob`` attrs that record its prediction box (stops exclusive; 0 outside the box)."""
    return {"crop": box.get("crop", "fixed"), "box_slices": list(box["z"]), "box_rows": list(box["y"]),
            "box_cols": list(box["x"])}


def _lung_box_task(lungs, margin, speck_share):
    from lungzarr.algorithms.crop import lung_box

    return lung_box(lungs, margin=margin, speck_share=speck_share)


def _record_box(store_path, patient, box):
    """After the write, on a worker: the box into ``nodule_prob``'s attrs; the stage record's part."""
    from lungzarr.io.store import CohortStore

    CohortStore(store_path).update_array_attrs(patient, "nodule_prob", box_attrs(box))
    return {"lung_box": box}


def _prepare(store, patient, _, options):
    from lungzarr.model.infer import annotate_gpu

    # With GPU workers only the network runs there (the predict tasks); every other task of the stage (read,
    # crop, normalise and cut the windows, place the probabilities, write) goes to the CPU-only workers.
    # annotate_gpu annotates task by task: a stage-wide workers= would apply to the predict tasks too.
    placed = annotate_gpu(cpu_workers=options.cpu_workers) if options.gpu else nullcontext()
    with placed:
        return _build(store, patient, options)


def _build(store, patient, options):
    import dask
    import xarray as xr

    from lungzarr.algorithms.crop import SPECK_SHARE
    from lungzarr.model.engines import get_version, resolve_engine
    from lungzarr.model.geometry import LUNG_BOX_MARGIN, detection_crop, fixed_box, predicted_slices
    from lungzarr.model.infer import infer_batch, predict_nodule_prob

    # Only hu_2mm's graph is needed here: no Dataset (coordinates, every variable's metadata) in the client.
    hu_2mm = store.lazy_array(patient, "hu_2mm")
    box = None
    if options.crop == "lungs":
        # One task on a worker reads the (small) lung mask and computes the box; every prediction task gets
        # it. pure=True: its key is derived from the mask's dask name (store path, patient, file stat).
        box = dask.delayed(_lung_box_task, pure=True)(store.lazy_array(patient, "lungs"), LUNG_BOX_MARGIN,
                                                      SPECK_SHARE)
    engine = resolve_engine(options.engine, gpu=options.gpu)
    # One predict task per z-chunk of task_slices (64+ windows: few large calls, a GPU idles on small ones);
    # tasks of whole store chunks (the last one may take a short remainder): no rechunk to write.
    prob = predict_nodule_prob(hu_2mm.rechunk({0: task_slices(options.chunk_slices)}), weights=options.weights,
                               batch_size=infer_batch(options.infer_batch, gpu=options.gpu),
                               precision=options.precision, engine=engine, box=box,
                               fold_upsampling=options.fold_upsampling)
    predicted = [int(predicted_slices(hu_2mm.shape[0]).start), int(predicted_slices(hu_2mm.shape[0]).stop)]
    # The fixed crop's box is known now; the lung box is written into the attrs by a worker (_record_box).
    attrs = box_attrs({"crop": "fixed", **fixed_box(hu_2mm.shape)}) if box is None else {"crop": "lungs"}
    out = xr.Dataset({"nodule_prob": (DIMS_2MM, prob, {
        "long_name": "d8 UNet nodule probability (values < 0.5 stored as 0)",
        "predicted_slices": predicted,
        "detection_crop_rows_cols": [int(n) for n in detection_crop(hu_2mm.shape)],
        "fold_upsampling": bool(options.fold_upsampling),
        **attrs,
    })})
    weights = getattr(options.weights, "requested", options.weights)  # shipped: what the user passed
    record = {"precision": options.precision, "weights": str(weights or "default"),
              "predicted_slices": predicted, "gpu": bool(options.gpu),
              "engine": engine, "engine_version": get_version(engine), "crop": options.crop,
              "fold_upsampling": bool(options.fold_upsampling)}
    if box is None:
        record["lung_box"] = None
    # Built inside _prepare's annotate_gpu: to_zarr(compute=False) flattens the graph into one layer, which
    # keeps the per-task annotations only because they are asked of each key.
    pending = prepare_chunked(store, patient, "detect", out, chunk_slices=options.chunk_slices, record=record)
    if box is not None:
        pending.then(_record_box, str(store.path), patient, box)
    return pending


DETECT = Stage(
    name="detect",
    requires=("segment",),
    prepare=_prepare,
    summary="the d8 UNet over every 8-slice window of hu_2mm → nodule_prob (on GPU workers when there are any)",
    placement="gpu",
    uses_model=True,
    arrays=("nodule_prob",),
)
