"""The folder's own patient, plausible HU and plausible spacing, one rule for every reader (issue 25, items 3-4).

Inputs are phantoms (:mod:`dicom_phantoms`) and header-edited copies of the
shared LIDC and RICORD slabs. Each refusal names the file and the value; the
decode's range check is asserted on both decodes (the native one that reads the
pixel bytes itself, and pydicom's), and two cohorts go through ``ingest`` to
show the patient recorded failed and the others kept.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungzarr.errors import PatientError
from lungzarr.io import dicom, plausible, volumes
from lungzarr.io.dicom.pixel_checks import _check_values_are_hu
from lungzarr.io.store import CohortStore, read_failures, read_warnings
from lungzarr.pipeline import ingest
from lungzarr.volume import Grid

from dicom_phantoms import SPACING, edit_header, make_patient, phantom_volume


def _rewrite(path, stored, *, bits=16, signed=False, slope=1.0, intercept=-1024.0):
    """Replace one file's pixels by ``stored`` (BitsAllocated ``bits``) and its rescale."""
    ds = pydicom.dcmread(path)
    dtype = np.dtype(f"{'iu'[not signed]}{bits // 8}")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = np.asarray(stored).astype(dtype).tobytes()
    ds["PixelData"].VR = "OW"
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(path)


def _both_decodes(paths):
    """The error (or HU) of ``decode_slices_to_hu`` on the native decode and on pydicom's, per decode."""
    headers = [dicom.read_header(p) for p in paths]
    assert all(h.pixels is not None for h in headers)          # the native decode covers these files
    out = {}
    for name, layouts in (("native", [h.pixels for h in headers]), ("pydicom", [None] * len(headers))):
        try:
            out[name] = dicom.decode_slices_to_hu([str(p) for p in paths], [h.slope for h in headers],
                                                  [h.intercept for h in headers], patient="P", layouts=layouts)
        except PatientError as exc:
            out[name] = exc
    return out


# ---------------------------------------------------------------------- values outside int16: refused, not wrapped

def test_unsigned_40000_is_refused_not_wrapped_to_minus_25536(tmp_path):
    paths = make_patient(tmp_path / "P", n_slices=3, size=16)
    stored = phantom_volume(3, 16).astype(np.int32) + 1024
    stored[1, 5, 5] = 40000                                 # the original's astype(int16) made it -25536 - 1024
    _rewrite(paths[1], stored[1])
    with pytest.raises(PatientError) as info:
        dicom.read_series(tmp_path / "P")                  # the middle slice is one of the sampled three
    assert info.value.file == str(paths[1])
    reason = info.value.reason
    assert "values -1024 .. 38976 HU (stored 0 .. 40000 (unsigned 16-bit) x RescaleSlope 1 + RescaleIntercept " \
           "-1024) leave the int16 range -32768 .. 32767" in reason
    assert "fix the header or replace the file" in reason
    got = _both_decodes([paths[1]])
    assert isinstance(got["native"], PatientError) and isinstance(got["pydicom"], PatientError)
    assert got["native"].reason == got["pydicom"].reason == reason


def test_32_bit_slope_20_is_refused_not_wrapped(tmp_path):
    paths = make_patient(tmp_path / "P", n_slices=3, size=16)
    stored = phantom_volume(3, 16).astype(np.int64) + 1024
    stored[:, 2, 2] = 3024                                  # bone, 2000 HU: x 20 leaves int16
    for p, s in zip(paths, stored):
        _rewrite(p, s, bits=32, signed=True, slope=20.0, intercept=-1024.0)
    assert dicom.read_header(paths[0]).bits_allocated == 32
    got = _both_decodes(paths)
    for name in ("native", "pydicom"):
        exc = got[name]
        assert isinstance(exc, PatientError), name
        assert exc.file == str(paths[0])
        hi = 20 * int(stored[0].max()) - 1024
        assert f"values -1024 .. {hi} HU (stored 0 .. {stored[0].max()} (signed 32-bit) x RescaleSlope 20 + " \
               f"RescaleIntercept -1024)" in exc.reason
    with pytest.raises(PatientError, match="leave the int16 range"):
        dicom.read_series(tmp_path / "P")


