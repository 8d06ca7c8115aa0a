"""``--crop lungs``: one prediction box per patient from its lung mask (docs/algorithms.md §5).

Fast: the box arithmetic, the speck rule, the network's reach measured with the trained weights (the
argument for the margin), the box's predictions against the fixed crop's on a synthetic volume, the
lazy graph, and a phantom through the pipeline (attrs, record, zeros outside the box, the nodules
stage, the CLI option). Slow: every real patient of the fixtures, fixed vs lungs, the nodule table.
"""
from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from float_tolerance import assert_nodule_tables_agree, assert_prob_maps_agree, map_tolerance
from test_infer import synthetic_hu

from lungzarr.algorithms.crop import SPECK_SHARE, lung_box
from lungzarr.model import geometry, infer
from lungzarr.model.geometry import LUNG_BOX_MARGIN, ROW_COL_MULTIPLE, box_around, check_box, fixed_box

# ---------------------------------------------------------------------- the box arithmetic

@pytest.mark.parametrize("shape", [(40, 180, 180), (40, 141, 143), (30, 97, 66)])
@pytest.mark.parametrize("bbox", [(10, 47, 31, 30, 90, 60), (0, 1, 2, 30, 60, 64), (12, 30, 20, 13, 31, 21)])
@pytest.mark.parametrize("margin", [0, 8, LUNG_BOX_MARGIN])
def test_box_around_covers_the_margin_on_the_network_grid(shape, bbox, margin):
    z0, y0, x0, z1, y1, x1 = bbox
    box = box_around(bbox, shape, margin=margin)
    assert check_box(box, shape) == box
    rows, cols = geometry.detection_crop(shape)
    for (start, stop), lo, hi, origin, length in ((box["y"], y0, y1, rows, shape[1]),
                                                 (box["x"], x0, x1, cols, shape[2])):
        assert (start - origin) % ROW_COL_MULTIPLE == 0 and (stop - start) % ROW_COL_MULTIPLE == 0
        # margin beyond the bbox, or the detection crop's own edge
        assert start <= max(origin, lo - margin) and stop >= min(length, hi + margin)
        # and no more than the alignment adds
        assert start > lo - margin - ROW_COL_MULTIPLE and stop < hi + margin + ROW_COL_MULTIPLE
    have = geometry.predicted_slices(shape[0])
    # exactly the slices whose window (s-4 ... s+3) holds a slice of the bbox
    expected = [s for s in range(have.start, have.stop) if s + 3 >= z0 and s - 4 < z1]
    assert list(range(*box["z"])) == expected


def test_fixed_box_is_the_original_crop():
    assert fixed_box((183, 141, 143)) == {"z": [4, 179], "y": [1, 141], "x": [3, 143]}


@pytest.mark.parametrize("box, match", [({"z": [4, 10], "y": [2, 18], "x": [0, 16]}, "box y"),
                                        ({"z": [4, 10], "y": [0, 16], "x": [0, 14]}, "box x"),
                                        ({"z": [3, 10], "y": [0, 16], "x": [0, 16]}, "box slices"),
                                        ({"z": [4, 10], "y": [0, 20], "x": [0, 16]}, "box y"),
                                        ({"z": [4, 10], "y": [0, 16]}, "'z', 'y' and 'x'")])
def test_check_box_refuses_a_box_off_the_network_grid(box, match):
    with pytest.raises(ValueError, match=match):
        check_box(box, (20, 16, 16))
    with pytest.raises(ValueError, match=match):
        infer.predict_nodule_prob(np.zeros((20, 16, 16), np.int16), box=box)


