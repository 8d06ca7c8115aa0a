"""CPU-s per whole scan, per stage: ``lungzarr run`` (its LocalCluster) against the straight original.

Patients (one store, one run, one fresh process each):

* ``LIDC-IDRI-0001-whole``: the whole CT of ``shared/fixtures/lidc-whole`` (133 x 512² x 2.5 mm);
* ``SYN-1MM``: a synthetic 300 x 512² x 1 mm CT (``benchmarks.cohort`` phantom, 0.7 mm pixels),
  written by ``prepare``.

Variants, each a fresh child process, interleaved pair by pair (the order rotating):

``original``
    ``benchmarks/baseline.py`` (the straight serial in-memory original: one whole-volume
    resampling, the per-slice segmentation loop, the literal network in Keras-TF over every
    window, ``find_nodules``, the DSB2017 features), always on the *reference* checkout
    (``--reference``, default this one) so that the yardstick does not move with the code
    it measures. Per stage: ``time.process_time`` (every thread of the process).
``lungzarr[:CROP]`` and ``before[:CROP]``
    ``pipeline.run`` with the defaults of ``lungzarr run`` (``cluster.dask_client("local")``:
    one single-threaded worker process per core and the scheduler in its own process;
    ``--engine auto``; ``CROP`` default ``fixed``), on this checkout or on ``--before``.
    Per stage, from the progress events (one patient: its stages run one after the other):
    the CPU of the worker processes (psutil, user + system, every thread, sampled at each
    ``done`` event), and of the whole tree (client, scheduler, workers). ``total_cpu_s`` is
    the whole child process tree from its start to its exit (``getrusage`` of itself and its
    reaped children, what ``/usr/bin/time`` reports for ``lungzarr run``): imports, cluster
    start, checks, the run, the tables, the cluster's shutdown.

    python -m benchmarks.bench_whole_cpu ab --work /tmp/lz-whole --before 16a8b28 --reference 16a8b28 \
        --pairs 2 --variants original before lungzarr:lungs        # prepare runs first (idempotent)
    python -m benchmarks.bench_whole_cpu profile --store STORE --patient LIDC-IDRI-0001 --name whole_cpu_profile

``ab`` writes ``results/whole_cpu.json`` (``--name``) and compares every lungzarr store's nodule
table with the first variant's (``compare``). ``profile`` runs cProfile over the per-volume
algorithm functions (segment, lungs3d, nodules, features) on the arrays of a stored patient,
in one process, no dask.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("LUNGZARR_SHARED", REPO.parent / "shared"))
WHOLE = SHARED / "fixtures" / "lidc-whole" / "LIDC-IDRI-0001"
PATIENTS = ("LIDC-IDRI-0001-whole", "SYN-1MM")
#: The synthetic whole scan: 300 slices of 1 mm, 512² pixels of 0.7 mm.
SYN_SPEC = dict(patient="SYN-1MM", slices=300, slice_mm=1.0, pixel_mm=0.7, size=512, seed=1000)
STAGES = ("ingest", "segment", "lungs3d", "detect", "nodules", "features")


def _input(work: Path, patient: str) -> Path:
    """The INPUT folder of one patient (a folder holding one link to the patient's DICOM folder)."""
    return work / "input" / patient


def cmd_prepare(a) -> None:
    from benchmarks.cohort import PatientSpec, write_patient

    work = Path(a.work)
    folder = _input(work, "LIDC-IDRI-0001-whole")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "LIDC-IDRI-0001").exists():
        os.symlink(WHOLE, folder / "LIDC-IDRI-0001")
    spec = PatientSpec(**SYN_SPEC)
    folder = _input(work, spec.patient)
    if len(list((folder / spec.patient).glob("*.dcm"))) != spec.slices:
        t0 = time.perf_counter()
        write_patient(spec, folder)
        print(f"wrote {spec.patient} in {time.perf_counter() - t0:.0f} s", flush=True)


def _tree_cpu(procs) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except Exception:  # a process that exited
            pass
    return total