def test_overflow_in_a_slice_not_sampled_fails_its_chunk_and_only_its_patient(tmp_path):
    root = tmp_path / "in"
    paths = make_patient(root / "WRAP", n_slices=12)
    stored = phantom_volume(12).astype(np.int32) + 1024
    stored[2, 30, 30] = 40000                               # slice 2: not one of the sampled 0, 6, 11
    _rewrite(paths[2], stored[2])
    make_patient(root / "GOOD", n_slices=12, seed=4)
    series = dicom.read_series(root / "WRAP")              # the sample passes
    hu = dicom.series_to_hu(series, chunk_slices=4)
    hu[4:].compute(scheduler="sync")                        # the other chunks decode
    with pytest.raises(PatientError, match="stored 0 .. 40000") as info:
        hu.compute(scheduler="sync")
    assert info.value.file == str(paths[2])
    store = tmp_path / "s.zarr"
    summary = ingest(root, store, chunk_slices=4)
    assert summary.done == ["GOOD"]
    (row,) = read_failures(store).itertuples()
    assert (row.patient, row.stage, row.file) == ("WRAP", "ingest", str(paths[2]))
    assert "values -1024 .. 38976 HU" in row.reason
    cohort = CohortStore(store, mode="r")
    assert cohort.patients() == ["GOOD"] and not cohort.has_patient("WRAP")


# ---------------------------------------------------------------------- not HU: the rescale is missing

def test_missing_intercept_is_refused_on_both_decodes(tmp_path):
    paths = make_patient(tmp_path / "P", n_slices=12)
    for p in paths:
        edit_header(p, RescaleIntercept=0)                  # stored HU + 1024, all >= 0
    with pytest.raises(PatientError) as info:
        dicom.read_series(tmp_path / "P")
    reason = info.value.reason
    assert "not Hounsfield units (the rescale is missing): no value below -500 HU in slices [0, 6, 11] of 12 " \
           "(minimum 0)" in reason
    assert "RescaleIntercept (0028,1052) is 0 and RescaleSlope (0028,1053) 1" in reason
    assert info.value.file == str(paths[6])
    headers = [replace(dicom.read_header(p), pixels=None) for p in paths]   # pydicom's decode
    with pytest.raises(PatientError) as again:
        _check_values_are_hu(headers, "P")
    assert again.value.reason == reason


def test_32_bit_slope_20_intercept_0_all_positive_is_not_hu(tmp_path):
    paths = make_patient(tmp_path / "P", n_slices=12)
    stored = (phantom_volume(12).astype(np.int64) + 1024) // 4   # 0 .. ~1000, x 20 fits int16
    for p, s in zip(paths, stored):
        _rewrite(p, s, bits=32, signed=False, slope=20.0, intercept=0.0)
    assert all(dicom.read_header(p).pixels is not None for p in paths)
    with pytest.raises(PatientError, match=r"not Hounsfield units \(the rescale is missing\): no value below -500 "
                                           r"HU .* RescaleIntercept \(0028,1052\) is 0 and RescaleSlope "
                                           r"\(0028,1053\) 20"):
        dicom.read_series(tmp_path / "P")


