"""The 3-D lung mask (stage lungs3d): truth phantoms, real slabs, the nodule columns it gives."""
from __future__ import annotations

import numpy as np
import pytest

from lungzarr.algorithms.lungs3d import (
    LEFT,
    RIGHT,
    air_in_body,
    closing_radius,
    lung_fields,
    lung_labels_dask,
    lung_labels_numpy,
    lung_side_measures,
)
from lungzarr.algorithms.phantom import (
    TRUTH_AIRWAY,
    TRUTH_BOWEL,
    TRUTH_LEFT,
    TRUTH_RIGHT,
    thorax_phantom,
)

from conftest import LIDC_DIR, RICORD_DIR, shared_path


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def thorax():
    hu, truth, nodules, origin = thorax_phantom()
    labels, details = lung_labels_numpy(hu, spacing=(2.0, 2.0, 2.0), x_step=2.0, details=True)
    return hu, truth, nodules, labels, details


def test_thorax_phantom_dice_per_structure(thorax, record_property):
    hu, truth, _, labels, details = thorax
    scores = {"right": dice(labels == RIGHT, truth == TRUTH_RIGHT),
              "left": dice(labels == LEFT, truth == TRUTH_LEFT),
              "airway": dice(details["airway"], truth == TRUTH_AIRWAY)}
    for k, v in scores.items():
        record_property(f"dice_{k}", float(v))
    print(f"\nthorax phantom Dice: {scores}")
    assert scores["right"] > 0.98 and scores["left"] > 0.98
    assert scores["airway"] > 0.8


def test_airway_and_bowel_gas_are_not_lung(thorax):
    hu, truth, _, labels, details = thorax
    assert (truth == TRUTH_AIRWAY).sum() > 500 and (truth == TRUTH_BOWEL).sum() > 500
    # Both are air inside the body: the first step keeps them, the mask does not.
    air = details["air"]
    assert air[truth == TRUTH_AIRWAY].mean() > 0.9 and air[truth == TRUTH_BOWEL].mean() > 0.9
    assert not (labels[truth == TRUTH_AIRWAY] > 0).any()
    assert not (labels[truth == TRUTH_BOWEL] > 0).any()
    assert not details["fields"][truth == TRUTH_BOWEL].any()  # gone at the 3-D connectivity step


def test_touching_lungs_are_split_right_at_smaller_x(thorax):
    hu, truth, _, labels, _ = thorax
    # The anterior junction joins the lungs: one 3-D component before the split.
    from scipy import ndimage as ndi

    assert ndi.label((truth == TRUTH_RIGHT) | (truth == TRUTH_LEFT))[1] == 1
    x = np.arange(hu.shape[2])
    per_x = [(labels == side).sum(axis=(0, 1)) for side in (RIGHT, LEFT)]
    centre_right, centre_left = [(p * x).sum() / p.sum() for p in per_x]
    assert centre_right < centre_left  # x step > 0: patient's right at smaller x (LPS)
    # The junction voxels go to their own side.
    junction = (truth > 0) & (truth <= 2)
    assert (labels[junction] == truth[junction]).mean() > 0.99


def test_negative_x_step_swaps_the_sides():
    hu, truth, _, _ = thorax_phantom()
    flipped = hu[:, :, ::-1].copy()
    labels = lung_labels_numpy(flipped, spacing=(2.0, 2.0, 2.0), x_step=-2.0)
    # Same patient, x axis stored the other way: the right lung is still the patient's right.
    assert dice(labels[:, :, ::-1] == RIGHT, truth == TRUTH_RIGHT) > 0.98


