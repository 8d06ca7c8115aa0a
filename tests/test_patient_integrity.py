"""Patient data integrity (issue 13, the DICOM reader's side).

Task keys that never collide across inputs (checked on a real LocalCluster),
header values refused before they turn into wrong HU, damaged edge slices
dropped with a warning (``strict`` makes them errors), too-short series
refused at ingest, the warnings a user sees in ``lungzarr status``, and
pydicom's own test corpus as patients and as stray files.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.encaps import encapsulate
from typer.testing import CliRunner

from lungzarr.cli import app
from lungzarr.errors import PatientError
from lungzarr.io import dicom
from lungzarr.io.store import CohortStore, read_failures, read_warnings
from lungzarr.model.geometry import MIN_SLICES_2MM
from lungzarr.pipeline import ingest, ingest_dataset

from dicom_phantoms import (
    SPACING,
    copy_tree,
    edit_header,
    make_patient,
    phantom_volume,
    truncate,
)


def _flat(text: str) -> str:
    return "".join(text.split())


def _failure(store, patient):
    rows = read_failures(store)
    rows = rows[rows.patient == patient]
    assert len(rows) == 1, rows
    return rows.iloc[0]


# ---------------------------------------------------------------------- 1. task keys

@pytest.fixture(scope="module")
def local_cluster():
    """Two workers of one thread behind a real scheduler, in this process: a task key is the scheduler's,
    so two inputs whose decode tasks share a key collide here as they would across processes."""
    import distributed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            yield client


@pytest.mark.requires_shared
def test_same_series_in_two_folders_one_truncated_on_a_cluster(tmp_path, lidc_dir, local_cluster):
    """Before issue 13 the decode tasks were named after the SeriesInstanceUID: B got A's pixels."""
    root = tmp_path / "in"
    copy_tree(lidc_dir, root / "A")
    copy_tree(lidc_dir, root / "B")
    victim = root / "B" / "-110.000000.dcm"
    os.truncate(victim, 300000)
    store = tmp_path / "c.zarr"
    summary = ingest(root, store, client=local_cluster)
    assert summary.done == ["A"]
    row = _failure(store, "B")
    assert row.file == str(victim)
    assert "cannot decode the pixel data" in row.reason and "vs 524288 bytes" in row.reason
    assert "truncated" in row.reason and "replace it from the archive" in row.reason
    expected, _ = dicom.load_hu(lidc_dir)
    np.testing.assert_array_equal(CohortStore(store, mode="r").open_patient("A").hu.values, expected)


@pytest.mark.requires_shared
def test_same_intact_series_in_two_folders_get_their_own_keys(tmp_path, lidc_dir, local_cluster):
    import distributed

    root = tmp_path / "in"
    copy_tree(lidc_dir, root / "A")
    copy_tree(lidc_dir, root / "B")
    store = tmp_path / "c.zarr"
    with distributed.get_task_stream(local_cluster) as stream:
        summary = ingest(root, store, client=local_cluster, batch_size=2)
    assert sorted(summary.done) == ["A", "B"]
    decode_names = {str(t["key"]).split("'")[1] for t in stream.data if "decode-dicom-" in str(t["key"])}
    assert len(decode_names) == 2, decode_names
    expected, _ = dicom.load_hu(lidc_dir)
    cohort = CohortStore(store, mode="r")
    for patient in ("A", "B"):
        np.testing.assert_array_equal(cohort.open_patient(patient).hu.values, expected)
    # The arrays the later stages open from the store are named per patient group too.
    assert cohort.open_patient("A").hu.data.name != cohort.open_patient("B").hu.data.name


