"""The local cluster: its scheduler in a process of its own, and the environment its workers start with."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from distributed.deploy.spec import ProcessInterface

from lungzarr.model.quiet import quiet_environ, verbose

#: Where the LocalCluster's dashboard listens: loopback, a free port.
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:0"
#: dask settings of the processes lungzarr's own LocalCluster starts (and of this client). Every
#: distributed process wakes 50 times a second to check its event loop (``tick``) and each worker
#: samples its running threads' stacks every 10 ms for the dashboard's profile page: an idle
#: 2-worker cluster cost 3.3-3.5 CPU-s per 30 s on the 2-core benchmark machine, 1.1-1.2 with these
#: (benchmarks/README.md, "Whole scans"). A blocked event loop is still reported (after 3 s);
#: the dashboard's profile page stays empty.
QUIET_CLUSTER_CONFIG = {"distributed.admin.tick.interval": "1s", "distributed.worker.profile.enabled": False}


def default_worker_layout(n_cores: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) for this machine: one single-threaded process per core.

    Processes, not threads: the HU decode, spline and segmentation code holds
    the GIL for part of its time, and each process keeps one model copy.
    """
    if n_cores is None:
        n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(n_cores)), 1


def worker_environ(*, malloc_trim: bool = False) -> dict:
    """The environment LocalCluster worker processes start with.

    distributed's default sets ``MALLOC_TRIM_THRESHOLD_=65536``. Setting it at
    all switches off glibc's dynamic mmap threshold, so every temporary array
    above 128 KiB (each 2 mm slice's float64 scratch arrays in the
    segmentation) is a fresh ``mmap`` with its pages faulted in again: the
    segmentation loop takes 1.3x the CPU-seconds of the same loop in a plain
    Python process (``python -m benchmarks stages --compare-worker-env``
    measures it). lungzarr drops that variable and keeps the others
    (single-threaded BLAS/OpenMP per worker).

    Parameters
    ----------
    malloc_trim : bool
        Keep distributed's ``MALLOC_TRIM_THRESHOLD_`` (for comparison).
    """
    import dask
    import distributed  # noqa: F401  (registers distributed's config defaults)

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    if not malloc_trim:
        environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    # TensorFlow/absl/gRPC start-up banners off in the workers too, where the user has not set them
    # (LUNGZARR_VERBOSE=1, `lungzarr -v`, keeps them).
    environ.update(quiet_environ())
    return environ


@contextmanager
def _quiet_shutdown():
    """Closing a cluster without distributed.nanny's "still alive after 4.0 seconds, killing" warning.

    A worker that has imported TensorFlow takes a few seconds to exit (its
    thread pools); the nanny then ends it, which is what closing asks for, and
    nothing is lost (every patient's stage is committed before the cluster
    closes). The warning is kept with ``lungzarr -v``; errors are kept always.
    """
    if verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in ("distributed.nanny", "distributed.process")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def _without_inherited_malloc_trim(malloc_trim: bool, default):
    """Start workers without the ``MALLOC_TRIM_THRESHOLD_`` an earlier LocalCluster left in this process.

    distributed puts its pre-spawn environment into the parent's ``os.environ``
    when it starts worker processes, and leaves it there, so a second cluster's
    workers (a notebook's, a test's) would inherit the slow setting. A value a
    user set differently is kept.
    """
    inherited = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    drop = not malloc_trim and inherited is not None and inherited == str(default)
    if drop:
        os.environ.pop("MALLOC_TRIM_THRESHOLD_")
    try:
        yield
    finally:
        if drop:
            os.environ["MALLOC_TRIM_THRESHOLD_"] = inherited


