"""``--crop fixed`` vs ``--crop lungs`` on every real patient of the fixtures, A/B interleaved in one process.

    python -m benchmarks lungbox [--rounds 2] [--engine auto] [--also-margin 8] [--name lungbox]

One child process (fresh): the LIDC-IDRI-0001 and RICORD slabs are ingested and segmented into a
temporary store (the pipeline, dask threads); the DSB2017 patient is its 2 mm segmented volume (the
stand-in the tests use, docs/algorithms.md §7) with its mask ``segmented != -2000``. The engine is
compiled at every box shape first; then each round runs, per patient, the detect computation
(:func:`lungzarr.model.infer.predict_nodule_prob` on dask threads; for ``lungs`` the lung box is a task
of the same graph, so its cost is counted) for each variant, the order rotating between rounds, so a
busy neighbour slows all variants alike. Reported per patient: wall and process CPU seconds (median
over rounds), the speed-up, windows and voxels the network predicted, and the agreement with the fixed
crop: max |dp| inside the lung mask and overall, p >= 0.5 voxels changed, and whether the nodule table
at p >= 0.5 (``select_nodules``) is identical. ``--also-margin`` adds a variant with a smaller margin
than the network's reach (for comparison only; not what ``--crop lungs`` does).
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

DSB_PATIENT = "0acbebb8d463b4b9ca88cf38431aac69"


def _shared() -> Path:
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("LUNGZARR_SHARED", repo.parent / "shared")) / "fixtures"


def real_patients(work: Path) -> list[dict]:
    """``[{name, hu, lungs, grid, source}]``: the fixtures' real patients as 2 mm numpy volumes."""
    import dask
    import numpy as np

    from lungzarr import pipeline
    from lungzarr.io.store import CohortStore, grid_from_attrs
    from lungzarr.volume import Grid

    fixtures = _shared()
    (work / "input").mkdir(parents=True, exist_ok=True)
    for src in (fixtures / "lidc" / "LIDC-IDRI-0001", fixtures / "ricord" / "RICORD-1A-chest"):
        (work / "input" / src.name).symlink_to(src)
    store = work / "real.zarr"
    with dask.config.set(scheduler="threads"):
        summaries = pipeline.run(work / "input", store, stages=["ingest", "segment"])
    assert all(not s.failed for s in summaries), [s.failed for s in summaries]
    out = []
    cohort = CohortStore(store, mode="r")
    for name in cohort.patients():
        ds = cohort.open_patient(name)
        out.append({"name": name, "hu": ds.hu_2mm.values, "lungs": ds.lungs.values,
                    "grid": grid_from_attrs(ds.attrs), "source": "DICOM -> ingest -> segment (lungzarr)"})
    seg = np.load(fixtures / "dsb2017" / "input" / "stage1_segmented_2x2x2" / f"{DSB_PATIENT}.npz")["arr_0"]
    out.append({"name": f"DSB2017-{DSB_PATIENT[:6]}", "hu": seg, "lungs": seg != -2000,
                "grid": Grid(seg.shape, (0.0, 0.0, 0.0), (2.0, 2.0, 2.0)),
                "source": "stage1_segmented_2x2x2 (the segmented stand-in), lungs = segmented != -2000"})
    return out


def nodule_table(prob, patient: dict):
    from lungzarr.algorithms.nodules import find_nodules, select_nodules

    table = find_nodules(prob, patient["hu"], grid=patient["grid"], lungs=patient["lungs"],
                         patient=patient["name"])
    return select_nodules(table).reset_index(drop=True)


def agreement(fixed, other, patient: dict) -> dict:
    """How ``other`` (a stored map) differs from the fixed crop's ``fixed`` on one patient."""
    import numpy as np

    lungs = patient["lungs"]
    dp = np.abs(other.astype(np.float64) - fixed.astype(np.float64))
    a, b = nodule_table(fixed, patient), nodule_table(other, patient)
    return {"max_abs_dp_in_lungs": float(dp[lungs].max()) if lungs.any() else 0.0,
            "max_abs_dp": float(dp.max()),
            "fixed_p_ge_0.5": int((fixed >= 0.5).sum()),
            "fixed_p_ge_0.5_in_lungs": int((fixed[lungs] >= 0.5).sum()),
            "changed_p_ge_0.5": int(((fixed >= 0.5) != (other >= 0.5)).sum()),
            "changed_p_ge_0.5_in_lungs": int(((fixed >= 0.5) != (other >= 0.5))[lungs].sum()),
            "nodules_0.5_fixed": int(len(a)), "nodules_0.5": int(len(b)),
            "nodule_table_identical": bool(a.equals(b)),
            **table_differences(a, b)}


