"""The streaming runner: patients through stages, each as soon as its previous stage is committed.

Generic: it knows no stage. It is given stage names in order, a ``prepare``
that starts a patient's stage (a :class:`~lungzarr.io.store.PendingStage`
whose ``delayed`` writes the voxels, or, on a cluster, a
:class:`~lungzarr.pipeline.remote.RemoteStage` that has a worker build and
compute it: one future per patient and stage), and a ``decide`` that says whether a
patient's stage runs, is skipped (done already) or is blocked (a stage it
needs is missing). A patient that fails is recorded with its reason and the
cohort goes on.

Two things stop the whole run instead: an interrupt (``KeyboardInterrupt``:
Ctrl-C, or the CLI's SIGTERM), and a write the machine refuses for every
patient alike (a full disk, a read-only file system, an object store that
stopped answering: :class:`~lungzarr.errors.RunStopError`). Either way the
patients' work in flight is cancelled, nothing is recorded as a patient's
failure, and what was committed is kept: the same command resumes.
"""
from __future__ import annotations

import errno
import os
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from lungzarr.errors import PatientError, RunStopError, environment_reason, stops_the_run
from lungzarr.io.locations import blank_secrets, describe_error
from lungzarr.pipeline.forget_groups import ensure_forgetting
from lungzarr.pipeline.progress import ChunkChannel, FinishedFutures, ensure_meter, metered_stage, worker_seconds

__all__ = ["StageSummary", "ProgressEvent", "Progress", "stream_stages", "as_patient_error", "machine_reason",
           "run_stop_error", "EVENTS", "STEPS"]

#: What can happen to one patient in one stage; each patient gives each stage exactly one of them.
EVENTS = ("done", "skipped", "failed", "blocked")
#: Events while a patient's stage computes: ``started`` once when it is submitted, ``chunk`` per z-chunk computed.
STEPS = ("started", "chunk")
#: Seconds the run waits at most before it looks again for a finished stage or a chunk message. Either
#: wakes it at once; the limit only keeps the wait short where a signal cannot end it (Ctrl-C on Windows).
WAKE_CHECK_S = 1.0


