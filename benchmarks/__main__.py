"""lungzarr benchmarks: one entry point.

    python -m benchmarks stages  [--patients 2] [--small] [--rounds 1]   # per stage vs the baseline
    python -m benchmarks scaling [--sizes 1 4 16] [--small]              # time and memory vs cohort size, 1 vs 2 workers
    python -m benchmarks memory  [--sizes 2 8 32] [--small]              # peak RSS per worker vs cohort size
    python -m benchmarks profile [--stage segment] [--small]             # cProfile of one CPU stage
    python -m benchmarks project [--from results/stages.json]            # 1595 patients on 16 cores + H100
    python -m benchmarks overlap [--patients 4] [--small]                # streamed vs stage by stage, CPU + "GPU" worker
    python -m benchmarks engines [--rounds 3] [--stage-rounds 2]         # Keras-TF vs OpenVINO vs ONNX Runtime (real windows)
    python -m benchmarks lungbox [--rounds 2] [--also-margin 8]          # detect --crop fixed vs lungs (real patients)
    python -m benchmarks detect  [--rounds 2] [--variants ...]           # the detect stage: as it was vs every speed-up

Every command synthesises its DICOM cohort into a temporary folder (deleted
at the end), runs each variant in a fresh child process (so peaks are the
variant's own) and writes ``benchmarks/results/<name>.json`` with the machine's
description. The baseline (:mod:`benchmarks.baseline`, the straight serial
in-memory original) is measured in the same run and every figure is also
given as a ratio to it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import RESULTS, make_cohort, preimport, rounded, spawn, warm_model, write_result

STAGES = ("ingest", "segment", "detect", "nodules", "features")
#: Seconds of idle client CPU sampled before timing.
IDLE_PROBE_S = 5.0
#: Idle CPU of the client process of a 16-worker LocalCluster (core-seconds per second), measured on the
#: 2-core benchmark machine: 0.096 with 2 workers, 0.157 with 8, 0.220 with 16.
CLIENT_IDLE_16_WORKERS = 0.22
#: Client-process CPU per extra patient, above idle, measured per thread (6 vs 2 realistic patients, 2 workers,
#: 64-slice tasks): ingest 0.29 s, segment 0.26 s.
CLIENT_MARGINAL_S = {"ingest": 0.29, "segment": 0.26}
CPU_STAGES = ("ingest", "segment", "nodules", "features")


# ====================================================================== child processes

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
    from lungzarr.io.storage import CohortStore

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


def child_profile(args: dict) -> dict:
    """cProfile one stage of the pipeline for one patient, on dask's synchronous scheduler."""
    import cProfile
    import io
    import pstats

    import dask

    from lungzarr import pipeline

    store = Path(args["store"])
    stage = args["stage"]
    opts = dict(batch_size=1, chunk_slices=args["chunk_slices"])
    with dask.config.set(scheduler="sync"):
        before = STAGES[:STAGES.index(stage)]
        if before:
            pipeline.ingest(args["input"], store, **opts)
            if len(before) > 1:
                pipeline.run(None, store, stages=list(before[1:]), **opts)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        if stage == "ingest":
            summary = pipeline.ingest(args["input"], store, **opts)
        else:
            summary = pipeline.run(None, store, stages=[stage], **opts)[0]
        prof.disable()
        wall = time.perf_counter() - t0
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).sort_stats("tottime")
    stats.print_stats(args.get("top", 20))
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:25]:
        rows.append({"function": f"{Path(fname).name}:{line}({func})", "calls": nc, "tottime_s": round(tt, 3),
                     "cumtime_s": round(ct, 3)})
    return {"stage": stage, "wall_s": wall, "done": len(summary.done), "top_by_tottime": rows,
            "text": text.getvalue()[-6000:]}


def child_overlap(args: dict) -> dict:
    from benchmarks.bench_overlap import child_overlap as run

    return run(args)


def child_engines(args: dict) -> dict:
    from benchmarks.bench_engines import child_engines as run

    return run(args)


