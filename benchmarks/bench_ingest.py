"""Peak memory of ingesting one patient: chunks of 16 slices vs the whole series at once.

Synthesises a realistic chest CT (300 slices of 512 x 512, 1 mm, uncompressed
DICOM written with :func:`lungzarr.io.dicom.write_series`) into a temporary folder,
then ingests it in fresh subprocesses, one per variant and measurement:

* ``baseline``      imports only (Python, numpy, dask, xarray, zarr, pydicom);
* ``chunked16``     ``lungzarr.pipeline.ingest(..., chunk_slices=16)``: the lazy path;
* ``whole_series``  the same call with ``chunk_slices`` = the number of slices
  (one chunk: the whole series decoded and resampled at once, same code);
* ``in_memory``     the original's way: ``load_hu`` + whole-volume
  ``resample_to_2mm_numpy``, then the two arrays written to a Zarr group.

Each variant runs twice: once plain, for the process's peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the wall time, and once
under ``tracemalloc`` for the peak of traced Python/numpy allocations. Results
go to ``benchmarks/results/ingest_memory.json``. Not part of the test suite.

Usage::

    python benchmarks/bench_ingest.py [--slices 300] [--size 512] [--chunk-slices 16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "ingest_memory.json"
VARIANTS = ("baseline", "chunked16", "whole_series", "in_memory")


# ---------------------------------------------------------------------- the synthetic patient

def chest_slice(k: int, n_slices: int, size: int, rng) -> np.ndarray:
    """One axial slice in HU: air, an elliptic body with fat and muscle, two lungs, spine, noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    t = k / max(1, n_slices - 1)
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    body = ((y - c) / (0.36 * size)) ** 2 + ((x - c) / (0.45 * size)) ** 2 < 1
    hu[body] = -100.0                                        # fat
    hu[((y - c) / (0.33 * size)) ** 2 + ((x - c) / (0.42 * size)) ** 2 < 1] = 40.0   # muscle / organs
    lung_r = 0.16 * size * np.sin(np.pi * (0.1 + 0.8 * t))   # lungs grow then shrink along z
    for side in (-1, 1):
        lung = ((y - c + 0.03 * size) / (1.2 * lung_r)) ** 2 + ((x - c - side * 0.2 * size) / lung_r) ** 2 < 1
        hu[lung] = -850.0
    hu[np.hypot(y - c - 0.25 * size, x - c) < 0.04 * size] = 700.0   # vertebra
    hu += rng.normal(0.0, 25.0, hu.shape).astype(np.float32)
    hu[~body] = -1000.0 + rng.normal(0.0, 5.0, int((~body).sum())).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3000).astype(np.int16)


def synthesise(folder: Path, *, n_slices: int, size: int, spacing=(1.0, 0.7, 0.7), block: int = 20) -> None:
    """Write the patient block by block (never the whole volume in memory)."""
    sys.path.insert(0, str(REPO))
    from pydicom.uid import generate_uid

    from lungzarr.io.dicom import write_series

    rng = np.random.default_rng(2017)
    series_uid, study_uid = generate_uid(), generate_uid()
    for b0 in range(0, n_slices, block):
        slab = np.stack([chest_slice(k, n_slices, size, rng) for k in range(b0, min(n_slices, b0 + block))])
        write_series(slab, folder, spacing=spacing, origin=(-350.0 + b0 * spacing[0], -180.0, -180.0),
                     patient_id=folder.name, series_uid=series_uid, study_uid=study_uid,
                     filename=f"s{b0:04d}_{{index:03d}}.dcm")


# ---------------------------------------------------------------------- one measured run (subprocess)

