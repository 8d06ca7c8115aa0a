"""CPU cost of the crc32c codec on ingest, and the time `verify` takes per patient.

Ingests the real RICORD slab (``../shared/fixtures/ricord``) into fresh stores in
ONE process, alternating with and without the checksum codec
(``lungzarr.io.store.encoding.CHECKSUM_CHUNKS``), pairs in A B / B A order so a drift
of the machine's speed hits both sides alike. CPU = ``time.process_time()``
of the process (every thread: dask's threaded scheduler runs the ingest here),
wall = ``time.perf_counter()``. After each checksummed ingest the store is
verified (``pipeline.verify_store``, every chunk read and its checksum checked).
Every chunk is written in both variants (``write_empty_chunks``), so the ratio is
the codec alone. Result: ``benchmarks/results/checksum.json``. Not part of the
test suite.

Usage::

    python -m benchmarks.bench_checksum [--pairs 6] [--chunk-slices 16]
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "checksum.json"
SHARED = Path(os.environ.get("LUNGZARR_SHARED", REPO.parent / "shared"))
RICORD = SHARED / "fixtures" / "ricord" / "RICORD-1A-chest"


def _ingest(input_dir, store, *, checksums: bool, chunk_slices: int) -> dict:
    import dask

    from lungzarr.io.store import CohortStore, encoding
    from lungzarr.pipeline import ingest

    encoding.CHECKSUM_CHUNKS = checksums
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        with dask.config.set(scheduler="threads"):
            summary = ingest(input_dir, store, chunk_slices=chunk_slices)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        encoding.CHECKSUM_CHUNKS = True
    assert summary.done and not summary.failed, summary.failed
    return {"cpu_s": cpu, "wall_s": wall, "store_bytes": CohortStore(store, mode="r").size_bytes()}


def _verify(store) -> dict:
    from lungzarr.pipeline import verify_store

    cpu, wall = time.process_time(), time.perf_counter()
    report = verify_store(store)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert report.ok, report.damage
    return {"cpu_s": cpu, "wall_s": wall, "patients": len(report.patients), "chunks": report.chunks,
            "bytes": report.bytes}


def _crc_only(store) -> dict:
    """The codec's own work: CRC-32C over every stored chunk's bytes (what a write adds and a read checks)."""
    import google_crc32c

    files = [p for p in Path(store).rglob("*") if p.is_file() and p.name != "zarr.json"]
    blobs = [p.read_bytes() for p in files]
    cpu = time.process_time()
    for blob in blobs:
        google_crc32c.value(blob)
    return {"cpu_s": time.process_time() - cpu, "bytes": sum(map(len, blobs)), "files": len(files)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--chunk-slices", type=int, default=16)
    args = parser.parse_args(argv)
    if not RICORD.is_dir():
        raise SystemExit(f"RICORD fixture {str(RICORD)!r} is missing; set LUNGZARR_SHARED")
    from benchmarks.harness import preimport

    preimport()
    work = Path(tempfile.mkdtemp(prefix="bench-checksum-"))
    try:
        (work / "input").mkdir()
        (work / "input" / RICORD.name).symlink_to(RICORD, target_is_directory=True)
        _ingest(work / "input", work / "warm.zarr", checksums=True, chunk_slices=args.chunk_slices)  # warm-up
        pairs, verifies = [], []
        for k in range(args.pairs):
            order = (True, False) if k % 2 == 0 else (False, True)
            runs = {}
            for checksums in order:
                store = work / f"s{k}-{int(checksums)}.zarr"
                runs[checksums] = _ingest(work / "input", store, checksums=checksums, chunk_slices=args.chunk_slices)
                if checksums:
                    verifies.append(_verify(store))
                    crc = _crc_only(store)
                shutil.rmtree(store)
            pairs.append({"order": ["crc32c" if c else "none" for c in order], "crc32c": runs[True],
                          "none": runs[False], "cpu_ratio": runs[True]["cpu_s"] / runs[False]["cpu_s"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [p["cpu_ratio"] for p in pairs]
    result = {
        "what": "ingest of the RICORD slab, threads scheduler, one process; crc32c codec on vs off, A/B pairs",
        "patient": RICORD.name, "chunk_slices": args.chunk_slices, "pairs": pairs,
        "cpu_ratio_crc32c_over_none": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "ingest_cpu_s_median": {"crc32c": statistics.median(p["crc32c"]["cpu_s"] for p in pairs),
                                "none": statistics.median(p["none"]["cpu_s"] for p in pairs)},
        "crc32c_alone_over_the_stored_bytes": crc,
        "verify_per_patient": {"wall_s_median": statistics.median(v["wall_s"] for v in verifies),
                               "cpu_s_median": statistics.median(v["cpu_s"] for v in verifies),
                               "chunks": verifies[0]["chunks"], "bytes": verifies[0]["bytes"], "runs": verifies},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_end": os.getloadavg()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("cpu_ratio_crc32c_over_none", "ingest_cpu_s_median",
                                             "crc32c_alone_over_the_stored_bytes")}, indent=2))
    print(json.dumps({k: v for k, v in result["verify_per_patient"].items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
