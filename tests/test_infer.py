"""The detect stage: d8 windows over a 2 mm volume with dask (docs/algorithms.md §5)."""
from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from lungzarr.errors import PatientError
from lungzarr.model import geometry, infer
from lungzarr.model.d8 import get_model
from lungzarr.volume import normalize_hu


def synthetic_hu(shape, *, seed=0):
    """Lung-like noise at -850 HU with three soft-tissue balls the d8 model fires on."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    hu = rng.normal(-850, 30, shape)
    nz, h, w = shape
    for cz, cy, cx, r in [(nz // 2, h // 3, w // 2, 3), (nz // 2 + 3, 2 * h // 3, 2 * w // 3, 2.5),
                          (nz // 3, h // 4, 3 * w // 4, 4)]:
        hu[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r] = 40
    return hu.astype(np.int16)


def straight_loop(hu):
    """The original's procedure, written out: crop, normalise, every window, threshold."""
    nz, h, w = hu.shape
    dy, dx = h % 4, w % 4
    images = normalize_hu(hu[:, dy:, dx:])
    model = get_model()
    expected = np.zeros(hu.shape, dtype=np.float32)
    for i in range(nz - 8):  # i = 0 ... Z-9: the last possible window is not used
        prob = model.predict(images[np.newaxis, i:i + 8, :, :, np.newaxis], verbose=0)[0, 0, :, :, 0]
        expected[i + 4, dy:, dx:] = np.where(prob < 0.5, 0, prob)
    return expected


@pytest.fixture(scope="module")
def volume():
    return synthetic_hu((17, 30, 35))  # 30 % 4 = 2 rows and 35 % 4 = 3 columns dropped


@pytest.fixture(scope="module")
def expected(volume):
    return straight_loop(volume)


def test_predicted_slices():
    assert geometry.predicted_slices(183) == slice(4, 179)
    assert geometry.predicted_slices(9) == slice(4, 5)
    assert len(range(200)[geometry.predicted_slices(8)]) == 0
    assert geometry.detection_crop((5, 30, 35)) == (2, 3)


def test_matches_straight_loop_of_model_predict(volume, expected):
    prob = infer.predict_nodule_prob(da.from_array(volume, chunks=(6, -1, -1)), batch_size=3)
    assert prob.shape == volume.shape and prob.dtype == np.float32
    got = prob.compute()
    assert got.dtype == np.float32
    # The synthetic balls are found, so the comparison is not one of zeros.
    assert (expected > 0.5).sum() > 50
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    # Below 0.5 is stored as 0; nothing outside the predicted slices or in the dropped rows/columns.
    assert not np.any((got > 0) & (got < 0.5))
    outside = np.ones(volume.shape[0], bool)
    outside[geometry.predicted_slices(volume.shape[0])] = False
    assert not got[outside].any()
    assert not got[:, :2].any() and not got[:, :, :3].any()


@pytest.mark.parametrize("z_chunks", [(17,), (4, 4, 4, 5), (2, 9, 6), (1, 1, 15), (16, 1)])
def test_chunking_does_not_change_the_result(volume, expected, z_chunks):
    got = infer.predict_nodule_prob(da.from_array(volume, chunks=(z_chunks, 7, -1))).compute()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_numpy_input_and_one_window():
    hu = synthetic_hu((9, 16, 16), seed=3)
    got = infer.predict_nodule_prob(hu).compute()
    expected = straight_loop(hu)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert not got[[0, 1, 2, 3, 5, 6, 7, 8]].any()


@pytest.mark.parametrize("nz", [8, 3])
def test_too_few_slices_is_a_patient_error(nz):
    with pytest.raises(PatientError, match=f"{nz} slices") as err:
        infer.predict_nodule_prob(np.zeros((nz, 16, 16), np.int16), patient="p1")
    assert err.value.patient == "p1" and err.value.stage == "detect"


def test_bad_arguments():
    hu = np.zeros((10, 16, 16), np.int16)
    with pytest.raises(ValueError, match="batch_size"):
        infer.predict_nodule_prob(hu, batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        infer.predict_nodule_prob(hu, precision="fp64")
    with pytest.raises(ValueError, match="3-D"):
        infer.predict_nodule_prob(hu[0])


def test_building_the_graph_computes_nothing(volume, monkeypatch):
    from lungzarr.model.engines import get_engine

    calls = []
    monkeypatch.setattr(infer, "get_engine", lambda *a, **k: calls.append(a) or get_engine(*a, **k))
    source = da.from_array(volume, chunks=(5, -1, -1))
    loads = []
    source = source.map_blocks(lambda b: loads.append(1) or b, dtype=source.dtype,
                               meta=np.empty((0, 0, 0), source.dtype))
    prob = infer.predict_nodule_prob(source)
    assert calls == [] and loads == []
    prob.compute(scheduler="sync")
    assert len(calls) == len(prob.chunks[0]) and len(loads) > 0


def test_annotate_gpu_keeps_predictions_on_gpu_workers(volume, expected, cpu_gpu_cluster):
    import distributed

    client, names = cpu_gpu_cluster
    with infer.annotate_gpu():
        prob = infer.predict_nodule_prob(da.from_array(volume, chunks=(4, -1, -1)))
    with distributed.get_task_stream(client) as stream:
        got = client.compute(prob, optimize_graph=False).result()
    predicted_on = {names[task["worker"]] for task in stream.data
                    if str(task["key"]).find("predict-nodule-prob") >= 0}
    assert predicted_on == {"gpu"}
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_annotate_gpu_marks_the_prediction_layer():
    with infer.annotate_gpu():
        prob = infer.predict_nodule_prob(np.zeros((12, 8, 8), np.int16))
    layers = prob.__dask_graph__().layers
    annotated = [name for name, layer in layers.items()
                 if name.startswith("predict-nodule-prob")
                 and (layer.annotations or {}).get("resources") == {"GPU": 1}]
    assert annotated
    with pytest.raises(ValueError, match="gpus"):
        with infer.annotate_gpu(0):
            pass
    assert dask.get_annotations() == {}


def test_predict_stats_count_the_windows_of_a_computation():
    """The profiling counters add up the windows every predict call saw."""
    from lungzarr.model.infer import predict_nodule_prob, predict_stats

    hu = np.full((20, 16, 16), -700, dtype=np.int16)
    predict_stats(reset=True)
    predict_nodule_prob(da.from_array(hu, chunks=(10, 16, 16)), batch_size=4).compute(scheduler="sync")
    stats = predict_stats()
    assert stats["windows"] == 20 - 8 and stats["calls"] == 2 and stats["seconds"] > 0