@dataclass
class StageSummary:
    """What a stage did for a cohort.

    ``seconds`` is the stage's wall span (first start to last end; spans of
    streamed stages overlap), ``work_seconds`` its patients' computation
    time: on a cluster the time its tasks ran on the workers' threads, added
    up (:func:`lungzarr.pipeline.progress.worker_seconds`: queueing and
    waiting for other patients excluded); without one, each patient's
    computation in this process, start to end (they run one at a time).
    ``None`` when a worker that ran some of its tasks was lost before they
    were counted.
    """

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    work_seconds: float | None = 0.0
    #: INPUT entries not used as patients (``file``, ``reason``): set on the summary of the stage that read INPUT.
    ignored: list[dict] = field(default_factory=list)
    #: Patients done again although complete, because their INPUT changed (``patient``, ``reason``).
    redone: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict:
        return {"stage": self.stage, "done": len(self.done), "skipped": len(self.skipped),
                "failed": len(self.failed), "seconds": round(self.seconds, 3),
                "work_seconds": None if self.work_seconds is None else round(self.work_seconds, 3)}


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long command.

    ``event`` is ``"begin"`` once per stage (``total`` patients, no patient),
    then one of :data:`EVENTS` per patient (``seconds``: that patient's
    computation of the stage, as :attr:`StageSummary.work_seconds` counts
    it, and ``wall_seconds``: submission to result, for ``"done"`` and
    ``"failed"``; ``reason``: why, for ``"failed"``; ``warnings``: the
    stage's warnings, for ``"done"``).

    Before its outcome, a patient whose stage computes gives :data:`STEPS`:
    ``"started"`` when it is submitted (``total``: its z-chunks, None for a
    stage of one task), then ``"chunk"`` each time one more of its z-chunks
    is computed (``chunks`` of ``total``), as the workers compute them
    (:mod:`lungzarr.pipeline.progress`).
    """

    stage: str
    event: str
    patient: str | None = None
    total: int | None = None
    seconds: float | None = None
    reason: str | None = None
    #: For ``"done"``: what the user should know that did not stop the patient (``file``, ``reason`` records,
    #: as ``lungzarr status`` lists them: a dropped edge slice, skipped files, a resampling).
    warnings: tuple = ()
    #: For ``"chunk"``: the patient's z-chunks of the stage computed so far.
    chunks: int | None = None
    #: For ``"done"`` and ``"failed"``: seconds from the stage's submission to its result.
    wall_seconds: float | None = None


class Progress(Protocol):
    """The one progress protocol of every long command: called with each :class:`ProgressEvent`."""

    def __call__(self, event: ProgressEvent) -> None: ...


def _no_progress(event: ProgressEvent) -> None:
    return None


def as_patient_error(exc: BaseException, patient: str, stage: str) -> PatientError:
    """``exc`` as a PatientError of ``patient`` and ``stage`` (an unexpected one says so, with where)."""
    if isinstance(exc, PatientError):
        if exc.patient is None:
            exc.patient = patient
        if exc.stage is None:
            exc.stage = stage
        return exc
    reason = machine_reason(exc)
    if reason is not None:
        return PatientError(reason, patient=patient, stage=stage)
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return PatientError(f"unexpected {type(exc).__name__}{at}: {blank_secrets(str(exc))} (please report this with "
                        f"the patient's data description)", patient=patient, stage=stage)


#: Top-level packages whose exceptions say an object store (or the network to it) failed.
_OBJECT_STORE_PACKAGES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "google", "azure")


def _object_store_reason(exc: BaseException) -> str | None:
    if type(exc).__module__.split(".")[0] not in _OBJECT_STORE_PACKAGES:
        return None
    return (f"the object store failed ({describe_error(exc)}); check the endpoint, the network and the "
            f"credentials in the environment, and run the same command again")


def machine_reason(exc: BaseException) -> str | None:
    """The message of an error of the machine (a disk, memory, an object store), or None for any other."""
    return environment_reason(exc) or _object_store_reason(exc)


def run_stop_error(exc: BaseException, store=None) -> RunStopError | None:
    """A :class:`~lungzarr.errors.RunStopError` when ``exc`` stops every later patient too, else None.

    A full disk, a quota, a read-only file system (wherever they happen), a
    permission refused inside the store, and an object store that fails
    (reads of INPUT objects are each patient's own errors, raised by the
    readers as PatientError).
    """
    if isinstance(exc, RunStopError):
        return exc
    if isinstance(exc, PatientError):
        return None
    inside = store is not None and isinstance(exc, OSError) and exc.filename is not None \
        and _within(str(exc.filename), str(store.path))
    if stops_the_run(exc) or (inside and exc.errno in (errno.EACCES, errno.EPERM)):
        context = None if store is None else f"writing store {str(store.path)!r}"
        return RunStopError(environment_reason(exc, context=context))
    reason = _object_store_reason(exc)
    return RunStopError(reason) if reason is not None else None


def _within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (local paths made absolute; URLs by prefix)."""
    if "://" in root:
        return path == root or path.startswith(root.rstrip("/") + "/")
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Stream:
    """The state of one :func:`stream_stages` call (queues, counts, timings per stage)."""

    def __init__(self, store, items, stages, prepare, decide, batch_size, client, progress, compute_options,
                 prefetch, requires, on_leave=None):
        self.store, self.stages, self.prepare, self.decide = store, list(stages), prepare, decide
        self.on_leave = on_leave
        # Stages each stage needs, directly or not (default: every earlier stage).
        requires = requires if requires is not None else {s: self.stages[:k] for k, s in enumerate(self.stages)}
        self.needs = {s: _closure(s, requires) for s in self.stages}
        self.failed_in_run = {}  # patient -> stages it failed in this run
        self.batch_size, self.client = batch_size, client
        self.progress = progress or _no_progress
        self.compute_options = compute_options or {}
        self.prefetch = prefetch
        self.summaries = [StageSummary(stage) for stage in self.stages]
        self.queues = [deque() for _ in self.stages]
        self.queues[0].extend(items)
        self.in_flight = [0] * len(self.stages)
        self.first_start = [None] * len(self.stages)
        self.last_end = [None] * len(self.stages)
        self.prefetched = set()
        self.ready = deque()  # (stage index, pending, started, get_result, seconds) without a client
        self.wake = threading.Event()  # a chunk message came, or a patient's stage finished on the cluster
        self.channel = ChunkChannel(client, store.path, arrived=self.wake)
        self.chunks_seen = {}  # (stage index, patient) -> chunk ids computed
        self.computing = {}  # (stage index, patient) -> its pending stage, while it computes
        self.announced = set()  # (stage index, patient) whose "started" was given
        self.prefetch_tokens = {}  # patient -> meter token of its prefetch (its time counts in the first stage)
        if client is not None:
            ensure_meter(client)  # before any task: each stage's time on the workers (worker_seconds)
            # Before any task too: the scheduler lets go of each patient's task groups once it forgot them.
            ensure_forgetting(client)

            self.finished = FinishedFutures(self.wake)
            self.by_key = {}
        for stage in self.stages:
            self.progress(ProgressEvent(stage, "begin", total=len(items)))

    # ---------------------------------------------------------------- events
    def notify(self, i, event, patient, seconds=None, reason=None, wall_seconds=None):
        self.progress(ProgressEvent(self.stages[i], event, patient=patient, seconds=seconds, reason=reason,
                                    wall_seconds=wall_seconds))

    def announce(self, i, patient, total):
        """Give the patient's ``"started"`` event, once."""
        if (i, patient) not in self.announced:
            self.announced.add((i, patient))
            self.progress(ProgressEvent(self.stages[i], "started", patient=patient, total=total))

    def pass_chunks(self, messages=None):
        """Hand the chunk messages that arrived on to ``progress`` (one event per chunk new to its patient).

        A stage built on a worker (:mod:`lungzarr.pipeline.remote`) first says that its graph is built and
        how many chunks it has (``prepared``): its ``"started"`` event, given then (or with its first chunk
        when another worker's chunk message comes first).
        """
        index = {s: i for i, s in enumerate(self.stages)}
        for message in self.channel.drain() if messages is None else messages:
            i, patient = index.get(message.get("stage")), message.get("patient")
            seen = self.chunks_seen.get((i, patient))
            if seen is None:  # not in flight (a late one)
                continue
            if "prepared" in message:
                pending = self.computing.get((i, patient))
                if hasattr(pending, "prepared"):
                    pending.prepared(message)
                self.announce(i, patient, message.get("total"))
                continue
            if message.get("chunk") in seen:  # a task run again
                continue
            self.announce(i, patient, message.get("total"))
            seen.add(message["chunk"])
            self.progress(ProgressEvent(self.stages[i], "chunk", patient=patient,
                                        total=message.get("total"), chunks=len(seen)))

    def forward(self, i, patient):
        # Every patient goes on: a later stage's decide() blocks it when a stage it needs is missing.
        if i + 1 < len(self.stages):
            self.queues[i + 1].append((patient, None))
        elif self.on_leave is not None:
            self.on_leave(patient)

    def fail(self, i, patient, exc, seconds=None, wall_seconds=None):
        self.stop_if_run_level(i, patient, exc)
        self.failed_in_run.setdefault(patient, set()).add(self.stages[i])
        err = as_patient_error(exc, patient, self.stages[i])
        try:
            self.store.record_failure(err, stage=self.stages[i])
        except Exception as record_exc:  # a full disk refuses the record too: the run stops
            self.stop_if_run_level(i, patient, record_exc)
            raise
        self.summaries[i].failed.append(err.as_record())
        self.notify(i, "failed", patient, seconds, reason=err.reason, wall_seconds=wall_seconds)
        self.forward(i, patient)

    def stop_if_run_level(self, i, patient, exc):
        """Raise a RunStopError when ``exc`` would fail every later patient too (nothing is recorded)."""
        stop = run_stop_error(exc, self.store)
        if stop is not None:
            raise RunStopError(f"the run stopped at patient {patient!r} ({self.stages[i]}): {stop}") from exc

    def discard(self, i, pending):
        """Cancel what is left of a failed patient's computation and drop its staged group.

        Tasks of the same computation may still be running on other workers;
        :meth:`~lungzarr.io.store.PendingStage.discard` tolerates their late
        writes, and whatever it cannot remove (no longer a group: its
        ``zarr.json`` goes first) is removed by the next run's recovery, under
        the lock, once these workers are gone. A patient's failure never stops
        the run: only a failure that stops every patient does.
        """
        if pending.future is not None:
            try:
                self.client.cancel([pending.future])
            except Exception:  # the scheduler is going away: nothing left to cancel
                pass
        try:
            pending.discard()
        except Exception as discard_exc:
            self.stop_if_run_level(i, pending.patient, discard_exc)
            # Anything else is left for the next run's recovery (see above); the patient's failure is recorded.

    def cancel_all(self):
        """Cancel every computation in flight and every prefetch (the run stops: Ctrl-C, a full disk).

        Staged groups in flight are left as they are: their tasks may still
        be writing, and the next run's recovery (under the lock) removes them.
        """
        if self.client is None:
            return
        futures = [pending.future for _, pending, _, _ in self.by_key.values()]
        futures += [payload for queue in self.queues for _, payload in queue if hasattr(payload, "cancel")]
        if futures:
            try:
                self.client.cancel(futures)
            except Exception:  # the scheduler is already gone: so is the work
                pass

    # ---------------------------------------------------------------- submitting
    def submit(self, i, pending):
        started = time.perf_counter()
        self.first_start[i] = self.first_start[i] or started
        self.in_flight[i] += 1
        self.chunks_seen[(i, pending.patient)] = set()
        self.computing[(i, pending.patient)] = pending
        if self.client is not None and hasattr(pending, "submit"):
            # Built and computed from a worker (lungzarr.pipeline.remote): one future, whose task meters its
            # own tasks' time; "started" comes with its first message (pass_chunks).
            future = pending.submit(self.client, self.compute_options.get(self.stages[i], {}),
                                    self.take_prefetch_tokens(i, pending.patient))
            self.by_key[future.key] = (i, pending, started, None)
            self.finished.add(future)
            return
        # A stage computed in z-chunks says how many (lungzarr.pipeline.progress.prepare_chunked).
        self.announce(i, pending.patient, getattr(pending, "chunks", None))
        if self.client is not None:
            # One meter token per patient and stage: the workers meter its tasks' time (worker_seconds).
            with metered_stage(self.client, self.stages[i], pending.patient) as token:
                future = self.client.compute(pending.delayed, optimize_graph=False,
                                             **self.compute_options.get(self.stages[i], {}))
            pending.future = future
            tokens = [token, *self.take_prefetch_tokens(i, pending.patient)]
            self.by_key[future.key] = (i, pending, started, tokens)
            self.finished.add(future)
            return
        try:
            # The chunk messages of the local schedulers' tasks are handed on while it computes.
            with self.channel.while_computing(self.pass_chunks):
                result = pending.compute()
            get_result = lambda: result  # noqa: E731
        except Exception as exc:  # raised again where the result is taken
            get_result = _raiser(exc)
        # Computed here, alone, now: its start to its end is its computation (its result is taken later).
        self.ready.append((i, pending, started, get_result, time.perf_counter() - started))

    def take_prefetch_tokens(self, i, patient) -> list:
        """The meter token of ``patient``'s prefetch, once, for its first stage ([] otherwise)."""
        return [self.prefetch_tokens.pop(patient)] if i == 0 and patient in self.prefetch_tokens else []

    def drop_prefetch(self, patient, payload):
        """A prefetched patient whose first stage does not run at its turn (done or blocked by then, or its
        prepare failed): once its prefetch has ended, the workers forget its meter token, which they would
        otherwise keep until the run ends (its time counts in no stage). Not cancelled: a prefetch that ended
        while the cancel was on its way would be metered after the token was taken. Rare (the decision
        changed since the prefetch), and a prefetch is one patient's header read."""
        tokens = self.take_prefetch_tokens(0, patient)
        if not tokens:
            return
        if hasattr(payload, "cancel"):
            from distributed import wait

            try:
                wait(payload)
            except Exception:  # the scheduler is going away: so are the workers' sums
                return
        worker_seconds(self.client, tokens)

    def prefetch_ahead(self):
        """Start the first stage's slow per-patient reads for the next ``2 * batch_size`` patients due."""
        queue = self.queues[0]
        for k, (patient, payload) in enumerate(list(queue)[:2 * self.batch_size]):
            if patient in self.prefetched:
                continue
            self.prefetched.add(patient)
            try:
                if self.decide(patient, self.stages[0]) == "run":
                    with metered_stage(self.client, self.stages[0], patient) as token:
                        queue[k] = (patient, self.prefetch(patient, payload))
                    self.prefetch_tokens[patient] = token
            except Exception:  # decided again, and reported, at the patient's turn
                pass

    def admit(self):
        # Later stages first: patients already in flight finish before new ones start.
        for i in reversed(range(len(self.stages))):
            while self.queues[i] and self.in_flight[i] < self.batch_size:
                if i == 0 and self.prefetch is not None:
                    self.prefetch_ahead()
                patient, payload = self.queues[i].popleft()
                if i == 0:
                    self.prefetched.discard(patient)  # out of the first queue: never prefetched again
                try:
                    # A stage that failed in this run blocks what needs it, whatever its old marker says.
                    failed = self.failed_in_run.get(patient, set()) & self.needs[self.stages[i]]
                    decision = "blocked" if failed else self.decide(patient, self.stages[i])
                    if decision in ("blocked", "skip"):
                        if i == 0:
                            self.drop_prefetch(patient, payload)
                        if decision == "skip":
                            self.summaries[i].skipped.append(patient)
                        self.notify(i, "blocked" if decision == "blocked" else "skipped", patient)
                        self.forward(i, patient)
                        continue
                    pending = self.prepare(self.stages[i], patient, payload)
                except Exception as exc:  # one broken patient never stops the cohort
                    if i == 0:
                        self.drop_prefetch(patient, payload)
                    self.fail(i, patient, exc)
                    continue
                self.submit(i, pending)

    def next_finished(self):
        """The next patient's stage to end: (stage index, pending, started, get_result, computation seconds)."""
        if self.client is not None:
            # Chunk messages are handed on while the patients in flight compute; the run sleeps between them.
            while True:
                self.wake.clear()  # before looking: what comes after the look ends the wait below
                self.pass_chunks()
                future = self.finished.take()
                if future is not None:
                    break
                self.wake.wait(WAKE_CHECK_S)
            i, pending, started, tokens = self.by_key.pop(future.key)
            if tokens is not None:
                return i, pending, started, future.result, worker_seconds(self.client, tokens)
            try:
                value = future.result()
            except Exception as exc:  # the task itself was lost (its worker died): so is its time
                return i, pending, started, _raiser(exc), None
            get_result, seconds = pending.outcome(value)
            return i, pending, started, get_result, seconds
        return self.ready.popleft()

    # ---------------------------------------------------------------- the loop
    def run(self) -> list[StageSummary]:
        try:
            with self.channel:
                return self._run()
        except BaseException:  # KeyboardInterrupt (Ctrl-C, the CLI's SIGTERM), RunStopError, a bug
            self.cancel_all()
            raise

    def _run(self) -> list[StageSummary]:
        while True:
            self.admit()
            if not any(self.in_flight):
                if any(self.queues):
                    continue  # skipped patients moved on to a later stage's queue
                break
            i, pending, started, get_result, seconds = self.next_finished()
            self.in_flight[i] -= 1
            self.chunks_seen.pop((i, pending.patient), None)
            self.computing.pop((i, pending.patient), None)
            announced = (i, pending.patient) in self.announced
            self.announced.discard((i, pending.patient))
            end = self.last_end[i] = time.perf_counter()
            wall = end - started
            summary = self.summaries[i]
            summary.work_seconds = None if seconds is None or summary.work_seconds is None \
                else summary.work_seconds + seconds
            # Each patient's stage is committed as soon as its own voxels are written.
            try:
                pending.add_record(get_result())
                pending.commit()
            except Exception as exc:
                self.discard(i, pending)
                self.fail(i, pending.patient, exc, seconds, wall_seconds=wall)
                continue
            if not announced:  # a stage whose "prepared" message did not come: every done patient started
                self.progress(ProgressEvent(self.stages[i], "started", patient=pending.patient,
                                            total=getattr(pending, "chunks", None)))
            self.summaries[i].done.append(pending.patient)
            self.progress(ProgressEvent(self.stages[i], "done", patient=pending.patient, seconds=seconds,
                                        wall_seconds=wall, warnings=tuple(pending.warnings)))
            self.forward(i, pending.patient)
        for i, summary in enumerate(self.summaries):
            if self.first_start[i] is not None and self.last_end[i] is not None:
                summary.seconds = self.last_end[i] - self.first_start[i]
        return self.summaries


def stream_stages(store, items, stages, prepare: Callable, *, decide: Callable, batch_size: int = 4, client=None,
                  progress: Progress | None = None, compute_options: dict | None = None,
                  prefetch: Callable | None = None, requires: dict | None = None,
                  on_leave: Callable | None = None) -> list[StageSummary]:
    """Stream patients through several stages, each patient as soon as its previous stage is committed.

    A patient's next stage is submitted the moment its previous one is
    committed, while other patients are still in earlier stages, so on a
    cluster the stages overlap: the UNet of one patient runs on the GPU
    worker while the CPU workers ingest and segment the next ones. Each stage
    has at most ``batch_size`` patients in flight, so what the workers hold
    does not grow with the cohort (patients between stages wait on disk).

    Parameters
    ----------
    store : CohortStore
        Where failures are recorded.
    items : list of (patient_id, payload)
        ``payload`` goes to the first stage's prepare; later stages get None.
    stages : list of str
        In order.
    prepare : callable
        ``prepare(stage, patient, payload) -> PendingStage`` (or, with a client, an object with
        ``submit``, ``outcome``, ``commit`` and ``discard`` like
        :class:`~lungzarr.pipeline.remote.RemoteStage`: built and computed from a worker).
    decide : callable
        ``decide(patient, stage)`` returns ``"run"``, ``"skip"`` (done
        already: go on to the next stage) or ``"blocked"`` (a stage it needs
        is missing: not run; the next stages decide for themselves).
    batch_size : int
        Patients in flight per stage.
    client : distributed.Client, optional
        Without one, each patient's stage is computed in turn on the current
        dask scheduler (same order, no overlap).
    progress : Progress, optional
        Called with a ``"begin"`` :class:`ProgressEvent` per stage, then one
        event per patient and stage (and, while it computes, its
        :data:`STEPS`: when it started, each z-chunk computed).
    compute_options : dict, optional
        ``compute_options[stage]``: extra keyword arguments of
        ``client.compute`` for that stage (e.g. ``workers=``).
    prefetch : callable, optional
        ``prefetch(patient, payload) -> payload`` for the first stage, called
        for the next ``2 * batch_size`` waiting patients that are due, so
        slow per-patient reads (the DICOM headers) start on the workers
        before the patient's turn; its prepare gets what prefetch returned.
    requires : dict, optional
        ``requires[stage]``: the stages it needs. A patient that fails a
        stage in this run is blocked in every stage that needs it, directly
        or not. Default: each stage needs every earlier one.
    on_leave : callable, optional
        ``on_leave(patient)`` when a patient is through the last stage (done,
        skipped, blocked or failed): the caller drops what it kept of the
        patient, so nothing held per patient grows with the cohort.

    Returns
    -------
    list of StageSummary, one per stage
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    return _Stream(store, list(items), stages, prepare, decide, batch_size, client, progress, compute_options,
                   prefetch, requires, on_leave).run()


def _closure(stage, requires) -> set:
    """Every stage ``stage`` needs, directly or through the stages it needs."""
    out, todo = set(), list(requires.get(stage, ()))
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo.extend(requires.get(s, ()))
    return out


def _raiser(exc):
    def get_result():
        raise exc
    return get_result