@pytest.mark.parametrize("diameter", [8.0, 12.0, 15.0])
def test_juxtapleural_nodule_is_kept(diameter):
    hu, truth, nodules, _ = thorax_phantom(juxta_diameter_mm=diameter)
    labels = lung_labels_numpy(hu, spacing=(2.0, 2.0, 2.0), x_step=2.0)
    juxta = nodules["juxta"]
    from scipy import ndimage as ndi

    # Its outermost voxel layer lies on the pleura, where nodule and chest wall are the same soft tissue
    # (undecidable from HU): every voxel one step inside is kept.
    lung = truth == TRUTH_RIGHT
    inner = juxta & ndi.binary_erosion(lung)
    assert inner.sum() > 0
    assert (labels[inner] == RIGHT).all()
    assert (labels[juxta] == RIGHT).mean() > 0.7
    assert (labels[nodules["central"]] == LEFT).all()


def test_dask_equals_numpy_and_is_lazy(thorax):
    import dask.array as da

    hu, _, _, labels, _ = thorax
    lazy = lung_labels_dask(da.from_array(hu, chunks=(16, -1, -1)), spacing=(2.0, 2.0, 2.0), x_step=2.0)
    assert lazy.chunks == da.from_array(hu, chunks=(16, -1, -1)).chunks
    np.testing.assert_array_equal(lazy.compute(scheduler="sync"), labels)
    with pytest.raises(ValueError, match="chunked in z only"):
        lung_labels_dask(da.from_array(hu, chunks=(16, 60, -1)), spacing=(2.0, 2.0, 2.0), x_step=2.0)


def test_side_measures(thorax):
    hu, _, _, labels, _ = thorax
    m = lung_side_measures(labels, hu, spacing=(2.0, 2.0, 2.0))
    assert m["lung3d_right_ml"] == pytest.approx((labels == RIGHT).sum() * 8 / 1000)
    assert m["lung3d_ml"] == pytest.approx(m["lung3d_right_ml"] + m["lung3d_left_ml"])
    assert -900 < m["lung3d_right_mean_hu"] < -700
    assert 0 <= m["lung3d_left_emphysema"] < 0.01  # -850 HU lung with 12 HU noise: hardly any voxel < -950
    empty = lung_side_measures(np.zeros_like(labels), hu, spacing=(2.0, 2.0, 2.0))
    assert empty["lung3d_ml"] == 0 and np.isnan(empty["lung3d_left_mean_hu"])


def test_closing_radius():
    assert closing_radius(15.0, pixel_mm=2.0) == 5
    with pytest.raises(ValueError, match="keep_nodule_mm"):
        closing_radius(0.0)


def test_demo_phantom_dice_against_its_truth(record_property):
    from lungzarr.algorithms.phantom import DEMO_PATIENTS, TRUTH_AIRWAY, chest_phantom, chest_phantom_truth
    from lungzarr.algorithms.resample import resample_to_2mm_numpy
    from lungzarr.demo import DEMO_SHAPE, DEMO_SPACING
    from lungzarr.volume import Grid

    pid, nodules, seed = DEMO_PATIENTS[0]
    hu, origin = chest_phantom(shape=DEMO_SHAPE, spacing=DEMO_SPACING, nodules=nodules, seed=seed)
    hu2, grid2 = resample_to_2mm_numpy(hu, Grid(shape=hu.shape, origin=origin, step=DEMO_SPACING))
    labels = lung_labels_numpy(hu2, spacing=grid2.spacing, x_step=grid2.step[2])
    truth = chest_phantom_truth(grid2.axis(0), grid2.axis(1), grid2.axis(2), shape=DEMO_SHAPE,
                                spacing=DEMO_SPACING, origin=origin)
    scores = {"right": dice(labels == RIGHT, truth == TRUTH_RIGHT), "left": dice(labels == LEFT, truth == TRUTH_LEFT)}
    print(f"\n{pid} Dice at 2 mm: {scores}; trachea voxels in the mask: "
          f"{int((labels[truth == TRUTH_AIRWAY] > 0).sum())} of {int((truth == TRUTH_AIRWAY).sum())}")
    for k, v in scores.items():
        record_property(f"dice_{k}", float(v))
    assert min(scores.values()) > 0.95
    assert (labels[truth == TRUTH_AIRWAY] > 0).mean() < 0.01


