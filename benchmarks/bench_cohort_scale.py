"""A real ``lungzarr ingest`` (or ``run``) of thousands of tiny synthetic patients: what grows with the cohort.

    python -m benchmarks.bench_cohort_scale --patients 10000 [--command ingest] [--slices 16 --size 64]
                                            [--picks 3] [--no-resume] [--name NAME]

Issue 29, item 4. The cohort is ``--patients`` NIfTI files (one per patient,
:func:`lungzarr.algorithms.phantom.chest_phantom` of ``--slices`` x
``--size``² voxels of 2.5 x 4 x 4 mm, each its own seed) in a temporary
folder on the local disk; the store is a local directory. The command runs
as a user runs it (``python -m lungzarr.cli COMMAND INPUT STORE``, the
default LocalCluster: 2 workers here), its process tree polled every 0.5 s
(:class:`benchmarks.bench_whole_scan.TreeSampler`); every 10 s the timeline
records the patients done (the log's ``<stage> <id> done`` lines of the last
stage), the CPU seconds of the client, the scheduler process and the workers,
and each one's RSS. From it:

* per patient, **marginal**: the CPU of the client and of the scheduler, and
  the wall time, over the middle of the run (from 10 % to 90 % of the
  patients done: start-up and the tail left out), and per tenth of the run
  (does it grow with the patients already in the store?);
* each process's peak RSS per quarter of the run (flat, or growing?);
* the store: the root ``zarr.json``'s bytes, a patient group's, all metadata
  (every ``zarr.json``) and everything, files counted;
* opening one patient in a fresh process and warm, as
  :mod:`benchmarks.bench_open_patient` times it (``--picks`` patients spread
  over the cohort), :func:`lungzarr.open_patients` and a lookup,
  :func:`lungzarr.read_patients`, and ``lungzarr status`` (a fresh process);
* the same command again on the finished store (``--no-resume``: not): how
  long a resume takes to find that nothing is left.

A projection to 75,000 patients (NLST's scans) multiplies the marginal
per-patient figures; the root's and a patient's metadata do not grow.
Writes ``benchmarks/results/NAME.json`` (default ``cohort_scale_<command>_<N>``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GIB = 1024 ** 3
NLST_SCANS = 75_000
#: 2.5 mm slices of 4 x 4 mm pixels: a 256 mm field of view, so the phantom's body and lungs are a chest's.
SPACING = (2.5, 4.0, 4.0)
TIMELINE_S = 10.0


def write_cohort(folder: Path, n: int, *, slices: int, size: int) -> float:
    """``n`` phantom patients as ``T00000.nii.gz`` ...; returns the seconds it took."""
    from lungzarr.algorithms.phantom import chest_phantom
    from lungzarr.io.volumes.write import write_volume
    from lungzarr.volume import Grid

    folder.mkdir(parents=True)
    start = time.perf_counter()
    shape = (slices, size, size)
    for i in range(n):
        hu, origin = chest_phantom(shape=shape, spacing=SPACING, seed=i)
        write_volume(hu, folder / f"T{i:05d}.nii.gz", grid=Grid(shape=shape, origin=origin, step=SPACING))
    return time.perf_counter() - start


def _role(rec: dict, client_pid: int) -> str:
    text = " ".join(rec["cmdline"])
    if rec["pid"] == client_pid:
        return "client"
    if "dask_scheduler" in text:
        return "scheduler"
    if "spawn_main" in text:
        return "worker"
    return "other"


class _Timeline:
    """Every :data:`TIMELINE_S` s: patients done, and the CPU and RSS of each role (from the sampler)."""

    def __init__(self, sampler, log: Path, last_stage: str, client_pid: int):
        self.sampler, self.log, self.client_pid = sampler, log, client_pid
        self.done_line = re.compile(rf"^{re.escape(last_stage)} \S+ done", re.M)
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def done(self) -> int:
        try:
            return len(self.done_line.findall(self.log.read_text(errors="replace")))
        except FileNotFoundError:
            return 0

    def sample(self):
        row = {"t": round(time.time() - self._t0, 1), "done": self.done()}
        for pid, handle in list(self.sampler._handles.items()):
            rec = self.sampler.procs[pid]
            role = _role(rec, self.client_pid)
            try:
                rss = handle.memory_info().rss
                cpu = handle.cpu_times()
                cpu_s = cpu.user + cpu.system
            except self.sampler.psutil.Error:
                rss, cpu_s = 0, rec["cpu_s"]
            row[f"{role}_cpu_s"] = round(row.get(f"{role}_cpu_s", 0.0) + cpu_s, 2)
            row[f"{role}_rss_gib"] = round(max(row.get(f"{role}_rss_gib", 0.0), rss / GIB), 3)
        self.rows.append(row)

    def _run(self):
        while not self._stop.wait(TIMELINE_S):
            self.sample()

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sample()


def run_command(command: str, input_dir: Path, store: Path, log: Path, last_stage: str) -> dict:
    """Run ``lungzarr COMMAND INPUT STORE``, polled; the wall time, ``wait4``'s CPU, each process, the timeline."""
    from benchmarks.bench_whole_scan import TreeSampler

    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "lungzarr.cli", command, str(input_dir), str(store)]
    start = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = TreeSampler(proc.pid, interval=0.5)
        sampler.start()
        timeline = _Timeline(sampler, log, last_stage, proc.pid)
        timeline.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.time() - start
        sampler.stop()
        timeline.stop()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"`lungzarr {command}` failed ({code}):\n{log.read_text()[-4000:]}")
    procs = {}
    for rec in sampler.procs.values():
        role = _role(rec, proc.pid)
        agg = procs.setdefault(role, {"processes": 0, "cpu_s": 0.0, "peak_rss_gib": 0.0})
        agg["processes"] += 1
        agg["cpu_s"] = round(agg["cpu_s"] + rec["cpu_s"], 1)
        agg["peak_rss_gib"] = round(max(agg["peak_rss_gib"], rec["peak_rss"] / GIB), 3)
    return {"command": " ".join(["lungzarr", command, "INPUT", "STORE"]), "wall_s": round(wall, 1),
            "tree_cpu_s_wait4": round(ru.ru_utime + ru.ru_stime, 1), "processes": procs,
            "timeline": timeline.rows, "log_tail": log.read_text(errors="replace")[-2500:]}


