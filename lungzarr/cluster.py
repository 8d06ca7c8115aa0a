"""Where the dask graphs run: a LocalCluster by default, or an existing cluster.

``--scheduler`` takes ``local`` (a :class:`distributed.LocalCluster` sized to
this machine, dashboard link printed), ``threads`` (no cluster: dask's
threaded scheduler in this process, for debugging and small runs) or the
address of a running scheduler (``tcp://host:8786``).

The LocalCluster's dashboard listens on the loopback interface only
(:data:`DEFAULT_DASHBOARD_ADDRESS`): it shows file paths and patient ids and
has no login, so it is reached from elsewhere through an SSH tunnel unless
``dashboard_address`` asks for more.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from contextlib import contextmanager
from typing import Callable

from distributed.deploy.spec import ProcessInterface
from distributed.diagnostics.plugin import WorkerPlugin

from lungzarr.errors import PatientError, RunConfigError
from lungzarr.model.quiet import quiet_environ, verbose

__all__ = ["dask_client", "gpu_worker_count", "default_worker_layout", "worker_environ",
           "QuietPatientErrors", "SchedulerProcess", "DEFAULT_DASHBOARD_ADDRESS", "CONNECT_TIMEOUT_S"]

#: Where the LocalCluster's dashboard listens: loopback, a free port.
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:0"
#: Seconds to wait for an existing scheduler to answer (and to have a worker) before giving up.
CONNECT_TIMEOUT_S = 5.0
#: dask settings of the processes lungzarr's own LocalCluster starts (and of this client). Every
#: distributed process wakes 50 times a second to check its event loop (``tick``) and each worker
#: samples its running threads' stacks every 10 ms for the dashboard's profile page: an idle
#: 2-worker cluster cost 3.3-3.5 CPU-s per 30 s on the 2-core benchmark machine, 1.1-1.2 with these
#: (benchmarks/README.md, "Whole scans"). A blocked event loop is still reported (after 3 s);
#: the dashboard's profile page stays empty.
QUIET_CLUSTER_CONFIG = {"distributed.admin.tick.interval": "1s", "distributed.worker.profile.enabled": False}


def _patient_error_names() -> set[str]:
    names, todo = set(), [PatientError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def _machine_error_names() -> set[str]:
    """The builtin OSError classes (``OSError``, ``PermissionError``, ...)."""
    names, todo = set(), [OSError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == "builtins":
            names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class _DropPatientErrorFailures(logging.Filter):
    """Drop distributed's "Compute Failed" record when the task raised a lungzarr PatientError,
    or an error of the machine: an OSError with an errno (a full disk...) or a MemoryError.

    A PatientError is an expected, recorded failure of one patient (the run's
    summary and the store's failures table show it); an error of the machine
    gets its own one-sentence message (:func:`lungzarr.errors.environment_reason`:
    the patient's failure, or the run's stop). Any other exception of a task
    still logs its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Compute Failed"):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        # distributed logs (key, state, task, repr(exception), traceback); repr starts with the class name.
        text = str(args[3]) if len(args) > 3 else ""
        name = text.split("(", 1)[0]
        if name in _machine_error_names():
            return not re.match(r"\w+\(\d+, ", text)  # OSError(28, 'No space left on device'): an errno
        return name not in _patient_error_names() | {"MemoryError"}


_FILTER = _DropPatientErrorFailures()


class QuietPatientErrors(WorkerPlugin):
    """Worker plugin: install :class:`_DropPatientErrorFailures` on the worker's ``distributed.worker`` logger."""

    name = "lungzarr-quiet-patient-errors"

    def setup(self, worker):
        logger = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _DropPatientErrorFailures) for f in logger.filters):
            logger.addFilter(_FILTER)


def _register_quiet_patient_errors(client, echo: Callable[[str], None] = print) -> None:
    # Registered on the scheduler: workers that join later get it too.
    try:
        client.register_plugin(QuietPatientErrors(), name=QuietPatientErrors.name)
    except Exception as exc:  # workers with another lungzarr: the run goes on, only noisier
        try:
            client.unregister_worker_plugin(QuietPatientErrors.name)
        except Exception:
            pass
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        echo(f"note: the workers cannot load lungzarr's log filter ({first}); is the same lungzarr installed "
             f"there? A patient's failure will also print distributed's 'Compute Failed' traceback on them")


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


