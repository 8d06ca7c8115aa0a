"""What a new user meets first: quiet start-up, honest progress, the CLI's messages, flags and layout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lungzarr._version import __version__
from lungzarr.cli import app
from lungzarr.cli._progress import _LineProgress
from lungzarr.cluster import worker_environ
from lungzarr.model import quiet
from lungzarr.pipeline import ingest
from lungzarr.pipeline.runner import ProgressEvent, StageSummary

from dicom_phantoms import make_patient

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# What TensorFlow 2.21 printed on import, and at its first device, on the machine the issue came from.
TF_STARTUP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796158315.061807   29258 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796158315.062156   29258 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1796158315.153003   29258 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1796158436.847436   31787 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""


@pytest.fixture
def small_store(tmp_path):
    root = tmp_path / "input"
    make_patient(root / "P1")
    make_patient(root / "P2", seed=1)
    store = tmp_path / "cohort.zarr"
    ingest(root, store)
    return root, store


# ---------------------------------------------------------------------- quiet start-up

@pytest.mark.parametrize("line", TF_STARTUP.splitlines())
def test_every_tensorflow_startup_line_is_known_noise_without_a_gpu(line):
    assert quiet.is_startup_noise(line, gpu_present=False)


def test_cuinit_failure_is_kept_where_a_gpu_exists_and_other_errors_always():
    cuinit = TF_STARTUP.splitlines()[-1]
    assert not quiet.is_startup_noise(cuinit, gpu_present=True)
    assert not quiet.is_startup_noise("E0000 00:00:1.0 1 cuda_dnn.cc:1] Could not create cudnn handle: "
                                      "CUDNN_STATUS_INTERNAL_ERROR", gpu_present=False)
    assert not quiet.is_startup_noise("Traceback (most recent call last):", gpu_present=False)


_WRITE_TO_FD2 = """
import os, sys
from lungzarr.model.quiet import quiet_backend_startup
with quiet_backend_startup():
    os.write(2, sys.argv[1].encode())
