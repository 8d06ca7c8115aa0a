"""The same ``lungzarr run`` to a local directory and to a loopback S3 server, interleaved.

    python -m benchmarks.bench_object_store [--input small|lidc] [--rounds 2]

Each round runs the CLI (``python -m lungzarr.cli run INPUT STORE --scheduler threads``, one
process: its CPU is the run's) once to a fresh directory and once to a fresh bucket of a moto
S3 server (``moto.server`` on 127.0.0.1, a separate process started here, its CPU measured
too), alternating which goes first. Measured per run: wall seconds, the run process's CPU
seconds (user + system), the S3 server's CPU seconds and HTTP requests, and the store's size.
The input is three small phantom patients (``small``, 24 x 96 x 96, the whole pipeline with the
UNet in seconds) or the shared LIDC slab (``lidc``). Writes
``benchmarks/results/object_store.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import machine
from benchmarks.s3server import moto_server, requests_logged

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def small_input(folder: Path) -> Path:
    from lungzarr.algorithms.phantom import PhantomNodule, chest_phantom
    from lungzarr.io.dicom import write_series

    for pid, seed in (("SMALL-1", 1), ("SMALL-2", 2), ("SMALL-3", 3)):
        hu, origin = chest_phantom(shape=(24, 96, 96), spacing=(2.5, 2.0, 2.0), seed=seed,
                                   nodules=(PhantomNodule(-30.0, -5.0, -35.0, 12.0),))
        write_series(hu, folder / pid, spacing=(2.5, 2.0, 2.0), origin=origin, patient_id=pid)
    return folder


def lidc_input(folder: Path) -> Path:
    shared = Path(os.environ.get("LUNGZARR_SHARED", REPO.parent / "shared"))
    lidc = shared / "fixtures" / "lidc" / "LIDC-IDRI-0001"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / lidc.name).symlink_to(lidc, target_is_directory=True)
    return folder


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(input_dir: Path, store: str, log: Path, server) -> dict:
    import psutil

    from lungzarr.io.store import CohortStore

    cmd = [sys.executable, "-m", "lungzarr.cli", "run", str(input_dir), store, "--scheduler", "threads"]
    server_proc = psutil.Process(server.pid)
    server_cpu = sum(server_proc.cpu_times()[:2])
    requests = requests_logged(log)
    cpu = _children_cpu()
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    out = {"wall_s": round(wall, 2), "cpu_s": round(_children_cpu() - cpu, 2)}
    if store.startswith("s3://"):
        out["server_cpu_s"] = round(sum(server_proc.cpu_times()[:2]) - server_cpu, 2)
        out["requests"] = requests_logged(log) - requests
    out["size_mb"] = round(CohortStore(store, mode="r").size_bytes() / 1e6, 2)
    return out


def commit_cost(input_dir: Path, bucket: str) -> dict:
    """An in-process ingest to S3 with the staged commits (server-side copies) timed apart."""
    from lungzarr.io.store import objects as storage
    from lungzarr.pipeline import ingest

    spent = {"commits": 0, "objects": 0, "seconds": 0.0}
    original = storage._ObjectBackend.commit_staged

    def timed(self, staged, final):
        start = time.perf_counter()
        spent["objects"] += len(self.fs.find(staged.key))
        original(self, staged, final)
        spent["commits"] += 1
        spent["seconds"] += time.perf_counter() - start

    storage._ObjectBackend.commit_staged = timed
    try:
        start = time.perf_counter()
        summary = ingest(input_dir, f"s3://{bucket}/commit.zarr")
        total = time.perf_counter() - start
    finally:
        storage._ObjectBackend.commit_staged = original
    assert not summary.failed, summary.failed
    return {"ingest_s": round(total, 2), "commit_s": round(spent["seconds"], 2), "commits": spent["commits"],
            "objects_copied": spent["objects"], "commit_share": round(spent["seconds"] / total, 3)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", choices=["small", "lidc"], default="small")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "object_store.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lungzarr-s3bench-") as tmp:
        tmp = Path(tmp)
        input_dir = (small_input if args.input == "small" else lidc_input)(tmp / "input")
        log = tmp / "moto.log"
        runs = {"directory": [], "s3": []}
        with moto_server(log) as (server, new_bucket):
            for i in range(args.rounds):
                order = ("directory", "s3") if i % 2 == 0 else ("s3", "directory")
                for kind in order:
                    store = str(tmp / f"run{i}.zarr") if kind == "directory" else f"s3://{new_bucket()}/cohort.zarr"
                    row = run_once(input_dir, store, log, server)
                    print(kind, json.dumps(row), flush=True)
                    runs[kind].append(row)
            commit = commit_cost(input_dir, new_bucket())
            print("commit", json.dumps(commit), flush=True)
    summary = {kind: {key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}
               for kind, rows in runs.items()}
    summary["s3_over_directory"] = {k: round(summary["s3"][k] / summary["directory"][k], 2)
                                    for k in ("wall_s", "cpu_s")}
    result = {"benchmark": "object_store", "input": args.input,
              "command": "lungzarr run INPUT STORE --scheduler threads", "rounds": args.rounds, "machine": machine(),
              "note": "moto server on 127.0.0.1 (a separate process, single host): request latency is loopback, "
                      "not a real S3 region's; --scheduler threads, one process per run",
              "runs": runs, "median": summary, "s3_ingest_commit": commit}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous[args.input] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(previous, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