def _process_scheduler_cluster(*, n_workers: int, threads_per_worker: int, memory_limit, dashboard_address):
    """A SpecCluster: a :class:`SchedulerProcess` and ``n_workers`` Nanny workers, as LocalCluster makes them."""
    from distributed import Nanny, SpecCluster
    from distributed.security import Security

    # What LocalCluster(processes=True) gives each Nanny, on loopback like its scheduler.
    worker = {"cls": Nanny, "options": {"host": "127.0.0.1", "nthreads": threads_per_worker,
                                        "memory_limit": memory_limit, "services": {}, "dashboard": False,
                                        "dashboard_address": None, "interface": None, "protocol": "tcp://",
                                        "security": Security(), "silence_logs": logging.WARN,
                                        "preload": [WORKER_SETUP]}}
    return SpecCluster(scheduler={"cls": SchedulerProcess,
                                  "options": {"host": "127.0.0.1", "dashboard_address": dashboard_address}},
                       workers={i: worker for i in range(n_workers)}, worker=worker,
                       silence_logs=logging.WARN, name="lungzarr")


@contextmanager
def dask_client(scheduler: str = "local", *, n_workers: int | None = None, threads_per_worker: int | None = None,
                memory_limit: str | None = "auto", echo: Callable[[str], None] = print,
                malloc_trim: bool = False, dashboard_address: str | None = None,
                connect_timeout: float = CONNECT_TIMEOUT_S, scheduler_process: bool = True):
    """Yield a ``distributed.Client`` (or None for ``scheduler='threads'``).

    Parameters
    ----------
    scheduler : str
        ``"local"``, ``"threads"`` or a scheduler address.
    n_workers, threads_per_worker : int, optional
        LocalCluster size; default one single-threaded worker per core.
    memory_limit : str, optional
        Per-worker memory limit of the LocalCluster.
    echo : callable
        Where the dashboard link is printed.
    malloc_trim : bool
        Start LocalCluster workers with distributed's ``MALLOC_TRIM_THRESHOLD_``
        (see :func:`worker_environ`; slower, kept for benchmarks). An existing
        cluster keeps the environment its workers were started with.
    dashboard_address : str, optional
        Where the LocalCluster's dashboard listens; default
        :data:`DEFAULT_DASHBOARD_ADDRESS` (loopback only). ``":8787"`` listens
        on every interface. An existing scheduler keeps its own.
    connect_timeout : float
        Seconds an existing scheduler has to answer and to have a worker.
    scheduler_process : bool
        Run the local cluster's scheduler in its own process (default; see
        :class:`SchedulerProcess`). False keeps it in this process, as a plain
        ``LocalCluster`` does (for comparison in benchmarks).

    Raises
    ------
    RunConfigError
        ``scheduler`` is misspelt, does not answer within ``connect_timeout``
        or has no worker.

    Notes
    -----
    Workers get :class:`QuietPatientErrors`: a task that raises a
    :class:`~lungzarr.errors.PatientError` does not print distributed's
    "Compute Failed" traceback (the failure is in the run's summary).
    """
    from lungzarr.pipeline.checks import check_scheduler

    scheduler = check_scheduler(scheduler)
    if scheduler == "threads":
        echo("scheduler: dask threads in this process (no dashboard)")
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    trim_default = worker_environ(malloc_trim=True).get("MALLOC_TRIM_THRESHOLD_")
    # Keep the UNet's GPU annotations: low-level fusion would drop them.
    with dask.config.set({"optimization.fuse.active": False, **QUIET_CLUSTER_CONFIG,
                          "distributed.nanny.pre-spawn-environ": worker_environ(malloc_trim=malloc_trim)}):
        if scheduler in ("local", None, ""):
            workers, threads = default_worker_layout()
            with _without_inherited_malloc_trim(malloc_trim, trim_default):
                if scheduler_process:
                    cluster = _process_scheduler_cluster(
                        n_workers=n_workers or workers, threads_per_worker=threads_per_worker or threads,
                        memory_limit=memory_limit, dashboard_address=dashboard_address or DEFAULT_DASHBOARD_ADDRESS)
                else:
                    cluster = LocalCluster(n_workers=n_workers or workers,
                                           threads_per_worker=threads_per_worker or threads,
                                           processes=True, memory_limit=memory_limit,
                                           dashboard_address=dashboard_address or DEFAULT_DASHBOARD_ADDRESS,
                                           preload=[WORKER_SETUP])
            client = Client(cluster)
            _register_quiet_patient_errors(client, echo)
            echo(f"dask LocalCluster: {len(cluster.workers)} worker(s); dashboard {client.dashboard_link}")
            try:
                yield client
            finally:
                # The client first (it stops asking for the workers), then the cluster, quietly.
                with _quiet_shutdown():
                    client.close()
                    cluster.close()
        else:
            if dashboard_address is not None:
                echo(f"note: --dashboard-address applies to a local cluster only; the scheduler at "
                     f"{scheduler} serves its dashboard where `dask scheduler --dashboard-address` put it")
            client = _connect(scheduler, connect_timeout)
            _register_quiet_patient_errors(client, echo)
            n = len(client.scheduler_info().get("workers", {}))
            echo(f"dask scheduler {scheduler}: {n} worker(s); dashboard {client.dashboard_link}")
            try:
                yield client
            finally:
                client.close()


