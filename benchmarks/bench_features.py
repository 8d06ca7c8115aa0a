"""Time the DSB2017 patient features and the nodule table.

1. One real patient (the 0acbeb... fixture, segmented volume standing in for
   the unsegmented one): ``dsb2017_features`` in each format and
   ``find_nodules``, median of several runs.
2. N synthetic patients through a dask graph, one delayed task per patient
   (make the patient's arrays -> features row + nodule table), for several N,
   each in a fresh process, recording wall time and peak resident memory:
   memory should stay flat as N grows, because a task holds one patient.

Writes benchmarks/results/features.json.

    python benchmarks/bench_features.py [--patients 10 50 100] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("LUNGZARR_SHARED", REPO.parent / "shared"))
DSB_PATIENT = "0acbebb8d463b4b9ca88cf38431aac69"


def synthetic_patient(seed: int, shape=(180, 140, 140)):
    """HU, segmented HU and a full-volume probability map of a made-up chest."""
    rng = np.random.default_rng(seed)
    z, h, w = shape
    zz, yy, xx = np.ogrid[:z, :h, :w]
    hu = np.full(shape, 40, dtype=np.int16)  # soft tissue
    lungs = np.zeros(shape, dtype=bool)
    for cx in (w * 0.3, w * 0.7):  # two ellipsoid lungs
        lungs |= (((zz - z / 2) / (z * 0.42)) ** 2 + ((yy - h / 2) / (h * 0.35)) ** 2
                  + ((xx - cx) / (w * 0.17)) ** 2) < 1
    hu[lungs] = rng.normal(-850, 40, size=int(lungs.sum())).astype(np.int16)
    prob = np.zeros(shape, dtype=np.float32)
    inside = np.argwhere(lungs[8:-8, 8:-8, 8:-8]) + 8
    for _ in range(rng.integers(3, 12)):
        c = inside[rng.integers(len(inside))]
        r = rng.uniform(1.0, 6.0)
        lo = np.maximum(c - 7, 0)
        box = tuple(slice(a, a + 15) for a in lo)
        lz, ly, lx = np.ogrid[box]
        dist = np.sqrt((lz - c[0]) ** 2 + (ly - c[1]) ** 2 + (lx - c[2]) ** 2)
        ball = dist < r
        hu[box][ball] = rng.normal(-50, 60, size=int(ball.sum())).astype(np.int16)
        # Probability falls from ~1 at the centre to 0.5 at the rim: nested
        # candidates across the thresholds, as the network's maps look.
        p = np.where(ball, 1.0 - 0.5 * dist / r, 0).astype(np.float32)
        prob[box] = np.maximum(prob[box], p)
    prob[:4] = 0
    prob[-4:] = 0
    prob[prob < 0.5] = 0  # as stored
    segmented = np.where(lungs, hu, np.int16(-2000)).astype(np.int16)
    return hu, segmented, prob


def patient_row(seed: int):
    """One task of the graph: make a patient, return its feature row and nodule count."""
    from lungzarr.algorithms.features import dsb2017_features, dsb2017_inputs
    from lungzarr.algorithms.nodules import find_nodules
    from lungzarr.volume import Grid
    hu, segmented, prob = synthetic_patient(seed)
    z = hu.shape[0]
    inputs = dsb2017_inputs(hu, segmented, prob[4:z - 4])
    row = dsb2017_features(*inputs, patient=f"synthetic{seed:04d}")
    grid = Grid(hu.shape, (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    nodules = find_nodules(prob, hu, grid=grid, lungs=segmented > -2000,
                           patient=f"synthetic{seed:04d}")
    return row, len(nodules)


class PeakRSS:
    """Sample this process's resident memory every 20 ms."""

    def __init__(self):
        import psutil
        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def run_cohort(n: int, workers: int) -> dict:
    """N synthetic patients through dask, in this process (called in a child)."""
    import dask
    import pandas as pd
    import psutil

    import lungzarr.algorithms.features  # noqa: F401  import before the baseline
    import lungzarr.algorithms.nodules  # noqa: F401
    baseline = psutil.Process().memory_info().rss
    tasks = [dask.delayed(patient_row, pure=True)(seed) for seed in range(n)]
    start = time.perf_counter()
    with PeakRSS() as mem:
        results = dask.compute(*tasks, scheduler="threads", num_workers=workers)
    wall = time.perf_counter() - start
    table = pd.concat([row for row, _ in results])
    return {"patients": n, "workers": workers, "wall_s": round(wall, 2),
            "s_per_patient": round(wall / n, 3),
            "rows": len(table), "columns": table.shape[1],
            "nodule_rows": int(sum(count for _, count in results)),
            "baseline_rss_mib": round(baseline / 2**20, 1),
            "peak_rss_mib": round(mem.peak / 2**20, 1),
            "peak_above_baseline_mib": round((mem.peak - baseline) / 2**20, 1)}


def bench_fixture(repeats: int) -> dict:
    from lungzarr.algorithms.features import FORMATS, dsb2017_features, dsb2017_inputs
    from lungzarr.algorithms.nodules import find_nodules
    from lungzarr.io.legacy import read_legacy_patient
    from lungzarr.volume import Grid
    root = SHARED / "fixtures" / "dsb2017" / "input"
    if not root.exists():
        return {"skipped": f"fixture folder {str(root)!r} is missing"}
    t0 = time.perf_counter()
    p = read_legacy_patient(root, DSB_PATIENT)
    read_s = time.perf_counter() - t0
    inputs = dsb2017_inputs(p.segmented, p.segmented, p.prob_windows, box=p.box)
    out = {"patient": DSB_PATIENT, "shape": list(p.segmented.shape), "read_legacy_s": round(read_s, 3)}
    for fmt in FORMATS:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            dsb2017_features(*inputs, cancer=p.cancer, fmt=fmt, patient=DSB_PATIENT)
            times.append(time.perf_counter() - t)
        out[f"features_{fmt}_s"] = round(statistics.median(times), 3)
    z = p.segmented.shape[0]
    prob = np.zeros(p.segmented.shape, dtype=np.float32)
    prob[4:z - 4] = p.prob_windows[:, 0, 0]
    grid = Grid(p.segmented.shape, (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        table = find_nodules(prob, p.segmented, grid=grid, lungs=p.segmented > -2000,
                             patient=DSB_PATIENT)
        times.append(time.perf_counter() - t)
    out["find_nodules_s"] = round(statistics.median(times), 3)
    out["nodule_rows"] = len(table)
    out["repeats"] = repeats
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "features.json")
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_cohort(args.child, args.workers)))
        return
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "fixture": bench_fixture(args.repeats), "cohort": []}
    print(json.dumps(result["fixture"], indent=1))
    for n in args.patients:
        # A fresh process per N, so each peak is measured from the same start.
        child = subprocess.run([sys.executable, __file__, "--child", str(n),
                                "--workers", str(args.workers)],
                               check=True, capture_output=True, text=True)
        entry = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(entry))
        result["cohort"].append(entry)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
