"""How many tasks each stage hands the dask scheduler for one patient, and where they come from.

    python -m benchmarks.bench_scheduler_tasks [--before REV] [--whole] [--out scheduler_tasks]

The scheduler's CPU grows with the tasks (and dependencies) it handles
(issue 29: 0.15-0.27 CPU-s per tiny patient, 1.6 per whole scan, one thread
for a whole cluster). For one patient, each stage is run as ``lungzarr run``
runs it (the stage's own ``prepare``, the same graph
:func:`lungzarr.pipeline.remote.stage_task` submits, with
``optimize_graph=False`` as there), here on dask's local threads; before
each computation the graph is counted: the tasks the scheduler runs (what
the result key needs; ``graph_tasks``: all the graph holds), their
dependencies, and the tasks per key prefix (``dask.utils.key_split``), so a
count names the code it comes from. Not counted: the one ``stage_task`` per
patient and stage, and ingest's one prefetch task.

Patients: a tiny phantom (``tests/dicom_phantoms.make_patient``, 48 slices of
128², as ``benchmarks/control_plane.py``) and, with ``--whole``, the whole
LIDC-IDRI-0001 CT (133 slices of 512²; ``crop`` ``lungs``, the default).
``--before REV`` counts the lungzarr of ``REV`` too (``git archive``, in a
child process), side by side. Writes ``benchmarks/results/<OUT>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("LUNGZARR_SHARED", REPO.parent / "shared"))
WHOLE = SHARED / "fixtures" / "lidc-whole" / "LIDC-IDRI-0001"
STAGES = ("ingest", "segment", "lungs3d", "detect", "nodules", "features")


def graph_submitted(delayed) -> tuple[dict, dict]:
    """The graph ``client.compute(delayed, optimize_graph=False)`` sends (the same steps), and the part of it
    the scheduler runs: what the wanted keys need (xarray's to_zarr graph may hold renamed copies no key
    needs; the scheduler materialises and orders them, never runs them)."""
    from dask._expr import FinalizeCompute
    from dask.base import collections_to_expr
    from dask.core import flatten, get_dependencies

    expr = FinalizeCompute(collections_to_expr([delayed], False)).optimize()
    dsk = dict(expr.__dask_graph__())
    run, work = {}, list(flatten(expr.__dask_keys__()))
    while work:
        key = work.pop()
        if key not in run and key in dsk:
            run[key] = dsk[key]
            work.extend(get_dependencies(dsk, key))
    return dsk, run


def _count(delayed) -> dict:
    """Tasks run and their dependencies (in all and per key prefix), and the tasks of the graph as sent."""
    from dask.core import get_dependencies
    from dask.utils import key_split

    sent, dsk = graph_submitted(delayed)
    prefixes, deps = Counter(), 0
    for key in dsk:
        prefixes[key_split(key)] += 1
        deps += len(get_dependencies(dsk, key))
    return {"tasks": len(dsk), "dependencies": deps, "graph_tasks": len(sent),
            "by_prefix": dict(prefixes.most_common())}


def count_patient(folder: Path, workdir: Path) -> dict:
    """Run every stage of the patient in ``folder`` into a new store under ``workdir``; each stage's counts."""
    import lungzarr.pipeline as pipeline
    from lungzarr.io.store import PendingStage

    counts: dict = {}
    original = PendingStage.compute

    def counted(self, **kwargs):
        counts[self.stage] = {**_count(self.delayed), "chunks": getattr(self, "chunks", None)}
        return original(self, **kwargs)

    PendingStage.compute = counted
    try:
        summaries = pipeline.run(folder.parent, workdir / "store.zarr", patients=[folder.name],
                                 stages=list(STAGES))
    finally:
        PendingStage.compute = original
    failed = {s.stage: s.failed for s in summaries if s.failed or not s.done}
    if failed:
        raise RuntimeError(f"{folder}: stages not done: {failed!r}")
    return counts


def _child(args) -> None:
    import tests.dicom_phantoms as phantoms

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = tmp / "input" / "tiny-0"
        phantoms.make_patient(tiny, n_slices=args.slices, size=args.size)
        out["tiny"] = count_patient(tiny, tmp / "tiny")
        if args.whole:
            out["whole_lidc"] = count_patient(WHOLE, tmp / "whole")
    print(json.dumps(out))


def _tree(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _run_child(tree: Path, args) -> dict:
    # This file, with the tree's lungzarr (and tests/) first on the path: an older tree lacks this module.
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--slices", str(args.slices),
           "--size", str(args.size)] + (["--whole"] if args.whole else [])
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{tree}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="git revision counted beside this tree")
    parser.add_argument("--whole", action="store_true", help="the whole LIDC-IDRI-0001 CT too")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default="scheduler_tasks")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_whole_scan import cpu_isa

    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            variants["before"] = _run_child(_tree(args.before, Path(tmp) / "before"), args)
        variants["after"] = _run_child(REPO, args)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    result = {
        "what": "tasks run (keys the result needs) and their dependencies per stage for one patient, of the "
                "graph client.compute sends (optimize_graph=False, as lungzarr.pipeline.remote.stage_task; "
                "graph_tasks: all it holds); not counted: one stage_task per stage, ingest's prefetch task",
        "patients": {"tiny": f"tests/dicom_phantoms.make_patient, {args.slices} slices of {args.size}^2",
                     **({"whole_lidc": "LIDC-IDRI-0001, 133 slices of 512^2, crop lungs"} if args.whole else {})},
        "before": args.before, "after": head.strip(),
        "machine": {**cpu_isa(), "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
                    "python": platform.python_version()},
        "variants": variants,
    }
    for name in ("tiny", "whole_lidc"):
        if "before" in variants and name in variants["after"]:
            result.setdefault("totals", {})[name] = {
                v: sum(s["tasks"] for s in variants[v][name].values()) for v in variants}
    path = HERE / "results" / f"{args.out}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result.get("totals", variants), indent=1))


if __name__ == "__main__":
    main()
