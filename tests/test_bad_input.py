"""Bad input (issue 3 item 6) and resumable, atomic ingest (item 5).

One cohort holding every kind of broken patient next to good ones is ingested
once through the library; each case is then checked: the error names the file
and says what to do, the failure is in the store's failures table, nothing of
the patient is left half-written, and the other patients were ingested.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lungzarr.cli import app
from lungzarr.errors import LungzarrError, PatientError
from lungzarr.io import dicom
from lungzarr.io.store import STAGING_GROUP, CohortStore, read_failures
from lungzarr.pipeline import ingest

from dicom_phantoms import copy_tree, edit_header, make_patient, truncate

REPO = Path(__file__).resolve().parents[1]
GOOD = ("good_a", "good_b")


def _flat(text: str) -> str:
    """Output without whitespace, so rich's line wrapping cannot break a match."""
    return "".join(text.split())


# ---------------------------------------------------------------------- the broken cohort

def _empty(folder):
    folder.mkdir()
    return folder


def _no_dicom(folder):
    folder.mkdir()
    (folder / "notes.txt").write_text("scan was cancelled\n")
    (folder / "image.dcm").write_bytes(b"\0" * 300)     # named .dcm, but not DICOM
    return folder


def _truncated(folder):
    paths = make_patient(folder, seed=2)
    truncate(paths[7])
    return paths[7]


def _duplicate_position(folder):
    paths = make_patient(folder, seed=3)
    z3 = float(dicom.read_header(paths[3]).position[2])
    edit_header(paths[4], ImagePositionPatient=["-30", "-20", f"{z3:.6f}"])
    return paths[4]


def _missing_position(folder):
    paths = make_patient(folder, seed=4)
    edit_header(paths[5], ImagePositionPatient=None)
    return paths[5]


def _gap(folder):
    paths = make_patient(folder, seed=5)
    paths[6].unlink()
    return paths[7]


def _non_axial(folder):
    paths = make_patient(folder, seed=6)
    for p in paths:
        edit_header(p, ImageOrientationPatient=[0, 1, 0, 0, 0, -1])   # sagittal
    return paths[0]


def _single_slice(folder):
    return make_patient(folder, n_slices=1, seed=7)[0]


def _missing_orientation(folder):
    paths = make_patient(folder, seed=8)
    edit_header(paths[4], ImageOrientationPatient=None)
    return paths[4]


def _gantry_tilt(folder):
    paths = make_patient(folder, seed=9)
    for p in paths:   # columns tilted 5 deg about x, slices stacked along the table: voxels up to 4.1 mm off
        edit_header(p, ImageOrientationPatient=["1", "0", "0", "0", "0.996194698", "0.0871557427"],
                    GantryDetectorTilt="5")
    return paths[0]


def _repeats(folder):
    make_patient(folder, seed=14, acquisition=1, series_uid="1.2.3.4.5.77", filename="a1_{index:03d}.dcm")
    make_patient(folder, seed=15, acquisition=2, series_uid="1.2.3.4.5.77", filename="a2_{index:03d}.dcm")
    return folder


#: case -> (builder returning the file the error must name (None: the folder), fragments of the
#: reason: what is wrong, and what to do)
CASES = {
    "empty_folder": (_empty, ["folder is empty", "put the series' .dcm files in it"]),
    "no_dicom": (_no_dicom, ["no DICOM file among the 2 file(s)", "put the series' DICOM files in it"]),
    "truncated": (_truncated, ["cannot decode the pixel data", "truncated", "replace it from the archive"]),
    "duplicate_position": (_duplicate_position, ["two different images at the same slice position",
                                                 "0003.dcm", "remove the wrong one"]),
    "missing_position": (_missing_position, ["no ImagePositionPatient", "fix the header or remove"]),
    "gap": (_gap, ["slice spacing is not regular", "5 mm between '0005.dcm'", "add the missing slice"]),
    "non_axial": (_non_axial, ["not an axial image", "needs an axial chest CT series"]),
    "single_slice": (_single_slice, ["only one axial slice", "at least two slices"]),
    "missing_orientation": (_missing_orientation, ["no ImageOrientationPatient (0020,0037)", "'0004.dcm'",
                                                   "fix the header"]),
    "gantry_tilt": (_gantry_tilt, ["gantry tilt of 5.0 deg", "GantryDetectorTilt (0018,1120) says 5 deg",
                                   "resample the series exactly from its per-slice headers"]),
    "repeats": (_repeats, ["2 acquisitions at overlapping slice positions", "acquisition 1: 12 slices",
                           "keep one acquisition's files in this folder"]),
}


