"""What the windows per engine call (``--infer-batch``) cost in memory and CPU, on the whole LIDC-IDRI-0001 CT.

    python -m benchmarks.bench_infer_batch [--engine openvino] [--batches 1 2 4 8] [--windows 16] [--rounds 3]

The whole scan's 2 mm volume (``load_hu`` + the in-memory reference resampling) is normalised and cut as the
detect stage cuts it (:class:`lungzarr.model.infer.WindowBatch`), ``--windows`` windows from slice 100 (through
the lungs). Two measurements:

* memory: for each batch size a fresh process builds the engine, predicts one call's windows (the shape
  specialisation), then all the windows; its peak RSS (``ru_maxrss``) and RSS before the first call;
* CPU: one process, every batch size in turn over the same windows, ``--rounds`` rounds in alternating order;
  process CPU-s per window (the engine's threads included), and whether the probabilities equal the largest
  batch's bit for bit.

Written to ``benchmarks/results/whole_scan_infer_batch.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUNGZARR_SHARED", REPO.parent / "shared"))
WHOLE = SHARED / "fixtures" / "lidc-whole" / "LIDC-IDRI-0001"
FIRST_WINDOW = 100


def windows(n: int):
    """``n`` windows of the whole scan from :data:`FIRST_WINDOW`, as the detect stage cuts them."""
    import numpy as np

    from lungzarr.algorithms.resample import resample_to_2mm_numpy
    from lungzarr.io.dicom import load_hu
    from lungzarr.model.geometry import detection_crop
    from lungzarr.model.infer import WindowBatch
    from lungzarr.volume import normalize_hu

    hu, grid = load_hu(WHOLE)
    hu_2mm = resample_to_2mm_numpy(hu, grid)[0]
    dy, dx = detection_crop(hu_2mm.shape)
    slab = normalize_hu(hu_2mm[FIRST_WINDOW:FIRST_WINDOW + n + 7, dy:, dx:]).astype(np.float32)
    return WindowBatch(np.ascontiguousarray(slab)).windows, hu_2mm.shape


def child_memory(engine: str, batch: int, n: int) -> dict:
    import resource

    import psutil

    from lungzarr.model.engines import get_engine

    w, shape = windows(n)
    runner = get_engine(engine)
    before = psutil.Process().memory_info().rss
    runner.predict(w[:batch], batch_size=batch)
    runner.predict(w, batch_size=batch)
    after = psutil.Process().memory_info().rss
    return {"batch": batch, "shape_2mm": list(shape), "rss_before_calls_mib": round(before / 2 ** 20),
            "rss_after_calls_mib": round(after / 2 ** 20),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def child_cpu(engine: str, batches: list[int], n: int, rounds: int) -> dict:
    import time

    import numpy as np

    from lungzarr.model.engines import get_engine

    w, _ = windows(n)
    runner = get_engine(engine)
    for b in batches:  # every shape specialised before timing
        runner.predict(w[:b], batch_size=b)
    per_window = {b: [] for b in batches}
    probs = {}
    for r in range(rounds):
        for b in (batches if r % 2 == 0 else batches[::-1]):
            t0 = time.process_time()
            probs[b] = runner.predict(w, batch_size=b)
            per_window[b].append(round((time.process_time() - t0) / n, 4))
    largest = max(batches)
    return {"cpu_s_per_window": per_window,
            "median_cpu_s_per_window": {b: float(np.median(v)) for b, v in per_window.items()},
            "equal_to_largest_batch_bit_for_bit": {b: bool(np.array_equal(probs[b], probs[largest]))
                                                   for b in batches},
            "voxels_p_ge_0.5": int((probs[largest] >= 0.5).sum())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="openvino")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=["memory", "cpu"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child == "memory":
        print(json.dumps(child_memory(a.engine, a.batch, a.windows)))
        return
    if a.child == "cpu":
        print(json.dumps(child_cpu(a.engine, a.batches, a.windows, a.rounds)))
        return

    sys.path.insert(0, str(REPO))
    from benchmarks.bench_whole_scan import cpu_isa
    from benchmarks.harness import write_result
    from benchmarks.measure import machine

    env = dict(os.environ, PYTHONPATH=str(REPO))

    def child(*args):
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_infer_batch", "--engine", a.engine,
                              "--windows", str(a.windows), *args], cwd=REPO, env=env, capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    memory = [child("--child", "memory", "--batch", str(b)) for b in a.batches]
    for m in memory:
        print(m, flush=True)
    cpu = child("--child", "cpu", "--rounds", str(a.rounds), "--batches", *map(str, a.batches))
    print(cpu, flush=True)
    write_result("whole_scan_infer_batch", {
        "what": f"windows per engine call: peak RSS of a fresh process and CPU-s per window, {a.engine} f32, "
                f"{a.windows} windows of the whole LIDC-IDRI-0001 CT from 2 mm slice {FIRST_WINDOW}",
        "engine": a.engine, "machine": {**machine(), **cpu_isa()}, "memory": memory, "cpu": cpu})


if __name__ == "__main__":
    main()
