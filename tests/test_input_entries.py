"""Nothing in INPUT is ignored silently (issue 13): archives fail their patient, the rest are warnings."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lungzarr.cli import app
from lungzarr.errors import LungzarrError
from lungzarr.io.store import CohortStore, read_failures, read_warnings
from lungzarr.pipeline import find_patients, ingest
from lungzarr.pipeline.inputs import scan_input

from dicom_phantoms import make_patient


def _flat(text: str) -> str:
    return "".join(text.split())


@pytest.fixture
def messy_input(tmp_path):
    """Two patient folders with, beside them, what real INPUT folders hold."""
    root = tmp_path / "input"
    make_patient(root / "P1", seed=1)
    make_patient(root / "P2", seed=2)
    make_patient(root / ".P3", seed=3)                 # hidden: e.g. renamed to leave it out, or a copy
    (root / "P4.zip").write_bytes(b"PK\x03\x04 not read")
    (root / "P5.tar.gz").write_bytes(b"\x1f\x8b not read")
    (root / "P1.zip").write_bytes(b"PK\x03\x04 the archive P1/ was unpacked from")
    (root / "README.txt").write_text("cohort of 2026\n")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


def test_scan_input_sorts_every_entry(messy_input):
    root = messy_input
    scan = scan_input(root)
    assert scan.patients == [("P1", root / "P1"), ("P2", root / "P2")]
    assert find_patients(root) == scan.patients                 # the old interface, unchanged
    archives = {err.patient: err for err in scan.archives}
    assert sorted(archives) == ["P4", "P5"]
    assert archives["P4"].file == str(root / "P4.zip") and archives["P4"].stage == "ingest"
    assert archives["P4"].reason == (f"'P4.zip' is an archive: lungzarr does not read archives; unzip it into "
                                     f"{root / 'P4'}/ and run again")
    assert "unpack it into" in archives["P5"].reason and str(root / "P5") in archives["P5"].reason
    ignored = {e.name: e.reason for e in scan.ignored}
    assert sorted(ignored) == [".DS_Store", ".P3", "P1.zip", "README.txt"]
    assert ignored[".P3"] == "hidden folder: not read; rename it without the leading '.' to include it"
    assert "which is used: not read" in ignored["P1.zip"]
    assert "not a patient folder" in ignored["README.txt"]
    assert scan_input(root, patients=["P4"]).archives[0].patient == "P4"   # an archive is a patient to select


def test_ingest_records_and_prints_entries_not_used(messy_input, tmp_path):
    root, store = messy_input, tmp_path / "cohort.zarr"
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(root), str(store), "--scheduler", "threads", "--chunk-slices", "4"])
    assert result.exit_code == 1, result.output                 # P4 and P5 are missing from the run
    out = _flat(result.output)
    assert _flat("│ ingest │ 2 │ 0 │ 2 │") in out
    assert _flat("failed P4 (ingest): 'P4.zip' is an archive") in out
    for name in (".P3", ".DS_Store", "README.txt", "P1.zip"):
        assert _flat(f"not used {root / name}:") in out, name
    assert _flat("hidden folder: not read; rename it without the leading '.' to include it") in out
    failures = read_failures(store)
    assert sorted(failures.patient) == ["P4", "P5"]
    warnings = read_warnings(store)
    assert sorted(warnings.patient) == [".DS_Store", ".P3", "P1.zip", "README.txt"]
    assert set(warnings.stage) == {"input"} and set(warnings.file) == {str(root / n) for n in warnings.patient}
    status = _flat(runner.invoke(app, ["status", str(store)]).output)
    assert _flat("warning .P3 (input): hidden folder: not read") in status
    assert _flat("failed P4 (ingest): 'P4.zip' is an archive") in status

    # The user tidies INPUT: what is gone is no longer reported; the unzipped patient is ingested.
    (root / "README.txt").unlink()
    (root / ".P3").rename(root / "P3")
    make_patient(root / "P4", seed=4)
    (root / "P4.zip").unlink()
    summary = ingest(root, store, chunk_slices=4)
    assert sorted(summary.done) == ["P3", "P4"] and sorted(summary.skipped) == ["P1", "P2"]
    assert [f["patient"] for f in summary.failed] == ["P5"]
    assert sorted(read_warnings(store).patient) == [".DS_Store", "P1.zip"]
    assert sorted(read_failures(store).patient) == ["P5"]
    assert sorted(r["file"] for r in summary.ignored) == [str(root / ".DS_Store"), str(root / "P1.zip")]
    assert CohortStore(store, mode="r").patients() == ["P1", "P2", "P3", "P4"]


def test_warnings_of_another_input_folder_are_kept(messy_input, tmp_path):
    store = tmp_path / "cohort.zarr"
    ingest(messy_input, store, chunk_slices=4)
    other = tmp_path / "second_batch"
    make_patient(other / "Q1", seed=5)
    assert ingest(other, store, chunk_slices=4).done == ["Q1"]
    assert len(read_warnings(store)) == 4                       # the first folder's are still true


def test_folder_of_one_patients_files_is_that_patient(tmp_path):
    folder = tmp_path / "LIDC-0001"
    make_patient(folder, seed=1)
    (folder / ".DS_Store").write_bytes(b"\0")
    scan = scan_input(folder)
    assert scan.patients == [("LIDC-0001", folder)] and scan.ignored == [] and scan.archives == []
    assert ingest(folder, tmp_path / "s.zarr", chunk_slices=4).done == ["LIDC-0001"]


def test_only_archives_are_failures_not_one_patient(tmp_path):
    root = tmp_path / "input"
    root.mkdir()
    (root / "A.zip").write_bytes(b"PK")
    (root / "B.tgz").write_bytes(b"\x1f\x8b")
    summary = ingest(root, tmp_path / "s.zarr")
    assert summary.done == [] and sorted(f["patient"] for f in summary.failed) == ["A", "B"]


def test_only_hidden_entries_is_an_error_naming_them(tmp_path):
    root = tmp_path / "input"
    make_patient(root / ".P1")
    with pytest.raises(LungzarrError, match=r"holds no patient folder, only entries that are not read \('.P1'\)"):
        scan_input(root)