def _at(rows, frac_done: float, n: int) -> dict:
    """The first timeline row with at least ``frac_done`` of ``n`` patients done."""
    for row in rows:
        if row["done"] >= frac_done * n:
            return row
    return rows[-1]


def marginal(rows: list[dict], n: int) -> dict:
    """Per patient over the middle of the run (10 % to 90 % done), and per tenth of it."""
    def per_patient(a, b):
        d = b["done"] - a["done"]
        if d <= 0:
            return None
        return {"patients": d, "wall_s": round((b["t"] - a["t"]) / d, 4),
                **{f"{role}_cpu_s": round((b.get(f"{role}_cpu_s", 0) - a.get(f"{role}_cpu_s", 0)) / d, 4)
                   for role in ("client", "scheduler", "worker")}}

    tenths = [per_patient(_at(rows, k / 10, n), _at(rows, (k + 1) / 10, n)) for k in range(10)]
    quarters = []
    for k in range(4):
        span = [r for r in rows if k * n / 4 <= r["done"] <= (k + 1) * n / 4] or rows[-1:]
        quarters.append({role: max(r.get(f"{role}_rss_gib", 0.0) for r in span)
                         for role in ("client", "scheduler", "worker")})
    return {"middle_10_to_90pct": per_patient(_at(rows, 0.1, n), _at(rows, 0.9, n)),
            "per_tenth": tenths, "peak_rss_gib_per_quarter": quarters}


