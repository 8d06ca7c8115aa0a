"""Volume files in INPUT (MetaImage .mhd/.mha, NIfTI .nii/.nii.gz): same ``hu``, same grid, same millimetres as DICOM.

The real LIDC-IDRI-0001 and RICORD slabs are read as DICOM, written by the test
with SimpleITK / nibabel as ``.mhd`` and ``.nii.gz`` in LPS and in RAS layout
(the RAS files' headers say so: NIfTI's positive-diagonal RAS affine, a
MetaImage direction diag(-1, -1, 1)), and ingested beside the DICOM folder.
"""
from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pytest

from lungzarr.errors import PatientError, RunConfigError
from lungzarr.io import dicom, volumes
from lungzarr.io.store import CohortStore
from lungzarr.pipeline import ingest
from lungzarr.pipeline.inputs import scan_input
from lungzarr.volume import Grid, ScanSeries

from dicom_phantoms import make_patient

sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")

VARIANTS = [("mhd", "LPS"), ("mhd", "RAS"), ("nii.gz", "LPS"), ("nii.gz", "RAS")]
#: NIfTI keeps its affine in float32: origins agree with the DICOM's to ~1e-5 mm, not bit for bit.
MM_ATOL = 1e-4


@pytest.fixture(scope="module")
def lidc_slab():
    from conftest import LIDC_DIR, shared_path

    folder = shared_path(LIDC_DIR)
    hu, grid = dicom.load_hu(folder)
    return hu, grid, folder


def _grid(attrs) -> Grid:
    g = attrs["grid_native"]
    return Grid(tuple(g["shape"]), tuple(g["origin_mm"]), tuple(g["step_mm"]))


def _input_with_variants(root, dicom_dir, hu, grid, name="DCM"):
    """INPUT holding the DICOM folder (a link) and the volume in every variant; patient ids by variant."""
    root.mkdir(parents=True)
    (root / name).symlink_to(dicom_dir, target_is_directory=True)
    ids = {}
    for ext, orient in VARIANTS:
        pid = f"{name}_{ext.replace('.', '')}_{orient}"
        volumes.write_volume(hu, root / f"{pid}.{ext}", grid=grid, orientation=orient)
        ids[(ext, orient)] = pid
    return ids


def _assert_same_as_dicom(store_path, dicom_pid, ids, hu, grid):
    store = CohortStore(store_path, mode="r")
    ref = store.open_patient(dicom_pid)
    np.testing.assert_array_equal(ref.hu.values, hu)
    for (ext, orient), pid in ids.items():
        ds = store.open_patient(pid)
        assert ds.hu.dtype == np.int16
        np.testing.assert_array_equal(ds.hu.values, hu, err_msg=f"{ext} {orient}")
        got = _grid(ds.attrs)
        assert got.shape == grid.shape
        np.testing.assert_allclose(got.origin, grid.origin, rtol=0, atol=MM_ATOL, err_msg=f"{ext} {orient}")
        np.testing.assert_allclose(got.step, grid.step, rtol=0, atol=1e-6, err_msg=f"{ext} {orient}")
        for dim in ("z", "y", "x", "z2", "y2", "x2"):
            np.testing.assert_allclose(ds[dim].values, ref[dim].values, rtol=0, atol=MM_ATOL)
        np.testing.assert_allclose(ds.hu_2mm.values, ref.hu_2mm.values, rtol=0, atol=0.5)
        assert ds.attrs["source_format"] == ("metaimage" if ext == "mhd" else "nifti")
        assert ds.attrs["coordinate_system"] == "LPS"
        flipped = orient == "RAS"
        assert ds.attrs["axes_applied"] == {"z": "file axis k", "y": f"file axis j{' flipped' * flipped}",
                                            "x": f"file axis i{' flipped' * flipped}"}
        assert "sop_instance_uid" not in ds.coords and "sop_instance_uid" in ref.coords


