"""The whole pipeline on the real LIDC-IDRI-0001 slab, with the real weights.

The readers' consensus nodule (four readers, about z -115.8, y 86.4, x 56.4 mm)
must be found by the UNet, land in the nodule table in patient millimetres,
and score sensitivity 1.0 in the evaluation against the readers' XML.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import lungzarr
from lungzarr.cli import app
from lungzarr.io.store import CohortStore

runner = CliRunner()
READERS_CENTRE_MM = np.array([-115.80, 86.39, 56.40])


@pytest.fixture(scope="module")
def lidc_store(tmp_path_factory):
    from conftest import LIDC_DIR, shared_path

    src = shared_path(LIDC_DIR)
    root = tmp_path_factory.mktemp("lidc")
    (root / "input").mkdir()
    (root / "input" / src.name).symlink_to(src)
    store = root / "lidc.zarr"
    r = runner.invoke(app, ["run", str(root / "input"), str(store), "--scheduler", "threads"])
    assert r.exit_code == 0, r.output
    return store


def test_annotated_nodule_is_found_in_millimetres(lidc_store):
    nodules = lungzarr.read_nodules(lidc_store)
    kept = nodules[np.isclose(nodules.threshold, 0.5) & nodules.passes_dsb_filter]
    centres = kept[["z_mm", "y_mm", "x_mm"]].to_numpy()
    distances = np.linalg.norm(centres - READERS_CENTRE_MM, axis=1)
    best = kept.iloc[int(np.argmin(distances))]
    print(f"\nLIDC-IDRI-0001 nodule: z {best.z_mm:.2f}, y {best.y_mm:.2f}, x {best.x_mm:.2f} mm, "
          f"diameter {best.diameter_mm:.1f} mm, {distances.min():.2f} mm from the readers' centre")
    assert distances.min() < 3.0
    assert 15 < best.diameter_mm < 35
    assert best.lung_half in {"left", "right"}
    # The 3-D mask's columns (stage lungs3d): x > 0 is the patient's left (LPS).
    cols = ["lung", "lung_mask_share", "inside_lung_mask", "distance_to_pleura_centre_mm",
            "distance_to_pleura_edge_mm", "juxtapleural", "solid_share", "ground_glass_share", "attenuation", "longest_axial_diameter_mm"]
    print(best[cols].to_dict())
    assert best.lung == "left" and best.inside_lung_mask
    assert best.distance_to_pleura_centre_mm > 0 and best.attenuation in {"solid", "part-solid", "non-solid"}
    assert 10 < best.longest_axial_diameter_mm < 40


def test_store_is_complete_and_lazy_to_open(lidc_store):
    store = CohortStore(lidc_store, mode="r")
    assert set(store.stages("LIDC-IDRI-0001")) == {"ingest", "segment", "lungs3d", "detect", "nodules", "features"}
    tree = lungzarr.open_cohort(lidc_store)
    ds = tree["patients/LIDC-IDRI-0001"]
    for name in ("hu", "hu_2mm", "lungs", "segmented", "nodule_prob"):
        assert name in ds
    prob = ds["nodule_prob"]
    assert prob.dtype == np.float32 and prob.shape == ds["hu_2mm"].shape
    assert prob.attrs["predicted_slices"] == [4, prob.shape[0] - 4]
    values = prob.values
    assert values[:4].max() == 0 and values[-4:].max() == 0
    assert values[(values > 0)].min() >= 0.5


def test_evaluation_against_the_readers_xml(lidc_store, tmp_path):
    from conftest import LIDC_XML, shared_path

    xml = shared_path(LIDC_XML)
    r = runner.invoke(app, ["evaluate", str(lidc_store), "-o", str(tmp_path), "--lidc-xml", str(xml),
                            "--bootstrap", "50"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["n_targets"] == 1
    # Reader marks outside the scanned slices are said, not only counted in results.json.
    if summary["n_outside_nodules"]:
        assert (f"{summary['n_outside_nodules']} annotated nodule(s) lie outside the scanned slices"
                in " ".join(r.output.split()))
    assert summary["sensitivity"] == 1.0
    assert (tmp_path / "froc.png").stat().st_size > 5_000


def test_dicom_seg_of_the_slab_reads_back_on_the_source_series(lidc_store, tmp_path):
    """`export --format dicom-seg` on the real slab: read back with highdicom and pydicom, the SEG references
    the LIDC series' study, series, frame of reference and all 16 images, sits on their positions, and its
    lung and nodule segments are the store's (nodule centroid within a voxel of the table's centre)."""
    pytest.importorskip("highdicom")
    from seg_readback import check_seg_against_store

    from conftest import LIDC_DIR

    r = runner.invoke(app, ["export", str(lidc_store), "--format", "dicom-seg", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "dicom_seg_summary.json").read_text())
    assert list(summary["written"]) == ["LIDC-IDRI-0001"] and summary["failed"] == summary["skipped"] == {}
    numbers = check_seg_against_store(lidc_store, "LIDC-IDRI-0001", tmp_path / "LIDC-IDRI-0001_seg.dcm",
                                      sorted(LIDC_DIR.glob("*.dcm")))
    print(f"\nLIDC-IDRI-0001 SEG: {numbers}")
    assert numbers["nodule_segments"] >= 1 and numbers["n_frames"] >= 16
    # The readers' nodule is one of the segments, within 3 mm (as the table row is).
    centres = [s["centre_mm"] for s in summary["written"]["LIDC-IDRI-0001"]["segments"] if s["kind"] == "nodule"]
    assert min(np.linalg.norm(np.array(c) - READERS_CENTRE_MM) for c in centres) < 3.0


def test_luna16_evaluation_of_the_slab_with_the_excluded_findings(lidc_store, tmp_path):
    """The slab scored as LUNA16 scores it: LUNA16's own tables (the scan found among its 601 annotated series by
    SeriesInstanceUID), the one LUNA16 nodule hit, no false positive at p >= 0.5 (the excluded findings in the
    slab's slices are the nodule's own reader marks), the hit within 3 mm of LUNA16's centre. The whole scan's
    run is the slow test in tests/test_whole_scan.py."""
    import pandas as pd

    from conftest import FIXTURES, shared_path

    luna = shared_path(FIXTURES / "luna16")
    r = runner.invoke(app, ["evaluate", str(lidc_store), "-o", str(tmp_path), "--luna-csv",
                            str(luna / "annotations.csv"), "--luna-excluded", str(luna / "annotations_excluded.csv"),
                            "--bootstrap", "0"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["n_scans"] == 1 and summary["n_targets"] == 1
    assert summary["n_hit_targets"] == 1 and summary["sensitivity"] == 1.0
    assert summary["n_false_positives"] == 0, pd.read_csv(tmp_path / "detections.csv").to_string()
    nodules = lungzarr.read_nodules(lidc_store)
    kept = nodules[np.isclose(nodules.threshold, 0.5)]
    luna_xyz = np.array([56.20840547, 86.34341278, -115.8675792])  # annotations.csv: coordX, coordY, coordZ (LPS)
    assert np.linalg.norm(kept[["x_mm", "y_mm", "z_mm"]].to_numpy() - luna_xyz, axis=1).min() < 3.0
