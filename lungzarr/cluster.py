"""Where the dask graphs run: a LocalCluster by default, or an existing cluster.

``--scheduler`` takes ``local`` (a :class:`distributed.LocalCluster` sized to
this machine, dashboard link printed), ``threads`` (no cluster: dask's
threaded scheduler in this process, for debugging and small runs) or the
address of a running scheduler (``tcp://host:8786``).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable

__all__ = ["dask_client", "gpu_worker_count", "default_worker_layout", "worker_environ"]


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
    return environ


@contextmanager
def dask_client(scheduler: str = "local", *, n_workers: int | None = None, threads_per_worker: int | None = None,
                memory_limit: str | None = "auto", echo: Callable[[str], None] = print,
                malloc_trim: bool = False):
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
    """
    if scheduler == "threads":
        echo("scheduler: dask threads in this process (no dashboard)")
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    # Keep the UNet's GPU annotations: low-level fusion would drop them.
    with dask.config.set({"optimization.fuse.active": False,
                          "distributed.nanny.pre-spawn-environ": worker_environ(malloc_trim=malloc_trim)}):
        if scheduler in ("local", None, ""):
            workers, threads = default_worker_layout()
            cluster = LocalCluster(n_workers=n_workers or workers,
                                   threads_per_worker=threads_per_worker or threads,
                                   processes=True, memory_limit=memory_limit, dashboard_address=":0")
            client = Client(cluster)
            echo(f"dask LocalCluster: {len(cluster.workers)} worker(s); dashboard {client.dashboard_link}")
            try:
                yield client
            finally:
                client.close()
                cluster.close()
        else:
            try:
                client = Client(scheduler, timeout="20s")
            except OSError as exc:
                raise OSError(f"cannot reach the dask scheduler at {scheduler!r} ({exc}); start it with "
                              f"`dask scheduler` and at least one `dask worker {scheduler}`, or omit "
                              f"--scheduler to use a local cluster") from exc
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
