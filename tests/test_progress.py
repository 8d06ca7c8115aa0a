"""Progress that moves: every z-chunk a stage computes is reported before its patient ends, and the per-stage
time is the tasks' time on the workers (queueing excluded), with and without a cluster."""
from __future__ import annotations

import threading

import dask
import pytest

from lungzarr.pipeline import run
from lungzarr.pipeline.progress import ProgressBoard, TaskMeter
from lungzarr.pipeline.runner import ProgressEvent

from dicom_phantoms import make_patient

#: 70 slices of 2.5 mm (48 x 48 of 1.5 mm, 36 x 36 at 2 mm): two ingest tasks of hu (64 + 6 slices), two of
#: hu_2mm (88 slices at 2 mm).
SLICES = 70


@pytest.fixture(scope="module")
def two_patients(tmp_path_factory):
    folder = tmp_path_factory.mktemp("progress") / "input"
    for k, pid in enumerate(("P1", "P2")):
        make_patient(folder / pid, n_slices=SLICES, size=48, spacing=(2.5, 1.5, 1.5), seed=k)
    return folder


def _record(events):
    def progress(event):
        if event.event != "begin":
            events.append(event)
    return progress


def _chunks_before_the_end(events, stage, patient):
    """The patient's chunk counts in order, checked against its started/done events."""
    mine = [e for e in events if (e.stage, e.patient) == (stage, patient)]
    kinds = [e.event for e in mine]
    assert kinds[0] == "started" and kinds[-1] == "done", kinds
    total = mine[0].total
    chunks = [e for e in mine if e.event == "chunk"]
    # Every chunk once, one more each time, all before the patient's stage is done.
    assert total and [e.chunks for e in chunks] == list(range(1, total + 1)), (total, [e.chunks for e in chunks])
    assert {e.total for e in chunks} == {total} and kinds.index("done") == len(kinds) - 1
    return mine[-1]


def test_every_chunk_is_reported_before_the_patient_ends_without_a_cluster(two_patients, tmp_path):
    events = []
    with dask.config.set(scheduler="threads"):
        (ingest, segment) = run(two_patients, tmp_path / "s.zarr", stages=["ingest", "segment"], batch_size=1,
                                progress=_record(events))
    assert ingest.done == ["P1", "P2"] and segment.done == ["P1", "P2"], (ingest.failed, segment.failed)
    for stage in ("ingest", "segment"):
        for patient in ("P1", "P2"):
            done = _chunks_before_the_end(events, stage, patient)
            # Computed here, one at a time: its computation is its start to its end, taken as it ends.
            assert 0 < done.seconds <= done.wall_seconds
    ingest_started = next(e for e in events if e.event == "started" and e.stage == "ingest")
    assert ingest_started.total == 4  # hu and hu_2mm, two z-chunks each
    assert 0 < ingest.work_seconds <= ingest.seconds and 0 < segment.work_seconds <= segment.seconds


def test_chunks_and_worker_time_on_a_cluster(two_patients, tmp_path, cpu_gpu_cluster):
    """With GPU workers the CPU stages run on the one single-threaded CPU worker: their tasks' time there,
    added up, cannot exceed the stage's wall span, though two patients are in flight (submission to result
    counted the second one's wait)."""
    client, _ = cpu_gpu_cluster
    events = []
    (ingest, segment) = run(two_patients, tmp_path / "s.zarr", stages=["ingest", "segment"], batch_size=2,
                            client=client, gpu=True, progress=_record(events))
    assert sorted(ingest.done) == sorted(segment.done) == ["P1", "P2"], (ingest.failed, segment.failed)
    for stage in ("ingest", "segment"):
        for patient in ("P1", "P2"):
            _chunks_before_the_end(events, stage, patient)
    for patient in ("P1", "P2"):
        done = next(e for e in events if (e.stage, e.event, e.patient) == ("segment", "done", patient))
        assert 0 < done.seconds <= done.wall_seconds
    assert 0 < segment.work_seconds <= segment.seconds
    # Submission to result, added up over two patients in flight on one thread, exceeds the wall span.
    walls = sum(e.wall_seconds for e in events if (e.stage, e.event) == ("segment", "done"))
    assert segment.work_seconds < walls
    assert ingest.work_seconds > 0


