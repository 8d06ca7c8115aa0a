"""Throughput and peak memory of the lung segmentation stage (ALGORITHMS.md §3).

A synthetic 2 mm chest stands in for a patient: air outside (-1000 HU), a
soft-tissue body ellipse (40 HU) with a fat rim, two lungs (-850 HU) whose
size follows the z position, a trachea in the upper slices, vessels, and
Gaussian noise. The default size, 188 x 170 x 170, is what a typical
300-slice, 1.25 mm, 512 x 512 (0.66 mm pixels, 340 mm field of view) chest CT
becomes at 2 mm (300 x 1.25 / 2 = 187.5 -> 188 slices, 512 x 0.664 / 2 = 170).

Each mode runs in a fresh Python process so that its peak resident memory
(``ru_maxrss``) is its own:

* ``loop``: the straight whole-volume loop, as the original ran it — the
  whole 2 mm volume in memory, :func:`lungzarr.algorithms.segment.segment_lung_slices`
  over every slice, both outputs in memory;
* ``dask-threads-N``: :func:`lungzarr.algorithms.segment.segment_lungs` on a lazy input
  whose z-chunks are made on demand (as chunks read from a Zarr store would
  be), reduced chunk by chunk (as a store write would consume them), with the
  threaded scheduler and N threads.

Writes ``benchmarks/results/segment.json``. Run from the repository root::

    python benchmarks/bench_segment.py [--slices 188] [--size 170] [--chunk 16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "segment.json"


def synthetic_slices(z0: int, z1: int, *, n_slices: int, size: int) -> np.ndarray:
    """Slices ``z0 .. z1-1`` of the synthetic 2 mm chest (int16 HU), reproducible per slice."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    out = np.empty((z1 - z0, size, size), dtype=np.int16)
    for k in range(z0, z1):
        rng = np.random.default_rng(k)
        t = k / max(n_slices - 1, 1)  # 0 = feet, 1 = head
        body = (yy / 0.36) ** 2 + (xx / 0.45) ** 2 <= 1
        core = (yy / 0.32) ** 2 + (xx / 0.41) ** 2 <= 1
        hu = np.where(body, -90.0, -1000.0)
        hu = np.where(core, 40.0, hu)
        # Lungs from 10 % to 95 % of the height, widest in the lower third.
        if 0.10 < t < 0.95:
            scale = np.sin(np.pi * (t - 0.10) / 0.85) ** 0.5
            lungs = (((yy + 0.02) / (0.25 * scale)) ** 2 + ((np.abs(xx) - 0.19) / (0.13 * scale)) ** 2) <= 1
            hu = np.where(lungs, -850.0, hu)
            for _ in range(12):  # vessels
                cy, cx = rng.uniform(-0.2, 0.2), rng.choice([-1, 1]) * rng.uniform(0.1, 0.28)
                hu = np.where(((yy - cy) ** 2 + (xx - cx) ** 2 <= (0.012 * rng.uniform(0.5, 1.5)) ** 2)
                              & lungs, 30.0, hu)
        if t > 0.80:  # trachea
            hu = np.where((yy + 0.12) ** 2 + xx ** 2 <= 0.035 ** 2, -1000.0, hu)
        hu += rng.normal(0.0, 20.0, hu.shape)
        out[k - z0] = np.round(hu).astype(np.int16)
    return out


