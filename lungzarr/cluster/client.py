"""The one entry: :func:`dask_client` opens the cluster a run asks for and closes it after."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

from lungzarr.cluster.local import (
    DEFAULT_DASHBOARD_ADDRESS,
    QUIET_CLUSTER_CONFIG,
    WORKER_SETUP,
    _process_scheduler_cluster,
    _quiet_shutdown,
    _without_inherited_malloc_trim,
    default_worker_layout,
    worker_environ,
)
from lungzarr.cluster.worker_logs import _register_quiet_patient_errors
from lungzarr.cluster.remote import CONNECT_TIMEOUT_S, _connect


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


def gpu_worker_count(client) -> int:
    """Workers that advertise a ``GPU`` resource (``dask worker --resources GPU=1``)."""
    from lungzarr.pipeline.placement import gpu_workers

    return len(gpu_workers(client))