def _rusage_cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def child_lungzarr(work: Path, patient: str, crop: str, store: Path) -> dict:
    import psutil

    from lungzarr.cluster import dask_client
    from lungzarr.pipeline import run

    me = psutil.Process()
    t_start = time.perf_counter()
    out = {"stages": {}}
    with dask_client("local", echo=lambda s: None) as client:
        pids = client.run(os.getpid)
        workers = [psutil.Process(pid) for pid in pids.values()]
        tree = [me] + [p for p in me.children(recursive=True)]
        marks = {"start": (time.perf_counter(), _tree_cpu(workers), _tree_cpu(tree))}
        last = ["start"]

        def progress(event):
            if event.event == "done":
                marks[event.stage] = (time.perf_counter(), _tree_cpu(workers), _tree_cpu(tree))
                last[0] = event.stage
            elif event.event == "failed":
                raise RuntimeError(f"{event.patient} failed in {event.stage}: {event.reason}")

        t0 = time.perf_counter()
        summaries = run(_input(work, patient), store, client=client, crop=crop, progress=progress)
        marks["tables"] = (time.perf_counter(), _tree_cpu(workers), _tree_cpu(tree))
        out["run_wall_s"] = time.perf_counter() - t0
        previous = marks["start"]
        for stage in STAGES + ("tables",):
            now = marks[stage]
            out["stages"][stage] = {"wall_s": now[0] - previous[0], "worker_cpu_s": now[1] - previous[1],
                                    "tree_cpu_s": now[2] - previous[2]}
            previous = now
        out["worker_pids"] = len(workers)
        out["failed"] = [f for s in summaries for f in s.failed]
    out["total_cpu_s"] = _rusage_cpu()
    out["total_wall_s"] = time.perf_counter() - t_start
    return out


def child_original(work: Path, patient: str) -> dict:
    from benchmarks.baseline import run_patient

    t0 = time.perf_counter()
    folder = _input(work, patient)
    (series,) = [p for p in folder.iterdir()]
    result = run_patient(series, patient=patient)
    stages = {s: {"wall_s": result["seconds"][s], "worker_cpu_s": result["cpu_seconds"][s],
                  "tree_cpu_s": result["cpu_seconds"][s]} for s in result["seconds"]}
    return {"stages": stages, "check": result["check"], "shape_2mm": result["shape_2mm"],
            "total_cpu_s": _rusage_cpu(), "total_wall_s": time.perf_counter() - t0}


def cmd_child(a) -> None:
    work = Path(a.work)
    if a.variant == "original":
        out = child_original(work, a.patient)
    else:
        out = child_lungzarr(work, a.patient, a.crop, Path(a.store))
    import lungzarr

    out["package"] = str(Path(lungzarr.__file__).resolve().parent)
    print(json.dumps(out))


def _spawn(work: Path, variant: str, patient: str, *, root: Path, store: Path) -> dict:
    name, _, crop = variant.partition(":")
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{REPO}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    # Run as a script from the work folder: neither this checkout's root nor the current folder comes
    # before the package measured on sys.path (the workers inherit the parent's sys.path).
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", "--work", str(work), "--patient", patient,
           "--variant", "original" if name == "original" else "lungzarr", "--crop", crop or "fixed",
           "--store", str(store)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} on {patient} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if not out["package"].startswith(str(root)):
        raise RuntimeError(f"{variant} imported lungzarr from {out['package']}, not from {root}")
    return out


def compare_tables(stores: dict) -> dict:
    """Each store's nodule table at p >= 0.5 against the first's: equal rows, max |difference| per column."""
    import numpy as np

    from lungzarr.io.store import read_nodules

    tables = {}
    for name, store in stores.items():
        table = read_nodules(store)
        tables[name] = table[table.threshold == 0.5].reset_index(drop=True)
    first, ref = next(iter(tables.items()))
    out = {}
    for name, table in tables.items():
        if name == first:
            continue
        rec = {"rows": [len(ref), len(table)], "same_columns": list(ref.columns) == list(table.columns)}
        if len(ref) == len(table) and rec["same_columns"]:
            diffs, unequal = {}, []
            for col in ref.columns:
                x, y = ref[col].to_numpy(), table[col].to_numpy()
                if x.dtype.kind in "fc":
                    same = np.array_equal(x, y, equal_nan=True)
                    if not same:
                        diffs[col] = float(np.nanmax(np.abs(x.astype(float) - y.astype(float))))
                else:
                    same = bool((x == y).all())
                if not same:
                    unequal.append(col)
            rec.update(unequal_columns=unequal, max_abs_diff=diffs)
        out[f"{name} vs {first}"] = rec
    return out


