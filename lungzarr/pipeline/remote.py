"""A patient's stage built and computed from a worker: the client handles one small future per patient and stage.

Why
    Building a patient's graph (xarray, dask, the ``to_zarr`` metadata writes
    into its group) took most of the client process's CPU: 0.35 CPU-s per
    patient over the whole pipeline on tiny patients, about 7 hours of one
    core for 75,000 scans, a ceiling on how fast the workers may go. On a
    cluster the runner therefore submits one task per patient and stage,
    :func:`stage_task`. It runs the stage's own ``prepare`` on a worker (the
    same code, so the same graph and the same task keys), submits that graph
    to the scheduler from the worker (:func:`distributed.get_client`), so the
    patient's chunk tasks still spread over every worker and a GPU stage's
    network still runs on the GPU workers, and leaves the thread pool
    (:func:`distributed.secede`) while they compute. What comes back is the
    stage record, the stage's warnings and its tasks' time on the workers.
    The client's CPU per patient fell to 0.04 s (``benchmarks/README.md``,
    "The client process off the data path").

What stays on the client
    The decisions (the stage markers, read once per patient), the commit (a
    patient's stage is marked complete by the client, after its result, as
    before: an interrupted run never leaves a stage marked that the client
    did not see finish) and the records of failures and warnings (the root
    attributes have one writer).

Progress
    The task tells the client when the patient's graph is built: a message on
    the chunk topic (:data:`~lungzarr.pipeline.progress.TOPIC`) with its
    number of z-chunks, logged before the graph is submitted (the runner's
    ``"started"`` event); each chunk then reports itself from the worker that
    computed it, as before (:mod:`lungzarr.pipeline.progress`).

Stopping
    A run that stops cancels the tasks it submitted; each :func:`stage_task`
    looks every :data:`WAIT_S` at whether its own task is still wanted and
    cancels the computation it submitted when it is not.
"""
from __future__ import annotations

import dataclasses
import time
import uuid

from lungzarr.pipeline.forget_groups import TASK_KEY_PREFIX

__all__ = ["WAIT_S", "RemoteStage", "stage_task"]

#: Seconds between two looks, while a patient's stage computes, at whether the run still wants it.
WAIT_S = 0.5


class _Cancelled(Exception):
    """The run no longer wants this task (it stopped, or its client left)."""


# ---------------------------------------------------------------------- on a worker