def _lazy_volume(n_slices: int, size: int, chunk: int):
    import dask.array as da

    from lungzarr.volume import z_chunks

    def make(block_info=None):
        (z0, z1), _, _ = block_info[None]["array-location"]
        return synthetic_slices(z0, z1, n_slices=n_slices, size=size)

    return da.map_blocks(make, chunks=(z_chunks(n_slices, chunk), (size,), (size,)), dtype=np.int16,
                         meta=np.empty((0, 0, 0), np.int16))


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def run_mode(mode: str, n_slices: int, size: int, chunk: int, repeat: int = 1) -> dict:
    """One measurement in this process (called in a fresh child process)."""
    import dask

    from lungzarr.algorithms.segment import segment_lung_slice, segment_lung_slices, segment_lungs

    # Warm up imports and lazily loaded submodules on one slice, and dask's
    # (array, threaded scheduler) on a one-chunk volume, so the RSS increase
    # below is the stage's own.
    segment_lung_slice(synthetic_slices(n_slices // 2, n_slices // 2 + 1, n_slices=n_slices, size=size)[0])
    warm_lungs, _ = segment_lungs(_lazy_volume(2, size, 2))
    warm_lungs.sum().compute(scheduler="threads", num_workers=1)
    baseline = _max_rss_mb()
    times, cpu_times = [], []
    for _ in range(repeat):
        cpu_start = time.process_time()
        if mode == "loop":
            volume = synthetic_slices(0, n_slices, n_slices=n_slices, size=size)
            cpu_start = time.process_time()
            start = time.perf_counter()
            lungs, segmented = segment_lung_slices(volume)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            cores = 1
            lung_voxels = int(lungs.sum())
            del volume, lungs, segmented
        elif mode.startswith("dask-threads-"):
            cores = int(mode.rsplit("-", 1)[1])
            lungs, segmented = segment_lungs(_lazy_volume(n_slices, size, chunk))
            # Reduce per chunk so, as with a store write, no output is held
            # whole; the input chunk is made inside the timed run (reading a
            # chunk from a store is part of the stage too).
            start = time.perf_counter()
            lung_voxels, _ = dask.compute(lungs.sum(), segmented.min(), scheduler="threads",
                                          num_workers=cores)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            lung_voxels = int(lung_voxels)
        else:
            raise ValueError(f"unknown mode {mode!r}")
    seconds = min(times)
    cpu_seconds = min(cpu_times)
    return {"mode": mode, "slices": n_slices, "shape": [n_slices, size, size], "chunk_slices": chunk,
            "cores": cores, "seconds": seconds, "all_seconds": times,
            "cpu_seconds": cpu_seconds, "slices_per_cpu_second": n_slices / cpu_seconds,
            "slices_per_second": n_slices / seconds,
            "slices_per_second_per_core": n_slices / seconds / cores, "lung_voxels": lung_voxels,
            "rss_after_imports_mb": baseline, "peak_rss_mb": _max_rss_mb(),
            "peak_rss_increase_mb": _max_rss_mb() - baseline}


def _input_generation_seconds(n_slices: int, size: int) -> float:
    start = time.perf_counter()
    synthetic_slices(0, n_slices, n_slices=n_slices, size=size)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=188)
    parser.add_argument("--size", type=int, default=170)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--modes", default="loop,dask-threads-1,dask-threads-2")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per mode (best is reported)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child, args.slices, args.size, args.chunk, args.repeat)))
        return {}

    env = dict(os.environ)
    # One thread per BLAS/OpenMP pool: the stage's parallelism is dask's.
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    runs = []
    load_before = os.getloadavg()
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--slices", str(args.slices),
                              "--size", str(args.size), "--chunk", str(args.chunk),
                              "--repeat", str(args.repeat)],
                             capture_output=True, text=True, env=env, check=True)
        run = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"{mode:>16}: {run['seconds']:6.2f} s, {run['slices_per_second_per_core']:6.2f} slices/s/core, "
              f"peak RSS {run['peak_rss_mb']:.0f} MB (+{run['peak_rss_increase_mb']:.0f} MB over imports)")
    import dask
    import scipy
    import skimage

    result = {
        "benchmark": "lung segmentation stage (ALGORITHMS.md §3)",
        "volume": {"shape": [args.slices, args.size, args.size], "dtype": "int16", "spacing_mm": 2.0,
                   "stands_for": "a 300-slice 1.25 mm 512x512 chest CT after 2 mm resampling"
                   if (args.slices, args.size) == (188, 170) else "custom"},
        "input_generation_seconds": _input_generation_seconds(args.slices, args.size),
        "notes": ("seconds is the best of --repeat timed runs (all_seconds lists them); the "
                  "machine may be shared, see load_average. dask modes generate their input chunk inside the timed compute (as a store read "
                  "would be); subtract input_generation_seconds / cores for the segmentation alone. "
                  "The loop mode's input is made before timing. peak_rss_mb is the child process' "
                  "ru_maxrss; peak_rss_increase_mb is over the RSS after imports and a warm-up slice."),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "scipy": scipy.__version__, "scikit-image": skimage.__version__,
                    "dask": dask.__version__},
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
