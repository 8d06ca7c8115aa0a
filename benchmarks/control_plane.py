"""The client process's CPU per patient: lungzarr before and after a change to its control plane.

    python -m benchmarks.control_plane [--before REV] [--patients 6] [--workers 2 16] [--rounds 2]
                                       [--stages all] [--variants before after] [--out NAME]

Each variant runs ``pipeline.run`` (by default ingest, segment; ``--stages
all``: every stage) on the default local cluster in a fresh child process,
interleaved round by round (the order alternates), on the same synthetic
cohort (``tests/dicom_phantoms.make_patient``, 48 slices of 128²), with a
:class:`~lungzarr.pipeline.progress.ProgressBoard` as its progress (what the
CLI's display is fed; ``--no-progress``: none):

* ``before``: the lungzarr of ``REV`` (default the merge base with ``main``),
  extracted with ``git archive``.
* ``after``: this tree.
* ``after-inprocess``: this tree with ``scheduler_process=False`` (the
  scheduler in the client process, as a plain LocalCluster has it).

The client's CPU is ``getrusage(RUSAGE_SELF)`` of the child (children, i.e.
the workers and the scheduler process, excluded) around the run, after one
warm-up patient; the idle rate (heartbeats) is sampled for 5 s first and
``above_idle`` subtracts it over the run's wall time (the marginal CPU per
patient). The scheduler process's CPU is reported beside it (and above its
own idle rate, sampled over the same 5 s), and the
progress events the run gave (``chunk`` events per patient: the display
moved). Each child hashes, per patient, the stored arrays (every variable's
values) and the stage records (times, ids and versions left out) apart, so
a difference names what differs. Writes ``benchmarks/results/<OUT>.json``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STAGES = ["ingest", "segment"]
IDLE_PROBE_S = 5.0


# ---------------------------------------------------------------------- child

def _cpu_self() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


#: Stage record fields left out of the digest: when and by which run (and version) a stage was committed.
RUN_FIELDS = ("completed", "id", "depends_on", "lungzarr_version")


def _store_digest(store) -> dict:
    """Per patient: sha256 of each stored variable's values and of each stage record (:data:`RUN_FIELDS` left
    out), and of all of them (``arrays``, ``records``)."""
    import hashlib

    import numpy as np

    try:
        from lungzarr.io.store import CohortStore
    except ImportError:  # a tree from before io/store/ (one module then)
        from lungzarr.io.storage import CohortStore

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    cs = CohortStore(store, mode="r")
    out = {}
    for patient in cs.patients():
        ds = cs.open_patient(patient).load()
        variables = {}
        for name in sorted(ds.variables):
            values = ds[name].values
            variables[str(name)] = sha(values.astype(str).tobytes() if values.dtype == object
                                       else np.ascontiguousarray(values).tobytes())
        stages = {s: sha(json.dumps({k: v for k, v in r.items() if k not in RUN_FIELDS}, sort_keys=True,
                                    default=str).encode()) for s, r in cs.stages(patient).items()}
        out[patient] = {"arrays": sha(json.dumps(variables, sort_keys=True).encode()),
                        "records": sha(json.dumps(stages, sort_keys=True).encode()),
                        "variables": variables, "stages": stages}
    return out


def _differences(rows) -> list[dict]:
    """Per patient whose ``arrays`` or ``records`` digest is not the same in every row: which variables and
    which stage records differ (or exist in some rows only), and the rows of each digest."""
    out = []
    for patient in sorted({p for r in rows for p in r["digest"]}):
        digests = [r["digest"].get(patient, {}) for r in rows]
        for part, items in (("arrays", "variables"), ("records", "stages")):
            seen = {}
            for r, d in zip(rows, digests):
                seen.setdefault(d.get(part), []).append(f"{r['variant']}-{r['workers']}w-{r['round']}")
            if len(seen) > 1:
                names = sorted({n for d in digests for n in d.get(items, {})})
                differ = [n for n in names if len({d.get(items, {}).get(n) for d in digests}) > 1]
                out.append({"patient": patient, "part": part, items: differ,
                            "rows": {str(k): v for k, v in seen.items()}})
    return out


def child(args: dict) -> dict:
    import inspect

    import psutil

    from lungzarr import pipeline
    from lungzarr.cluster import dask_client

    kwargs = {}
    if "scheduler_process" in inspect.signature(dask_client).parameters:
        kwargs["scheduler_process"] = args["scheduler_process"]
    work = Path(args["work"])
    store = work / f"store-{args['variant']}-{args['workers']}w-{args['round']}.zarr"
    warm_store = work / f"warm-{args['variant']}-{args['workers']}w-{args['round']}.zarr"
    t0 = time.perf_counter()
    with dask_client("local", n_workers=args["workers"], threads_per_worker=1, echo=lambda s: None,
                     **kwargs) as client:
        start_s = time.perf_counter() - t0
        scheduler_pid = getattr(getattr(client.cluster, "scheduler", None), "pid", None)
        scheduler = psutil.Process(scheduler_pid) if scheduler_pid not in (None, os.getpid()) else None

        def scheduler_cpu():
            if scheduler is None:
                return 0.0
            t = scheduler.cpu_times()
            return t.user + t.system

        # One patient first: imports and first-call costs on the client and the workers are not per-patient.
        # "all": each tree's own full stage list (pipeline.run's default), which older trees may not share.
        stages = None if args.get("stages") == "all" else (args.get("stages") or STAGES)
        # With detect among them, one crop in every tree: fixed, the only one (and the default) of the trees
        # older than --crop; newer trees default to the lung box, and the variants must write the same store.
        # --crop lungs (the default of `lungzarr run` now) for trees that all have it.
        crop = {"crop": args.get("crop") or "fixed"} if "crop" in inspect.signature(pipeline.run).parameters \
            else {}
        pipeline.run(args["input"], warm_store, stages=stages, client=client, chunk_slices=16,
                     patients=[args["warm"]], **crop)
        c0, s0 = _cpu_self(), scheduler_cpu()
        time.sleep(IDLE_PROBE_S)
        idle = (_cpu_self() - c0) / IDLE_PROBE_S
        scheduler_idle = (scheduler_cpu() - s0) / IDLE_PROBE_S  # heartbeats of the workers, the idle loop
        patients = [p for p in args["patients"]]
        events = {}
        try:
            from lungzarr.pipeline.progress import ProgressBoard
        except ImportError:  # a tree older than the progress board (issue 26): run without progress
            ProgressBoard = None
        board = ProgressBoard() if args.get("progress", True) and ProgressBoard is not None else None

        def progress(event):
            events[event.event] = events.get(event.event, 0) + 1
            board(event)

        c0, s0, w0 = _cpu_self(), scheduler_cpu(), time.perf_counter()
        summaries = pipeline.run(args["input"], store, stages=stages, client=client, chunk_slices=16,
                                 patients=patients, progress=progress if board is not None else None, **crop)
        client_s, scheduler_s, wall = _cpu_self() - c0, scheduler_cpu() - s0, time.perf_counter() - w0
    n = len(patients)
    return {"variant": args["variant"], "workers": args["workers"], "round": args["round"],
            "cluster_start_s": round(start_s, 2), "wall_s": round(wall, 2),
            "done": {s.stage: len(s.done) for s in summaries},
            "client_cpu_s": round(client_s, 3), "client_cpu_s_per_patient": round(client_s / n, 3),
            "client_idle_cpu_per_s": round(idle, 4),
            "client_cpu_s_per_patient_above_idle": round(max(0.0, client_s - idle * wall) / n, 3),
            "scheduler_process_cpu_s_per_patient": round(scheduler_s / n, 3) if scheduler else None,
            "scheduler_idle_cpu_per_s": round(scheduler_idle, 4) if scheduler else None,
            "scheduler_process_cpu_s_per_patient_above_idle": (
                round(max(0.0, scheduler_s - scheduler_idle * wall) / n, 3) if scheduler else None),
            "progress_events": events,
            "failed": {s.stage: [f.get("reason") for f in s.failed] for s in summaries if s.failed},
            "digest": _store_digest(store)}


# ---------------------------------------------------------------------- parent

def _cpu_model() -> str:
    """The CPU's model name and whether it has AVX2 / AVX-512 (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 "unknown")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {isa}"