@pytest.fixture(scope="module")
def broken_cohort(tmp_path_factory):
    """Ingest the cohort once: (input folder, store path, summary, {case: expected file})."""
    root = tmp_path_factory.mktemp("bad") / "input"
    root.mkdir()
    make_patient(root / GOOD[0], seed=10)
    # 16 x 1.25 mm: 10 slices at 2 mm, just above the model's minimum of 9 (issue 13 refuses fewer at ingest).
    make_patient(root / GOOD[1], seed=11, n_slices=16, spacing=(1.25, 0.8, 0.8))
    # Several series in one folder: the 12-slice series must win over the 5-slice one.
    make_patient(root / "several_series", seed=12, filename="thin{index:03d}.dcm", series_uid="1.2.3.4.5.12")
    make_patient(root / "several_series", seed=13, n_slices=5, spacing=(5.0, 0.75, 0.75),
                 filename="thick{index:03d}.dcm", series_uid="1.2.3.4.5.5")
    expected_files = {}
    for case, (build, _) in CASES.items():
        made = build(root / case)
        expected_files[case] = root / case if made is None or Path(made).is_dir() else Path(made)
    store = root.parent / "cohort.zarr"
    summary = ingest(root, store, chunk_slices=4)
    return root, store, summary, expected_files


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_patient_is_recorded_with_file_and_fix(broken_cohort, case):
    root, store, summary, expected_files = broken_cohort
    fragments = CASES[case][1]
    failures = read_failures(store)
    rows = failures[failures.patient == case]
    assert len(rows) == 1, failures
    row = rows.iloc[0]
    assert row.stage == "ingest"
    assert row.file == str(expected_files[case])
    for fragment in fragments:
        assert fragment in row.reason, row.reason
    assert row.time
    # The summary the CLI prints from carries the same record.
    assert {"patient": case, "stage": "ingest", "file": str(expected_files[case]),
            "reason": row.reason} in summary.failed
    # Nothing of the patient was kept: no group, no staged leftovers.
    cohort = CohortStore(store, mode="r")
    assert not cohort.has_patient(case)
    assert not (store / STAGING_GROUP / case).exists()


def test_other_patients_of_the_run_are_ingested(broken_cohort):
    root, store, summary, _ = broken_cohort
    assert sorted(summary.done) == sorted([*GOOD, "several_series"])
    assert sorted(f["patient"] for f in summary.failed) == sorted(CASES)
    cohort = CohortStore(store, mode="r")
    assert cohort.patients() == sorted([*GOOD, "several_series"])
    for patient in cohort.patients():
        assert cohort.is_complete(patient, "ingest")
        ds = cohort.open_patient(patient)
        hu, _ = dicom.load_hu(root / patient)
        np.testing.assert_array_equal(ds.hu.values, hu)
    assert [p.name for p in (store / STAGING_GROUP).iterdir() if p.is_dir()] == []


def test_on_a_cluster_headers_read_on_workers_give_the_same_failure_records(broken_cohort, tmp_path,
                                                                           cpu_gpu_cluster):
    """With a client, DICOM headers are read on the workers ahead of time: same records, same patients."""
    root, _, summary, _ = broken_cohort
    import distributed

    client, _ = cpu_gpu_cluster
    with distributed.get_task_stream(client) as stream:
        on_cluster = ingest(root, tmp_path / "cluster.zarr", chunk_slices=4, client=client, batch_size=2)
    header_reads = [t for t in stream.data if "_read_series_and_files_task" in str(t["key"])]
    # Every patient folder, broken ones included, had its headers read once, on a worker.
    assert len(header_reads) == len(summary.done) + len(summary.failed)
    assert sorted(on_cluster.done) == sorted(summary.done)
    key = lambda record: record["patient"]  # noqa: E731
    assert sorted(on_cluster.failed, key=key) == sorted(summary.failed, key=key)


def test_several_series_picks_the_right_one(broken_cohort):
    root, store, _, _ = broken_cohort
    attrs = CohortStore(store, mode="r").patient_attrs("several_series")
    assert attrs["series_instance_uid"] == "1.2.3.4.5.12"
    assert attrs["n_files_used"] == 12 and attrs["n_files_skipped"] == 5
    assert attrs["selection_reason"].startswith("most slices (12)")
    assert attrs["lungzarr:stages"]["ingest"]["selection_reason"] == attrs["selection_reason"]


