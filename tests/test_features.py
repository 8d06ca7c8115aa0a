"""DSB2017 per-patient features: conformance with the reference rows and quirks.

The reference rows in ../shared/fixtures/dsb2017/reference/ were written by
the tjvananne refactor for patient 0acbeb...; docs/algorithms.md §7: with the
segmented volume standing in for the unsegmented one and the refactor's
probability maps, every column must come back, except ``cancer``, which the
refactor never found (-777) and the labels CSV gives (1).
"""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import scipy.stats

from lungzarr.algorithms.components import describe_legacy, pix_to_hu
from lungzarr.algorithms.features import (
    DSB_THRESHOLDS,
    dsb2017_features,
    dsb2017_inputs,
    dsb2017_table,
    lung_measures,
)
from lungzarr.io.legacy import read_legacy_patient
from lungzarr.volume import normalize_hu

from conftest import DSB_DIR, DSB_PATIENT, shared_path

REFERENCES = {
    "keras8_0313": "features_keras8_0313.csv",
    "keras_0311": "features_keras_0311.csv",
    "base_8": "features_base_8.csv",
}
RTOL = 1e-6
#: The other patient of the refactor's run: its CSVs (from which the reference
#: rows come) are pd.concat of both patients' frames, and that fixes which
#: -7777 print as integers. Its inputs, from tjvananne/kaggle_dsb2017
#: tjv_materials/02_generate_features/input/, must sit beside DSB_PATIENT's.
DSB_PARTNER = "0bd0e3056cbf23a1cb7f0f0b18446068"


def read_reference(path):
    """Header and values of a one-row reference CSV, as written (no pandas mangling)."""
    with open(path, newline="") as handle:
        header, row = list(csv.reader(handle))[:2]
    assert header[0] in ("id", "")
    return row[0], header[1:], [float(value) for value in row[1:]]


@pytest.fixture(scope="module")
def dsb_inputs(request):
    root = shared_path(DSB_DIR)
    patient = read_legacy_patient(root / "input", DSB_PATIENT)
    # §7: the unsegmented volume is not shipped; the segmented one stands in.
    inputs = dsb2017_inputs(patient.segmented, patient.segmented, patient.prob_windows,
                            box=patient.box)
    return root / "reference", patient, inputs


@pytest.fixture(scope="module")
def computed(dsb_inputs):
    reference_dir, patient, inputs = dsb_inputs
    return {fmt: dsb2017_features(*inputs, cancer=patient.cancer, fmt=fmt, patient=DSB_PATIENT)
            for fmt in REFERENCES}


def compare(row, names, values):
    """(#exact, worst relative error, failures) of ``row`` against reference values."""
    assert list(row.columns) == names
    exact, worst, failures = 0, 0.0, []
    mine_values = row.iloc[0].tolist()
    integers = [np.issubdtype(dtype, np.integer) for dtype in row.dtypes]
    for name, mine, ref, integer in zip(names, mine_values, values, integers):
        if mine == ref:
            exact += 1
            continue
        rel = abs(mine - ref) / abs(ref) if ref else np.inf
        worst = max(worst, rel)
        if integer or rel > RTOL:
            failures.append((name, mine, ref))
    return exact, worst, failures


@pytest.mark.requires_shared
@pytest.mark.parametrize("fmt", list(REFERENCES))
def test_matches_reference_row(dsb_inputs, computed, fmt):
    reference_dir, patient, _ = dsb_inputs
    uid, names, values = read_reference(reference_dir / REFERENCES[fmt])
    row = computed[fmt]
    assert uid == DSB_PATIENT and list(row.index) == [DSB_PATIENT] and row.index.name == "id"
    assert row.shape == (1, {"keras8_0313": 2525, "keras_0311": 2357, "base_8": 302}[fmt])
    # The refactor wrote -777: it never matched its patient ids with the labels.
    cancer = names.index("cancer")
    assert values[cancer] == -777
    assert patient.cancer == 1 and row.iloc[0]["cancer"] == 1
    values[cancer] = 1
    exact, worst, failures = compare(row, names, values)
    assert failures == []
    # More than the -7777 placeholders must have been compared.
    assert sum(v != -7777 for v in values) > {"base_8": 150}.get(fmt, 500)


@pytest.mark.requires_shared
def test_refactor_label_reproduces_row_bit_for_bit(dsb_inputs):
    reference_dir, _, inputs = dsb_inputs
    uid, names, values = read_reference(reference_dir / REFERENCES["keras8_0313"])
    row = dsb2017_features(*inputs, fmt="keras8_0313", patient=uid)  # default cancer=-777
    exact, worst, failures = compare(row, names, values)
    assert failures == [] and exact == len(names) == 2525