def _summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("total_cpu_s", "total_wall_s"):
        vals = [r[key] for r in runs]
        out[key] = {"median": round(statistics.median(vals), 2), "all": [round(v, 2) for v in vals]}
    stages = {}
    for stage in runs[0]["stages"]:
        vals = [r["stages"][stage]["worker_cpu_s"] for r in runs]
        tree = [r["stages"][stage]["tree_cpu_s"] for r in runs]
        stages[stage] = {"worker_cpu_s": round(statistics.median(vals), 2),
                         "tree_cpu_s": round(statistics.median(tree), 2), "all_worker_cpu_s": [round(v, 2) for v in vals]}
    out["stages"] = stages
    return out


def _write(a, roots, runs, loads, stores, done: str) -> None:
    """The results so far (written after every run, so a run cut short keeps what it measured)."""
    from benchmarks.harness import write_result
    from benchmarks.measure import machine

    result = {"machine": {**machine(), "isa": _isa()}, "pairs": a.pairs, "variants": a.variants,
              "roots": {k: str(v) for k, v in roots.items()}, "load_average_during": [min(loads), max(loads)],
              "patients": {}}
    for p in a.patients:
        if not all(runs[(v, p)] for v in a.variants):
            continue
        n = min(len(runs[(v, p)]) for v in a.variants)
        per = {v: _summary(runs[(v, p)][:n]) for v in a.variants}
        per["runs"] = {v: runs[(v, p)][:n] for v in a.variants}
        per["pairs_complete"] = n
        if "original" in a.variants:
            base = per["original"]["total_cpu_s"]["median"]
            per["ratio_original_over"] = {v: round(base / per[v]["total_cpu_s"]["median"], 2)
                                          for v in a.variants if v != "original"}
            pairs = {}
            for v in a.variants:
                if v != "original":
                    pairs[v] = [round(o["total_cpu_s"] / r["total_cpu_s"], 2)
                                for o, r in zip(runs[("original", p)], runs[(v, p)])]
            per["ratio_original_over_by_pair"] = pairs
        if len(stores.get(p, {})) > 1:
            per["nodule_table_p05"] = compare_tables(stores[p])
        result["patients"][p] = per
    result["progress"] = done
    write_result(a.name, result)


def _checkout(work: Path, ref: str | None) -> Path | None:
    """``ref`` as a folder with a ``lungzarr`` package: a folder as it is, else a commit of this repository."""
    if ref is None or Path(ref).is_dir():
        return None if ref is None else Path(ref)
    target = work / f"checkout-{ref}"
    if not (target / "lungzarr").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def cmd_ab(a) -> None:
    work = Path(a.work)
    cmd_prepare(a)
    roots = {"lungzarr": REPO, "before": _checkout(work, a.before),
             "original": _checkout(work, a.reference) or REPO}
    runs = {(v, p): [] for v in a.variants for p in a.patients}
    loads = []
    stores = {}
    for k in range(a.pairs):
        for p in a.patients:
            order = a.variants[k % len(a.variants):] + a.variants[:k % len(a.variants)]
            for v in order:
                root = roots[v.partition(":")[0]]
                if root is None:
                    raise SystemExit(f"variant {v!r} needs --before")
                store = work / "stores" / f"{v.replace(':', '-')}-{p}-{k}.zarr"
                shutil.rmtree(store, ignore_errors=True)
                loads.append(os.getloadavg()[0])
                out = _spawn(work, v, p, root=root, store=store)
                loads.append(os.getloadavg()[0])
                runs[(v, p)].append(out)
                if not v.startswith("original"):
                    stores.setdefault(p, {})[v] = store
                _write(a, roots, runs, loads, stores, done=f"pair {k + 1} of {a.pairs}, {p}, {v}")
                print(f"pair {k} {p} {v}: total {out['total_cpu_s']:.1f} CPU-s, "
                      + ", ".join(f"{s} {d['worker_cpu_s']:.1f}" for s, d in out["stages"].items()), flush=True)
    if not a.keep_stores:
        shutil.rmtree(work / "stores", ignore_errors=True)


