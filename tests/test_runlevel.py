"""Run-level checks (issue 13): one message and exit code 2, before any patient; --debug shows the traceback.

Weights, precision, scheduler and store are the same for every patient: a
mistake in one of them stops the run once, up front, instead of failing every
patient after the cohort was ingested and segmented.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lungzarr.cli import app
from lungzarr.cluster import dask_client
from lungzarr.errors import RunConfigError
from lungzarr.model.d8 import WEIGHTS_SHA256
from lungzarr.pipeline import ingest, run
from lungzarr.pipeline.checks import check_run_config, check_store

from conftest import free_port
from dicom_phantoms import make_patient

REPO = Path(__file__).resolve().parents[1]


def _flat(text: str) -> str:
    return "".join(text.split())



@pytest.fixture
def cohort(tmp_path):
    root = tmp_path / "input"
    make_patient(root / "P1", seed=1)
    return root, tmp_path / "cohort.zarr"


@pytest.fixture
def bad_weights(tmp_path):
    path = tmp_path / "d8_copy.h5"
    path.write_bytes(b"not the d8 weights\n")
    return path


def _invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def _assert_run_level(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    out = _flat(result.output)
    assert out.startswith(_flat("error:")), result.output       # one message, nothing before it
    for fragment in fragments:
        assert _flat(fragment) in out, result.output


# ---------------------------------------------------------------------- weights and precision

def test_wrong_weights_stop_run_before_any_patient(cohort, bad_weights):
    root, store = cohort
    result = _invoke("run", root, store, "--weights", bad_weights, "--scheduler", "threads")
    _assert_run_level(result, f"d8 weights file '{bad_weights}' has sha256", f"expected {WEIGHTS_SHA256}")
    assert not store.exists()                                  # no patient was read, nothing written
    with pytest.raises(RunConfigError, match="has sha256"):
        run(root, store, weights=bad_weights)
    assert not store.exists()


def test_wrong_weights_are_checked_before_the_cluster_starts(cohort, bad_weights):
    root, store = cohort
    # Nothing listens on this port: the weights' message, not the scheduler's, proves the order.
    result = _invoke("run", root, store, "--weights", bad_weights, "--scheduler", f"tcp://127.0.0.1:{free_port()}")
    _assert_run_level(result, "has sha256")


def test_weights_are_checked_only_by_commands_that_detect(cohort, bad_weights):
    root, store = cohort
    assert ingest(root, store, chunk_slices=4).done == ["P1"]
    env = {"LUNGZARR_WEIGHTS": str(bad_weights)}
    _assert_run_level(_invoke("detect", store, "--scheduler", "threads", env=env), "has sha256")
    seg = _invoke("segment", store, "--scheduler", "threads", "--chunk-slices", "4", env=env)
    assert seg.exit_code == 0, seg.output
    missing = bad_weights.with_name("gone.h5")
    with pytest.raises(RunConfigError, match="does not exist"):
        run(None, store, stages=["detect"], weights=missing)
    assert check_run_config(store=store, stages=["segment"], weights=missing) == {"store": store}


def test_precision_is_a_choice(cohort):
    root, store = cohort
    result = _invoke("run", root, store, "--precision", "fp8", "--scheduler", "threads")
    assert result.exit_code == 2
    assert "fp8" in result.output and "fp32" in result.output and "Traceback" not in result.output
    with pytest.raises(RunConfigError, match="precision 'fp8' is not one of fp32, bf16, fp16"):
        run(root, store, precision="fp8")
    assert not store.exists()


# ---------------------------------------------------------------------- the scheduler

def test_unreachable_scheduler_fails_in_seconds_with_one_sentence(cohort):
    root, store = cohort
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lungzarr.cli", "ingest", str(root), str(store),
                           "--scheduler", address], capture_output=True, text=True, env=env, timeout=60)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert seconds < 10, seconds                              # interpreter start included
    assert "Traceback" not in proc.stderr
    assert _flat(f"error: cannot reach the dask scheduler at '{address}'") in _flat(proc.stderr)
    assert _flat(f"at least one `dask worker {address}`") in _flat(proc.stderr)
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    assert not store.exists()


def test_misspelt_scheduler(cohort):
    root, store = cohort
    _assert_run_level(_invoke("ingest", root, store, "--scheduler", "lcoal"),
                      "--scheduler 'lcoal' is not 'local', 'threads' or a dask scheduler address")


def test_scheduler_without_workers_is_refused():
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        start = time.perf_counter()
        with pytest.raises(RunConfigError, match="has no worker .*start one with `dask worker"):
            with dask_client(cluster.scheduler_address, echo=lambda s: None, connect_timeout=1.0):
                pass
        assert time.perf_counter() - start < 5


# ---------------------------------------------------------------------- the store

def test_store_that_is_a_file(cohort):
    root, store = cohort
    store.write_text("not a store\n")
    _assert_run_level(_invoke("ingest", root, store, "--scheduler", "threads"),
                      f"store '{store}' is a file, not a lungzarr store (a folder)")
    _assert_run_level(_invoke("segment", store, "--scheduler", "threads"), "is a file")
    assert store.read_text() == "not a store\n"


def test_store_that_is_another_non_empty_folder(cohort):
    root, store = cohort
    store.mkdir()
    (store / "thesis.docx").write_bytes(b"x")
    _assert_run_level(_invoke("ingest", root, store, "--scheduler", "threads"),
                      "is a folder that is not a lungzarr store and is not empty")
    assert sorted(p.name for p in store.iterdir()) == ["thesis.docx"]
    empty = store.parent / "empty.zarr"
    empty.mkdir()
    assert ingest(root, empty, chunk_slices=4).done == ["P1"]  # an empty folder becomes the store


@contextmanager
def _read_only(folder: Path):
    """Make ``folder`` read-only for this process: chmod, or for root (whom chmod does not stop) chattr +i."""
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root without chattr +i: cannot make a read-only folder")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_store_with_nothing_to_do(cohort):
    root, store = cohort
    assert ingest(root, store, chunk_slices=4).done == ["P1"]
    with _read_only(store):
        result = _invoke("ingest", root, store, "--scheduler", "threads")
        _assert_run_level(result, f"store '{store}' cannot be written: its folder '{store}' is read-only",
                          "give this user write permission there")
        with pytest.raises(RunConfigError, match="cannot be written"):
            check_store(store)
        check_store(store, write=False)                         # reading it is fine
        status = _invoke("status", store)
        assert status.exit_code == 0, status.output


def test_debug_shows_the_traceback(cohort):
    root, store = cohort
    store.write_text("x")
    for args, env in ((["--debug"], None), ([], {"LUNGZARR_DEBUG": "1"})):
        result = _invoke(*args, "ingest", root, store, "--scheduler", "threads", env=env)
        assert result.exit_code == 2
        assert "Traceback" in result.output and "RunConfigError" in result.output
        assert _flat("error: store") in _flat(result.output)
    assert "Traceback" not in _invoke("ingest", root, store, "--scheduler", "threads",
                                      env={"LUNGZARR_DEBUG": "0"}).output


# ---------------------------------------------------------------------- the dashboard

def _listening(port, pid=None):
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


@pytest.mark.parametrize("address, expected", [(None, {"127.0.0.1"}), ("0.0.0.0:0", {"0.0.0.0"})])
def test_local_dashboard_listens_on_loopback_unless_asked(address, expected):
    lines = []
    with dask_client("local", n_workers=1, threads_per_worker=1, echo=lines.append,
                     dashboard_address=address) as client:
        # The scheduler, and its dashboard, run in their own process.
        port = client.scheduler_info()["services"]["dashboard"]
        assert _listening(port, client.cluster.scheduler.pid) == expected
    assert f":{port}/status" in lines[0]


# ---------------------------------------------------------------------- expected failures print no traceback

def _raise_patient_error(patient):
    from lungzarr.errors import PatientError

    raise PatientError("expected, recorded failure", patient=patient, stage="ingest")


def _raise_value_error(patient):
    raise ValueError(f"a bug for {patient}")


def _compute_failed(client):
    return [msg for logs in client.get_worker_logs().values() for _, msg in logs if "Compute Failed" in msg]


@pytest.mark.parametrize("kind", ["local", "existing"])
def test_patient_errors_are_not_logged_by_workers_but_other_errors_are(kind):
    from distributed import LocalCluster, wait

    @contextmanager
    def client_of(kind):
        if kind == "local":
            with dask_client("local", n_workers=1, threads_per_worker=1, echo=lambda s: None) as client:
                yield client
        else:
            with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as c, \
                    dask_client(c.scheduler_address, echo=lambda s: None) as client:
                yield client

    with client_of(kind) as client:
        futures = [client.submit(_raise_patient_error, "P1", pure=False),
                   client.submit(_raise_value_error, "P2", pure=False)]
        wait(futures)
        assert [type(f.exception()).__name__ for f in futures] == ["PatientError", "ValueError"]
        logged = _compute_failed(client)
    assert len(logged) == 1 and "ValueError" in logged[0] and "a bug for P2" in logged[0], logged


def test_cli_on_a_local_cluster_prints_no_compute_failed_for_broken_patients(tmp_path):
    from dicom_phantoms import truncate

    root = tmp_path / "input"
    make_patient(root / "good", seed=1)
    truncate(make_patient(root / "truncated", seed=2)[7])      # fails in a decode task on a worker
    make_patient(root / "gap", seed=3)[6].unlink()             # fails in the header read on a worker
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "lungzarr.cli", "ingest", str(root), str(tmp_path / "s.zarr"),
                           "--chunk-slices", "4"], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert "dask LocalCluster" in proc.stderr                   # really on worker processes
    assert "Compute Failed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    out = _flat(proc.stderr)
    assert _flat("failed truncated (ingest): cannot decode the pixel data") in out
    assert _flat("failed gap (ingest): slice spacing is not regular") in out
