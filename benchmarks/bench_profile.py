"""cProfile of one CPU stage of the pipeline on one synthetic patient (dask's synchronous scheduler).

    python -m benchmarks profile [--stage segment] [--small]
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.harness import STAGES, add_cohort_options, make_cohort, spawn, write_result


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
                pipeline.run(None, store, stages=list(before[1:]), crop="fixed", **opts)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        if stage == "ingest":
            summary = pipeline.ingest(args["input"], store, **opts)
        else:
            # The fixed crop, as in the recorded profiles (then the library's default; now the lung box).
            summary = pipeline.run(None, store, stages=[stage], crop="fixed", **opts)[0]
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


def add_commands(sub):
    """``profile`` as a command of ``python -m benchmarks``."""
    p = sub.add_parser("profile", help="cProfile one stage on one patient")
    add_cohort_options(p)
    p.add_argument("--stage", default="segment", choices=STAGES)
    p.set_defaults(run=cmd_profile)


#: The child process of this command (``python -m benchmarks _child profile``).
CHILDREN = {"profile": child_profile}