def test_volume_readers_use_the_same_rule(tmp_path):
    hu = phantom_volume(12, 32)
    grid = Grid(hu.shape, (-100.0, -20.0, -30.0), (2.5, 0.7, 0.7))
    # -300 HU at the lowest: the old ">= 0" rule let it through; no chest CT lacks air below -500 HU.
    shifted = volumes.write_volume((hu.astype(np.int32) + 700).astype(np.int16), tmp_path / "SHIFT.mha", grid=grid)
    with pytest.raises(PatientError, match=r"not Hounsfield units \(the rescale is missing\): no value below "
                                           r"-500 HU in slices \[0, 6, 11\] of 12 .* write the volume in HU"):
        volumes.read_volume(shifted)
    nib = pytest.importorskip("nibabel")
    wide = np.asarray(hu, dtype=np.float32).transpose(2, 1, 0).copy()
    wide[3, 3, 5] = 40000.0
    path = tmp_path / "WIDE.nii"
    nib.save(nib.Nifti1Image(wide, np.diag([-0.7, -0.7, 2.5, 1.0])), str(path))
    series = volumes.read_volume(path)                     # slice 5 is not sampled
    with pytest.raises(PatientError, match=r"values -1\d\d\d .. 40000 HU leave the int16 range") as info:
        series.to_hu(chunk_slices=4).compute(scheduler="sync")
    assert info.value.file == str(path)


