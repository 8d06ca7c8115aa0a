"""lungzarr benchmarks: one entry point.

    python -m benchmarks stages  [--patients 2] [--small] [--rounds 1]   # per stage vs the baseline
    python -m benchmarks scaling [--sizes 1 4 16] [--small]              # time and memory vs cohort size, 1 vs 2 workers
    python -m benchmarks memory  [--sizes 2 8 32] [--small]              # peak RSS per worker vs cohort size
    python -m benchmarks profile [--stage segment] [--small]             # cProfile of one CPU stage
    python -m benchmarks project [--from results/stages.json]            # 1595 patients on 16 cores + H100
    python -m benchmarks overlap [--patients 4] [--small]                # streamed vs stage by stage, CPU + "GPU" worker
    python -m benchmarks engines [--rounds 3] [--stage-rounds 2]         # Keras-TF vs OpenVINO vs ONNX Runtime (real windows)
    python -m benchmarks lungbox [--rounds 2] [--also-margin 8]          # detect --crop fixed vs lungs (real patients)
    python -m benchmarks detect  [--rounds 2] [--variants ...]           # the detect stage: as it was vs every speed-up

Every command synthesises its DICOM cohort into a temporary folder (deleted
at the end), runs each variant in a fresh child process (so peaks are the
variant's own) and writes ``benchmarks/results/<name>.json`` with the machine's
description. The baseline (:mod:`benchmarks.baseline`, the straight serial
in-memory original) is measured in the same run and every figure is also
given as a ratio to it.

Each command lives with its benchmark (:data:`BENCHMARKS`): the module's
``add_commands(sub)`` adds its sub-parser(s), each with the function to run
(``run``), and its ``CHILDREN`` names the child processes
:func:`benchmarks.harness.spawn` starts (``python -m benchmarks _child KIND
JSON``). This module only dispatches.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks import (bench_detect, bench_engines, bench_lungbox, bench_overlap, bench_profile, bench_project,
                        bench_stages)
from benchmarks.harness import STAGES

#: The benchmarks with a command here, in the order of ``--help``.
BENCHMARKS = (bench_stages, bench_profile, bench_overlap, bench_engines, bench_lungbox, bench_detect, bench_project)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        kind, args = argv[1], json.loads(argv[2])
        children = {name: child for module in BENCHMARKS for name, child in module.CHILDREN.items()}
        print(json.dumps(children[kind](args), default=str))
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in BENCHMARKS:
        module.add_commands(sub)
    a = parser.parse_args(argv)
    if hasattr(a, "stages") and list(a.stages) != list(STAGES[:len(a.stages)]):
        parser.error(f"--stages must be a prefix of {STAGES!r}, got {a.stages!r}")
    t0 = time.perf_counter()
    a.run(a)
    print(f"{a.command}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
