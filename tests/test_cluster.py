"""The LocalCluster lungzarr starts: worker environment and layout."""
from __future__ import annotations

import os

import pytest

from lungzarr.cluster import dask_client, default_worker_layout, worker_environ


def _environ_keys():
    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}


def test_worker_environ_drops_malloc_trim_threshold_and_keeps_single_threaded_blas():
    env = worker_environ()
    assert "MALLOC_TRIM_THRESHOLD_" not in env
    assert str(env.get("OMP_NUM_THREADS")) == "1"
    assert "MALLOC_TRIM_THRESHOLD_" in worker_environ(malloc_trim=True)


@pytest.mark.skipif(os.environ.get("MALLOC_TRIM_THRESHOLD_", "65536") != "65536",
                    reason="MALLOC_TRIM_THRESHOLD_ is set to a value of the user's in this process; workers inherit it")
@pytest.mark.parametrize("malloc_trim", [False, True])
def test_local_cluster_workers_start_with_lungzarr_environment(malloc_trim):
    # distributed leaves its MALLOC_TRIM_THRESHOLD_=65536 in os.environ once any LocalCluster started
    # processes (other tests do): lungzarr's cluster must not hand it on.
    with dask_client("local", n_workers=1, threads_per_worker=1, echo=lambda s: None,
                     malloc_trim=malloc_trim) as client:
        (env,) = client.run(_environ_keys).values()
    assert env["OMP_NUM_THREADS"] == "1"
    assert (env["MALLOC_TRIM_THRESHOLD_"] is not None) == malloc_trim


def test_default_layout_is_one_single_threaded_worker_per_core():
    assert default_worker_layout(16) == (16, 1)
    assert default_worker_layout(0) == (1, 1)
