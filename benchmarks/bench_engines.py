"""Keras-TF vs OpenVINO vs ONNX Runtime on the d8 UNet: the same batches of real windows, interleaved.

    python -m benchmarks engines [--rounds 3] [--stage-rounds 2] [--name engines]

Two children, each a fresh process:

``engines``
    Batches of 8 real windows: two of the DSB2017 patient (140 x 140, through
    its candidates) and one of the LIDC-IDRI-0001 slab (180 x 180). The
    graphs are exported into an empty cache (export seconds measured), every
    engine is compiled, then each round times every engine on every batch,
    the engine order rotating from round to round (A/B interleaved in one
    process, so a busy neighbour slows all engines alike). Each engine runs
    the network in both forms (``lungzarr.model.d8.build_d8``): ``NAME`` the
    default, upsampling folded into the next convolution, ``NAME-literal``
    the original's layers. Wall and process CPU seconds; ratios to
    ``keras-literal`` (Keras-TF on the literal network: the stage before the
    fold); agreement per batch with it (max |dp|, p >= 0.5 voxels that change).
    The first call at each crop shape is timed apart
    (the shape-specific compile of a dynamic-shape graph).
``engines_stage``
    The whole ``detect`` stage (:func:`lungzarr.pipeline.run`, dask threads in
    the process) on the LIDC-IDRI-0001 slab after ingest and segment,
    ``engine="keras"`` and ``engine="auto"`` alternately (``overwrite``), after
    warming both: CPU-s and seconds per patient, and the stored maps compared.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

#: DSB2017 window starts of the two 140 x 140 batches (8 windows each, through the flipped network's candidates).
DSB_BATCHES = (108, 136)
#: LIDC-IDRI-0001 slab: window starts of its one 180 x 180 batch (windows 0-7 of the slab's 12).
LIDC_BATCHES = (0,)
ENGINE_NAMES = ("keras", "openvino", "onnxruntime")
#: What the ratios and agreements are taken against: Keras-TF on the literal network (the stage before the fold).
REFERENCE = "keras-literal"


def _shared() -> Path:
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("LUNGZARR_SHARED", repo.parent / "shared")) / "fixtures"


def real_batches() -> dict:
    """``{name: windows (8, 8, H, W, 1) float32}`` from the DSB2017 patient and the LIDC slab."""
    import numpy as np

    from lungzarr.algorithms.resample import resample_to_2mm_numpy
    from lungzarr.io.dicom import load_hu
    from lungzarr.volume import normalize_hu

    fixtures = _shared()
    dsb = np.load(fixtures / "dsb2017" / "input" / "stage1_segmented_2x2x2"
                  / "0acbebb8d463b4b9ca88cf38431aac69.npz")["arr_0"]
    hu, grid = load_hu(fixtures / "lidc" / "LIDC-IDRI-0001")
    lidc = resample_to_2mm_numpy(hu, grid)[0]
    out = {}
    for label, volume, starts in (("dsb2017", dsb, DSB_BATCHES), ("lidc", lidc, LIDC_BATCHES)):
        _, h, w = volume.shape
        images = normalize_hu(volume[:, h % 4:, w % 4:])
        for s in starts:
            out[f"{label}_{images.shape[1]}x{images.shape[2]}_w{s}-{s + 7}"] = np.stack(
                [images[i:i + 8] for i in range(s, s + 8)])[..., np.newaxis].astype(np.float32)
    return out


#: How the roofline's float32 matrix product is measured.
SGEMM_NOTE = "numpy float32 matmul 2048 x 2048 x 2048, best of 3, process CPU-s (all threads)"


def sgemm_rate() -> float:
    """GFLOP per CPU-second of a dense float32 matrix product on these cores (numpy's BLAS), best of 3."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.random((2048, 2048), np.float32), rng.random((2048, 2048), np.float32)
    a @ b
    best = min(_timed(lambda: a @ b)[2] for _ in range(3))
    return 2 * 2048 ** 3 / best / 1e9


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w0, time.process_time() - c0


def child_engines(args: dict) -> dict:
    import numpy as np

    from lungzarr.model import engines
    from lungzarr.model.d8 import resolve_weights

    os.environ[engines.CACHE_ENV] = args["cache"]
    batches = real_batches()
    names = [n for n in ENGINE_NAMES if engines.engine_available(n)]
    out = {"cache": "fresh, temporary", "batch_windows": 8, "batches": {k: list(v.shape) for k, v in batches.items()},
           "engines": {n: {"version": engines.get_version(n)} for n in names}}
    # One-off costs: Keras build (TF import included), export of each graph, compile of each.
    _, out["engines"]["keras"]["build_s"], _ = _timed(lambda: engines.get_engine("keras"))
    for n in names:
        if n == "keras":
            continue
        graph, out["engines"][n]["export_s"], _ = _timed(lambda n=n: engines.exported_graph(n))
        out["engines"][n]["graph_mb"] = round(sum(f.stat().st_size for f in graph.parent.iterdir()) / 1e6, 2)
        engine = engines.get_engine(n)
        out["engines"][n]["compile_s"] = round(engine.compile_seconds, 3)
        # A second process with a warm cache: read + compile only.
        engines._ENGINES.pop((n, str(resolve_weights()), "fp32", True), None)
        _, load_s, _ = _timed(lambda n=n: engines.get_engine(n))
        out["engines"][n]["load_and_compile_warm_cache_s"] = round(load_s, 3)
    runners = {}
    for n in names:
        runners[f"{n}-literal"] = engines.get_engine(n, fold_upsampling=False)
        runners[n] = engines.get_engine(n)
    if "openvino" in names:
        # OpenVINO's CPU plugin runs bf16 by default on CPUs with AVX512-BF16/AMX (lungzarr asks for f32 at
        # fp32): the same graph at --precision bf16, for what that default would give.
        runners["openvino-bf16"] = engines.get_engine("openvino", precision="bf16")
        out["engines"]["openvino-bf16"] = {"version": engines.get_version("openvino"), "precision": "bf16"}
    for n in names:
        out["engines"][f"{n}-literal"] = {"version": engines.get_version(n), "fold_upsampling": False}
    names = list(runners)
    # The first call at each crop shape (a dynamic-shape graph is specialised then), then one more.
    first = {}
    for label, x in batches.items():
        shape = "x".join(map(str, x.shape[2:4]))
        for n, r in runners.items():
            if (n, shape) in first:
                continue
            _, w1, _ = _timed(lambda r=r, x=x: r.predict(x))
            _, w2, _ = _timed(lambda r=r, x=x: r.predict(x))
            first[(n, shape)] = {"first_call_s": round(w1, 3), "second_call_s": round(w2, 3),
                                 "first_call_overhead_s": round(w1 - w2, 3)}
    out["first_call_per_shape"] = {f"{n} {shape}": v for (n, shape), v in first.items()}
    out["first_call_note"] = ("first call at a crop shape minus the second: the shape-specific compile of a "
                              "dynamic-shape graph (Keras: tf.function retrace); noisy on a shared machine")
    rounds, probs = [], {}
    for rd in range(args["rounds"]):
        order = names[rd % len(names):] + names[:rd % len(names)]
        row = {"order": order, "wall_s": {n: 0.0 for n in names}, "cpu_s": {n: 0.0 for n in names},
               "sgemm_gflop_per_cpu_s": sgemm_rate()}
        for label, x in batches.items():
            for n in order:
                p, wall, cpu = _timed(lambda n=n, x=x: runners[n].predict(x))
                row["wall_s"][n] += wall
                row["cpu_s"][n] += cpu
                probs[(n, label)] = p
        rounds.append(row)
    out["rounds"] = rounds
    # The roofline: what a dense float32 matrix product reaches on these cores (numpy's BLAS), against the
    # multiply-adds each form of the network does on the same batches (lungzarr.model.d8.multiply_adds).
    from lungzarr.model.d8 import get_model, multiply_adds

    macs = {fold: sum(len(x) * multiply_adds(get_model(fold_upsampling=fold), *x.shape[2:4]) for x in batches.values())
            for fold in (False, True)}
    sgemm = statistics.median(r["sgemm_gflop_per_cpu_s"] for r in rounds)
    out["roofline"] = {"sgemm_gflop_per_cpu_s": round(sgemm, 1), "sgemm": SGEMM_NOTE,
                       "gflop_per_round": {"literal": round(2 * macs[False] / 1e9, 1),
                                           "folded": round(2 * macs[True] / 1e9, 1)}}
    table = {}
    for n in names:
        wall = statistics.median(r["wall_s"][n] for r in rounds)
        cpu = statistics.median(r["cpu_s"][n] for r in rounds)
        gflop = 2 * macs[not n.endswith("-literal")] / 1e9
        table[n] = {"wall_s_per_round": round(wall, 2), "cpu_s_per_round": round(cpu, 2),
                    "gflop_per_cpu_s": round(gflop / cpu, 1), "share_of_sgemm_rate": round(gflop / cpu / sgemm, 3)}
    for n in names:
        table[n]["ratio_wall_to_keras"] = round(table[n]["wall_s_per_round"] / table[REFERENCE]["wall_s_per_round"], 3)
        table[n]["ratio_cpu_to_keras"] = round(table[n]["cpu_s_per_round"] / table[REFERENCE]["cpu_s_per_round"], 3)
        per_batch = {}
        for label in batches:
            ref, got = probs[(REFERENCE, label)], probs[(n, label)]
            per_batch[label] = {"max_abs_dp": float(np.abs(got - ref).max()),
                                "keras_p_ge_0.5": int((ref >= 0.5).sum()),
                                "changed_p_ge_0.5": int(((got >= 0.5) != (ref >= 0.5)).sum())}
        table[n]["agreement"] = per_batch
        table[n]["max_abs_dp"] = max(v["max_abs_dp"] for v in per_batch.values())
        table[n]["changed_p_ge_0.5"] = sum(v["changed_p_ge_0.5"] for v in per_batch.values())
        table[n]["keras_p_ge_0.5"] = sum(v["keras_p_ge_0.5"] for v in per_batch.values())
    out["table"] = table
    return out


def child_engine_memory(args: dict) -> dict:
    """Peak RSS of a fresh process that predicts one batch with ``args["engine"]`` (warm graph cache)."""
    import resource
    import sys

    from lungzarr.model import engines

    os.environ[engines.CACHE_ENV] = args["cache"]
    x = next(iter(real_batches().values()))
    t0 = time.perf_counter()
    engines.get_engine(args["engine"]).predict(x)
    return {"engine": args["engine"], "first_batch_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "tensorflow_imported": "tensorflow" in sys.modules}


def child_engines_stage(args: dict) -> dict:
    import dask
    import numpy as np

    from lungzarr import pipeline
    from lungzarr.io.store import CohortStore
    from lungzarr.model import engines

    work = Path(tempfile.mkdtemp(prefix="lungzarr-engine-stage-"))
    os.environ[engines.CACHE_ENV] = str(work / "cache")
    src = _shared() / "lidc" / "LIDC-IDRI-0001"
    (work / "input").mkdir()
    (work / "input" / src.name).symlink_to(src)
    store = work / "lidc.zarr"
    out = {"patient": src.name, "scheduler": "dask threads in the process"}
    with dask.config.set(scheduler="threads"):
        pipeline.run(work / "input", store, stages=["ingest", "segment"])
        # Warm both engines first (Keras build, OpenVINO export and compile): per-patient figures only below.
        auto = engines.resolve_engine("auto")
        _, out["prepare_auto_cold_cache_s"], _ = _timed(lambda: engines.prepare_engine("auto"))
        _, out["warm_keras_s"], _ = _timed(lambda: engines.get_engine("keras"))
        _, out["warm_auto_s"], _ = _timed(lambda: engines.get_engine(auto))
        out["auto_is"] = auto
        ds = CohortStore(store, mode="r").open_patient(src.name)
        out["hu_2mm_shape"] = list(ds.hu_2mm.shape)
        runs = {"keras": [], "auto": []}
        maps = {}
        for rd in range(args["stage_rounds"]):
            for engine in (("keras", "auto") if rd % 2 == 0 else ("auto", "keras")):
                summary, wall, cpu = _timed(lambda e=engine: pipeline.run(None, store, stages=["detect"],
                                                                         engine=e, crop="fixed",
                                                                         overwrite=True)[0])
                assert summary.done == [src.name], summary.failed
                runs[engine].append({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                     "stage_s": round(summary.seconds, 2)})
                maps[engine] = CohortStore(store, mode="r").open_patient(src.name).nodule_prob.values
                record = CohortStore(store, mode="r").stages(src.name)["detect"]
                out.setdefault("records", {})[engine] = {k: record.get(k) for k in ("engine", "engine_version")}
    out["runs"] = runs
    med = {e: {k: statistics.median(r[k] for r in v) for k in ("wall_s", "cpu_s")} for e, v in runs.items()}
    out["median"] = med
    out["ratio_cpu_auto_to_keras"] = round(med["auto"]["cpu_s"] / med["keras"]["cpu_s"], 3)
    out["ratio_wall_auto_to_keras"] = round(med["auto"]["wall_s"] / med["keras"]["wall_s"], 3)
    k, a = maps["keras"], maps["auto"]
    out["agreement"] = {"max_abs_dp": float(np.abs(k - a).max()), "keras_p_ge_0.5": int((k >= 0.5).sum()),
                        "changed_p_ge_0.5": int(((k >= 0.5) != (a >= 0.5)).sum())}
    return out


def markdown_table(result: dict) -> str:
    t = result["engines"]["table"]
    lines = [f"| engine | version | wall s / round | ratio to {REFERENCE} (wall) | CPU-s / round | ratio (CPU) | "
             "GFLOP per CPU-s (share of sgemm) | max abs dp | changed p >= 0.5 voxels (of the reference's) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, r in t.items():
        lines.append(f"| {n} | {result['engines']['engines'][n]['version']} | {r['wall_s_per_round']} | "
                     f"{r['ratio_wall_to_keras']} | {r['cpu_s_per_round']} | {r['ratio_cpu_to_keras']} | "
                     f"{r['gflop_per_cpu_s']} ({r['share_of_sgemm_rate']:.0%}) | "
                     f"{r['max_abs_dp']:.2g} | {r['changed_p_ge_0.5']} of {r['keras_p_ge_0.5']} |")
    roof = result["engines"]["roofline"]
    lines.append(f"\nsgemm on these cores: {roof['sgemm_gflop_per_cpu_s']} GFLOP per CPU-s ({roof['sgemm']}); "
                 f"GFLOP per round: {roof['gflop_per_round']}")
    return "\n".join(lines)


def cmd_engines(a) -> dict:
    from benchmarks.harness import spawn, write_result
    from benchmarks.measure import machine

    result = {"machine": machine(), "what": __doc__.split("\n\n")[0]}
    cache = tempfile.mkdtemp(prefix="lungzarr-engine-cache-")
    try:
        result["engines"] = spawn("engines", {"rounds": a.rounds, "cache": cache})
        print(markdown_table(result), flush=True)
        result["memory"] = {n: spawn("engine_memory", {"engine": n, "cache": cache})
                            for n in result["engines"]["engines"] if n in ENGINE_NAMES}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if a.stage_rounds:
        result["detect_stage"] = spawn("engines_stage", {"stage_rounds": a.stage_rounds})
    result["machine_after"] = {"load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    write_result(a.name or "engines", result)
    return result


def add_commands(sub):
    """``engines`` as a command of ``python -m benchmarks``."""
    p = sub.add_parser("engines", help="Keras-TF vs OpenVINO vs ONNX Runtime on real windows, and the detect stage")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every batch and engine")
    p.add_argument("--stage-rounds", type=int, default=2, help="detect-stage runs per engine (0: none)")
    p.add_argument("--name", default=None, help="results/<name>.json (default engines)")
    p.set_defaults(run=cmd_engines)


#: The child processes of this command (``python -m benchmarks _child KIND``), by kind.
CHILDREN = {"engines": child_engines, "engines_stage": child_engines_stage, "engine_memory": child_engine_memory}
