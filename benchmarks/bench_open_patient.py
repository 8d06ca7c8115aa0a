"""Opening one patient of a cohort store of 100, 1,000 and 10,000 patients: a cohort-wide listing (before)
against one listing per patient group (after).

    python -m benchmarks.bench_open_patient [--sizes 100 1000 10000] [--picks 3] [--out NAME]

Each size gets a fresh store in a temporary directory, made as
:mod:`benchmarks.bench_open_cohort` makes it (patient ``P0000`` written through
the store API with the real layout of an ingested, segmented and detected
patient, only tiny; the others copies of its folder; the cohort tables), then
laid out two ways, from the same files:

* ``before``: what lungzarr wrote until issue 29, one listing of the whole
  cohort inline in the root ``zarr.json`` (``zarr.consolidate_metadata(store)``
  writes the same document, tests/test_consolidated.py checked that) and none
  in the patient groups;
* ``after``: each patient group's own listing (:meth:`CohortStore.consolidate`)
  and none in the root.

For ``--picks`` patients spread over the cohort, each open is timed in a
fresh Python process (xarray and lungzarr imported first, not timed: the
"fresh" figure is the first open of that process, metadata files in the OS
cache) and again in the same process ("warm"):

* ``xr_group``: ``xr.open_dataset(STORE, group="patients/<id>", engine="zarr")``,
  xarray's defaults, as the issue states it;
* ``xr_path``: ``xr.open_dataset(STORE/patients/<id>, engine="zarr")``;
* ``lungzarr``: :func:`lungzarr.open_patient`.

Also, in this process: :func:`lungzarr.open_patients` (the mapping) made and
one patient looked up, :func:`lungzarr.read_nodules`, and ``open_cohort`` up
to ``--cohort-max`` patients (the ``before`` layout up to ``--before-max``). The root ``zarr.json``'s size and the metadata
bytes per patient are reported. Writes ``benchmarks/results/NAME.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

#: Run in a fresh process: one open of each kind, timed first (fresh) and again (warm).
_CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import xarray as xr, zarr, lungzarr, dask.array  # dask: the lazy (chunks={}) opens need it; imported by any lazy xarray use
from lungzarr.io.store import open_patient
store, pid, how, expect = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
def once():
    if how == "xr_group":
        ds = xr.open_dataset(store, group=f"patients/{pid}", engine="zarr")
    elif how == "xr_path":
        ds = xr.open_dataset(f"{store}/patients/{pid}", engine="zarr")
    else:
        ds = open_patient(store, pid).to_dataset()
    assert "hu_2mm" in ds and expect in (ds.attrs.get("patient"), ds.attrs.get("patient_id")), (list(ds), ds.attrs)
    return ds
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t = time.perf_counter(); once(); fresh = time.perf_counter() - t
warm = []
for _ in range(3):
    t = time.perf_counter(); once(); warm.append(time.perf_counter() - t)
said = sorted({type(w.message).__name__ for w in caught if "consolidated" in str(w.message).lower()})
print(json.dumps({"fresh_s": fresh, "warm_s": sorted(warm)[1], "warnings": said}))
"""


def _child(store: Path, pid: str, how: str, *, expect: str = "P0000") -> dict:
    """Time one open in a fresh process; ``expect``: the ``patient_id`` attribute it must find (the tiny
    patients of :func:`~benchmarks.bench_open_cohort.make_store` are copies of ``P0000``)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(store), pid, how, expect], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"opening {pid!r} ({how}) in a fresh process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _layout(store_path: Path, layout: str) -> None:
    """Lay the store out as ``before`` or ``after`` (see the module's notes)."""
    import zarr

    from lungzarr.io.store import CohortStore

    store = CohortStore(store_path)
    for pid in store.patients():
        store._changing(pid)  # no patient listing
    if layout == "after":
        store.consolidate()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(store_path)


def _timed(func):
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def measure(n: int, tmp: Path, *, picks: int, cohort_max: int, before_max: int) -> dict:
    import lungzarr
    from benchmarks.bench_open_cohort import make_store

    path = tmp / f"cohort{n}.zarr"
    made, _ = _timed(lambda: make_store(path, n))
    ids = [f"P{i:04d}" for i in sorted({(k * (n - 1)) // max(picks - 1, 1) for k in range(picks)})]
    row = {"patients": n, "make_s": round(made, 1), "picked": ids}
    for layout in ("before", "after") if n <= before_max else ("after",):
        lay_s, _ = _timed(lambda: _layout(path, layout))
        out = {"layout_s": round(lay_s, 2), "root_zarr_json_bytes": (path / "zarr.json").stat().st_size,
               "patient_zarr_json_bytes": (path / "patients" / ids[0] / "zarr.json").stat().st_size}
        for how in ("xr_group", "xr_path", "lungzarr"):
            runs = [_child(path, pid, how) for pid in ids]
            out[how] = {"fresh_s": round(statistics.median(r["fresh_s"] for r in runs), 4),
                        "warm_s": round(statistics.median(r["warm_s"] for r in runs), 4),
                        "warnings": sorted({w for r in runs for w in r["warnings"]})}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made_s, trees = _timed(lambda: lungzarr.open_patients(path))
            look_s, _ = _timed(lambda: trees[ids[-1]].to_dataset())
            out["open_patients"] = {"make_s": round(made_s, 4), "lookup_s": round(look_s, 4)}
            nodules_s, frame = _timed(lambda: lungzarr.read_nodules(path))
            assert len(frame) == 3 * n
            out["read_nodules_s"] = round(nodules_s, 4)
            if n <= cohort_max:
                cohort_s, tree = _timed(lambda: lungzarr.open_cohort(path))
                assert len(tree["patients"].children) == n
                out["open_cohort_s"] = round(cohort_s, 2)
        row[layout] = out
        print(json.dumps({"patients": n, "layout": layout, **out}), flush=True)
    shutil.rmtree(path)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--picks", type=int, default=3, help="patients opened per size, spread over the cohort")
    parser.add_argument("--cohort-max", type=int, default=1000, help="open_cohort only up to this size")
    parser.add_argument("--before-max", type=int, default=1000,
                        help="the before layout only up to this size (its root listing is ~23 kB per tiny "
                             "patient: 230 MB at 10,000, parsed by every open)")
    parser.add_argument("--out", default="open_patient")
    args = parser.parse_args(argv)
    from benchmarks.bench_whole_scan import cpu_isa

    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), **cpu_isa(),
               "load_avg_start": [round(x, 1) for x in os.getloadavg()]}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lungzarr-open-patient-") as tmp:
        for n in args.sizes:
            rows.append(measure(n, Path(tmp), picks=args.picks, cohort_max=args.cohort_max,
                                before_max=args.before_max))
    machine["load_avg_end"] = [round(x, 1) for x in os.getloadavg()]
    result = {"benchmark": "open_patient", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine,
              "store": "POSIX directory (local disk), metadata files in the OS cache", "sizes": rows}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
