"""Cohort runs: resumable after SIGKILL, a lock against concurrent runs, an external scheduler."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lungzarr.demo import write_demo_cohort
from lungzarr.io.store import CohortStore

from conftest import assert_same_patients, free_port, stop_processes

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_input(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "input"
    write_demo_cohort(folder)
    return folder


def _cli(*args, **kwargs):
    return subprocess.run([PY, "-m", "lungzarr.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kwargs)


def _assert_same_store(a, b):
    """Same patients, arrays, stage markers and attrs (the input folder they came from may differ)."""
    assert_same_patients(a, b, ignore_attrs=("lungzarr:stages", "source_folder"))


def test_ingest_killed_with_sigkill_resumes_to_identical_store(demo_input, tmp_path):
    reference = tmp_path / "reference.zarr"
    r = _cli("ingest", demo_input, reference, "--scheduler", "threads", "--batch-size", "1")
    assert r.returncode == 0, r.stderr

    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen([PY, "-m", "lungzarr.cli", "ingest", str(demo_input), str(store),
                             "--scheduler", "threads", "--batch-size", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it once the first patient is complete, in the middle of the others.
    deadline = time.time() + 120
    while time.time() < deadline:
        if (store / "zarr.json").exists() and any(
                CohortStore(store, mode="r").is_complete(p, "ingest") for p in CohortStore(store, mode="r").patients()):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = [p for p in CohortStore(store, mode="r").patients()
                   if CohortStore(store, mode="r").is_complete(p, "ingest")]
    assert 1 <= len(done_before) < 3, "the kill should land mid-run"

    r = _cli("ingest", demo_input, store, "--scheduler", "threads", "--batch-size", "1")
    assert r.returncode == 0, r.stderr
    _assert_same_store(reference, store)
    # No patient lost or duplicated, nothing left in staging.
    assert CohortStore(store, mode="r").patients() == ["DEMO-001", "DEMO-002", "DEMO-003"]
    assert not [p for p in (store / "staging").iterdir() if p.is_dir()]


def test_second_run_on_a_locked_store_is_refused(demo_input, tmp_path):
    store = tmp_path / "locked.zarr"
    CohortStore(store)
    holder = subprocess.Popen([PY, "-c", (
        "import sys, time\n"
        "from lungzarr.io.store import CohortStore\n"
        f"with CohortStore({str(store)!r}).lock():\n"
        "    print('locked', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = _cli("ingest", demo_input, store, "--scheduler", "threads")
        assert r.returncode == 2
        assert "is being written by pid" in r.stderr and "wait for that run" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops the lock of a killed holder: the next run goes through.
    r = _cli("ingest", demo_input, store, "--scheduler", "threads", "--patients", "DEMO-003")
    assert r.returncode == 0, r.stderr


def test_ingest_on_a_separately_started_scheduler_and_worker(demo_input, tmp_path):
    dask_bin = shutil.which("dask") or str(Path(PY).with_name("dask"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # This tree's lungzarr on the scheduler (it unpickles the graphs) and the worker, not the installed one.
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False", "PYTHONPATH": str(REPO)}
    scheduler = subprocess.Popen([dask_bin, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--dashboard-address", ":0"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=env)
    worker = subprocess.Popen([dask_bin, "worker", address, "--nworkers", "1", "--nthreads", "1",
                               "--host", "127.0.0.1", "--dashboard-address", ":0"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    try:
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
            worker_pids = set(client.run(os.getpid).values())
        store = tmp_path / "remote.zarr"
        r = _cli("ingest", demo_input, store, "--scheduler", address, "--patients", "DEMO-001")
        assert r.returncode == 0, r.stderr
        assert f"dask scheduler {address}: 1 worker(s)" in r.stderr.replace("\n", " ")
        assert CohortStore(store, mode="r").is_complete("DEMO-001", "ingest")
        assert worker_pids and os.getpid() not in worker_pids
    finally:
        stop_processes(worker, scheduler)


#: The small patients: 16 slices of 64 x 64 pixels, 20 x 64 x 64 at 2 mm, so 12 windows of 64 x 64 through the
#: UNet (a quarter of the work of 24 x 96 x 96) with a 12 mm nodule it finds (p >= 0.5) in the right lung.
SMALL_SHAPE, SMALL_SPACING = (16, 64, 64), (2.5, 2.0, 2.0)


def _write_small_patient(folder, pid, seed, nodules=()):
    from lungzarr.algorithms.phantom import chest_phantom
    from lungzarr.io.dicom import write_series

    hu, origin = chest_phantom(shape=SMALL_SHAPE, spacing=SMALL_SPACING, seed=seed, nodules=nodules)
    write_series(hu, folder / pid, spacing=SMALL_SPACING, origin=origin, patient_id=pid)


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    """Two small phantom patients (fast through the UNet) as DICOM."""
    from lungzarr.algorithms.phantom import PhantomNodule

    folder = tmp_path_factory.mktemp("small") / "input"
    for pid, seed in (("SMALL-1", 1), ("SMALL-2", 2)):
        _write_small_patient(folder, pid, seed, nodules=(PhantomNodule(-20.0, -5.0, -25.0, 12.0),))
    return folder


def _run_cli(input_dir, store):
    return [PY, "-m", "lungzarr.cli", "run", str(input_dir), str(store), "--scheduler", "threads",
            "--batch-size", "1"]


def _assert_same_tables(a, b):
    import lungzarr

    for read in (lungzarr.read_nodules, lungzarr.read_patients):
        ta, tb = read(a), read(b)
        assert list(ta.columns) == list(tb.columns)
        assert ta.equals(tb), read.__name__


@pytest.fixture(scope="module")
def small_reference(small_input, tmp_path_factory):
    reference = tmp_path_factory.mktemp("reference") / "reference.zarr"
    r = subprocess.run(_run_cli(small_input, reference), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return reference


@pytest.mark.parametrize("kill_when", [
    # The run is killed just after one patient's stage is committed. In the patient-major order of a run
    # with --batch-size 1 (see test_patients_stream_through_the_stages_without_a_cluster) "SMALL-2 ingested"
    # is the event right after "SMALL-1 segmented": the default run keeps the later point, the slow run both.
    pytest.param("SMALL-1 segmented", marks=pytest.mark.slow),
    "SMALL-2 ingested",
])
def test_full_run_killed_with_sigkill_resumes_to_identical_store(small_input, small_reference, tmp_path,
                                                                 kill_when):
    reference = small_reference

    patient, event = kill_when.split()
    stage = {"segmented": "segment", "ingested": "ingest"}[event]
    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen(_run_cli(small_input, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if CohortStore(store, mode="r").is_complete(patient, stage):
                break
        except Exception:
            pass  # the store is being created
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not CohortStore(store, mode="r").is_complete("SMALL-2", "features")

    r = subprocess.run(_run_cli(small_input, store), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_store(reference, store)
    _assert_same_tables(reference, store)
    assert CohortStore(store, mode="r").patients() == ["SMALL-1", "SMALL-2"]


def _detect_task_kind(key) -> str | None:
    """What a task of the detect stage does, from its key (None: a task of another stage)."""
    name = key[0] if isinstance(key, tuple) else str(key)
    if name.startswith("predict-nodule-prob-"):
        return "predict"
    if name.startswith(("open-hu_2mm", "original-open-hu_2mm", "rechunk", "getitem", "normalize_hu", "overlap",
                        "cut-windows-",
                        "place-nodule-prob-", "from-value", "concatenate", "store-map", "_finalize_store",
                        "finalize-", "chunk-computed-",
                        # the task that builds the patient's graph on a worker, the run's tables at its end
                        "lungzarr-detect-", "lungzarr-finish-")):
        return "cpu"
    return None


@pytest.mark.parametrize("crop", ["fixed", "lungs"])
def test_detect_stage_runs_only_the_network_on_gpu_workers(small_input, tmp_path, cpu_gpu_cluster, crop):
    """Through the store write (to_zarr flattens the graph), the predict tasks run on the GPU worker and
    every other task of the stage (read, normalise, cut, place, box, write) on the CPU-only worker."""
    import distributed

    from lungzarr.io.store import CohortStore
    from lungzarr.pipeline import ingest, run

    store = tmp_path / "gpu.zarr"
    ingest(small_input, store, patients=["SMALL-1"])
    run(None, store, stages=["segment", "lungs3d"])
    reference = tmp_path / "cpu.zarr"
    shutil.copytree(store, reference)
    run(None, reference, stages=["detect"], chunk_slices=8, crop=crop, engine="keras")
    client, names = cpu_gpu_cluster
    with distributed.get_task_stream(client) as stream:
        summaries = run(None, store, stages=["detect"], client=client, gpu=True, chunk_slices=8, crop=crop)
    assert summaries[0].done == ["SMALL-1"], summaries[0].failed
    on = {}
    for task in stream.data:
        kind = _detect_task_kind(task["key"])
        assert kind is not None, task["key"]  # every task of the stage is one of the known kinds
        on.setdefault(kind, []).append(names[task["worker"]])
    assert on["predict"] and set(on["predict"]) == {"gpu"}, on
    assert set(on["cpu"]) == {"cpu"}, on
    # The same probabilities as a run without a cluster.
    got = CohortStore(store, mode="r").open_patient("SMALL-1")["nodule_prob"].values
    want = CohortStore(reference, mode="r").open_patient("SMALL-1")["nodule_prob"].values
    assert (want >= 0.5).sum() > 0
    np.testing.assert_array_equal(got, want)


def test_detect_stage_completes_on_a_cluster_of_one_gpu_worker(small_input, tmp_path):
    """No CPU-only worker: the GPU worker runs the whole stage (the CPU tasks are not restricted)."""
    import logging

    import distributed

    from lungzarr.pipeline import ingest, run

    store = tmp_path / "gpu.zarr"
    ingest(small_input, store, patients=["SMALL-1"])
    run(None, store, stages=["segment"])
    spec = {"gpu": {"cls": distributed.Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with distributed.SpecCluster(workers=spec, scheduler={"cls": distributed.Scheduler,
                                                          "options": {"dashboard_address": None}}) as cluster, \
            distributed.Client(cluster) as client:
        with distributed.get_task_stream(client) as stream:
            summaries = run(None, store, stages=["detect"], client=client, gpu=True, chunk_slices=8)
    assert summaries[0].done == ["SMALL-1"], summaries[0].failed
    assert any(_detect_task_kind(t["key"]) == "predict" for t in stream.data)


@pytest.fixture(scope="module")
def three_small_patients(small_input, tmp_path_factory):
    """small_input plus a third small patient."""
    folder = tmp_path_factory.mktemp("three") / "input"
    shutil.copytree(small_input, folder)
    _write_small_patient(folder, "SMALL-3", 3)
    return folder


def _event_log():
    events = []

    def progress(event):
        if event.event != "begin":
            events.append((event.stage, event.event, event.patient))
    return events, progress


def test_patients_stream_through_the_stages_without_a_cluster(three_small_patients, tmp_path):
    """Each patient moves on as soon as its stage is committed: not every ingest before any segment."""
    import dask

    from lungzarr.pipeline import STAGE_NAMES, run

    events, progress = _event_log()
    with dask.config.set(scheduler="threads"):
        summaries = run(three_small_patients, tmp_path / "s.zarr", batch_size=1, progress=progress)
    assert [s.done for s in summaries] == [["SMALL-1", "SMALL-2", "SMALL-3"]] * len(STAGE_NAMES), \
        [s.failed for s in summaries]
    done = [(stage, patient) for stage, event, patient in events if event == "done"]
    # Later stages first, one patient per stage in flight: a patient-major order.
    assert done[:10] == [("ingest", "SMALL-1"), ("segment", "SMALL-1"), ("ingest", "SMALL-2"),
                         ("lungs3d", "SMALL-1"), ("segment", "SMALL-2"), ("ingest", "SMALL-3"),
                         ("detect", "SMALL-1"), ("lungs3d", "SMALL-2"), ("segment", "SMALL-3"),
                         ("nodules", "SMALL-1")], done


def test_stages_overlap_on_a_cluster_and_cpu_stages_stay_off_the_gpu_worker(three_small_patients, tmp_path,
                                                                           cpu_gpu_cluster):
    import distributed

    from lungzarr.pipeline import STAGE_NAMES, run

    client, names = cpu_gpu_cluster
    events, progress = _event_log()
    with distributed.get_task_stream(client) as stream:
        summaries = run(three_small_patients, tmp_path / "s.zarr", batch_size=1, client=client, gpu=True,
                        progress=progress)
    assert [s.done for s in summaries] == [["SMALL-1", "SMALL-2", "SMALL-3"]] * len(STAGE_NAMES), \
        [s.failed for s in summaries]
    done = [(stage, patient) for stage, event, patient in events if event == "done"]
    first_segment = min(i for i, (stage, _) in enumerate(done) if stage == "segment")
    last_ingest = max(i for i, (stage, _) in enumerate(done) if stage == "ingest")
    assert first_segment < last_ingest, done  # a stage-by-stage run would ingest everyone first
    # Every ingest/segment/nodules/features task ran on the CPU worker; every predict on the GPU worker.
    on = {}
    for task in stream.data:
        key = str(task["key"])
        kind = "predict" if key.startswith("predict-nodule-prob-") else "cpu" if any(
            tag in key for tag in ("decode-dicom", "zoom", "segment-lungs", "_nodule_task", "_features_task",
                                   "after_write", "air_in_body", "_whole_volume_steps", "close_lungs",
                                   "cut-windows", "place-nodule-prob", "normalize_hu",
                                   "_measures_task", "chunk-computed")) else None
        if kind:
            on.setdefault(kind, set()).add(names[task["worker"]])
    assert on == {"predict": {"gpu"}, "cpu": {"cpu"}}, on


def test_tasks_are_whole_multiples_of_the_store_chunks(small_input, tmp_path):
    """Stages compute in tasks of >= 64 slices but the store keeps chunk_slices per chunk."""
    import dask

    from lungzarr.pipeline import ingest, run, task_slices

    assert [task_slices(c) for c in (1, 4, 16, 24, 64, 100)] == [64, 64, 64, 72, 64, 100]
    with pytest.raises(ValueError, match="chunk_slices must be >= 1"):
        task_slices(0)
    store = tmp_path / "chunks.zarr"
    with dask.config.set(scheduler="threads"):
        ingest(small_input, store, chunk_slices=8, patients=["SMALL-1"])
        run(None, store, stages=["segment"], chunk_slices=8)
    ds = CohortStore(store, mode="r").open_patient("SMALL-1")
    for name in ("hu", "hu_2mm", "lungs", "segmented"):
        assert ds[name].encoding["chunks"][0] == 8, name
        assert ds[name].data.chunks[0][0] == 8, name  # read back in stored chunks
