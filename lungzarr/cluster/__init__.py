"""Where the dask graphs run: a LocalCluster by default, or an existing cluster.

``--scheduler`` takes ``local`` (a :class:`distributed.LocalCluster` sized to
this machine, dashboard link printed), ``threads`` (no cluster: dask's
threaded scheduler in this process, for debugging and small runs) or the
address of a running scheduler (``tcp://host:8786``).

The LocalCluster's dashboard listens on the loopback interface only
(:data:`DEFAULT_DASHBOARD_ADDRESS`): it shows file paths and patient ids and
has no login, so it is reached from elsewhere through an SSH tunnel unless
``dashboard_address`` asks for more.

The package's parts: :mod:`~lungzarr.cluster.client` (:func:`dask_client`, the one entry),
:mod:`~lungzarr.cluster.local` (the local cluster: its scheduler process and its workers'
environment), :mod:`~lungzarr.cluster.remote` (reaching an existing scheduler, TLS included)
and :mod:`~lungzarr.cluster.worker_logs` (the workers' filter of expected failures' tracebacks).
"""
from __future__ import annotations

from lungzarr.cluster.client import dask_client, gpu_worker_count
from lungzarr.cluster.local import DEFAULT_DASHBOARD_ADDRESS, SchedulerProcess, default_worker_layout, worker_environ
from lungzarr.cluster.worker_logs import QuietPatientErrors
from lungzarr.cluster.remote import CONNECT_TIMEOUT_S

__all__ = ["dask_client", "gpu_worker_count", "default_worker_layout", "worker_environ",
           "QuietPatientErrors", "SchedulerProcess", "DEFAULT_DASHBOARD_ADDRESS", "CONNECT_TIMEOUT_S"]