def _unreachable(scheduler, why) -> RunConfigError:
    return RunConfigError(f"cannot reach the dask scheduler at {scheduler!r} ({why}); start it with `dask "
                          f"scheduler` and at least one `dask worker {scheduler}`, or omit --scheduler to use a "
                          f"local cluster")


def _identity(address: str, timeout: float, connection_args: dict | None = None) -> dict:
    """Ask ``address`` who it is over dask's protocol, within ``timeout`` seconds in all.

    Runs its own event loop in a daemon thread, so it also works where a loop
    is running (a notebook) and a peer that never answers cannot hold the run.
    ``connection_args`` (``Security.get_connection_args("client")``) carry the
    TLS context a ``tls://`` address needs.
    """
    import asyncio
    import threading

    from distributed.comm import connect

    async def ask():
        comm = await connect(address, timeout=timeout, **(connection_args or {}))
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    box = {}

    def target():
        try:
            box["reply"] = asyncio.run(asyncio.wait_for(ask(), timeout))
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="lungzarr-scheduler-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["reply"]


#: The settings a ``tls://`` scheduler needs on the client side, as dask's config keys and environment variables.
_TLS_SETTINGS = ("distributed.comm.tls.ca-file, distributed.comm.tls.client.cert and "
                 "distributed.comm.tls.client.key in dask's config (or the environment variables "
                 "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
                 "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY)")


def _client_security(scheduler: str):
    """The ``distributed.Security`` dask's config gives a client of ``scheduler``, and its connection args.

    The same one ``distributed.Client`` would pick (a configured
    ``distributed.client.security-loader`` first, else ``distributed.comm.tls.*``),
    so the probe and the Client use one set of credentials.
    """
    from distributed.security import Security

    security = None
    try:
        from distributed.client import _maybe_call_security_loader  # private; absent in some versions
    except ImportError:
        _maybe_call_security_loader = None
    try:
        if _maybe_call_security_loader is not None:
            security = _maybe_call_security_loader(scheduler)
        security = security or Security()
        return security, security.get_connection_args("client")
    except (OSError, ValueError) as exc:  # a configured file that is missing or not a certificate/key
        import dask

        named = {key: dask.config.get(f"distributed.comm.tls.{key}", None)
                 for key in ("ca-file", "client.cert", "client.key")}
        missing = [f"distributed.comm.tls.{key} = {path!r}" for key, path in named.items()
                   if path and not os.path.isfile(path)]
        what = f"no such file: {', '.join(missing)}" if missing else (getattr(exc, "strerror", None) or str(exc))
        raise RunConfigError(f"cannot load the TLS files dask's config names for the client of {scheduler!r} "
                             f"({what}); check {_TLS_SETTINGS}") from None