def test_decode_name_depends_on_patient_files_and_store(tmp_path):
    paths = make_patient(tmp_path / "A")
    copy_tree(tmp_path / "A", tmp_path / "B")
    a, b = dicom.read_series(tmp_path / "A"), dicom.read_series(tmp_path / "B")
    assert a.headers[0].series_uid == b.headers[0].series_uid
    name = dicom.series_to_hu(a, store="/s1").name
    assert name == dicom.series_to_hu(a, store="/s1").name            # deterministic
    assert name != dicom.series_to_hu(b, store="/s1").name            # other folder, same series
    assert name != dicom.series_to_hu(a, store="/s2").name            # other store
    assert name != dicom.series_to_hu(a, store="/s1", chunk_slices=4).name
    st = paths[5].stat()
    os.utime(paths[5], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))   # the file was rewritten
    assert name != dicom.series_to_hu(a, store="/s1").name
    # The pipeline passes the resolved store path.
    ds = ingest_dataset(a, chunk_slices=4, store=(tmp_path / "c.zarr").resolve())
    assert ds.hu.data.name != ingest_dataset(a, chunk_slices=4, store=tmp_path / "d.zarr").hu.data.name


def test_rewritten_patient_group_opens_under_a_new_name(tmp_path):
    """xarray names store arrays from (store, mtime, group): a re-ingest must not reuse a key."""
    root = tmp_path / "in"
    make_patient(root / "P", seed=1)
    store = tmp_path / "c.zarr"
    ingest(root, store)
    before = CohortStore(store, mode="r").open_patient("P").hu.data.name
    shutil.rmtree(root / "P")
    make_patient(root / "P", seed=2)
    ingest(root, store, overwrite=True)
    after = CohortStore(store, mode="r").open_patient("P").hu
    assert after.data.name != before
    np.testing.assert_array_equal(after.values, dicom.load_hu(root / "P")[0])


# ---------------------------------------------------------------------- 2. header values

