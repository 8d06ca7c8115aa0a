"""What a cohort's failure records cost as they grow: their write, a commit's look, a patient's open.

    python -m benchmarks.bench_records [--records 1000 5000] [--rounds 2] [--before CHECKOUT]

A store of ``--patients`` tiny ingested patients (the cohort of
:mod:`benchmarks.bench_cohort_scale`) gets ``--records`` failure records of
other patients, written one at a time as a run writes them (each patient that
fails: its record, then a commit's look at whether a committed patient has one
to drop). Measured per size, in a fresh process per variant:

* ``record_write_ms``: the mean of a failure's write over the last 500;
* ``commit_look_ms``: a commit's look at a patient without records
  (``_clear_committed``), right after a record was written (what a run pays per
  commit while others fail);
* ``xr_group_warm_s`` / ``xr_group_fresh_s``: plain
  ``xr.open_dataset(STORE, group="patients/<id>", engine="zarr")``, warm (median
  of 10) and in a fresh Python process;
* ``failures_s``: ``CohortStore.failures()``, every record read back;
* ``root_zarr_json_bytes`` and ``records_bytes`` (every file under ``records/``).

``--before CHECKOUT`` runs the same children from another checkout of lungzarr
(e.g. ``git worktree add /tmp/before f9e5d7d``: the records in the root
``zarr.json``), interleaved with this one, before/after per round, so both
see the same machine. Results: ``benchmarks/results/records.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import REPO, rounded, write_result
from benchmarks.measure import machine

OPEN_FRESH = ("import time, warnings; t = time.perf_counter(); import xarray as xr; t1 = time.perf_counter()\n"
              "with warnings.catch_warnings():\n"
              "    warnings.simplefilter('ignore')\n"
              "    xr.open_dataset({store!r}, group='patients/T00000', engine='zarr').close()\n"
              "print(time.perf_counter() - t1)")


def child(store: str, records: int) -> dict:
    """In a fresh process of the checkout under test: write ``records`` failures, then time the reads."""
    import warnings

    import xarray as xr

    import lungzarr
    from lungzarr.errors import PatientError
    from lungzarr.io.store import CohortStore

    store_path = Path(store)
    cohort = CohortStore(store_path)
    writes, looks = [], []
    for k in range(records):
        err = PatientError("unreadable: a benchmark's failure record of ~300 bytes, like a real one's reason",
                           patient=f"F{k:06d}", stage="ingest", file=f"/data/INPUT/F{k:06d}/1-001.dcm")
        t0 = time.perf_counter()
        cohort.record_failure(err, stage="ingest")
        t1 = time.perf_counter()
        cohort._clear_committed("T00000", "segment", whole_patient=False)
        t2 = time.perf_counter()
        writes.append(t1 - t0)
        looks.append(t2 - t1)
    last = slice(-500, None)

    def open_warm():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            xr.open_dataset(store_path, group="patients/T00000", engine="zarr").close()
            return time.perf_counter() - t

    open_warm()
    warm = statistics.median(open_warm() for _ in range(10))
    fresh = [float(subprocess.run([sys.executable, "-c", OPEN_FRESH.format(store=str(store_path))],
                                  capture_output=True, text=True, check=True, env=os.environ).stdout.split()[-1])
             for _ in range(3)]
    t = time.perf_counter()
    n = len(CohortStore(store_path, mode="r").failures())
    failures_s = time.perf_counter() - t
    records_dir = store_path / "records"
    records_bytes = sum(p.stat().st_size for p in records_dir.rglob("*") if p.is_file()) if records_dir.exists() else 0
    return {"lungzarr": str(Path(lungzarr.__file__).parent), "records": records, "failures_read": n,
            "record_write_ms": rounded(1e3 * statistics.mean(writes[last]), 3) if writes else None,
            "commit_look_ms": rounded(1e3 * statistics.mean(looks[last]), 3) if looks else None,
            "write_all_s": rounded(sum(writes), 2),
            "xr_group_warm_s": rounded(warm, 4), "xr_group_fresh_s": rounded(statistics.median(fresh), 4),
            "failures_s": rounded(failures_s, 4),
            "root_zarr_json_bytes": (store_path / "zarr.json").stat().st_size, "records_bytes": records_bytes}


def run_child(checkout: Path, store: Path, records: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{REPO}"}
    # This file, run as a script: the other checkout may have no such benchmark; its lungzarr comes first.
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(store), str(records)],
                          capture_output=True, text=True, env=env, cwd=checkout)
    if proc.returncode != 0:
        raise RuntimeError(f"child of {checkout} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--records", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--before", type=Path, default=None, help="another lungzarr checkout, run interleaved")
    ap.add_argument("--name", default="records")
    ap.add_argument("--child", nargs=2, metavar=("STORE", "RECORDS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]))), flush=True)
        return {}
    from benchmarks.bench_cohort_scale import write_cohort
    from lungzarr.pipeline import ingest

    work = Path(tempfile.mkdtemp(prefix="bench_records_"))
    try:
        write_cohort(work / "in", a.patients, slices=16, size=64)
        template = work / "template.zarr"
        ingest(work / "in", template)
        variants = {"after": REPO} if a.before is None else {"before": a.before.resolve(), "after": REPO}
        rows = []
        for r in range(a.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for records in a.records:
                for name in order:
                    store = work / f"{name}.zarr"
                    shutil.rmtree(store, ignore_errors=True)
                    shutil.copytree(template, store)
                    row = {"variant": name, "round": r, **run_child(variants[name], store, records)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        result = {"benchmark": "records", "machine": machine(), "patients": a.patients,
                  "variants": {k: str(v) for k, v in variants.items()}, "rows": rows,
                  "median": _medians(rows)}
        write_result(a.name, result)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _medians(rows: list[dict]) -> dict:
    keys = ("record_write_ms", "commit_look_ms", "write_all_s", "xr_group_warm_s", "xr_group_fresh_s", "failures_s",
            "root_zarr_json_bytes", "records_bytes")
    out = {}
    for row in rows:
        out.setdefault(row["variant"], {}).setdefault(str(row["records"]), []).append(row)
    return {v: {n: {k: rounded(statistics.median(r[k] for r in rs), 4) for k in keys} for n, rs in by_n.items()}
            for v, by_n in out.items()}


if __name__ == "__main__":
    main()