def test_rerun_retries_failed_and_skips_complete(broken_cohort, tmp_path):
    root, store, _, _ = broken_cohort
    store_copy = copy_tree(store, tmp_path / "copy.zarr")
    summary = ingest(root, store_copy, chunk_slices=4)
    assert sorted(summary.skipped) == sorted([*GOOD, "several_series"])
    assert summary.done == []
    assert sorted(f["patient"] for f in summary.failed) == sorted(CASES)
    assert len(read_failures(store_copy)) == len(CASES)     # one record per patient and stage, the latest


def test_fixed_patient_clears_its_failure(tmp_path):
    root = tmp_path / "input"
    make_patient(root / GOOD[0])
    paths = make_patient(root / "gap", seed=1)
    moved = paths[6].rename(tmp_path / paths[6].name)
    store = tmp_path / "cohort.zarr"
    assert [f["patient"] for f in ingest(root, store).failed] == ["gap"]
    moved.rename(paths[6])                                  # the missing slice is found
    summary = ingest(root, store)
    assert summary.done == ["gap"] and summary.skipped == [GOOD[0]]
    assert read_failures(store).empty


@pytest.mark.requires_shared
def test_truncated_lidc_slice(tmp_path, lidc_dir):
    # The LIDC fixture has no truncated file: cut a copy. Its header still reads; decoding says
    # "520064 vs 524288 bytes"-like and the patient is recorded; the good patient goes on.
    root = tmp_path / "input"
    lidc = copy_tree(lidc_dir, root / "LIDC-IDRI-0001")
    victim = sorted(lidc.iterdir())[9]
    size = victim.stat().st_size
    truncate(victim, keep_fraction=1 - 4224 / size)
    dicom.read_header(victim)                               # the header is intact
    make_patient(root / GOOD[0])
    summary = ingest(root, tmp_path / "cohort.zarr", chunk_slices=4)
    assert summary.done == [GOOD[0]]
    (row,) = read_failures(tmp_path / "cohort.zarr").itertuples()
    assert (row.patient, row.stage, row.file) == ("LIDC-IDRI-0001", "ingest", str(victim))
    assert "vs 524288 bytes" in row.reason and "truncated" in row.reason and "replace it" in row.reason


def test_unusable_patient_id_is_recorded(tmp_path):
    root = tmp_path / "input"
    make_patient(root / GOOD[0])
    make_patient(root / "bad name!")
    summary = ingest(root, tmp_path / "cohort.zarr")
    assert summary.done == [GOOD[0]]
    (row,) = read_failures(tmp_path / "cohort.zarr").itertuples()
    assert row.patient == "bad name!" and row.file == str(root / "bad name!")
    assert "cannot name a store group" in row.reason and "rename the folder" in row.reason


# ---------------------------------------------------------------------- paths that do not exist

def test_input_that_does_not_exist(tmp_path):
    store = tmp_path / "cohort.zarr"
    with pytest.raises(LungzarrError, match="does not exist; pass the folder that holds one sub-folder"):
        ingest(tmp_path / "no_such_input", store)
    assert not store.exists()                               # nothing created for nothing


def test_empty_input_folder(tmp_path):
    (tmp_path / "input").mkdir()
    with pytest.raises(LungzarrError, match="is empty; put one folder of DICOM files per patient in it"):
        ingest(tmp_path / "input", tmp_path / "cohort.zarr")


def test_patient_folder_that_does_not_exist():
    with pytest.raises(PatientError) as info:
        dicom.read_series("/nonexistent/lungzarr/P1", patient="P1")
    assert info.value.file == "/nonexistent/lungzarr/P1"
    assert "does not exist" in info.value.reason and "check the INPUT path" in info.value.reason


def test_dangling_patient_link_is_recorded(tmp_path):
    root = tmp_path / "input"
    make_patient(root / GOOD[0])
    (root / "P_moved").symlink_to(tmp_path / "archive_not_mounted" / "P_moved")
    summary = ingest(root, tmp_path / "cohort.zarr")
    assert [f["patient"] for f in summary.failed] == ["P_moved"]
    assert "does not exist" in summary.failed[0]["reason"]


