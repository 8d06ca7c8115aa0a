"""Run-level stops (issue 25): an interrupt, a full disk, a store that fails, in one sentence; a patient's
failure never stops the run.

Ctrl-C (SIGINT to the whole process group, as a terminal sends it) and SIGTERM
stop a run cleanly: one sentence, exit 130 or 143, no traceback, nothing
recorded as a patient's failure, and the same command resumes. A write the
machine refuses for every patient (ENOSPC) stops the run once; an error of the
machine within one patient gets its own message, never "unexpected ... please
report".
"""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import pytest
from typer.testing import CliRunner

from lungzarr.cli import app
from lungzarr.errors import PatientError, RunStopError, environment_reason
from lungzarr.io.store import CohortStore
from lungzarr.pipeline import ingest
from lungzarr.pipeline.runner import as_patient_error, run_stop_error, stream_stages

from dicom_phantoms import make_patient

REPO = Path(__file__).resolve().parents[1]


def _flat(text: str) -> str:
    return "".join(text.split())


# ---------------------------------------------------------------------- SIGINT / SIGTERM

def _start(args, env):
    """``lungzarr ARGS`` in its own process group (a terminal's Ctrl-C reaches every process of it)."""
    proc = subprocess.Popen([sys.executable, "-m", "lungzarr.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    return proc, lines, reader


def _interrupt_once_working(proc, lines, send, *, timeout=90.0):
    """Wait for the first patient done (the run is working), then ``send(proc)``; the output and exit code."""
    deadline = time.monotonic() + timeout
    while not any(re.match(r"ingest \S+ done", line) for line in lines):
        assert proc.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    sent = time.monotonic()
    send(proc)
    code = proc.wait(timeout=60)
    return code, time.monotonic() - sent


@pytest.fixture
def slow_cohort(tmp_path):
    """12 patients that take a moment each, so a run is still working when it is interrupted."""
    root = tmp_path / "input"
    for k in range(12):
        make_patient(root / f"P{k:02d}", seed=k, n_slices=40, size=128)
    return root


@pytest.mark.parametrize("how", ["SIGINT to the process group, local cluster", "SIGTERM, threads"])
def test_an_interrupt_stops_the_run_in_one_sentence_and_the_same_command_resumes(slow_cohort, tmp_path, how):
    store = tmp_path / "s.zarr"
    # The default output (no `lungzarr -v` left in this process's environment by another test).
    env = {**{k: v for k, v in os.environ.items() if k != "LUNGZARR_VERBOSE"}, "PYTHONPATH": str(REPO),
           "COLUMNS": "300"}
    if how.startswith("SIGINT"):
        sig, scheduler = signal.SIGINT, []
        send = lambda p: os.killpg(p.pid, signal.SIGINT)           # noqa: E731 - as Ctrl-C in a terminal
    else:
        sig, scheduler = signal.SIGTERM, ["--scheduler", "threads"]
        send = lambda p: p.send_signal(signal.SIGTERM)              # noqa: E731
    proc, lines, reader = _start(["ingest", slow_cohort, store, "--chunk-slices", "8", "--batch-size", "2",
                                  *scheduler], env)
    try:
        code, seconds = _interrupt_once_working(proc, lines, send)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=10)
    output = "".join(lines)
    assert code == 128 + sig, output                                # 130 / 143, as a shell reports them
    assert seconds < 20, (seconds, output)                          # promptly (the cluster closed too)
    assert not re.search(r"traceback|error|warning", output, re.IGNORECASE), output   # nor a log line
    said = re.findall(rf"interrupted \({sig.name}\) after [\d.]+ s: (\d+) of 12 patient\(s\) done; run the same "
                      rf"command again to resume", output)
    assert len(said) == 1 and int(said[0]) >= 1, output
    assert output.strip().splitlines()[-1].startswith("interrupted"), output   # the last word, only once
    written = CohortStore(store, mode="r")
    assert written.failures() == []                                 # nothing recorded as a patient's failure
    assert len(written.patients()) >= int(said[0])
    # The same command resumes: every patient, none failed, none twice.
    again = subprocess.run([sys.executable, "-m", "lungzarr.cli", "ingest", slow_cohort, store, "--chunk-slices",
                            "8", "--scheduler", "threads"], capture_output=True, text=True, env=env, timeout=180)
    assert again.returncode == 0, again.stderr
    assert CohortStore(store, mode="r").patients() == [f"P{k:02d}" for k in range(12)]
    assert sorted(p.name for p in (store / "staging").iterdir()) == ["zarr.json"]


# ---------------------------------------------------------------------- a full disk

@pytest.fixture
def three(tmp_path):
    root = tmp_path / "input"
    for k in (1, 2, 3):
        make_patient(root / f"P{k}", seed=k)
    return root, tmp_path / "s.zarr"


def _disk_full_at(monkeypatch, patient, part="/hu/c/"):
    """Writes of ``patient`` below ``part`` fail as on a full disk (zarr's local store writes through ``_put``).

    ``/hu/c/``: its voxels, in its computation (after the patients before it are computed); ``/y/``: a
    coordinate its prepare writes (before anything of the patients in flight is committed).
    """
    import zarr.storage._local as local

    real = local._put

    def put(path, value, *args, **kwargs):
        if f"/{patient}{part}" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write() names no file
        return real(path, value, *args, **kwargs)

    monkeypatch.setattr(local, "_put", put)


@pytest.mark.parametrize("part, kept", [("/hu/c/", ["P1"]), ("/y/", [])])
def test_a_full_disk_stops_the_run_once_records_nothing_and_the_next_run_resumes(three, monkeypatch, part, kept):
    root, store = three
    _disk_full_at(monkeypatch, "P2", part)
    with pytest.raises(RunStopError, match=r"the run stopped at patient 'P2' \(ingest\): no space left on the "
                                           r"device \(writing store .*free space there") as info:
        ingest(root, store, chunk_slices=4)
    assert "unexpected" not in str(info.value)
    written = CohortStore(store, mode="r")
    # What was committed is kept (P1 when P2 fails in its computation), no patient is blamed for the disk.
    assert written.patients() == kept and written.failures() == []
    monkeypatch.undo()
    summary = ingest(root, store, chunk_slices=4)
    assert sorted(summary.done + summary.skipped) == ["P1", "P2", "P3"] and summary.skipped == kept
    assert not summary.failed


def test_a_full_disk_on_the_workers_stops_the_run_once_records_nothing_and_the_next_run_resumes(three,
                                                                                               monkeypatch):
    """On a cluster the patients' stages are built and written from the workers (lungzarr.pipeline.remote):
    a full disk there stops the run as in the client. The cluster runs in this process, so the patch
    reaches its workers' threads."""
    distributed = pytest.importorskip("distributed")
    root, store = three
    _disk_full_at(monkeypatch, "P2", "/hu/c/")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        with pytest.raises(RunStopError, match=r"the run stopped at patient 'P2' \(ingest\): no space left on "
                                               r"the device") as info:
            ingest(root, store, chunk_slices=4, client=client)
        assert "unexpected" not in str(info.value)
        written = CohortStore(store, mode="r")
        assert written.failures() == [] and "P2" not in written.patients()   # no patient blamed, P2 not kept
        monkeypatch.undo()
        summary = ingest(root, store, chunk_slices=4, client=client)
    assert sorted(summary.done + summary.skipped) == ["P1", "P2", "P3"] and not summary.failed


def test_a_full_disk_in_the_cli_is_one_sentence_and_exit_2(three, monkeypatch):
    root, store = three
    _disk_full_at(monkeypatch, "P1")
    result = CliRunner().invoke(app, ["ingest", str(root), str(store), "--scheduler", "threads"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on the device" in errors[0], result.output


def test_a_full_disk_at_the_table_write_is_one_sentence_and_exit_2(three, monkeypatch):
    root, store = three
    table = store / "tables" / "patients" / "c" / "0"

    def full(store_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(table))

    monkeypatch.setattr("lungzarr.pipeline.cohort.gather_tables", full)
    result = CliRunner().invoke(app, ["ingest", str(root), str(store), "--scheduler", "threads"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert _flat(f"error: no space left on '{table}': free space there") in _flat(result.output), result.output


# ---------------------------------------------------------------------- a patient's failure never stops the run

def test_late_writes_of_a_failed_patient_do_not_crash_the_run(tmp_path):
    """A task fails while its siblings still write into the staged group (the rmtree race of issue 25)."""
    import numpy as np
    import xarray as xr

    store = CohortStore(tmp_path / "s.zarr")
    ds = xr.Dataset({"hu": (("z", "y", "x"), np.zeros((4, 8, 8), np.int16))})
    staged = tmp_path / "s.zarr" / "staging" / "P1"
    writing = threading.Event()
    stop_writing = threading.Event()

    def sibling():
        # A chunk writer of the same computation, still busy after the failure: new folders and files keep
        # appearing below the staged group while it is being removed.
        writing.set()
        k = 0
        end = time.monotonic() + 1.5
        while time.monotonic() < end and not stop_writing.is_set():
            folder = staged / "hu" / "c" / str(k % 50) / str(k)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "0").write_bytes(b"x" * 64)
            except OSError:
                pass
            k += 1

    def fails():
        writing.wait(5)
        time.sleep(0.05)
        raise MemoryError()  # a 100x PixelSpacing typo: each chunk asks for tens of GiB

    def prepare(stage, patient, payload):
        pending = store.prepare_stage(patient, "ingest", ds, new_group=True)
        both = dask.delayed(lambda a, b: None)(dask.delayed(sibling)(), dask.delayed(fails)())
        pending.delayed = both
        return pending

    with dask.config.set(scheduler="threads", num_workers=2):
        (summary,) = stream_stages(store, [("P1", None)], ["ingest"], prepare, decide=lambda p, s: "run")
    stop_writing.set()
    assert summary.done == [] and [f["patient"] for f in summary.failed] == ["P1"]
    assert summary.failed[0]["reason"].startswith("out of memory (MemoryError)"), summary.failed
    assert not (staged / "zarr.json").exists()            # whatever is left is no group: never taken for P1
    assert store.patients() == []
    time.sleep(1.6)                                        # the late writer is done
    with CohortStore(tmp_path / "s.zarr").lock():          # the next writer's recovery removes the rest
        pass
    assert not staged.exists()


# ---------------------------------------------------------------------- messages of the machine's errors

def test_errors_of_the_machine_get_their_own_messages_and_only_bugs_say_unexpected():
    full = OSError(errno.ENOSPC, "No space left on device", "/data/s.zarr/patients/P1/hu/c/0/0/0")
    assert as_patient_error(full, "P1", "ingest").reason == (
        "no space left on '/data/s.zarr/patients/P1/hu/c/0/0/0': free space there (or pass a STORE on a larger "
        "disk) and run the same command again")
    denied = PermissionError(errno.EACCES, "Permission denied", "/scans/P1/0001.dcm")
    assert as_patient_error(denied, "P1", "ingest").reason.startswith("permission denied on '/scans/P1/0001.dcm'")
    assert as_patient_error(MemoryError(), "P1", "ingest").reason.startswith("out of memory (MemoryError)")
    assert environment_reason(OSError(errno.EROFS, "Read-only file system", "/ro")).startswith(
        "'/ro' is on a read-only file system")
    bug = as_patient_error(ValueError("s3://KEY:SECRET@bucket/x broke"), "P1", "ingest").reason
    assert bug.startswith("unexpected ValueError") and "please report" in bug
    assert "SECRET" not in bug and "s3://***@bucket/x" in bug
    err = PatientError("bad slice", patient="P1")
    assert as_patient_error(err, "P1", "ingest") is err and run_stop_error(err) is None
    # What stops every later patient stops the run; one patient's own trouble does not.
    assert isinstance(run_stop_error(full), RunStopError)
    assert run_stop_error(denied) is None and run_stop_error(MemoryError()) is None

    class Store:
        path = Path("/data/s.zarr")

    in_store = PermissionError(errno.EACCES, "Permission denied", "/data/s.zarr/patients/P1/zarr.json")
    assert str(run_stop_error(in_store, Store())).startswith("permission denied on '/data/s.zarr/patients/P1")
    assert run_stop_error(denied, Store()) is None             # a patient's own file: that patient's failure
    read_only = run_stop_error(OSError(errno.EROFS, "Read-only file system"), Store())
    assert str(read_only).startswith("the device (writing store '/data/s.zarr') is on a read-only file system")