def test_on_a_cluster_the_client_submits_one_task_per_patient_and_stage(two_patients, tmp_path, cpu_gpu_cluster):
    """The graphs are built on the workers (lungzarr.pipeline.remote): the client computes no graph and
    submits, per patient, its header read and one task per stage, then one task at the run's end; the
    chunks are still reported as they are computed, and the store is the one a run without a cluster writes."""
    import numpy as np

    from lungzarr.io.store import CohortStore

    client, _ = cpu_gpu_cluster
    calls = {"submit": [], "compute": 0}
    submit, compute = client.submit, client.compute
    # The workers of this in-process cluster use the same Client object: only the run's own thread counts.
    here = threading.get_ident()

    def counted_submit(func, *args, **kwargs):
        if threading.get_ident() == here:
            calls["submit"].append(getattr(func, "__name__", str(func)))
        return submit(func, *args, **kwargs)

    def counted_compute(*args, **kwargs):
        calls["compute"] += threading.get_ident() == here
        return compute(*args, **kwargs)

    client.submit, client.compute = counted_submit, counted_compute
    events = []
    try:
        summaries = run(two_patients, tmp_path / "s.zarr", stages=["ingest", "segment"], batch_size=2,
                        client=client, gpu=True, progress=_record(events))
    finally:
        del client.submit, client.compute
    assert all(sorted(s.done) == ["P1", "P2"] for s in summaries), [s.failed for s in summaries]
    assert calls["compute"] == 0
    assert sorted(calls["submit"]) == sorted(["_read_series_and_files_task"] * 2 + ["stage_task"] * 4
                                             + ["_finish_task"]), calls
    for stage in ("ingest", "segment"):
        for patient in ("P1", "P2"):
            _chunks_before_the_end(events, stage, patient)
    with dask.config.set(scheduler="threads"):
        run(two_patients, tmp_path / "t.zarr", stages=["ingest", "segment"])
    for patient in ("P1", "P2"):
        got = CohortStore(tmp_path / "s.zarr", mode="r").open_patient(patient).load()
        want = CohortStore(tmp_path / "t.zarr", mode="r").open_patient(patient).load()
        for name in ("hu", "hu_2mm", "lungs", "segmented"):
            np.testing.assert_array_equal(got[name].values, want[name].values)
        # The worker read the group's nodes, the client's commit listed them.
        assert {"lungs", "segmented"} <= set(CohortStore(tmp_path / "s.zarr", mode="r").listing(patient))


def test_board_moves_with_chunks_and_gives_an_eta_once_a_patient_is_done():
    now = [100.0]
    board = ProgressBoard(clock=lambda: now[0])
    board(ProgressEvent("detect", "begin", total=4))
    board(ProgressEvent("detect", "skipped", patient="P0"))
    board(ProgressEvent("detect", "started", patient="P1", total=3))
    board(ProgressEvent("detect", "started", patient="P2", total=3))
    now[0] = 130.0
    board(ProgressEvent("detect", "chunk", patient="P1", total=3, chunks=1))
    board(ProgressEvent("detect", "chunk", patient="P1", total=3, chunks=2))
    view = board.view("detect")
    assert view.finished == 1 and view.chunks == (2, 6) and view.completed == pytest.approx(1 + 2 / 3)
    assert view.eta(130.0) is None  # no patient done yet: no pace to go by
    board(ProgressEvent("detect", "chunk", patient="P1", total=3, chunks=3))
    board(ProgressEvent("detect", "done", patient="P1", seconds=20.0))
    board(ProgressEvent("detect", "chunk", patient="P2", total=3, chunks=1))
    view = board.view("detect")
    assert view.chunks == (1, 3) and view.completed == pytest.approx(2 + 1 / 3)
    # 4/3 patients of work in 40 s since the first start; 5/3 left (the skipped one took none).
    assert view.eta(140.0) == pytest.approx((4 - 7 / 3) * 40.0 / (4 / 3))


