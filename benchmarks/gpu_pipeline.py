"""Whole lungzarr pipeline on one GPU machine: CPU LocalCluster workers + one GPU worker.

Generates a synthetic cohort on the machine (chest_phantom + write_series), runs
lungzarr.pipeline.run(gpu=True) on a distributed cluster, and records per-stage
seconds, throughput, where the predict tasks ran, GPU/CPU utilisation, and a
CPU-vs-GPU check of one patient's nodule_prob.

    python3 benchmarks/gpu_pipeline.py --out results/pipeline_gpu.json --n 16 --nz-min 200 --nz-max 300
    python3 benchmarks/gpu_pipeline.py --out results/pipeline_gpu_stagewise.json --mode stagewise   # same, stage by stage

On a machine without a package registry, carry wheels (cp312 for the GPU image) of what it lacks:
zarr, numcodecs, donfig, google-crc32c, pydicom, xarray, keras, namex, optree, dask, distributed,
partd, locket, tornado, tblib, zict — then
`pip install --no-index --no-deps --target /tmp/site WHEELS && export PYTHONPATH=/tmp/site:$PWD`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "torch")
# Run as a script (python3 benchmarks/gpu_pipeline.py): the repository root on the path, for `benchmarks.*`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RESULT: dict = {}
OUT_PATH = None


def dump():
    if OUT_PATH is not None:
        Path(OUT_PATH).write_text(json.dumps(RESULT, indent=2, default=str))


def task_prefix(name: str) -> str:
    """A task name without its tokens and the suffixes dask appends (``predict-nodule-prob-<token>-<uuid>``)."""
    parts = name.split("-")
    while len(parts) > 1 and len(parts[-1]) >= 16 and all(c in "0123456789abcdef" for c in parts[-1]):
        parts.pop()
    return "-".join(parts)


def transfer_totals(dask_worker) -> dict:
    """Bytes this worker received from and sent to other workers (its transfer logs)."""
    incoming, outgoing = dask_worker.transfer_incoming_log, dask_worker.transfer_outgoing_log
    return {"in_mb": round(sum(t["total"] for t in incoming) / 1e6, 1),
            "in_s": round(sum(t["duration"] for t in incoming), 2),
            "out_mb": round(sum(t["total"] for t in outgoing) / 1e6, 1),
            "out_s": round(sum(t["duration"] for t in outgoing), 2)}


def make_patient(job):
    pid, nz, dz, seed, root = job
    from lungzarr.algorithms.phantom import DEMO_PATIENTS, chest_phantom
    from lungzarr.io.dicom import write_series

    t0 = time.perf_counter()
    hu, origin = chest_phantom(shape=(nz, 512, 512), spacing=(dz, 0.7, 0.7), nodules=DEMO_PATIENTS[0][1],
                               seed=seed)
    t1 = time.perf_counter()
    write_series(hu, Path(root) / pid, spacing=(dz, 0.7, 0.7), origin=origin, patient_id=pid)
    return pid, nz, t1 - t0, time.perf_counter() - t1


class Sampler(threading.Thread):
    """GPU utilisation / memory (NVML, else nvidia-smi) and CPU percent, every `period` s."""

    def __init__(self, period=0.25):
        super().__init__(daemon=True)
        self.period, self.samples, self.stop_flag = period, [], False
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
        except Exception as exc:  # noqa: BLE001
            RESULT["nvml_error"] = repr(exc)

    def gpu(self):
        if self.nvml is not None:
            nv, h = self.nvml
            return float(nv.nvmlDeviceGetUtilizationRates(h).gpu), nv.nvmlDeviceGetMemoryInfo(h).used / 2**20
        try:
            line = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                   "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                  timeout=5).stdout.strip().splitlines()[0]
            u, m = line.split(",")
            return float(u), float(m)
        except Exception:  # noqa: BLE001
            return float("nan"), float("nan")

    def run(self):
        import psutil

        psutil.cpu_percent()
        while not self.stop_flag:
            time.sleep(self.period)
            u, m = self.gpu()
            self.samples.append((time.time(), u, m, psutil.cpu_percent()))


def window_stats(samples, t0, t1):
    s = [x for x in samples if t0 <= x[0] <= t1]
    if not s:
        return {"n_samples": 0}
    a = np.array(s, dtype=float)
    return {"n_samples": len(s), "gpu_util_mean_pct": round(float(np.nanmean(a[:, 1])), 1),
            "gpu_util_max_pct": float(np.nanmax(a[:, 1])),
            "gpu_busy_share_of_samples": round(float(np.mean(a[:, 1] > 0)), 3),
            "gpu_mem_max_mib": float(np.nanmax(a[:, 2])),
            "cpu_util_mean_pct": round(float(np.mean(a[:, 3])), 1)}


def worker_gpu_info():
    import sys as _s

    info = {"torch_imported": "torch" in _s.modules, "keras_imported": "keras" in _s.modules}
    if "torch" in _s.modules:
        import torch

        info["cuda_initialized"] = bool(torch.cuda.is_initialized())
        if torch.cuda.is_initialized():
            info["cuda_max_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return info


CPU_CHECK = r"""
import os, sys, json, numpy as np
os.environ.setdefault("KERAS_BACKEND", "torch")
store_path, patient, z0, z1, infer_batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import dask
try:
    import torch
