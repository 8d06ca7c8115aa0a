"""Streamed vs stage-by-stage runs on a CPU worker + a "GPU" worker: does the UNet overlap the CPU stages?

    python -m benchmarks overlap [--patients 4] [--small]

The cluster has two single-threaded worker processes: ``cpu`` and ``gpu``
(``resources={"GPU": 1}``). Here the ``gpu`` worker runs the UNet with
TensorFlow on one CPU core (intra/inter-op threads set to 1), standing in for
a GPU: each "device" then has one core of this 2-core machine. Both variants
run the whole pipeline with ``gpu=True`` on a fresh cluster in a fresh process:

* ``stagewise``: every patient through ingest, then every patient through
  segment, ... (one ``process([stage])`` call per stage, the order lungzarr
  used before streaming);
* ``streamed``: one :func:`lungzarr.pipeline.run` call (patients move on to
  their next stage as soon as the previous one is committed).

From the task stream: each worker's busy seconds (sum of its tasks' compute
intervals, merged where they overlap), busy fraction of the wall time, and
when the first predict started. What the comparison shows is how much of the
run the UNet worker sits idle; on a real GPU machine the CPU stages and the
UNet are of the same order per patient, so the idle share matters far more
than on this CPU-only machine, where the UNet dominates.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def _limit_tf_threads():
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return True


def busy_seconds(intervals):
    """Total length of the union of (start, stop) intervals."""
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def child_overlap(args: dict) -> dict:
    import dask
    import distributed

    from lungzarr import pipeline
    from lungzarr.cluster import worker_environ

    from benchmarks.harness import preimport, warm_model

    preimport()
    store = Path(args["store"])
    # The fixed crop, as in the recorded results (then the library's default; the default is now the lung box).
    opts = dict(batch_size=args["batch_size"], chunk_slices=args["chunk_slices"], gpu=True, crop="fixed")
    with dask.config.set({"optimization.fuse.active": False,
                          "distributed.nanny.pre-spawn-environ": worker_environ()}):
        spec = {"cpu": {"cls": distributed.Nanny, "options": {"nthreads": 1}},
                "gpu": {"cls": distributed.Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
        scheduler = {"cls": distributed.Scheduler, "options": {"dashboard_address": ":0"}}
        with distributed.SpecCluster(workers=spec, scheduler=scheduler) as cluster, \
                distributed.Client(cluster) as client:
            info = client.scheduler_info()["workers"]
            names = {address: w["name"] for address, w in info.items()}
            gpu = [a for a, n in names.items() if n == "gpu"]
            client.run(preimport)
            client.run(_limit_tf_threads, workers=gpu)
            client.run(warm_model, workers=gpu)
            t0 = time.perf_counter()
            with distributed.get_task_stream(client) as stream:
                if args["mode"] == "streamed":
                    summaries = pipeline.run(args["input"], store, client=client, **opts)
                else:
                    summaries = [pipeline.ingest(args["input"], store, client=client,
                                                 batch_size=opts["batch_size"], chunk_slices=opts["chunk_slices"])]
                    for stage in pipeline.STAGE_NAMES[1:]:
                        summaries += pipeline.run(None, store, stages=[stage], client=client, **opts)
            wall = time.perf_counter() - t0
    t_start = min(t["startstops"][0]["start"] for t in stream.data)
    intervals = {"cpu": [], "gpu": []}
    predict = []
    for task in stream.data:
        for ss in task["startstops"]:
            if ss["action"] == "compute":
                intervals[names[task["worker"]]].append((ss["start"], ss["stop"]))
                if "predict-nodule-prob" in str(task["key"]):  # the network alone (its inputs are cut on CPU)
                    predict.append((ss["start"], ss["stop"]))
    busy = {k: busy_seconds(v) for k, v in intervals.items()}
    return {"mode": args["mode"], "wall_s": wall,
            "stages": [s.as_dict() for s in summaries],
            "busy_s": busy, "busy_fraction": {k: v / wall for k, v in busy.items()},
            "predict_s": busy_seconds(predict), "predict_fraction": busy_seconds(predict) / wall,
            "first_predict_after_s": min(s for s, _ in predict) - t_start if predict else None,
            "failed": sum(s.as_dict()["failed"] for s in summaries),
            "nodules_0.5_filtered": {pid: pipeline_nodule_count(store, pid) for pid in
                                     sorted(p.name for p in Path(args["input"]).iterdir())}}


def pipeline_nodule_count(store, patient):
    from lungzarr.io.store import CohortStore

    return CohortStore(store, mode="r").stages(patient).get("nodules", {}).get("n_nodules_0.5_filtered")


def cmd_overlap(a) -> dict:
    import shutil
    import tempfile

    from benchmarks.harness import make_cohort, rounded, spawn, write_result
    from benchmarks.measure import machine

    work = Path(tempfile.mkdtemp(prefix="lungzarr-bench-", dir=a.workdir))
    try:
        desc = machine()
        specs, sizes = make_cohort(work, a.patients, small=a.small)
        runs = {}
        for mode in ("stagewise", "streamed") if a.order == "stagewise-first" else ("streamed", "stagewise"):
            store = work / f"{mode}.zarr"
            runs[mode] = spawn("overlap", {"input": str(work / "input"), "store": str(store), "mode": mode,
                                           "batch_size": a.batch_size, "chunk_slices": a.chunk_slices})
            shutil.rmtree(store, ignore_errors=True)
            r = runs[mode]
            print(f"{mode}: wall {r['wall_s']:.1f} s, busy cpu {r['busy_fraction']['cpu']:.2f} "
                  f"gpu {r['busy_fraction']['gpu']:.2f}, predict {r['predict_fraction']:.2f} of the wall, "
                  f"first predict after {r['first_predict_after_s']:.1f} s", flush=True)
        st, sw = runs["streamed"], runs["stagewise"]
        result = {"what": "streamed vs stage-by-stage lungzarr run on a CPU worker + a one-core 'GPU' worker "
                          "(TensorFlow UNet, 1 thread); same cohort, same run",
                  "machine": desc, "load_average_end": os.getloadavg(), "small": a.small,
                  "cohort": [s.as_dict() for s in specs], "runs": runs,
                  "ratio_wall_streamed_to_stagewise": rounded(st["wall_s"] / sw["wall_s"]),
                  "predict_fraction": {"stagewise": rounded(sw["predict_fraction"]), "streamed": rounded(st["predict_fraction"])},
                  "same_nodule_counts": st["nodules_0.5_filtered"] == sw["nodules_0.5_filtered"]}
        print({k: result[k] for k in ("ratio_wall_streamed_to_stagewise", "predict_fraction", "same_nodule_counts")})
        write_result(a.name or ("overlap_small" if a.small else "overlap"), result)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_commands(sub):
    """``overlap`` as a command of ``python -m benchmarks``."""
    from benchmarks.harness import add_cohort_options

    p = sub.add_parser("overlap", help="streamed vs stage-by-stage on a CPU worker + a 'GPU' worker")
    add_cohort_options(p)
    p.add_argument("--patients", type=int, default=4)
    p.add_argument("--order", choices=("stagewise-first", "streamed-first"), default="stagewise-first")
    p.set_defaults(run=cmd_overlap)


#: The child process of this command (``python -m benchmarks _child overlap``).
CHILDREN = {"overlap": child_overlap}
