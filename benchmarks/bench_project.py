"""DSB2017 stage 1 (1595 patients) on 16 cores + one H100, projected from measured stage results.

    python -m benchmarks project [--from results/stages.json]            # 1595 patients on 16 cores + H100
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.harness import RESULTS, write_result

#: Idle CPU of the client process of a 16-worker LocalCluster (core-seconds per second), measured on the
#: 2-core benchmark machine: 0.096 with 2 workers, 0.157 with 8, 0.220 with 16.
CLIENT_IDLE_16_WORKERS = 0.22
#: Client-process CPU per extra patient, above idle, measured per thread (6 vs 2 realistic patients, 2 workers,
#: 64-slice tasks): ingest 0.29 s, segment 0.26 s.
CLIENT_MARGINAL_S = {"ingest": 0.29, "segment": 0.26}
CPU_STAGES = ("ingest", "segment", "nodules", "features")


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


def add_commands(sub):
    """``project`` as a command of ``python -m benchmarks``."""
    p = sub.add_parser("project", help="the 1595-patient projection from a stages result")
    p.add_argument("--from", dest="source", nargs="+", default=[str(RESULTS / "stages.json")])
    p.add_argument("--name", default=None)
    p.add_argument("--cores", type=int, default=16)
    p.add_argument("--cpu-stages", default=None,
                   help="results/cpu_stages.json of bench_cpu_stages.py ab: its per-patient CPU stage figures")
    p.add_argument("--cpu-patient", default="SYN-0001", help="the patient of --cpu-stages to take")
    p.add_argument("--client-run", default=None,
                   help="a control_plane --stages all result: its after-16w client CPU replaces the constants")
    p.set_defaults(run=cmd_project)


#: This command starts no child process.
CHILDREN = {}
