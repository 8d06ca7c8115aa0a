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


def _prepare(store, patient, _, options):
    from lungzarr.model.infer import annotate_gpu

    # With GPU workers only the network runs there (the predict tasks); every other task of the stage (read,
    # crop, normalise and cut the windows, place the probabilities, write) goes to the CPU-only workers.
    # annotate_gpu annotates task by task: a stage-wide workers= would apply to the predict tasks too.
    placed = annotate_gpu(cpu_workers=options.cpu_workers) if options.gpu else nullcontext()
    with placed:
        return _build(store, patient, options)


def _build(store, patient, options):
    import xarray as xr

    from lungzarr.algorithms.crop import SPECK_SHARE, lung_box
    from lungzarr.model.engines import get_version, resolve_engine
    from lungzarr.model.geometry import LUNG_BOX_MARGIN, detection_crop, fixed_box, predicted_slices
    from lungzarr.model.infer import infer_batch, predict_nodule_prob

    # Only hu_2mm's graph is needed here: no Dataset (coordinates, every variable's metadata) in the client.
    # Read in the tasks' z-chunks: one read task per task (lazy_array's z_chunk). Not under the GPU
    # annotations: dask's blockwise fusion of that read with normalize_hu merges their per-key annotations
    # (annotate_gpu's callables) as if they were dicts, and fails; the stored chunks' rechunk keeps them apart.
    per_task = task_slices(options.chunk_slices)
    hu_2mm = store.lazy_array(patient, "hu_2mm", z_chunk=None if options.gpu else per_task)
    box = None
    if options.crop == "lungs":
        # The box now, from the (small: a few MB) lung mask, where the graph is built: on a cluster a worker
        # (lungzarr.pipeline.remote). Not a task of the graph: the mask's read tasks, the box task and the
        # attrs task after the write were ~40 of a whole scan's 126 tasks, and xarray's to_zarr graph held
        # a renamed copy of the box task beside the after-write's (two box tasks, the mask read twice).
        box = lung_box(store.load_patient(patient, ["lungs"]).lungs.values, margin=LUNG_BOX_MARGIN,
                       speck_share=SPECK_SHARE)
    engine = resolve_engine(options.engine, gpu=options.gpu)
    # One predict task per z-chunk of task_slices (64+ windows: few large calls, a GPU idles on small ones);
    # tasks of whole store chunks (the last one may take a short remainder): no rechunk to write.
    prob = predict_nodule_prob(hu_2mm.rechunk({0: per_task}), weights=options.weights,
                               batch_size=infer_batch(options.infer_batch, gpu=options.gpu),
                               precision=options.precision, engine=engine, box=box,
                               fold_upsampling=options.fold_upsampling)
    predicted = [int(predicted_slices(hu_2mm.shape[0]).start), int(predicted_slices(hu_2mm.shape[0]).stop)]
    attrs = box_attrs({"crop": "fixed", **fixed_box(hu_2mm.shape)} if box is None else box)
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
    record["lung_box"] = box
    # Built inside _prepare's annotate_gpu: to_zarr(compute=False) flattens the graph into one layer, which
    # keeps the per-task annotations only because they are asked of each key.
    return prepare_chunked(store, patient, "detect", out, chunk_slices=options.chunk_slices, record=record)


DETECT = Stage(
    name="detect",
    requires=("segment",),
    prepare=_prepare,
    summary="the d8 UNet over every 8-slice window of hu_2mm → nodule_prob (on GPU workers when there are any)",
    placement="gpu",
    uses_model=True,
    arrays=("nodule_prob",),
)
