"""One geometry rule (lungzarr.io.geometry) for DICOM, NIfTI and MetaImage.

Every accepted geometry is checked independently of the module: each stored voxel's coordinates (the
``x``/``y``/``z`` coordinate arrays ingest writes) are compared with where its own file's headers put
the pixel it holds (IPP + IOP x index x PixelSpacing, read with pydicom), and its HU with that pixel's.
Refused geometries must say what they are, with the angle, and the fix.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungzarr.errors import PatientError
from lungzarr.io import dicom, geometry

from dicom_phantoms import edit_header, make_patient

#: LUNA16's nodule of LIDC-IDRI-0001 (LPS mm): in the left lung (x > 0).
NODULE_MM = {"x": 56.21, "y": 86.34, "z": -115.87}
PS = 0.703125  # LIDC-IDRI-0001's PixelSpacing


# ---------------------------------------------------------------------- helpers

def _slab(tmp_path, lidc_dir) -> list[Path]:
    """A copy of the LIDC slab, files in z order (slice 0 the lowest)."""
    folder = tmp_path / "LIDC-IDRI-0001"
    shutil.copytree(lidc_dir, folder)
    files = sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                         .ImagePositionPatient[2]))
    return files


def _ds(values) -> list[str]:
    """DS strings (at most 16 characters) of floats."""
    return [f"{float(v):.12g}"[:16] for v in values]


def _rewrite(path, *, iop=None, ipp=None, pixels=None, **extra) -> None:
    ds = pydicom.dcmread(path)
    if iop is not None:
        ds.ImageOrientationPatient = _ds(iop)
    if ipp is not None:
        ds.ImagePositionPatient = _ds(ipp)
    if pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels).astype(ds.pixel_array.dtype).tobytes()
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _mirror_x(path) -> None:
    """The issue's repro: the slice stored mirrored (row (-1,0,0)), pixels and IPP consistent with it."""
    ds = pydicom.dcmread(path)
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ipp[0] += (int(ds.Columns) - 1) * float(ds.PixelSpacing[1])
    _rewrite(path, iop=[-1, 0, 0, 0, 1, 0], ipp=ipp, pixels=ds.pixel_array[:, ::-1])


def _stored(series):
    """What ingest stores: the hu array and the x, y, z coordinate arrays (decoded in dask tasks)."""
    from lungzarr.pipeline.stages.ingest import ingest_dataset

    ds = ingest_dataset(series, chunk_slices=4)
    hu = ds["hu"].data.compute(scheduler="threads")
    return hu, ds["x"].values, ds["y"].values, ds["z"].values