def _assert_variants_ingest_like_the_dicom(tmp_path, dicom_dir):
    """The DICOM folder beside its .mhd/.mha/.nii/.nii.gz copies (LPS and RAS) ingests to one `hu` and grid."""
    hu, grid = dicom.load_hu(dicom_dir)
    ids = _input_with_variants(tmp_path / "in", dicom_dir, hu, grid)
    with dask.config.set(scheduler="threads"):
        summary = ingest(tmp_path / "in", tmp_path / "s.zarr")
    assert summary.failed == [] and sorted(summary.done) == sorted(["DCM", *ids.values()])
    _assert_same_as_dicom(tmp_path / "s.zarr", "DCM", ids, hu, grid)


@pytest.mark.requires_shared
def test_lidc_slab_as_mhd_and_nifti_ingests_to_the_dicoms_hu_and_grid(tmp_path, lidc_dir):
    _assert_variants_ingest_like_the_dicom(tmp_path, lidc_dir)


@pytest.mark.slow
@pytest.mark.requires_shared
def test_ricord_slab_as_mhd_and_nifti_ingests_to_the_dicoms_hu_and_grid(tmp_path, ricord_dir):
    _assert_variants_ingest_like_the_dicom(tmp_path, ricord_dir)


@pytest.mark.requires_shared
@pytest.mark.parametrize("ext", ["mhd", "mha", "nii", "nii.gz"])
@pytest.mark.parametrize("orient", ["LPS", "RAS"])
def test_lidc_reads_back_exactly_in_every_format(tmp_path, lidc_slab, ext, orient):
    """The reader alone (no store): every format and layout, blocks of 7 slices (a partial last block)."""
    hu, grid, lidc_dir = lidc_slab
    path = volumes.write_volume(hu, tmp_path / f"R.{ext}", grid=grid, orientation=orient)
    series = volumes.read_volume(path)
    assert isinstance(series, ScanSeries) and isinstance(dicom.read_series(lidc_dir), ScanSeries)
    assert series.patient == "R" and series.shape == hu.shape
    np.testing.assert_allclose(series.grid.origin, grid.origin, rtol=0, atol=MM_ATOL)
    np.testing.assert_array_equal(series.to_hu(chunk_slices=7).compute(), hu)


def _sphere(shape, centre, radius):
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius ** 2


@pytest.mark.requires_shared
def test_mixed_input_and_a_synthetic_nodule_at_the_same_mm_in_every_format(tmp_path, lidc_dir):
    """INPUT = a DICOM folder + an .mhd (RAS layout) + a .nii.gz (RAS): all three ingest, and a nodule put
    off-centre in the volume comes out of the nodule table at the same LPS mm centre for each."""
    from lungzarr.algorithms.nodules import find_nodules

    base, grid = dicom.load_hu(lidc_dir)
    base = np.clip(base, -1024, 3071)  # what write_series' uint16 + intercept -1024 can hold
    marker = next(v for v in range(1777, 3000) if not np.any(base == v))
    centre_vox = (9, 140, 370)  # off every axis' centre, so a missed flip moves it
    nodule = _sphere(base.shape, centre_vox, 4)
    volume = np.where(nodule, np.int16(marker), base).astype(np.int16)
    true_mm = grid.to_mm(np.argwhere(nodule).mean(axis=0))
    root = tmp_path / "in"
    dicom.write_series(volume, root / "P_dicom", spacing=grid.step, origin=grid.origin)
    volumes.write_volume(volume, root / "P_mhd.mhd", grid=grid, orientation="RAS")
    volumes.write_volume(volume, root / "P_nifti.nii.gz", grid=grid, orientation="RAS")
    with dask.config.set(scheduler="threads"):
        summary = ingest(root, tmp_path / "s.zarr")
    assert summary.failed == [] and sorted(summary.done) == ["P_dicom", "P_mhd", "P_nifti"]
    store = CohortStore(tmp_path / "s.zarr", mode="r")
    for pid in summary.done:
        ds = store.open_patient(pid)
        np.testing.assert_array_equal(ds.hu.values, volume)
        prob = (ds.hu.values == marker).astype(np.float32)
        table = find_nodules(prob, ds.hu.values, grid=_grid(ds.attrs), thresholds=(0.5,), patient=pid)
        assert len(table) == 1, pid
        got = table[["z_mm", "y_mm", "x_mm"]].to_numpy()[0]
        np.testing.assert_allclose(got, true_mm, rtol=0, atol=MM_ATOL, err_msg=pid)
        # From mm back to voxel indices with the stored coordinates (what the README shows).
        near = ds.hu.sel(z=true_mm[0], y=true_mm[1], x=true_mm[2], method="nearest")
        assert int(near.values) == marker
        assert [int(np.searchsorted(ds[d].values, v - 1e-3)) for d, v in zip("zyx", true_mm)] == \
            list(centre_vox)


