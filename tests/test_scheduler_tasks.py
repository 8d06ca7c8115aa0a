"""How many tasks a patient's stages hand the dask scheduler: few per z-chunk of a task, none per stored chunk.

The scheduler is one thread for the whole cluster and handles every task of
every patient (issue 29; at ~0.3 ms a task its per-patient cost is mostly per
stage, see ``benchmarks/README.md``, "The scheduler's tasks per patient"). The counts are of the graph ``client.compute(optimize_graph=False)``
sends (:mod:`lungzarr.pipeline.remote`), for a fixed phantom patient; each bound
is derived from its number of task z-chunks (``task_slices``), so a read per
stored chunk, a rechunk merging them, or a task duplicated by the store write
exceeds it (``benchmarks/bench_scheduler_tasks.py`` counts them per stage and
key prefix: ``benchmarks/results/scheduler_tasks.json``).
"""
from __future__ import annotations

import math
import sys

import dask
import pytest

from conftest import REPO
from dicom_phantoms import make_patient

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_scheduler_tasks import graph_submitted  # noqa: E402  (one count of the submitted graph)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Each stage's submitted graph for one phantom patient (64 slices of 128²: 79 slices at 2 mm, two tasks
    of 64 slices, five stored chunks of 16), the stages run on dask's threads."""
    from lungzarr.io.store import CohortStore, PendingStage
    from lungzarr.pipeline import run

    work = tmp_path_factory.mktemp("tasks")
    make_patient(work / "input" / "T-1", n_slices=64, size=128)
    seen = {}
    original = PendingStage.compute

    def counted(self, **kwargs):
        seen[self.stage] = graph_submitted(self.delayed)[1]  # what the scheduler runs
        return original(self, **kwargs)

    PendingStage.compute = counted
    try:
        with dask.config.set(scheduler="threads"):
            summaries = run(work / "input", work / "s.zarr", stages=["ingest", "segment", "lungs3d", "detect"],
                            engine="keras", chunk_slices=16)
    finally:
        PendingStage.compute = original
    assert all(s.done == ["T-1"] for s in summaries), [s.failed for s in summaries]
    z2 = CohortStore(work / "s.zarr", mode="r").patient_attrs("T-1")["grid_2mm"]["shape"][0]
    return seen, math.ceil(z2 / 64), math.ceil(z2 / 16)


def test_the_phantom_has_more_stored_chunks_than_tasks(graphs):
    _, tasks, stored = graphs
    assert (tasks, stored) == (2, 5)  # else the bounds below would not tell a read per stored chunk apart


def test_segment_reads_hu_2mm_once_per_task(graphs):
    seen, tasks, _ = graphs
    # Per task z-chunk: its read, the segmentation, and per written array (lungs, segmented) the chunk's
    # store task and dask's store-map after it (6); once: the task holding the zarr array, each array's
    # finalize, xarray's finalize_store and the crop box task after the write (5). Reading the stored
    # chunks (a task each, a rechunk merging them per task) was 5 more here: 22.
    assert len(seen["segment"]) <= 6 * tasks + 5, sorted(map(str, seen["segment"]))


def test_lungs3d_reads_hu_2mm_once_per_task(graphs):
    seen, tasks, _ = graphs
    # Per task z-chunk: read, air mask, closing-and-write, store-map (4); once: the zarr array's task, the
    # two merges into the whole volume, the whole-volume steps, the finalizes and the measures task (7).
    # Reading the stored chunks was 5 more here: 20.
    assert len(seen["lungs3d"]) <= 4 * tasks + 7, sorted(map(str, seen["lungs3d"]))


def test_detect_computes_the_lung_box_outside_its_graph(graphs):
    seen, tasks, _ = graphs
    keys = [str(k) for k in seen["detect"]]
    # The box is computed where the graph is built: no task reads the lung mask or computes the box (the
    # store write's graph held a renamed copy of the box task beside the after-write's: two box tasks).
    assert not [k for k in keys if "lungs" in k or "lung_box" in k], keys
    # Per task z-chunk: read-and-crop, normalise, cut-predict-place-write, store-map (4) and the halo's two
    # slices from each neighbour (2 per border); once: the zarr array's task and the finalizes (3).
    # The stored chunks' reads and the lung box's tasks were 20 more here: 33.
    assert len(keys) <= 4 * tasks + 2 * (tasks - 1) + 3, keys