def test_lung_box_drops_specks_and_keeps_real_components():
    lungs = np.zeros((40, 120, 120), bool)
    lungs[10:30, 40:80, 30:60] = True      # 24000 voxels, the largest
    lungs[12:28, 45:75, 70:90] = True      # 9600 (40 %): the other lung, kept
    lungs[35:37, 5:10, 100:110] = True     # 100 (0.4 %): a speck, dropped
    box = lung_box(lungs)
    assert box["crop"] == "lungs" and box["components"] == 3
    assert box["dropped_components"] == 1 and box["dropped_voxels"] == 100
    assert box["lung_bbox"] == [10, 40, 30, 30, 80, 90]
    assert box["margin"] == LUNG_BOX_MARGIN and box["speck_share"] == SPECK_SHARE
    assert {k: box[k] for k in "zyx"} == box_around(box["lung_bbox"], lungs.shape)
    # Every voxel of the kept lungs is at least the margin inside the box (or the box reaches the crop's edge).
    assert box["y"] == [16, 104] and box["x"] == [4, 116] and box["z"] == [7, 34]
    # speck_share 0 keeps everything; dask input gives the same box as numpy
    assert lung_box(lungs, speck_share=0)["lung_bbox"] == [10, 5, 30, 37, 80, 110]
    assert lung_box(da.from_array(lungs, chunks=(7, -1, -1))) == box
    with pytest.raises(ValueError, match="speck_share"):
        lung_box(lungs, speck_share=2)


def test_empty_lung_mask_predicts_the_fixed_crop():
    box = lung_box(np.zeros((20, 30, 35), bool))
    assert box["crop"] == "fixed" and "empty" in box["reason"]
    assert {k: box[k] for k in "zyx"} == fixed_box((20, 30, 35))


# ---------------------------------------------------------------------- the network's reach

def test_the_trained_network_reaches_exactly_lung_box_margin():
    """Perturb one input column; the output columns that change are those whose receptive field holds it.

    The measured intervals are the ones geometry.LUNG_BOX_MARGIN's comment derives from the layers: the
    margin is the network's reach, so a box with it gives the lung voxels the fixed crop's inputs.

    "Change" is measured on the logits, against the float32 rounding spread of each output voxel
    (tests/float_tolerance.py): outside the receptive field the two evaluations differ only by rounding
    (oneDNN's kernels may mix neighbouring positions' arithmetic, e.g. Winograd tiles on AVX2), inside it
    the perturbation moves the logit by far more than that spread.
    """
    import keras

    from lungzarr.model.d8 import get_model

    from float_tolerance import LAMBDA, rounding_sd

    rng = np.random.default_rng(0)
    size = 64
    base = rng.random((geometry.WINDOW, size, size), dtype=np.float32)
    columns = list(range(28, 36))  # two of each phase mod 4, far from the edges
    batch = [base]
    for q in columns:
        x = base.copy()
        x[:, :, q] += 5.0
        batch.append(x)
    windows = np.stack(batch)[..., np.newaxis]
    model = get_model()
    logits = keras.Model(model.inputs[0], model.get_layer("head_conv").output)
    z = keras.ops.convert_to_numpy(logits(windows))[:, 0, :, :, 0].astype(np.float64)
    sd = rounding_sd(windows, logits=True)[:, 0, :, :, 0]
    noise = LAMBDA * (sd[1:] + sd[0])                       # per voxel: the two evaluations' allowances
    dz = np.abs(z[1:] - z[0])
    changed = (dz > noise).any(axis=1)                                     # (perturbed column, output column)
    reach = {}
    for i, q in enumerate(columns):
        for c in np.flatnonzero(changed[i]):
            lo, hi = reach.get(c % 4, (0, 0))
            reach[c % 4] = (min(lo, q - c), max(hi, q - c))
    # output column c sees input columns c+lo ... c+hi
    assert reach == {0: (-22, 21), 1: (-23, 20), 2: (-20, 23), 3: (-21, 22)}
    assert max(max(-lo, hi) for lo, hi in reach.values()) == LUNG_BOX_MARGIN
    # The threshold separates two populations: inside the reach the smallest change is far above the
    # rounding spread, outside it the largest change is within it.
    inside = np.zeros_like(changed)
    for i, q in enumerate(columns):
        for c in range(size):
            lo, hi = reach[c % 4]
            inside[i, c] = lo <= q - c <= hi
    ratio = dz.max(axis=1) / noise.max(axis=1)
    assert ratio[inside].min() > 10 and ratio[~inside].max() <= 1, (ratio[inside].min(), ratio[~inside].max())


# ---------------------------------------------------------------------- predictions with a box