@pytest.mark.requires_shared
def test_real_slabs_missing_intercept_and_unsigned_misread(tmp_path, lidc_dir, ricord_dir):
    # RICORD (JPEG Lossless: pydicom's decode), its 10 lowest slices, intercept 0: stored values >= 0 once the
    # -2000 padding is 0.
    files = sorted(Path(ricord_dir).iterdir(),
                   key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    (tmp_path / "R").mkdir()
    for p in files[:10]:
        ds = pydicom.dcmread(p)
        ds.RescaleIntercept = 0
        ds.save_as(tmp_path / "R" / p.name)
    with pytest.raises(PatientError, match=r"no value below -500 HU in slices \[0, 5, 9\] of 10 \(minimum 0\)"):
        dicom.read_series(tmp_path / "R")
    # LIDC (native decode) said to be unsigned: stored -1024 reads as 64512 and would wrap.
    (tmp_path / "L").mkdir()
    for p in sorted(Path(lidc_dir).iterdir()):
        ds = pydicom.dcmread(p)
        ds.PixelRepresentation = 0
        ds.save_as(tmp_path / "L" / p.name)
    with pytest.raises(PatientError, match=r"\(stored 0 .. 64512 \(unsigned 16-bit\) x RescaleSlope 1 \+ "
                                           r"RescaleIntercept -1024\) leave the int16 range") as info:
        dicom.read_series(tmp_path / "L")
    assert Path(info.value.file).parent == tmp_path / "L"


# ---------------------------------------------------------------------- spacing

@pytest.mark.parametrize("value, shown, span", [(70.3, "[70.3, 70.3]", "would span 4.5 m"),
                                                (0.0001, "[0.0001, 0.0001]", "would span 0.0064 mm")])
def test_implausible_pixel_spacing_is_refused_before_any_pixel(tmp_path, value, shown, span):
    paths = make_patient(tmp_path / "P", n_slices=12)
    for p in paths:
        edit_header(p, PixelSpacing=[value, value])
    with pytest.raises(PatientError) as info:
        dicom.read_series(tmp_path / "P")
    assert info.value.file == str(paths[0])
    assert f"PixelSpacing (0028,0030) is {shown} mm (64 voxels of {value:g} mm {span})" in info.value.reason
    assert "outside the 0.1 .. 5 mm of a chest CT's pixel spacing" in info.value.reason
    assert "fix the value" in info.value.reason


@pytest.mark.parametrize("step", [25.0, 0.05])
def test_implausible_slice_spacing_is_refused(tmp_path, step):
    paths = make_patient(tmp_path / "P", n_slices=12, spacing=(step, *SPACING[1:]))
    with pytest.raises(PatientError, match=rf"the slice spacing \(ImagePositionPatient z of '0000.dcm' .. "
                                           rf"'0011.dcm', 12 slices\) is {step:g} mm .* outside the 0.1 .. 20 mm"):
        dicom.read_series(tmp_path / "P")


def test_volume_files_use_the_same_spacing_bounds(tmp_path):
    hu = phantom_volume(12, 32)
    for name, step, match in [("BIG.mhd", (2.5, 70.3, 70.3), r"in-plane spacing \(y, x\) of the header is "
                                                              r"\[70.3, 70.3\] mm"),
                              ("TINY.mha", (2.5, 0.0001, 0.0001), r"\[0.0001, 0.0001\] mm"),
                              ("THICK.mha", (40.0, 0.7, 0.7), r"slice spacing \(z\) of the header is 40 mm")]:
        path = volumes.write_volume(hu, tmp_path / name, grid=Grid(hu.shape, (0.0, 0.0, 0.0), step))
        with pytest.raises(PatientError, match=match) as info:
            volumes.read_volume(path)
        assert info.value.file == str(path) and "outside the" in info.value.reason


def test_spacing_bounds_are_stated():
    assert plausible.PIXEL_SPACING_MM == (0.1, 5.0) and plausible.SLICE_SPACING_MM == (0.1, 20.0)
    plausible.check_spacing([0.1, 5.0], kind="pixel", what="x")       # the bounds themselves are plausible
    with pytest.raises(PatientError):
        plausible.check_spacing(float("nan"), kind="slice", what="x")


def test_bad_values_and_spacing_in_a_cohort_fail_their_patient_only(tmp_path):
    root = tmp_path / "in"
    make_patient(root / "GOOD", n_slices=12)
    for pid, value in (("PS-70", 70.3), ("PS-TINY", 0.0001)):
        for p in make_patient(root / pid, n_slices=12):
            edit_header(p, PixelSpacing=[value, value])
    for p in make_patient(root / "NOT-HU", n_slices=12):
        edit_header(p, RescaleIntercept=0)
    store = tmp_path / "s.zarr"
    summary = ingest(root, store)
    assert summary.done == ["GOOD"]
    reasons = {f["patient"]: f["reason"] for f in summary.failed}
    assert sorted(reasons) == ["NOT-HU", "PS-70", "PS-TINY"]
    assert "PixelSpacing (0028,0030) is [70.3, 70.3] mm" in reasons["PS-70"]
    assert "PixelSpacing (0028,0030) is [0.0001, 0.0001] mm" in reasons["PS-TINY"]
    assert "not Hounsfield units" in reasons["NOT-HU"]
    assert CohortStore(store, mode="r").patients() == ["GOOD"]


# ---------------------------------------------------------------------- the folder's own patient

def _two_patients(folder):
    """Series of PatientID 'A' (12 slices, in the folder) and 'B' (20 slices, in sub/): B is the longer."""
    a = make_patient(folder, n_slices=12, series_uid="1.2.3.4.1", seed=1, patient_id="A")
    b = make_patient(folder / "sub", n_slices=20, series_uid="1.2.3.4.2", seed=2, patient_id="B")
    return a, b


def test_the_folder_name_chooses_the_patient_not_the_longest_series(tmp_path):
    a, b = _two_patients(tmp_path / "A")
    series = dicom.read_series(tmp_path / "A")
    assert series.paths == [str(p) for p in a]
    assert series.reason.startswith("PatientID 'A' is the folder's name (the folder holds 2 PatientIDs); the only "
                                    "axial CT series/acquisition of the patient (12 slices); not used: PatientID "
                                    "'B' series 1.2.3.4.2 acquisition 1 (20 slices)")
    (warning,) = [w for w in series.warning_records() if "another patient" in w["reason"]]
    assert "skipped 20 file(s) of another patient (PatientID ['B'], the chosen series has ['A'])" in warning["reason"]


def test_no_series_of_the_folder_name_lists_every_series(tmp_path):
    _two_patients(tmp_path / "X")
    with pytest.raises(PatientError) as info:
        dicom.read_series(tmp_path / "X")
    assert info.value.file == str(tmp_path / "X")
    reason = info.value.reason
    assert "the folder holds the axial CT series of 2 PatientIDs (0010,0020) and none is the folder's name 'X'" \
        in reason
    assert "PatientID 'A' series 1.2.3.4.1 acquisition 1 (12 slices, in '.')" in reason
    assert "PatientID 'B' series 1.2.3.4.2 acquisition 1 (20 slices, in 'sub')" in reason
    assert "give each patient a folder of its own named by its PatientID (e.g. INPUT/A/ and INPUT/B/)" in reason


def test_one_patient_id_unlike_the_folder_name_and_several_own_series_keep_working(tmp_path):
    # Anonymised archives: one PatientID, another folder name: the folder is that patient's, as before.
    paths = make_patient(tmp_path / "FOLDER", n_slices=12)
    for p in paths:
        edit_header(p, PatientID="ANON-7")
    assert dicom.read_series(tmp_path / "FOLDER").paths == [str(p) for p in paths]
    # Two series of the folder's own id beside a longer foreign one: most slices among the own ones.
    folder = tmp_path / "Q"
    thin = make_patient(folder / "thin", n_slices=12, series_uid="1.2.3.9.1", patient_id="Q")
    make_patient(folder / "thick", n_slices=5, spacing=(5.0, 0.75, 0.75), series_uid="1.2.3.9.2", patient_id="Q")
    make_patient(folder / "other", n_slices=30, series_uid="1.2.3.9.3", patient_id="SOMEONE")
    series = dicom.read_series(folder)
    assert series.paths == [str(p) for p in thin]
    assert "most slices (12)" in series.reason and "1.2.3.9.2 acquisition 1 (5 slices)" in series.reason


@pytest.mark.requires_shared
def test_lidc_folder_holding_ricord_stores_lidc_and_a_mixed_folder_fails(tmp_path, lidc_dir, ricord_dir):
    root = tmp_path / "in"
    shutil.copytree(lidc_dir, root / "LIDC-IDRI-0001")
    shutil.copytree(ricord_dir, root / "LIDC-IDRI-0001" / "RICORD")
    shutil.copytree(root / "LIDC-IDRI-0001", root / "MIXED")
    store = tmp_path / "s.zarr"
    summary = ingest(root, store)
    assert summary.done == ["LIDC-IDRI-0001"]
    (failure,) = summary.failed
    assert (failure["patient"], failure["file"]) == ("MIXED", str(root / "MIXED"))
    lidc_uid = str(pydicom.dcmread(next(Path(lidc_dir).iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    assert f"PatientID 'LIDC-IDRI-0001' series {lidc_uid} (16 slices, in '.')" in failure["reason"]
    assert "PatientID 'MIDRC-RICORD-1A-419639-000082' series " in failure["reason"]
    assert "(128 slices, in 'RICORD')" in failure["reason"]
    # What is stored under LIDC-IDRI-0001 is LIDC's own 16 slices, at LIDC's positions.
    lidc = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in Path(lidc_dir).iterdir()),
                  key=lambda ds: float(ds.ImagePositionPatient[2]))
    x0, y0, z0 = (float(v) for v in lidc[0].ImagePositionPatient)
    ds = CohortStore(store, mode="r").open_patient("LIDC-IDRI-0001")
    assert ds.hu.shape == (16, 512, 512)
    assert ds.attrs["series_instance_uid"] == lidc_uid and ds.attrs["n_files_used"] == 16
    assert ds.attrs["origin_mm"] == pytest.approx([z0, y0, x0])
    assert ds.attrs["selection_reason"].startswith("PatientID 'LIDC-IDRI-0001' is the folder's name")
    np.testing.assert_array_equal(ds.hu.values, dicom.load_hu(lidc_dir)[0])
    reasons = " | ".join(read_warnings(store).reason)
    assert "skipped 128 file(s) of another patient (PatientID ['MIDRC-RICORD-1A-419639-000082']" in reasons
