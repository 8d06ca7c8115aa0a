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


# ---------------------------------------------------------------------- the scheduler's own process

def _alive(pid):
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_local_scheduler_runs_in_its_own_process_and_stops_with_the_cluster():
    with dask_client("local", n_workers=1, threads_per_worker=1, echo=lambda s: None) as client:
        pid = client.cluster.scheduler.pid
        assert pid not in (None, os.getpid())
        assert _alive(pid)
        assert client.scheduler_info()["address"].startswith("tcp://127.0.0.1:")
        (worker_pid,) = client.run(os.getpid).values()
        assert worker_pid not in (pid, os.getpid())
        assert client.submit(sum, [1, 2], pure=False).result() == 3
        folder = client.cluster.scheduler.folder
    assert not _alive(pid)
    assert not os.path.exists(folder)


_KILLED_CLIENT = """
import os, sys, time
from lungzarr.cluster import dask_client
if __name__ == "__main__":
    with dask_client("local", n_workers=1, threads_per_worker=1, echo=lambda s: None) as client:
        print(client.cluster.scheduler.folder, client.cluster.scheduler.pid, *client.run(os.getpid).values(),
              flush=True)
        time.sleep(120)
"""


def test_a_killed_client_leaves_no_scheduler_or_worker_behind(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "client.py"
    script.write_text(_KILLED_CLIENT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        folder, *pids = proc.stdout.readline().split()
        pids = [int(p) for p in pids]
        assert len(pids) == 2 and all(_alive(p) for p in pids), pids
        assert Path(folder, "scheduler.json").exists()
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for p in left:  # do not leave them to the next test either
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes {left} outlived their killed client"
    assert not Path(folder).exists(), "the scheduler left its folder behind"