def max_offset_against_headers(series) -> np.ndarray:
    """Largest |stored coordinate - header position| (z, y, x) over every slice's corners, centre and 64
    random voxels; asserts each stored voxel holds the HU of the pixel its headers put there."""
    hu, xs, ys, zs = _stored(series)
    nz, ny, nx = hu.shape
    rng = np.random.default_rng(0)
    worst = np.zeros(3)
    for k, path in enumerate(series.paths):
        ds = pydicom.dcmread(path)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row, col = iop[:3], iop[3:]
        d_row, d_col = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        values = ds.pixel_array.astype(np.int64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ii = np.r_[0, 0, ny - 1, ny - 1, ny // 2, rng.integers(0, ny, 64)]
        jj = np.r_[0, nx - 1, 0, nx - 1, nx // 2, rng.integers(0, nx, 64)]
        for i, j in zip(ii, jj):
            stored = np.array([xs[j], ys[i], zs[k]])
            # Which pixel of this file is nearest the stored position, and where its headers put it.
            rel = stored - ipp
            src_j, src_i = int(round(rel @ row / d_col)), int(round(rel @ col / d_row))
            assert 0 <= src_i < ds.Rows and 0 <= src_j < ds.Columns, (k, i, j)
            true = ipp + src_j * d_col * row + src_i * d_row * col
            worst = np.maximum(worst, np.abs(true - stored)[::-1])
            assert hu[k, i, j] == values[src_i, src_j], (path, i, j)
    return worst


def _within_half_voxel(series):
    worst = max_offset_against_headers(series)
    half = np.array(series.grid.spacing) / 2
    assert np.all(worst <= half + 1e-9), (worst, half)
    # The regular grid (what the 2 mm resampling uses) agrees with the per-slice z too.
    assert np.max(np.abs(series.grid.axis(0) - series.z_positions)) <= half[0]
    return worst


# ---------------------------------------------------------------------- the module itself

@pytest.mark.parametrize("row, col", [
    ((1, 0, 0), (0, 1, 0)), ((-1, 0, 0), (0, 1, 0)), ((1, 0, 0), (0, -1, 0)), ((-1, 0, 0), (0, -1, 0)),
    ((0, 1, 0), (1, 0, 0)), ((0, -1, 0), (1, 0, 0)), ((0, 1, 0), (-1, 0, 0)), ((0, -1, 0), (-1, 0, 0)),
])
@pytest.mark.parametrize("signs", [(1, 1), (-1, 1), (-1, -1)])
def test_orient_slice_places_every_signed_permutation_exactly(row, col, signs):
    # A 3x5 slice: pixel (i, j) of the file lies at ipp + j*dc*row + i*dr*col. After the reorientation the
    # stored pixel (i', j') must hold the file pixel that lies at origin + i'*row_step + j'*col_step.
    rows, cols, dr, dc = 3, 5, 0.7, 0.9
    ipp = np.array([10.0, -20.0, 5.0])
    pixels = np.arange(rows * cols).reshape(rows, cols)
    op, origin, row_step, col_step, shape = geometry.orient_slice(ipp, row, col, (dr, dc), (rows, cols), signs)
    stored = op.apply(pixels)
    assert stored.shape == shape
    assert row_step[1] * signs[1] > 0 and col_step[0] * signs[0] > 0  # rows along y, columns along x
    for i in range(shape[0]):
        for j in range(shape[1]):
            src_i, src_j = np.argwhere(pixels == stored[i, j])[0]
            true = ipp + src_j * dc * np.array(row, float) + src_i * dr * np.array(col, float)
            np.testing.assert_allclose(origin + i * row_step + j * col_step, true, atol=1e-12)
    assert op.identity == (tuple(row) == (signs[0], 0, 0) and tuple(col) == (0, signs[1], 0))


def test_stack_signs_follow_most_slices_not_the_first():
    axial, mirrored = ((1, 0, 0), (0, 1, 0)), ((-1, 0, 0), (0, 1, 0))
    assert geometry.stack_signs([mirrored, axial, axial]) == (1, 1)
    assert geometry.stack_signs([mirrored, mirrored, axial]) == (-1, 1)
    assert geometry.stack_signs([mirrored, axial]) == (1, 1)  # a tie: LPS


def test_place_stack_measures_offsets_and_names_the_geometry():
    n, rows, cols, ps = 10, 100, 100, 1.0
    z = np.arange(n) * 2.0
    a = np.radians(3.0)
    origins = np.stack([np.zeros(n), np.zeros(n), z], axis=1)
    row_steps = np.tile([-np.sin(a) * ps, np.cos(a) * ps, 0.0], (n, 1))
    col_steps = np.tile([np.cos(a) * ps, np.sin(a) * ps, 0.0], (n, 1))
    placed = geometry.place_stack(origins, row_steps, col_steps, (n, rows, cols))
    assert not placed.ok
    assert placed.offset_mm[1] == pytest.approx(99 * np.sin(a))  # the far column, in y
    assert placed.what() == "in-plane rotation of 3.0 deg"
    exact = geometry.place_stack(origins, np.tile([0, ps, 0.0], (n, 1)), np.tile([ps, 0, 0.0], (n, 1)),
                                 (n, rows, cols))
    assert exact.ok and exact.offset_mm == (0.0, 0.0, 0.0) and exact.what() == "axis-aligned"


def test_place_stack_judges_the_slices_apart_from_their_spacing():
    # Two spacings (2 mm, then 5 mm): off the regular grid in z, yet every slice axis-aligned at its own z.
    n, rows, cols, ps = 8, 50, 50, 1.0
    z = np.concatenate([np.arange(4) * 2.0, 6.0 + 5.0 * np.arange(1, 5)])
    origins = np.stack([np.zeros(n), np.zeros(n), z], axis=1)
    rows_, cols_ = np.tile([0, ps, 0.0], (n, 1)), np.tile([ps, 0, 0.0], (n, 1))
    placed = geometry.place_stack(origins, rows_, cols_, (n, rows, cols))
    assert not placed.ok and placed.offset_mm[0] > placed.limit_mm[0]
    assert placed.in_slice_ok and placed.in_slice_offset_mm == (0.0, 0.0, 0.0)
    # The same stack tilted 10 deg (column cosines (0, cos t, sin t)): the far row is 49 mm x sin t off in z.
    t = np.radians(10.0)
    tilted = geometry.place_stack(origins, np.tile([0, np.cos(t) * ps, np.sin(t) * ps], (n, 1)), cols_,
                                  (n, rows, cols))
    assert not tilted.in_slice_ok
    assert tilted.in_slice_offset_mm[0] == pytest.approx(49 * np.sin(t))
    assert tilted.what().startswith("gantry tilt of 10.0 deg")
    assert tilted.offset_text(in_slice=True).startswith(f"{49 * np.sin(t):.3g} mm in z")


def test_orientation_problem_names_damaged_cosines():
    assert geometry.orientation_problem((1, 0, 0), (0, 1, 0)) is None
    assert "not orthogonal" in geometry.orientation_problem((1, 0, 0), (0.1, 0.995, 0))
    assert "lengths" in geometry.orientation_problem((2, 0, 0), (0, 1, 0))
    assert "finite" in geometry.orientation_problem((np.nan, 0, 0), (0, 1, 0))


# ---------------------------------------------------------------------- DICOM: slices stored otherwise

@pytest.mark.requires_shared
def test_lidc_slab_is_exact(lidc_dir):
    series = dicom.read_series(lidc_dir)
    assert series.geometry["geometry"] == "axis-aligned"
    assert _within_half_voxel(series).max() == 0.0


@pytest.mark.requires_shared
@pytest.mark.parametrize("which", [0, 7])
def test_mirrored_slice_is_reoriented_and_the_nodule_stays_in_the_left_lung(tmp_path, lidc_dir, which):
    # The repro (slice 0) and a middle slice: the stack keeps the orientation of most slices, the odd
    # slice is flipped back exactly, and the volume equals the untouched slab voxel for voxel.
    files = _slab(tmp_path, lidc_dir)
    _mirror_x(files[which])
    series = dicom.read_series(files[0].parent)
    original = dicom.read_series(lidc_dir)
    assert series.grid == original.grid
    assert series.headers[which].reorient == geometry.Reorientation(flip_cols=True)
    assert all(h.reorient is None for k, h in enumerate(series.headers) if k != which)
    (warning,) = series.warning_records()
    assert "1 slice(s) stored in another orientation" in warning["reason"] and warning["file"] == str(files[which])
    assert series.geometry["reoriented_slices"][0]["applied"] == "columns flipped"
    assert _within_half_voxel(series).max() == 0.0
    hu, xs, ys, zs = _stored(series)
    np.testing.assert_array_equal(hu, dicom.load_hu(lidc_dir)[0])
    # The nodule (soft tissue, ~100 HU) at LUNA16's x = +56 mm (left lung), not at x = -29 mm.
    k, i, j = (int(np.argmin(np.abs(c - NODULE_MM[a]))) for c, a in ((zs, "z"), (ys, "y"), (xs, "x")))
    assert xs[j] == pytest.approx(56.2, abs=0.4) and ys[i] == pytest.approx(86.3, abs=0.4)
    assert zs[k] == pytest.approx(-115.0, abs=1.3)
    assert hu[k, i - 1:i + 2, j - 1:j + 2].mean() > -100


@pytest.mark.requires_shared
def test_transposed_slice_is_reoriented_exactly(tmp_path, lidc_dir):
    files = _slab(tmp_path, lidc_dir)
    ds = pydicom.dcmread(files[3])
    _rewrite(files[3], iop=[0, 1, 0, 1, 0, 0], pixels=ds.pixel_array.T)
    series = dicom.read_series(files[0].parent)
    assert series.headers[3].reorient == geometry.Reorientation(transpose=True)
    assert _within_half_voxel(series).max() == 0.0
    np.testing.assert_array_equal(_stored(series)[0], dicom.load_hu(lidc_dir)[0])


@pytest.mark.requires_shared
def test_a_wholly_mirrored_series_keeps_its_orientation(tmp_path, lidc_dir):
    # Every slice mirrored (as a prone scan's x is): the stack's own orientation, no slice flipped.
    files = _slab(tmp_path, lidc_dir)
    for p in files:
        _mirror_x(p)
    series = dicom.read_series(files[0].parent)
    assert series.grid.step[2] == pytest.approx(-PS)
    assert all(h.reorient is None for h in series.headers) and series.warning_records() == []
    assert series.provenance()["orientation"] == [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert _within_half_voxel(series).max() == 0.0


@pytest.mark.requires_shared
def test_a_localizer_in_the_folder_is_skipped_and_said(tmp_path, lidc_dir):
    files = _slab(tmp_path, lidc_dir)
    scout = files[0].parent / "scout.dcm"
    shutil.copy(files[5], scout)
    _rewrite(scout, iop=[0, 1, 0, 0, 0, -1], SOPInstanceUID=pydicom.uid.generate_uid())  # sagittal
    series = dicom.read_series(files[0].parent)
    assert len(series.headers) == 16
    assert "not an axial image" in dict(series.skipped)[str(scout)]
    (warning,) = series.warning_records()
    assert "skipped 1 image(s) that are not slices of an axial CT series ('scout.dcm')" in warning["reason"]
    assert "sagittal plane" in warning["reason"]


def test_missing_orientation_names_the_file(tmp_path):
    paths = make_patient(tmp_path / "P", n_slices=5)
    edit_header(paths[2], ImageOrientationPatient=None)
    with pytest.raises(PatientError, match=r"no ImageOrientationPatient \(0020,0037\), e.g. '0002.dcm'") as info:
        dicom.read_series(tmp_path / "P")
    assert info.value.file == str(paths[2]) and "fix the header" in info.value.reason


def test_damaged_orientation_names_the_file(tmp_path):
    paths = make_patient(tmp_path / "P", n_slices=5)
    edit_header(paths[1], ImageOrientationPatient=[1, 0, 0, 0.2, 1, 0])
    with pytest.raises(PatientError, match="cosines have lengths|not orthogonal") as info:
        dicom.read_series(tmp_path / "P")
    assert info.value.file == str(paths[1])


# ---------------------------------------------------------------------- DICOM: obliquity

def _tilt(files, degrees, *, tag=True):
    """Gantry tilt as a scanner writes it: every slice's columns tilted about x (column cosine
    (0, cos t, sin t)), the slices stacked along the table (IPP z steps, y unchanged): a sheared stack."""
    t = np.radians(degrees)
    for p in files:
        extra = {"GantryDetectorTilt": f"{degrees:g}"} if tag else {}
        _rewrite(p, iop=[1, 0, 0, 0, np.cos(t), np.sin(t)], **extra)


def _rotate(files, degrees):
    """In-plane rotation about z of every slice (pixels and IPP unchanged)."""
    a = np.radians(degrees)
    for p in files:
        _rewrite(p, iop=[np.cos(a), np.sin(a), 0, -np.sin(a), np.cos(a), 0])


@pytest.mark.requires_shared
@pytest.mark.parametrize("degrees", [2.0, 5.0, 8.0])
def test_gantry_tilt_is_refused_with_its_angle(tmp_path, lidc_dir, degrees):
    files = _slab(tmp_path, lidc_dir)
    _tilt(files, degrees)
    with pytest.raises(PatientError) as info:
        dicom.read_series(files[0].parent)
    reason = info.value.reason
    assert f"gantry tilt of {degrees:.1f} deg" in reason
    assert f"GantryDetectorTilt (0018,1120) says {degrees:g} deg" in reason
    # The far row of a 512-row slice: 511 x 0.703 mm x sin(t) off in z.
    assert f"{511 * PS * np.sin(np.radians(degrees)):.3g} mm in z" in reason
    assert "resample the series exactly from its per-slice headers" in reason
    assert "dcm2niix" not in reason


@pytest.mark.requires_shared
def test_tilt_with_positions_following_the_normal_is_oblique(tmp_path, lidc_dir):
    # The same tilted planes, IPP drifting in y so the stack follows the slice normal: an oblique stack.
    files = _slab(tmp_path, lidc_dir)
    t = np.radians(5.0)
    for p in files:
        ipp = [float(v) for v in pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient]
        ipp[1] -= (ipp[2] + 132.5) * np.tan(t)
        _rewrite(p, iop=[1, 0, 0, 0, np.cos(t), np.sin(t)], ipp=ipp)
    with pytest.raises(PatientError, match=r"oblique by 5.0 deg \(the whole stack rotated\)"):
        dicom.read_series(files[0].parent)


@pytest.mark.requires_shared
@pytest.mark.parametrize("degrees", [3.0, 7.0])
def test_in_plane_rotation_is_refused_with_its_angle(tmp_path, lidc_dir, degrees):
    files = _slab(tmp_path, lidc_dir)
    _rotate(files, degrees)
    with pytest.raises(PatientError) as info:
        dicom.read_series(files[0].parent)
    reason = info.value.reason
    assert f"in-plane rotation of {degrees:.1f} deg" in reason
    # 7 deg: the far column sits 511 x 0.703 x sin(7 deg) = 43.8 mm off in y (the nodule error ~41 mm).
    assert f"{511 * PS * np.sin(np.radians(degrees)):.3g} mm in y" in reason
    assert info.value.file == str(files[0])


@pytest.mark.requires_shared
def test_sheared_stack_is_refused(tmp_path, lidc_dir):
    files = _slab(tmp_path, lidc_dir)
    for k, p in enumerate(files):
        ipp = [float(v) for v in pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient]
        ipp[0] += 0.5 * k  # x drifts 0.5 mm a slice: 7.5 mm at the top
        _rewrite(p, ipp=ipp)
    with pytest.raises(PatientError, match=r"sheared stack \(slice positions step 11.3 deg off the slice normal\)"
                       r".* 7.5 mm in x"):
        dicom.read_series(files[0].parent)


@pytest.mark.requires_shared
def test_one_slice_rotated_against_the_others_is_refused_naming_it(tmp_path, lidc_dir):
    files = _slab(tmp_path, lidc_dir)
    _rotate(files[9:10], 4.0)
    with pytest.raises(PatientError, match="slice orientations that differ by up to 4.0 deg") as info:
        dicom.read_series(files[0].parent)
    assert info.value.file == str(files[9])


@pytest.mark.requires_shared
def test_a_tiny_obliquity_is_accepted_and_recorded(tmp_path, lidc_dir):
    files = _slab(tmp_path, lidc_dir)
    _rotate(files, 0.01)
    series = dicom.read_series(files[0].parent)
    record = series.provenance()["geometry"]
    assert record["deviations_deg"]["in-plane rotation"] == pytest.approx(0.01, rel=1e-3)
    assert record["max_offset_mm"]["y"] == pytest.approx(511 * PS * np.sin(np.radians(0.01)), rel=1e-3)
    assert any("in-plane rotation of 0.01 deg" in note for note in series.warnings)
    worst = _within_half_voxel(series)
    assert worst[1] == pytest.approx(511 * PS * np.sin(np.radians(0.01)), rel=1e-2)


# ---------------------------------------------------------------------- the same rule for volume files

def _dicom_and_nifti(tmp_path, iop, *, n=6, size=64, ps=0.75, dz=2.5, shift=(0.0, 0.0)):
    """One synthetic stack as DICOM (every slice's IOP ``iop``, IPP stepping dz in z plus ``shift`` (x, y) a
    slice) and as a NIfTI file whose affine says the same; returns (folder, nifti path)."""
    import nibabel as nib

    folder = tmp_path / "D"
    paths = make_patient(folder, n_slices=n, size=size, spacing=(dz, ps, ps), origin=(-50.0, -20.0, -30.0))
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    ipp0 = np.array([-30.0, -20.0, -50.0])
    step = np.array([shift[0], shift[1], dz])
    for k, p in enumerate(paths):
        _rewrite(p, iop=iop, ipp=ipp0 + k * step)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = ps * row, ps * col, step, ipp0
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    volume = np.full((size, size, n), -1000, dtype=np.int16)  # (i, j, k) = (column, row, slice)
    path = tmp_path / "V.nii"
    nib.save(nib.Nifti1Image(volume, ras), str(path))
    return folder, path


@pytest.mark.parametrize("case, iop, shift, words", [
    ("rotation", [np.cos(np.radians(7)), np.sin(np.radians(7)), 0, -np.sin(np.radians(7)), np.cos(np.radians(7)), 0],
     (0.0, 0.0), "in-plane rotation of 7.0 deg"),
    ("tilt", [1, 0, 0, 0, np.cos(np.radians(5)), np.sin(np.radians(5))], (0.0, 0.0), "gantry tilt of 5.0 deg"),
    ("shear", [1, 0, 0, 0, 1, 0], (0.5, 0.0), "sheared stack"),
])
def test_dicom_and_nifti_refuse_the_same_geometry_in_the_same_words(tmp_path, case, iop, shift, words):
    from lungzarr.io import volumes

    folder, nifti = _dicom_and_nifti(tmp_path, iop, shift=shift)
    with pytest.raises(PatientError) as from_dicom:
        dicom.read_series(folder)
    with pytest.raises(PatientError) as from_nifti:
        volumes.read_volume(nifti)
    for info in (from_dicom, from_nifti):
        assert words in info.value.reason
        assert "more than the half voxel lungzarr allows" in info.value.reason
    offsets = [r.split("Voxel centres lie up to ")[1].split(" from where")[0]
               for r in (from_dicom.value.reason, from_nifti.value.reason)]
    assert offsets[0] == offsets[1]
    assert "dcm2niix" not in from_nifti.value.reason


def test_a_tiny_obliquity_in_a_nifti_affine_is_accepted_and_recorded(tmp_path):
    from lungzarr.io import volumes

    a = np.radians(0.01)
    _, nifti = _dicom_and_nifti(tmp_path, [np.cos(a), np.sin(a), 0, -np.sin(a), np.cos(a), 0])
    series = volumes.read_volume(nifti)
    record = series.provenance()["geometry"]
    assert record["deviations_deg"]["in-plane rotation"] == pytest.approx(0.01, rel=1e-3)
    assert record["max_offset_mm"]["y"] == pytest.approx(63 * 0.75 * np.sin(a), rel=1e-3)