#: A dask preload (the text of a module) run in each local worker process as it starts. Ctrl-C sends SIGINT
#: to every process of the terminal's group (a batch system's SIGTERM often goes to every process of the
#: job); only the lungzarr process acts on them: it cancels the work, then closes the workers (the nanny's
#: stop message, then SIGKILL), so a worker neither dies mid-task (a KeyboardInterrupt traceback, a leaked
#: semaphore) nor is restarted. A worker whose parent is gone exits by itself (distributed watches a pipe).
#: Closing a worker whose task is still running (a stopped run) logs "Async instruction ... ended with
#: CancelledError", and its heartbeat may still reach for the scheduler that closed a moment before it
#: ("Failed to communicate with scheduler during heartbeat", a traceback). This cluster's scheduler is a
#: child of the lungzarr process and ends only when it closes the cluster (or dies itself, and then its
#: client says so), so both are closing noise here: hidden unless ``lungzarr -v``.
WORKER_SETUP = """
import logging, os, signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _ClosingNoise(logging.Filter):
    def filter(self, record):
        text = record.getMessage()
        return not ((text.startswith("Async instruction for") and text.endswith("ended with CancelledError"))
                    or text.startswith("Failed to communicate with scheduler during heartbeat"))


if os.environ.get("LUNGZARR_VERBOSE", "").strip() in ("", "0", "false", "no"):
    for name in ("distributed.worker.state_machine", "distributed.worker"):
        logging.getLogger(name).addFilter(_ClosingNoise())
    # The state machine's warnings are all of this kind (its errors stay): a level holds where a filter
    # could be dropped by a logging set-up of the worker's after this preload.
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)
"""

#: Runs ``dask scheduler`` in the child process; stdin is a pipe that only the parent holds open.
_SCHEDULER_LAUNCHER = """
import json, logging, os, shutil, signal, sys, threading, time

# The parent's import path, as multiprocessing gives its children: the scheduler unpickles the graphs.
sys.path[:] = json.loads(os.environ.pop("LUNGZARR_SCHEDULER_SYS_PATH", "null")) or sys.path
FOLDER = os.environ.pop("LUNGZARR_SCHEDULER_FOLDER", "")

def _watch_parent():
    # EOF on stdin: the parent closed the pipe or ended (even by SIGKILL); close cleanly, or go anyway.
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except Exception:
        pass
    # A killed parent cannot remove the folder of the scheduler file and log: this process does.
    if FOLDER:
        shutil.rmtree(FOLDER, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10.0)
    os._exit(1)

threading.Thread(target=_watch_parent, name="lungzarr-parent-watch", daemon=True).start()
from distributed.cli.dask_scheduler import main
logging.getLogger("distributed").setLevel(logging.WARNING)
main(sys.argv[1:], prog_name="dask scheduler")
"""


class SchedulerProcess(ProcessInterface):
    """The local cluster's scheduler as a child process (``dask scheduler``), for :class:`distributed.SpecCluster`.

    The client process builds the graphs and commits each patient's stage; a
    scheduler in the same process shares its GIL, and at 16 workers the
    scheduler's own work plus the nannies' heartbeats took most of one core.
    In its own process the scheduler has a core of its own.

    The child listens on ``host`` only, serves its dashboard at
    ``dashboard_address`` and gets this process's dask configuration. It
    stops when the cluster closes and, if this process dies without closing
    it (killed), when the pipe on its stdin reaches EOF: no orphan is left.

    Parameters
    ----------
    host : str
        Interface of the scheduler's port (a free port is taken).
    dashboard_address : str or None
        ``host:port`` of the dashboard; None: no dashboard.
    start_timeout : float
        Seconds the child has to write its address.

    Attributes
    ----------
    folder : str or None
        The temporary folder of its scheduler file and log (removed when it stops).
    """

    def __init__(self, *, host: str = "127.0.0.1", dashboard_address: str | None = DEFAULT_DASHBOARD_ADDRESS,
                 start_timeout: float = 60.0):
        super().__init__()
        self.host, self.dashboard_address, self.start_timeout = host, dashboard_address, float(start_timeout)
        self.proc = None
        self.folder = None

    @property
    def pid(self) -> int | None:
        """The scheduler process's id (None before it started)."""
        return self.proc.pid if self.proc is not None else None

    def _command(self, scheduler_file: str) -> list[str]:
        import sys

        dashboard = (["--dashboard-address", self.dashboard_address] if self.dashboard_address
                     else ["--no-dashboard"])
        return [sys.executable, "-c", _SCHEDULER_LAUNCHER, "--host", self.host, "--port", "0",
                "--scheduler-file", scheduler_file, *dashboard]

    async def start(self):
        import asyncio
        import json
        import subprocess
        import sys
        import tempfile
        import time

        import dask

        self.folder = tempfile.mkdtemp(prefix="lungzarr-scheduler-")
        scheduler_file = os.path.join(self.folder, "scheduler.json")
        log_path = os.path.join(self.folder, "scheduler.log")
        env = {**os.environ, "DASK_INTERNAL_INHERIT_CONFIG": dask.config.serialize(dask.config.global_config),
               "LUNGZARR_SCHEDULER_SYS_PATH": json.dumps([os.path.abspath(p) for p in sys.path]),
               "LUNGZARR_SCHEDULER_FOLDER": self.folder}
        with open(log_path, "wb") as log:
            # The child's stderr goes to a file: its start-up lines are noise, its failure is shown below.
            # Its own session: Ctrl-C (SIGINT to the terminal's process group) reaches this process only,
            # which cancels the work and closes the cluster; a scheduler gone first would make that close wait.
            self.proc = subprocess.Popen(self._command(scheduler_file), stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the dask scheduler process exited with status {self.proc.returncode} before "
                                   f"it listened: {self._log_tail()}")
            try:
                with open(scheduler_file) as f:
                    self.address = json.load(f)["address"]
                break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                self._kill()
                raise RuntimeError(f"the dask scheduler process did not listen within {self.start_timeout:g} s: "
                                   f"{self._log_tail()}")
            await asyncio.sleep(0.02)
        await super().start()

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.folder, "scheduler.log"), errors="replace") as f:
                lines = [line.rstrip() for line in f if line.strip()]
        except OSError:
            lines = []
        return " | ".join(lines[-5:]) or "no output"

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def close(self):
        import asyncio
        import shutil
        import time

        if self.proc is not None:
            # The cluster has already asked it to terminate; EOF on stdin asks again, then it is killed.
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            deadline = time.monotonic() + 10.0
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            self._kill()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        await super().close()


