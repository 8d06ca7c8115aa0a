"""What one future costs the client and the scheduler on lungzarr's local cluster, by what it brings back.

    python -m benchmarks.bench_client_per_future [--futures 300] [--rounds 2] [--name client_per_future]

Issue 29, item 2. A ``lungzarr run`` on a cluster hands the scheduler one
future per patient and stage (:func:`lungzarr.pipeline.remote.stage_task`)
plus one per patient for ingest's prefetch: seven per patient. This times
the control plane of one such future with no work in it: the client
submits a task, waits for it and (but for ``none-wait``) takes its result,
one future at a time, on the default cluster (:func:`lungzarr.cluster.dask_client`:
2 workers here, the scheduler in its own process). The task returns

* ``none-wait``: None, not fetched (submit and wait only);
* ``none-result``: None, fetched with ``future.result()``;
* ``listing-dicts``: what a stage of the last stages returns: a small record
  and the listing of a patient group's nodes (every ``zarr.json``, as parsed
  dicts);
* ``listing-text``: the same listing as one JSON text (what ``stage_task``
  returns since this benchmark).

The listing is a real one: a patient of a tiny phantom run through the six
stages on dask's threads (the store of ``tests/dicom_phantoms.make_patient``,
48 slices of 128²), read with the store's backend as ``stage_task`` reads it.
Per variant: the client process's CPU (its main thread and its event loop:
``os.times``), the scheduler process's CPU (psutil) and the wall time, per
future; the variants interleaved round by round. The client's idle rate
(``results/control_plane_final.json``: 0.005 CPU-s per second with 2
workers) times the wall per future is reported beside, as the part of the
client's CPU that is time, not work.
Writes ``benchmarks/results/NAME.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VARIANTS = ("none-wait", "none-result", "listing-dicts", "listing-text")
#: The client's idle CPU rate with 2 workers (CPU-s per second), results/control_plane_final.json.
IDLE_RATE = 0.005


def real_listing() -> dict:
    """The listing of a tiny patient's group after the six stages: ``{node: zarr.json as dict}``."""
    import dask

    sys.path.insert(0, str(REPO / "tests"))
    from dicom_phantoms import make_patient

    from lungzarr.io.store import CohortStore
    from lungzarr.pipeline import run

    with tempfile.TemporaryDirectory(prefix="lz-future-") as work:
        make_patient(Path(work) / "input" / "P1", n_slices=48, size=128, seed=0)
        with dask.config.set(scheduler="threads"):
            summaries = run(Path(work) / "input", Path(work) / "s.zarr")
        failed = [s.failed for s in summaries if s.failed]
        if failed:
            raise SystemExit(f"the phantom patient failed: {failed}")
        store = CohortStore(Path(work) / "s.zarr", mode="r")
        listing = store._backend.node_metadata(store.group_path("P1"))
    listing.pop(".", None)
    return listing


def _returns(listing: dict, variant: str):
    import json

    if variant.startswith("none"):
        return None
    payload = listing if variant == "listing-dicts" else json.dumps(listing)
    return {"record": {"completed": "2026-12-07T00:00:00+00:00", "depends_on": {"ingest": "x" * 32}},
            "warnings": [], "seconds": 0.1, "listing": payload}


def measure(client, variant: str, value, n: int, scheduler) -> dict:
    from distributed import wait

    def cpu():
        t = os.times()
        return t.user + t.system

    def scheduler_cpu():
        t = scheduler.cpu_times()
        return t.user + t.system

    c0, s0, t0 = cpu(), scheduler_cpu(), time.perf_counter()
    for _ in range(n):
        future = client.submit(_identity, value, key=f"lungzarr-future-{uuid.uuid4().hex}")
        if variant == "none-wait":
            wait(future)
        else:
            future.result()
        del future
    wall = time.perf_counter() - t0
    return {"client_cpu_ms": 1e3 * (cpu() - c0) / n, "scheduler_cpu_ms": 1e3 * (scheduler_cpu() - s0) / n,
            "wall_ms": 1e3 * wall / n, "client_idle_part_ms": 1e3 * IDLE_RATE * wall / n}


def _identity(value):
    return value


def main(argv=None) -> int:
    import json

    import psutil

    from benchmarks.harness import write_result
    from benchmarks.measure import machine
    from lungzarr.cluster.client import dask_client

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--futures", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default="client_per_future")
    args = ap.parse_args(argv)

    listing = real_listing()
    values = {v: _returns(listing, v) for v in VARIANTS}
    rounds = []
    with dask_client("local", echo=lambda s: None) as client:
        scheduler = psutil.Process(client.run_on_scheduler(os.getpid))
        measure(client, "none-result", None, 20, scheduler)  # warm: connections, the function's pickle
        for k in range(args.rounds):
            row = {v: measure(client, v, values[v], args.futures, scheduler) for v in VARIANTS}
            rounds.append(row)
            for v in VARIANTS:
                r = row[v]
                print(f"round {k + 1} {v:14s} client {r['client_cpu_ms']:.2f} ms (idle part "
                      f"{r['client_idle_part_ms']:.2f}), scheduler {r['scheduler_cpu_ms']:.2f} ms, "
                      f"wall {r['wall_ms']:.1f} ms per future", flush=True)
    median = {v: {key: statistics.median(r[v][key] for r in rounds) for key in rounds[0][v]} for v in VARIANTS}
    result = {"benchmark": "bench_client_per_future", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "futures_per_variant": args.futures, "rounds": rounds, "median": median,
              "listing_nodes": len(listing), "listing_json_bytes": len(json.dumps(listing)),
              "futures_per_patient": 7,
              "note": "one future at a time on the default local cluster; per future, no work in the task"}
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
