"""The detect stage per patient: the Keras-TF stage as it was vs every exact speed-up, A/B interleaved.

    python -m benchmarks detect [--rounds 2] [--variants ...] [--name detect]

One child process (fresh), the fixtures' real patients as :mod:`benchmarks.bench_lungbox` prepares
them (LIDC-IDRI-0001 and RICORD through ingest and segment; the DSB2017 patient's 2 mm segmented
volume). A variant is ``ENGINE-FORM-CROP``: the engine (``keras`` = Keras on TensorFlow here,
``openvino``, ``onnxruntime``), the network's form (``literal``: the original's layers; ``folded``:
each upsampling folded into the convolution after it, docs/algorithms.md §5) and the crop
(``fixed``: the original's; ``lungs``: ``--crop lungs``). ``keras-literal-fixed`` is the reference:
the detect stage before the lung box and the fold, on the engine the goal is stated against. Every
engine, form and box shape is compiled before timing; then each round runs every patient through
every variant (the detect computation, :func:`lungzarr.model.infer.predict_nodule_prob` on dask
threads, the lung box a task of the same graph), the variant order rotating between rounds so that
a busy neighbour slows all alike. Reported per patient and variant: wall and process CPU seconds
(median), the speed-up over the reference, and the agreement with it (max |dp| in the lungs and
overall, p >= 0.5 voxels changed, the nodule table at p >= 0.5 identical or not).
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile

#: The reference variant: the detect stage as it was before the lung box and the folded upsampling.
REFERENCE = "keras-literal-fixed"
DEFAULT_VARIANTS = (REFERENCE, "keras-folded-fixed", "keras-folded-lungs", "openvino-literal-fixed",
                    "openvino-folded-lungs")


def parse_variant(name: str) -> dict:
    engine, form, crop = name.split("-")
    if form not in ("literal", "folded") or crop not in ("fixed", "lungs"):
        raise ValueError(f"variant must be ENGINE-(literal|folded)-(fixed|lungs), got {name!r}")
    return {"engine": engine, "fold_upsampling": form == "folded", "crop": crop}


def _graph(patient: dict, spec: dict):
    import dask
    import dask.array as da

    from lungzarr.algorithms.crop import lung_box
    from lungzarr.model.infer import predict_nodule_prob

    hu = da.from_array(patient["hu"], chunks=(64, -1, -1))
    box = None
    if spec["crop"] == "lungs":
        box = dask.delayed(lung_box, pure=True)(da.from_array(patient["lungs"], chunks=(64, -1, -1)))
    return predict_nodule_prob(hu, engine=spec["engine"], box=box, fold_upsampling=spec["fold_upsampling"])


def child_detect(args: dict) -> dict:
    import numpy as np

    from lungzarr.algorithms.crop import lung_box
    from lungzarr.model import engines
    from lungzarr.model.geometry import fixed_box

    from benchmarks.bench_lungbox import agreement, interleaved_rounds, real_patients

    work = tempfile.mkdtemp(prefix="lungzarr-detect-")
    os.environ.setdefault(engines.CACHE_ENV, os.path.join(work, "cache"))
    try:
        from pathlib import Path

        patients = real_patients(Path(work))
        variants = {v: parse_variant(v) for v in args["variants"]}
        if REFERENCE not in variants:
            raise ValueError(f"the variants must include the reference {REFERENCE!r}")
        out = {"reference": REFERENCE, "rounds": args["rounds"], "scheduler": "dask threads in the process",
               "engines": {}, "patients": {}}
        # Every engine and form built, and compiled at every box shape, before any timing.
        for spec in variants.values():
            name = engines.prepare_engine(spec["engine"], fold_upsampling=spec["fold_upsampling"])
            out["engines"][spec["engine"]] = {"resolved": name, "version": engines.get_version(name)}
            runner = engines.get_engine(name, fold_upsampling=spec["fold_upsampling"])
            for p in patients:
                box = fixed_box(p["hu"].shape) if spec["crop"] == "fixed" else lung_box(p["lungs"])
                h, w = box["y"][1] - box["y"][0], box["x"][1] - box["x"][0]
                runner.predict(np.zeros((1, 8, h, w, 1), np.float32))
        timings, maps = interleaved_rounds(patients, list(variants), args["rounds"],
                                           lambda p, v: _graph(p, variants[v]))
        for p in patients:
            name = p["name"]
            med = {v: {k: statistics.median(t[k] for t in timings[name][v]) for k in ("wall_s", "cpu_s")}
                   for v in variants}
            ref = med[REFERENCE]
            entry = {"source": p["source"], "shape": list(p["hu"].shape), "variants": {}}
            for v in variants:
                row = {"cpu_s": [round(t["cpu_s"], 2) for t in timings[name][v]],
                       "wall_s": [round(t["wall_s"], 2) for t in timings[name][v]],
                       "median_cpu_s": round(med[v]["cpu_s"], 2), "median_wall_s": round(med[v]["wall_s"], 2),
                       "speedup_cpu": round(ref["cpu_s"] / med[v]["cpu_s"], 3),
                       "speedup_wall": round(ref["wall_s"] / med[v]["wall_s"], 3)}
                if v != REFERENCE:
                    row["agreement"] = agreement(maps[(name, REFERENCE)], maps[(name, v)], p)
                entry["variants"][v] = row
            out["patients"][name] = entry
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown_table(result: dict) -> str:
    lines = [f"| patient | variant | CPU-s (median) | speed-up CPU (wall) over {REFERENCE} | max abs dp in lungs "
             "| changed p >= 0.5 | nodule table at 0.5 |", "|---|---|---|---|---|---|---|"]
    for name, entry in result["detect"]["patients"].items():
        for v, row in entry["variants"].items():
            a = row.get("agreement")
            if a is not None:
                differing = ", ".join(f"{k} {v:.1g}" if isinstance(v, float) else k
                                      for k, v in a.get("columns_differing", {}).items())
                table = ("identical" if a["nodule_table_identical"] else
                         f"same rows; differ: {differing}" if a.get("same_rows") else "DIFFERENT")
            same = "reference" if a is None else (
                f"{a['max_abs_dp_in_lungs']:.2g} | {a['changed_p_ge_0.5']} of {a['fixed_p_ge_0.5']} | "
                f"{table} ({a['nodules_0.5']})")
            lines.append(f"| {name} | {v} | {row['median_cpu_s']} | {row['speedup_cpu']} ({row['speedup_wall']}) "
                         f"| {same} |" if a is not None else
                         f"| {name} | {v} | {row['median_cpu_s']} | 1 (1) | reference | | |")
    return "\n".join(lines)


def cmd_detect(a) -> dict:
    from benchmarks.harness import spawn, write_result
    from benchmarks.measure import machine

    result = {"machine": machine(), "what": __doc__.split("\n\n")[0]}
    result["detect"] = spawn("detect", {"rounds": a.rounds, "variants": list(a.variants)})
    result["machine_after"] = {"load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    print(markdown_table(result), flush=True)
    write_result(a.name or "detect", result)
    return result


def add_commands(sub):
    """``detect`` as a command of ``python -m benchmarks``."""
    p = sub.add_parser("detect", help="the detect stage per real patient: Keras-TF as it was vs engine, form, crop")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over every patient and variant")
    p.add_argument("--variants", nargs="+", default=None,
                   help="ENGINE-(literal|folded)-(fixed|lungs); default: see benchmarks/bench_detect.py")
    p.add_argument("--name", default=None, help="results/<name>.json (default detect)")
    p.set_defaults(run=_run)


def _run(a):
    a.variants = a.variants or list(DEFAULT_VARIANTS)
    return cmd_detect(a)


#: The child process of this command (``python -m benchmarks _child detect``).
CHILDREN = {"detect": child_detect}
