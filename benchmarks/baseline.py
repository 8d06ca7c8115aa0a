"""The baseline: a straight, serial, in-memory run of the original algorithm, one patient at a time.

As the original scripts did it (ALGORITHMS.md §1-§6), written for the
benchmark from the library's per-slice / per-array functions and no dask:

1. ``load_hu``: read and decode the whole series into one int16 array;
2. ``resample_to_2mm_numpy``: one whole-volume ``ndimage.zoom`` (order 3, mirror);
3. a Python loop of ``segment_lung_slice`` over every 2 mm slice;
4. the detection crop, ``normalize_hu``, every 8-slice window stacked and one
   ``model.predict`` over all of them (probabilities < 0.5 set to 0);
5. ``find_nodules`` on the whole arrays;
6. ``dsb2017_inputs`` + ``dsb2017_features`` (+ ``lung_measures``) on the whole arrays.

Nothing is written to disk (the original wrote npz files per stage; the
baseline keeps everything in memory, so its figures are a lower bound on the
original's time).
"""
from __future__ import annotations

import time

import numpy as np

STAGES = ("ingest", "segment", "detect", "nodules", "features")


def run_patient(folder, *, patient: str, batch_size: int = 8, timer=None, stages=STAGES) -> dict:
    """One patient through the straight implementation; per-stage wall and CPU seconds.

    ``stages`` must be a prefix of :data:`STAGES` (the run stops after its last).

    ``timer(stage)`` is an optional context-manager factory (the caller's
    memory sampler) entered around each stage.
    """
    from contextlib import nullcontext

    from lungzarr.algorithms.features import dsb2017_features, dsb2017_inputs, lung_measures
    from lungzarr.algorithms.nodules import find_nodules
    from lungzarr.algorithms.resample import resample_to_2mm_numpy
    from lungzarr.algorithms.segment import OUTSIDE_LUNG_HU, segment_lung_slice
    from lungzarr.io.dicom import load_hu
    from lungzarr.model.d8 import get_model
    from lungzarr.volume import normalize_hu

    timer = timer or (lambda stage: nullcontext())
    seconds, cpu = {}, {}

    def clock(stage, t0, c0):
        seconds[stage] = time.perf_counter() - t0
        cpu[stage] = time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    with timer("ingest"):
        hu, grid = load_hu(folder, patient=patient)
        hu_2mm, grid_2mm = resample_to_2mm_numpy(hu, grid)
        del hu
    clock("ingest", t0, c0)

    t0, c0 = time.perf_counter(), time.process_time()
    with timer("segment"):
        lungs = np.zeros(hu_2mm.shape, dtype=bool)
        for k in range(hu_2mm.shape[0]):
            lungs[k] = segment_lung_slice(hu_2mm[k])
        segmented = np.where(lungs, hu_2mm, np.int16(OUTSIDE_LUNG_HU)).astype(np.int16)
    clock("segment", t0, c0)
    if "detect" not in stages:
        return {"patient": patient, "shape_2mm": list(hu_2mm.shape), "seconds": seconds, "cpu_seconds": cpu,
                "check": {"lung_voxels": int(lungs.sum())}}

    t0, c0 = time.perf_counter(), time.process_time()
    with timer("detect"):
        nz, h, w = hu_2mm.shape
        dy, dx = h % 4, w % 4
        images = normalize_hu(hu_2mm[:, dy:, dx:])
        windows = np.stack([images[i:i + 8] for i in range(nz - 8)])[..., np.newaxis]
        # The original's literal layers (lungzarr folds the upsampling by default: docs/algorithms.md §5).
        pred = get_model(fold_upsampling=False).predict(windows, batch_size=batch_size, verbose=0)[:, 0, :, :, 0]
        del windows
        pred = np.where(pred < 0.5, 0, pred).astype(np.float32)
        prob = np.zeros(hu_2mm.shape, np.float32)
        prob[4:nz - 4, dy:, dx:] = pred
    clock("detect", t0, c0)

    t0, c0 = time.perf_counter(), time.process_time()
    with timer("nodules"):
        table = find_nodules(prob, hu_2mm, grid=grid_2mm, lungs=lungs, patient=patient)
    clock("nodules", t0, c0)

    t0, c0 = time.perf_counter(), time.process_time()
    with timer("features"):
        images, segmented_norm, pmav = dsb2017_inputs(hu_2mm, segmented, prob[4:nz - 4, dy:, dx:])
        row = dsb2017_features(images, segmented_norm, pmav, patient=patient)
        lung_measures(segmented_norm[4:-4])
    clock("features", t0, c0)

    kept = table[(table.threshold == 0.5) & table.passes_dsb_filter]
    return {"patient": patient, "shape_2mm": list(hu_2mm.shape), "seconds": seconds, "cpu_seconds": cpu,
            "check": {"lung_voxels": int(lungs.sum()), "prob_voxels": int((prob > 0).sum()),
                      "prob_sum": float(prob.sum()), "nodules_0.5_filtered": int(len(kept)),
                      "feature_columns": int(row.shape[1])}}
