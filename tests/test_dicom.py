"""DICOM reading: series choice, validation, HU conversion (docs/algorithms.md §1), lazy decoding."""
from __future__ import annotations

import warnings
from pathlib import Path

import dask
import numpy as np
import pydicom
import pytest

from lungzarr.errors import PatientError
from lungzarr.io import dicom
from lungzarr.volume import z_chunks

from dicom_phantoms import SPACING, edit_header, fixture_hu, make_patient, phantom_volume

# ---------------------------------------------------------------------- an independent reference

def reference_hu(folder, *, every: int = 1) -> np.ndarray:
    """docs/algorithms.md §1 written out straight with pydicom, as the original did it.

    Reads the files of ``folder`` (one series, one acquisition), sorts by
    ``float(ImagePositionPatient[2])``, stacks ``pixel_array`` as int16, sets
    stored -2000 to 0, then per slice: slope != 1 -> float64 multiply and back to
    int16; add ``int16(intercept)``. ``every`` > 1 keeps every n-th slice in z
    order (to spare decoding a long compressed series twice).
    """
    slices = _files_in_z_order(folder)[::every]
    slices = [pydicom.dcmread(s.filename) for s in slices]
    slices.sort(key=lambda s: float(s.ImagePositionPatient[2]))
    image = np.stack([s.pixel_array for s in slices]).astype(np.int16)
    image[image == -2000] = 0
    for k, s in enumerate(slices):
        slope, intercept = s.RescaleSlope, s.RescaleIntercept
        if slope != 1:
            image[k] = slope * image[k].astype(np.float64)
            image[k] = image[k].astype(np.int16)
        image[k] += np.int16(intercept)
    return image


def _files_in_z_order(folder):
    files = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(Path(folder).iterdir())]
    return sorted(files, key=lambda ds: float(ds.ImagePositionPatient[2]))


# ---------------------------------------------------------------------- real fixtures

@pytest.mark.requires_shared
@pytest.mark.parametrize("which", ["lidc", "ricord"])
def test_fixture_series_header_facts(which, lidc_dir, ricord_dir):
    folder = {"lidc": lidc_dir, "ricord": ricord_dir}[which]
    headers = _files_in_z_order(folder)
    series = dicom.read_series(folder)

    first = headers[0]
    ipp = [float(v) for v in first.ImagePositionPatient]
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in headers])

    assert series.patient == Path(folder).name
    assert series.shape == (len(headers), int(first.Rows), int(first.Columns))
    assert series.slice_spacing == pytest.approx(abs(z[1] - z[0]))
    assert series.spacing == pytest.approx((abs(z[1] - z[0]), row_mm, col_mm))
    # Grid in patient millimetres: origin = IPP of the lowest slice (z, y, x), steps from IPP and PixelSpacing.
    assert series.grid.origin == pytest.approx((z[0], ipp[1], ipp[0]))
    assert series.grid.step == pytest.approx(((z[-1] - z[0]) / (len(z) - 1), row_mm, col_mm))
    np.testing.assert_allclose(series.grid.axis(0), z, atol=1e-6)
    assert dicom.sop_uids(series) == [str(ds.SOPInstanceUID) for ds in headers]
    assert series.reason.startswith("the only axial CT series")
    assert series.skipped == []
    prov = series.provenance()
    assert prov["series_instance_uid"] == str(first.SeriesInstanceUID)
    assert prov["n_files_used"] == len(headers)
    assert prov["transfer_syntax"] == str(first.file_meta.TransferSyntaxUID)


@pytest.mark.requires_shared
def test_lidc_has_no_acquisition_number_and_reads(lidc_dir):
    # The original raised AttributeError here (x.AcquisitionNumber); lungzarr treats it as one acquisition.
    assert all("AcquisitionNumber" not in ds for ds in _files_in_z_order(lidc_dir))
    series = dicom.read_series(lidc_dir)
    assert series.headers[0].acquisition is None
    assert series.shape == (16, 512, 512)
    assert series.spacing == pytest.approx((2.5, 0.703125, 0.703125))


