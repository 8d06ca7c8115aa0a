"""The per-nodule table, its Dataset form, the dask entry point, and its
agreement with the DSB2017 patient row it summarises (issue 6, item 5)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lungzarr.algorithms.components import box_shape, legacy_diameter, legacy_hu
from lungzarr.algorithms.features import (
    DSB_THRESHOLDS,
    MID,
    WINDOW,
    dsb2017_features,
    dsb2017_inputs,
    lung_measures,
)
from lungzarr.algorithms.nodules import (
    NODULE_COLUMNS,
    concat_nodule_tables,
    dataset_to_nodules,
    empty_nodule_table,
    find_nodules,
    nodules_to_dataset,
    select_nodules,
)
from lungzarr.io.legacy import read_legacy_patient
from lungzarr.volume import Grid

from conftest import DSB_PATIENT


def nominal_grid(shape, origin=(0.0, 0.0, 0.0), step=(2.0, 2.0, 2.0)):
    return Grid(tuple(shape), tuple(origin), tuple(step))


def synthetic_patient(z=40, size=32):
    """HU and a full-volume probability map (window maps placed at slice i + 4).

    Two cubes of equal size (a diameter tie), a larger cube, a bright cube
    (mean HU >= 396: filtered) and a single voxel (diameter < 3 mm: filtered).
    """
    hu = np.full((z, size, size), -800, dtype=np.int16)
    hu[:, :, : size // 2] = -960
    prob = np.zeros((z, size, size), dtype=np.float32)
    prob[9:12, 3:6, 20:23] = 0.97
    prob[9:12, 20:23, 5:8] = 0.97
    prob[28:32, 10:14, 10:14] = 0.9995
    hu[28:32, 10:14, 10:14] = 30
    prob[20:22, 25:27, 25:27] = 0.991
    hu[20:22, 25:27, 25:27] = 900
    prob[16, 30, 30] = 0.99
    return hu, prob


def derive_patient_columns(nodules, ims_seg, shape):
    """Segment-2 nodule columns of keras8_0313 from the nodule table.

    Legacy conventions: only ``passes_dsb_filter`` rows, label order for the
    weighted centres, then a stable sort by the 0.3333-exponent diameter of
    8 mm³ voxels; centres are box centres (start + stop) / 2 in the windows'
    slice numbering (z - 4) minus the lung centre; extents on the nominal
    2 mm grid; HU min/max as the original saw them (clipped float32).
    """
    n_slices, height, width = shape
    cz, cy, cx = lung_measures(ims_seg)["centre"]
    out = {}
    for t in DSB_THRESHOLDS:
        part = f"2_{t}"
        rows = nodules[(nodules.threshold == t) & nodules.passes_dsb_filter].sort_values("label")
        voxels = rows.voxels.to_numpy()
        diameter = legacy_diameter(voxels)
        start = rows[["z0", "y0", "x0"]].to_numpy() - [MID, 0, 0]
        stop = rows[["z1", "y1", "x1"]].to_numpy() - [MID, 0, 0]
        centre = (start + stop) / 2 - [cz, cy, cx]
        shape_measures = box_shape((stop - start) * 2, diameter)
        out[f"ncount_{part}"] = len(rows)
        if len(rows):
            area = voxels.astype(np.float64)
            out[f"zrel_{part}_ns"] = np.sum(area * centre[:, 0]) / area.sum() / n_slices
            out[f"yrel_{part}_ns"] = np.sum(area * centre[:, 1]) / area.sum() / height
        order = np.argsort(-diameter, kind="stable")
        for n in range(5):
            npart = f"{part}_n{n}_0"
            if n >= len(rows):
                out[f"diameter_{npart}"] = out[f"vol_{npart}"] = -7777
                continue
            k = order[n]
            out[f"vol_{npart}"] = voxels[k]
            out[f"diameter_{npart}"] = diameter[k]
            for i, axis in enumerate("zyx"):
                out[f"{axis}center_{npart}"] = centre[k, i]
            out[f"irreg_vol_{npart}"] = shape_measures["irreg_vol"][k]
            out[f"irreg_shape_{npart}"] = shape_measures["irreg_shape"][k]
            row = rows.iloc[k]
            out[f"min_{npart}"] = float(legacy_hu(np.array([row.hu_min]))[0])
            out[f"max_{npart}"] = float(legacy_hu(np.array([row.hu_max]))[0])
    return out


def assert_derived_match(hu, segmented, prob):
    z = hu.shape[0]
    images, segmented_norm, pmav = dsb2017_inputs(hu, segmented, prob[MID:z - MID])
    row = dsb2017_features(images, segmented_norm, pmav, fmt="keras8_0313", patient="p").iloc[0]
    nodules = find_nodules(prob, hu, grid=nominal_grid(hu.shape), patient="p")
    derived = derive_patient_columns(nodules, segmented_norm[MID:z - MID], pmav.shape)
    assert len(derived) > 11 * 6
    mismatched = {k: (v, row[k]) for k, v in derived.items() if row[k] != pytest.approx(v, rel=1e-12)}
    assert mismatched == {}
    return row, nodules


def test_top5_columns_derived_from_nodule_table_synthetic():
    hu, prob = synthetic_patient()
    row, nodules = assert_derived_match(hu, hu, prob)
    # The synthetic case exercises what the fixture cannot: several nodules,
    # a tie, and both filters.
    assert row["ncount_2_0.5"] == 3 and row["vol_2_0.5_n2_0"] == 27
    at_05 = nodules[nodules.threshold == 0.5]
    assert len(at_05) == 5 and at_05.passes_dsb_filter.sum() == 3
    bright = at_05[at_05.hu_mean == 900]
    assert len(bright) == 1 and not bright.passes_dsb_filter.iloc[0]


@pytest.mark.requires_shared
def test_top5_columns_derived_from_nodule_table_fixture(dsb_dir):
    p = read_legacy_patient(dsb_dir / "input", DSB_PATIENT)
    z = p.segmented.shape[0]
    prob = np.zeros(p.segmented.shape, dtype=np.float32)
    prob[MID:z - (WINDOW - MID)] = p.prob_windows[:, 0, 0]
    row, nodules = assert_derived_match(p.segmented, p.segmented, prob)
    assert row["diameter_2_0.5_n0_0"] == pytest.approx(15.37, abs=0.01)  # §5: refactor 15.37


def test_millimetre_centres_bbox_and_sizes():
    shape = (12, 16, 16)
    prob = np.zeros(shape, dtype=np.float32)
    prob[2:5, 6:8, 9:10] = 0.9  # 3 x 2 x 1 voxels
    hu = np.full(shape, -700, dtype=np.int16)
    hu[2:5, 6:8, 9:10] = np.arange(6).reshape(3, 2, 1) * 10
    grid = Grid(shape, (-100.0, 50.0, -20.0), (-1.974, 2.007, 2.007))
    df = find_nodules(prob, hu, grid=grid, thresholds=(0.5,), patient="p")
    r = df.iloc[0]
    assert (r.z_vox, r.y_vox, r.x_vox) == (3.0, 6.5, 9.0)
    assert (r.z_mm, r.y_mm, r.x_mm) == pytest.approx((-100 - 3 * 1.974, 50 + 6.5 * 2.007, -20 + 9 * 2.007))
    assert (r.z0, r.y0, r.x0, r.z1, r.y1, r.x1) == (2, 6, 9, 5, 8, 10)
    assert (r.bbox_z_mm, r.bbox_y_mm) == pytest.approx((r.z_mm, r.y_mm))
    assert r.volume_mm3 == pytest.approx(6 * 1.974 * 2.007 ** 2)
    assert r.diameter_mm == pytest.approx((6 * r.volume_mm3 / np.pi) ** (1 / 3))
    assert (r.extent_z_mm, r.extent_y_mm, r.extent_x_mm) == pytest.approx((3 * 1.974, 2 * 2.007, 2.007))
    assert r.aspect == pytest.approx(2.007 / (3 * 1.974)) and r.extent == 1.0
    assert (r.hu_min, r.hu_max, r.hu_mean) == (0, 50, 25)
    assert r.hu_var == pytest.approx(np.var(np.arange(6) * 10, ddof=1))
    assert r.prob_max == pytest.approx(0.9) and r.lung_half in ("left", "right")
    assert r.passes_dsb_filter  # 6 voxels: diameter 4.5 mm, mean HU 25


def test_lung_half_and_outside():
    shape = (10, 10, 20)
    prob = np.zeros(shape, dtype=np.float32)
    prob[4:6, 4:6, 2:4] = 0.8     # small x
    prob[4:6, 4:6, 15:17] = 0.8   # large x
    prob[0:2, 0:2, 9:11] = 0.8    # away from the lungs
    lungs = np.zeros(shape, dtype=bool)
    lungs[3:8, 3:8, 1:19] = True
    hu = np.zeros(shape, dtype=np.int16)
    df = find_nodules(prob, hu, grid=nominal_grid(shape), lungs=lungs, thresholds=(0.5,))
    assert df.sort_values("x_vox").lung_half.tolist() == ["right", "outside", "left"]
    # A negative x step flips the patient sides.
    flipped = find_nodules(prob, hu, grid=nominal_grid(shape, step=(2, 2, -2)), lungs=lungs,
                           thresholds=(0.5,))
    assert flipped.sort_values("x_vox").lung_half.tolist() == ["left", "outside", "right"]
    none = find_nodules(prob, hu, grid=nominal_grid(shape), lungs=np.zeros(shape, bool), thresholds=(0.5,))
    assert set(none.lung_half) == {"outside"}


def test_empty_table_and_dataset_round_trip():
    hu, prob = synthetic_patient()
    df = find_nodules(prob, hu, grid=nominal_grid(hu.shape), patient="p1")
    assert list(df.columns) == list(NODULE_COLUMNS)
    ds = nodules_to_dataset(df)
    assert ds.sizes["nodule"] == len(df) and ds.attrs["descriptions"]["diameter_mm"]
    assert list(ds.data_vars) == ["table"] and not ds.coords  # one array in the store
    pd.testing.assert_frame_equal(dataset_to_nodules(ds), df)
    empty = find_nodules(np.zeros_like(prob), hu, grid=nominal_grid(hu.shape), patient="p2")
    pd.testing.assert_frame_equal(empty, empty_nodule_table())
    pd.testing.assert_frame_equal(dataset_to_nodules(nodules_to_dataset(empty)), empty)
    both = concat_nodule_tables([df, empty])
    pd.testing.assert_frame_equal(both, df)


def test_select_nodules_is_threshold_and_filter():
    hu, prob = synthetic_patient()
    table = find_nodules(prob, hu, grid=nominal_grid(hu.shape), patient="p0")
    chosen = select_nodules(table)
    expected = table[(table.threshold == 0.5) & table.passes_dsb_filter]
    assert len(chosen) and len(chosen) < len(table)
    pd.testing.assert_frame_equal(chosen, expected)
    assert len(select_nodules(table, dsb_filter=False)) == int((table.threshold == 0.5).sum())
    assert len(select_nodules(table, threshold=None, dsb_filter=False)) == len(table)
    assert select_nodules(table, threshold=0.9).threshold.eq(0.9).all()
    assert select_nodules(empty_nodule_table()).empty


def test_input_checks():
    hu, prob = synthetic_patient()
    grid = nominal_grid(hu.shape)
    with pytest.raises(ValueError, match="float32"):
        find_nodules(prob.astype(np.float64), hu, grid=grid)
    with pytest.raises(ValueError, match="hu shape"):
        find_nodules(prob, hu[1:], grid=grid)
    with pytest.raises(ValueError, match="grid shape"):
        find_nodules(prob, hu, grid=nominal_grid((1, 2, 3)))
    with pytest.raises(TypeError, match="Grid"):
        find_nodules(prob, hu, grid=(2, 2, 2))
    with pytest.raises(ValueError, match="lacks nodule table columns"):
        nodules_to_dataset(pd.DataFrame({"a": [1]}))


# --- the stored table: one compact array (issue 15), the old one-array-per-column layout still read ---

def old_layout_dataset(df):
    """The nodule table as lungzarr wrote it before the compact layout: one variable per column."""
    import xarray as xr

    data_vars = {}
    for name, (dtype, description) in NODULE_COLUMNS.items():
        values = df[name].to_numpy()
        values = (np.array([("" if v is None else str(v)) for v in values], dtype=str) if dtype == "str"
                  else values.astype(dtype))
        data_vars[name] = xr.Variable(("nodule",), values, attrs={"description": description})
    return xr.Dataset(data_vars, coords={"nodule": np.arange(len(df), dtype=np.int64)},
                      attrs={"table": "lungzarr nodules"})


def _awkward_table():
    """A table with every kind of value the columns hold: NaN, -0.0, empty and odd strings, large ints."""
    hu, prob = synthetic_patient()
    df = find_nodules(prob, hu, grid=nominal_grid(hu.shape), patient="p1")
    df.loc[0, "hu_var"] = np.nan
    df.loc[1, "aspect"] = -0.0
    df.loc[1, "voxels"] = 2 ** 52 + 1
    df.loc[2, "lung"] = ""
    df.loc[0, "attenuation"] = "part-solid ü"
    return df


def test_compact_table_round_trips_bit_for_bit():
    df = _awkward_table()
    back = dataset_to_nodules(nodules_to_dataset(df))
    pd.testing.assert_frame_equal(back, df)
    assert np.signbit(back.loc[1, "aspect"]) and int(back.loc[1, "voxels"]) == 2 ** 52 + 1
    for name in NODULE_COLUMNS:  # every float exactly, NaN where NaN
        a, b = df[name].to_numpy(), back[name].to_numpy()
        if a.dtype.kind == "f":
            assert np.array_equal(a.view(np.int64), b.view(np.int64)), name
    bad = df.copy()
    bad.loc[0, "voxels"] = 2 ** 53
    with pytest.raises(ValueError, match="2\\*\\*53"):
        nodules_to_dataset(bad)


def _store_with_patient(tmp_path, df):
    from lungzarr.io.store import CohortStore

    store = CohortStore(tmp_path / "s.zarr")
    (tmp_path / "s.zarr" / "patients" / "p1").mkdir(parents=True)
    store._group("patients").create_group("p1")
    return store


def test_stored_table_is_one_array_read_back_identically(tmp_path):
    from lungzarr.pipeline.stages import STAGES
    from lungzarr.pipeline.tables import patient_nodules

    df = _awkward_table()
    store = _store_with_patient(tmp_path, df)
    pending = store.prepare_task("p1", "nodules", None)
    store.write_subgroup("p1", "nodules", nodules_to_dataset(df))
    pending.commit()
    folder = tmp_path / "s.zarr" / "patients" / "p1" / "nodules"
    assert sorted(p.name for p in folder.iterdir()) == ["table", "zarr.json"]
    pd.testing.assert_frame_equal(patient_nodules(store, "p1"), df)
    # xarray opens it as it opens every group (the exports, a user's own reads).
    pd.testing.assert_frame_equal(dataset_to_nodules(store.open_patient("p1", subgroup="nodules").load()), df)
    # This test writes the table alone: the stage's NGFF label image (labels/nodules) is not expected.
    owners = {s.name: {"arrays": s.arrays, "subgroups": tuple(g for g in s.subgroups if not g.startswith("labels/"))}
              for s in STAGES}
    report = store.verify_patient("p1", owners=owners, creator="ingest")
    assert report["damage"] == [] and report["arrays"] == 1 and report["unchecksummed"] == []
    chunk = next(p for p in (folder / "table").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    damage = store.verify_patient("p1", owners=owners, creator="ingest")["damage"]
    assert [(d["stage"], d["array"], d["kind"]) for d in damage] == [("nodules", "nodules/table", "checksum")]


def test_old_layout_tables_still_read_and_unknown_layouts_refused(tmp_path):
    from lungzarr.pipeline.tables import patient_nodules

    df = _awkward_table()
    df = df[df.voxels < 2 ** 31]  # the old layout has no limit; keep the comparison simple
    store = _store_with_patient(tmp_path, df)
    store.write_subgroup("p1", "nodules", old_layout_dataset(df))
    pd.testing.assert_frame_equal(patient_nodules(store, "p1"), df.reset_index(drop=True))
    newer = nodules_to_dataset(df)
    newer.attrs["layout"] = "lungzarr nodules v99"
    store.write_subgroup("p1", "nodules", newer)
    with pytest.raises(ValueError, match="rerun the nodules stage"):
        patient_nodules(store, "p1")


# --- the distance maps on boxes (issue 15): the same values as the whole-volume maps, bit for bit ---

@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (2.5, 0.7, 0.7), (1.9999, 2.0001, 2.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pleura_distances_on_boxes_equal_the_whole_volume_maps(spacing, seed):
    from scipy import ndimage as ndi

    from lungzarr.algorithms.nodules import _PleuraDistances

    rng = np.random.default_rng(seed)
    shape = (30, 41, 37)
    # Blobs of lung with holes, away from and touching the volume's faces: many equal-distance ties.
    mask = ndi.binary_opening(ndi.gaussian_filter(rng.random(shape), 2.0) > 0.5)
    mask[:, :, : 3 + seed] = False
    mask[seed * 4:, 0, :] |= seed == 2
    candidates = np.zeros(shape, bool)
    candidates[5:9, 30:40, 30:36] = True
    spacing = np.asarray(spacing)
    maps = _PleuraDistances(mask, lambda: candidates, spacing)
    full_in = ndi.distance_transform_edt(mask, sampling=spacing)
    full_out = ndi.distance_transform_edt(~mask, sampling=spacing)
    flat_in = np.flatnonzero(mask)
    assert np.array_equal(maps.inside(flat_in).view(np.int64), full_in.reshape(-1)[flat_in].view(np.int64))
    lo = [min(np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax)))[0] for m in (mask, candidates))
          for ax in range(3)]
    hi = [max(np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax)))[-1] for m in (mask, candidates))
          for ax in range(3)]
    box = np.zeros(shape, bool)
    box[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
    flat_out = np.flatnonzero(box & ~mask)
    assert len(flat_out) > 100
    assert np.array_equal(maps.outside(flat_out).view(np.int64), full_out.reshape(-1)[flat_out].view(np.int64))