@pytest.mark.requires_shared
@pytest.mark.parametrize("orient", ["LPS", "RAS"])
def test_luna16_layout_seriesuid_is_the_patient_and_annotations_land_on_the_voxel(tmp_path, lidc_dir, orient):
    from lungzarr.evaluate import read_luna_csv

    hu, grid = dicom.load_hu(lidc_dir)
    uid = dicom.read_series(lidc_dir).provenance()["series_instance_uid"]
    assert uid.startswith("1.3.6.1.4.1.14519.5.2.1.6279.6001.")
    root = tmp_path / "subset0"
    volumes.write_volume(hu, root / f"{uid}.mhd", grid=grid, orientation=orient)
    assert (root / f"{uid}.raw").is_file()
    with dask.config.set(scheduler="threads"):
        summary = ingest(root, tmp_path / "s.zarr")
    assert summary.done == [uid] and summary.ignored == []  # the .raw belongs to the .mhd
    store = CohortStore(tmp_path / "s.zarr", mode="r")
    assert store.patient_attrs(uid)["series_instance_uid"] == uid  # what evaluate --luna-csv matches
    target = (11, 300, 120)
    world = grid.to_mm(target)  # (z, y, x) LPS mm
    csv = tmp_path / "annotations.csv"
    pd.DataFrame({"seriesuid": [uid], "coordX": [world[2]], "coordY": [world[1]], "coordZ": [world[0]],
                  "diameter_mm": [6.0]}).to_csv(csv, index=False)
    truth = read_luna_csv(csv)
    assert list(truth.patient) == [uid]
    row = truth.iloc[0]
    ds = store.open_patient(uid)
    got = [int(ds.indexes[d].get_indexer([row[f"{d}_mm"]], method="nearest")[0]) for d in "zyx"]
    assert got == list(target)
    assert int(ds.hu.sel(z=row.z_mm, y=row.y_mm, x=row.x_mm, method="nearest").values) == int(hu[target])


# ---------------------------------------------------------------------- refusals


def _phantom(n=24, size=48, seed=0):
    from dicom_phantoms import phantom_volume

    return phantom_volume(n, size, seed=seed), Grid((n, size, size), (-100.0, -20.0, -30.0), (2.5, 0.7, 0.7))


def test_an_oblique_direction_is_refused_naming_the_file(tmp_path):
    hu, grid = _phantom()
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(grid.step[::-1])
    a = np.deg2rad(10.0)  # a 10 degree rotation about z
    img.SetDirection([np.cos(a), -np.sin(a), 0, np.sin(a), np.cos(a), 0, 0, 0, 1])
    path = tmp_path / "TILT.mhd"
    sitk.WriteImage(img, str(path))
    with pytest.raises(PatientError, match=r"oblique .* resample it onto an axis-aligned grid") as info:
        volumes.read_volume(path)
    assert info.value.file == str(path) and info.value.patient == "TILT"
    # float32 rounding of a NIfTI affine is not oblique
    ras = np.diag([-0.7, -0.7, 2.5, 1.0])
    ras[0, 1] = ras[1, 0] = 1e-7
    nii = tmp_path / "ROUND.nii"
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), ras), str(nii))
    assert volumes.read_volume(nii).shape == hu.shape