def test_line_summary_shows_chunks_in_flight_and_the_eta():
    from lungzarr.cli._progress import _LineProgress

    lines = []
    progress = _LineProgress(lines.append, interval=0)
    progress(ProgressEvent("detect", "begin", total=3))
    progress(ProgressEvent("detect", "started", patient="P1", total=2))
    progress(ProgressEvent("detect", "chunk", patient="P1", total=2, chunks=1))
    assert lines == []  # started and chunk events: in the summary lines, not a line each
    assert progress.summary_line().endswith("detect 0/3 done, 3 left (chunks 1/2 in flight)")
    progress(ProgressEvent("detect", "done", patient="P1", seconds=2.0, wall_seconds=3.0))
    progress(ProgressEvent("detect", "started", patient="P2", total=2))
    assert lines == ["detect P1 done 2.0 s"]
    summary = progress.summary_line()
    assert "detect 1/3 done, 2 left (chunks 0/2 in flight), ETA " in summary and summary.endswith(" s"), summary


def _spans_named_lungzarr(dask_scheduler=None) -> list:
    return [s.id for s in dask_scheduler.extensions["spans"].spans.values() if s.name[-1].startswith("lungzarr ")]


def _dropped_groups_held(dask_scheduler=None) -> set:
    """(name, id) of the task groups the scheduler dropped that its spans or computations still hold."""
    held = [g for span in dask_scheduler.extensions["spans"].spans.values() for g in span.groups]
    held += [g for computation in dask_scheduler.computations for g in computation.groups]
    return {(g.name, id(g)) for g in held if dask_scheduler.task_groups.get(g.name) is not g}


def _metered(dask_worker=None) -> dict:
    return dict(dask_worker.plugins[TaskMeter.name].seconds)


def test_a_run_keeps_nothing_of_the_patients_it_is_done_with(two_patients, tmp_path, cpu_gpu_cluster):
    """Cohort scale (issue 29): the client drops what it held of a patient once it is through the last stage,
    the workers' meter forgets a patient's stage once its time is read, and the scheduler keeps no span of
    it. All three grew with every patient before: a 10,000-patient ingest grew the client by ~50 kB, each
    worker by ~36 kB and the scheduler by ~34 kB per patient (benchmarks/results/cohort_scale_ingest_10000.json).
    Nor does the scheduler keep the patients' task groups (~17 kB per patient of an ingest, held by its spans
    and computations after it dropped them: lungzarr.pipeline.forget_groups)."""
    import gc
    import uuid

    from lungzarr.pipeline.remote import RemoteStage

    client, _ = cpu_gpu_cluster
    held_before = client.run_on_scheduler(_dropped_groups_held)
    alive = {}

    def progress(event):
        if (event.stage, event.event) == ("segment", "done"):
            gc.collect()
            alive[event.patient] = sorted(o.patient for o in gc.get_objects() if isinstance(o, RemoteStage))

    (ingest, segment) = run(two_patients, tmp_path / "s.zarr", stages=["ingest", "segment"], batch_size=1,
                            client=client, gpu=True, progress=progress)
    assert ingest.done == segment.done == ["P1", "P2"], (ingest.failed, segment.failed)
    # When the second patient's last stage ends, the first one's is no longer held (its own still is).
    assert alive["P2"] == ["P2"], alive
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, RemoteStage)]
    # Each patient's stage was metered (the summary's time), by the workers' meter, which then forgot it; and
    # the scheduler holds no span of lungzarr's (distributed keeps every span for the scheduler's life).
    assert ingest.work_seconds > 0 and segment.work_seconds > 0
    assert client.run(_metered) == {w: {} for w in client.scheduler_info()["workers"]}
    assert client.run_on_scheduler(_spans_named_lungzarr) == []
    # The scheduler lets go of a group at the next graph it is sent; that graph's own group ("probe") is no
    # lungzarr task's, so the scheduler's spans keep it.
    client.submit(int, 1, key=f"probe-{uuid.uuid4().hex}").result()
    held_after = client.run_on_scheduler(_dropped_groups_held)
    assert {name for name, _ in held_after - held_before} <= {"probe"}, held_after - held_before


