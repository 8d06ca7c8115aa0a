"""Opening one patient of a cohort store of 100, 1,000 and 10,000 patients: a cohort-wide listing (before)
against one listing per patient group (after).

    python -m benchmarks.bench_open_patient [--sizes 100 1000 10000] [--picks 3] [--out NAME]
    python -m benchmarks.bench_open_patient --s3 [--sizes 100 1000]    # on a loopback S3 server

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

``--s3``: the same opens of an ``s3://`` URL on a moto S3 server on loopback
(``tests/s3_server.py``, a separate process recording every request it
receives; each child process gets its endpoint and credentials from its
``AWS_*`` environment, as any reader would). The store is made and laid out
both ways locally, then uploaded; the two layouts differ only in the root's and
each patient group's ``zarr.json``, so a layout is set on the bucket by PUTting
those, and the layouts and the sizes are measured interleaved, pick by pick (:func:`_on_s3`).
Each open's requests are counted by the server. ``open_cohort`` up to 100
patients only. Writes ``benchmarks/results/open_patient_s3.json``.
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
record = sys.argv[5] if len(sys.argv) > 5 else ""
def recorded():  # lines in the S3 server's request record (each written before its answer), untimed
    return sum(1 for _ in open(record)) if record else 0
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
    a = recorded(); t = time.perf_counter(); once(); fresh = time.perf_counter() - t; lines = [[a, recorded()]]
warm = []
for _ in range(3):
    a = recorded(); t = time.perf_counter(); once(); warm.append(time.perf_counter() - t); lines.append([a, recorded()])
said = sorted({type(w.message).__name__ for w in caught if "consolidated" in str(w.message).lower()})
print(json.dumps({"fresh_s": fresh, "warm_s": sorted(warm)[1], "warnings": said, "record_lines": lines}))
"""