def reference_text(reference_dir, fmt):
    with open(reference_dir / REFERENCES[fmt], newline="") as handle:
        return handle.read()


def csv_text(frame):
    buffer = io.StringIO()
    frame.to_csv(buffer)
    return buffer.getvalue()


@pytest.mark.requires_shared
@pytest.mark.parametrize("fmt", list(REFERENCES))
def test_reference_text_differs_only_by_cohort_upcasts(dsb_inputs, fmt):
    # Alone, the patient's row prints every missing value as the original's
    # int -7777 (or -777). The reference row was written in a two-patient
    # table, where pd.concat made float64 every column the other patient had
    # a value in. Those upcasts must be the only difference, and only ever
    # at missing values: promoting exactly them gives the reference text.
    reference_dir, _, inputs = dsb_inputs
    text = reference_text(reference_dir, fmt)
    row = dsb2017_features(*inputs, cancer=-777, fmt=fmt, patient=DSB_PATIENT)
    assert csv_text(dsb2017_table([row])) == csv_text(row) != text
    _, ref_fields = list(csv.reader(io.StringIO(text)))
    _, my_fields = list(csv.reader(io.StringIO(csv_text(row))))
    upcast = [name for name, mine, ref in zip(row.columns, my_fields[1:], ref_fields[1:])
              if mine != ref]
    assert upcast, "the fixture must exercise the cohort upcast"
    assert all(row[name].dtype == np.int64 for name in upcast)
    assert set(row.iloc[0][upcast]) <= {-7777, -777}
    assert csv_text(row.astype({name: np.float64 for name in upcast})) == text
    # An integer in the reference is an integer in the row: concat never narrows.
    integer_in_ref = [name for name, ref in zip(row.columns, ref_fields[1:])
                      if ref.lstrip("-").isdigit()]
    assert all(row[name].dtype == np.int64 for name in integer_in_ref)


@pytest.mark.requires_shared
def test_0311_is_0313_without_xcenter_and_shapes(computed):
    full, short = computed["keras8_0313"], computed["keras_0311"]
    dropped = [c for c in full.columns if c not in short.columns]
    assert len(dropped) == 3 * 11 * 5 + 3
    assert {c for c in dropped if not c.startswith("xcenter_")} == {"zshape", "yshape", "xshape"}
    assert all(c.endswith("_0") for c in dropped if c.startswith("xcenter_"))
    assert (full[short.columns].to_numpy() == short.to_numpy()).all()


@pytest.mark.requires_shared
def test_float64_lung_band_would_not_match(dsb_inputs, computed):
    # Guard that the fixture exercises the float32 comparison of §6: counting
    # the voxels at exactly -990 HU changes lvol_2.
    _, _, (images, segmented, pmav) = dsb_inputs
    ims_seg = segmented[4:4 + pmav.shape[0]].astype(np.float64)
    lo = (-990 + 1000.0) / 1400.0 - 0.028
    hi = (-400 + 1000.0) / 1400.0 - 0.028
    float64_count = np.count_nonzero((ims_seg > lo) & (ims_seg < hi))
    assert float64_count != computed["keras8_0313"].iloc[0]["lvol_2"]


# --- building blocks on synthetic data -----------------------------------

def test_describe_legacy_agrees_with_scipy_describe():
    rng = np.random.default_rng(1)
    values = pix_to_hu(normalize_hu(rng.integers(-1000, 400, size=777)))
    mine = describe_legacy(values)
    ref = scipy.stats.describe(values.astype(np.float64))
    assert mine["vol"] == ref.nobs
    assert (mine["min"], mine["max"]) == tuple(np.float32(ref.minmax))
    # float32 moments of 777 HU values against float64: numpy's pairwise sums carry at most about
    # log2(777) ~ 10 roundings of u = 6e-8 per term, relative to sum |x| / |sum x| < 3 here (and its square and
    # cube for the central moments): ~2e-6 whatever SIMD width numpy dispatches to, under the 1e-5 asked.
    for name, expected in [("mean", ref.mean), ("variance", ref.variance),
                           ("skewness", ref.skewness), ("kurtosis", ref.kurtosis)]:
        assert mine[name] == pytest.approx(expected, rel=1e-5), name
    # Float32 statistics, kurtosis in float64.
    assert all(isinstance(mine[n], np.float32) for n in ("min", "max", "mean", "variance", "skewness"))
    assert isinstance(mine["kurtosis"], float)


def test_describe_legacy_edge_cases():
    flat = describe_legacy(np.full(5, -500.0, dtype=np.float32))
    assert flat["skewness"] == 0 and flat["kurtosis"] == -3 and flat["variance"] == 0
    empty = describe_legacy(np.zeros(0, dtype=np.float32))
    assert set(empty.values()) == {-7777}
    with pytest.raises(TypeError, match="float32"):
        describe_legacy(np.zeros(3))


