"""S3 requests per patient per stage: what a run costs on object storage, counted by the server.

    python -m benchmarks.bench_s3_requests [--sizes 5 20] [--before REV] [--variants before after]

A moto S3 server on loopback (a separate process, ``tests/s3_server.py`` with ``record``) writes one
line per HTTP request it receives: method, key, whether a PUT is a server-side copy, the keys of a
batch delete. Each stage of the registry then runs alone, in a fresh process
(``lungzarr.pipeline.run(..., stages=[stage])``, no dask cluster: ``--scheduler threads``), on a
cohort of N tiny phantom patients (24 x 96 x 96 DICOM) in a fresh bucket: ingest first, then each
stage over the store. After the last stage, ``read_nodules`` and ``read_patients`` read the two cohort
tables (``read``), and the consolidated metadata is dropped and written afresh under the lock
(``consolidate``: what the end of every run costs). Each request is counted by method (GET, PUT,
COPY, HEAD, LIST, DELETE: a batch delete counts once) and by the part of the store it names
(``root`` zarr.json, ``tables/``, ``patients/<id>/``, ``staging/``, ``lock``, the run check's
probe, the bucket).

Two code trees run against the same server, interleaved per cohort size: ``after`` is this checkout,
``before`` the lungzarr package of ``--before`` (default: the merge base with main), extracted with
``git archive``. For each, per stage and per key class: the count at each N, ``per_patient`` (the
count over N at the largest N) and ``marginal`` ((count at the largest N - count at the smallest) /
their difference: what one more patient costs; what a run costs whatever its size is the rest).
Writes ``benchmarks/results/s3_requests.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, unquote

from benchmarks.measure import machine

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
STORE = "cohort.zarr"

# One stage alone, in a fresh process; a patient's failure fails the benchmark.
_DRIVER = """
import sys
import lungzarr
from lungzarr.pipeline import run
inp, url, stage, tree = sys.argv[1:5]
assert lungzarr.__file__.startswith(tree), (lungzarr.__file__, tree)  # the code tree asked for
summaries = run(inp or None, url, stages=[stage])
failed = [f for s in summaries for f in s.failed]
if failed:
    sys.exit(f"stage {stage} failed: {failed}")
"""
# What the end of every run costs for the consolidated metadata: the lock taken, the metadata dropped,
# the lock released (which writes it afresh from every node's zarr.json).
_CONSOLIDATE = """
import sys
from lungzarr.io.store import CohortStore
store = CohortStore(sys.argv[1])
with store.lock():
    if hasattr(store, "drop_consolidated"):  # a tree with one listing of the whole cohort, rewritten at release
        store.drop_consolidated()
if hasattr(store, "is_consolidated"):
    assert store.is_consolidated()
# A tree with per-patient listings (issue 29) writes each with its patient's commits: what ends a run is
# only the lock taken and released.
"""
_READER = """
import sys
import lungzarr
url, n = sys.argv[1], int(sys.argv[2])
assert len(lungzarr.read_patients(url)) == n, "patient table"
lungzarr.read_nodules(url)
"""


def phantom_input(folder: Path, n: int) -> Path:
    """``n`` small phantom patients (24 x 96 x 96, one nodule each) as DICOM series."""
    from lungzarr.algorithms.phantom import PhantomNodule, chest_phantom
    from lungzarr.io.dicom import write_series

    for i in range(n):
        pid = f"P{i:03d}"
        hu, origin = chest_phantom(shape=(24, 96, 96), spacing=(2.5, 2.0, 2.0), seed=i + 1,
                                   nodules=(PhantomNodule(-30.0, -5.0, -35.0, 12.0),))
        write_series(hu, folder / pid, spacing=(2.5, 2.0, 2.0), origin=origin, patient_id=pid)
    return folder


def classify(entry: dict, bucket: str) -> tuple[str, str]:
    """``(method, part)`` of one recorded request of a store ``s3://bucket/cohort.zarr``."""
    path = unquote(entry["path"]).lstrip("/")
    query = parse_qs(entry.get("query", ""), keep_blank_values=True)
    method = entry["method"]
    if not path.startswith(bucket):
        return method, "other bucket"
    key = path[len(bucket):].lstrip("/")
    if method == "GET" and not key and ("list-type" in query or "prefix" in query):
        method, key = "LIST", query.get("prefix", [""])[0]
    elif method == "POST" and "delete" in query:
        method, key = "DELETE", (entry.get("keys") or [""])[0]
    elif method == "PUT" and entry.get("copy"):
        method = "COPY"
    return method, part_of(key)


