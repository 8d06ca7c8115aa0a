"""Memory and CPU of `lungzarr run` (the defaults) on the whole LIDC-IDRI-0001 CT, and on N copies of it.

    python -m benchmarks.bench_whole_scan [--copies 1] [--name whole_scan] [-- EXTRA RUN OPTIONS]

The run is the command a user types (``python -m lungzarr.cli run INPUT STORE``, a LocalCluster with the
default layout), started as a subprocess. Every process of its tree (the client, the scheduler process, the
worker processes, multiprocessing helpers) is polled every 0.1 s with psutil: its resident set (peak per
process: GNU time's max RSS only sees the tree's root) and its CPU (user + system; the last value read before
the process ends, so at most one poll interval is lost per process). The whole tree's CPU also comes from
``os.wait4`` of the root (the kernel's count over every waited-for descendant), the robust figure under load.

``--copies N`` writes N copies of the fixture under /tmp with their own PatientID, study/series/SOP/frame of
reference UIDs (pydicom, every other byte unchanged), each copy's LUNA16 rows rewritten to its SeriesInstanceUID,
so the cohort is scored too: every copy must find the nodule. The copies are deleted at the end.

Afterwards the store is scored with ``lungzarr evaluate --luna-csv --luna-excluded`` (the fixture's rows); the
figures and the run's tail go into ``benchmarks/results/NAME.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUNGZARR_SHARED", REPO.parent / "shared"))
WHOLE = SHARED / "fixtures" / "lidc-whole"
PATIENT = "LIDC-IDRI-0001"
GIB = 2 ** 30


def cpu_isa() -> dict:
    """The CPU model and the vector extensions that matter to the engines (from /proc/cpuinfo)."""
    model, flags = None, set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    isa = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
           if f in flags]
    return {"cpu_model": model, "isa": isa, "avx512": "avx512f" in flags}


def role(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "lungzarr.cli" in text and " run " in f" {text} ":
        return "client"
    if "multiprocessing.resource_tracker" in text:
        return "resource_tracker"
    if "multiprocessing.forkserver" in text:
        return "forkserver"
    if "spawn_main" in text or "multiprocessing" in text:
        return "spawned"  # a worker or the scheduler process: told apart below by what it loaded
    return cmdline[0] if cmdline else "?"


class TreeSampler:
    """Peak RSS and last CPU of every process below (and including) ``root``, polled every ``interval`` s."""

    def __init__(self, root: int, interval: float = 0.1):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(root)
        self.interval = interval
        self.procs: dict[int, dict] = {}
        self._handles: dict[int, object] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.timeline: list[tuple[float, float]] = []  # (t, largest RSS in GiB) every 5 s
        self._t0 = time.time()

    def _sample(self):
        ps = self.psutil
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except ps.Error:
            procs = list(self._handles.values())
        largest = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    cpu = p.cpu_times()
                    rec = self.procs.get(p.pid)
                    if rec is None:
                        rec = self.procs[p.pid] = {"pid": p.pid, "ppid": p.ppid(), "cmdline": p.cmdline()[:8],
                                                   "peak_rss": 0, "cpu_s": 0.0, "threads_max": 0,
                                                   "first_seen_s": round(time.time() - self._t0, 1)}
                        self._handles[p.pid] = p
                    rec["peak_rss"] = max(rec["peak_rss"], rss)
                    rec["cpu_s"] = cpu.user + cpu.system
                    rec["threads_max"] = max(rec["threads_max"], p.num_threads())
                    rec["last_seen_s"] = round(time.time() - self._t0, 1)
                    largest = max(largest, rss)
                    if rss == rec["peak_rss"]:
                        rec["peak_at_s"] = rec["last_seen_s"]
                        # What the process has loaded at its peak tells a worker from the scheduler process.
                        if "maps" not in rec or rss > rec.get("maps_rss", 0) * 1.05:
                            rec["maps_rss"] = rss
            except ps.Error:
                continue
        t = time.time() - self._t0
        if not self.timeline or t - self.timeline[-1][0] >= 5.0:
            self.timeline.append((round(t, 1), round(largest / GIB, 3)))

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self):
        self._sample()
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()


def timeline_every(timeline, seconds: float) -> dict:
    """``{t: largest RSS}`` at most every ``seconds`` (the peak of each span, so no peak is lost)."""
    out: dict = {}
    for t, v in timeline:
        key = f"{seconds * (t // seconds):.0f}"
        out[key] = max(out.get(key, 0.0), v)
    return out


def libs_of(pid: int) -> set:
    try:
        return {line.split()[-1] for line in open(f"/proc/{pid}/maps") if ".so" in line}
    except OSError:
        return set()


def write_copies(work: Path, n: int) -> tuple[Path, Path]:
    """``n`` copies of the fixture under ``work/input`` with fresh UIDs, and a LUNA16 annotations CSV for them."""
    import pandas as pd
    import pydicom
    from pydicom.uid import generate_uid

    src = WHOLE / PATIENT
    files = sorted(src.glob("*.dcm"))
    luna = pd.read_csv(WHOLE / f"{PATIENT}_luna16_annotations.csv")
    excluded = pd.read_csv(WHOLE / f"{PATIENT}_luna16_annotations_excluded.csv")
    rows, rows_ex = [], []
    for i in range(n):
        pid = f"{PATIENT}-copy{i + 1:02d}"
        out = work / "input" / pid
        out.mkdir(parents=True)
        uids = {}  # old UID -> new UID, the same in every file of the copy
        for f in files:
            ds = pydicom.dcmread(f)
            for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
                old = ds.get(key)
                if old is not None:
                    new = uids.setdefault(str(old), generate_uid())
                    setattr(ds, key, new)
                    if key == "SOPInstanceUID":
                        ds.file_meta.MediaStorageSOPInstanceUID = new
            ds.PatientID = pid
            ds.PatientName = pid
            ds.save_as(out / f.name, enforce_file_format=True)
        series = uids[str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)]
        rows.append(luna.assign(seriesuid=series))
        rows_ex.append(excluded.assign(seriesuid=series))
    csv, csv_ex = work / "annotations.csv", work / "annotations_excluded.csv"
    pd.concat(rows).to_csv(csv, index=False)
    pd.concat(rows_ex).to_csv(csv_ex, index=False)
    return csv, csv_ex


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=0, help="0: the fixture itself (a symlink); N: N copies in /tmp")
    ap.add_argument("--name", default="whole_scan")
    ap.add_argument("--note", default="", help="what this variant is (written into the JSON)")
    ap.add_argument("extra", nargs="*", help="options appended to `lungzarr run` (after --)")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from benchmarks.harness import remove_unless_kept
    from benchmarks.measure import machine

    work = Path(tempfile.mkdtemp(prefix="lz-whole-", dir="/tmp"))
    try:
        if a.copies:
            csv, csv_ex = write_copies(work, a.copies)
        else:
            (work / "input").mkdir()
            (work / "input" / PATIENT).symlink_to(WHOLE / PATIENT)
            csv = WHOLE / f"{PATIENT}_luna16_annotations.csv"
            csv_ex = WHOLE / f"{PATIENT}_luna16_annotations_excluded.csv"
        store = work / "store.zarr"
        env = dict(os.environ, PYTHONPATH=str(REPO), LUNGZARR_CACHE=os.environ.get(
            "LUNGZARR_CACHE", str(Path.home() / ".cache" / "lungzarr")))
        cmd = [sys.executable, "-m", "lungzarr.cli", "run", str(work / "input"), str(store), *a.extra]
        log = work / "run.log"
        load0 = os.getloadavg()
        t0 = time.time()
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            sampler = TreeSampler(proc.pid)
            sampler.start()
            # Which processes loaded the inference engine: polled once a minute (cheap enough).
            engine_pids = set()

            def engines():
                while proc.poll() is None:
                    for pid in list(sampler.procs):
                        libs = libs_of(pid)
                        if any("openvino" in x or "tensorflow" in x or "onnxruntime" in x for x in libs):
                            engine_pids.add(pid)
                    time.sleep(20)
            threading.Thread(target=engines, daemon=True).start()
            _, status, ru = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            sampler.stop()
        wall = time.time() - t0
        tail = log.read_text()[-6000:]
        print(tail)
        if proc.returncode != 0:
            raise SystemExit(f"lungzarr run failed ({proc.returncode}); log above")

        out = work / "eval"
        ev = subprocess.run([sys.executable, "-m", "lungzarr.cli", "evaluate", str(store), "--luna-csv", str(csv),
                             "--luna-excluded", str(csv_ex), "--bootstrap", "0", "-o", str(out)],
                            env=env, cwd=REPO, capture_output=True, text=True)
        if ev.returncode != 0:
            raise SystemExit(ev.stdout + ev.stderr)
        results = json.loads((out / "results.json").read_text())
        procs = sorted(sampler.procs.values(), key=lambda r: -r["peak_rss"])
        for r in procs:
            r["role"] = role(r["cmdline"])
            if r["role"] == "client" and r["pid"] != proc.pid:
                r["role"] = "fork of the client (short-lived)"
            if r["role"] == "spawned":
                r["role"] = "worker (engine loaded)" if r["pid"] in engine_pids else "spawned (no engine)"
            r["peak_rss_gib"] = round(r.pop("peak_rss") / GIB, 3)
            r["cpu_s"] = round(r["cpu_s"], 1)
            r.pop("maps_rss", None)
        result = {
            "what": "lungzarr run (defaults unless `run_options`) on the whole LIDC-IDRI-0001 CT "
                    "(133 x 512 x 512, 2.5 mm); per-process peak RSS (psutil, 0.1 s polls) and CPU; "
                    "LUNA16 evaluation with the excluded findings",
            "note": a.note, "copies": a.copies or 1, "run_options": a.extra,
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip(),
            "machine": {**machine(), **cpu_isa(), "load_average_start": [round(x, 2) for x in load0]},
            "wall_s": round(wall, 1),
            "tree_cpu_s_wait4": round(ru.ru_utime + ru.ru_stime, 1),
            "tree_cpu_s_per_patient": round((ru.ru_utime + ru.ru_stime) / (a.copies or 1), 1),
            "largest_process_peak_rss_gib": procs[0]["peak_rss_gib"],
            "wait4_maxrss_gib": round(ru.ru_maxrss * 1024 / GIB, 3),
            "processes": procs,
            "largest_rss_timeline_gib": timeline_every(sampler.timeline, 15.0),
            "evaluation": {k: results.get(k) for k in ("n_scans", "n_targets", "n_hit_targets", "sensitivity",
                                                       "n_false_positives", "fps_per_scan", "n_detections",
                                                       "n_true_positive_detections", "n_ignored_detections",
                                                       "cpm")},
            "evaluation_raw": {k: v for k, v in results.items() if not isinstance(v, (list, dict))},
            "run_log_tail": tail[-3000:],
        }
        from benchmarks.harness import write_result

        path = write_result(a.name, result)
        print(json.dumps({k: result[k] for k in ("wall_s", "tree_cpu_s_wait4", "largest_process_peak_rss_gib",
                                                  "evaluation")}, indent=1))
        for r in procs:
            print(f"{r['pid']:>8} {r['role']:<24} peak {r['peak_rss_gib']:.3f} GiB at {r.get('peak_at_s')} s, "
                  f"CPU {r['cpu_s']} s")
        print("written", path)
    finally:
        remove_unless_kept(work)


if __name__ == "__main__":
    main()
