"""What INPUT may not do (issue 25): carry a secret, reach outside itself, hide a warning, be mistaken for a patient.

- A URL with credentials is refused without echoing them, and a secret never
  reaches a message, an exception or the store.
- A ``.mhd`` whose data file lies outside its folder is refused.
- A folder named ``zarr.json`` is a refused patient, not a crash.
- Warnings (a dropped damaged edge slice, skipped files) are in the run's own
  output as well as in ``status``.
- The source paths recorded are absolute; the STORE inside INPUT is no patient.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lungzarr.cli import app
from lungzarr.cli._progress import _LineProgress, _warning_lines
from lungzarr.errors import PatientError, RunConfigError
from lungzarr.io import volumes
from lungzarr.io.locations import blank_secrets, describe_error
from lungzarr.io.store import CohortStore
from lungzarr.pipeline import ingest
from lungzarr.pipeline.inputs import scan_input
from lungzarr.pipeline.runner import ProgressEvent
from lungzarr.volume import Grid

from dicom_phantoms import make_patient, phantom_volume, truncate

KEY_ID, SECRET = "AKIAEXAMPLEKEYID", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYSECRET"


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _files_holding(folder: Path, text: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


# ---------------------------------------------------------------------- credentials

@pytest.mark.parametrize("url", [f"s3://{KEY_ID}:{SECRET}@bucket/cohort/",
                                 f"s3://{KEY_ID}:{SECRET.replace('/', '%2F')}@bucket/cohort/",
                                 f"https://{SECRET.split('/')[0]}@example.org/cohort/"])
def test_an_input_url_with_credentials_is_refused_and_the_secret_is_never_shown_or_stored(tmp_path, url):
    store = tmp_path / "s.zarr"
    make_patient(tmp_path / "input" / "P1", seed=1)
    assert ingest(tmp_path / "input", store, chunk_slices=4).done == ["P1"]   # an existing store: not touched
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    result = _invoke("ingest", url, store, "--scheduler", "threads")
    assert result.exit_code == 2, result.output
    assert "an INPUT URL must not carry credentials (" in result.output and "Traceback" not in result.output
    secret = SECRET.split("/")[0]
    assert secret not in result.output and KEY_ID not in result.output
    with pytest.raises(RunConfigError) as info:
        ingest(url, store)
    assert secret not in str(info.value) and KEY_ID not in str(info.value)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    assert _files_holding(tmp_path, secret) == []


def test_secrets_are_blanked_in_any_text():
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
    try:
        text = describe_error(OSError(f"cannot open s3://{KEY_ID}:{SECRET}@bucket/x with {SECRET}"))
    finally:
        del os.environ["AWS_SECRET_ACCESS_KEY"]
    assert SECRET not in text and KEY_ID not in text
    assert "s3://***@bucket/x" in text and "<$AWS_SECRET_ACCESS_KEY>" in text
    # An '@' in a key is no credential.
    assert blank_secrets("s3://bucket/user@example.org/x.dcm") == "s3://bucket/user@example.org/x.dcm"


# ---------------------------------------------------------------------- a .mhd reaches outside its folder

@pytest.mark.parametrize("named", ["../outside.raw", "ABSOLUTE", "sub/../../outside.raw", "LIST"])
def test_a_mhd_whose_data_file_lies_outside_its_folder_is_refused(tmp_path, named):
    hu = phantom_volume(12, 32)
    root = tmp_path / "input"
    root.mkdir()
    mhd = volumes.write_volume(hu, root / "P1.mhd", grid=Grid(hu.shape, (-100.0, -20.0, -30.0), (2.5, 0.7, 0.7)))
    raw = root / "P1.raw"
    outside = tmp_path / "outside.raw"
    raw.rename(outside)
    value = {"ABSOLUTE": str(outside), "LIST": "LIST 2D"}.get(named, named)
    header = mhd.read_text().replace("ElementDataFile = P1.raw", f"ElementDataFile = {value}")
    if named == "LIST":
        header += "../outside.raw\n"
    assert header != mhd.read_text()
    mhd.write_text(header)
    with pytest.raises(PatientError, match=r"outside the header's folder; the data file must lie in the \.mhd's "
                                           r"folder: move it beside the header") as info:
        volumes.read_volume(mhd)
    assert info.value.file == str(mhd) and info.value.patient == "P1"
    # In a run: that patient's failure, the others go on.
    make_patient(root / "P2", seed=2)
    summary = ingest(root, tmp_path / "s.zarr", chunk_slices=4)
    assert summary.done == ["P2"] and [f["patient"] for f in summary.failed] == ["P1"]
    assert "must lie in the .mhd's folder" in summary.failed[0]["reason"]


def test_a_mhd_with_its_data_file_beside_it_still_reads(tmp_path):
    hu = phantom_volume(12, 32)
    mhd = volumes.write_volume(hu, tmp_path / "P1.mhd", grid=Grid(hu.shape, (-100.0, -20.0, -30.0), (2.5, 0.7, 0.7)))
    assert volumes.read_volume(mhd).shape == hu.shape


# ---------------------------------------------------------------------- a folder named zarr.json

def test_a_patient_folder_named_zarr_json_is_refused_and_the_store_is_intact(tmp_path):
    root = tmp_path / "input"
    make_patient(root / "zarr.json", seed=1)
    make_patient(root / "P2", seed=2)
    store = tmp_path / "s.zarr"
    result = _invoke("ingest", root, store, "--scheduler", "threads", "--chunk-slices", "4")
    assert result.exit_code == 1, result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output
    said = " ".join(result.output.split())
    assert "failed zarr.json (ingest): patient id 'zarr.json' is the name of Zarr's metadata file" in said
    assert "rename the folder" in said
    written = CohortStore(store, mode="r")
    assert written.patients() == ["P2"]
    assert json.loads((store / "patients" / "zarr.json").read_text())["node_type"] == "group"
    assert _invoke("status", store).exit_code == 0


# ---------------------------------------------------------------------- warnings in the run's own output

def test_a_dropped_edge_slice_is_in_the_runs_own_output_and_in_status(tmp_path):
    root = tmp_path / "input"
    files = make_patient(root / "W1", seed=1, n_slices=16)
    truncate(files[0])                                          # a damaged slice at the lower end: dropped
    store = tmp_path / "s.zarr"
    result = _invoke("ingest", root, store, "--scheduler", "threads", "--chunk-slices", "4")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "ingest W1 done" in said
    assert "warning W1 (ingest): damaged slice at the lower end of the stack (z=-100 mm) dropped" in said
    assert f"file: {files[0]}" in said
    status = " ".join(_invoke("status", store).output.split())
    assert "warning W1 (ingest): damaged slice at the lower end of the stack (z=-100 mm) dropped" in status


def test_many_warnings_of_one_patient_are_a_few_lines_and_a_count():
    records = [{"file": f"/in/P1/{k:04d}.dcm", "reason": f"note {k}"} for k in range(7)]
    event = ProgressEvent("ingest", "done", patient="P1", seconds=1.0, warnings=tuple(records))
    lines = []
    with _LineProgress(lines.append, interval=0) as progress:
        progress(ProgressEvent("ingest", "begin", total=1))
        progress(event)
    assert lines[0] == "ingest P1 done 1.0 s"
    assert lines[1:] == [f"warning P1 (ingest): note {k} — file: /in/P1/{k:04d}.dcm" for k in range(3)] + [
        "warning P1 (ingest): 4 more warning(s); `lungzarr status STORE` lists them all"]
    assert _warning_lines(ProgressEvent("ingest", "done", patient="P2")) == []


# ---------------------------------------------------------------------- paths recorded; the STORE in INPUT

def test_source_paths_are_recorded_absolute_from_a_relative_input(tmp_path, monkeypatch):
    make_patient(tmp_path / "input" / "P1", seed=1)
    monkeypatch.chdir(tmp_path)
    assert ingest("input", "s.zarr", chunk_slices=4).done == ["P1"]
    monkeypatch.chdir(tmp_path.parent)                          # another working directory
    ds = CohortStore(tmp_path / "s.zarr", mode="r").open_patient("P1")
    recorded = [Path(p) for p in ds.dicom_file.values]
    assert all(p.is_absolute() and p.is_file() for p in recorded), recorded
    assert recorded[0] == tmp_path / "input" / "P1" / "0000.dcm"
    assert ds.attrs["source_folder"] == str(tmp_path / "input" / "P1")


def test_a_store_inside_input_is_skipped_and_said_once(tmp_path):
    root = tmp_path / "input"
    make_patient(root / "P1", seed=1)
    make_patient(root / "P2", seed=2)
    store = root / "cohort.zarr"
    assert ingest(root, store, chunk_slices=4).done == ["P1", "P2"]
    result = _invoke("ingest", root, store, "--scheduler", "threads", "--chunk-slices", "4")
    assert result.exit_code == 0, result.output                 # no failed "patient" cohort.zarr
    said = " ".join(result.output.split())
    assert said.count("the STORE of this run") == 1, result.output
    assert f"not used {store}: the STORE of this run (or its lock file), inside INPUT: not read as a patient" in said
    written = CohortStore(store, mode="r")
    assert written.patients() == ["P1", "P2"] and written.failures() == []
    # Any spelling of the STORE is the STORE.
    scan = scan_input(root, store=tmp_path / "input" / ".." / "input" / "cohort.zarr")
    assert [pid for pid, _ in scan.patients] == ["P1", "P2"]
    assert [e.name for e in scan.ignored] == ["cohort.zarr"]
    # The INPUT folder of one patient's files with the STORE in it: the files are the patient.
    one = tmp_path / "one"
    make_patient(one, seed=3)
    scan = scan_input(one, store=one / "s.zarr")
    assert scan.patients == [("one", one)]
    with pytest.raises(Exception, match="holds only the STORE of this run"):
        (tmp_path / "only").mkdir()
        (tmp_path / "only" / "s.zarr").mkdir()
        scan_input(tmp_path / "only", store=tmp_path / "only" / "s.zarr")


def test_scan_input_gives_absolute_paths(tmp_path, monkeypatch):
    make_patient(tmp_path / "input" / "P1", seed=1)
    monkeypatch.chdir(tmp_path)
    scan = scan_input("input")
    assert scan.patients == [("P1", tmp_path / "input" / "P1")]
    assert np.all([p.is_absolute() for _, p in scan.patients])