def child_engines_stage(args: dict) -> dict:
    from benchmarks.bench_engines import child_engines_stage as run

    return run(args)


def child_engine_memory(args: dict) -> dict:
    from benchmarks.bench_engines import child_engine_memory as run

    return run(args)


def child_lungbox(args: dict) -> dict:
    from benchmarks.bench_lungbox import child_lungbox as run

    return run(args)


def child_detect(args: dict) -> dict:
    from benchmarks.bench_detect import child_detect as run

    return run(args)


CHILDREN = {"baseline": child_baseline, "pipeline": child_pipeline, "profile": child_profile,
            "overlap": child_overlap, "engines": child_engines, "engines_stage": child_engines_stage,
            "engine_memory": child_engine_memory, "lungbox": child_lungbox, "detect": child_detect}


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


# ====================================================================== commands

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


def cmd_profile(a) -> dict:
    from benchmarks.measure import machine

    work = Path(tempfile.mkdtemp(prefix="lungzarr-bench-", dir=a.workdir))
    try:
        specs, _ = make_cohort(work, 1, small=a.small)
        res = spawn("profile", {"input": str(work / "input"), "store": str(work / "p.zarr"), "stage": a.stage,
                                "chunk_slices": a.chunk_slices})
        print(res["text"])
        res.update(machine=machine(), patient=specs[0].as_dict())
        write_result(a.name or f"profile_{a.stage}", res)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------- projection

GPU_S_PER_PATIENT = {"fp32": 0.35, "fp16": 0.12}
DSB_STAGE1 = 1595