os.write(2, b"after\\n")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_backend_startup_banners_are_dropped_and_real_errors_written_back(verbose):
    """The filter works on file descriptor 2, where the C++ libraries write; -v keeps everything."""
    text = TF_STARTUP + "E0000 00:00:1.0 1 cuda_dnn.cc:1] Could not create cudnn handle\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "-1"}
    env.pop(quiet.VERBOSE_ENV, None)
    if verbose:
        env[quiet.VERBOSE_ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", _WRITE_TO_FD2, text], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    if verbose:
        assert proc.stderr == text + "after\n"
    else:
        assert proc.stderr == "E0000 00:00:1.0 1 cuda_dnn.cc:1] Could not create cudnn handle\nafter\n"


def test_quiet_environment_only_where_the_user_has_not_chosen(monkeypatch):
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    env = worker_environ()
    assert "TF_CPP_MIN_LOG_LEVEL" not in env          # the user's 0 is inherited, not overridden
    assert env["GRPC_VERBOSITY"] == "ERROR"
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    assert not set(quiet.QUIET_ENV) & set(worker_environ())


def test_verbose_flag_reaches_the_environment_workers_inherit(small_store, monkeypatch):
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    _, store = small_store
    result = runner.invoke(app, ["-v", "status", str(store)])
    assert result.exit_code == 0, result.output
    assert os.environ.get(quiet.VERBOSE_ENV) == "1" and quiet.verbose()
    monkeypatch.delenv(quiet.VERBOSE_ENV)


# ---------------------------------------------------------------------- progress

def test_line_progress_one_line_per_patient_and_stage_and_a_summary():
    lines = []
    progress = _LineProgress(lines.append, interval=0)
    for stage in ("ingest", "detect"):
        progress(ProgressEvent(stage, "begin", total=3))
    progress(ProgressEvent("ingest", "done", patient="P1", seconds=2.34))
    progress(ProgressEvent("ingest", "skipped", patient="P3"))
    progress(ProgressEvent("detect", "failed", patient="P2", seconds=1.2, reason="no lungs found"))
    progress(ProgressEvent("detect", "blocked", patient="P4"))
    assert lines == ["ingest P1 done 2.3 s", "ingest P3 skipped (done already)",
                     "detect P2 failed after 1.2 s: no lungs found",
                     "detect P4 blocked (a stage it needs is missing or failed)"]
    summary = progress.summary_line()
    assert summary.startswith("after ") and summary.endswith(
        "ingest 2/3 done, 1 left; detect 0/3 done, 1 failed, 1 blocked, 1 left")


def test_line_progress_writes_a_summary_every_interval_while_patients_are_left():
    import time

    lines = []
    with _LineProgress(lines.append, interval=0.05) as progress:
        progress(ProgressEvent("ingest", "begin", total=2))
        time.sleep(0.3)
        progress(ProgressEvent("ingest", "done", patient="P1", seconds=1.0))
        progress(ProgressEvent("ingest", "done", patient="P2", seconds=1.0))
        time.sleep(0.2)
    summaries = [line for line in lines if line.startswith("after ")]
    assert summaries and all(line.endswith("ingest 0/2 done, 2 left") for line in summaries)


def test_summary_reports_work_and_wall_span_apart(tmp_path):
    make_patient(tmp_path / "input" / "P1")
    result = runner.invoke(app, ["ingest", str(tmp_path / "input"), str(tmp_path / "s.zarr"),
                                 "--scheduler", "threads"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "ingest P1 done" in result.output                 # CliRunner is no terminal: lines, not bars
    assert "compute s" in result.output and "wall span s" in result.output
    assert "added up" in result.output and "stages overlap" in result.output
    assert StageSummary("x", seconds=1.0, work_seconds=2.5).as_dict()["work_seconds"] == 2.5


_PIPED_RUN = [sys.executable, "-m", "lungzarr.cli", "ingest", "INPUT", "STORE", "--scheduler", "local"]


def test_cli_with_piped_output_prints_progress_lines_and_shuts_down_quietly(tmp_path):
    """As in a batch job: stderr is a file, a LocalCluster runs, every patient says when it is done."""
    make_patient(tmp_path / "input" / "P1")
    make_patient(tmp_path / "input" / "P2", seed=1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(quiet.VERBOSE_ENV, None)
    args = [str(tmp_path / "input") if a == "INPUT" else str(tmp_path / "s.zarr") if a == "STORE" else a
            for a in _PIPED_RUN]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    for patient in ("P1", "P2"):
        assert any(line.startswith(f"ingest {patient} done ") and line.endswith(" s") for line in lines), lines
    assert "\x1b[" not in proc.stderr                       # no terminal escapes in a log file
    assert "killing" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "s.zarr.lock").exists()


# ---------------------------------------------------------------------- the CLI's details

def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"lungzarr {__version__}"


@pytest.mark.parametrize("command, flag", [([], "--debug"), ([], "--verbose"), (["run"], "--overwrite"),
                                           (["run"], "--strict"), (["run"], "--verify"),
                                           (["evaluate"], "--filtered")])
def test_boolean_options_are_shown_as_flags(command, flag):
    text = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"}).output
    assert "<bool>" not in text and "BOOLEAN" not in text
    line = next(line for line in text.splitlines() if f"{flag} " in line or line.rstrip().endswith(flag))
    assert line.split(flag, 1)[1].startswith("  ") or line.rstrip().endswith(flag), line


def test_command_list_is_not_cut_at_80_columns():
    text = runner.invoke(app, ["--help"], env={"COLUMNS": "80"}).output
    commands = text.split("Commands:", 1)[1].splitlines()
    assert commands and not any(line.rstrip().endswith("...") for line in commands), commands


@pytest.mark.parametrize("given", [[], ["--lidc-xml", "a.xml", "--luna-csv", "b.csv"]])
def test_evaluate_needs_exactly_one_annotation_source(given, tmp_path):
    help_text = " ".join(runner.invoke(app, ["evaluate", "--help"], env={"COLUMNS": "80"}).output.split())
    assert "With a STORE, exactly one of --lidc-xml and --luna-csv" in help_text.replace("--lidc- xml", "--lidc-xml")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "s.zarr"), "-o", str(tmp_path / "out"), *given])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "exactly one source of annotations" in message and ("neither" in message or "both" in message)
    assert "--lidc-xml DIR_OR_FILE" in message and "--luna-csv FILE" in message
    assert not (tmp_path / "out").exists()


def test_qc_of_an_unknown_patient_names_the_patients(small_store, tmp_path):
    _, store = small_store
    result = runner.invoke(app, ["qc", str(store), "NOPE", "-o", str(tmp_path / "q.png")])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert f"no patient 'NOPE' in {str(store)!r}; patients: P1, P2" in message
    assert "segment" not in message


def test_status_fits_80_columns(small_store):
    _, store = small_store
    result = runner.invoke(app, ["status", str(store)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"{store}: 2 patient(s), ") and lines[0].endswith(" MB")
    table = [line for line in lines[1:] if line.strip()]
    assert table and all(len(line) <= 80 for line in table), table
    assert any("ingest" in line and "2" in line for line in table)


def test_readme_explains_the_missing_values():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "-777" in text and "-7777" in text
    paragraph = text[text.index("-7777") - 800:text.index("-7777") + 800]
    assert "missing" in paragraph.lower()


def test_readme_sets_expectations():
    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    for needle in ("venv", "GB", "CPU", "lungzarr.open_cohort"):
        assert needle in text, needle


def test_a_terminal_gets_the_bars_and_anything_else_the_lines(monkeypatch):
    import io

    from rich.console import Console
    from rich.progress import Progress

    import lungzarr.cli._progress as cli

    monkeypatch.setattr(cli, "console", Console(file=io.StringIO(), force_terminal=True))
    display, make = cli._progress_display()
    assert isinstance(display, Progress)
    monkeypatch.setattr(cli, "console", Console(file=io.StringIO(), force_terminal=False))
    display, make = cli._progress_display()
    assert isinstance(display, _LineProgress) and make() is display