def test_pix_to_hu_rounds_in_float32():
    hu = np.arange(-1000, 401)
    back = pix_to_hu(normalize_hu(hu))
    assert back.dtype == np.float32
    off = np.count_nonzero(back != hu)
    assert off == 94  # §6: 94 of the 1401 levels come back one float32 step off
    assert np.all(np.abs(back - hu) <= np.spacing(np.float32(1000)))


def test_lung_band_excludes_both_ends_in_float32():
    hu = np.array([-991, -990, -989, -951, -950, -949, -401, -400, -399], dtype=np.int16)
    ims_seg = normalize_hu(np.tile(hu, (2, 1, 1)).reshape(2, 1, -1))
    m = lung_measures(ims_seg)
    # -989, -951, -950, -949, -401: 5 voxels per slice in -990 < HU < -400.
    assert m["lvol_0"] == m["lvol_1"] == 5 and m["lvol_2"] == 10
    # Of those, at or below -950 (emphysema): -989, -951, -950 -> 3 per slice.
    assert m["emphy_2"] == pytest.approx(6 / 11) and m["emphy_0"] == pytest.approx(3 / 6)
    assert m["centre"] == pytest.approx((0.5, 0.0, 4.0))


def _synthetic_patient(z=40, size=32):
    """A patient with two equal cubes (a diameter tie), one larger cube and lungs."""
    hu = np.full((z, size, size), -800, dtype=np.int16)
    hu[:, :, : size // 2] = -960  # emphysematous half
    prob = np.zeros((z - 8, size, size), dtype=np.float32)
    prob[5:8, 3:6, 20:23] = 0.97       # label 1 in raster order (z, then y): 27 voxels
    prob[5:8, 20:23, 5:8] = 0.97       # label 2: ties with label 1, later in raster order
    prob[24:28, 10:14, 10:14] = 0.9995  # label 3: 64 voxels, largest, second half
    prob[12, 30, 30] = 0.99             # one voxel: diameter < 3 mm, filtered out
    hu[4 + 24:4 + 28, 10:14, 10:14] = 30
    hu[4 + 5:4 + 8, 3:6, 20:23] = -100
    norm = normalize_hu(hu)
    return norm, norm.copy(), prob


def test_synthetic_sort_ties_quirks_and_missing():
    images, segmented, pmav = _synthetic_patient()
    row = dsb2017_features(images, segmented, pmav, fmt="keras8_0313", patient="p").iloc[0]
    assert row["ncount_2_0.5"] == 3 and row["ncount_2_0.99"] == 1 and row["ncount_0_0.5"] == 2
    # Descending diameter; the tie keeps label (raster) order: y=3 cube before y=20 cube.
    assert row["vol_2_0.5_n0_0"] == 64 and row["vol_2_0.5_n1_0"] == row["vol_2_0.5_n2_0"] == 27
    assert row["max_2_0.5_n1_0"] == -100 and row["max_2_0.5_n2_0"] == -960
    assert row["vol_2_0.5_n3_0"] == -7777 and row["diameter_2_0.5_n4_0"] == -7777
    assert row["diameter_2_0.5_n0_0"] == pytest.approx(2 * (3 * 64 * 8 / (4 * np.pi)) ** 0.3333)
    # Segment 1 z is local to the segment minus the whole-volume lung centre.
    n = pmav.shape[0]
    assert row["zcenter_1_0.5_n0_0"] == row["zcenter_2_0.5_n0_0"] - n // 2
    assert row["xrel_2_0.5_ns"] == row["yrel_2_0.5_ns"] * 32 / 32  # quirk: xrel from y
    assert row["yrel_2_0.5_ns"] != -7777
    assert row["zrel_0_0.9999999_ns"] == -7777 and row["ncount_0_0.9999999"] == 0
    # The overall statistics concatenate the kept nodules in diameter order.
    assert row["vol_2_0.5"] == 64 + 27 + 27
    assert (row["lvol_sct3"], row["lvol_sct6"]) == (row["lvol_2"], row["lvol_2"])
    assert (row["zshape"], row["yshape"], row["xshape"]) == (n, 32, 32)


def _two_candidates_one_filtered(z=40, size=32):
    """One kept cube and a single voxel that the diameter filter drops."""
    hu = np.full((z, size, size), -800, dtype=np.int16)
    prob = np.zeros((z - 8, size, size), dtype=np.float32)
    prob[20:23, 10:13, 10:13] = 0.97
    prob[5, 28, 28] = 0.97
    norm = normalize_hu(hu)
    return norm, norm.copy(), prob


def test_missing_values_are_int_per_patient_and_upcast_per_cohort():
    one = dsb2017_features(*_two_candidates_one_filtered(), fmt="keras8_0313", patient="b")
    r = one.iloc[0]
    # Two candidates, one kept: n0 is a value, n1 is missing although a
    # second candidate existed -- typing follows the kept nodules.
    assert r["ncount_2_0.5"] == 1
    assert one["diameter_2_0.5_n0_0"].dtype == np.float64
    assert one["zrel_2_0.5_ns"].dtype == np.float64
    missing = [c for c in one.columns if one[c].iloc[0] == -7777]
    assert "diameter_2_0.5_n1_0" in missing and "zrel_2_0.99_ns" in missing
    assert all(one[c].dtype == np.int64 for c in missing)
    assert all(one[c].dtype == np.float64 for c in one.columns
               if c not in missing and not c.startswith(("vol_", "ncount_", "lvol"))
               and c not in ("cancer", "zshape", "yshape", "xshape"))
    # With a patient that has three kept nodules, n1 and n2 become float64
    # for both patients; n3 stays int64 (missing in both).
    three = dsb2017_features(*_synthetic_patient(), fmt="keras8_0313", patient="a")
    table = dsb2017_table([three, one])
    assert table["diameter_2_0.5_n1_0"].dtype == np.float64
    assert table["diameter_2_0.5_n3_0"].dtype == np.int64
    assert table["vol_2_0.5_n1_0"].dtype == np.int64  # counts stay int
    header, _, line_b = list(csv.reader(io.StringIO(csv_text(table))))
    field = dict(zip(header, line_b))
    assert field["diameter_2_0.5_n1_0"] == "-7777.0" and field["diameter_2_0.5_n3_0"] == "-7777"
    assert field["vol_2_0.5_n1_0"] == "-7777"
    assert dict(zip(*csv.reader(io.StringIO(csv_text(one)))))["diameter_2_0.5_n1_0"] == "-7777"
    # Values never change, only the column types.
    assert (table.loc[["b"]].to_numpy(dtype=np.float64) == one.to_numpy(dtype=np.float64)).all()


def test_base8_missing_zrel_is_int_minus_777():
    row = dsb2017_features(*_two_candidates_one_filtered(), fmt="base_8", patient="b")
    assert row["zrel_0_0.9999999_n1"].dtype == np.int64 and row.iloc[0]["zrel_0_0.9999999_n1"] == -777
    # base_8 does not filter: the lone voxel of segment 0 is a value.
    assert row["zrel_0_0.75_n1"].dtype == np.float64 and row.iloc[0]["ncount_0_0.75"] == 1


def test_table_checks():
    row = dsb2017_features(*_two_candidates_one_filtered(), fmt="keras8_0313", patient="b")
    other = dsb2017_features(*_two_candidates_one_filtered(), fmt="keras_0311", patient="c")
    with pytest.raises(ValueError, match="rows is empty"):
        dsb2017_table([])
    with pytest.raises(ValueError, match=r"rows\[1\] must be"):
        dsb2017_table([row, other])


def test_base8_layout_and_largest_nodule():
    images, segmented, pmav = _synthetic_patient()
    row = dsb2017_features(images, segmented, pmav, fmt="base_8", cancer=0, patient="p")
    assert row.shape == (1, 302) and row.columns.is_unique
    r = row.iloc[0]
    # Segment 1 repeats segment 0's columns (quirk), named as pandas reads them back.
    # Segment 0 (z < 16) has both cubes and the unfiltered single voxel.
    assert r["ncount_0_0.75.1"] == r["ncount_0_0.75"] == 3
    assert r["ncount_0_0.75.2"] == 3 and r["ncount_1_0.75.1"] == r["ncount_1_0.75"]
    # n1 is the largest component, ncount counts every component (no filter).
    assert r["vol_2_0.75_n1"] == 64 and r["ncount_2_0.75"] == 4
    assert r["vol_0_0.9999999"] == -7777 and r["zrel_0_0.9999999_n1"] == -777
    assert r["cancer"] == 0


def test_input_checks():
    images, segmented, pmav = _synthetic_patient()
    with pytest.raises(ValueError, match="fmt must be one of"):
        dsb2017_features(images, segmented, pmav, fmt="keras9")
    with pytest.raises(ValueError, match="pmav must have shape"):
        dsb2017_features(images, segmented, pmav[1:])
    with pytest.raises(ValueError, match="float32"):
        dsb2017_features(images.astype(np.float64), segmented, pmav)
    assert len(DSB_THRESHOLDS) == 11
