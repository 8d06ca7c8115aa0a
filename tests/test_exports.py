"""`lungzarr export --format luna16|nifti` read back with pandas / nibabel, and the LUNA16 export scored like the store.

The store is real (phantom DICOM through ingest and segment, the nodules stage), with a written
``nodule_prob`` in place of the UNet's (``tests/dicom_phantoms.detected_store``).
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
from dicom_phantoms import detected_store
from seg_readback import check_seg_against_store, seg_readback
from typer.testing import CliRunner

from lungzarr.cli import app
from lungzarr.errors import LungzarrError
from lungzarr.io.store import CohortStore, grid_from_attrs, read_nodules

runner = CliRunner()
nib = pytest.importorskip("nibabel")

# Probability blobs per patient: (z, y, x slices, value); a single higher voxel marks each blob's peak.
BLOBS = {
    "P-1": [((slice(5, 8), slice(10, 14), slice(10, 13)), 0.9), ((slice(10, 12), slice(30, 33), slice(40, 42)), 0.7),
            ((slice(2, 3), slice(40, 41), slice(40, 41)), 0.55), ((slice(20, 23), slice(60, 64), slice(20, 25)), 0.8)],
    "P-2": [((slice(14, 17), slice(50, 55), slice(60, 62)), 0.95), ((slice(3, 5), slice(20, 22), slice(70, 73)), 0.6)],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return detected_store(tmp_path_factory.mktemp("exports"), BLOBS)


def test_luna16_export_reads_back_as_the_nodule_table(store, tmp_path):
    out = tmp_path / "candidates.csv"
    r = runner.invoke(app, ["export", str(store), "--format", "luna16", "-o", str(out)])
    assert r.exit_code == 0, r.output
    got = pd.read_csv(out, dtype={"seriesuid": str})
    assert got.columns.tolist() == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    table = read_nodules(store)
    table = table[table.threshold == 0.5]
    cs = CohortStore(store, mode="r")
    uid = {p: cs.patient_attrs(p)["series_instance_uid"] for p in cs.patients()}
    assert len(got) == len(table) == sum(len(b) for b in BLOBS.values())
    assert got.seriesuid.tolist() == table.patient.map(uid).tolist()
    # LPS mm as stored, x, y, z order, no sign flip; full precision (bit for bit).
    assert got.coordX.tolist() == table.x_mm.tolist()
    assert got.coordY.tolist() == table.y_mm.tolist()
    assert got.coordZ.tolist() == table.z_mm.tolist()
    assert got.probability.tolist() == table.prob_max.tolist()
    assert (table.y_mm < 0).any() and (table.x_mm < 0).any()      # signs that a flip would change
    r = runner.invoke(app, ["export", str(store), "--format", "luna16", "--filtered", "-o", str(tmp_path / "f.csv")])
    assert r.exit_code == 0, r.output
    kept = table[table.passes_dsb_filter]
    assert pd.read_csv(tmp_path / "f.csv").coordX.tolist() == kept.x_mm.tolist()
    r = runner.invoke(app, ["export", str(store), "--format", "luna16", "--threshold", "0.6", "-o", str(out)])
    assert r.exit_code == 2 and "0.6" in r.output


def test_nifti_export_reads_back_with_the_store_geometry_and_labels(store, tmp_path):
    r = runner.invoke(app, ["export", str(store), "--format", "nifti", "-o", str(tmp_path / "nii")])
    assert r.exit_code == 0, r.output
    cs = CohortStore(store, mode="r")
    table = read_nodules(store)
    for p in cs.patients():
        ds = cs.open_patient(p)
        grid = grid_from_attrs(ds.attrs)
        lungs = nib.load(tmp_path / "nii" / f"{p}_lungs.nii.gz")
        labels = nib.load(tmp_path / "nii" / f"{p}_nodules.nii.gz")
        assert lungs.header.get_xyzt_units()[0] == "mm" and int(lungs.header["sform_code"]) == 1
        # Voxel order (i, j, k) = (x, y, z); values as stored.
        lung_data = np.asarray(lungs.dataobj)
        assert lung_data.shape == grid.shape[::-1]
        assert np.array_equal(lung_data.transpose(2, 1, 0), ds.lungs.values.astype(np.uint8))
        assert lung_data.any()
        # The affine maps voxel centres to RAS mm: (-x, -y, z) of the store's 2 mm coordinates. NIfTI holds
        # its affine in float32 (srow_*): good to ~1e-5 mm here, hence the tolerance.
        for aff in (lungs.affine, labels.affine):
            ijk = np.array([[0, 0, 0], [grid.shape[2] - 1, 0, 0], [0, grid.shape[1] - 1, 0],
                            [3, 7, grid.shape[0] - 1]])
            ras = nib.affines.apply_affine(aff, ijk)
            lps = ras * [-1, -1, 1]
            assert np.allclose(lps[:, 0], ds.x2.values[ijk[:, 0]], atol=1e-4, rtol=0)
            assert np.allclose(lps[:, 1], ds.y2.values[ijk[:, 1]], atol=1e-4, rtol=0)
            assert np.allclose(lps[:, 2], ds.z2.values[ijk[:, 2]], atol=1e-4, rtol=0)
        # Each label is its nodule row's component: voxel count and centroid in mm.
        lab = np.asarray(labels.dataobj)
        rows = table[(table.patient == p) & (table.threshold == 0.5)]
        assert sorted(np.unique(lab[lab > 0]).tolist()) == sorted(rows.label.tolist())
        for row in rows.itertuples():
            ijk = np.argwhere(lab == row.label)
            assert len(ijk) == row.voxels
            lps = nib.affines.apply_affine(labels.affine, ijk.mean(axis=0)) * [-1, -1, 1]
            assert np.allclose(lps, [row.x_mm, row.y_mm, row.z_mm], atol=1e-4, rtol=0)
            assert np.all(ds.nodule_prob.values[tuple(ijk[:, ::-1].T)] > 0.5)


def test_nifti_export_without_nibabel_says_how_to_install_it(store, tmp_path, monkeypatch):
    from lungzarr.pipeline import export_nifti

    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(LungzarrError, match="pip install nibabel"):
        export_nifti(store, tmp_path / "nii")


def _lines(rows):
    return "".join(f"{u},{float(x)!r},{float(y)!r},{float(z)!r},{float(d)!r}\n" for u, x, y, z, d in rows)


def test_exported_candidates_score_as_the_store(store, tmp_path):
    cs = CohortStore(store, mode="r")
    uid = {p: cs.patient_attrs(p)["series_instance_uid"] for p in cs.patients()}
    t = read_nodules(store)
    t = t[t.threshold == 0.5].reset_index(drop=True)
    p1, p2 = t[t.patient == "P-1"], t[t.patient == "P-2"]
    ann = [(uid["P-1"], p1.x_mm.iloc[1] + 1.0, p1.y_mm.iloc[1], p1.z_mm.iloc[1], 8.0),    # hit
           (uid["P-1"], 80.0, 80.0, -30.0, 6.0),                                          # missed
           (uid["P-2"], p2.x_mm.iloc[0], p2.y_mm.iloc[0] - 2.0, p2.z_mm.iloc[0], 10.0)]    # hit
    exc = [(uid["P-1"], p1.x_mm.iloc[0], p1.y_mm.iloc[0], p1.z_mm.iloc[0], -1.0)]          # ignored
    header = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
    (tmp_path / "annotations.csv").write_text(header + _lines(ann))
    (tmp_path / "excluded.csv").write_text(header + _lines(exc))
    (tmp_path / "seriesuids.csv").write_text(f"{uid['P-1']}\n{uid['P-2']}\n")
    luna = ["--luna-csv", str(tmp_path / "annotations.csv"), "--luna-excluded", str(tmp_path / "excluded.csv")]
    r = runner.invoke(app, ["evaluate", str(store), *luna, "--bootstrap", "0", "-o", str(tmp_path / "store")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(store), "--format", "luna16", "-o", str(tmp_path / "c.csv")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", "--candidates", str(tmp_path / "c.csv"), *luna, "--seriesuids",
                            str(tmp_path / "seriesuids.csv"), "--bootstrap", "0", "-o", str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "store" / "results.json").read_text())
    b = json.loads((tmp_path / "csv" / "results.json").read_text())
    assert (a["n_scans"], a["n_targets"], a["n_hit_targets"], a["n_ignored_detections"], a["n_false_positives"]) \
        == (2, 3, 2, 1, len(t) - 3)
    for key in ("n_scans", "n_targets", "n_hit_targets", "n_false_positives", "n_ignored_detections",
                "n_detections", "sensitivity", "fps_per_scan", "cpm", "cpm_exact", "cpm_grid",
                "cpm_exact_sensitivities", "cpm_grid_sensitivities", "froc"):
        assert a[key] == b[key], key
    # Without the excluded file, the detection on the excluded finding is a false positive.
    r = runner.invoke(app, ["evaluate", str(store), *luna[:2], "--bootstrap", "0", "-o", str(tmp_path / "noexc")])
    assert r.exit_code == 0, r.output
    c = json.loads((tmp_path / "noexc" / "results.json").read_text())
    assert c["n_false_positives"] == a["n_false_positives"] + 1


# ---------------------------------------------------------------------- DICOM SEG

def test_dicom_seg_export_reads_back_on_the_source_images(store, tmp_path):
    pytest.importorskip("highdicom")
    out = tmp_path / "seg"
    r = runner.invoke(app, ["export", str(store), "--format", "dicom-seg", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "2 DICOM SEG file(s)" in r.output
    summary = json.loads((out / "dicom_seg_summary.json").read_text())
    assert sorted(summary["written"]) == ["P-1", "P-2"] and summary["skipped"] == summary["failed"] == {}
    input_dir = store.parent / "input"
    for p in ("P-1", "P-2"):
        numbers = check_seg_against_store(store, p, out / f"{p}_seg.dcm", sorted((input_dir / p).glob("*.dcm")))
        print(f"\n{p}: {numbers}")
    # P-1's one-voxel blob at 2 mm slice 2 lies between the 2.5 mm native slices: no segment, and said so.
    notes = summary["written"]["P-1"]["notes"]
    between = [n for n in notes if "falls between the native slices" in n]
    assert len(between) == 1 and between[0].startswith("nodule ")
    # write_series' phantoms lack the Type 2 patient/study attributes: copied as empty, and said so.
    assert any("PatientBirthDate" in n and "Type 2" in n for n in notes)
    assert len(summary["written"]["P-1"]["segments"]) == 1 + len(BLOBS["P-1"]) - 1
    # --filtered keeps only the rows passing the DSB filter; the labels are still the table's.
    r = runner.invoke(app, ["export", str(store), "--format", "dicom-seg", "--filtered", "-o", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    table = read_nodules(store)
    kept = table[(table.threshold == 0.5) & table.passes_dsb_filter]
    filtered = json.loads((tmp_path / "f" / "dicom_seg_summary.json").read_text())["written"]
    got = sorted((p, s["nodule_label"]) for p, e in filtered.items() for s in e["segments"] if s["kind"] == "nodule")
    assert set(got) <= set(zip(kept.patient, kept.label))
    # A threshold the table does not have stops the run once.
    r = runner.invoke(app, ["export", str(store), "--format", "dicom-seg", "--threshold", "0.6", "-o", str(out)])
    assert r.exit_code == 2 and "0.6" in r.output


def test_dicom_seg_without_highdicom_says_how_to_install_it(store, tmp_path, monkeypatch):
    from lungzarr.pipeline import export_dicom_seg

    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(LungzarrError, match=r"pip install 'lungzarr\[seg\]'"):
        export_dicom_seg(store, tmp_path / "seg")
    r = runner.invoke(app, ["export", str(store), "--format", "dicom-seg", "-o", str(tmp_path / "seg")])
    assert r.exit_code == 2 and "pip install 'lungzarr[seg]'" in r.output
    assert not (tmp_path / "seg").exists()


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory):
    """A DICOM patient and a NIfTI patient through ingest and segment (no nodules stage)."""
    from lungzarr.algorithms.phantom import chest_phantom
    from lungzarr.io import volumes
    from lungzarr.io.dicom import write_series
    from lungzarr.pipeline import run
    from lungzarr.volume import Grid

    base = tmp_path_factory.mktemp("mixed")
    hu, origin = chest_phantom(shape=(24, 96, 96), spacing=(2.5, 2.0, 2.0), seed=3)
    write_series(hu, base / "input" / "D-1", spacing=(2.5, 2.0, 2.0), origin=origin, patient_id="D-1")
    volumes.write_volume(hu, base / "input" / "N-1.nii.gz", grid=Grid(hu.shape, tuple(origin), (2.5, 2.0, 2.0)))
    path = base / "mixed.zarr"
    run(base / "input", path, stages=["ingest", "segment"])
    return path


def test_dicom_seg_skips_volume_patients_and_fails_moved_files_by_name(mixed_store, tmp_path):
    pytest.importorskip("highdicom")
    import shutil

    import pydicom

    folder = mixed_store.parent / "input" / "D-1"
    sources = sorted(folder.glob("*.dcm"))
    r = runner.invoke(app, ["export", str(mixed_store), "--format", "dicom-seg", "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "a" / "dicom_seg_summary.json").read_text())
    assert sorted(summary["written"]) == ["D-1"] and summary["failed"] == {}
    assert "not ingested from DICOM" in summary["skipped"]["N-1"] and "nifti" in summary["skipped"]["N-1"]
    assert "skipped N-1" in r.output
    assert summary["written"]["D-1"]["notes"][-1] == "the nodules stage is not complete: the lung segment only"
    _, raw_a, _, masks_a, _ = seg_readback(tmp_path / "a" / "D-1_seg.dcm", sources)
    assert [str(s.SegmentLabel) for s in raw_a.SegmentSequence] == ["Lung"] and masks_a[1].any()
    # The store records each slice's file; a moved series fails its patient, naming the file and the fix.
    ds = CohortStore(mixed_store, mode="r").open_patient("D-1")
    assert [str(f) for f in ds.dicom_file.values] == [str(p) for p in sources]
    moved = folder.with_name("D-1-moved")
    folder.rename(moved)
    try:
        r = runner.invoke(app, ["export", str(mixed_store), "--format", "dicom-seg", "-o", str(tmp_path / "b")])
        assert r.exit_code == 1, r.output
        failure = json.loads((tmp_path / "b" / "dicom_seg_summary.json").read_text())["failed"]["D-1"]
        assert failure["file"] == str(sources[0]) and "lungzarr run" in failure["reason"]
        assert "failed D-1" in r.output and "put the series back" in " ".join(r.output.split())
        assert not (tmp_path / "b" / "D-1_seg.dcm").exists()
    finally:
        moved.rename(folder)
    # A file that now holds another image is refused, not referenced.
    backup = tmp_path / "backup.dcm"
    shutil.copy(sources[3], backup)
    ds = pydicom.dcmread(sources[3])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(sources[3])
    try:
        r = runner.invoke(app, ["export", str(mixed_store), "--format", "dicom-seg", "-o", str(tmp_path / "c")])
        assert r.exit_code == 1
        failure = json.loads((tmp_path / "c" / "dicom_seg_summary.json").read_text())["failed"]["D-1"]
        assert failure["file"] == str(sources[3]) and "another image" in failure["reason"]
    finally:
        shutil.copy(backup, sources[3])
    # Files renamed in place: found again by SOPInstanceUID, said in the notes, the same SEG.
    renamed = [p.with_name(f"renamed-{i:03d}.dcm") for i, p in enumerate(reversed(sources))]
    for p, q in zip(reversed(sources), renamed):
        p.rename(q)
    try:
        r = runner.invoke(app, ["export", str(mixed_store), "--format", "dicom-seg", "-o", str(tmp_path / "d")])
        assert r.exit_code == 0, r.output
        notes = json.loads((tmp_path / "d" / "dicom_seg_summary.json").read_text())["written"]["D-1"]["notes"]
        assert any("found" in n and "by SOPInstanceUID" in n for n in notes)
        _, raw_d, _, masks_d, _ = seg_readback(tmp_path / "d" / "D-1_seg.dcm", renamed)
        assert np.array_equal(masks_d[1], masks_a[1])
        # Same result, same UIDs: a PACS replaces the object rather than filing a duplicate.
        assert (raw_d.SOPInstanceUID, raw_d.SeriesInstanceUID) == (raw_a.SOPInstanceUID, raw_a.SeriesInstanceUID)
        # One image gone from the folder: the patient fails, naming the first recorded file not found.
        renamed[-1].rename(tmp_path / "away.dcm")
        r = runner.invoke(app, ["export", str(mixed_store), "--format", "dicom-seg", "-o", str(tmp_path / "e")])
        assert r.exit_code == 1
        failure = json.loads((tmp_path / "e" / "dicom_seg_summary.json").read_text())["failed"]["D-1"]
        assert failure["file"] == str(sources[0]) and "1 of the 24 source images" in failure["reason"]
        (tmp_path / "away.dcm").rename(renamed[-1])
    finally:
        for p, q in zip(reversed(sources), renamed):
            q.rename(p)
