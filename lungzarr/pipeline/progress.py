"""Progress inside a patient's stage, and the time its tasks took on the workers.

Chunks
    A stage that computes a patient in z-chunks (ingest, segment, lungs3d,
    detect) builds its dataset through :func:`prepare_chunked`: each 3-D
    variable's blocks pass through :func:`_chunk_computed`, an identity that
    tells the client the chunk is computed. On a dask.distributed worker it
    logs a structured event (:meth:`distributed.Worker.log_event`, topic
    :data:`TOPIC`), which the scheduler forwards to the client subscribed to
    it (:class:`ChunkChannel`); without a cluster (dask's local threads) it
    goes onto a queue of this process. Nothing else changes in the graph: the
    identity is one more call per block, fused into the block's own task (a
    task of its own, ``chunk-computed-…``, where fusion is off, on GPU
    clusters), and its task name is derived from the block's, so task keys
    still come from the patient, its files and the store. A stage built on a
    worker (:mod:`lungzarr.pipeline.remote`) sends one more message on the
    same channel when its graph is built (``prepared``, with its number of
    chunks).

Worker time
    Each patient's stage is submitted with a task annotation of its own
    (:func:`metered_stage`: :data:`METER_ANNOTATION`, a token per patient and
    stage); a worker plugin, :class:`TaskMeter`, adds up per token how long
    each task it executed ran on its thread (the ``compute`` start to stop
    the worker records), and :func:`worker_seconds` takes those sums from
    every worker: the time the stage's tasks ran on the workers' threads,
    queueing excluded. It is a task's wall time on its thread, not CPU time
    alone: an engine that spreads a call over every core (OpenVINO,
    TensorFlow) keeps its task's thread waiting while its own threads work.
    Not :func:`distributed.span`: the scheduler keeps every span (with its
    task groups and counters) for its whole life, ~30 kB per patient of an
    ingest (``benchmarks/results/cohort_scale_ingest_2000_after.json``), and
    a token taken from the workers leaves nothing behind anywhere.

Displays
    :class:`ProgressBoard` turns the events into what a progress display
    shows per stage: patients finished, chunks of the patients in flight, and
    an estimate of the time left once one patient is done.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

__all__ = ["TOPIC", "METER_ANNOTATION", "prepare_chunked", "chunk_progress", "emit", "ChunkChannel", "FinishedFutures",
           "metered_stage", "TaskMeter", "ensure_meter", "worker_seconds", "ProgressBoard", "StageView"]

#: The structured-event topic chunk messages are logged under on the workers.
TOPIC = "lungzarr-chunk"
#: The task annotation naming the patient's stage a task belongs to, for the workers' :class:`TaskMeter`.
METER_ANNOTATION = "lungzarr_meter"

#: Queues of this process's runs without a cluster, by store.
_LOCAL: dict[str, queue.SimpleQueue] = {}
_LOCAL_LOCK = threading.Lock()


# ---------------------------------------------------------------------- in the graph

def chunk_progress(ds, *, store, stage: str, patient: str):
    """``ds`` with every 3-D dask variable's blocks reporting when computed; and how many blocks they are.

    Returns
    -------
    (xarray.Dataset, int)
        The dataset (the same values) and the number of chunks it reports.
    """
    import dask.array as da

    total = sum(int(var.data.npartitions) for var in ds.data_vars.values()
                if var.ndim == 3 and isinstance(var.data, da.Array))
    channel = str(store.path)
    out = ds.copy()
    for name, var in ds.data_vars.items():
        if var.ndim != 3 or not isinstance(var.data, da.Array):
            continue
        reported = var.copy(data=_reported(var.data, channel=channel, stage=stage, patient=patient,
                                           variable=str(name), total=total))
        reported.encoding = dict(var.encoding)
        out[name] = reported
    return out, total


def _reported(data, **where):
    """``data`` with each block passed through :func:`_chunk_computed`: one task per block, named from the
    block's own name (its inputs) and ``where``.

    A layer of plain tasks, not a Blockwise one (``map_blocks``): dask fuses
    adjacent Blockwise layers with their annotations, and the per-key
    annotations of GPU runs (:func:`lungzarr.model.infer.annotate_gpu`)
    cannot be merged so.
    """
    from functools import partial

    import dask.array as da
    import numpy as np
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    name = f"chunk-computed-{tokenize(data.name, sorted(where.items()))}"
    report = partial(_chunk_computed, **where)
    tasks = {(name,) + index: (report, (data.name,) + index, index) for index in np.ndindex(*data.numblocks)}
    graph = HighLevelGraph.from_collections(name, tasks, dependencies=[data])
    return da.Array(graph, name, data.chunks, meta=data._meta)


def prepare_chunked(store, patient: str, stage: str, ds, *, chunk_slices: int, record: dict,
                    new_group: bool = False):
    """``store.prepare_stage`` of a stage computed in z-chunks, each chunk reported as it is computed.

    The dataset is stored in chunks of ``chunk_slices`` slices
    (:func:`~lungzarr.pipeline.stages._common.encoded`); the returned
    PendingStage's ``chunks`` is the number of chunk messages the runner is
    to expect.
    """
    from lungzarr.pipeline.stages._common import encoded

    reported, total = chunk_progress(encoded(ds, chunk_slices), store=store, stage=stage, patient=patient)
    pending = store.prepare_stage(patient, stage, reported, record=record, new_group=new_group)
    pending.chunks = total
    return pending


def _chunk_computed(block, block_id, *, channel, stage, patient, variable, total):
    """Identity on a block: tell the client that block ``block_id`` of ``variable`` is computed."""
    emit({"channel": channel, "stage": stage, "patient": patient,
          "chunk": f"{variable}/{'.'.join(str(i) for i in (block_id or ()))}", "total": int(total)})
    return block


def emit(message: dict) -> None:
    """Send ``message`` (with its ``channel``, the store path) to the run's :class:`ChunkChannel`: from a
    dask.distributed worker as a structured event, from dask's local threads onto this process's queue."""
    worker = _current_worker()
    if worker is not None:
        worker.log_event(TOPIC, message)
        return
    with _LOCAL_LOCK:
        target = _LOCAL.get(message["channel"])
    if target is not None:
        target.put(message)


def _current_worker():
    """The dask.distributed worker running this task, or None (dask's local schedulers)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.get_worker()
    except ValueError:  # not inside a worker's task
        return None


# ---------------------------------------------------------------------- in the client

class ChunkChannel:
    """The chunk messages of one store's run, as they arrive (a context manager).

    With a ``client`` it subscribes to :data:`TOPIC` (the scheduler forwards
    the workers' events); without one it registers a queue the local
    schedulers' tasks put their messages on. :meth:`drain` returns what
    arrived since the last call, in the caller's thread; ``arrived`` (a
    ``threading.Event``, the caller's own when given) is set when a message
    from the cluster comes.
    """

    def __init__(self, client, store_path, *, arrived: threading.Event | None = None):
        self.client, self.channel = client, str(store_path)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._open = False
        # Set when a message comes: the caller waits on it rather than looking at the queue on a clock.
        self.arrived = arrived if arrived is not None else threading.Event()

    def __enter__(self):
        if self.client is not None:
            self.client.subscribe_topic(TOPIC, self._on_event)
        else:
            with _LOCAL_LOCK:
                _LOCAL[self.channel] = self._queue
        self._open = True
        return self

    def __exit__(self, *exc):
        self._open = False
        if self.client is not None:
            try:
                self.client.unsubscribe_topic(TOPIC)
            except Exception:  # the client is closing: nothing more arrives
                pass
        else:
            with _LOCAL_LOCK:
                if _LOCAL.get(self.channel) is self._queue:
                    del _LOCAL[self.channel]
        return False

    def _on_event(self, event):
        # Called in the client's event-loop thread with (timestamp, message).
        message = event[1] if isinstance(event, (tuple, list)) and len(event) == 2 else event
        if isinstance(message, dict) and message.get("channel") == self.channel:
            self._queue.put(message)
            self.arrived.set()

    def drain(self) -> list[dict]:
        """The messages that arrived since the last call (``stage``, ``patient``, ``chunk``, ``total``)."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def while_computing(self, on_messages):
        """A context for a computation on dask's local schedulers: ``on_messages(drain())`` after every task.

        dask calls a callback's ``posttask`` in the thread that called
        ``compute``, so the messages are handed on in that thread while the
        computation goes on.
        """
        if self.client is not None:
            return nullcontext()
        from dask.callbacks import Callback

        def posttask(key, result, dsk, state, worker_id):
            messages = self.drain()
            if messages:
                on_messages(messages)
        return Callback(posttask=posttask)


class FinishedFutures:
    """The futures of the patients' stages in the order they finish; ``wake`` is set as each one does.

    distributed calls a future's done callbacks once, whether it finished,
    failed or was cancelled, so every future added is taken exactly once.
    """

    def __init__(self, wake: threading.Event):
        self.wake = wake
        self._done: queue.SimpleQueue = queue.SimpleQueue()

    def add(self, future) -> None:
        future.add_done_callback(self._on_done)

    def _on_done(self, future) -> None:  # in distributed's callback thread
        self._done.put(future)
        self.wake.set()

    def take(self):
        """The next finished future, or None when none is waiting."""
        try:
            return self._done.get_nowait()
        except queue.Empty:
            return None


@contextmanager
def metered_stage(client, stage: str, patient: str):
    """Submit inside it: the tasks submitted are annotated with a token of this patient's stage, which the
    workers' :class:`TaskMeter` meters. Yields the token (None without a client)."""
    if client is None:
        yield None
        return
    import uuid

    import dask

    token = f"lungzarr {stage} {patient} {uuid.uuid4().hex}"
    with dask.annotate(**{METER_ANNOTATION: token}):
        yield token


try:
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # no dask.distributed: runs without a cluster need no meter
    _WorkerPlugin = object


class TaskMeter(_WorkerPlugin):
    """A worker plugin: seconds its threads ran the tasks of each :data:`METER_ANNOTATION` token, kept until
    :func:`worker_seconds` takes them (so nothing stays per patient)."""

    name = "lungzarr-task-meter"
    #: Registered again (a second run with the same client): the plugin in place is kept, with its sums.
    idempotent = True

    def setup(self, worker):
        self.worker = worker
        self.seconds: dict[str, float] = {}

    def transition(self, key, start, finish, **kwargs):
        if start != "executing":
            return
        ts = self.worker.state.tasks.get(key)
        token = (ts.annotations or {}).get(METER_ANNOTATION) if ts is not None else None
        if token is None:
            return
        # The last run only: a task run again (its worker lost, a retry) was counted at its first end.
        run = next((s for s in reversed(ts.startstops) if s.get("action") == "compute"), None)
        if run is not None:
            self.seconds[token] = self.seconds.get(token, 0.0) + (run["stop"] - run["start"])

    def take(self, tokens) -> float:
        return sum(self.seconds.pop(t, 0.0) for t in tokens)


def ensure_meter(client) -> None:
    """Register :class:`TaskMeter` on the cluster of ``client`` (workers that join later get it too; a
    meter in place is kept: :attr:`TaskMeter.idempotent`)."""
    client.register_plugin(TaskMeter())


def _take_execute_seconds(tokens, dask_worker=None) -> float:
    """On a worker: seconds its threads ran the tasks of ``tokens``, taken from its :class:`TaskMeter`
    (asked once the stage's computation has ended, so no task adds to them afterwards)."""
    meter = dask_worker.plugins.get(TaskMeter.name)
    return 0.0 if meter is None else meter.take(tokens)


def worker_seconds(client, tokens) -> float | None:
    """Seconds the workers' threads ran the tasks of the tokens ``tokens`` (:func:`metered_stage`), added up
    over every worker; None when a worker did not answer (it is gone: its tasks' time is lost with it). Once
    per token: the workers forget it as they answer."""
    tokens = [t for t in tokens if t is not None]
    if not tokens:
        return 0.0
    try:
        per_worker = client.run(_take_execute_seconds, tokens)
    except Exception:  # a worker died or the cluster is closing
        return None
    return float(sum(per_worker.values()))


# ---------------------------------------------------------------------- for displays

@dataclass
class StageView:
    """What a display shows for one stage (see :class:`ProgressBoard`)."""

    total: int = 0
    counts: dict = field(default_factory=dict)
    #: Patients in flight: ``{patient: (chunks computed, chunks in all or None)}``.
    in_flight: dict = field(default_factory=dict)
    started: float | None = None

    @property
    def finished(self) -> int:
        """Patients with their event: done, skipped, failed or blocked."""
        return sum(self.counts.values())

    @property
    def chunks(self) -> tuple[int, int]:
        """Chunks computed and chunks in all, over the patients in flight whose chunk count is known."""
        known = [(d, t) for d, t in self.in_flight.values() if t]
        return sum(min(d, t) for d, t in known), sum(t for _, t in known)

    @property
    def completed(self) -> float:
        """Patients finished, plus each patient in flight's share of its chunks computed."""
        return self.finished + sum(min(d, t) / t for d, t in self.in_flight.values() if t)

    def eta(self, now: float) -> float | None:
        """Seconds left at the stage's pace so far; None until one of its patients is done (or failed).

        The pace is the work finished (patients done or failed, and the chunks
        of those in flight) per second since the stage's first patient
        started; patients skipped or blocked take no time.
        """
        worked = self.counts.get("done", 0) + self.counts.get("failed", 0)
        if worked < 1 or self.started is None or now <= self.started:
            return None
        work = worked + (self.completed - self.finished)
        left = max(0.0, self.total - self.completed)
        return left * (now - self.started) / work


class ProgressBoard:
    """The state of every stage from the :class:`~lungzarr.pipeline.runner.ProgressEvent` s, for displays.

    Call it with each event (it is a progress callable itself); :meth:`view`
    gives one stage's :class:`StageView`. Thread-safe.
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.stages: dict[str, StageView] = {}
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        with self._lock:
            if event.event == "begin":
                self.stages[event.stage] = StageView(total=event.total or 0)
                return
            view = self.stages.setdefault(event.stage, StageView())
            if event.event == "started":
                view.started = view.started if view.started is not None else self.clock()
                view.in_flight[event.patient] = (0, event.total)
            elif event.event == "chunk":
                done, total = view.in_flight.get(event.patient, (0, None))
                view.in_flight[event.patient] = (max(done, event.chunks or 0), event.total or total)
            else:
                view.in_flight.pop(event.patient, None)
                view.counts[event.event] = view.counts.get(event.event, 0) + 1

    def view(self, stage: str) -> StageView:
        with self._lock:
            view = self.stages.setdefault(stage, StageView())
            return StageView(view.total, dict(view.counts), dict(view.in_flight), view.started)