def _child(store, pid: str, how: str, *, expect: str = "P0000", record: Path | None = None,
           env: dict | None = None) -> dict:
    """One open of ``how`` in a fresh process; ``expect``: the patient id it must find (the tiny patients of
    :func:`~benchmarks.bench_open_cohort.make_store` are copies of ``P0000``); ``record``: the S3 server's
    request record, ``env``: the ``AWS_*`` variables that point at that server (the child's only way to its
    endpoint and credentials)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, "-c", _CHILD, str(store), pid, how, expect, *([str(record)] if record else [])]
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the {how} open of {pid} in {store} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _picked(n: int, picks: int) -> list[str]:
    """``picks`` patient ids spread over a cohort of ``n`` (first and last included)."""
    return [f"P{i:04d}" for i in sorted({(k * (n - 1)) // max(picks - 1, 1) for k in range(picks)})]


def _machine() -> dict:
    from benchmarks.bench_whole_scan import cpu_isa

    return {"cpus": os.cpu_count(), "python": platform.python_version(), **cpu_isa(),
            "load_avg_start": [round(x, 1) for x in os.getloadavg()]}


LAYOUTS = ("before", "after")
HOWS = ("xr_group", "xr_path", "lungzarr")


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


def in_process(path, n: int, pid: str, *, cohort_max: int, requests=None) -> dict:
    """In this process: :func:`lungzarr.open_patients` made and ``pid`` looked up, ``read_nodules``, and
    ``open_cohort`` (``n <= cohort_max``); with ``requests`` (:class:`Requests`)
    the S3 requests each asked too."""
    import lungzarr

    out = {}

    def step(func):
        start = requests.mark() if requests else None
        seconds, result = _timed(func)
        return seconds, result, (requests.since(start)["total"] if requests else None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made_s, trees, made_n = step(lambda: lungzarr.open_patients(path))
        look_s, _, look_n = step(lambda: trees[pid].to_dataset())
        out["open_patients"] = {"make_s": round(made_s, 4), "lookup_s": round(look_s, 4)}
        nodules_s, frame, nodules_n = step(lambda: lungzarr.read_nodules(path))
        assert len(frame) == 3 * n
        out["read_nodules_s"] = round(nodules_s, 4)
        if requests:
            out["open_patients"].update(make_requests=made_n, lookup_requests=look_n)
            out["read_nodules_requests"] = nodules_n
        if n <= cohort_max:
            cohort_s, tree, cohort_n = step(lambda: lungzarr.open_cohort(path))
            assert len(tree["patients"].children) == n
            out["open_cohort_s"] = round(cohort_s, 2)
            if requests:
                out["open_cohort_requests"] = cohort_n
    return out


def _timed(func):
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def measure(n: int, tmp: Path, *, picks: int, cohort_max: int, before_max: int) -> dict:
    from benchmarks.bench_open_cohort import make_store

    path = tmp / f"cohort{n}.zarr"
    made, _ = _timed(lambda: make_store(path, n))
    ids = _picked(n, picks)
    row = {"patients": n, "make_s": round(made, 1), "picked": ids}
    for layout in LAYOUTS if n <= before_max else ("after",):
        lay_s, _ = _timed(lambda: _layout(path, layout))
        out = {"layout_s": round(lay_s, 2), "root_zarr_json_bytes": (path / "zarr.json").stat().st_size,
               "patient_zarr_json_bytes": (path / "patients" / ids[0] / "zarr.json").stat().st_size}
        for how in HOWS:
            runs = [_child(path, pid, how) for pid in ids]
            out[how] = {"fresh_s": round(statistics.median(r["fresh_s"] for r in runs), 4),
                        "warm_s": round(statistics.median(r["warm_s"] for r in runs), 4),
                        "warnings": sorted({w for r in runs for w in r["warnings"]})}
        out.update(in_process(path, n, ids[-1], cohort_max=cohort_max))
        row[layout] = out
        print(json.dumps({"patients": n, "layout": layout, **out}), flush=True)
    shutil.rmtree(path)
    return row


class Requests:
    """The S3 server's request record (``tests/s3_server.py``, one JSON line per request, written before
    its answer), read by line numbers: what a step asked, counted by
    :func:`benchmarks.bench_s3_requests.counted` (by method and by part of the store)."""

    def __init__(self, record: Path, bucket: str):
        self.record, self.bucket = record, bucket

    def mark(self) -> int:
        return len(self.lines())

    def lines(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def since(self, start: int, end: int | None = None) -> dict:
        from benchmarks.bench_s3_requests import counted

        return counted(self.lines()[start:end], self.bucket)


def _files(root: Path) -> dict:
    """``{key relative to root: bytes}`` of every file below ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class _OnS3:
    """One cohort size in its own bucket of the loopback S3 server, made by :meth:`prepare`: the store
    made here (:func:`measure`'s), laid out both ways in two local copies, the ``before`` copy uploaded (one
    PUT per file). The two layouts differ only in the root's and each patient group's ``zarr.json``
    (checked), so :meth:`lay_out` sets either on the bucket by PUTting those."""

    def __init__(self, n: int, *, bucket: str, requests: Requests, picks: int):
        from benchmarks.bench_s3_requests import STORE

        self.n, self.bucket, self.requests = n, bucket, requests
        self.key, self.url = f"{bucket}/{STORE}", f"s3://{bucket}/{STORE}"
        self.row = {"patients": n, "picked": _picked(n, picks)}
        self.runs = {layout: {how: [] for how in HOWS} for layout in LAYOUTS}
        self.probes = {"list_s": [], "get_s": [], "requests": []}
        self.current = None

    def prepare(self, tmp: Path) -> None:
        import fsspec

        from benchmarks.bench_open_cohort import make_store

        local = {layout: tmp / f"{layout}{self.n}.zarr" for layout in LAYOUTS}
        made, _ = _timed(lambda: make_store(local["after"], self.n))
        shutil.copytree(local["after"], local["before"])
        self.row["make_s"] = round(made, 1)
        files, first = {}, f"patients/{self.row['picked'][0]}/zarr.json"
        for layout in LAYOUTS:
            lay_s, _ = _timed(lambda: _layout(local[layout], layout))
            files[layout] = _files(local[layout])
            self.row[layout] = {"layout_s": round(lay_s, 2), "root_zarr_json_bytes": len(files[layout]["zarr.json"]),
                                "patient_zarr_json_bytes": len(files[layout][first])}
            shutil.rmtree(local[layout])
        assert files["before"].keys() == files["after"].keys()
        differ = sorted(k for k in files["before"] if files["before"][k] != files["after"][k])
        assert all(k == "zarr.json" or (k.startswith("patients/") and k.count("/") == 2 and k.endswith("/zarr.json"))
                   for k in differ), differ[:5]
        # No listing cache (each probe lists afresh); one GET per read, no HEAD first (as lungzarr reads).
        self.fs, _ = fsspec.url_to_fs(self.url, use_listings_cache=False, max_concurrency=1)
        upload_s, _ = _timed(lambda: self.fs.pipe({f"{self.key}/{k}": v for k, v in files["before"].items()}))
        self.row.update(objects=len(files["before"]), upload_s=round(upload_s, 1), layout_objects=len(differ))
        self.layouts = {layout: {k: files[layout][k] for k in differ} for layout in LAYOUTS}
        self.current = "before"

    def lay_out(self, layout: str) -> None:
        """The objects of the other layout replaced: PUTs only, nothing of it left."""
        if self.current != layout:
            seconds, _ = _timed(lambda: self.fs.pipe({f"{self.key}/{k}": v for k, v in self.layouts[layout].items()}))
            self.row[layout].setdefault("switch_s", []).append(round(seconds, 1))
            self.current = layout

    def probe(self, pid: str, rounds: int = 5) -> None:
        """What the server takes for one LIST of a patient's prefix and one GET of a small object at this
        bucket's size (moto scans every key of a bucket for each LIST; S3 lists by prefix)."""
        for _ in range(rounds):
            start = self.requests.mark()
            list_s, _ = _timed(lambda: self.fs.find(f"{self.key}/patients/{pid}"))
            get_s, _ = _timed(lambda: self.fs.cat_file(f"{self.key}/patients/{pid}/hu/zarr.json"))
            self.probes["list_s"].append(list_s)
            self.probes["get_s"].append(get_s)
            self.probes["requests"].append(self.requests.since(start)["total"])

    def opens(self, k: int, layout: str, env: dict) -> None:
        """The fresh-process opens of pick ``k`` in ``layout``."""
        self.lay_out(layout)
        for how in HOWS:
            self.runs[layout][how].append(_child(self.url, self.row["picked"][k], how,
                                                 record=self.requests.record, env=env))

    def finish(self, *, cohort_max: int) -> dict:
        """The medians and request counts of the opens, then the in-process steps of each layout."""
        self.row["server_probe"] = {"list_s": round(statistics.median(self.probes["list_s"]), 4),
                                    "get_s": round(statistics.median(self.probes["get_s"]), 4),
                                    "requests": statistics.median(self.probes["requests"])}
        for layout in sorted(LAYOUTS, key=lambda lay: lay != self.current):  # the one laid out now first
            self.lay_out(layout)
            out = self.row[layout]
            for how in HOWS:
                got = self.runs[layout][how]
                fresh = [self.requests.since(*r["record_lines"][0]) for r in got]
                warm = [self.requests.since(*lines)["total"] for r in got for lines in r["record_lines"][1:]]
                typical = sorted(fresh, key=lambda c: c["total"])[len(fresh) // 2]
                out[how] = {"fresh_s": round(statistics.median(r["fresh_s"] for r in got), 4),
                            "warm_s": round(statistics.median(r["warm_s"] for r in got), 4),
                            "fresh_picks_s": [round(r["fresh_s"], 3) for r in got],
                            "requests_fresh": typical["total"], "requests_warm": statistics.median(warm),
                            "requests_fresh_by": typical["method_part"],
                            "warnings": sorted({w for r in got for w in r["warnings"]})}
            out.update(in_process(self.url, self.n, self.row["picked"][-1], cohort_max=cohort_max,
                                  requests=self.requests))
            print(json.dumps({"patients": self.n, "layout": layout, **out}), flush=True)
        self.fs.rm(self.key, recursive=True)
        return self.row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--s3", action="store_true",
                        help="on a moto S3 server on loopback (a separate process), requests counted; "
                             "writes open_patient_s3 unless --out")
    parser.add_argument("--sizes", type=int, nargs="+", help="default 100 1000 10000; with --s3 100 1000")
    parser.add_argument("--picks", type=int, default=3, help="patients opened per size, spread over the cohort")
    parser.add_argument("--cohort-max", type=int,
                        help="open_cohort only up to this size (default 1000; with --s3 100: at 1,000 on S3 it "
                             "took 89 s with each patient's listing, results/open_cohort.json)")
    parser.add_argument("--before-max", type=int, default=1000,
                        help="the before layout only up to this size (its root listing is ~23 kB per tiny "
                             "patient: 230 MB at 10,000, parsed by every open)")
    parser.add_argument("--out", help="results/OUT.json (default open_patient, with --s3 open_patient_s3)")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([100, 1000] if args.s3 else [100, 1000, 10000])
    cohort_max = args.cohort_max if args.cohort_max is not None else (100 if args.s3 else 1000)
    if args.s3 and max(sizes) > args.before_max:
        parser.error(f"--s3 compares both layouts at every size: --sizes up to --before-max ({args.before_max})")
    machine = _machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lungzarr-open-patient-") as tmp:
        if args.s3:
            rows, machine["load_avg_picks"], store = _on_s3(sizes, Path(tmp), picks=args.picks,
                                                            cohort_max=cohort_max)
        else:
            for n in sizes:
                rows.append(measure(n, Path(tmp), picks=args.picks, cohort_max=cohort_max,
                                    before_max=args.before_max))
            store = "POSIX directory (local disk), metadata files in the OS cache"
    machine["load_avg_end"] = [round(x, 1) for x in os.getloadavg()]
    result = {"benchmark": "open_patient_s3" if args.s3 else "open_patient",
              "command": "python -m benchmarks.bench_open_patient " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "store": store, "sizes": rows}
    (RESULTS / f"{args.out or ('open_patient_s3' if args.s3 else 'open_patient')}.json").write_text(
        json.dumps(result, indent=1) + "\n")
    return result