def projection(stages_result: dict, *, cores: int = 16, client_run: dict | None = None) -> dict:
    """1595 DSB2017 patients on one 16-core + H100 machine from the measured CPU rates.

    CPU core-seconds per patient of each CPU stage (the pipeline's, workers +
    client summed; median over rounds) spread over ``cores`` cores with no
    scaling loss; the UNet on the GPU at the anchor seconds per patient (bare
    network) and at the rate measured inside the whole pipeline on the H100
    (``results/pipeline_gpu_chunk64.json``, when present). Patients stream
    through the stages, so the run takes as long as the slowest of: the CPU
    stages over the cores, the UNet on the GPU, and the client process (one
    core: scheduler, graph building, commits).
    """
    rounds = stages_result["rounds"]
    cpu = {st: statistics.median(rd["table"][st]["pipeline_cpu_s_per_patient"] for rd in rounds)
           for st in CPU_STAGES if st in rounds[0]["table"]}
    base_cpu = {st: statistics.median(rd["table"][st]["baseline_cpu_s_per_patient"] for rd in rounds)
                for st in CPU_STAGES if st in rounds[0]["table"]}
    total = sum(cpu.values())
    def client_figure(row):
        above = row.get("pipeline_client_cpu_s_per_patient_above_idle")
        return above if above is not None else (row.get("pipeline_client_cpu_s_per_patient") or 0.0)

    client = {st: statistics.median(client_figure(rd["table"][st]) for rd in rounds)
              for st in CPU_STAGES if st in rounds[0]["table"]}
    out = {"assumptions": f"{cores} cores all on CPU stages, perfect scaling, same per-core speed as this machine; "
                          "UNet on one H100 at the anchor s/patient (bare network) or as measured in the pipeline; "
                          "the client process on one core (per-patient CPU above its idle rate, its idle load at "
                          "16 workers taken off that core); patients stream, so the slowest of the three bounds",
           "cohort_mean_shape_2mm": [round(statistics.mean(c["shape_2mm"][i] for c in stages_result["cohort"]))
                                     for i in range(3)],
           "cpu_core_s_per_patient": {k: round(v, 2) for k, v in cpu.items()},
           "cpu_core_s_per_patient_total": round(total, 2),
           "baseline_cpu_core_s_per_patient": {k: round(v, 2) for k, v in base_cpu.items()},
           "baseline_cpu_core_s_per_patient_total": round(sum(base_cpu.values()), 2),
           "client_cpu_s_per_patient": {k: round(v, 3) for k, v in client.items()},
           "client_cpu_s_per_patient_total_measured_stages": round(sum(client.values()), 3)}
    gpu_rates = dict(GPU_S_PER_PATIENT)
    measured = RESULTS / "pipeline_gpu_chunk64.json"
    if measured.exists():
        run = json.loads(measured.read_text())
        n = run["cohort"]["n_patients"]
        gpu_rates["fp32_measured_in_pipeline_h100"] = round(
            run["task_placement"]["predict_compute_s_on_gpu_worker"] / n, 3)
    # The detect stage's client work (open, graph, write setup, commit) is taken as segment's: same pattern.
    if "segment" in client and "detect" not in client:
        client["detect (as segment)"] = client["segment"]
        out["client_cpu_s_per_patient"]["detect (as segment)"] = round(client["segment"], 3)
    # The client core also carries its idle load (scheduler, 16 nannies): what is left of it for patients.
    # Two estimates: from the stage runs (2-4 patients: per-call constants included, an upper bound), and
    # the marginal cost per extra patient measured per thread (6 vs 2 realistic patients; detect, nodules and
    # features taken as segment's).
    client_s = sum(client.values()) / (1.0 - CLIENT_IDLE_16_WORKERS)
    marginal = {st: CLIENT_MARGINAL_S.get(st, CLIENT_MARGINAL_S["segment"])
                for st in ("ingest", "segment", "detect", "nodules", "features")}
    client_marginal_s = sum(marginal.values()) / (1.0 - CLIENT_IDLE_16_WORKERS)
    if client_run is not None:
        # Measured instead (benchmarks.control_plane --stages all): the whole pipeline's client CPU per patient
        # above idle at 16 workers, on a core that also carries the measured idle load.
        row = client_run["summary"]["after-16w"]
        client_marginal_s = row["client_cpu_s_per_patient_above_idle"] / (1.0 - row["client_idle_cpu_per_s"])
        marginal = {"whole pipeline (control_plane, after-16w, above idle)": row["client_cpu_s_per_patient_above_idle"],
                    "idle load of the client core (s per s)": row["client_idle_cpu_per_s"]}
    out["client_s_per_patient_upper_bound"] = round(client_s, 3)
    out["client_s_per_patient_marginal"] = round(client_marginal_s, 3)
    out["client_marginal_s_per_stage"] = marginal
    for prec, gpu_s in gpu_rates.items():
        cpu_s = total / cores
        sides = {"CPU stages": cpu_s, "GPU": gpu_s, "client": client_marginal_s}
        bound = max(sides, key=sides.get)
        out[prec] = {"cpu_wall_s_per_patient": round(cpu_s, 3), "gpu_s_per_patient": gpu_s,
                     "client_s_per_patient_marginal": round(client_marginal_s, 3), "bound": bound,
                     "minutes_for_1595": round(DSB_STAGE1 * sides[bound] / 60, 1),
                     "minutes_per_side": {k: round(DSB_STAGE1 * v / 60, 1) for k, v in sides.items()},
                     "minutes_if_client_at_upper_bound": round(DSB_STAGE1 * max(cpu_s, gpu_s, client_s) / 60, 1),
                     "baseline_cpu_minutes_for_1595": round(DSB_STAGE1 * max(sum(base_cpu.values()) / cores,
                                                                             gpu_s) / 60, 1)}
    out["goal_minutes"] = 20
    out["cpu_core_s_budget_per_patient_for_20_min"] = round(20 * 60 / DSB_STAGE1 * cores, 2)
    return out