@pytest.mark.requires_shared
@pytest.mark.parametrize("which", ["lidc", "ricord"])
def test_fixture_hu_equals_straight_computation(which, lidc_dir, ricord_dir):
    folder = {"lidc": lidc_dir, "ricord": ricord_dir}[which]
    hu, grid = fixture_hu(str(folder))
    every = {"lidc": 1, "ricord": 8}[which]
    expected = reference_hu(folder, every=every)
    assert hu.dtype == np.int16
    assert hu.shape == grid.shape
    assert hu[::every].shape == expected.shape
    np.testing.assert_array_equal(hu[::every], expected)


@pytest.mark.requires_shared
def test_fixture_load_hu_equals_lazy_path(lidc_dir):
    # load_hu (whole series in memory) and series_to_hu (chunks) agree; RICORD is covered through
    # the straight computation above, which both paths equal.
    hu, grid = dicom.load_hu(lidc_dir)
    lazy, lazy_grid = fixture_hu(str(lidc_dir))
    np.testing.assert_array_equal(hu, lazy)
    assert grid == lazy_grid


@pytest.mark.requires_shared
def test_ricord_padding_becomes_intercept(ricord_dir):
    # RICORD stores the cylinder padding as -2000 (signed, JPEG Lossless): it must become 0 + intercept.
    headers = _files_in_z_order(ricord_dir)
    first = pydicom.dcmread(headers[0].filename)
    assert str(first.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"
    stored = first.pixel_array
    padding = stored == dicom.PADDING_VALUE
    assert padding.any()
    hu, _ = fixture_hu(str(ricord_dir))
    assert np.all(hu[0][padding] == np.int16(first.RescaleIntercept))
    # Everywhere else it is stored + intercept (slope 1 on this series).
    np.testing.assert_array_equal(hu[0][~padding], (stored[~padding] + int(first.RescaleIntercept)).astype(np.int16))
    assert hu.min() >= -1024  # nothing of the padding survives as -3024


# ---------------------------------------------------------------------- HU conversion on hand-made files

def _rewrite_pixels(path, stored, *, slope, intercept, signed=True):
    """Replace a file's pixel data by ``stored`` values with the given rescale."""
    ds = pydicom.dcmread(path)
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.asarray(stored, dtype=np.int16 if signed else np.uint16).tobytes()
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.save_as(path)


def test_hu_padding_rule_and_per_slice_slope(tmp_path):
    folder = tmp_path / "P"
    paths = make_patient(folder, n_slices=4, size=16)
    rng = np.random.default_rng(3)
    stored = rng.integers(-1500, 2500, size=(4, 16, 16)).astype(np.int16)
    stored[:, 0, :3] = -2000           # cylinder padding in every slice
    stored[:, 1, 0] = -3               # slope 0.5: -1.5 truncates to -1 (toward zero, not floor)
    stored[:, 1, 1] = 7                # slope 0.5: 3.5 truncates to 3
    rescale = [(1.0, -1024.0), (0.5, -1000.0), (2.0, 0.0), (1.0, -1024.0)]
    for p, s, (slope, intercept) in zip(paths, stored, rescale):
        _rewrite_pixels(p, s, slope=slope, intercept=intercept)

    hu, _ = dicom.load_hu(folder)
    np.testing.assert_array_equal(hu, reference_hu(folder))
    # The rule spelled out on single voxels.
    assert np.all(hu[:, 0, :3] == np.array([-1024, -1000, 0, -1024])[:, None])  # -2000 -> 0, then rescale
    assert hu[1, 1, 0] == -1 - 1000 and hu[1, 1, 1] == 3 - 1000
    assert hu[2, 1, 0] == -6 and hu[2, 1, 1] == 14
    assert hu[0, 1, 0] == -3 - 1024
    # Slopes are per slice (the original's 31.01.2017 fix), recorded in the provenance.
    series = dicom.read_series(folder)
    assert series.provenance()["rescale_slopes"] == [0.5, 1.0, 2.0]


def test_hu_unsigned_storage_above_int16_is_refused_not_wrapped(tmp_path):
    # Unsigned stored 40000: the original's astype(np.int16) wrapped it to -25536 (-26560 HU, "lung"); the
    # decode is wide now and refuses a value int16 cannot hold, naming the file (tests/test_hu_rules.py).
    folder = tmp_path / "P"
    volume = phantom_volume(3, 16).astype(np.int32)
    volume[1, 5, 5] = 40000 - 1024      # stored 40000 (uint16)
    paths = dicom.write_series(volume, folder, spacing=SPACING)
    with pytest.raises(PatientError, match=r"values -1024 .. 38976 HU \(stored 0 .. 40000 \(unsigned 16-bit\)") \
            as info:
        dicom.load_hu(folder)
    assert info.value.file == str(paths[1])
    # Values that fit are the original's exactly.
    ok = tmp_path / "OK"
    volume[1, 5, 5] = 30000
    dicom.write_series(volume, ok, spacing=SPACING)
    hu, _ = dicom.load_hu(ok)
    np.testing.assert_array_equal(hu, reference_hu(ok))
    np.testing.assert_array_equal(hu, volume)


def test_write_series_round_trips_hu_and_grid(tmp_path):
    volume = phantom_volume(5, 20, seed=4)
    dicom.write_series(volume, tmp_path / "P", spacing=(1.25, 0.8, 0.9), origin=(-50.0, 10.0, -20.0))
    hu, grid = dicom.load_hu(tmp_path / "P")
    np.testing.assert_array_equal(hu, volume)
    assert grid.shape == volume.shape
    assert grid.origin == pytest.approx((-50.0, 10.0, -20.0))
    assert grid.step == pytest.approx((1.25, 0.8, 0.9))


def test_slices_sorted_by_position_not_file_name(tmp_path):
    folder = tmp_path / "P"
    volume = phantom_volume(6, 16, seed=5)
    # File names run against z: 0005.dcm is the lowest slice.
    dicom.write_series(volume, folder, spacing=SPACING, filename="tmp{index:04d}.dcm")
    for k in range(6):
        (folder / f"tmp{k:04d}.dcm").rename(folder / f"{5 - k:04d}.dcm")
    hu, grid = dicom.load_hu(folder)
    np.testing.assert_array_equal(hu, volume)
    assert grid.step[0] > 0


# ---------------------------------------------------------------------- series choice

def test_several_series_in_one_folder_most_slices_wins(tmp_path):
    folder = tmp_path / "P"
    thin = make_patient(folder, n_slices=12, filename="thin{index:03d}.dcm", series_uid="1.2.3.4.100")
    thick = make_patient(folder, n_slices=5, spacing=(5.0, 0.75, 0.75), filename="thick{index:03d}.dcm",
                         series_uid="1.2.3.4.200")
    series = dicom.read_series(folder)
    assert series.paths == [str(p) for p in thin]
    assert series.headers[0].series_uid == "1.2.3.4.100"
    assert "most slices (12)" in series.reason and "5 slices" in series.reason
    skipped = dict(series.skipped)
    assert set(skipped) == {str(p) for p in thick}
    assert all("not chosen" in why for why in skipped.values())


@pytest.mark.parametrize("sizes", [(6, 9), (9, 6), (7, 7)])
def test_two_acquisitions_at_the_same_positions_are_a_choice_spelled_out(tmp_path, sizes):
    # Two acquisitions of one series over the same z range (repeats, phases; 0.3 mm apart): lungzarr used
    # to keep the larger one in silence. Now the patient fails with each acquisition and how to pick one.
    folder = tmp_path / "P"
    uid = "1.2.826.0.1.3680043.8.498.77"
    for acq, n in zip((1, 2), sizes):
        make_patient(folder, n_slices=n, acquisition=acq, series_uid=uid,
                     origin=(-100.0 + 0.3 * acq, -20.0, -30.0), filename=f"a{acq}_{{index:03d}}.dcm")
    with pytest.raises(PatientError, match="2 acquisitions at overlapping slice positions") as info:
        dicom.read_series(folder)
    reason = info.value.reason
    assert f"acquisition 1: {sizes[0]} slices" in reason and f"acquisition 2: {sizes[1]} slices" in reason
    assert "keep one acquisition's files in this folder" in reason
    assert info.value.file == str(folder)


def test_step_and_shoot_acquisitions_are_one_volume(tmp_path):
    # AcquisitionNumbers 4,4,5,5 over one regular stack (as GE step-and-shoot numbers each table position):
    # all 4 slices are one volume, in z order.
    folder = tmp_path / "P"
    volume = phantom_volume(4, 16, seed=2)
    paths = dicom.write_series(volume, folder, spacing=(5.0, 0.75, 0.75), origin=(-10.0, 0.0, 0.0))
    for k, p in enumerate(paths):
        edit_header(p, AcquisitionNumber=4 if k < 2 else 5)
    series = dicom.read_series(folder)
    assert series.paths == [str(p) for p in paths]
    assert series.skipped == []
    assert "acquisitions 4 (2 slices), 5 (2 slices) of the series form one stack" in series.reason
    hu, grid = dicom.load_hu(folder)
    np.testing.assert_array_equal(hu, volume)
    assert grid.step[0] == pytest.approx(5.0)


def test_a_gap_between_acquisitions_names_the_missing_positions(tmp_path):
    # The same 4,4,5,5 with the 10 mm gap of dicom2nifti's sliceincrement_001: an error naming z = 0 mm.
    folder = tmp_path / "P"
    paths = dicom.write_series(phantom_volume(5, 16), folder, spacing=(5.0, 0.75, 0.75), origin=(-10.0, 0.0, 0.0))
    paths[2].unlink()
    for k, p in enumerate([paths[0], paths[1], paths[3], paths[4]]):
        edit_header(p, AcquisitionNumber=4 if k < 2 else 5)
    with pytest.raises(PatientError, match=r"the stack has a gap, 1 slice\(s\) missing at z = 0 mm") as info:
        dicom.read_series(folder)
    assert "acquisitions [4, 5]" in info.value.reason
    assert info.value.file == str(paths[3])


@pytest.mark.requires_shared
@pytest.mark.parametrize("other_origin_z, merged", [(-92.5, True), (-400.0, False)])
def test_missing_acquisition_number_beside_a_numbered_one(tmp_path, lidc_dir, other_origin_z, merged):
    # LIDC files (no AcquisitionNumber) beside a numbered acquisition of the same series: right above the
    # LIDC slab they continue its stack (one volume of 26 slices); far below, the gap is an error naming
    # the missing positions (lungzarr used to keep the larger acquisition and drop the other in silence).
    folder = tmp_path / "P"
    folder.mkdir()
    lidc = _files_in_z_order(lidc_dir)
    for ds in lidc:
        (folder / Path(ds.filename).name).write_bytes(Path(ds.filename).read_bytes())
    make_patient(folder, n_slices=10, size=512, acquisition=3, series_uid=str(lidc[0].SeriesInstanceUID),
                 patient_id=str(lidc[0].PatientID),
                 spacing=(2.5, 0.703125, 0.703125), origin=(other_origin_z, -171.699997, -166.0),
                 filename="acq3_{index:03d}.dcm")
    if merged:
        series = dicom.read_series(folder)
        assert len(series.headers) == 26 and series.skipped == []
        assert "acquisitions without AcquisitionNumber (16 slices), 3 (10 slices)" in series.reason
        assert series.grid.step[0] == pytest.approx(2.5)
    else:
        with pytest.raises(PatientError, match=r"gap, 97 slice\(s\) missing at z = -375, -372.5, .* -135 mm"):
            dicom.read_series(folder)


def test_localizer_and_non_axial_images_are_dropped(tmp_path):
    folder = tmp_path / "P"
    axial = make_patient(folder, n_slices=8)
    scout = make_patient(tmp_path / "scout", n_slices=1, size=32, filename="scout.dcm")[0]
    edit_header(scout, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    sagittal = make_patient(tmp_path / "sag", n_slices=3, filename="sag{index}.dcm")
    for p in sagittal:
        edit_header(p, ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    for p in [scout, *sagittal]:
        p.rename(folder / p.name)
    series = dicom.read_series(folder)
    assert series.paths == [str(p) for p in axial]
    reasons = dict(series.skipped)
    assert "localizer" in reasons[str(folder / "scout.dcm")]
    assert all("not an axial image" in reasons[str(folder / p.name)] for p in sagittal)
    assert series.provenance()["n_files_skipped"] == 4
    # The skipped images reach `status` (the run's warnings), not only the provenance.
    (record,) = series.warning_records()
    assert "skipped 4 image(s) that are not slices of an axial CT series" in record["reason"]


def test_nested_patient_study_series_tree(tmp_path):
    patient = tmp_path / "P7"
    main = make_patient(patient / "study1" / "series_axial", n_slices=10, patient_id="P7")
    make_patient(patient / "study1" / "series_thick", n_slices=3, spacing=(5.0, 0.75, 0.75), patient_id="P7")
    (patient / "study1" / "README.txt").write_text("exported by a PACS\n")
    (patient / "DICOMDIR.json").write_text("{}")
    with pytest.warns(UserWarning, match="ignored 2 non-DICOM file"):
        series = dicom.read_series(patient)
    assert series.patient == "P7"
    assert series.paths == [str(p) for p in main]
    reasons = dict(series.skipped)
    assert reasons[str(patient / "study1" / "README.txt")] == "not a DICOM file"
    assert len(series.skipped) == 2 + 3


def test_exact_duplicate_file_is_skipped_not_an_error(tmp_path):
    folder = tmp_path / "P"
    paths = make_patient(folder, n_slices=6)
    (folder / "copy_of_0002.dcm").write_bytes(paths[2].read_bytes())
    series = dicom.read_series(folder)
    assert len(series.headers) == 6
    assert any("same SOPInstanceUID" in why for _, why in series.skipped)


def test_read_series_errors_name_the_file(tmp_path):
    folder = tmp_path / "P"
    paths = make_patient(folder, n_slices=5)
    edit_header(paths[3], ImagePositionPatient=None)
    with pytest.raises(PatientError) as info:
        dicom.read_series(folder)
    assert info.value.file == str(paths[3])
    assert info.value.patient == "P" and info.value.stage == "ingest"
    assert "ImagePositionPatient" in str(info.value)


# ---------------------------------------------------------------------- laziness

def test_read_series_reads_headers_only(tmp_path, monkeypatch):
    make_patient(tmp_path / "P", n_slices=6)
    calls = []
    real = pydicom.dcmread

    def spy(path, *args, **kwargs):
        calls.append(kwargs.get("stop_before_pixels", False))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", spy)
    dicom.read_series(tmp_path / "P")
    assert len(calls) >= 6 and all(calls)


@pytest.mark.parametrize("chunk_slices", [1, 5, 16])
def test_series_to_hu_is_lazy_and_equals_load_hu(tmp_path, monkeypatch, chunk_slices):
    make_patient(tmp_path / "P", n_slices=12)
    series = dicom.read_series(tmp_path / "P")
    decoded = []
    real = dicom.decode_slices_to_hu

    def counting(paths, *args, **kwargs):
        decoded.append(len(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(dicom.series, "decode_slices_to_hu", counting)  # where series_to_hu looks it up
    hu = dicom.series_to_hu(series, chunk_slices=chunk_slices)
    assert isinstance(hu, dask.array.Array)
    assert hu.dtype == np.int16 and hu.shape == series.shape
    assert hu.chunks[0] == z_chunks(12, chunk_slices)
    assert hu.chunks[1:] == ((64,), (64,))
    assert decoded == []                       # building the graph decodes nothing
    one_chunk = hu[:chunk_slices].compute(scheduler="sync")
    assert decoded == [min(chunk_slices, 12)]  # a chunk decodes only its own files
    values = hu.compute(scheduler="sync")
    assert sum(decoded) == 12 + min(chunk_slices, 12)
    monkeypatch.undo()
    expected, _ = dicom.load_hu(tmp_path / "P")
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(one_chunk, expected[:chunk_slices])


def test_decode_error_inside_a_chunk_names_the_file(tmp_path):
    paths = make_patient(tmp_path / "P", n_slices=6)
    series = dicom.read_series(tmp_path / "P")
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[: len(data) - 1000])
    hu = dicom.series_to_hu(series, chunk_slices=2)
    hu[:4].compute(scheduler="sync")          # the other chunks still decode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PatientError) as info:
            hu.compute(scheduler="sync")
    assert info.value.file == str(paths[4])
    assert "truncated" in info.value.reason and "replace it" in info.value.reason


# ---------------------------------------------------------------------- refusals that name every defect

def _tilt_iop(paths, degrees, *, tag=True):
    """Gantry tilt as a scanner writes it: column cosine (0, cos t, sin t), IPP stepping along the table."""
    t = np.radians(degrees)
    for p in paths:
        extra = {"GantryDetectorTilt": f"{degrees:g}"} if tag else {}
        edit_header(p, ImageOrientationPatient=[f"{v:.10g}" for v in (1, 0, 0, 0, np.cos(t), np.sin(t))], **extra)


@pytest.mark.parametrize("degrees", [0.0, 12.0])
def test_two_spacing_runs_are_named_with_their_tilt(tmp_path, degrees):
    # As dcm_qa_ct's GE head series: 6 slices 2.5 mm apart (2.5 mm thick), 1.5 mm on, 6 slices 5 mm apart
    # (5 mm thick), one series; lungzarr used to say "a slice is missing or the folder mixes series".
    folder = tmp_path / "P"
    uid = "1.2.826.0.1.3680043.8.498.91"
    thin = make_patient(folder, n_slices=6, series_uid=uid, filename="a{index:02d}.dcm")
    thick = make_patient(folder, n_slices=6, series_uid=uid, spacing=(5.0, *SPACING[1:]),
                         origin=(-100.0 + 5 * 2.5 + 1.5, -20.0, -30.0), filename="b{index:02d}.dcm")
    if degrees:
        _tilt_iop(thin + thick, degrees)
    with pytest.raises(PatientError) as info:
        dicom.read_series(folder)
    reason = info.value.reason
    assert ("the stack is 2 runs of regular spacing, 'a00.dcm' .. 'a05.dcm' (6 slices, SliceThickness 2.5 mm) "
            "2.5 mm apart, then 'b00.dcm' .. 'b05.dcm' (6 slices, SliceThickness 5 mm) 5 mm apart, with 1.5 mm "
            "between 'a05.dcm' (z=-87.5) and 'b00.dcm' (z=-86)") in reason
    assert "a series reconstructed at 2 slice spacings/thicknesses" in reason
    assert info.value.file == str(thick[0])
    if degrees:
        assert "gantry tilt of 12.0 deg" in reason and "GantryDetectorTilt (0018,1120) says 12 deg" in reason
        # The far row of a 64-row slice: 63 x 0.75 mm x sin(12 deg) off in z, whatever the spacing.
        assert f"voxel centres lie up to {63 * 0.75 * np.sin(np.radians(12)):.3g} mm in z" in reason
        assert "onto one regular axis-aligned grid" in reason
    else:
        assert "axis-aligned" not in reason and "tilt" not in reason
        assert "move the others ('b00.dcm' .. 'b05.dcm') to a folder of their own" in reason


@pytest.mark.parametrize("degrees", [0.0, 10.0])
def test_a_gap_in_a_tilted_stack_names_both(tmp_path, degrees):
    # As dicom2nifti's sliceincrement/002: a slice missing from a tilted stack (the tilt in the IOP only, no
    # GantryDetectorTilt). Naming only the gap refused the user again once the slice was restored.
    folder = tmp_path / "P"
    paths = make_patient(folder, n_slices=6)
    paths[3].unlink()
    if degrees:
        _tilt_iop([p for p in paths if p.exists()], degrees, tag=False)
    with pytest.raises(PatientError) as info:
        dicom.read_series(folder)
    reason = info.value.reason
    assert "the stack has a gap, 1 slice(s) missing at z = -92.5 mm" in reason
    assert "add the missing slice(s) from the archive" in reason
    assert info.value.file == str(paths[4])
    if degrees:
        assert "gantry tilt of 10.0 deg" in reason and "GantryDetectorTilt" not in reason
        assert f"{63 * 0.75 * np.sin(np.radians(10)):.3g} mm in z" in reason
        assert "Both must be fixed" in reason
        assert "add the missing slice(s) from the archive (lungzarr does not interpolate across a gap), then " \
               "resample the series exactly from its per-slice headers" in reason
    else:
        assert "axis-aligned" not in reason and "tilt" not in reason


def _directory_file(path):
    """A DICOMDIR-like file under another name (Philips writes DIRFILE): Media Storage Directory Storage."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.FileSetID = "LUNGZARR"
    ds.DirectoryRecordSequence = []
    ds.save_as(path, enforce_file_format=True)


def test_a_localizer_only_folder_is_named_by_its_image(tmp_path):
    # As dcm_qa_ct's Philips S1000 folders: a localizer beside a DICOMDIR-like DIRFILE. The example used to be
    # the DIRFILE's "no image (Rows/Columns missing)" instead of the localizer.
    folder = tmp_path / "P"
    (scout,) = make_patient(folder, n_slices=1, size=32, filename="I10")
    edit_header(scout, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    _directory_file(folder / "DIRFILE")
    with pytest.raises(PatientError) as info:
        dicom.read_series(folder)
    reason = info.value.reason
    assert reason.startswith("no axial CT image in the folder (2 DICOM file(s); e.g. 'I10': localizer/scout image")
    assert "'DIRFILE': a directory file (DICOMDIR-like: it lists files and holds no image)" in reason
    assert "needs an axial chest CT series" in reason
    assert info.value.file == str(scout)


@pytest.mark.parametrize("tie, words", [
    ("series number", "most slices (6) and the higher SeriesNumber (203 over 202) on a tie"),
    ("acquisition", "most slices (6) and the later acquisition (AcquisitionNumber 2 over 1) on a tie"),
])
def test_a_tie_reason_says_what_broke_it(tmp_path, tie, words):
    # As dcm_qa_ct's Philips S21570 study folder: two 140-slice series, both acquisition 1: SeriesNumber decides
    # (the reason used to say "the later acquisition on a tie").
    folder = tmp_path / "P"
    first = make_patient(folder, n_slices=6, series_uid="1.2.826.0.1.3680043.8.498.202", filename="s202_{index}.dcm")
    second = make_patient(folder, n_slices=6, series_uid="1.2.826.0.1.3680043.8.498.203",
                          filename="s203_{index}.dcm", acquisition=2 if tie == "acquisition" else 1)
    for paths, number in ((first, 203 if tie == "acquisition" else 202), (second, 203)):
        for p in paths:
            edit_header(p, SeriesNumber=number)
    series = dicom.read_series(folder)
    assert series.paths == [str(p) for p in second]
    assert series.reason.startswith(words), series.reason