def _connect(scheduler: str, timeout: float):
    """A Client of the scheduler at ``scheduler``, or RunConfigError within about ``timeout`` seconds.

    A ``tls://`` scheduler is reached with the client certificate dask's
    config names (:data:`_TLS_SETTINGS`); without one, or with one the
    scheduler does not accept, the error says which settings to fix.
    """
    import dask
    from distributed import Client
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port
    from distributed.comm.core import FatalCommClosedError

    try:
        protocol, location = parse_address(scheduler)
    except ValueError as exc:
        raise _unreachable(scheduler, exc) from None
    if protocol in ("tcp", "tls"):
        # A refused or unresolvable address answers at once; distributed would retry it until its timeout.
        try:
            host, port = parse_host_port(location)
            socket.create_connection((host, port), timeout=timeout).close()
        except (OSError, ValueError, TypeError) as exc:
            raise _unreachable(scheduler, getattr(exc, "strerror", None) or exc) from None
    security, connection_args = _client_security(scheduler)
    if protocol == "tls" and connection_args.get("ssl_context") is None:
        raise RunConfigError(f"the dask scheduler at {scheduler!r} speaks TLS, and this client has no TLS "
                             f"certificate; set {_TLS_SETTINGS} to the CA file and the client certificate and "
                             f"key that the scheduler's CA signed")
    try:
        reply = _identity(scheduler, timeout, connection_args)
    except FatalCommClosedError as exc:  # the TLS handshake failed: distributed does not retry it
        if protocol != "tls":
            raise _unreachable(scheduler, exc) from None
        raise _tls_refused(scheduler, exc) from None
    except (OSError, TimeoutError) as exc:
        if protocol == "tls" and not isinstance(exc, TimeoutError):
            # TLS 1.3 checks the client's certificate after the handshake: a refused one reads as a closed comm.
            raise _tls_refused(scheduler, exc) from None
        if protocol == "tcp" and "reset by peer" in str(exc):
            # It took the connection and dropped it at the first message: a TLS scheduler does that.
            raise RunConfigError(f"the dask scheduler at {scheduler!r} took the connection and reset it; if it was "
                                 f"started with --tls-ca-file/--tls-cert/--tls-key, pass "
                                 f"tls://{location} and set {_TLS_SETTINGS}") from None
        raise _unreachable(scheduler, str(exc) or f"no answer within {timeout:g} s") from None
    except Exception as exc:  # something listens there, but does not speak dask's protocol
        raise RunConfigError(f"{scheduler!r} answers, but not as a dask scheduler ({type(exc).__name__}); pass "
                             f"the address `dask scheduler` printed (its port, 8786 by default, not the "
                             f"dashboard's)") from None
    kind = reply.get("type") if isinstance(reply, dict) else None
    if kind != "Scheduler":
        raise RunConfigError(f"{scheduler!r} is a dask {kind or 'peer'}, not the scheduler; pass the address "
                             f"`dask scheduler` printed")
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": f"{timeout}s"}):
            client = Client(scheduler, timeout=f"{timeout}s", security=security)
    except (OSError, TimeoutError) as exc:
        raise _unreachable(scheduler, exc) from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError):
        client.close()
        raise RunConfigError(f"the dask scheduler at {scheduler!r} has no worker (waited {timeout:g} s); start "
                             f"one with `dask worker {scheduler}`") from None
    return client


def _tls_refused(scheduler: str, exc: BaseException) -> RunConfigError:
    import re

    cause = exc.__cause__ or exc.__context__
    found = re.search(r"\[SSL: (\w+)\]", str(exc))
    detail = (getattr(cause, "reason", None) or (found and found.group(1)) or str(exc) or type(exc).__name__)
    return RunConfigError(f"the TLS handshake with the dask scheduler at {scheduler!r} failed ({detail}); check "
                          f"that {_TLS_SETTINGS} name the CA that signed the scheduler's certificate and a client "
                          f"certificate and key that CA signed")


def gpu_worker_count(client) -> int:
    """Workers that advertise a ``GPU`` resource (``dask worker --resources GPU=1``)."""
    from lungzarr.pipeline.placement import gpu_workers

    return len(gpu_workers(client))