def test_stored_values_without_rescale_are_refused(tmp_path):
    hu, grid = _phantom()
    stored = (hu.astype(np.int32) + 1024).clip(0).astype(np.int16)  # air ~24: the stored values
    path = volumes.write_volume(stored, tmp_path / "RAW.nii.gz", grid=grid)
    with pytest.raises(PatientError, match=r"not Hounsfield units .* write the volume in HU") as info:
        volumes.read_volume(path)
    assert info.value.file == str(path)


def test_nifti_without_orientation_and_mhd_without_raw_are_refused(tmp_path):
    hu, grid = _phantom()
    nii = tmp_path / "NOORIENT.nii.gz"
    img = nib.Nifti1Image(hu.transpose(2, 1, 0), np.diag([0.7, 0.7, 2.5, 1.0]))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, str(nii))
    with pytest.raises(PatientError, match="sform_code 0 and qform_code 0"):
        volumes.read_volume(nii)
    mhd = volumes.write_volume(hu, tmp_path / "NORAW.mhd", grid=grid)
    (tmp_path / "NORAW.raw").unlink()
    with pytest.raises(PatientError, match=r"names the data file 'NORAW.raw', which is not in"):
        volumes.read_volume(mhd)


def test_refused_volumes_are_failures_of_their_patient_not_of_the_cohort(tmp_path):
    hu, grid = _phantom()
    root = tmp_path / "in"
    make_patient(root / "GOOD_DICOM", n_slices=24, size=48)
    volumes.write_volume(hu, root / "GOOD.nii", grid=grid, orientation="RAS")
    volumes.write_volume((hu.astype(np.int32) + 1024).clip(0).astype(np.int16), root / "RAW.mha", grid=grid)
    with dask.config.set(scheduler="threads"):
        summary = ingest(root, tmp_path / "s.zarr")
    assert sorted(summary.done) == ["GOOD", "GOOD_DICOM"]
    assert [(f["patient"], f["file"]) for f in summary.failed] == [("RAW", str(root / "RAW.mha"))]
    failures = CohortStore(tmp_path / "s.zarr", mode="r").failures()
    assert [f["patient"] for f in failures] == ["RAW"] and "not Hounsfield" in failures[0]["reason"]


# ---------------------------------------------------------------------- INPUT scanning and task names


def test_scan_input_lists_volume_files_as_patients_and_the_rest_as_not_used(tmp_path):
    hu, grid = _phantom(n=4, size=8)
    root = tmp_path / "in"
    make_patient(root / "P1", n_slices=4, size=8)
    volumes.write_volume(hu, root / "P2.mhd", grid=grid)
    volumes.write_volume(hu, root / "P3.nii.gz", grid=grid)
    volumes.write_volume(hu, root / "P1.nii.gz", grid=grid)  # a second scan of P1
    volumes.write_volume(hu, root / "P3.mha", grid=grid)  # and of P3
    (root / "stray.raw").write_bytes(b"\0" * 16)
    (root / "P2.zip").write_bytes(b"PK")  # beside the patient it would be: only listed
    scan = scan_input(root)
    assert [(pid, p.name) for pid, p in scan.patients] == [("P1", "P1"), ("P2", "P2.mhd"), ("P3", "P3.mha")]
    ignored = {e.name: e.reason for e in scan.ignored}
    assert sorted(ignored) == ["P1.nii.gz", "P2.zip", "P3.nii.gz", "stray.raw"]
    assert "second scan of patient 'P1'" in ignored["P1.nii.gz"] and "'P3.mha' is used" in ignored["P3.nii.gz"]
    assert "no .mhd header in INPUT names" in ignored["stray.raw"]
    assert "archive beside the volume file of the patient" in ignored["P2.zip"]
    assert scan.archives == []
    assert [pid for pid, _ in scan_input(root, patients=["P2"]).patients] == ["P2"]