def stage_task(store_path: str, patient: str, stage: str, payload, options, record: dict, compute_options: dict,
               earlier_tokens: tuple = ()) -> dict:
    """On a worker: prepare ``patient``'s ``stage``, compute its graph on the cluster, return what the client needs.

    Parameters
    ----------
    store_path : str
        The store as the client names it (``str(CohortStore.path)``).
    patient, stage : str
    payload
        The first stage's INPUT entry, or what its prefetch returned (resolved here); None for later stages.
    options : StageOptions
    record : dict
        The client's part of the stage record (``depends_on``, the INPUT fingerprint).
    compute_options : dict
        ``client.compute`` options of the patient's graph (``workers=`` of a CPU stage on a GPU cluster).
    earlier_tokens : tuple of str
        Meter tokens (:func:`~lungzarr.pipeline.progress.metered_stage`) of earlier submissions whose tasks'
        time counts in this stage's (the first stage's prefetch).

    Returns
    -------
    dict
        ``record`` (the stage record: prepare's part and what the computation returned), ``warnings``,
        ``seconds`` (the stage's time on the workers' threads, this task's own building included, or
        None when a worker did not answer), ``listing`` (the group's consolidated metadata as JSON
        text: a :class:`~lungzarr.io.store.ListingText`) and, when the stage failed, ``error``: the exception, a
        :class:`~lungzarr.errors.PatientError` unless it stops the run
        (:func:`~lungzarr.pipeline.runner.run_stop_error`).
    """
    from distributed import get_client, get_worker, secede

    from lungzarr.io.store import CohortStore, ListingText
    from lungzarr.pipeline.progress import emit, metered_stage, worker_seconds
    from lungzarr.pipeline.stages import get_stage

    start = time.perf_counter()
    store = CohortStore(store_path, mode="r+")  # made by the run's client: not looked for
    where = {"channel": str(store.path), "stage": stage, "patient": patient}
    try:
        pending = get_stage(stage).prepare(store, patient, payload, options)
    except Exception as exc:
        # What prepare found before it refused the patient (ingest's dropped slices) is still recorded.
        return _failed(exc, store, patient, stage, time.perf_counter() - start, getattr(exc, "warnings", ()))
    pending.record.update(record)
    emit({**where, "prepared": True, "total": getattr(pending, "chunks", None)})
    try:
        client = get_client()
        # One meter token per patient and stage (dask annotations are per thread: other stage tasks of this
        # worker have their own): the workers meter its tasks' time (worker_seconds). No graph optimisation, as
        # the client computed it: low-level fusion would drop the detect stage's per-task GPU annotations.
        with metered_stage(client, stage, patient) as token:
            future = client.compute(pending.delayed, optimize_graph=False, **(compute_options or {}))
    except Exception as exc:  # the graph could not be submitted (the scheduler is going away)
        return _failed(exc, store, patient, stage, time.perf_counter() - start, pending.warnings)
    built = time.perf_counter() - start
    worker = get_worker()
    key = worker.get_current_task()
    # Out of the thread pool while the patient's tasks compute (on this worker too); never back in: what is
    # left (adding up the time, the return) is not worth waiting for a free thread.
    secede()
    try:
        result = _wait(future, worker, key)
    except _Cancelled:
        client.cancel([future])
        raise
    except Exception as exc:
        client.cancel([future])  # its tasks not yet run are not run
        seconds = worker_seconds(client, [token, *earlier_tokens])
        return _failed(exc, store, patient, stage, None if seconds is None else built + seconds, pending.warnings)
    seconds = worker_seconds(client, [token, *earlier_tokens])
    pending.add_record(result)
    # The group's nodes as written, for its listing (consolidated metadata) in the client's commit: read
    # here, so the client reads only the group's own zarr.json. Sent as the listing's JSON text, not as nested
    # dicts (tens of kB by the last stages): distributed sizes, packs and unpacks one string on its way back,
    # and the client splices it into the group's zarr.json without parsing it.
    listing = store._backend.node_metadata(pending.group_path)
    listing.pop(".", None)
    return {"record": pending.record, "warnings": _jsonable_warnings(pending.warnings),
            "seconds": None if seconds is None else built + seconds, "listing": ListingText(listing)}


def _wait(future, worker, key):
    """The result of ``future``; raises _Cancelled as soon as the task ``key`` is no longer wanted.

    A done-callback sets an event this thread waits on, a look at its own
    task's state every :data:`WAIT_S`. Not ``future.result(timeout=)`` in a
    loop: on Python 3.11 its ``asyncio.wait_for`` can end in a CancelledError
    that distributed's ``sync`` turns into an UnboundLocalError (once in about
    200 patient stages of ``benchmarks/control_plane.py``: a patient failed).
    """
    import threading

    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    while not done.wait(WAIT_S):
        task = worker.state.tasks.get(key)
        if task is None or task.state in ("cancelled", "released", "forgotten"):
            raise _Cancelled(f"{key} was cancelled")
    return future.result()


def _failed(exc, store, patient, stage, seconds, warnings) -> dict:
    """The failure as a value (with the time and the warnings a raised error could not carry back): the
    client raises it where the runner takes the result."""
    from lungzarr.pipeline.runner import as_patient_error, run_stop_error

    # Named here, where the traceback is: an unexpected error says where it happened.
    error = exc if run_stop_error(exc, store) is not None else as_patient_error(exc, patient, stage)
    return {"error": error, "seconds": seconds, "warnings": _jsonable_warnings(warnings)}


def _jsonable_warnings(records) -> list[dict]:
    return [{"file": None if r.get("file") is None else str(r["file"]), "reason": str(r.get("reason"))}
            for r in records or ()]


# ---------------------------------------------------------------------- in the client