def _extract(rev: str, folder: Path) -> Path:
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "lungzarr"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def _spawn(tree: Path, args: dict) -> dict:
    # An extracted tree has the package only: the weights (for runs with detect) come from this checkout.
    env = {"LUNGZARR_WEIGHTS": str(REPO / "models" / "d8_2x2x2_best_weights.h5"),
           **os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(args)],
                          capture_output=True, text=True, env=env, cwd=str(tree), check=False, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{args['variant']} child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.control_plane", description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, help="git revision of 'before' (default: merge base with main)")
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["before", "after"])
    parser.add_argument("--no-progress", action="store_true", help="run without a progress callable")
    parser.add_argument("--stages", nargs="+", default=STAGES,
                        help="the stages run (default ingest segment; 'all': the whole pipeline, ingest to features)")
    parser.add_argument("--crop", choices=["fixed", "lungs"], default="fixed",
                        help="detect's crop (default fixed: the only one of trees older than --crop)")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="VARIANT-WORKERSw pairs not to run (e.g. before-16w: 16 TensorFlow workers may not fit)")
    parser.add_argument("--out", default="control_plane", help="results/<OUT>.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return
    sys.path.insert(0, str(REPO / "tests"))
    from dicom_phantoms import make_patient

    before = args.before or subprocess.run(["git", "-C", str(REPO), "merge-base", "HEAD", "main"], check=True,
                                           capture_output=True, text=True).stdout.strip()
    stages = "all" if args.stages == ["all"] else list(args.stages)
    work = Path(tempfile.mkdtemp(prefix="lungzarr-control-plane-"))
    load_at_start = os.getloadavg()
    try:
        trees = {"before": _extract(before, work / "before"), "after": REPO, "after-inprocess": REPO}
        ids = [f"CP{i:02d}" for i in range(args.patients)]
        for i, pid in enumerate(ids + ["WARM"]):
            make_patient(work / "input" / pid, n_slices=args.slices, size=args.size, seed=i)
        rows = []
        for workers in args.workers:
            for r in range(args.rounds):
                order = list(args.variants) if r % 2 == 0 else list(reversed(args.variants))
                for variant in order:
                    if f"{variant}-{workers}w" in args.skip:
                        continue
                    row = _spawn(trees[variant], {"variant": variant, "workers": workers, "round": r,
                                                  "scheduler_process": variant != "after-inprocess",
                                                  "work": str(work), "input": str(work / "input"),
                                                  "patients": ids, "warm": "WARM", "stages": stages,
                                                  "progress": not args.no_progress, "crop": args.crop})
                    print(json.dumps({k: v for k, v in row.items() if k != "digest"}), flush=True)
                    rows.append(row)
        differences = _differences(rows)
        summary = {}
        for workers in args.workers:
            for variant in args.variants:
                mine = [r for r in rows if r["workers"] == workers and r["variant"] == variant]
                if mine:
                    summary[f"{variant}-{workers}w"] = {
                        k: round(statistics.median(r[k] for r in mine), 3)
                        for k in ("client_cpu_s_per_patient", "client_cpu_s_per_patient_above_idle",
                                  "client_idle_cpu_per_s", "wall_s")} | {
                        "scheduler_process_cpu_s_per_patient": (
                            round(statistics.median(r["scheduler_process_cpu_s_per_patient"] for r in mine), 3)
                            if mine[0]["scheduler_process_cpu_s_per_patient"] is not None else None),
                        "scheduler_process_cpu_s_per_patient_above_idle": (
                            round(statistics.median(r.get("scheduler_process_cpu_s_per_patient_above_idle")
                                                    for r in mine), 3)
                            if mine[0].get("scheduler_process_cpu_s_per_patient_above_idle") is not None
                            else None),
                        "chunk_events_per_patient": round(statistics.median(
                            r["progress_events"].get("chunk", 0) for r in mine) / args.patients, 1)}
        result = {"what": f"client-process CPU per patient of pipeline.run ({stages}), median over rounds",
                  "stages": stages, "crop": args.crop,
                  "before_rev": before, "after_rev": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                                                    capture_output=True, text=True).stdout.strip(),
                  "cohort": {"patients": args.patients, "slices": args.slices, "size": args.size},
                  "progress": not args.no_progress,
                  "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
                              "load_avg_at_start": load_at_start, "load_avg_at_end": os.getloadavg()},
                  "digest_leaves_out": list(RUN_FIELDS),
                  "stores_identical": not differences, "differences": differences,
                  "summary": summary, "rows": rows}
        out = HERE / "results" / f"{args.out}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
        print(f"stores identical: {not differences}; wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