def test_a_missing_reader_stops_the_run_once(tmp_path, monkeypatch):
    import importlib.util

    hu, grid = _phantom(n=4, size=8)
    root = tmp_path / "in"
    make_patient(root / "P1", n_slices=4, size=8)
    volumes.write_volume(hu, root / "L1.mhd", grid=grid)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "SimpleITK" else real(name, *a))
    with pytest.raises(RunConfigError, match=r"L1.mhd.*pip install SimpleITK"):
        scan_input(root)
    assert [pid for pid, _ in scan_input(root, patients=["P1"]).patients] == ["P1"]


def test_task_names_derive_from_patient_files_and_store(tmp_path):
    hu, grid = _phantom()
    a = volumes.write_volume(hu, tmp_path / "A.mhd", grid=grid)
    b = volumes.write_volume(hu, tmp_path / "B.mhd", grid=grid)  # same header values, other files
    sa, sb = volumes.read_volume(a), volumes.read_volume(b)
    name = sa.to_hu(store="/s1").name
    assert name.startswith("read-metaimage-")
    assert name != sb.to_hu(store="/s1").name != sa.to_hu(store="/s2").name
    assert name == volumes.read_volume(a).to_hu(store="/s1").name
    # the same patient id, the .raw rewritten: another key
    (tmp_path / "A.raw").write_bytes((tmp_path / "A.raw").read_bytes()[::-1])
    assert volumes.read_volume(a).to_hu(store="/s1").name != name


def test_write_volume_rejects_what_it_cannot_write_honestly(tmp_path):
    hu, grid = _phantom(n=4, size=8)
    with pytest.raises(ValueError, match="orientation must be 'LPS' or 'RAS'"):
        volumes.write_volume(hu, tmp_path / "x.mhd", grid=grid, orientation="RAI")
    with pytest.raises(ValueError, match="must end in one of"):
        volumes.write_volume(hu, tmp_path / "x.nrrd", grid=grid)
    with pytest.raises(ValueError, match="steps must be positive"):
        volumes.write_volume(hu, tmp_path / "x.mhd", grid=Grid(grid.shape, grid.origin, (-2.5, 0.7, 0.7)))


def test_nifti_rescale_in_the_header_gives_hu_and_permuted_axes_are_applied(tmp_path):
    """dcm2niix-style stored values with scl_slope/scl_inter are HU; a file whose first axis is z reads the same."""
    hu, grid = _phantom()
    ras = np.diag([-grid.step[2], -grid.step[1], grid.step[0], 1.0])
    ras[:3, 3] = [-grid.origin[2], -grid.origin[1], grid.origin[0]]
    stored = (hu.astype(np.int32) + 1024).astype(np.uint16)
    img = nib.Nifti1Image(stored.transpose(2, 1, 0), ras)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(tmp_path / "SCL.nii.gz"))
    series = volumes.read_volume(tmp_path / "SCL.nii.gz")
    np.testing.assert_array_equal(series.to_hu(chunk_slices=5).compute(), hu)
    assert series.provenance()["nifti_scl_inter"] == -1024.0
    # file axes (i, j, k) = (z, y, x): the affine's columns say so
    perm = np.zeros((4, 4))
    perm[2, 0], perm[1, 1], perm[0, 2], perm[3, 3] = grid.step[0], -grid.step[1], -grid.step[2], 1.0
    perm[:3, 3] = ras[:3, 3]
    nib.save(nib.Nifti1Image(hu, perm), str(tmp_path / "PERM.nii"))
    series = volumes.read_volume(tmp_path / "PERM.nii")
    assert series.provenance()["axes_applied"] == {"z": "file axis i", "y": "file axis j", "x": "file axis k"}
    np.testing.assert_allclose(series.grid.origin, grid.origin, atol=MM_ATOL)
    np.testing.assert_array_equal(series.to_hu(chunk_slices=5).compute(), hu)