def table_differences(a, b) -> dict:
    """Which columns of two nodule tables differ, and by how much (for maps that differ by rounding).

    ``columns_differing``: ``{column: max |difference|}`` (numeric) or ``"values"``; empty when the
    tables are equal. Tables of other lengths or columns: ``same_rows`` False.
    """
    import numpy as np

    if len(a) != len(b) or list(a.columns) != list(b.columns):
        return {"same_rows": False, "columns_differing": {}}
    out = {}
    for column in a.columns:
        x, y = a[column].to_numpy(), b[column].to_numpy()
        if np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number) and x.dtype != bool:
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
            both_nan = np.isnan(x.astype(np.float64)) & np.isnan(y.astype(np.float64))
            worst = float(np.where(both_nan, 0.0, diff).max()) if len(diff) else 0.0
            if worst > 0 or np.isnan(worst):
                out[column] = worst
        elif not np.array_equal(x, y):
            out[column] = "values"
    return {"same_rows": True, "columns_differing": out}


def _graph(patient: dict, variant: dict, engine: str):
    """The detect computation of one patient and variant (lazy), as the stage builds it."""
    import dask
    import dask.array as da

    from lungzarr.algorithms.crop import lung_box
    from lungzarr.model.infer import predict_nodule_prob

    hu = da.from_array(patient["hu"], chunks=(64, -1, -1))
    box = None
    if variant["crop"] == "lungs":
        lungs = da.from_array(patient["lungs"], chunks=(64, -1, -1))
        box = dask.delayed(lung_box, pure=True)(lungs, margin=variant["margin"])
    return predict_nodule_prob(hu, engine=engine, box=box), box


def interleaved_rounds(patients: list[dict], names: list[str], rounds: int, graph) -> tuple[dict, dict]:
    """Every patient through every variant in each round, the variant order rotating from round to round.

    ``graph(patient, name)`` is the lazy map of one variant, computed on dask threads in this process.
    Returns ``timings[patient][name]`` (a ``{"wall_s", "cpu_s"}`` per round) and ``maps[(patient, name)]``
    (the last round's map).
    """
    import dask

    timings = {p["name"]: {v: [] for v in names} for p in patients}
    maps = {}
    for rd in range(rounds):
        order = names[rd % len(names):] + names[:rd % len(names)]
        for p in patients:
            for v in order:
                w0, c0 = time.perf_counter(), time.process_time()
                with dask.config.set(scheduler="threads"):
                    maps[(p["name"], v)] = graph(p, v).compute()
                timings[p["name"]][v].append({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0})
            print(f"round {rd + 1}: {p['name']} " + ", ".join(
                f"{v} {timings[p['name']][v][-1]['cpu_s']:.1f} CPU-s" for v in order), file=sys.stderr, flush=True)
    return timings, maps