def _sleep_then_time(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return time.time()


class _SleepingStage:
    """A patient's stage computed on the cluster as one task that sleeps (the runner's remote-stage protocol);
    ``late``: seconds from the task's end to the runner's commit."""

    def __init__(self, patient, seconds):
        self.patient, self.seconds = patient, seconds
        self.future, self.warnings, self.chunks, self.late = None, [], None, None

    def submit(self, client, compute_options=None, earlier_tokens=()):
        import uuid

        self.future = client.submit(_sleep_then_time, self.seconds, key=f"sleep-{self.patient}-{uuid.uuid4().hex}")
        return self.future

    def outcome(self, ended):
        return (lambda: ended), self.seconds

    def add_record(self, ended):
        import time

        self.late = time.time() - ended

    def commit(self):
        pass

    def discard(self):
        pass


def test_the_run_sleeps_while_the_cluster_computes_and_wakes_when_a_stage_ends(tmp_path, cpu_gpu_cluster,
                                                                                monkeypatch):
    """Cohort scale (issue 29, the client's CPU per patient): while the patients' stages compute on the
    cluster the client looks at its messages when one comes, not on a clock (it looked 10 times a second),
    and a stage that ends is taken at once, not at the next look."""
    import time
    from types import SimpleNamespace

    from lungzarr.pipeline import runner

    client, _ = cpu_gpu_cluster
    # Far longer than the stages: a run that ended its waits by the clock, not by the stages' ends, would
    # take it (so the machine's load cannot pass or fail this).
    monkeypatch.setattr(runner, "WAKE_CHECK_S", 60.0)
    looks = []
    pass_chunks = runner._Stream.pass_chunks
    monkeypatch.setattr(runner._Stream, "pass_chunks",
                        lambda self, messages=None: (looks.append(1), pass_chunks(self, messages))[1])
    stages = {}

    def prepare(stage, patient, payload):
        stages[patient] = _SleepingStage(patient, 2.0)
        return stages[patient]

    start = time.perf_counter()
    (only,) = runner.stream_stages(SimpleNamespace(path=tmp_path / "s.zarr"), [("P1", None), ("P2", None)],
                                   ["sleep"], prepare, decide=lambda patient, stage: "run", batch_size=2,
                                   client=client)
    took = time.perf_counter() - start
    assert sorted(only.done) == ["P1", "P2"]
    # A look at least every runner.WAKE_CHECK_S and one per stage that ended; a 10 Hz poll looked ~20 times
    # in the ~2 s these two take on two workers.
    assert len(looks) <= 2 * (1 + took / runner.WAKE_CHECK_S) + 2, (len(looks), took)
    assert all(stage.late < runner.WAKE_CHECK_S / 2 for stage in stages.values()), \
        {p: stage.late for p, stage in stages.items()}


def test_a_prefetched_patient_that_does_not_run_at_its_turn_leaves_nothing_on_the_workers(tmp_path, cpu_gpu_cluster):
    """The first stage's prefetch starts before a patient's turn and is metered under a token the stage then
    takes. When the patient does not run after all (done by another run meanwhile, or its prepare fails),
    the prefetch is dropped and the workers forget its token: they kept it until the run ended before."""
    from types import SimpleNamespace

    from lungzarr.pipeline import runner

    client, _ = cpu_gpu_cluster
    decided = []

    def decide(patient, stage):
        decided.append(patient)
        # Run when the prefetch asks; at its turn P1 is done already and P2's prepare fails.
        return "run" if decided.count(patient) == 1 else ("skip" if patient == "P1" else "run")

    def prefetch(patient, payload):
        return client.submit(sum, [1, 2], key=f"prefetch-{patient}")

    def prepare(stage, patient, payload):
        payload.result()  # the prefetch ran (and was metered) before the patient's turn
        raise runner.PatientError("its header is gone", patient=patient)

    store = SimpleNamespace(path=tmp_path / "s.zarr", record_failure=lambda err, stage: None)
    (only,) = runner.stream_stages(store, [("P1", None), ("P2", None)], ["ingest"], prepare, decide=decide,
                                   batch_size=1, client=client, prefetch=prefetch)
    assert only.skipped == ["P1"] and [f["patient"] for f in only.failed] == ["P2"], (only.skipped, only.failed)
    assert client.run(_metered) == {w: {} for w in client.scheduler_info()["workers"]}