# ---------------------------------------------------------------------- compressed without a decoder

_NO_DECODER = """
import sys
# Block every JPEG Lossless decoder pydicom could use, as on a machine where they are not installed.
for name in ("pylibjpeg", "libjpeg", "openjpeg", "rle", "gdcm"):
    sys.modules[name] = None
from lungzarr.cli import app
app(sys.argv[1:], prog_name="lungzarr")
"""


@pytest.mark.requires_shared
def test_compressed_without_decoder_names_the_package(tmp_path, ricord_dir):
    root = tmp_path / "input"
    ricord = root / "RICORD"
    ricord.mkdir(parents=True)
    files = sorted(ricord_dir.iterdir())[:8]    # 8 x 2.5 mm: 10 slices at 2 mm, enough for the d8 windows
    for f in files:
        shutil.copy(f, ricord)
    make_patient(root / GOOD[0])
    store = tmp_path / "cohort.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-c", _NO_DECODER, "ingest", str(root), str(store),
                           "--scheduler", "threads"], capture_output=True, text=True, env=env, timeout=120)
    out = _flat(proc.stdout + proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert _flat("pip install pylibjpeg pylibjpeg-libjpeg") in out
    (row,) = read_failures(store).itertuples()
    assert row.patient == "RICORD" and row.stage == "ingest"
    lowest = min(ricord.iterdir(), key=lambda f: dicom.read_header(f).position[2])
    assert row.file == str(lowest)                              # the lowest slice, checked before any decode
    assert "no decoder is installed" in row.reason and "pip install pylibjpeg pylibjpeg-libjpeg" in row.reason
    assert CohortStore(store, mode="r").patients() == [GOOD[0]]
    # With the decoders present (this process), the same folder ingests.
    assert ingest(root, store).done == ["RICORD"]


# ---------------------------------------------------------------------- the CLI

def test_cli_exits_non_zero_and_prints_a_summary(broken_cohort, tmp_path):
    root, _, _, expected_files = broken_cohort
    store = tmp_path / "cli.zarr"
    runner = CliRunner()
    picked = ["gap", "empty_folder", "truncated", GOOD[0]]
    args = ["ingest", str(root), str(store), "--scheduler", "threads", "--chunk-slices", "4"]
    for p in picked:
        args += ["--patients", p]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    out = _flat(result.output)
    assert _flat("│ ingest │ 1 │ 0 │ 3 │") in out                 # done, skipped, failed
    for case in ("gap", "empty_folder", "truncated"):
        assert _flat(f"failed {case} (ingest):") in out
        assert _flat(str(expected_files[case])) in out
        assert _flat(CASES[case][1][-1]) in out                 # what to do
    status = runner.invoke(app, ["status", str(store)])
    assert status.exit_code == 0
    assert _flat(f"failed gap (ingest): {CASES['gap'][1][0]}") in _flat(status.output)

    again = runner.invoke(app, args)
    assert again.exit_code == 1
    assert _flat("│ ingest │ 0 │ 1 │ 3 │") in _flat(again.output)


def test_cli_all_good_exits_zero(tmp_path):
    make_patient(tmp_path / "input" / GOOD[0])
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "input"), str(tmp_path / "s.zarr"),
                                      "--scheduler", "threads"])
    assert result.exit_code == 0, result.output
    assert _flat("│ ingest │ 1 │ 0 │ 0 │") in _flat(result.output)


def test_cli_input_that_does_not_exist(tmp_path):
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "nope"), str(tmp_path / "s.zarr"),
                                      "--scheduler", "threads"])
    assert result.exit_code == 2
    assert _flat(f"error: INPUT folder '{tmp_path / 'nope'}' does not exist") in _flat(result.output)
    assert not (tmp_path / "s.zarr").exists()


# ---------------------------------------------------------------------- resumable and atomic

@pytest.fixture
def two_patients(tmp_path):
    root = tmp_path / "input"
    make_patient(root / "P1", seed=1)
    make_patient(root / "P2", seed=2)
    store = tmp_path / "cohort.zarr"
    first = ingest(root, store, chunk_slices=4)
    assert first.done == ["P1", "P2"]
    return root, store


def _stamp(store, patient):
    return CohortStore(store, mode="r").stages(patient)["ingest"]["completed"], \
        (store / "patients" / patient / "hu" / "zarr.json").stat().st_mtime_ns