# --- the nodule table's columns from the mask ---

def _table(thorax_data, lung_labels):
    from lungzarr.algorithms.nodules import find_nodules
    from lungzarr.volume import Grid

    hu, truth, nodules, labels, _ = thorax_data
    prob = np.zeros(hu.shape, dtype=np.float32)
    prob[nodules["juxta"]] = 0.9
    prob[nodules["central"]] = 0.9
    bowel = truth == TRUTH_BOWEL  # a "nodule" in bowel gas: outside the lungs
    from scipy import ndimage as ndi

    lab, _ = ndi.label(bowel)
    prob[lab == 1] = 0.9
    grid = Grid(shape=hu.shape, origin=(0.0, 0.0, 0.0), step=(2.0, 2.0, 2.0))
    return find_nodules(prob, hu, grid=grid, lungs=labels > 0, lung_labels=lung_labels, thresholds=(0.5,),
                        patient="T"), nodules


def test_nodule_columns_from_the_mask(thorax):
    table, nodules = _table(thorax, thorax[3])
    assert len(table) == 3  # nothing dropped, the one in bowel gas included
    juxta = table.loc[(table.x_vox - np.nonzero(nodules["juxta"])[2].mean()).abs().idxmin()]
    central = table.loc[(table.x_vox - np.nonzero(nodules["central"])[2].mean()).abs().idxmin()]
    gas = table[table.lung == "outside"]
    assert len(gas) == 1 and not gas.inside_lung_mask.iloc[0] and gas.distance_to_pleura_centre_mm.iloc[0] < 0
    assert np.isnan(gas.distance_to_pleura_edge_mm.iloc[0]) and gas.lung_mask_share.iloc[0] == 0
    assert juxta.lung == "right" and juxta.juxtapleural and juxta.inside_lung_mask
    assert juxta.distance_to_pleura_edge_mm == 0 and 0 < juxta.distance_to_pleura_centre_mm < 12
    assert central.lung == "left" and not central.juxtapleural and central.distance_to_pleura_edge_mm > 4
    assert central.distance_to_pleura_centre_mm > central.distance_to_pleura_edge_mm
    # 40 HU balls: solid; the bowel gas (-1000 HU) is non-solid.
    assert juxta.attenuation == "solid" and juxta.solid_share == 1.0
    assert gas.attenuation.iloc[0] == "non-solid"
    # Longest axial diameter: the 8 mm central ball measures 8 mm + one pixel at most, the 12 mm one ~12.
    assert 8.0 <= central.longest_axial_diameter_mm <= 10.0
    assert 10.0 <= juxta.longest_axial_diameter_mm <= 14.0


def test_nodule_columns_without_the_mask(thorax):
    table, _ = _table(thorax, None)
    assert (table.lung == "unknown").all() and not table.juxtapleural.any()
    assert table.distance_to_pleura_centre_mm.isna().all()
    assert table.attenuation.isin(["solid", "non-solid"]).all()  # the HU columns need no mask


def test_old_tables_read_with_the_new_columns_unmeasured(thorax):
    from test_nodules import old_layout_dataset

    from lungzarr.algorithms.nodules import NODULE_COLUMNS, dataset_to_nodules

    table, _ = _table(thorax, thorax[3])
    old = old_layout_dataset(table).drop_vars(["lung", "juxtapleural", "solid_share", "attenuation"])
    back = dataset_to_nodules(old)
    assert list(back.columns) == list(NODULE_COLUMNS)
    assert (back.lung == "unknown").all() and back.solid_share.isna().all()


# --- the stage in the pipeline ---