except ImportError:
    torch = None
from lungzarr.io.store import CohortStore
from lungzarr.model.infer import predict_nodule_prob
ds = CohortStore(store_path, mode="r").open_patient(patient)
slab = ds.hu_2mm.values[z0:z1]
with dask.config.set(scheduler="threads"):
    p = predict_nodule_prob(slab, batch_size=infer_batch, precision="fp32").compute()
np.save(sys.argv[6], p[4:-4])
print(json.dumps({"cpu_torch_cuda_available": torch.cuda.is_available() if torch else None, "torch_threads": torch.get_num_threads() if torch else None}))
"""


def main():
    global OUT_PATH
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/lzwork")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--nz-min", type=int, default=200)
    ap.add_argument("--nz-max", type=int, default=300)
    ap.add_argument("--dz", type=float, default=1.25)
    ap.add_argument("--cpu-workers", type=int, default=15)
    ap.add_argument("--gpu-threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--infer-batch", type=int, default=8)
    ap.add_argument("--gen-procs", type=int, default=16)
    ap.add_argument("--skip-cpu-check", action="store_true")
    ap.add_argument("--hide-gpu-from-cpu-workers", type=int, default=1)
    ap.add_argument("--mode", choices=("streamed", "stagewise"), default="streamed",
                    help="streamed: one pipeline.run (stages of different patients overlap); stagewise: every "
                         "patient through one stage before the next stage starts (the order before streaming)")
    ap.add_argument("--literal-upsampling", action="store_true",
                    help="the original's literal d8 layers instead of the folded upsampling (the default)")
    ap.add_argument("--crop", choices=("fixed", "lungs"), default="fixed",
                    help="the detect crop (default fixed: the crop of the recorded results, when it was the "
                         "library's default; lungzarr's default is now lungs)")
    ap.add_argument("--malloc-trim", action="store_true",
                    help="CPU workers with distributed's MALLOC_TRIM_THRESHOLD_=65536 (lungzarr drops it)")
    args = ap.parse_args()
    OUT_PATH = args.out
    RESULT["args"] = vars(args)
    RESULT["env"] = {"KERAS_BACKEND": os.environ.get("KERAS_BACKEND"), "python": sys.version.split()[0],
                     "cpu_count": os.cpu_count()}
    import dask
    import distributed
    import keras
    import xarray
    import zarr

    RESULT["env"].update(dask=dask.__version__, distributed=distributed.__version__, keras=keras.__version__,
                         xarray=xarray.__version__, zarr=zarr.__version__)
    work = Path(args.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    input_dir, store = work / "input", work / "cohort.zarr"
    input_dir.mkdir(parents=True)

    # ---- cohort
    rng = np.random.default_rng(2017)
    nzs = rng.integers(args.nz_min, args.nz_max + 1, size=args.n)
    jobs = [(f"SYN-{i:04d}", int(nz), args.dz, 100 + i, str(input_dir)) for i, nz in enumerate(nzs)]
    t0 = time.perf_counter()
    with get_context("fork").Pool(min(args.gen_procs, args.n)) as pool:
        made = pool.map(make_patient, jobs, chunksize=1)
    RESULT["cohort"] = {"n_patients": args.n, "slices": [int(n) for n in nzs], "total_slices": int(nzs.sum()),
                        "shape_yx": [512, 512], "spacing_mm": [args.dz, 0.7, 0.7],
                        "generate_wall_s": round(time.perf_counter() - t0, 2),
                        "phantom_s_mean": round(float(np.mean([m[2] for m in made])), 2),
                        "write_series_s_mean": round(float(np.mean([m[3] for m in made])), 2),
                        "dicom_bytes": sum(f.stat().st_size for f in input_dir.rglob("*") if f.is_file())}
    print("cohort", RESULT["cohort"], flush=True)
    dump()

    try:
        import torch

        RESULT["env"]["torch"] = torch.__version__
        RESULT["env"]["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass

    # ---- cluster
    gpu_env = {**os.environ}
    if args.hide_gpu_from_cpu_workers:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by the LocalCluster worker processes only
    from distributed import Client, LocalCluster, get_task_stream

    from lungzarr.cluster import worker_environ

    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ(malloc_trim=args.malloc_trim),
                          "optimization.fuse.active": False}):
        cluster = LocalCluster(n_workers=args.cpu_workers, threads_per_worker=1, processes=True,
                               memory_limit="6GiB", dashboard_address=None)
    client = Client(cluster)
    os.environ.clear()
    os.environ.update(gpu_env)
    gpu_cmd = [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
               "--nthreads", str(args.gpu_threads), "--nworkers", "1", "--name", "gpu-worker",
               "--memory-limit", "24GiB", "--no-dashboard"]
    gpu_cmd += ["--resources", "GPU=1"]
    gpu_proc = subprocess.Popen(gpu_cmd, env=gpu_env, stdout=open(work / "gpu_worker.log", "w"),
                                stderr=subprocess.STDOUT)
    client.wait_for_workers(args.cpu_workers + 1, timeout=120)
    workers = client.scheduler_info()["workers"]
    gpu_addr = [a for a, w in workers.items() if w.get("resources", {}).get("GPU", 0) > 0]
    RESULT["cluster"] = {"cpu_workers": args.cpu_workers, "cpu_threads_per_worker": 1,
                         "cpu_workers_see_gpu": not args.hide_gpu_from_cpu_workers,
                         "gpu_workers": len(gpu_addr), "gpu_worker_threads": args.gpu_threads,
                         "gpu_worker": gpu_addr}
    print("cluster", RESULT["cluster"], flush=True)

    # ---- run
    import lungzarr.pipeline as pipeline

    sampler = Sampler()
    sampler.start()
    stage_start = {}

    def progress(event):
        if event.event == "begin":
            stage_start[event.stage] = time.time()
            print(f"{time.strftime('%H:%M:%S')} stage {event.stage} ({event.total} patients)", flush=True)

    t_run0 = time.time()
    from lungzarr.model.infer import predict_stats

    from benchmarks.bench_overlap import busy_seconds

    client.run(predict_stats, reset=True, workers=gpu_addr)  # count this run only
    opts = dict(client=client, gpu=True, batch_size=args.batch_size, precision="fp32",
                infer_batch=args.infer_batch, progress=progress, fold_upsampling=not args.literal_upsampling,
                crop=args.crop)
    with get_task_stream(client) as ts, dask.config.set({"optimization.fuse.active": False}):
        if args.mode == "streamed":
            summaries = pipeline.run(input_dir, store, **opts)
        else:
            summaries = [pipeline.ingest(input_dir, store, client=client, batch_size=args.batch_size,
                                         progress=progress)]
            for stage in pipeline.STAGE_NAMES[1:]:
                summaries += pipeline.run(None, store, stages=[stage], **opts)
    t_run1 = time.time()
    time.sleep(0.5)
    sampler.stop_flag = True
    wall = t_run1 - t_run0
    RESULT["stages"] = [s.as_dict() for s in summaries]
    RESULT["stage_start_s"] = {k: round(v - t_run0, 2) for k, v in stage_start.items()}
    RESULT["failures"] = [f for s in summaries for f in s.failed]
    total_stage_s = sum(s.seconds for s in summaries)
    RESULT["run"] = {"wall_s": round(wall, 2), "sum_stage_s": round(total_stage_s, 2),
                     "patients_per_hour_wall": round(args.n / wall * 3600, 1),
                     "patients_per_hour_stages": round(args.n / total_stage_s * 3600, 1),
                     "slices_per_s_wall": round(int(nzs.sum()) / wall, 1),
                     "projection_1595_h_wall": round(1595 / (args.n / wall) / 3600, 2)}
    print("stages", RESULT["stages"], RESULT["run"], flush=True)

    # ---- utilisation per stage
    order = [s.stage for s in summaries]
    bounds = [stage_start.get(s, t_run0) for s in order] + [t_run1]
    RESULT["utilisation"] = {"whole_run": window_stats(sampler.samples, t_run0, t_run1),
                             "per_stage": {s: window_stats(sampler.samples, bounds[i], bounds[i + 1])
                                           for i, s in enumerate(order)}}
    tr = np.array([(x[0] - t_run0, x[1], x[2], x[3]) for x in sampler.samples], dtype=float)
    if len(tr):
        np.savetxt(Path(args.out).with_suffix(".samples.csv"), tr, delimiter=",", fmt="%.3f",
                   header="t_s,gpu_util_pct,gpu_mem_mib,cpu_pct")

    # ---- where tasks ran
    by_worker = defaultdict(Counter)
    busy = defaultdict(float)
    predict_compute_s = 0.0
    predict_intervals = []
    other_on_gpu_s = 0.0
    for rec in ts.data:
        key = rec["key"]
        name = key[0] if isinstance(key, tuple) else str(key)
        prefix = task_prefix(name)
        wk = "gpu" if rec["worker"] in gpu_addr else "cpu"
        by_worker[wk][prefix] += 1
        for ss in rec["startstops"]:
            if ss["action"] == "compute":
                busy[wk] += ss["stop"] - ss["start"]
                # The network's tasks (lungzarr.model.infer.is_predict_key): the engine's call on cut windows.
                if name.startswith("predict-nodule-prob-") and wk == "gpu":
                    predict_compute_s += ss["stop"] - ss["start"]
                    predict_intervals.append((ss["start"], ss["stop"]))
                elif wk == "gpu":
                    other_on_gpu_s += ss["stop"] - ss["start"]
    predict = {wk: c.get("predict-nodule-prob", 0) for wk, c in by_worker.items()}
    RESULT["task_placement"] = {
        "predict_tasks_by_worker_kind": predict,
        "all_predict_on_gpu_worker": predict.get("cpu", 0) == 0 and predict.get("gpu", 0) > 0,
        "predict_compute_s_on_gpu_worker": round(predict_compute_s, 2),
        # Everything else the GPU worker computed (reads, cuts, writes): ~0 when CPU workers feed it.
        "other_compute_s_on_gpu_worker": round(other_on_gpu_s, 2),
        "gpu_worker_s_per_patient": round((predict_compute_s + other_on_gpu_s) / args.n, 3),
        # The windows come as slabs (WindowBatch), the probabilities go back: the bytes over the comms.
        "gpu_worker_transfers": list(client.run(transfer_totals, workers=gpu_addr).values()),
        "compute_s_by_worker_kind": {k: round(v, 1) for k, v in busy.items()},
        # The union of the predict intervals over the wall time: how busy the UNet kept the GPU worker.
        "predict_busy_fraction_of_wall": round(busy_seconds(predict_intervals) / wall, 3),
        "first_predict_after_s": round(min(a for a, _ in predict_intervals) - t_run0, 2) if predict_intervals
        else None,
        # model.predict itself (inside the tasks) on the GPU worker vs the predict tasks' compute time.
        "model_predict_on_gpu_worker": list(client.run(predict_stats, workers=gpu_addr).values()),
        "task_counts_gpu_worker": dict(by_worker["gpu"].most_common(15)),
        "task_counts_cpu_workers": dict(by_worker["cpu"].most_common(15)),
    }
    RESULT["worker_gpu_info"] = {("GPU " if a in gpu_addr else "cpu ") + a: v
                                 for a, v in client.run(worker_gpu_info).items()}
    print("placement", RESULT["task_placement"], flush=True)
    from lungzarr.io.store import read_nodules

    nod = read_nodules(store)
    RESULT["nodules"] = {"rows": int(len(nod)),
                         "rows_0.5_filtered": int(((nod.threshold == 0.5) & nod.passes_dsb_filter).sum())
                         if len(nod) else 0}
    RESULT["store_mb"] = round(sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6, 1)
    dump()
    client.close()
    cluster.close()
    gpu_proc.terminate()
    gpu_proc.wait(timeout=30)

    # ---- one patient: stored GPU nodule_prob vs a CPU prediction on a slab around the nodules
    if not args.skip_cpu_check:

        from lungzarr.io.store import CohortStore

        pid = jobs[0][0]
        ds = CohortStore(store, mode="r").open_patient(pid)
        z2 = ds.z2.values
        zc = int(np.argmin(np.abs(z2 - (-70.0))))
        z0, z1 = max(0, zc - 16), min(len(z2), zc + 16)
        t0 = time.perf_counter()
        npy = work / "cpu_slab.npy"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        r = subprocess.run([sys.executable, "-c", CPU_CHECK, str(store), pid, str(z0), str(z1),
                            str(args.infer_batch), str(npy)], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            RESULT["cpu_check"] = {"error": r.stderr[-3000:]}
        else:
            cpu = np.load(npy)
            gpu = ds.nodule_prob.values[z0 + 4:z1 - 4]
            a, b = gpu >= 0.5, cpu >= 0.5
            RESULT["cpu_check"] = {"patient": pid, "slab_2mm_slices": [z0, z1],
                                   "compared_slices": [z0 + 4, z1 - 4],
                                   "max_abs_diff": float(np.abs(gpu - cpu).max()),
                                   "voxels_ge_0.5_gpu": int(a.sum()), "voxels_ge_0.5_cpu": int(b.sum()),
                                   "decisions_differ": int((a != b).sum()),
                                   "seconds": round(time.perf_counter() - t0, 1),
                                   **json.loads(r.stdout.strip().splitlines()[-1])}
        print("cpu_check", RESULT["cpu_check"], flush=True)
        dump()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