@pytest.fixture(scope="module")
def volume_and_lungs():
    hu = synthetic_hu((16, 122, 127))  # 2 rows, 3 columns of detection crop
    lungs = np.zeros(hu.shape, bool)
    lungs[4:12, 25:85, 50:100] = True  # holds the synthetic balls
    return hu, lungs


@pytest.fixture(scope="module")
def fixed_prob(volume_and_lungs):
    return infer.predict_nodule_prob(volume_and_lungs[0], batch_size=4).compute()


def test_box_predictions_equal_the_fixed_crop_inside_and_zero_outside(volume_and_lungs, fixed_prob):
    hu, lungs = volume_and_lungs
    box = lung_box(lungs)
    assert box["y"] == [2, 110] and box["x"] == [27, 123]
    got = infer.predict_nodule_prob(hu, box=box, batch_size=4).compute()
    assert (fixed_prob[lungs] >= 0.5).sum() > 20, "the comparison must not be one of zeros"
    # The network sees other rows and columns: its kernels may sum in another order (tests/float_tolerance.py).
    assert_prob_maps_agree(got[lungs], fixed_prob[lungs], map_tolerance(hu, [got, fixed_prob]))
    (z0, z1), (y0, y1), (x0, x1) = box["z"], box["y"], box["x"]
    inside = np.zeros(hu.shape, bool)
    inside[z0:z1, y0:y1, x0:x1] = True
    assert not got[~inside].any()
    assert (y1 - y0) * (x1 - x0) * (z1 - z0) < 0.8 * 120 * 124 * 8, "the box must save work"


def test_the_box_is_a_task_of_the_graph_and_named_from_its_input(volume_and_lungs, fixed_prob):
    hu, lungs = volume_and_lungs
    calls = []

    def counted_box(mask):
        calls.append(mask.shape)
        return lung_box(mask)

    mask = da.from_array(lungs, chunks=(5, -1, -1), name="lungs-of-patient-a")
    box = dask.delayed(counted_box, pure=True)(mask)
    prob = infer.predict_nodule_prob(da.from_array(hu, chunks=(7, -1, -1)), box=box, batch_size=4)
    assert calls == []  # building the graph computes nothing
    got = prob.compute(scheduler="sync")
    assert calls == [lungs.shape]  # one box task for all the prediction tasks
    assert_prob_maps_agree(got[lungs], fixed_prob[lungs], map_tolerance(hu, [got, fixed_prob]))
    # The key comes from the input's name: another mask (another patient) gives another key, the same the same.
    def named(name):
        return dask.delayed(lung_box, pure=True)(da.from_array(lungs, chunks=(5, -1, -1), name=name))

    assert named("lungs-of-a").key == named("lungs-of-a").key != named("lungs-of-b").key
    assert (infer.predict_nodule_prob(hu, box=named("lungs-of-a")).name
            == infer.predict_nodule_prob(hu, box=named("lungs-of-a")).name
            != infer.predict_nodule_prob(hu, box=named("lungs-of-b")).name)


# ---------------------------------------------------------------------- through the pipeline

@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory):
    from lungzarr.algorithms.phantom import PhantomNodule, chest_phantom
    from lungzarr.io.dicom import write_series
    from lungzarr.pipeline import run

    work = tmp_path_factory.mktemp("lungbox")
    hu, origin = chest_phantom(shape=(16, 96, 96), spacing=(2.5, 2.0, 2.0), seed=1,
                               nodules=(PhantomNodule(-30.0, -5.0, -35.0, 12.0),))
    write_series(hu, work / "input" / "PH-1", spacing=(2.5, 2.0, 2.0), origin=origin, patient_id="PH-1")
    store = work / "s.zarr"
    with dask.config.set(scheduler="threads"):
        run(work / "input", store, stages=["ingest", "segment"])
    return store


