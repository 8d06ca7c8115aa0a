"""CPU-s per patient of each CPU stage on real volumes; cProfile of each; A/B of two checkouts.

Patients (each in a store of its own, so every figure is one patient's):

* ``LIDC-IDRI-0001`` (16 x 512² x 2.5 mm slab, 20 x 180 x 180 at 2 mm), ``RICORD-1A-chest``
  (128 x 512² x 1.25 mm, JPEG Lossless), both from ``shared/fixtures``;
* ``SYN-0001``: the benchmarks' first synthetic realistic patient (300 x 512² x 1.25 mm,
  188 x 179 x 179 at 2 mm, the size the issue's per-patient figures were measured on);
* the DSB2017 fixture patient (``import-legacy`` of the original's 2 mm arrays, 0acbeb...):
  nodules and features only (it has no DICOM).

``build`` runs ingest .. detect once (the UNet is not a CPU stage; its ``nodule_prob`` is
kept in a base store per patient). A ``child`` then, in a fresh process, with dask's
synchronous scheduler (so process CPU = the work, no thread or cluster noise), measures
``time.process_time`` of each ``pipeline.run`` call: ingest, segment, lungs3d on a fresh
store from INPUT; nodules, features on a copy of the base store (its detect kept). Each
call includes its per-run constants (lock, checks, tables, consolidated metadata) for
that one patient. A warm-up pass over the LIDC slab runs first (imports, first-call
costs), not counted.

    python -m benchmarks.bench_cpu_stages build  --work /tmp/lz-cpu
    python -m benchmarks.bench_cpu_stages ab     --work /tmp/lz-cpu --before /tmp/lz-before --rounds 3
    python -m benchmarks.bench_cpu_stages ab     --work /tmp/lz-cpu --before /tmp/lz-before --rounds 2 \
        --copies 3 --name cpu_stages_marginal     # what one more patient costs (run constants left out)
    python -m benchmarks.bench_cpu_stages ab     --work /tmp/lz-cpu --before /tmp/lz-before --rounds 5 \
        --stages ingest --name cpu_stages_ingest  # one stage only (the DICOM patients)
    python -m benchmarks.bench_cpu_stages profile --work /tmp/lz-cpu --stage nodules --patient SYN-0001
    LZ_KEEP_STORES=after python -m benchmarks.bench_cpu_stages child --work /tmp/lz-cpu   # (and before)
    python -m benchmarks.bench_cpu_stages compare --work /tmp/lz-cpu before after

``ab`` alternates fresh processes of the two checkouts (``--before`` is a directory with
the other ``lungzarr`` package, e.g. ``git archive <commit> | tar -x -C DIR``), each
checkout's own ``benchmarks`` driving it, and writes ``results/cpu_stages.json``. With
``--stages`` this checkout's driver runs both (``LZ_BENCH_PACKAGE_ROOT`` names the package to
measure), so a checkout whose driver predates the option can be the other side.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("LUNGZARR_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
DICOM = {"LIDC-IDRI-0001": FIXTURES / "lidc" / "LIDC-IDRI-0001",
         "RICORD-1A-chest": FIXTURES / "ricord" / "RICORD-1A-chest"}
DSB = "0acbebb8d463b4b9ca88cf38431aac69"
FROM_INPUT = ("ingest", "segment", "lungs3d")
FROM_BASE = ("nodules", "features")


def _input_dir(work: Path, patient: str) -> Path:
    folder = work / "input" / patient
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / patient
    if not link.exists():
        os.symlink(DICOM.get(patient, work / "syn" / patient), link)
    return folder


def patients(work: Path) -> list[str]:
    return [*DICOM, "SYN-0001", DSB]


def cmd_build(a) -> None:
    import dask

    from lungzarr import pipeline
    from lungzarr.pipeline.legacy_import import import_legacy

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    from benchmarks.cohort import cohort_specs, write_cohort

    write_cohort(cohort_specs(1), work / "syn")
    with dask.config.set(scheduler="threads"):
        for p in [*DICOM, "SYN-0001"]:
            base = work / "base" / f"{p}.zarr"
            if (base / "zarr.json").exists():
                continue
            t0 = time.perf_counter()
            pipeline.run(_input_dir(work, p), base, stages=["ingest"])
            # The fixed crop's map, as the recorded figures' base stores (then the library's default; now the
            # lung box): the nodules and features stages measured on it depend on the map.
            pipeline.run(None, base, stages=["segment", "lungs3d", "detect"], crop="fixed")
            print(f"{p}: base store in {time.perf_counter() - t0:.0f} s", flush=True)
        base = work / "base" / f"{DSB}.zarr"
        if not (base / "zarr.json").exists():
            import_legacy(FIXTURES / "dsb2017" / "input", base)


def _measure(fn) -> float:
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def one_patient(work: Path, patient: str, scratch: Path, stages=None) -> dict:
    """CPU-s of each CPU stage for one patient (fresh stores under ``scratch``).

    ``stages``: measure only these (and run only what they need: ``segment`` and ``lungs3d``
    follow an ingest; default all of them).
    """
    from lungzarr import pipeline

    stages = list(FROM_INPUT + FROM_BASE) if not stages else list(stages)
    out = {}
    from_input = [st for st in FROM_INPUT if st in stages]
    if patient != DSB and from_input:
        store = scratch / f"{patient}-input.zarr"
        shutil.rmtree(store, ignore_errors=True)
        out["ingest"] = _measure(lambda: pipeline.run(_input_dir(work, patient), store, stages=["ingest"]))
        for stage in FROM_INPUT[1:FROM_INPUT.index(from_input[-1]) + 1]:
            out[stage] = _measure(lambda stage=stage: pipeline.run(None, store, stages=[stage]))
        out = {st: v for st, v in out.items() if st in stages}
        _keep(work, store, f"{patient}-input.zarr")
    if any(st in stages for st in FROM_BASE):
        store = scratch / f"{patient}-base.zarr"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(work / "base" / f"{patient}.zarr", store)
        for stage in FROM_BASE:
            out[stage] = _measure(lambda stage=stage: pipeline.run(None, store, stages=[stage], overwrite=True))
        _keep(work, store, f"{patient}-base.zarr")
    return {st: v for st, v in out.items() if st in stages}


def _keep(work: Path, store: Path, name: str) -> None:
    """Move the store to ``work/kept/$LZ_KEEP_STORES/name`` (for ``compare``) or delete it."""
    if os.environ.get("LZ_KEEP_STORES"):
        keep = work / "kept" / os.environ["LZ_KEEP_STORES"]
        keep.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(keep / name, ignore_errors=True)
        shutil.move(str(store), keep / name)
    shutil.rmtree(store, ignore_errors=True)


def cmd_compare(a) -> None:
    """Every output of two kept runs equal: arrays (bit for bit), nodule and DSB2017 tables, cohort tables,
    stage records and patient attrs (timestamps and ids left out). Reads both with this checkout's
    readers (which read the old nodule layout too)."""
    import numpy as np
    import pandas as pd
    import zarr

    from lungzarr.io.store import CohortStore, read_nodules, read_patients
    from lungzarr.pipeline.tables import patient_nodules

    def arrays(path):
        out = {}
        root = zarr.open_group(path, mode="r", zarr_format=3, use_consolidated=False)
        for name, arr in root.arrays():
            out[name] = arr[...]
        for name, grp in root.groups():
            out.update({f"{name}/{k}": v for k, v in arrays(f"{path}/{name}").items()})
        return out

    def same(x, y):
        if x.dtype.kind == "f":
            return x.shape == y.shape and np.array_equal(x.view(np.uint8), y.view(np.uint8))
        return x.dtype == y.dtype and np.array_equal(x, y)

    volatile = {"completed", "id", "depends_on", "lungzarr:written", "lungzarr:content_sha256"}
    report = {}
    kept = Path(a.work) / "kept"
    for store_a in sorted((kept / a.a).iterdir()):
        store_b = kept / a.b / store_a.name
        sa, sb = CohortStore(store_a, mode="r"), CohortStore(store_b, mode="r")
        checks = {}
        for p in sa.patients():
            ga, gb = f"{store_a}/patients/{p}", f"{store_b}/patients/{p}"
            arr_a = {k: v for k, v in arrays(ga).items() if not k.startswith("nodules/")}
            arr_b = {k: v for k, v in arrays(gb).items() if not k.startswith("nodules/")}
            checks["array names"] = sorted(arr_a) == sorted(arr_b)
            checks["arrays"] = [k for k in arr_a if k in arr_b and not same(arr_a[k], arr_b[k])]
            if sa.has_subgroup(p, "nodules"):
                ta, tb = patient_nodules(sa, p), patient_nodules(sb, p)
                pd.testing.assert_frame_equal(ta, tb, check_exact=True)
                checks["nodule table rows"] = len(ta)
                checks["nodule rows with the centroid outside the lung mask"] = int((~ta.inside_lung_mask).sum())
                # assert_frame_equal takes -0.0 for 0.0: the float columns bit for bit as well.
                checks["nodule float columns differing in bits"] = [
                    c for c in ta.columns if ta[c].dtype.kind == "f" and not same(ta[c].to_numpy(), tb[c].to_numpy())]
            for key in ("lungzarr:stages",):
                ra = {k: {kk: vv for kk, vv in v.items() if kk not in volatile}
                      for k, v in sa.patient_attrs(p).get(key, {}).items()}
                rb = {k: {kk: vv for kk, vv in v.items() if kk not in volatile}
                      for k, v in sb.patient_attrs(p).get(key, {}).items()}
                checks["stage records"] = ra == rb
            strip = {"lungzarr:stages", "source_folder"}
            checks["patient attrs"] = ({k: v for k, v in sa.patient_attrs(p).items() if k not in strip}
                                       == {k: v for k, v in sb.patient_attrs(p).items() if k not in strip})
        pd.testing.assert_frame_equal(read_nodules(store_a), read_nodules(store_b), check_exact=True)
        pd.testing.assert_frame_equal(read_patients(store_a), read_patients(store_b), check_exact=True)
        checks["cohort tables"] = "equal (pandas.testing, exact)"
        report[store_a.name] = checks
    print(json.dumps(report, indent=1))
    bad = {k: v for k, v in report.items() if v.get("arrays") or not v.get("array names", True)
           or v.get("nodule float columns differing in bits")
           or not v.get("stage records", True) or not v.get("patient attrs", True)}
    if bad:
        raise SystemExit(f"outputs differ: {bad!r}")


def copies_run(work: Path, patient: str, k: int, scratch: Path) -> dict:
    """CPU-s of each CPU stage for ``k`` copies of ``patient`` in one store and one run per stage.

    Copies are the same DICOM folder under k names (INPUT entries) and the same base group copied k times;
    ``(copies_run(k) - copies_run(1)) / (k - 1)`` is what one more patient costs, the run's own constants
    (lock, checks, table writes, consolidated metadata) left out.
    """
    from lungzarr import pipeline

    names = [patient] + [f"{patient}-copy{i}" for i in range(1, k)]
    inp = scratch / f"input-{k}"
    inp.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (inp / name).exists():
            os.symlink(DICOM.get(patient, work / "syn" / patient), inp / name)
    store = scratch / f"copies-{k}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    out = {"ingest": _measure(lambda: pipeline.run(inp, store, stages=["ingest"]))}
    for stage in ("segment", "lungs3d"):
        out[stage] = _measure(lambda stage=stage: pipeline.run(None, store, stages=[stage]))
    shutil.rmtree(store, ignore_errors=True)
    base = work / "base" / f"{patient}.zarr"
    shutil.copytree(base, store)
    for name in names[1:]:
        shutil.copytree(base / "patients" / patient, store / "patients" / name)
    for stage in FROM_BASE:
        out[stage] = _measure(lambda stage=stage: pipeline.run(None, store, stages=[stage], overwrite=True))
    shutil.rmtree(store, ignore_errors=True)
    return out


def cmd_child(a) -> None:
    import dask

    import lungzarr

    from benchmarks.harness import preimport

    print(f"measuring {lungzarr.__file__}", file=sys.stderr)
    work = Path(a.work)
    scratch = work / "scratch" / f"{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    preimport()
    try:
        with dask.config.set(scheduler="sync"):
            one_patient(work, "LIDC-IDRI-0001", scratch, a.stages)  # warm-up: imports and first calls
            if a.copies:
                result = {f"{a.copies_of} x{k}": copies_run(work, a.copies_of, k, scratch) for k in (1, a.copies)}
            else:
                every = a.patients or patients(work)
                if a.stages and not set(a.stages) & set(FROM_BASE):
                    every = [p for p in every if p != DSB]  # the DSB2017 patient has no DICOM
                result = {p: one_patient(work, p, scratch, a.stages) for p in every}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result))


def cmd_profile(a) -> None:
    """cProfile one stage of one patient (after a warm-up pass), top entries by cumulative and own time."""
    import cProfile
    import io
    import pstats

    import dask

    from lungzarr import pipeline

    from benchmarks.harness import preimport

    work = Path(a.work)
    scratch = work / "scratch" / f"prof-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    preimport()
    with dask.config.set(scheduler="sync"):
        one_patient(work, "LIDC-IDRI-0001", scratch)
        if a.stage in FROM_INPUT:
            store = scratch / "p.zarr"
            before = FROM_INPUT[:FROM_INPUT.index(a.stage)]
            if before:
                pipeline.run(_input_dir(work, a.patient), store, stages=["ingest"])
                if len(before) > 1:
                    pipeline.run(None, store, stages=list(before[1:]))
            call = (lambda: pipeline.run(_input_dir(work, a.patient), store, stages=["ingest"])) \
                if a.stage == "ingest" else (lambda: pipeline.run(None, store, stages=[a.stage], overwrite=True))
        else:
            store = scratch / "p.zarr"
            shutil.copytree(work / "base" / f"{a.patient}.zarr", store)
            if a.stage == "features":
                pipeline.run(None, store, stages=["nodules"], overwrite=True)
            call = lambda: pipeline.run(None, store, stages=[a.stage], overwrite=True)  # noqa: E731
        # Process CPU as the clock: what each function costs in CPU-s (zarr's I/O threads included),
        # not the wall time it waited on them.
        prof = cProfile.Profile(time.process_time)
        c0 = time.process_time()
        prof.enable()
        call()
        prof.disable()
        cpu = time.process_time() - c0
    shutil.rmtree(scratch, ignore_errors=True)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    print(f"{a.stage} of {a.patient}: {cpu:.2f} CPU-s (under cProfile)", file=text)
    stats.sort_stats("cumulative").print_stats(a.top)
    stats.sort_stats("tottime").print_stats(a.top)
    print(text.getvalue())


def cmd_ab(a) -> None:
    """Alternate fresh child processes of this checkout ("after") and ``--before``; medians per stage."""
    from benchmarks.measure import machine

    work = Path(a.work)
    variants = {"before": Path(a.before).resolve(), "after": REPO}
    runs = {name: [] for name in variants}
    load = [os.getloadavg()]
    for r in range(a.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            root = variants[name]
            env = {**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "2"}
            t0 = time.perf_counter()
            extra = ["--copies", str(a.copies), "--copies-of", a.copies_of] if a.copies else []
            cwd = root
            if a.stages:
                # This checkout's driver (the other's may not know --stages) measuring ROOT's lungzarr.
                extra += ["--stages", *a.stages]
                env["LZ_BENCH_PACKAGE_ROOT"], cwd = str(root), REPO
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_cpu_stages", "child", "--work",
                                   str(work), *extra], capture_output=True, text=True, env=env, cwd=cwd,
                                  check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} child failed:\n{proc.stderr[-4000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            load.append(os.getloadavg())
            print(f"round {r} {name}: {time.perf_counter() - t0:.0f} s "
                  f"{json.dumps({p: round(sum(v.values()), 2) for p, v in runs[name][-1].items()})}", flush=True)
    summary = {}
    for name, results in runs.items():
        per = {}
        for p in results[0]:
            per[p] = {st: {"median": round(statistics.median(rd[p][st] for rd in results), 3),
                           "min": round(min(rd[p][st] for rd in results), 3),
                           "max": round(max(rd[p][st] for rd in results), 3)}
                      for st in results[0][p]}
        summary[name] = per
    ratio = {p: {st: round(summary["after"][p][st]["median"] / summary["before"][p][st]["median"], 3)
                 for st in summary["after"][p]} for p in summary["after"]}
    if a.copies:  # one more patient: (k copies - 1 copy) / (k - 1), per round, then the median
        one, many = f"{a.copies_of} x1", f"{a.copies_of} x{a.copies}"
        for name, results in runs.items():
            summary[name]["marginal per patient"] = {
                st: {"median": round(statistics.median((rd[many][st] - rd[one][st]) / (a.copies - 1)
                                                       for rd in results), 3),
                     "min": round(min((rd[many][st] - rd[one][st]) / (a.copies - 1) for rd in results), 3),
                     "max": round(max((rd[many][st] - rd[one][st]) / (a.copies - 1) for rd in results), 3)}
                for st in results[0][one]}
        ratio["marginal per patient"] = {
            st: round(summary["after"]["marginal per patient"][st]["median"]
                      / summary["before"]["marginal per patient"][st]["median"], 3)
            for st in summary["after"]["marginal per patient"]}
    result = {"what": "CPU-s (process_time) per patient of each CPU stage, one patient per store, dask sync "
                      "scheduler, fresh processes alternating before/after", "machine": machine(),
              "load_average_per_run": load, "rounds": a.rounds, "before": str(variants["before"]),
              "stages": a.stages or list(FROM_INPUT + FROM_BASE),
              "summary": summary, "ratio_after_before": ratio, "runs": runs}
    out = HERE / "results" / f"{a.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"summary": summary, "ratio": ratio}, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("build", "child", "profile", "ab", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--work", required=True)
    sub.choices["child"].add_argument("--patients", nargs="*")
    for name in ("child", "ab"):
        sub.choices[name].add_argument("--stages", nargs="+", choices=FROM_INPUT + FROM_BASE,
                                       help="measure only these stages (default all)")
        sub.choices[name].add_argument("--copies", type=int, default=0,
                                       help="instead: 1 and K copies of --copies-of, one store and run each")
        sub.choices[name].add_argument("--copies-of", default="SYN-0001")
    sub.choices["profile"].add_argument("--stage", required=True, choices=FROM_INPUT + FROM_BASE)
    sub.choices["profile"].add_argument("--patient", default="SYN-0001")
    sub.choices["profile"].add_argument("--top", type=int, default=30)
    sub.choices["ab"].add_argument("--before", required=True)
    sub.choices["ab"].add_argument("--rounds", type=int, default=3)
    sub.choices["ab"].add_argument("--name", default="cpu_stages")
    sub.choices["compare"].add_argument("a", help="a name under WORK/kept (LZ_KEEP_STORES of a child)")
    sub.choices["compare"].add_argument("b")
    a = ap.parse_args(argv)
    # LZ_BENCH_PACKAGE_ROOT: the checkout whose lungzarr an ``ab --stages`` child measures.
    sys.path.insert(0, os.environ.get("LZ_BENCH_PACKAGE_ROOT", str(REPO)))
    {"build": cmd_build, "child": cmd_child, "profile": cmd_profile, "ab": cmd_ab, "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    main()