def test_rerun_skips_complete_patients(two_patients):
    root, store = two_patients
    before = {p: _stamp(store, p) for p in ("P1", "P2")}
    summary = ingest(root, store, chunk_slices=4)
    assert summary.skipped == ["P1", "P2"] and summary.done == [] and summary.ok
    assert {p: _stamp(store, p) for p in ("P1", "P2")} == before


def test_overwrite_redoes_every_patient(two_patients):
    root, store = two_patients
    # New scan data for P1: only a real rewrite can show it.
    for p in (root / "P1").iterdir():
        p.unlink()
    make_patient(root / "P1", seed=99)
    summary = ingest(root, store, chunk_slices=4, overwrite=True)
    assert summary.done == ["P1", "P2"] and summary.skipped == []
    ds = CohortStore(store, mode="r").open_patient("P1")
    np.testing.assert_array_equal(ds.hu.values, dicom.load_hu(root / "P1")[0])


def test_interrupted_ingest_is_redone(two_patients):
    root, store = two_patients
    cohort = CohortStore(store)
    # P1: a run killed between writing metadata and committing left a staged group (no marker).
    series = dicom.read_series(root / "P1")
    from lungzarr.pipeline import ingest_dataset

    cohort.prepare_stage("P1", "ingest", ingest_dataset(series, chunk_slices=4), new_group=True)
    cohort.remove_patient("P1")
    assert (store / STAGING_GROUP / "P1" / "zarr.json").exists()
    # P2: a group without the ingest marker (written, never marked complete).
    attrs = cohort.patient_attrs("P2")
    attrs.pop("lungzarr:stages")
    cohort._group("patients/P2").attrs.put(attrs)
    assert not cohort.is_complete("P2", "ingest")

    summary = ingest(root, store, chunk_slices=4)
    assert summary.done == ["P1", "P2"] and summary.ok
    cohort = CohortStore(store, mode="r")
    for p in ("P1", "P2"):
        assert cohort.is_complete(p, "ingest")
        np.testing.assert_array_equal(cohort.open_patient(p).hu.values, dicom.load_hu(root / p)[0])
    assert not (store / STAGING_GROUP / "P1").exists()


def test_staged_and_marked_patient_is_swapped_in(two_patients):
    # Killed after the marker was written but before the swap: the next open finishes the swap.
    root, store = two_patients
    cohort = CohortStore(store)
    pending = cohort.prepare_stage("P1", "ingest", _dataset(root / "P1"), new_group=True)
    pending.compute()
    staged = cohort._group(f"{STAGING_GROUP}/P1")
    attrs = dict(staged.attrs)
    attrs["lungzarr:stages"] = {"ingest": {"completed": "now"}}
    staged.attrs.put(attrs)
    cohort.remove_patient("P1")
    with CohortStore(store).lock():          # recovery runs for the writer
        pass
    cohort = CohortStore(store, mode="r")
    assert cohort.is_complete("P1", "ingest")
    assert not (store / STAGING_GROUP / "P1").exists()
    assert ingest(root, store).skipped == ["P1", "P2"]


def _dataset(folder):
    from lungzarr.pipeline import ingest_dataset

    return ingest_dataset(dicom.read_series(folder), chunk_slices=4)


@pytest.mark.parametrize("breakage", ["truncated_slice", "gap"])
def test_failed_overwrite_keeps_the_complete_patient(two_patients, breakage):
    root, store = two_patients
    before = CohortStore(store, mode="r").open_patient("P1").hu.values
    stages_before = CohortStore(store, mode="r").stages("P1")
    files = sorted((root / "P1").iterdir())
    if breakage == "truncated_slice":
        truncate(files[9])                       # fails while the voxels are written (in dask)
    else:
        files[5].unlink()                        # fails while the headers are checked
    summary = ingest(root, store, chunk_slices=4, overwrite=True)
    assert summary.done == ["P2"]
    assert [f["patient"] for f in summary.failed] == ["P1"]
    cohort = CohortStore(store, mode="r")
    assert cohort.stages("P1") == stages_before
    np.testing.assert_array_equal(cohort.open_patient("P1").hu.values, before)
    assert cohort.open_patient("P1").hu_2mm.shape == (15, 24, 24)
    assert not (store / STAGING_GROUP / "P1").exists()
    assert list(read_failures(store).patient) == ["P1"]