def test_crop_lungs_through_the_pipeline(phantom_store):
    """``detect --crop lungs`` (CLI) against the fixed crop (library): attrs, record, zeros outside, nodules."""
    from typer.testing import CliRunner

    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.cli import app
    from lungzarr.io.store import CohortStore, read_nodules
    from lungzarr.pipeline import run

    runner = CliRunner()
    tables, probs = {}, {}
    with dask.config.set(scheduler="threads"):
        for crop in ("fixed", "lungs"):
            if crop == "fixed":
                summaries = run(None, phantom_store, stages=["detect"], engine="keras", crop="fixed",
                                overwrite=True)
                assert summaries[0].done == ["PH-1"]
            else:
                r = runner.invoke(app, ["detect", str(phantom_store), "--scheduler", "threads", "--engine", "keras",
                                        "--crop", "lungs", "--overwrite"])
                assert r.exit_code == 0, r.output
            # the nodules stage, unchanged, on either map
            assert run(None, phantom_store, stages=["nodules"])[0].done == ["PH-1"]
            store = CohortStore(phantom_store, mode="r")
            ds = store.open_patient("PH-1")
            record = store.stages("PH-1")["detect"]
            attrs = ds.nodule_prob.attrs
            assert attrs["crop"] == crop and record["crop"] == crop
            box = {"z": attrs["box_slices"], "y": attrs["box_rows"], "x": attrs["box_cols"]}
            if crop == "fixed":
                assert box == fixed_box(ds.nodule_prob.shape) and record["lung_box"] is None
            else:
                expected = lung_box(ds.lungs.values)
                assert record["lung_box"] == expected and box == {k: expected[k] for k in "zyx"}
                assert check_box(box, ds.nodule_prob.shape) == box != fixed_box(ds.nodule_prob.shape)
            probs[crop] = ds.nodule_prob.values
            inside = np.zeros(ds.nodule_prob.shape, bool)
            inside[slice(*box["z"]), slice(*box["y"]), slice(*box["x"])] = True
            assert probs[crop].shape == ds.hu_2mm.shape and not probs[crop][~inside].any()
            tables[crop] = select_nodules(read_nodules(phantom_store)).reset_index(drop=True)
        lungs, hu_2mm = ds.lungs.values, ds.hu_2mm.values
    assert (probs["fixed"][lungs] >= 0.5).sum() > 0, "the comparison must not be one of zeros"
    tolerance = map_tolerance(hu_2mm, list(probs.values()))
    assert_prob_maps_agree(probs["lungs"][lungs], probs["fixed"][lungs], tolerance)
    assert len(tables["fixed"]) > 0
    assert_nodule_tables_agree(tables["lungs"], tables["fixed"], list(probs.values()), tolerance)
    r = runner.invoke(app, ["detect", str(phantom_store), "--crop", "lung"])
    assert r.exit_code == 2 and "lung" in r.output
    assert "--crop" in runner.invoke(app, ["run", "--help"]).output


def test_unknown_crop_stops_the_run_before_any_patient(phantom_store):
    from lungzarr.errors import LungzarrError
    from lungzarr.pipeline import run

    with pytest.raises(LungzarrError, match=r"crop must be one of \['fixed', 'lungs'\], got 'lung'"):
        run(None, phantom_store, stages=["detect"], crop="lung")


# ---------------------------------------------------------------------- every real patient (slow)

def _report(name, fixed, lungs_map, lungs, table_fixed, table_lungs, box, hu):
    tolerance = map_tolerance(hu, [fixed, lungs_map])
    dp = np.abs(lungs_map.astype(np.float64) - fixed)
    changed = (fixed >= 0.5) != (lungs_map >= 0.5)
    print(f"\n{name}: box z {box['z']} rows {box['y']} cols {box['x']} (lung bbox {box['lung_bbox']}); "
          f"max |dp| in lungs {dp[lungs].max():.3g}, overall {dp.max():.3g}; p >= 0.5 voxels changed "
          f"{int(changed.sum())} of {int((fixed >= 0.5).sum())}; nodules at 0.5: {len(table_fixed)} fixed, "
          f"{len(table_lungs)} lungs, identical {table_lungs.equals(table_fixed)}")
    assert (fixed[lungs] >= 0.5).sum() > 0, "the comparison must not be one of zeros"
    assert_prob_maps_agree(lungs_map[lungs], fixed[lungs], tolerance)
    assert len(table_fixed) > 0
    assert_nodule_tables_agree(table_lungs, table_fixed, [fixed, lungs_map], tolerance)


