"""Opening a whole cohort store: with each patient's listing (consolidated metadata) vs each node's own,
for 10, 100 and 1,000 patients. (Before issue 29 the listing was one document of the whole cohort in the root
``zarr.json``; ``results/open_cohort.json`` holds those figures; one patient's open is
:mod:`benchmarks.bench_open_patient`.)

    python -m benchmarks.bench_open_cohort [--sizes 10 100 1000] [--rounds 3] [--backends dir s3]

Each size gets a fresh store in a temporary directory, or (``s3``) in a fresh bucket of
a moto S3 server on loopback started here as a separate process (deleted at the end).
Patient ``P0000`` is written through the store API (``prepare_stage`` with a
new group, its commit, a ``nodules`` child through ``write_subgroup``): the
real layout of an ingested, segmented and detected patient (hu, hu_2mm, lungs,
segmented, nodule_prob and their coordinates), only tiny (8 x 8 x 8). The
other patients are copies of its folder (same metadata, another name; on S3
server-side copies of its objects), so a 1,000-patient store takes seconds to make. The cohort tables (patients, 3
nodules each) are written with ``write_table``.

Measured, median of ``--rounds``, the OS file cache warm for both variants:
``consolidate`` (every patient's listing written), dropping one patient's
listing (what the first write of a run to a patient costs), ``open_cohort`` and plain
``xr.open_datatree(store, engine="zarr")`` with and without it, and
``read_nodules``. Writes ``benchmarks/results/open_cohort.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from lungzarr.io.store import CohortStore, open_cohort, read_nodules

RESULTS = Path(__file__).resolve().parent / "results"


def _tiny_patient(pid: str) -> xr.Dataset:
    rng = np.random.default_rng(0)
    n = 8
    coords = {"z": np.arange(n) * 2.5, "y": np.arange(n) * 0.7, "x": np.arange(n) * 0.7,
              "z2": np.arange(n) * 2.0, "y2": np.arange(n) * 2.0, "x2": np.arange(n) * 2.0}
    native, two = ("z", "y", "x"), ("z2", "y2", "x2")
    ds = xr.Dataset({"hu": (native, rng.integers(-1000, 400, (n, n, n)).astype(np.int16)),
                     "hu_2mm": (two, rng.integers(-1000, 400, (n, n, n)).astype(np.int16)),
                     "lungs": (two, rng.random((n, n, n)) > 0.5),
                     "segmented": (two, rng.integers(0, 255, (n, n, n)).astype(np.uint8)),
                     "nodule_prob": (two, rng.random((n, n, n)).astype(np.float32))}, coords=coords)
    ds.attrs = {"patient_id": pid, "source_folder": f"/data/{pid}",
                "grid_2mm": {"shape": [n] * 3, "origin_mm": [0.0] * 3, "step_mm": [2.0] * 3},
                "grid_native": {"shape": [n] * 3, "origin_mm": [0.0] * 3, "step_mm": [2.5, 0.7, 0.7]}}
    return ds.chunk({"z": 4, "z2": 4})


def _nodules(pid: str) -> xr.Dataset:
    k = 3
    return xr.Dataset({"z_mm": ("nodule", np.linspace(-50, 50, k)), "y_mm": ("nodule", np.zeros(k)),
                       "x_mm": ("nodule", np.ones(k)), "prob_max": ("nodule", np.linspace(0.5, 0.9, k)),
                       "volume_mm3": ("nodule", np.full(k, 120.0))},
                      coords={"nodule": np.arange(k)}, attrs={"patient": pid})


def _copy_patient(store: CohortStore, src: str, dst: str) -> None:
    source, target = store.path / "patients" / src, store.path / "patients" / dst
    if isinstance(source, Path):
        shutil.copytree(source, target)
        return
    fs = store._backend.fs  # an object store: server-side copies, the group's zarr.json last
    keys = fs.find(source.key)
    head = f"{source.key}/zarr.json"
    body = [k for k in keys if k != head]
    fs.copy(body, [target.key + k[len(source.key):] for k in body])
    fs.copy(head, f"{target.key}/zarr.json")


def make_store(path, n_patients: int) -> CohortStore:
    store = CohortStore(path)
    first = "P0000"
    pending = store.prepare_stage(first, "ingest", _tiny_patient(first), new_group=True,
                                  record={"files": 8})
    pending.compute(scheduler="sync")
    pending.commit()
    for stage in ("segment", "detect"):
        store.prepare_task(first, stage, None).commit()
    store.write_subgroup(first, "nodules", _nodules(first))
    store.prepare_task(first, "nodules", None).commit()
    for i in range(1, n_patients):
        _copy_patient(store, first, f"P{i:04d}")
    pids = store.patients()
    nodules = pd.DataFrame([{"patient": p, "nodule": j, "z_mm": float(j), "prob": 0.5 + j / 10}
                            for p in pids for j in range(3)])
    store.write_table("nodules", nodules, dim="nodule")
    store.write_table("patients", pd.DataFrame({"patient": pids, "lung_volume_l": np.linspace(3, 6, len(pids))}),
                      dim="patient")
    return store


def _median(func, rounds: int):
    """(median seconds, the last result) of ``rounds`` calls."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _plain_open(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = xr.open_datatree(path, engine="zarr")
    warned = any("consolidated" in str(w.message).lower() for w in caught)
    return tree, warned


