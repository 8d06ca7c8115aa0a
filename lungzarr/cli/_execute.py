"""The one way a command runs (:func:`_execute`): run-level checks, the cluster, SIGINT/SIGTERM, errors."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from typing import Callable

import typer
from rich.markup import escape

from lungzarr.cli._app import _debug, console
from lungzarr.cli._progress import _progress_display, _seconds
from lungzarr.errors import LungzarrError, RunStopError


# ---------------------------------------------------------------------- the one way a command runs

def _fail(exc: Exception, *, cause: BaseException | None = None):
    """One message and exit code 2; the traceback (of ``cause``, else ``exc``) too with ``--debug``."""
    from lungzarr.io.locations import blank_secrets

    if _debug["on"]:
        sys.stderr.write(blank_secrets("".join(traceback.format_exception(cause or exc))))
    console.print(f"[red]error:[/red] {escape(blank_secrets(str(exc)))}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command: raised once, in the main thread, by :func:`_stop_on_signals`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: Seconds between the tries of an interrupt that arrived while distributed's ``sync`` waited.
INTERRUPT_RETRY_S = 0.05


def _inside_distributed_sync(frame) -> bool:
    """Whether the main thread waits in ``distributed.utils.sync`` (a client call run on its event loop).

    An exception raised there makes distributed schedule a ``cancel`` of a
    future that may not exist yet, which fails with a NameError traceback in
    the event loop's thread (distributed 2025.x).
    """
    tail = os.path.join("distributed", "utils.py")
    while frame is not None:
        if frame.f_code.co_name == "sync" and frame.f_code.co_filename.endswith(tail):
            return True
        frame = frame.f_back
    return False


@contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM stop the command cleanly: the first raises :class:`_Interrupted`, so the
    runner cancels the work in flight and the cluster closes; a second one while that happens stops the
    process at once (the store is then as after a kill: writes are atomic per patient and stage, the next run
    resumes). Outside the main thread (where no handler can be set) nothing changes.

    A signal that arrives while the main thread waits in a dask client call is
    raised a moment later, once the call returned (the signal is sent again to
    this process every :data:`INTERRUPT_RETRY_S` until then).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"signum": None, "raised": False}

    def handler(signum, frame):
        if state["raised"]:
            os.write(2, b"\ninterrupted again: stopping at once; run the same command again to resume\n")
            os._exit(128 + state["signum"])
        state["signum"] = state["signum"] or signum
        if _inside_distributed_sync(frame):
            threading.Timer(INTERRUPT_RETRY_S, os.kill, (os.getpid(), signum)).start()
            return
        state["raised"] = True
        raise _Interrupted(state["signum"])

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Tally:
    """The patients through every stage of a command (done or skipped in its last stage), for the
    sentence of an interrupt. Stages begin in run order, before any patient."""

    def __init__(self):
        self.last, self.total, self.done = None, 0, set()

    def __call__(self, event):
        if event.event == "begin":
            self.last, self.total, self.done = event.stage, event.total or 0, set()
        elif event.stage == self.last and event.event in ("done", "skipped"):
            self.done.add(event.patient)


def _interrupted(signum: int, seconds: float, tally: _Tally):
    """The one sentence of an interrupted command; exit code 128 + the signal's number (130, 143)."""
    text = f"interrupted ({signal.Signals(signum).name}) after {_seconds(seconds)}"
    if tally.last is not None:
        text += f": {len(tally.done)} of {tally.total} patient(s) done"
    console.print(text + "; run the same command again to resume", soft_wrap=True, highlight=False, markup=False)
    # Work the interrupt abandoned (zarr's asynchronous writes of a stage not committed) leaves coroutines
    # that were never awaited; Python would report each one as this process exits ("sys:1: RuntimeWarning").
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    raise typer.Exit(128 + signum)


def _execute(work: Callable, *, scheduler: str | None = None, dashboard_address: str | None = None,
             checks: Callable | None = None, progress: bool = False, errors=(LungzarrError,)):
    """Run ``work(client, progress)``: checks first, then the cluster and the bars; errors → exit 2.

    Parameters
    ----------
    work : callable
        ``work(client, progress)`` calls one library function; ``client`` is
        None without a ``scheduler``, ``progress`` None without ``progress=True``.
    scheduler, dashboard_address : str, optional
        Open a dask cluster (:func:`lungzarr.cluster.dask_client`) around the call.
    checks : callable, optional
        Run-level checks, called before the cluster starts.
    progress : bool
        Show one progress bar per stage on a terminal, one line per patient
        and stage (and a summary line a minute) elsewhere.
    errors : tuple of exception types
        What becomes one message and exit code 2. So does an error of the
        machine (a full disk, a read-only file system, memory, an object store
        that does not answer): one sentence, never a traceback.

    Notes
    -----
    SIGINT (Ctrl-C) and SIGTERM stop the command cleanly (:func:`_stop_on_signals`):
    the work in flight is cancelled, the cluster closed, one sentence says
    how many patients are done, and the exit code is 130 or 143.
    """
    started, tally = time.monotonic(), _Tally()
    try:
        with _stop_on_signals():
            if checks is not None:
                checks()
            if scheduler is None:
                cluster = nullcontext(None)
            else:
                from lungzarr.cluster import dask_client

                cluster = dask_client(scheduler, echo=console.print, dashboard_address=dashboard_address)
            display, callback = _progress_display() if progress else (nullcontext(None), lambda: None)
            with cluster as client, display:
                shown = callback()
                return work(client, None if shown is None else lambda event: (tally(event), shown(event)))
    except KeyboardInterrupt as exc:
        _interrupted(getattr(exc, "signum", signal.SIGINT), time.monotonic() - started, tally)
    except errors as exc:
        _fail(exc)
    except Exception as exc:
        from lungzarr.pipeline.runner import machine_reason

        reason = machine_reason(exc)
        if reason is None:
            raise  # a defect of lungzarr: its traceback is what a report needs
        _fail(RunStopError(reason), cause=exc)


def _run_checks(store, stages, *, weights=None, precision="fp32", scheduler=None, create=True, engine=None):
    def checks():
        from lungzarr.pipeline.checks import check_run_config

        check_run_config(store=store, stages=stages, weights=weights, precision=precision, scheduler=scheduler,
                         create=create, engine=engine)
    return checks


def _read_checks(store, *, scheduler=None):
    """The run-level checks of a command that only reads the store: it exists, the scheduler's spelling."""
    def checks():
        from lungzarr.pipeline.checks import check_scheduler, check_store

        if scheduler is not None:
            check_scheduler(scheduler)
        check_store(store, create=False, write=False)
    return checks


def _gpu_flag(client) -> bool:
    from lungzarr.cluster import gpu_worker_count

    n = gpu_worker_count(client)
    if n:
        console.print(f"{n} GPU worker(s): the UNet runs there only")
    return n > 0


def _stages(store, stages, **options):
    """Later stages on the patients already in the store (segment, detect, nodules+features)."""
    from lungzarr.pipeline import run as run_pipeline

    scheduler, dashboard_address = options.pop("scheduler"), options.pop("dashboard_address")
    summaries = _execute(
        lambda client, progress: run_pipeline(None, store, stages=stages, client=client, gpu=_gpu_flag(client),
                                              progress=progress, **options),
        scheduler=scheduler, dashboard_address=dashboard_address, progress=True,
        checks=_run_checks(store, stages, weights=options.get("weights"),
                           precision=options.get("precision", "fp32"), scheduler=scheduler, create=False,
                           engine=options.get("engine")))
    return summaries