def run_variant(variant: str, input_dir: Path, store: Path, *, chunk_slices: int, n_slices: int,
                trace: bool) -> dict:
    import resource
    import tracemalloc

    if trace:
        tracemalloc.start()
    # Import everything every variant needs first, so the baseline is comparable.
    import dask  # noqa: F401
    import pydicom  # noqa: F401
    import xarray as xr
    import zarr  # noqa: F401

    from lungzarr.algorithms.resample import resample_to_2mm_numpy
    from lungzarr.io import dicom
    from lungzarr.pipeline import ingest

    start = time.perf_counter()
    if variant == "chunked16":
        summary = ingest(input_dir, store, chunk_slices=chunk_slices, batch_size=1)
        assert summary.ok, summary.failed
    elif variant == "whole_series":
        summary = ingest(input_dir, store, chunk_slices=n_slices, batch_size=1)
        assert summary.ok, summary.failed
    elif variant == "in_memory":
        patient = next(input_dir.iterdir())
        hu, grid = dicom.load_hu(patient)
        hu_2mm, _ = resample_to_2mm_numpy(hu, grid)
        xr.Dataset({"hu": (("z", "y", "x"), hu), "hu_2mm": (("z2", "y2", "x2"), hu_2mm)}).to_zarr(
            store, group=f"patients/{patient.name}", mode="w", zarr_format=3, consolidated=False)
    elif variant != "baseline":
        raise ValueError(f"variant must be one of {VARIANTS!r}, got {variant!r}")
    seconds = time.perf_counter() - start
    out = {"variant": variant, "seconds": round(seconds, 2),
           "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if trace:
        out["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return out


def measure(variant: str, input_dir: Path, work: Path, *, chunk_slices: int, n_slices: int, trace: bool) -> dict:
    store = work / f"{variant}{'-traced' if trace else ''}.zarr"
    cmd = [sys.executable, __file__, "--run-variant", variant, "--input", str(input_dir), "--store", str(store),
           "--chunk-slices", str(chunk_slices), "--slices", str(n_slices)] + (["--trace"] if trace else [])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant!r} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if store.exists():
        result["store_mb"] = round(sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6, 1)
        shutil.rmtree(store)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--chunk-slices", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary DICOM files go")
    parser.add_argument("--output", type=Path, default=RESULTS)
    # internal: one measured run
    parser.add_argument("--run-variant", choices=VARIANTS)
    parser.add_argument("--input", type=Path)
    parser.add_argument("--store", type=Path)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args(argv)

    if args.run_variant:
        print(json.dumps(run_variant(args.run_variant, args.input, args.store, chunk_slices=args.chunk_slices,
                                     n_slices=args.slices, trace=args.trace)))
        return

    work = Path(tempfile.mkdtemp(prefix="lungzarr-bench-", dir=args.workdir))
    try:
        input_dir = work / "input"
        t0 = time.perf_counter()
        synthesise(input_dir / "SYNTH-0001", n_slices=args.slices, size=args.size)
        dicom_mb = sum(f.stat().st_size for f in input_dir.rglob("*.dcm")) / 1e6
        print(f"synthesised {args.slices} x {args.size} x {args.size} ({dicom_mb:.0f} MB of DICOM) "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        for variant in VARIANTS:
            plain = measure(variant, input_dir, work, chunk_slices=args.chunk_slices, n_slices=args.slices,
                            trace=False)
            traced = measure(variant, input_dir, work, chunk_slices=args.chunk_slices, n_slices=args.slices,
                             trace=True)
            row = {**plain, "tracemalloc_peak_mb": traced["tracemalloc_peak_mb"],
                   "seconds_traced": traced["seconds"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        base = next(r for r in rows if r["variant"] == "baseline")
        for r in rows:
            r["ru_maxrss_above_baseline_mb"] = round(r["ru_maxrss_mb"] - base["ru_maxrss_mb"], 1)
            r["tracemalloc_above_baseline_mb"] = round(r["tracemalloc_peak_mb"] - base["tracemalloc_peak_mb"], 1)
            r["ru_maxrss_mb"] = round(r["ru_maxrss_mb"], 1)
            r["tracemalloc_peak_mb"] = round(r["tracemalloc_peak_mb"], 1)
        report = {
            "what": "peak memory of ingesting one synthetic patient (hu + hu_2mm to a Zarr v3 store)",
            "patient": {"shape": [args.slices, args.size, args.size], "spacing_mm": [1.0, 0.7, 0.7],
                        "dicom_mb": round(dicom_mb, 1),
                        "hu_int16_mb": round(args.slices * args.size * args.size * 2 / 1e6, 1)},
            "chunk_slices": args.chunk_slices,
            "scheduler": "dask threaded scheduler in the process (no cluster)",
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "platform": platform.platform()},
            "results": rows,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