def measure(n_patients: int, rounds: int, tmp: Path, *, bucket: str | None = None,
            consolidated_only: bool = False) -> dict:
    path = tmp / f"cohort{n_patients}.zarr" if bucket is None else f"s3://{bucket}/cohort{n_patients}.zarr"
    start = time.perf_counter()
    store = make_store(path, n_patients)
    made = time.perf_counter() - start
    out = {"patients": n_patients, "rounds": rounds, "make_s": round(made, 2)}
    opened, plain, warned = {}, {}, {}

    def opens(label):
        opened[label], tree = _median(lambda: open_cohort(path), rounds)
        assert len(tree["patients"].children) == n_patients
        plain[label], (tree, warned[label]) = _median(lambda: _plain_open(path), rounds)
        assert len(tree["patients"].children) == n_patients

    for pid in store.patients():
        store._changing(pid)  # no listing: every node's own metadata is read
    if not consolidated_only:
        opens("without")
    consolidate, drop = [], []
    for _ in range(rounds):
        consolidate.append(store.consolidate()["seconds"])
        start = time.perf_counter()
        store._changing("P0000")  # the first write of a run to a patient
        drop.append(time.perf_counter() - start)
    info = store.consolidate()
    out["consolidate_s"] = round(statistics.median(consolidate), 4)
    out["drop_s"] = round(statistics.median(drop), 4)
    out["consolidated_nodes"] = info["nodes"]
    out["root_zarr_json_bytes"] = (store.path / "zarr.json").stat().st_size
    opens("consolidated")
    for key, values in (("open_cohort_s", opened), ("open_datatree_s", plain)):
        out[key] = {k: round(v, 4) for k, v in values.items()}
        if "without" in values:
            out[key]["speedup"] = round(values["without"] / values["consolidated"], 1)
    out["open_datatree_warns"] = warned
    seconds, frame = _median(lambda: read_nodules(path), rounds)
    assert len(frame) == 3 * n_patients
    out["read_nodules_s"] = round(seconds, 4)
    store._rmtree(store.path)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rounds-above", type=int, nargs=2, default=[500, 1], metavar=("PATIENTS", "ROUNDS"),
                        help="sizes above PATIENTS get ROUNDS rounds (default: 1,000 patients once)")
    parser.add_argument("--backends", nargs="+", choices=["dir", "s3"], default=["dir"],
                        help="dir: a local directory (the result's 'sizes'); s3: a loopback moto S3 server "
                             "(the result's 's3'); the other's figures in --out are kept")
    parser.add_argument("--consolidated-only", action="store_true",
                        help="skip the opens without consolidated metadata (1,000 patients on S3: ~20 min each)")
    parser.add_argument("--out", type=Path, default=RESULTS / "open_cohort.json")
    args = parser.parse_args(argv)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "load_avg": [round(x, 1) for x in os.getloadavg()]}
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="lungzarr-open-") as tmp:
        for backend in args.backends:
            rows = []
            if backend == "dir":
                for n in args.sizes:
                    rounds = args.rounds_above[1] if n > args.rounds_above[0] else args.rounds
                    row = measure(n, rounds, Path(tmp))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                result.update({"benchmark": "open_cohort", "date": time.strftime("%Y-%m-%d %H:%M"),
                               "machine": machine, "store": "POSIX directory (local disk), OS file cache warm",
                               "sizes": rows})
                continue
            from benchmarks.s3server import moto_server, requests_logged

            log = Path(tmp) / "moto.log"
            with moto_server(log) as (_, new_bucket):
                for n in args.sizes:
                    rounds = args.rounds_above[1] if n > args.rounds_above[0] else args.rounds
                    before = requests_logged(log)
                    row = measure(n, rounds, Path(tmp), bucket=new_bucket(),
                                  consolidated_only=args.consolidated_only)
                    row["requests_all_steps"] = requests_logged(log) - before
                    print("s3", json.dumps(row), flush=True)
                    rows.append(row)
            key = "s3_consolidated_only" if args.consolidated_only else "s3"
            result[key] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine,
                            "store": "moto S3 server (python -m moto.server) on 127.0.0.1, a separate process; "
                                     "open_datatree_s is plain xr.open_datatree('s3://...', engine='zarr')",
                            "sizes": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