def part_of(key: str) -> str:
    """The part of the store a key (or listed prefix) names."""
    if key == f"{STORE}.lock":
        return "lock"
    if key.startswith(".lungzarr-write-check"):
        return "run check"
    if not key:
        return "bucket"
    if not key.startswith(STORE):
        return "other"
    rel = key[len(STORE):].strip("/")
    if rel == "zarr.json":
        return "root zarr.json"
    if not rel:
        return "root prefix"
    top = rel.split("/")[0]
    if top == "patients" and rel.count("/") >= 1 and rel.split("/")[1] not in ("", "zarr.json"):
        return "patients/<id>/"
    return f"{top}/"


def counted(lines: list[str], bucket: str) -> dict:
    """Counts by method, by part, and by method and part, of the recorded requests on ``bucket``."""
    by_method, by_part, by_both = Counter(), Counter(), Counter()
    for line in lines:
        method, part = classify(json.loads(line), bucket)
        if part == "other bucket":
            continue
        by_method[method] += 1
        by_part[part] += 1
        by_both[f"{method} {part}"] += 1
    return {"total": sum(by_method.values()), "method": dict(by_method), "part": dict(by_part),
            "method_part": dict(sorted(by_both.items()))}


def _tree(rev: str, into: Path) -> Path:
    """The lungzarr package and the model weights of ``rev``, extracted (what ``before`` imports)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "lungzarr", "models"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def one_cohort(code: Path, input_dir: Path, n: int, bucket: str, record: Path, stages: list[str]) -> dict:
    """Every stage alone, then the reader, on a fresh bucket: ``{stage: counts}`` and the seconds each took."""
    url = f"s3://{bucket}/{STORE}"
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = {}
    steps = [(s, [sys.executable, "-c", _DRIVER, str(input_dir) if i == 0 else "", url, s, str(code)])
             for i, s in enumerate(stages)]
    steps.append(("read", [sys.executable, "-c", _READER, url, str(n)]))
    steps.append(("consolidate", [sys.executable, "-c", _CONSOLIDATE, url]))
    for name, cmd in steps:
        before = _lines(record)
        start = time.perf_counter()
        # In the tree's folder: ``python -c`` puts the working directory first on the path.
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)
        if r.returncode != 0:
            raise RuntimeError(f"{name} ({code}) failed:\n{r.stderr[-3000:]}")
        # The last requests of a process are answered before it exits, and recorded before they are answered.
        out[name] = {**counted(_lines(record)[len(before):], bucket), "seconds": round(time.perf_counter() - start, 1)}
    return out


def _lines(record: Path) -> list[str]:
    try:
        return record.read_text().splitlines()
    except FileNotFoundError:
        return []


def per_stage(by_n: dict, stages: list[str], lo: int, hi: int) -> dict:
    """Per stage, and for ``all_stages`` (their sum: the pipeline run stage by stage), at ``hi`` patients:
    ``per_patient`` (count / N), ``marginal`` (what one more patient costs: the counts' difference over
    the sizes' difference) and ``fixed`` (what a run costs whatever its size: the count at ``lo`` less
    ``lo`` marginals); each also by part of the store and by method."""
    def summed(counts: dict) -> dict:
        out = {"total": sum(counts[s]["total"] for s in stages)}
        for kind in ("part", "method"):
            out[kind] = dict(sum((Counter(counts[s][kind]) for s in stages), Counter()))
        return out

    def row(a: dict, b: dict, key=None) -> dict:
        x, y = (a["total"], b["total"]) if key is None else (a.get(key, 0), b.get(key, 0))
        marginal = (y - x) / (hi - lo)
        return {"per_patient": round(y / hi, 1), "marginal": round(marginal, 1), "fixed": round(x - lo * marginal, 1)}

    out = {}
    for stage in [*by_n[hi], "all_stages"]:
        a, b = ((by_n[lo][stage], by_n[hi][stage]) if stage != "all_stages"
                else (summed(by_n[lo]), summed(by_n[hi])))
        out[stage] = row(a, b)
        for kind in ("part", "method"):
            keys = sorted(set(a[kind]) | set(b[kind]))
            rows = {k: row(a[kind], b[kind], k) for k in keys}
            for figure in ("marginal", "per_patient", "fixed"):
                out[stage][f"{figure}_by_{kind}"] = {k: r[figure] for k, r in rows.items()}
    return out


def _merge_base() -> str:
    return subprocess.run(["git", "-C", str(REPO), "merge-base", "HEAD", "main"], check=True, capture_output=True,
                          text=True).stdout.strip()


def main(argv=None) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import moto_s3  # noqa: E402  (the tests' server, with its request record)

    from lungzarr.pipeline.stages import stage_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[5, 20])
    parser.add_argument("--before", default=None, help="git revision of 'before' (default: merge base with main)")
    parser.add_argument("--variants", nargs="+", default=["before", "after"], choices=["before", "after"])
    parser.add_argument("--out", type=Path, default=RESULTS / "s3_requests.json")
    args = parser.parse_args(argv)
    before_rev = args.before or _merge_base()
    stages = list(stage_names())
    lo, hi = sorted(args.sizes)
    results = {v: {} for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="lungzarr-s3req-") as tmp:
        tmp = Path(tmp)
        trees = {"after": REPO}
        if "before" in args.variants:
            trees["before"] = _tree(before_rev, tmp / "before")
        inputs = {n: phantom_input(tmp / f"input{n}", n) for n in (lo, hi)}
        record = tmp / "requests.jsonl"
        import boto3

        with moto_s3(key_id="bench", secret="bench-secret", log=tmp / "moto.log", record=record):
            s3 = boto3.client("s3")
            for i, n in enumerate((lo, hi)):
                # Interleaved: the variants alternate which goes first.
                order = args.variants if i % 2 == 0 else args.variants[::-1]
                for variant in order:
                    bucket = f"req-{variant}-{n}-{int(time.time())}"
                    s3.create_bucket(Bucket=bucket)
                    results[variant][n] = one_cohort(trees[variant], inputs[n], n, bucket, record, stages)
                    print(variant, n, {s: r["total"] for s, r in results[variant][n].items()}, flush=True)
    result = {"benchmark": "s3_requests", "command": "python -m benchmarks.bench_s3_requests "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "sizes": [lo, hi], "stages": [*stages, "read", "consolidate"],
              "before_rev": before_rev,
              "note": "moto server on 127.0.0.1 recording each request it receives; each stage alone in a fresh "
                      "process (lungzarr.pipeline.run, no dask cluster), tiny phantom patients (24 x 96 x 96); "
                      "'read': read_patients + read_nodules after the last stage; 'consolidate': the lock taken, "
                      "the consolidated metadata dropped and written afresh at the lock's release (what ends every "
                      "run); a batch delete counts once",
              "variants": {v: {"counts": {str(n): r for n, r in by_n.items()},
                               **({"per_stage": per_stage(by_n, stages, lo, hi)} if len(by_n) == 2 else {})}
                           for v, by_n in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