def _on_s3(sizes, tmp: Path, *, picks: int, cohort_max: int):
    """Every size on one moto S3 server (``tests/s3_server.py``, recording each request), a bucket each, all
    made first; then pick by pick, size by size, both layouts (which first alternating), so that the
    sizes and the layouts see the same load on a shared machine."""
    import uuid

    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import moto_s3  # noqa: E402  (the tests' server, with its request record)

    record = tmp / "requests.jsonl"
    with moto_s3(key_id="bench", secret=f"bench-{uuid.uuid4().hex}", log=tmp / "moto.log", record=record) as (_, env):
        import boto3

        states = []
        for n in sizes:
            bucket = f"open-patient-{n}-{uuid.uuid4().hex[:8]}"
            boto3.client("s3").create_bucket(Bucket=bucket)
            states.append(_OnS3(n, bucket=bucket, requests=Requests(record, bucket), picks=picks))
            states[-1].prepare(tmp)
            print(json.dumps({k: v for k, v in states[-1].row.items() if k not in LAYOUTS}), flush=True)
        load = []
        for k in range(picks):
            load.append([round(x, 1) for x in os.getloadavg()])
            for i, state in enumerate(states if k % 2 == 0 else states[::-1]):
                state.probe(state.row["picked"][k])
                for layout in LAYOUTS if (k + i) % 2 == 0 else LAYOUTS[::-1]:
                    state.opens(k, layout, env)
        rows = [state.finish(cohort_max=cohort_max) for state in states]
    return rows, load, (
        "moto S3 server (tests/s3_server.py: moto's app, recording each request) on 127.0.0.1, a separate process; "
        "each store made in a local directory, laid out there, then uploaded to its own bucket (one PUT per file); "
        "requests_*: HTTP requests the server received during one open (fresh: the pick with the median count; "
        "warm: median over picks and repeats); server_probe: one LIST of a patient's prefix and one GET of a "
        "small object from this process, median of 5 per pick (moto scans every key of the bucket per LIST)")


if __name__ == "__main__":
    main()