# ---------------------------------------------------------------------- the real nodule, every format


@pytest.mark.slow
@pytest.mark.requires_shared
def test_lidc_nodule_at_the_same_mm_from_dicom_mhd_and_nifti_and_luna16_csv_scores_sensitivity_1(tmp_path,
                                                                                                  lidc_dir):
    """The whole pipeline (the real UNet) on the LIDC-IDRI-0001 slab as DICOM, as a LUNA16-layout `.mhd`
    (RAS on disk, the seriesuid as its stem) and as a `.nii.gz` (RAS): the same `hu`, the same nodule table
    at p >= 0.5 in LPS mm, and a LUNA16 `annotations.csv` of the readers' nodule (coordX/Y/Z = LPS mm)
    scores sensitivity 1 on the `.mhd` patient, from the store and from the `luna16` export."""
    import json

    from typer.testing import CliRunner

    import lungzarr
    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.cli import app

    readers_centre_mm = np.array([-115.80, 86.39, 56.40])  # tests/test_end_to_end.py: the 4 readers' consensus
    hu, grid = dicom.load_hu(lidc_dir)
    uid = dicom.read_series(lidc_dir).provenance()["series_instance_uid"]
    root = tmp_path / "in"
    root.mkdir()
    (root / "DICOM").symlink_to(lidc_dir)
    volumes.write_volume(hu, root / f"{uid}.mhd", grid=grid, orientation="RAS")
    volumes.write_volume(hu, root / "NIFTI.nii.gz", grid=grid, orientation="RAS")
    store = tmp_path / "s.zarr"
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(root), str(store), "--scheduler", "threads"])
    assert r.exit_code == 0, r.output
    cs = CohortStore(store, mode="r")
    assert sorted(cs.patients()) == sorted(["DICOM", uid, "NIFTI"])
    for pid in (uid, "NIFTI"):
        np.testing.assert_array_equal(cs.open_patient(pid).hu.values, cs.open_patient("DICOM").hu.values)
    nodules = lungzarr.read_nodules(store)
    columns = ["z_mm", "y_mm", "x_mm", "diameter_mm", "prob_max", "voxels"]
    tables = {pid: select_nodules(nodules[nodules.patient == pid]).sort_values("label")[columns].to_numpy()
              for pid in ("DICOM", uid, "NIFTI")}
    assert len(tables["DICOM"]) >= 1
    for pid in (uid, "NIFTI"):  # the NIfTI origin is float32 in its header: within 1e-4 mm
        np.testing.assert_allclose(tables[pid], tables["DICOM"], rtol=0, atol=MM_ATOL, err_msg=pid)
    centres = tables[uid][:, :3]
    assert np.linalg.norm(centres - readers_centre_mm, axis=1).min() < 3.0

    z, y, x = readers_centre_mm
    csv = tmp_path / "annotations.csv"
    pd.DataFrame({"seriesuid": [uid], "coordX": [x], "coordY": [y], "coordZ": [z],
                  "diameter_mm": [20.0]}).to_csv(csv, index=False)
    out = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", str(store), "--luna-csv", str(csv), "-o", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["n_targets"] == 1 and summary["sensitivity"] == 1.0, summary
    candidates = tmp_path / "candidates.csv"
    r = runner.invoke(app, ["export", str(store), "--format", "luna16", "-o", str(candidates)])
    assert r.exit_code == 0, r.output
    exported = pd.read_csv(candidates)
    assert uid in set(exported.seriesuid)
    out2 = tmp_path / "eval2"
    r = runner.invoke(app, ["evaluate", "--candidates", str(candidates), "--luna-csv", str(csv), "-o", str(out2)])
    assert r.exit_code == 0, r.output
    assert json.loads((out2 / "results.json").read_text())["sensitivity"] == 1.0