def store_sizes(store: Path) -> dict:
    meta_bytes = files = total = 0
    for dirpath, _, names in os.walk(store):
        for name in names:
            size = os.path.getsize(os.path.join(dirpath, name))
            files += 1
            total += size
            if name == "zarr.json":
                meta_bytes += size
    patients = sorted(p.name for p in (store / "patients").iterdir() if p.is_dir())
    groups = [(store / "patients" / p / "zarr.json").stat().st_size for p in patients[:: max(len(patients) // 20, 1)]]
    return {"root_zarr_json_bytes": (store / "zarr.json").stat().st_size,
            "patient_zarr_json_bytes_median": int(statistics.median(groups)),
            "metadata_bytes_all_zarr_json": meta_bytes, "metadata_bytes_per_patient": round(meta_bytes / len(patients)),
            "bytes": total, "files": files, "patients": len(patients)}


def opens(store: Path, n: int, picks: int) -> dict:
    import warnings

    import lungzarr
    from benchmarks.bench_open_patient import _child, _timed

    ids = [f"T{i:05d}" for i in sorted({(k * (n - 1)) // max(picks - 1, 1) for k in range(picks)})]
    out = {"picked": ids}
    for how in ("xr_group", "xr_path", "lungzarr"):
        runs = [_child(store, pid, how, expect=pid) for pid in ids]
        out[how] = {"fresh_s": round(statistics.median(r["fresh_s"] for r in runs), 4),
                    "warm_s": round(statistics.median(r["warm_s"] for r in runs), 4),
                    "warnings": sorted({w for r in runs for w in r["warnings"]})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lungzarr.open_patient(store, ids[0]).to_dataset()  # warm-up: the first open imports xarray's backends
        made_s, trees = _timed(lambda: lungzarr.open_patients(store))
        look_s, _ = _timed(lambda: trees[ids[-1]].to_dataset())
        out["open_patients"] = {"make_s": round(made_s, 4), "lookup_s": round(look_s, 4), "patients": len(trees)}
        table_s, frame = _timed(lambda: lungzarr.read_patients(store))
        out["read_patients_s"] = round(table_s, 4)
        out["read_patients_rows"] = len(frame)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    status_s, done = _timed(lambda: subprocess.run([sys.executable, "-m", "lungzarr.cli", "status", str(store)],
                                                   capture_output=True, text=True, env=env, cwd=REPO))
    if done.returncode != 0:
        raise SystemExit(f"`lungzarr status` failed: {done.stdout}{done.stderr}")
    out["lungzarr_status_fresh_process_s"] = round(status_s, 2)
    return out


def projection(result: dict, n: int) -> dict:
    mid = result["run"]["marginal"]["middle_10_to_90pct"]
    hours = lambda s: round(s * NLST_SCANS / 3600, 2)  # noqa: E731
    return {"scans": NLST_SCANS, "from": f"the marginal figures of this run ({n} patients, 10-90 % done)",
            "client_core_hours": hours(mid["client_cpu_s"]),
            "scheduler_core_hours": hours(mid["scheduler_cpu_s"]),
            "metadata_bytes_all_zarr_json": result["store"]["metadata_bytes_per_patient"] * NLST_SCANS,
            "root_zarr_json_bytes": result["store"]["root_zarr_json_bytes"],
            "patient_zarr_json_bytes": result["store"]["patient_zarr_json_bytes_median"],
            "note": "the root and a patient's metadata do not grow with the cohort; the client and scheduler "
                    "CPU are per patient and stage graph, not per voxel, so a real scan costs them about "
                    "what a tiny one does (the workers' CPU is what grows with the scan)"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--command", choices=("ingest", "run"), default="ingest")
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--picks", type=int, default=3)
    ap.add_argument("--no-resume", dest="resume", action="store_false")
    ap.add_argument("--name", default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="where the input and the store go (default /tmp)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_whole_scan import cpu_isa
    from benchmarks.harness import remove_unless_kept, write_result
    from benchmarks.measure import machine
    from lungzarr.pipeline.stages import STAGE_NAMES

    last_stage = "ingest" if a.command == "ingest" else STAGE_NAMES[-1]
    work = Path(tempfile.mkdtemp(prefix="lz-scale-", dir=a.workdir))
    load0 = [round(x, 2) for x in os.getloadavg()]
    try:
        made_s = write_cohort(work / "input", a.patients, slices=a.slices, size=a.size)
        print(f"wrote {a.patients} patients in {made_s:.0f} s", flush=True)
        store = work / "store.zarr"
        run = run_command(a.command, work / "input", store, work / "run.log", last_stage)
        run["marginal"] = marginal(run["timeline"], a.patients)
        print(json.dumps({k: run[k] for k in ("wall_s", "tree_cpu_s_wait4", "processes")}), flush=True)
        print(json.dumps(run["marginal"]["middle_10_to_90pct"]), flush=True)
        result = {
            "benchmark": "cohort_scale", "date": time.strftime("%Y-%m-%d %H:%M"),
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip(),
            "machine": {**machine(), **cpu_isa(), "load_average_start": load0},
            "cohort": {"patients": a.patients, "shape": [a.slices, a.size, a.size], "spacing_mm": list(SPACING),
                       "format": "NIfTI (.nii.gz), one file per patient", "write_s": round(made_s, 1)},
            "run": run,
        }
        result["store"] = store_sizes(store)
        result["opens"] = opens(store, a.patients, a.picks)
        print(json.dumps({"store": result["store"], "opens": result["opens"]}), flush=True)
        if a.resume:
            again = run_command(a.command, work / "input", store, work / "resume.log", last_stage)
            again.pop("timeline")
            result["resume_nothing_left"] = again
            print(json.dumps({k: again[k] for k in ("wall_s", "processes")}), flush=True)
        result["projection_75000"] = projection(result, a.patients)
        result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        path = write_result(a.name or f"cohort_scale_{a.command}_{a.patients}", result)
        print("written", path)
        return result
    finally:
        remove_unless_kept(work)


if __name__ == "__main__":
    main()