#: Seconds between two looks of a local worker's nanny at its worker's memory (distributed's default: 0.1).
#: Each look costs this process ~0.35 ms of CPU: at 0.5 s, two nannies took ~1.5 ms a second, a quarter of
#: the run's client CPU per patient at ~3 s of wall per patient (``benchmarks/README.md``).
NANNY_MEMORY_CHECK_S = 1.0


def _nanny_class():
    """:class:`distributed.Nanny` without the system monitor every distributed server runs.

    The nannies of a local cluster live in lungzarr's own process (each
    starts one worker process and watches its memory). Each also sampled
    this process's CPU, memory, disk and network counters twice a second for
    a dashboard that never shows them (a worker's own monitor, in the
    worker's process, is what it shows): with 16 workers, 32 psutil samples
    a second, most of the client's 0.13 CPU-s per second while it waited
    (``benchmarks/results/control_plane_whole.json``). The memory watch that
    restarts a worker above its limit (95 %) is kept, every
    :data:`NANNY_MEMORY_CHECK_S` instead of 0.1 s: it is the last resort, the
    worker's own watch (every 0.1 s, in its process) spills at 70 % and
    pauses it at 80 % first.
    """
    from distributed import Nanny

    class _Nanny(Nanny):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.periodic_callbacks.pop("monitor", None)  # started with the others, so never started
            watch = self.periodic_callbacks.get("memory_monitor")
            if watch is not None:
                watch.callback_time = max(watch.callback_time, NANNY_MEMORY_CHECK_S * 1000)

    return _Nanny


#: Seconds between two copies of the cluster's description (its name and type, for a client or dashboard that
#: looks) sent to the scheduler; distributed's default 1 s cost this process ~0.35 ms of CPU a second.
CLUSTER_INFO_SYNC_S = 10


def _process_scheduler_cluster(*, n_workers: int, threads_per_worker: int, memory_limit, dashboard_address):
    """A SpecCluster: a :class:`SchedulerProcess` and ``n_workers`` Nanny workers, as LocalCluster makes them."""
    from distributed import SpecCluster
    from distributed.security import Security

    # What LocalCluster(processes=True) gives each Nanny, on loopback like its scheduler.
    worker = {"cls": _nanny_class(), "options": {"host": "127.0.0.1", "nthreads": threads_per_worker,
                                        "memory_limit": memory_limit, "services": {}, "dashboard": False,
                                        "dashboard_address": None, "interface": None, "protocol": "tcp://",
                                        "security": Security(), "silence_logs": logging.WARN,
                                        "preload": [WORKER_SETUP]}}
    return SpecCluster(scheduler={"cls": SchedulerProcess,
                                  "options": {"host": "127.0.0.1", "dashboard_address": dashboard_address}},
                       workers={i: worker for i in range(n_workers)}, worker=worker,
                       silence_logs=logging.WARN, name="lungzarr",
                       scheduler_sync_interval=CLUSTER_INFO_SYNC_S)