class RemoteStage:
    """The client's side of a patient's stage computed by :func:`stage_task`.

    What the runner needs of a prepared stage (``patient``, ``submit``,
    ``prepared``, ``outcome``, ``add_record``, ``commit``, ``discard``,
    ``warnings``, ``chunks``, ``future``) with no store access before the
    outcome: one future per patient and stage, a small message, one commit.

    Parameters
    ----------
    store : CohortStore
    patient : str
    stage : Stage
    payload
        See :func:`stage_task`.
    options : StageOptions
    record : dict
        The client's part of the stage record (``depends_on``, the INPUT fingerprint).
    on_warnings : callable, optional
        ``on_warnings(records)``, called with the stage's warnings when its outcome arrives (done or
        failed), for a stage with ``records_warnings``.
    """

    def __init__(self, store, patient: str, stage, payload, options, *, record: dict, on_warnings=None):
        self.store, self.patient, self.stage = store, patient, stage
        self.payload, self.record = payload, dict(record)
        # This patient's label only travels with its task.
        labels = options.labels
        if labels is not None:
            labels = {patient: labels[patient]} if patient in labels else {}
        self.options = dataclasses.replace(options, labels=labels)
        self.on_warnings = on_warnings if stage.records_warnings else None
        self.warnings: list[dict] = []
        self.chunks = None
        self.future = None
        self.committed = None
        self.listing = None  # the group's listing (ListingText), made by the worker that wrote its nodes

    def submit(self, client, compute_options: dict | None = None, earlier_tokens=()):
        """Submit :func:`stage_task`; the patient's graph gets ``compute_options``. Returns the future."""
        compute_options = dict(compute_options or {})
        # The task builds a graph: CPU work, on the workers a CPU stage may use; on a cluster with GPU and
        # CPU-only workers, never a GPU worker's thread.
        cpu = list(self.options.cpu_workers)
        placed = compute_options if compute_options else (
            {"workers": cpu, "allow_other_workers": False} if cpu else {})
        self.future = client.submit(stage_task, str(self.store.path), self.patient, self.stage.name, self.payload,
                                    self.options, self.record, compute_options,
                                    tuple(t for t in earlier_tokens if t is not None),
                                    key=f"{TASK_KEY_PREFIX}{self.stage.name}-{self.patient}-{uuid.uuid4().hex}",
                                    **placed)
        return self.future

    def prepared(self, message: dict) -> None:
        """The worker's message that the patient's graph is built: its number of z-chunks."""
        self.chunks = message.get("total")

    def outcome(self, value: dict):
        """``(get_result, seconds)`` of what :func:`stage_task` returned; ``get_result()`` raises the stage's
        error when it failed. The stage's warnings are recorded here, done or failed."""
        self.warnings = list(value.get("warnings") or [])
        seconds = value.get("seconds")
        error = value.get("error")
        if self.on_warnings is not None:
            try:
                self.on_warnings(self.warnings)
            except Exception as exc:  # a store that refuses the record: raised where the runner takes the result
                error = exc
        if error is not None:

            def get_result():
                raise error
            return get_result, seconds
        record = value.get("record")
        self.listing = value.get("listing")
        return (lambda: record), seconds

    def add_record(self, record) -> None:
        """Take the stage record the worker made (prepare's part, the client's part, what was computed)."""
        if isinstance(record, dict):
            self.record = dict(record)

    def _pending(self):
        from lungzarr.io.store import STAGING_GROUP, PendingStage

        staged = bool(self.stage.creates_patient)
        group = f"{STAGING_GROUP}/{self.patient}" if staged else self.store.group_path(self.patient)
        return PendingStage(self.store, self.patient, self.stage.name, None, self.record, group_path=group,
                            staged=staged)

    def commit(self) -> None:
        """Mark the stage complete (its voxels are written): :meth:`~lungzarr.io.store.PendingStage.commit`."""
        pending = self._pending()
        pending.commit(listing=self.listing)
        self.committed = pending.committed

    def discard(self) -> None:
        """Drop what a failed write left: :meth:`~lungzarr.io.store.PendingStage.discard`."""
        self._pending().discard()