# Two full UNet passes of a 160-slice patient: beyond the suite's 900 s on 2 busy shared cores.
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("fixture", ["lidc_dir", "ricord_dir"])
def test_real_dicom_patient_same_nodules_with_crop_lungs(fixture, request, tmp_path, capsys):
    """Through the pipeline: detect --crop fixed, nodules; detect --crop lungs, nodules; the same table."""
    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.io.store import CohortStore, read_nodules
    from lungzarr.pipeline import run

    src = request.getfixturevalue(fixture)
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / src.name).symlink_to(src)
    store = tmp_path / "s.zarr"
    maps, tables = {}, {}
    with dask.config.set(scheduler="threads"):
        run(tmp_path / "input", store, stages=["ingest", "segment"])
        for crop in ("fixed", "lungs"):
            summaries = run(None, store, stages=["detect", "nodules"], crop=crop, overwrite=True)
            assert [s.done for s in summaries] == [[src.name]] * 2
            maps[crop] = CohortStore(store, mode="r").open_patient(src.name).nodule_prob.values
            tables[crop] = select_nodules(read_nodules(store)).reset_index(drop=True)
    cohort = CohortStore(store, mode="r")
    patient = cohort.open_patient(src.name)
    lungs = patient.lungs.values
    box = cohort.stages(src.name)["detect"]["lung_box"]
    with capsys.disabled():
        _report(src.name, maps["fixed"], maps["lungs"], lungs, tables["fixed"], tables["lungs"], box,
                patient.hu_2mm.values)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_dsb2017_patient_same_nodules_with_crop_lungs(dsb_dir, capsys):
    """The DSB2017 patient's 2 mm segmented volume (the stand-in of the tests), mask = segmented != -2000."""
    from conftest import DSB_PATIENT

    from lungzarr.algorithms.nodules import find_nodules, select_nodules
    from lungzarr.model.engines import resolve_engine
    from lungzarr.volume import Grid

    seg = np.load(dsb_dir / "input" / "stage1_segmented_2x2x2" / f"{DSB_PATIENT}.npz")["arr_0"]
    lungs = seg != -2000
    grid = Grid(seg.shape, (0.0, 0.0, 0.0), (2.0, 2.0, 2.0))
    engine = resolve_engine("auto")
    box = lung_box(lungs)
    with dask.config.set(scheduler="threads"):
        fixed = infer.predict_nodule_prob(seg, engine=engine).compute()
        got = infer.predict_nodule_prob(seg, engine=engine, box=box).compute()

    def table(prob):
        return select_nodules(find_nodules(prob, seg, grid=grid, lungs=lungs)).reset_index(drop=True)

    with capsys.disabled():
        _report(f"DSB2017 {DSB_PATIENT[:6]}", fixed, got, lungs, table(fixed), table(got), box, seg)


def test_literal_upsampling_through_the_cli_is_recorded(phantom_store):
    """``detect --literal-upsampling`` runs the original's layers: recorded in attrs and stage record."""
    from typer.testing import CliRunner

    from lungzarr.cli import app
    from lungzarr.io.store import CohortStore
    from lungzarr.pipeline import run

    probs = {}
    with dask.config.set(scheduler="threads"):
        for fold in (False, True):
            if fold:
                assert run(None, phantom_store, stages=["detect"], engine="keras", overwrite=True)[0].done == ["PH-1"]
            else:
                r = CliRunner().invoke(app, ["detect", str(phantom_store), "--scheduler", "threads", "--engine",
                                             "keras", "--literal-upsampling", "--overwrite"])
                assert r.exit_code == 0, r.output
            store = CohortStore(phantom_store, mode="r")
            ds = store.open_patient("PH-1")
            assert ds.nodule_prob.attrs["fold_upsampling"] is fold
            assert store.stages("PH-1")["detect"]["fold_upsampling"] is fold
            probs[fold], hu_2mm = ds.nodule_prob.values, ds.hu_2mm.values
    assert (probs[True] >= 0.5).sum() > 0
    # The folded form sums the same products in another order (tests/float_tolerance.py).
    assert_prob_maps_agree(probs[True], probs[False], map_tolerance(hu_2mm, list(probs.values())))