def cmd_project(a) -> dict:
    """Projection from one or more stages results: each CPU stage taken from the first file that has it."""
    sources = [json.loads(Path(s).read_text()) for s in a.source]
    merged = {"cohort": sources[0]["cohort"], "rounds": []}
    for rd in sources[0]["rounds"]:
        table = {}
        for src in reversed(sources):
            table.update(src["rounds"][0]["table"])
        table.update(rd["table"])
        merged["rounds"].append({"table": table})
    measured = {}
    if a.cpu_stages:
        # Per-patient CPU-s of each CPU stage from bench_cpu_stages.py's A/B (this checkout's medians, one
        # realistic patient), instead of the stage runs'.
        cpu_run = json.loads(Path(a.cpu_stages).read_text())
        measured = {st: v["median"] for st, v in cpu_run["summary"]["after"][a.cpu_patient].items()}
        before = {st: v["median"] for st, v in cpu_run["summary"]["before"][a.cpu_patient].items()}
        for rd in merged["rounds"]:
            for st in CPU_STAGES:
                if st in measured and st in rd["table"]:
                    rd["table"][st] = {**rd["table"][st], "pipeline_cpu_s_per_patient": measured[st]}
    client_run = json.loads(Path(a.client_run).read_text()) if a.client_run else None
    out = projection(merged, cores=a.cores, client_run=client_run)
    if client_run is not None:
        out["sources"] = {"client": a.client_run}
    out["sources"] = out.get("sources", {}) | {st: next(str(p) for p, s in zip(a.source, sources) if st in s["rounds"][0]["table"])
                      for st in CPU_STAGES if any(st in s["rounds"][0]["table"] for s in sources)}
    if measured:
        out["sources"].update({st: f"{a.cpu_stages} (after, {a.cpu_patient})" for st in CPU_STAGES if st in measured})
        out["cpu_stages_run"] = {"file": a.cpu_stages, "patient": a.cpu_patient, "after": measured,
                                 "before": before, "what": cpu_run["what"],
                                 "lungs3d (no counterpart in the original; not in the total)": measured.get("lungs3d"),
                                 "total_before_4_stages": round(sum(before[st] for st in CPU_STAGES), 2),
                                 "total_after_4_stages": round(sum(measured[st] for st in CPU_STAGES), 2)}
        if "lungs3d" in measured:
            # lungzarr's own 3-D mask stage runs in `lungzarr run` too: the CPU side with it.
            with_3d = (out["cpu_core_s_per_patient_total"] + measured["lungs3d"]) / a.cores
            out["cpu_stages_run"]["cpu_core_s_per_patient_total_with_lungs3d"] = round(
                out["cpu_core_s_per_patient_total"] + measured["lungs3d"], 2)
            out["cpu_stages_run"]["cpu_stages_minutes_for_1595_with_lungs3d"] = round(DSB_STAGE1 * with_3d / 60, 1)
    if a.name:
        write_result(a.name, {"machine_of_sources": sources[0].get("machine"), **out})
    print(json.dumps(out, indent=1))
    return out