def test_stage_writes_labels_measures_and_qc(tmp_path):
    from lungzarr.algorithms.phantom import DEMO_PATIENTS
    from lungzarr.demo import write_demo_cohort
    from lungzarr.io.store import CohortStore, read_patients
    from lungzarr.pipeline import run
    from lungzarr.reports.html import qc_patient

    write_demo_cohort(tmp_path / "input", n_patients=1)
    store_path = tmp_path / "c.zarr"
    run(tmp_path / "input", store_path, stages=["ingest", "segment", "lungs3d"])
    pid = DEMO_PATIENTS[0][0]
    store = CohortStore(store_path, mode="r")
    ds = store.open_patient(pid)
    assert ds.lung_labels.dtype == np.uint8 and ds.lung_labels.shape == ds.hu_2mm.shape
    assert set(np.unique(ds.lung_labels.values)) == {0, 1, 2}
    np.testing.assert_array_equal(ds.lungs.values, store.open_patient(pid).lungs.values)
    row = read_patients(store_path).iloc[0]
    assert row.lung3d_right_ml > 100 and row.lung3d_left_ml > 100
    assert row.lung3d_ml == pytest.approx(row.lung3d_right_ml + row.lung3d_left_ml)
    png = qc_patient(store_path, pid, tmp_path / "qc.png")
    assert png.stat().st_size > 10_000


# --- real slabs ---

def _hu_2mm(folder):
    from dicom_phantoms import fixture_hu_2mm

    return fixture_hu_2mm(str(shared_path(folder)))  # decoded and zoomed once per session, read-only


@pytest.mark.requires_shared
def test_ricord_trachea_and_bowel_gas_leave_the_mask(record_property):
    from lungzarr.algorithms.segment import segment_lung_slices

    hu, grid = _hu_2mm(RICORD_DIR)
    labels, details = lung_labels_numpy(hu, spacing=grid.spacing, x_step=grid.step[2], details=True)
    legacy = segment_lung_slices(hu)[0]
    ml = float(np.prod(grid.spacing)) / 1000
    airway_ml = details["airway"].sum() * ml
    # Gas: the air components apart from the lung fields of at least 100 voxels (0.8 ml; the thousands of
    # smaller ones are air between vessels at the lung border, which the closing may take back).
    from scipy import ndimage as ndi

    parts, _ = ndi.label(details["air"] & ~details["fields"])
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    bowel = sizes[parts] >= 100
    bowel_in_legacy_ml = (legacy & bowel).sum() * ml
    print(f"\nRICORD: legacy {legacy.sum() * ml:.0f} ml, new {(labels > 0).sum() * ml:.0f} ml (right "
          f"{(labels == RIGHT).sum() * ml:.0f}, left {(labels == LEFT).sum() * ml:.0f}); airway {airway_ml:.0f} ml, "
          f"gas outside the lungs in the legacy mask {bowel_in_legacy_ml:.0f} ml")
    record_property("airway_ml", float(airway_ml))
    assert airway_ml > 20  # trachea and main bronchi, ~ 15 cm of a 2 cm tube
    assert bowel_in_legacy_ml > 20 and not (labels[bowel] > 0).any()
    assert not (labels[details["airway"]] > 0).any()
    # Both lungs, right at smaller x (step > 0), of plausible size.
    assert 1500 < (labels == RIGHT).sum() * ml < 3500 and 1500 < (labels == LEFT).sum() * ml < 3500
    x = grid.axis(2)
    assert x[np.nonzero(labels == RIGHT)[2]].mean() < x[np.nonzero(labels == LEFT)[2]].mean()


@pytest.mark.requires_shared
def test_lidc_nodule_is_inside_the_mask():
    hu, grid = _hu_2mm(LIDC_DIR)
    labels = lung_labels_numpy(hu, spacing=grid.spacing, x_step=grid.step[2])
    k = np.rint((np.array([-116.0, 86.0, 56.0]) - np.array(grid.origin)) / np.array(grid.step)).astype(int)
    # The readers' centre (a solid nodule, so not air itself) lies in the left lung (x > 0 in LPS).
    assert labels[tuple(k)] == LEFT
    assert air_in_body(hu).any() and lung_fields(air_in_body(hu)).any()