HEADER_CASES = {
    "slope_nan": ({"RescaleSlope": "nan"}, "RescaleSlope (0028,1053) is nan"),
    "slope_inf": ({"RescaleSlope": "inf"}, "RescaleSlope (0028,1053) is inf"),
    "slope_zero": ({"RescaleSlope": 0}, "RescaleSlope (0028,1053) is 0.0"),
    "slope_negative": ({"RescaleSlope": -1}, "RescaleSlope (0028,1053) is -1.0"),
    "slope_absurd": ({"RescaleSlope": 1000}, "RescaleSlope (0028,1053) is 1000.0"),
    "slope_tiny": ({"RescaleSlope": "1e-5"}, "RescaleSlope (0028,1053) is 1e-05"),
    "intercept_nan": ({"RescaleIntercept": "nan"}, "RescaleIntercept (0028,1052) is nan"),
    "intercept_absurd": ({"RescaleIntercept": 1e6}, "RescaleIntercept (0028,1052) is 1000000.0"),
    "position_nan": ({"ImagePositionPatient": ["nan", "0", "0"]}, "ImagePositionPatient (0020,0032) is [nan"),
}
SPACING_CASES = {
    "pixel_spacing_zero": ([0, 0.75], "PixelSpacing (0028,0030) is [0.0, 0.75]"),
    "pixel_spacing_nan": (["nan", 0.75], "PixelSpacing (0028,0030) is [nan, 0.75]"),
    "pixel_spacing_negative": ([-0.7, 0.75], "PixelSpacing (0028,0030) is [-0.7, 0.75]"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_implausible_header_value_names_file_and_tag(tmp_path, case):
    values, fragment = HEADER_CASES[case]
    paths = make_patient(tmp_path / case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # pydicom warns on a DS of "nan"
        edit_header(paths[3], **values)
    with pytest.raises(PatientError) as info:
        dicom.read_series(tmp_path / case)
    assert info.value.file == str(paths[3])
    assert fragment in info.value.reason, info.value.reason
    assert "fix" in info.value.reason


@pytest.mark.parametrize("case", sorted(SPACING_CASES))
def test_non_positive_pixel_spacing_is_refused(tmp_path, case):
    value, fragment = SPACING_CASES[case]
    paths = make_patient(tmp_path / case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in paths:
            edit_header(p, PixelSpacing=value)
    with pytest.raises(PatientError) as info:
        dicom.read_series(tmp_path / case)
    assert fragment in info.value.reason and "positive finite" in info.value.reason, info.value.reason
    assert info.value.file == str(paths[0])


def test_header_values_in_the_cohort_are_recorded_not_unexpected(tmp_path):
    """Through ingest: recorded failures with the tag, never "unexpected ... please report"."""
    root = tmp_path / "in"
    make_patient(root / "good")
    for case in ("slope_nan", "intercept_nan"):
        paths = make_patient(root / case)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edit_header(paths[0], **HEADER_CASES[case][0])
    paths = make_patient(root / "pixel_spacing_zero")
    for p in paths:
        edit_header(p, PixelSpacing=[0, 0.75])
    store = tmp_path / "c.zarr"
    summary = ingest(root, store)
    assert summary.done == ["good"]
    for case, fragment in [("slope_nan", "RescaleSlope (0028,1053) is nan"),
                           ("intercept_nan", "RescaleIntercept (0028,1052) is nan"),
                           ("pixel_spacing_zero", "PixelSpacing (0028,0030) is [0.0, 0.75]")]:
        reason = _failure(store, case).reason
        assert fragment in reason and "unexpected" not in reason, reason


def _rgb_capture(src: Path, dst: Path) -> Path:
    """A secondary-capture style RGB image (its own series) made from one slice's header."""
    ds = pydicom.dcmread(src)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()
    ds.SOPInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.save_as(dst)
    return dst


def test_stray_rgb_image_is_skipped_and_alone_is_refused(tmp_path):
    paths = make_patient(tmp_path / "P")
    capture = _rgb_capture(paths[0], tmp_path / "P" / "capture.dcm")
    series = dicom.read_series(tmp_path / "P")
    assert series.paths == [str(p) for p in paths]
    (why,) = [r for f, r in series.skipped if f == str(capture)]
    assert why.startswith("not a greyscale CT image") and "'RGB'" in why
    (tmp_path / "only").mkdir()
    shutil.copy(capture, tmp_path / "only" / "capture.dcm")
    with pytest.raises(PatientError) as info:
        dicom.read_series(tmp_path / "only")
    assert "not a greyscale CT image" in info.value.reason


def test_unsupported_syntax_inside_the_stack_fails_before_decoding(tmp_path):
    paths = make_patient(tmp_path / "P")
    ds = pydicom.dcmread(paths[5])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"           # MPEG2
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[5])
    with pytest.raises(PatientError) as info:
        dicom.read_series(tmp_path / "P")
    assert info.value.file == str(paths[5])
    assert "1.2.840.10008.1.2.4.100 is not supported" in info.value.reason and "gdcmconv" in info.value.reason


# ---------------------------------------------------------------------- 3. damaged edge slices

@pytest.fixture
def edge_damaged(tmp_path):
    root = tmp_path / "in"
    paths = make_patient(root / "P", n_slices=14)
    make_patient(root / "good", seed=3)
    truncate(paths[0])
    truncate(paths[-1], keep_fraction=0.5)
    return root, paths


def test_damaged_edge_slices_are_dropped_with_a_warning(edge_damaged, tmp_path):
    root, paths = edge_damaged
    store = tmp_path / "c.zarr"
    summary = ingest(root, store, chunk_slices=4)
    assert sorted(summary.done) == ["P", "good"]
    cohort = CohortStore(store, mode="r")
    ds = cohort.open_patient("P")
    assert ds.sizes["z"] == 12
    expected = dicom.decode_slices_to_hu([str(p) for p in paths[1:-1]], [1] * 12, [-1024] * 12)
    np.testing.assert_array_equal(ds.hu.values, expected)
    dropped = ds.attrs["dropped_edge_slices"]
    assert [d["file"] for d in dropped] == [str(paths[0]), str(paths[-1])]
    assert "lower end" in dropped[0]["reason"] and "upper end" in dropped[1]["reason"]
    assert "bytes of PixelData (7FE0,0010)" in dropped[0]["reason"]
    recorded = read_warnings(store)
    mine = recorded[(recorded.patient == "P") & (recorded.stage == "ingest")]
    assert sorted(mine.file) == sorted([str(paths[0]), str(paths[-1])])
    assert all("dropped" in r for r in mine.reason)
    # `lungzarr status` shows them.
    out = CliRunner().invoke(app, ["status", str(store)], env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    assert _flat(paths[0].name) in _flat(out.output) and "dropped" in out.output
    # The files are replaced: a re-ingest keeps every slice and clears the warnings.
    shutil.rmtree(root / "P")
    make_patient(root / "P", n_slices=14)
    ingest(root, store, overwrite=True, patients=["P"])
    assert CohortStore(store, mode="r").open_patient("P").sizes["z"] == 14
    recorded = read_warnings(store)
    assert recorded[recorded.patient == "P"].empty


def test_strict_makes_a_damaged_edge_slice_an_error(edge_damaged, tmp_path):
    root, paths = edge_damaged
    store = tmp_path / "c.zarr"
    summary = ingest(root, store, strict=True)
    assert summary.done == ["good"]
    row = _failure(store, "P")
    assert row.file == str(paths[0]) and "--strict" in row.reason and "truncated" in row.reason
    # The CLI flag, on ingest and run.
    cli_store = tmp_path / "cli.zarr"
    out = CliRunner().invoke(app, ["ingest", str(root), str(cli_store), "--scheduler", "threads", "--strict"],
                             env={"COLUMNS": "300"})
    assert out.exit_code == 1, out.output
    assert _failure(cli_store, "P").file == str(paths[0])
    help_text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "300"}).output
    assert "--strict" in help_text


def test_damaged_slice_inside_the_stack_stays_an_error(tmp_path):
    paths = make_patient(tmp_path / "P", n_slices=14)
    truncate(paths[6])
    truncate(paths[0])
    with pytest.raises(PatientError) as info:
        dicom.read_series(tmp_path / "P")
    assert info.value.file == str(paths[6])
    assert "cannot decode the pixel data" in info.value.reason and "replace it from the archive" in info.value.reason


@pytest.mark.requires_shared
def test_compressed_damaged_edge_is_caught_by_decoding_the_edges(tmp_path, ricord_dir):
    files = sorted(ricord_dir.iterdir(), key=lambda f: dicom.read_header(f).position[2])[:10]
    folder = tmp_path / "RICORD"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder)
    top = folder / files[-1].name
    truncate(top, keep_fraction=0.5)
    series = dicom.read_series(folder)
    assert series.shape[0] == 9 and str(top) not in series.paths
    (dropped,) = series.dropped
    assert dropped["file"] == str(top) and "cannot decode the pixel data" in dropped["reason"]
    with pytest.raises(PatientError) as info:
        dicom.read_series(folder, strict=True)
    assert info.value.file == str(top)
    # Inside the stack a compressed slice is decoded only when its chunk is: today's message then.
    shutil.copy(files[-1], top)
    inside = folder / files[4].name
    truncate(inside, keep_fraction=0.5)
    series = dicom.read_series(folder)
    with pytest.raises(PatientError) as info:
        dicom.series_to_hu(series, chunk_slices=4).compute(scheduler="sync")
    assert info.value.file == str(inside) and "truncated or damaged" in info.value.reason


# ---------------------------------------------------------------------- 4. too few slices

def test_series_too_short_for_the_windows_is_refused_at_ingest(tmp_path):
    root = tmp_path / "in"
    make_patient(root / "short", n_slices=6)           # 15 mm: 8 slices at 2 mm
    make_patient(root / "good")
    store = tmp_path / "c.zarr"
    summary = ingest(root, store)
    assert summary.done == ["good"]
    row = _failure(store, "short")
    assert row.stage == "ingest" and row.file == str(root / "short")
    assert f"the d8 nodule windows need at least {MIN_SLICES_2MM}" in row.reason and "8 slices at 2 mm" in row.reason
    assert MIN_SLICES_2MM == 9


# ---------------------------------------------------------------------- 5. warnings

def test_warnings_for_other_patients_several_ids_and_non_dicom_files(tmp_path):
    root = tmp_path / "in"
    paths = make_patient(root / "P", seed=1)
    edit_header(paths[4], PatientID="SOMEONE-ELSE")
    dicom.write_series(phantom_volume(4, seed=2), root / "P", spacing=SPACING, patient_id="Q-42",
                       filename="other{index:02d}.dcm")
    (root / "P" / "notes.txt").write_text("report\n")
    store = tmp_path / "c.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = ingest(root, store)
    assert summary.done == ["P"]
    recorded = read_warnings(store)
    reasons = " | ".join(recorded[recorded.patient == "P"].reason)
    assert "skipped 4 file(s) of another patient (PatientID ['Q-42']" in reasons
    assert "the chosen series holds 2 PatientIDs" in reasons and "SOMEONE-ELSE" in reasons
    assert "ignored 1 non-DICOM file(s) in the folder: 'notes.txt'" in reasons
    out = CliRunner().invoke(app, ["status", str(store)], env={"COLUMNS": "300"})
    assert "Q-42" in out.output and "notes.txt" in out.output


# ---------------------------------------------------------------------- 6. pydicom's corpus

def _corpus_files() -> list[Path]:
    """pydicom's own test files present here (never downloaded)."""
    base = Path(pydicom.__file__).parent / "data" / "test_files"
    local = [*base.rglob("*"), *map(Path, pydicom.data.get_testdata_files())]
    return sorted({p.resolve() for p in local if p.is_file()})


def test_pydicom_corpus_each_file_as_a_patient_is_a_clear_failure(tmp_path):
    files = _corpus_files()
    assert len(files) > 50
    root = tmp_path / "in"
    for i, f in enumerate(files):
        (root / f"f{i:03d}").mkdir(parents=True)
        shutil.copy(f, root / f"f{i:03d}" / f.name)
    store = tmp_path / "c.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = ingest(root, store)
    assert len(summary.done) + len(summary.failed) == len(files)
    for patient in summary.done:       # a usable axial CT: it must be one
        assert CohortStore(store, mode="r").patient_attrs(patient)["n_files_used"] >= 2
    for record in summary.failed:
        assert "unexpected" not in record["reason"] and "please report" not in record["reason"], record
        assert record["file"], record


@pytest.fixture(scope="module")
def corpus_strays(tmp_path_factory):
    """One good 10-slice series per corpus file, the file dropped into it: (root, {patient: file}, hu)."""
    tmp = tmp_path_factory.mktemp("strays")
    ref = make_patient(tmp / "ref", n_slices=10, size=32)
    expected, _ = dicom.load_hu(tmp / "ref")
    root, strays = tmp / "in", {}
    for i, f in enumerate(_corpus_files()):
        # The good series' PatientID is its folder's name: a stray CT of another PatientID is then told apart
        # by it (in a folder of several PatientIDs none of which is its name, no series is the folder's own).
        make_patient(root / f"f{i:03d}", n_slices=10, size=32)
        strays[f"f{i:03d}"] = shutil.copy(f, root / f"f{i:03d}" / f"zz_{f.name}")
    return root, strays, [p.name for p in ref], expected


def test_pydicom_corpus_each_file_as_a_stray_is_not_chosen(corpus_strays):
    """Headers only (fast): the series read is the good one, whatever the stray file is."""
    root, strays, names, _ = corpus_strays
    for patient, stray in strays.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            series = dicom.read_series(root / patient)
        assert [Path(p).name for p in series.paths] == names, stray
        assert str(stray) in {f for f, _ in series.skipped}, stray


@pytest.mark.slow
def test_pydicom_corpus_each_file_as_a_stray_leaves_the_series_unchanged(corpus_strays, tmp_path):
    """The whole ingest of every such folder (~30 s on 2 busy cores): hu unchanged."""
    root, strays, _, expected = corpus_strays
    store = tmp_path / "c.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = ingest(root, store)
    assert summary.failed == [] and sorted(summary.done) == sorted(strays)
    cohort = CohortStore(store, mode="r")
    for patient in summary.done:
        np.testing.assert_array_equal(cohort.open_patient(patient).hu.values, expected, err_msg=patient)


def test_files_taken_on_the_worker_give_the_decode_names_taken_in_the_client(tmp_path):
    # The pipeline stats the files where it reads the headers and hands the result to series_to_hu.
    make_patient(tmp_path / "A")
    a = dicom.read_series(tmp_path / "A")
    files = dicom.files_token(a.paths)
    assert dicom.series_to_hu(a, store="/s1", files=files).name == dicom.series_to_hu(a, store="/s1").name
    with pytest.raises(ValueError, match="files_token"):
        dicom.series_to_hu(a, store="/s1", files=files[:-1])