# ====================================================================== CLI

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        kind, args = argv[1], json.loads(argv[2])
        print(json.dumps(CHILDREN[kind](args), default=str))
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, workers=2):
        p.add_argument("--small", action="store_true", help="256 x 256 x 60 slices of 2.5 mm (quick)")
        p.add_argument("--workers", type=int, default=workers)
        p.add_argument("--batch-size", type=int, default=4, help="patients in flight (pipeline batch_size)")
        p.add_argument("--chunk-slices", type=int, default=16)
        p.add_argument("--workdir", default=None, help="where the temporary cohort goes")
        p.add_argument("--name", default=None, help="results/<name>.json")
        p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                       help="a prefix of the stages (e.g. ingest segment: no UNet, say so)")

    p = sub.add_parser("stages", help="per stage and end to end vs the baseline")
    common(p)
    p.add_argument("--patients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="baseline/pipeline pairs, order alternating")
    p.add_argument("--engine", default="auto", help="the pipeline's UNet engine (the baseline: Keras, literal)")
    p.add_argument("--crop", default="fixed", choices=("fixed", "lungs"), help="the pipeline's detect crop")
    p.add_argument("--compare-worker-env", action="store_true",
                   help="also run the pipeline with distributed's default worker environment "
                        "(MALLOC_TRIM_THRESHOLD_=65536), same run")
    p = sub.add_parser("scaling", help="1, 4, 16 patients; 1 vs 2 workers")
    common(p)
    p.set_defaults(malloc_trim=False)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--strong", type=int, nargs="*", default=[4], help="cohort sizes run with 1 and 2 workers")
    p = sub.add_parser("memory", help="peak RSS per worker for 2, 8, 32 patients")
    common(p)
    p.add_argument("--malloc-trim", action="store_true",
                   help="workers with distributed's MALLOC_TRIM_THRESHOLD_=65536 (returns freed memory to the OS)")
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--strong", type=int, nargs="*", default=[])
    p = sub.add_parser("profile", help="cProfile one stage on one patient")
    common(p)
    p.add_argument("--stage", default="segment", choices=STAGES)
    p = sub.add_parser("overlap", help="streamed vs stage-by-stage on a CPU worker + a 'GPU' worker")
    common(p)
    p.add_argument("--patients", type=int, default=4)
    p.add_argument("--order", choices=("stagewise-first", "streamed-first"), default="stagewise-first")
    p = sub.add_parser("engines", help="Keras-TF vs OpenVINO vs ONNX Runtime on real windows, and the detect stage")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every batch and engine")
    p.add_argument("--stage-rounds", type=int, default=2, help="detect-stage runs per engine (0: none)")
    p.add_argument("--name", default=None, help="results/<name>.json (default engines)")
    p = sub.add_parser("lungbox", help="detect --crop fixed vs --crop lungs on the real patients, A/B interleaved")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over every patient and variant")
    p.add_argument("--engine", default="auto", help="the UNet engine (default auto: OpenVINO on CPU)")
    p.add_argument("--also-margin", type=int, nargs="*", default=[8],
                   help="extra lung-box margins to compare (smaller than the network's reach: not exact)")
    p.add_argument("--name", default=None, help="results/<name>.json (default lungbox)")
    p = sub.add_parser("detect", help="the detect stage per real patient: Keras-TF as it was vs engine, form, crop")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over every patient and variant")
    p.add_argument("--variants", nargs="+", default=None,
                   help="ENGINE-(literal|folded)-(fixed|lungs); default: see benchmarks/bench_detect.py")
    p.add_argument("--name", default=None, help="results/<name>.json (default detect)")
    p = sub.add_parser("project", help="the 1595-patient projection from a stages result")
    p.add_argument("--from", dest="source", nargs="+", default=[str(RESULTS / "stages.json")])
    p.add_argument("--name", default=None)
    p.add_argument("--cores", type=int, default=16)
    p.add_argument("--cpu-stages", default=None,
                   help="results/cpu_stages.json of bench_cpu_stages.py ab: its per-patient CPU stage figures")
    p.add_argument("--cpu-patient", default="SYN-0001", help="the patient of --cpu-stages to take")
    p.add_argument("--client-run", default=None,
                   help="a control_plane --stages all result: its after-16w client CPU replaces the constants")
    a = parser.parse_args(argv)
    if hasattr(a, "stages") and list(a.stages) != list(STAGES[:len(a.stages)]):
        parser.error(f"--stages must be a prefix of {STAGES!r}, got {a.stages!r}")
    t0 = time.perf_counter()
    if a.command == "stages":
        cmd_stages(a)
    elif a.command == "scaling":
        cmd_cohort_series(a, default_name="scaling_small" if a.small else "scaling")
    elif a.command == "memory":
        cmd_cohort_series(a, default_name="memory_small" if a.small else "memory")
    elif a.command == "profile":
        cmd_profile(a)
    elif a.command == "project":
        cmd_project(a)
    elif a.command == "engines":
        from benchmarks.bench_engines import cmd_engines

        cmd_engines(a)
    elif a.command == "lungbox":
        from benchmarks.bench_lungbox import cmd_lungbox

        cmd_lungbox(a)
    elif a.command == "detect":
        from benchmarks.bench_detect import DEFAULT_VARIANTS, cmd_detect

        a.variants = a.variants or list(DEFAULT_VARIANTS)
        cmd_detect(a)
    elif a.command == "overlap":
        from benchmarks.bench_overlap import cmd_overlap

        cmd_overlap(a)
    print(f"{a.command}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