def _isa() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def cmd_profile(a) -> None:
    """cProfile of the per-volume algorithms on one stored patient's 2 mm arrays (no dask, no store writes).

    The store needs ingest and segment (``lungzarr run INPUT STORE --scheduler threads`` or any
    ``ab --keep-stores`` store); lungs3d, nodules and features are profiled when their inputs are there.
    """
    import cProfile
    import io
    import pstats

    import numpy as np

    from lungzarr.algorithms.features import dsb2017_features, dsb2017_inputs
    from lungzarr.algorithms.lungs3d import lung_labels_numpy
    from lungzarr.algorithms.nodules import find_nodules
    from lungzarr.algorithms.segment import segment_lung_slice
    from lungzarr.io.store import CohortStore, grid_from_attrs
    from lungzarr.model.geometry import window_maps

    store = CohortStore(a.store, mode="r")
    ds = store.open_patient(a.patient)
    hu = np.asarray(ds.hu_2mm.values)
    grid = grid_from_attrs(ds.attrs)
    steps = {"segment (per-slice loop)": lambda: [segment_lung_slice(hu[k]) for k in range(hu.shape[0])],
             "lungs3d (lung_labels_numpy)": lambda: lung_labels_numpy(
                 hu, spacing=tuple(abs(float(s)) for s in grid.step), x_step=float(grid.step[2]))}
    if "nodule_prob" in ds:
        prob, lungs = ds.nodule_prob.values, ds.lungs.values
        labels = ds.lung_labels.values if "lung_labels" in ds else None
        steps["nodules (find_nodules)"] = lambda: find_nodules(prob, hu, grid=grid, lungs=lungs, lung_labels=labels)
        steps["features (dsb2017_features)"] = lambda: dsb2017_features(
            *dsb2017_inputs(hu, ds.segmented.values, window_maps(prob)))
    out = {"patient": a.patient, "shape_2mm": list(hu.shape), "steps": {}}
    for name, fn in steps.items():
        c0 = time.process_time()
        fn()
        plain = time.process_time() - c0
        prof = cProfile.Profile(time.process_time)
        prof.runcall(fn)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(a.top)
        print(f"== {name}: {plain:.2f} CPU-s without the profiler\n{text.getvalue()}", flush=True)
        out["steps"][name] = {"cpu_s": round(plain, 3), "top_tottime": text.getvalue().splitlines()[-a.top - 1:]}
    if a.name:
        from benchmarks.harness import write_result

        write_result(a.name, out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_whole_cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", required=True)
    p = sub.add_parser("ab")
    p.add_argument("--work", required=True)
    p.add_argument("--before", help="the code before: a folder with its lungzarr package, or a commit of this "
                                    "repository (extracted into WORK with git archive)")
    p.add_argument("--reference", help="the code the original runs on, as --before (default this checkout)")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["original", "lungzarr"])
    p.add_argument("--patients", nargs="+", default=list(PATIENTS))
    p.add_argument("--name", default="whole_cpu")
    p.add_argument("--keep-stores", action="store_true")
    p = sub.add_parser("child")
    p.add_argument("--work", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--patient", required=True)
    p.add_argument("--crop", default="fixed")
    p.add_argument("--store", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--store", required=True)
    p.add_argument("--patient", required=True)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--name", help="also write results/NAME.json")
    a = parser.parse_args(argv)
    {"prepare": cmd_prepare, "ab": cmd_ab, "child": cmd_child, "profile": cmd_profile}[a.cmd](a)


if __name__ == "__main__":
    main()
