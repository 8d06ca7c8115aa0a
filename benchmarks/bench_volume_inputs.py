"""The same scan as DICOM, MetaImage and NIfTI: equal ``hu``? equal grid? ingest time and peak memory of each.

For each source (the shared LIDC-IDRI-0001 and RICORD slabs, and optionally a
synthetic chest CT of ``--synthetic-slices`` 512 x 512 slices written as
DICOM), the volume is read with :func:`lungzarr.io.dicom.load_hu` and written
with :func:`lungzarr.io.volumes.write_volume` as ``.mhd`` + ``.raw``, ``.nii``
and ``.nii.gz`` (LPS layout; ``--ras`` adds the RAS-layout files). Each
variant is then ingested alone (``lungzarr.pipeline.ingest``, dask threads
scheduler, ``chunk_slices`` 16) in a fresh subprocess, which reports its wall
time, CPU (of the ingest, all threads) and peak resident set during the ingest (``VmHWM`` after resetting it
with ``/proc/self/clear_refs`` once the imports are done; ``peak_above_before_mb``
is that peak minus the RSS before the ingest). The stored ``hu`` and grid of every variant
are compared with the DICOM's. Results: ``benchmarks/results/volume_inputs.json``.

Usage::

    python benchmarks/bench_volume_inputs.py [--synthetic-slices 300] [--ras] [--rounds 1]
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
RESULTS = HERE / "results" / "volume_inputs.json"
sys.path.insert(0, str(REPO))

_CHILD = r"""
import gc, json, sys, time
mode, src, store = sys.argv[1:4]
import dask, numpy, xarray, zarr, pydicom, SimpleITK, nibabel
from lungzarr.pipeline import ingest

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
gc.collect()
before = status("VmRSS")
# Reset the kernel's peak-RSS mark (VmHWM) so the peak is the ingest's, not the imports'.
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
t, c = time.perf_counter(), time.process_time()
if mode == "run":
    with dask.config.set(scheduler="threads"):
        s = ingest(src, store)
    assert not s.failed, s.failed
wall, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rss_before_mb": before,
                  "peak_rss_mb": status("VmHWM"), "peak_above_before_mb": status("VmHWM") - before}))
"""


def _child(mode, src, store) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(store)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _synthetic(n_slices, folder):
    from lungzarr.io.dicom import write_series

    from benchmarks.bench_ingest import chest_slice

    rng = np.random.default_rng(0)
    vol = np.stack([chest_slice(k, n_slices, 512, rng) for k in range(n_slices)])
    write_series(np.rint(vol).astype(np.int16), folder, spacing=(1.0, 0.7, 0.7), origin=(-300.0, -180.0, -175.0))
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-slices", type=int, default=0, help="also a synthetic N x 512 x 512 CT (0: none)")
    ap.add_argument("--ras", action="store_true", help="also the RAS-layout .mhd and .nii.gz")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args(argv)

    from lungzarr.io import dicom, volumes
    from lungzarr.io.store import CohortStore
    from tests.conftest import LIDC_DIR, RICORD_DIR

    tmp = Path(tempfile.mkdtemp(prefix="lz-volbench-"))
    results = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "load_avg_start": os.getloadavg()},
               "baseline_imports": _child("imports", tmp, tmp / "none"), "sources": {}}
    try:
        sources = {"LIDC-IDRI-0001": LIDC_DIR, "RICORD-1A-chest": RICORD_DIR}
        if args.synthetic_slices:
            sources[f"synthetic-{args.synthetic_slices}x512x512"] = _synthetic(args.synthetic_slices,
                                                                                tmp / "synthetic")
        for name, folder in sources.items():
            hu, grid = dicom.load_hu(folder)
            variants = {"dicom": None, "mhd": ("mhd", "LPS"), "nii": ("nii", "LPS"), "nii.gz": ("nii.gz", "LPS")}
            if args.ras:
                variants |= {"mhd RAS": ("mhd", "RAS"), "nii.gz RAS": ("nii.gz", "RAS")}
            entry = {"shape": list(hu.shape), "grid": {"origin_mm": list(grid.origin), "step_mm": list(grid.step)},
                     "variants": {}}
            for label, spec in variants.items():
                root = tmp / name / label.replace(" ", "_")
                root.mkdir(parents=True)
                if spec is None:
                    (root / "P").symlink_to(Path(folder).resolve(), target_is_directory=True)
                    file_mb = sum(p.stat().st_size for p in Path(folder).iterdir()) / 1e6
                else:
                    volumes.write_volume(hu, root / f"P.{spec[0]}", grid=grid, orientation=spec[1])
                    file_mb = sum(p.stat().st_size for p in root.iterdir()) / 1e6
                runs = []
                for r in range(args.rounds):
                    store = tmp / f"{name}-{label}-{r}.zarr".replace(" ", "_")
                    runs.append(_child("run", root, store))
                ds = CohortStore(store, mode="r").open_patient("P")
                g = ds.attrs["grid_native"]
                entry["variants"][label] = {
                    "input_mb": round(file_mb, 2),
                    "ingest_wall_s": [round(x["wall_s"], 3) for x in runs],
                    "process_cpu_s": [round(x["cpu_s"], 2) for x in runs],
                    "rss_before_mb": [round(x["rss_before_mb"], 1) for x in runs],
                    "peak_rss_mb": [round(x["peak_rss_mb"], 1) for x in runs],
                    "peak_above_before_mb": [round(x["peak_above_before_mb"], 1) for x in runs],
                    "hu_equal_to_dicom": bool(np.array_equal(ds.hu.values, hu)),
                    "grid_shape_equal": list(g["shape"]) == list(hu.shape),
                    "grid_origin_max_abs_diff_mm": float(np.max(np.abs(np.subtract(g["origin_mm"], grid.origin)))),
                    "grid_step_max_abs_diff_mm": float(np.max(np.abs(np.subtract(g["step_mm"], grid.step)))),
                }
                print(name, label, entry["variants"][label], flush=True)
            results["sources"][name] = entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
