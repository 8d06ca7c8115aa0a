"""Seconds per patient of the detect stage (dask) vs. a bare ``model.predict``.

Both run the same d8 model on the same windows of one synthetic 2 mm patient
(default 150 x 168 x 168, i.e. 142 windows of 168 x 168, the typical DSB2017
size) in one process. The model is built and warmed up first, as it is on a
worker that has already predicted a patient.

    python benchmarks/bench_infer.py [--shape 150 168 168] [--chunk 40] [--out ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from lungzarr.model import infer
from lungzarr.model.d8 import get_model
from lungzarr.volume import normalize_hu

HERE = Path(__file__).resolve().parent


def synthetic_patient(shape, *, seed=0) -> np.ndarray:
    """Chest-like 2 mm volume: body at 40 HU, two lungs at -850 HU, a few nodules, air outside."""
    rng = np.random.default_rng(seed)
    nz, h, w = shape
    z, y, x = np.ogrid[:nz, :h, :w]
    hu = np.full(shape, -1000.0)
    body = ((y - h / 2) / (0.45 * h)) ** 2 + ((x - w / 2) / (0.48 * w)) ** 2 <= 1
    hu[np.broadcast_to(body, shape)] = 40
    for cx in (0.3 * w, 0.7 * w):
        lung = ((y - h / 2) / (0.3 * h)) ** 2 + ((x - cx) / (0.17 * w)) ** 2 <= 1
        hu[np.broadcast_to(lung, shape) & (z > 0.05 * nz) & (z < 0.95 * nz)] = -850
    for _ in range(6):
        cz, cy = rng.uniform(0.2, 0.8) * nz, rng.uniform(0.35, 0.65) * h
        cx = rng.choice([0.3, 0.7]) * w + rng.uniform(-0.05, 0.05) * w
        r = rng.uniform(2, 5)
        hu[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r] = 30
    hu += rng.normal(0, 20, shape)
    return hu.astype(np.int16)


def bare_predict(hu, batch_size):
    """Crop, normalise, stack every window, one model.predict (timed: the predict)."""
    nz, h, w = hu.shape
    images = normalize_hu(hu[:, h % 4:, w % 4:])
    windows = np.stack([images[i:i + 8] for i in range(nz - 8)])[..., np.newaxis]
    model = get_model()
    start = time.perf_counter()
    prob = model.predict(windows, batch_size=batch_size, verbose=0)
    seconds = time.perf_counter() - start
    out = np.zeros(hu.shape, np.float32)
    out[4:nz - 4, h % 4:, w % 4:] = np.where(prob[:, 0, :, :, 0] < 0.5, 0, prob[:, 0, :, :, 0])
    return out, seconds


def dask_stage(hu, chunk, batch_size, scheduler):
    start = time.perf_counter()
    prob = infer.predict_nodule_prob(da.from_array(hu, chunks=(chunk, -1, -1)), batch_size=batch_size)
    out = prob.compute(scheduler=scheduler)
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(150, 168, 168))
    parser.add_argument("--chunk", type=int, default=40, help="z-chunk of the dask stage")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scheduler", default="threads")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "infer_cpu.json")
    args = parser.parse_args(argv)

    import keras

    hu = synthetic_patient(tuple(args.shape))
    start = time.perf_counter()
    model = get_model()
    model.predict(np.zeros((1, 8, args.shape[1] - args.shape[1] % 4,
                            args.shape[2] - args.shape[2] % 4, 1), np.float32), verbose=0)
    build_s = time.perf_counter() - start

    bare, bare_s = bare_predict(hu, args.batch_size)
    print(f"bare model.predict: {bare_s:.1f} s", flush=True)
    staged, dask_s = dask_stage(hu, args.chunk, args.batch_size, args.scheduler)
    print(f"dask stage ({args.scheduler}, z-chunk {args.chunk}): {dask_s:.1f} s", flush=True)

    result = {
        "what": "seconds per patient, d8 nodule identifier, fp32",
        "shape_2mm": list(args.shape),
        "windows": args.shape[0] - 8,
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "batch_size": args.batch_size,
        "build_and_warmup_s": round(build_s, 2),
        "bare_predict_s": round(bare_s, 2),
        "dask_stage_s": round(dask_s, 2),
        "dask_scheduler": args.scheduler,
        "dask_z_chunk": args.chunk,
        "ratio_dask_over_bare": round(dask_s / bare_s, 3),
        "max_abs_difference": float(np.abs(staged - bare).max()),
        "voxels_above_0.5": int((bare > 0.5).sum()),
        "dask_version": dask.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