def child_lungbox(args: dict) -> dict:
    import numpy as np

    from lungzarr.algorithms.crop import lung_box
    from lungzarr.model import engines
    from lungzarr.model.geometry import LUNG_BOX_MARGIN, fixed_box

    work = Path(tempfile.mkdtemp(prefix="lungzarr-lungbox-"))
    os.environ.setdefault(engines.CACHE_ENV, str(work / "cache"))
    try:
        patients = real_patients(work)
        engine = engines.prepare_engine(args["engine"])
        variants = {"fixed": {"crop": "fixed", "margin": None},
                    "lungs": {"crop": "lungs", "margin": LUNG_BOX_MARGIN}}
        for m in args.get("also_margin") or []:
            variants[f"lungs-margin{m}"] = {"crop": "lungs", "margin": int(m)}
        out = {"engine": engine, "engine_version": engines.get_version(engine), "rounds": args["rounds"],
               "scheduler": "dask threads in the process", "lung_box_margin": LUNG_BOX_MARGIN, "patients": {}}
        runner = engines.get_engine(engine)
        boxes = {}
        for p in patients:
            shape = p["hu"].shape
            boxes[p["name"]] = {"fixed": fixed_box(shape)}
            for v, spec in variants.items():
                if spec["crop"] == "lungs":
                    boxes[p["name"]][v] = lung_box(p["lungs"], margin=spec["margin"])
            # Compile the engine at every box shape before timing (a one-off per shape and worker).
            for box in boxes[p["name"]].values():
                h, w = box["y"][1] - box["y"][0], box["x"][1] - box["x"][0]
                runner.predict(np.zeros((1, 8, h, w, 1), np.float32))
        timings, maps = interleaved_rounds(patients, list(variants), args["rounds"],
                                           lambda p, v: _graph(p, variants[v], engine)[0])
        for p in patients:
            name = p["name"]
            entry = {"source": p["source"], "shape": list(p["hu"].shape),
                     "lung_voxels": int(p["lungs"].sum()), "variants": {}}
            fixed_med = {k: statistics.median(t[k] for t in timings[name]["fixed"]) for k in ("wall_s", "cpu_s")}
            for v in variants:
                box = boxes[name][v]
                (z0, z1), (y0, y1), (x0, x1) = box["z"], box["y"], box["x"]
                med = {k: statistics.median(t[k] for t in timings[name][v]) for k in ("wall_s", "cpu_s")}
                row = {"box": {k: box[k] for k in "zyx"}, "windows": z1 - z0, "box_rows_cols": [y1 - y0, x1 - x0],
                       "voxels_predicted": (z1 - z0) * (y1 - y0) * (x1 - x0),
                       "wall_s": [round(t["wall_s"], 2) for t in timings[name][v]],
                       "cpu_s": [round(t["cpu_s"], 2) for t in timings[name][v]],
                       "median_wall_s": round(med["wall_s"], 2), "median_cpu_s": round(med["cpu_s"], 2),
                       "speedup_wall": round(fixed_med["wall_s"] / med["wall_s"], 3),
                       "speedup_cpu": round(fixed_med["cpu_s"] / med["cpu_s"], 3)}
                if v != "fixed":
                    row["lung_box"] = {k: box[k] for k in ("lung_bbox", "margin", "components", "dropped_components",
                                                            "dropped_voxels", "crop")}
                    row["agreement"] = agreement(maps[(name, "fixed")], maps[(name, v)], p)
                entry["variants"][v] = row
            fixed_vox = entry["variants"]["fixed"]["voxels_predicted"]
            for row in entry["variants"].values():
                row["work_ratio_fixed_to_this"] = round(fixed_vox / row["voxels_predicted"], 3)
            out["patients"][name] = entry
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown_table(result: dict) -> str:
    lines = ["| patient | variant | box z / rows x cols | windows | voxel ratio | wall s (fixed -> this) | "
             "speed-up wall (CPU) | max abs dp in lungs | changed p >= 0.5 | nodule table at 0.5 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in result["lungbox"]["patients"].items():
        fixed = entry["variants"]["fixed"]
        for v, row in entry["variants"].items():
            if v == "fixed":
                continue
            a = row["agreement"]
            lines.append(
                f"| {name} | {v} | {row['box']['z']} / {row['box_rows_cols'][0]}x{row['box_rows_cols'][1]} "
                f"(fixed {fixed['box_rows_cols'][0]}x{fixed['box_rows_cols'][1]}) | {row['windows']} "
                f"(of {fixed['windows']}) | {row['work_ratio_fixed_to_this']} | {fixed['median_wall_s']} -> "
                f"{row['median_wall_s']} | {row['speedup_wall']} ({row['speedup_cpu']}) | "
                f"{a['max_abs_dp_in_lungs']:.2g} | {a['changed_p_ge_0.5']} of {a['fixed_p_ge_0.5']} | "
                f"{'identical' if a['nodule_table_identical'] else 'DIFFERENT'} ({a['nodules_0.5']} nodules) |")
    return "\n".join(lines)


def cmd_lungbox(a) -> dict:
    from benchmarks.harness import spawn, write_result
    from benchmarks.measure import machine

    result = {"machine": machine(), "what": __doc__.split("\n\n")[0]}
    result["lungbox"] = spawn("lungbox", {"rounds": a.rounds, "engine": a.engine, "also_margin": a.also_margin})
    result["machine_after"] = {"load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    print(markdown_table(result), flush=True)
    write_result(a.name or "lungbox", result)
    return result


def add_commands(sub):
    """``lungbox`` as a command of ``python -m benchmarks``."""
    p = sub.add_parser("lungbox", help="detect --crop fixed vs --crop lungs on the real patients, A/B interleaved")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over every patient and variant")
    p.add_argument("--engine", default="auto", help="the UNet engine (default auto: OpenVINO on CPU)")
    p.add_argument("--also-margin", type=int, nargs="*", default=[8],
                   help="extra lung-box margins to compare (smaller than the network's reach: not exact)")
    p.add_argument("--name", default=None, help="results/<name>.json (default lungbox)")
    p.set_defaults(run=cmd_lungbox)


#: The child process of this command (``python -m benchmarks _child lungbox``).
CHILDREN = {"lungbox": child_lungbox}
