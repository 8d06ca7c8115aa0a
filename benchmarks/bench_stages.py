"""The lungzarr pipeline against the straight serial baseline, same cohort, same run.

    python -m benchmarks stages  [--patients 2] [--small] [--rounds 1]   # per stage vs the baseline
    python -m benchmarks scaling [--sizes 1 4 16] [--small]              # time and memory vs cohort size, 1 vs 2 workers
    python -m benchmarks memory  [--sizes 2 8 32] [--small]              # peak RSS per worker vs cohort size

Children, each a fresh process: ``baseline`` (:mod:`benchmarks.baseline`, the
straight serial in-memory original) and ``pipeline`` (lungzarr on a
LocalCluster, stage by stage or one ``run``).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.bench_project import projection
from benchmarks.harness import (STAGES, add_cohort_options, make_cohort, preimport, rounded, spawn, warm_model,
                                write_result)

#: Seconds of idle client CPU sampled before timing.
IDLE_PROBE_S = 5.0


def child_baseline(args: dict) -> dict:
    import resource

    preimport()
    from benchmarks.baseline import run_patient
    from benchmarks.measure import Sampler

    # TensorFlow and the model only where the UNet runs (they dominate a process's RSS).
    # The baseline predicts with the original's literal layers (benchmarks/baseline.py).
    warm = warm_model(fold_upsampling=False) if "detect" in (args.get("stages") or STAGES) else 0.0
    rows = []
    with Sampler({"main": os.getpid()}) as sampler:
        for pid, folder in args["patients"]:
            def timer(stage, pid=pid):
                return sampler.phase((pid, stage))
            t0 = time.perf_counter()
            row = run_patient(folder, patient=pid, timer=timer, stages=args.get("stages") or STAGES)
            row["wall_s"] = time.perf_counter() - t0
            row["peak_rss_mb"] = {s: sampler.peaks_mb((pid, s)).get("main") for s in row["seconds"]}
            rows.append(row)
    return {"variant": "baseline", "warmup_s": warm, "patients": rows,
            "peak_rss_mb": sampler.peaks_mb()["main"],
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _store_checks(store_path, patients) -> dict:
    from lungzarr.io.store import CohortStore

    from benchmarks.cohort import folder_bytes

    store = CohortStore(store_path, mode="r")
    out = {}
    for pid in patients:
        entry = {"store_mb": round(folder_bytes(Path(store_path) / "patients" / pid) / 1e6, 2)}
        ds = store.open_patient(pid)
        if "lungs" in ds:
            entry["lung_voxels"] = int(ds.lungs.sum())
        if "nodule_prob" in ds:
            entry.update(prob_voxels=int((ds.nodule_prob > 0).sum()), prob_sum=float(ds.nodule_prob.sum()))
        n = store.stages(pid).get("nodules", {}).get("n_nodules_0.5_filtered")
        if n is not None:
            entry["nodules_0.5_filtered"] = int(n)
        out[pid] = entry
    return out


def child_pipeline(args: dict) -> dict:
    """The lungzarr pipeline on a LocalCluster: stage by stage (``stagewise``) or one ``run``."""
    from lungzarr import pipeline
    from lungzarr.cluster import dask_client

    from benchmarks.measure import Sampler

    store = Path(args["store"])
    opts = dict(batch_size=args["batch_size"], chunk_slices=args["chunk_slices"])
    # The detect stage's options (engine, crop) for the run() calls; ingest takes none of them.
    run_opts = dict(args.get("run_opts") or {})
    stages = args.get("stages") or list(STAGES)
    preimport()
    t_start = time.perf_counter()
    with dask_client("local", n_workers=args["workers"], threads_per_worker=1, echo=lambda s: None,
                     malloc_trim=args.get("malloc_trim", False)) as client:
        startup = time.perf_counter() - t_start
        pids = client.run(os.getpid)
        client.run(preimport)
        warm = client.run(warm_model, run_opts.get("engine", "auto")) if "detect" in stages else {"none": 0.0}
        names = {"main": os.getpid(), **{f"worker-{i}": pid for i, pid in enumerate(sorted(pids.values()))}}
        # The client process (scheduler, nannies, comms) burns CPU even when idle: measure that rate, so
        # the per-patient client figure can be told from the part that only grows with the wall time.
        idle0 = Sampler({"main": os.getpid()}).cpu_seconds()
        time.sleep(IDLE_PROBE_S)
        client_idle_cpu_per_s = (Sampler({"main": os.getpid()}).cpu_seconds() - idle0) / IDLE_PROBE_S
        out = {"variant": f"pipeline-{args['workers']}w", "workers": args["workers"], "mode": args["mode"],
               "cluster_start_s": startup, "warmup_s": max(warm.values()), **opts, "stages": {},
               "client_idle_cpu_per_s": client_idle_cpu_per_s}
        with Sampler(names) as sampler:
            t0 = time.perf_counter()
            if args["mode"] == "stagewise":
                for stage in stages:
                    c0, s0 = sampler.cpu_seconds(), time.perf_counter()
                    m0 = sampler.cpu_seconds(["main"])
                    with sampler.phase(stage):
                        if stage == "ingest":
                            summary = pipeline.ingest(args["input"], store, client=client, **opts)
                        else:
                            summary = pipeline.run(None, store, stages=[stage], client=client, **opts,
                                                   **run_opts)[0]
                    out["stages"][stage] = {"wall_s": time.perf_counter() - s0, "summary_s": summary.seconds,
                                            "cpu_s": sampler.cpu_seconds() - c0, "done": len(summary.done),
                                            # the client process: scheduler, graph building, commits
                                            "client_cpu_s": sampler.cpu_seconds(["main"]) - m0,
                                            "failed": summary.failed[:3],
                                            "peak_rss_mb": sampler.peaks_mb(stage)}
            else:
                c0 = sampler.cpu_seconds()
                if list(stages) == list(STAGES):
                    summaries = pipeline.run(args["input"], store, client=client, **opts, **run_opts)
                else:  # a prefix of the stages: ingest, then the rest in one run() call
                    summaries = [pipeline.ingest(args["input"], store, client=client, **opts)]
                    if len(stages) > 1:
                        summaries += pipeline.run(None, store, stages=list(stages[1:]), client=client, **opts,
                                                  **run_opts)
                for s in summaries:
                    out["stages"][s.stage] = {"summary_s": s.seconds, "done": len(s.done),
                                              "failed": s.failed[:3]}
                out["cpu_s"] = sampler.cpu_seconds() - c0
            out["wall_s"] = time.perf_counter() - t0
        out["peak_rss_mb"] = sampler.peaks_mb()
        out["peak_rss_per_worker_mb"] = max(v for k, v in out["peak_rss_mb"].items() if k.startswith("worker"))
    out["store_total_mb"] = round(sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6, 2)
    patients = sorted(p.name for p in Path(args["input"]).iterdir())
    out["checks"] = _store_checks(store, patients)
    return out

# ====================================================================== cohort and summaries

def summarise_stages(base: dict, pipe: dict, dicom_bytes: dict) -> dict:
    """Per-stage and end-to-end figures of one baseline / pipeline pair and their ratios."""
    n = len(base["patients"])
    mb = sum(dicom_bytes.values()) / 1e6
    rows = {}
    for stage in base["patients"][0]["seconds"]:
        b_s = sum(p["seconds"][stage] for p in base["patients"])
        b_cpu = sum(p["cpu_seconds"][stage] for p in base["patients"])
        b_mem = max(p["peak_rss_mb"][stage] or 0 for p in base["patients"])
        st = pipe["stages"].get(stage)
        if st is None:
            continue
        p_mem = max(v for k, v in st["peak_rss_mb"].items() if k.startswith("worker"))
        rows[stage] = {
            # the stage's own seconds (StageSummary.seconds); the stage-by-stage harness adds a gather_tables per run() call
            # (in the CPU figure and end to end, not here).
            "baseline_s_per_patient": rounded(b_s / n), "pipeline_s_per_patient": rounded(st["summary_s"] / n),
            "ratio_time": rounded(st["summary_s"] / b_s), "speedup": rounded(b_s / st["summary_s"]),
            "baseline_cpu_s_per_patient": rounded(b_cpu / n), "pipeline_cpu_s_per_patient": rounded(st["cpu_s"] / n),
            "ratio_cpu": rounded(st["cpu_s"] / b_cpu),
            "pipeline_client_cpu_s_per_patient": rounded(st["client_cpu_s"] / n) if "client_cpu_s" in st else None,
            # minus what the idle client burns over the stage's wall time: the part that scales with patients
            "pipeline_client_cpu_s_per_patient_above_idle": rounded(
                max(0.0, st["client_cpu_s"] - pipe.get("client_idle_cpu_per_s", 0.0) * st["wall_s"]) / n)
            if "client_cpu_s" in st else None,
            "baseline_patients_per_hour": rounded(3600 * n / b_s, 1), "pipeline_patients_per_hour": rounded(3600 * n / st["summary_s"], 1),
            "baseline_peak_rss_mb": b_mem, "pipeline_peak_rss_per_worker_mb": p_mem,
            "ratio_peak_rss": rounded(p_mem / b_mem) if b_mem else None,
        }
        if stage == "ingest":
            rows[stage].update(baseline_mb_per_s=rounded(mb / b_s, 1), pipeline_mb_per_s=rounded(mb / st["summary_s"], 1))
    b_total = sum(p["wall_s"] for p in base["patients"])
    p_total = sum(st["wall_s"] for st in pipe["stages"].values())
    b_cpu = sum(sum(p["cpu_seconds"].values()) for p in base["patients"])
    p_cpu = sum(st["cpu_s"] for st in pipe["stages"].values())
    store_mb = [c["store_mb"] for c in pipe["checks"].values()]
    rows["end_to_end"] = {
        "baseline_s_per_patient": rounded(b_total / n), "pipeline_s_per_patient": rounded(p_total / n),
        "ratio_time": rounded(p_total / b_total), "speedup": rounded(b_total / p_total),
        "baseline_cpu_s_per_patient": rounded(b_cpu / n), "pipeline_cpu_s_per_patient": rounded(p_cpu / n),
        "ratio_cpu": rounded(p_cpu / b_cpu),
        "baseline_patients_per_hour": rounded(3600 * n / b_total, 1), "pipeline_patients_per_hour": rounded(3600 * n / p_total, 1),
        "baseline_mb_per_s": rounded(mb / b_total, 2), "pipeline_mb_per_s": rounded(mb / p_total, 2),
        "baseline_peak_rss_mb": base["peak_rss_mb"], "pipeline_peak_rss_per_worker_mb": pipe["peak_rss_per_worker_mb"],
        "ratio_peak_rss": rounded(pipe["peak_rss_per_worker_mb"] / base["peak_rss_mb"]),
        "pipeline_store_mb_per_patient": rounded(statistics.mean(store_mb), 1),
        "dicom_mb_per_patient": rounded(mb / n, 1),
        "ratio_store_to_dicom": rounded(statistics.mean(store_mb) / (mb / n)),
    }
    return rows


def agreement(base: dict, pipe: dict) -> dict:
    out = {}
    for p in base["patients"]:
        c = pipe["checks"].get(p["patient"], {})
        out[p["patient"]] = {k: {"baseline": p["check"].get(k), "pipeline": c.get(k)}
                             for k in ("lung_voxels", "prob_voxels", "prob_sum", "nodules_0.5_filtered")}
    return out


def markdown_stage_table(rows: dict) -> str:
    lines = ["| stage | baseline s/patient | lungzarr s/patient | time ratio | CPU-s/patient base → lz | "
             "patients/h base → lz | peak RSS MB base → per worker | RSS ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for stage, r in rows.items():
        lines.append(f"| {stage} | {r['baseline_s_per_patient']} | {r['pipeline_s_per_patient']} | "
                     f"{r['ratio_time']} | {r['baseline_cpu_s_per_patient']} → {r['pipeline_cpu_s_per_patient']} | "
                     f"{r['baseline_patients_per_hour']} → {r['pipeline_patients_per_hour']} | "
                     f"{r['baseline_peak_rss_mb']} → {r['pipeline_peak_rss_per_worker_mb']} | {r['ratio_peak_rss']} |")
    return "\n".join(lines)


def cmd_stages(a) -> dict:
    from benchmarks.cohort import resampled_slices
    from benchmarks.measure import machine

    work = Path(tempfile.mkdtemp(prefix="lungzarr-bench-", dir=a.workdir))
    try:
        desc = machine()
        specs, sizes = make_cohort(work, a.patients, small=a.small)
        folders = [[s.patient, str(work / "input" / s.patient)] for s in specs]
        rounds = []
        kinds = ["baseline", "pipeline"] + (["pipeline_malloc_trim"] if a.compare_worker_env else [])
        for r in range(a.rounds):
            order = tuple(kinds) if r % 2 == 0 else tuple(reversed(kinds))
            got = {}
            for kind in order:
                if kind == "baseline":
                    got[kind] = spawn("baseline", {"patients": folders, "stages": a.stages})
                else:
                    store = work / f"store-{r}.zarr"
                    got[kind] = spawn("pipeline", {"input": str(work / "input"), "store": str(store),
                                                   "workers": a.workers, "batch_size": a.batch_size,
                                                   "chunk_slices": a.chunk_slices, "mode": "stagewise",
                                                   "stages": a.stages,
                                                   "run_opts": {"engine": a.engine, "crop": a.crop},
                                                   "malloc_trim": kind == "pipeline_malloc_trim"})
                    shutil.rmtree(store, ignore_errors=True)
                print(f"round {r} {kind}: {got[kind]['process_wall_s']:.0f} s", flush=True)
            rows = summarise_stages(got["baseline"], got["pipeline"], sizes)
            rounds.append({"order": order, "table": rows, "agreement": agreement(got["baseline"], got["pipeline"]),
                           "raw": got, "load_average_after": os.getloadavg()})
            print(markdown_stage_table(rows), flush=True)
            if a.compare_worker_env:
                # distributed's default worker environment (MALLOC_TRIM_THRESHOLD_=65536) vs lungzarr's.
                trim = summarise_stages(got["baseline"], got["pipeline_malloc_trim"], sizes)
                rounds[-1]["table_malloc_trim"] = trim
                rounds[-1]["worker_env_ratio_cpu"] = {
                    st: rounded(rows[st]["pipeline_cpu_s_per_patient"] / trim[st]["pipeline_cpu_s_per_patient"])
                    for st in rows}
                print("with distributed's MALLOC_TRIM_THRESHOLD_=65536:\n" + markdown_stage_table(trim), flush=True)
                print("CPU-s lungzarr worker env / distributed default:",
                      json.dumps(rounds[-1]["worker_env_ratio_cpu"]), flush=True)
        result = {"what": "per-stage and end-to-end: lungzarr pipeline (LocalCluster) vs the straight serial "
                          "in-memory baseline, same cohort, same run",
                  "machine": desc, "load_average_end": os.getloadavg(),
                  "cohort": [{**s.as_dict(), "shape_2mm": resampled_slices(s), "dicom_mb": round(sizes[s.patient] / 1e6, 1)}
                             for s in specs],
                  "small": a.small, "workers": a.workers, "rounds": rounds}
        # The figure for each cell: the median over rounds of the per-round ratio.
        if len(rounds) > 1:
            result["median_ratio_time"] = {st: statistics.median(rd["table"][st]["ratio_time"] for rd in rounds)
                                           for st in rounds[0]["table"]}
        result["projection"] = projection(result)
        print(json.dumps(result["projection"], indent=1))
        write_result(a.name or ("stages_small" if a.small else "stages"), result)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cmd_cohort_series(a, *, default_name: str) -> dict:
    from benchmarks.cohort import subset_folder
    from benchmarks.measure import machine

    work = Path(tempfile.mkdtemp(prefix="lungzarr-bench-", dir=a.workdir))
    try:
        desc = machine()
        n_max = max(a.sizes)
        specs, sizes = make_cohort(work, n_max, small=a.small)
        ids = [s.patient for s in specs]
        base = spawn("baseline", {"patients": [[ids[0], str(work / "input" / ids[0])]], "stages": a.stages})
        base_s = base["patients"][0]["wall_s"]
        print(f"baseline: {base_s:.1f} s per patient, peak RSS {base['peak_rss_mb']} MB", flush=True)
        variants = [(n, a.workers) for n in a.sizes] + [(n, w) for n in a.strong for w in (1, 2)
                                                           if (n, w) not in [(m, a.workers) for m in a.sizes]]
        runs = []
        for n, w in variants:
            folder = subset_folder(work / "input", ids[:n], work / f"in-{n}")
            store = work / f"store-{n}-{w}.zarr"
            res = spawn("pipeline", {"input": str(folder), "store": str(store), "workers": w,
                                     "batch_size": a.batch_size, "chunk_slices": a.chunk_slices, "mode": "run",
                                     "stages": a.stages, "malloc_trim": a.malloc_trim})
            shutil.rmtree(store, ignore_errors=True)
            row = {"patients": n, "workers": w, "wall_s": rounded(res["wall_s"], 2),
                   "s_per_patient": rounded(res["wall_s"] / n), "ratio_to_baseline_time": rounded(res["wall_s"] / (n * base_s)),
                   "patients_per_hour": rounded(3600 * n / res["wall_s"], 1),
                   "cpu_s_per_patient": rounded(res["cpu_s"] / n),
                   "peak_rss_per_worker_mb": res["peak_rss_per_worker_mb"],
                   "ratio_peak_rss_to_baseline": rounded(res["peak_rss_per_worker_mb"] / base["peak_rss_mb"]),
                   "peak_rss_mb": res["peak_rss_mb"],
                   "stage_s": {k: rounded(v["summary_s"], 2) for k, v in res["stages"].items()},
                   "failed": sum(len(v["failed"]) for v in res["stages"].values()),
                   "store_mb_per_patient": rounded(res["store_total_mb"] / n, 2),
                   "cluster_start_s": rounded(res["cluster_start_s"], 1), "warmup_s": rounded(res["warmup_s"], 1),
                   "load_average": os.getloadavg()}
            runs.append(row)
            print(json.dumps({k: row[k] for k in ("patients", "workers", "wall_s", "s_per_patient",
                                                  "ratio_to_baseline_time", "peak_rss_per_worker_mb",
                                                  "failed")}), flush=True)
        result = {"what": "end-to-end lungzarr run (LocalCluster) vs cohort size and worker count; ratios to the "
                          "serial baseline's seconds per patient x N (same stages)",
                  "stages": a.stages, "malloc_trim": a.malloc_trim,
                  "machine": desc, "load_average_end": os.getloadavg(), "small": a.small,
                  "patient": specs[0].as_dict(), "baseline": {"s_per_patient": rounded(base_s),
                                                              "peak_rss_mb": base["peak_rss_mb"],
                                                              "stage_s": base["patients"][0]["seconds"]},
                  "runs": runs}
        write_result(a.name or default_name, result)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)



def add_commands(sub):
    """``stages``, ``scaling`` and ``memory`` as commands of ``python -m benchmarks``."""
    p = sub.add_parser("stages", help="per stage and end to end vs the baseline")
    add_cohort_options(p)
    p.add_argument("--patients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="baseline/pipeline pairs, order alternating")
    p.add_argument("--engine", default="auto", help="the pipeline's UNet engine (the baseline: Keras, literal)")
    p.add_argument("--crop", default="fixed", choices=("fixed", "lungs"), help="the pipeline's detect crop")
    p.add_argument("--compare-worker-env", action="store_true",
                   help="also run the pipeline with distributed's default worker environment "
                        "(MALLOC_TRIM_THRESHOLD_=65536), same run")
    p.set_defaults(run=cmd_stages)
    p = sub.add_parser("scaling", help="1, 4, 16 patients; 1 vs 2 workers")
    add_cohort_options(p)
    p.set_defaults(malloc_trim=False)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--strong", type=int, nargs="*", default=[4], help="cohort sizes run with 1 and 2 workers")
    p.set_defaults(run=lambda a: cmd_cohort_series(a, default_name="scaling_small" if a.small else "scaling"))
    p = sub.add_parser("memory", help="peak RSS per worker for 2, 8, 32 patients")
    add_cohort_options(p)
    p.add_argument("--malloc-trim", action="store_true",
                   help="workers with distributed's MALLOC_TRIM_THRESHOLD_=65536 (returns freed memory to the OS)")
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--strong", type=int, nargs="*", default=[])
    p.set_defaults(run=lambda a: cmd_cohort_series(a, default_name="memory_small" if a.small else "memory"))


#: The child processes of these commands (``python -m benchmarks _child KIND``), by kind.
CHILDREN = {"baseline": child_baseline, "pipeline": child_pipeline}
