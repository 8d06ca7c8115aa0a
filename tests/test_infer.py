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

from float_tolerance import assert_prob_maps_agree, volume_tolerance


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
    # Batches of 3 against batches of 1: the engine may sum in another order (tests/float_tolerance.py).
    assert_prob_maps_agree(got, expected, volume_tolerance(volume))
    # Below 0.5 is stored as 0; nothing outside the predicted slices or in the dropped rows/columns.
    assert not np.any((got > 0) & (got < 0.5))
    outside = np.ones(volume.shape[0], bool)
    outside[geometry.predicted_slices(volume.shape[0])] = False
    assert not got[outside].any()
    assert not got[:, :2].any() and not got[:, :, :3].any()


@pytest.mark.parametrize("z_chunks", [(17,), (4, 4, 4, 5), (2, 9, 6), (1, 1, 15), (16, 1)])
def test_chunking_does_not_change_the_result(volume, expected, z_chunks):
    # One window per engine call, as in the straight loop: every window is computed by the same kernels on
    # the same input, so any chunking must give the original's map bit for bit (batch composition, which
    # may change the rounding, is test_matches_straight_loop_of_model_predict's).
    got = infer.predict_nodule_prob(da.from_array(volume, chunks=(z_chunks, 7, -1)), batch_size=1).compute()
    np.testing.assert_array_equal(got, expected)


def test_numpy_input_and_one_window():
    hu = synthetic_hu((9, 16, 16), seed=3)
    got = infer.predict_nodule_prob(hu).compute()
    expected = straight_loop(hu)
    # One window: a batch of one either way, the same kernels on the same input.
    np.testing.assert_array_equal(got, expected)
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


def _kind(key) -> str:
    name = key[0] if isinstance(key, tuple) else str(key)
    return "predict" if name.startswith("predict-nodule-prob-") else "other"


def test_annotate_gpu_puts_only_the_network_on_gpu_workers(volume, expected, cpu_gpu_cluster):
    """The predict tasks run on the GPU worker; reading, cutting, placing on the CPU-only worker."""
    import distributed

    from lungzarr.pipeline.placement import cpu_only_workers

    client, names = cpu_gpu_cluster
    with infer.annotate_gpu(cpu_workers=cpu_only_workers(client)):
        prob = infer.predict_nodule_prob(da.from_array(volume, chunks=(4, -1, -1)))
    with distributed.get_task_stream(client) as stream:
        got = client.compute(prob, optimize_graph=False).result()
    on = {}
    for task in stream.data:
        on.setdefault(_kind(task["key"]), []).append(names[task["worker"]])
    # One predict task per z-chunk (4-slice chunks are merged to hold the halo), each on the GPU worker.
    assert on["predict"] == ["gpu"] * len(prob.chunks[0]), on
    assert set(on["other"]) == {"cpu"} and len(on["other"]) >= 3 * len(prob.chunks[0]), on
    assert_prob_maps_agree(got, expected, volume_tolerance(volume))


def test_annotate_gpu_annotates_task_by_task():
    """Per-key annotations: a GPU for the network's tasks, the CPU-only workers for every other task."""
    with infer.annotate_gpu(cpu_workers=["tcp://10.0.0.1:1234"]):
        prob = infer.predict_nodule_prob(da.from_array(np.zeros((12, 8, 8), np.int16), chunks=(6, -1, -1)))
    layers = prob.__dask_graph__().layers
    seen = {"predict": 0, "other": 0}
    for layer in layers.values():
        annotations = layer.annotations or {}
        for key in layer:
            values = {name: value(key) if callable(value) else value for name, value in annotations.items()}
            kind = _kind(key)
            seen[kind] += 1
            if kind == "predict":
                assert values["resources"] == {"GPU": 1} and values.get("workers") is None, (key, values)
            elif annotations:  # numpy input: its from_array layer is made before the block's dask code runs
                assert values["resources"] is None and values["workers"] == ["tcp://10.0.0.1:1234"], (key, values)
    assert seen["predict"] == 2 and seen["other"] > 6
    with pytest.raises(ValueError, match="gpus"):
        with infer.annotate_gpu(0):
            pass
    with pytest.raises(ValueError, match="cpu_workers"):
        with infer.annotate_gpu(cpu_workers="tcp://10.0.0.1:1234"):
            pass
    assert dask.get_annotations() == {}


def test_window_batch_is_the_windows_and_travels_as_its_slab():
    """The batch a predict task gets: the (n, 8, H, W, 1) windows, pickled as the slab (8 times smaller)."""
    import pickle

    from dask.sizeof import sizeof

    slab = np.random.default_rng(0).normal(size=(71, 20, 24)).astype(np.float32)
    batch = infer.WindowBatch(slab)
    windows = batch.windows
    assert len(batch) == 64 and windows.shape == (64, 8, 20, 24, 1) and windows.dtype == np.float32
    np.testing.assert_array_equal(windows, np.stack([slab[i:i + 8] for i in range(64)])[..., np.newaxis])
    assert not windows.flags.writeable
    wire = pickle.dumps(batch, protocol=5)
    assert slab.nbytes <= len(wire) < slab.nbytes + 1000 < windows.nbytes / 7
    np.testing.assert_array_equal(pickle.loads(wire).windows, windows)
    assert sizeof(batch) == slab.nbytes
    assert len(infer.WindowBatch(np.zeros((0, 4, 4), np.float32))) == 0
    with pytest.raises(ValueError, match="float32"):
        infer.WindowBatch(slab.astype(np.float64))


def test_the_graph_is_cut_predict_place_per_z_chunk_with_names_from_the_inputs(volume):
    """Three tasks per z-chunk; the names follow the volume and the box, so two patients never share one."""
    def names(hu, box=None):
        prob = infer.predict_nodule_prob(da.from_array(hu, chunks=(6, -1, -1)), box=box)
        return {str(k) for k in prob.__dask_graph__() if str(k).startswith(("cut-", "predict-", "place-"))}

    a = names(volume)
    assert len(a) == 3 * 3  # 17 slices in z-chunks of 6, 6, 5
    assert a == names(volume.copy())  # the same data: the same tasks
    assert not a & names(volume + 1)
    box = geometry.fixed_box(volume.shape)
    shrunk = dict(box, y=(box["y"][0] + 4, box["y"][1]))
    assert not a & names(volume, box=shrunk)


def test_predict_stats_count_the_windows_of_a_computation():
    """The profiling counters add up the windows every predict call saw."""
    from lungzarr.model.infer import predict_nodule_prob, predict_stats

    hu = np.full((20, 16, 16), -700, dtype=np.int16)
    predict_stats(reset=True)
    predict_nodule_prob(da.from_array(hu, chunks=(10, 16, 16)), batch_size=4).compute(scheduler="sync")
    stats = predict_stats()
    assert stats["windows"] == 20 - 8 and stats["calls"] == 2 and stats["seconds"] > 0
