"""The d8 UNet on other inference engines: the same decisions as Keras-TF, cached exports, clear errors.

OpenVINO and ONNX Runtime run graphs Keras exports from the one d8 model
(lungzarr/model/engines.py). On the real windows of the DSB2017 patient and
of the LIDC-IDRI-0001 slab every engine must mark the same p >= 0.5 voxels
as Keras on TensorFlow, with probabilities within a few 1e-5.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from typer.testing import CliRunner

from lungzarr.errors import LungzarrError
from lungzarr.model import engines, infer
from lungzarr.model.d8 import WEIGHTS_SHA256
from lungzarr.volume import normalize_hu

from conftest import DSB_PATIENT, DSB_WINDOWS
from float_tolerance import assert_prob_maps_agree, map_tolerance, prob_tolerance

OTHER_ENGINES = ("openvino", "onnxruntime")
REPO = Path(__file__).resolve().parents[1]


def needs(engine):
    if not engines.engine_available(engine):
        pytest.skip(f"engine {engine!r} is not installed here ({engines._INSTALL[engine]})")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh graph cache for this module: the exports are made (and timed) here."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("lungzarr-cache")
    mp.setenv(engines.CACHE_ENV, str(folder))
    engines._ENGINES.clear()
    yield folder
    engines._ENGINES.clear()
    mp.undo()


@pytest.fixture(scope="module")
def keras_engine():
    return engines.get_engine("keras")


def _dsb_windows(dsb_dir):
    hu = np.load(dsb_dir / "input" / "stage1_segmented_2x2x2" / f"{DSB_PATIENT}.npz")["arr_0"]
    _, h, w = hu.shape
    images = normalize_hu(hu[:, h % 4:, w % 4:])
    return np.stack([images[i:i + 8] for i in DSB_WINDOWS])[..., np.newaxis]


def _lidc_2mm(lidc_dir):
    from lungzarr.algorithms.resample import resample_to_2mm_numpy
    from lungzarr.io.dicom import load_hu

    hu, grid = load_hu(lidc_dir)
    return resample_to_2mm_numpy(hu, grid)[0]


def _agreement(prob, reference, tolerance) -> dict:
    """How two evaluations compare; ``changed``: decisions that differ where ``reference`` is farther than
    ``tolerance`` (tests/float_tolerance.py) from the 0.5 threshold, i.e. where rounding cannot explain it."""
    ours, ref = prob >= 0.5, reference >= 0.5
    firm = np.abs(reference - 0.5) > tolerance
    return {"max_dp": float(np.abs(prob - reference).max()), "tolerance": float(tolerance),
            "changed": int((ours != ref)[firm].sum()), "keras_p_ge_0.5": int(ref.sum())}


# slow (1-2.5 min each on 2 AVX2 cores, most of it OpenVINO's export): the default run keeps the same property on
# real windows in tests/test_float_tolerance.py (every engine within its allowance of the float64 network on the
# LIDC-IDRI-0001 slab's windows, so within the sum of two allowances of each other) and on DSB2017 windows in
# tests/test_model.py (folded against literal d8).
@pytest.mark.slow
@pytest.mark.requires_shared
@pytest.mark.parametrize("engine", OTHER_ENGINES)
def test_same_decisions_as_keras_on_dsb2017_windows(engine, cache, keras_engine, dsb_dir, capsys):
    needs(engine)
    windows = _dsb_windows(dsb_dir)
    reference = keras_engine.predict(windows, batch_size=4)
    got = engines.get_engine(engine).predict(windows, batch_size=4)
    assert got.shape == reference.shape == (len(DSB_WINDOWS), 1) + windows.shape[2:4] + (1,)
    assert got.dtype == np.float32
    stats = _agreement(got, reference, prob_tolerance(windows, ("keras", engine)))
    with capsys.disabled():
        print(f"\n{engine} vs keras, DSB2017 windows {DSB_WINDOWS}: {stats}")
    assert stats["keras_p_ge_0.5"] > 50  # the windows hold candidates: not a comparison of zeros
    assert stats["changed"] == 0
    assert stats["max_dp"] <= stats["tolerance"]


@pytest.fixture(scope="module")
def lidc_slab():
    """The LIDC-IDRI-0001 slab on the 2 mm grid and its Keras-TF nodule_prob (computed once)."""
    from conftest import LIDC_DIR, shared_path

    hu = da.from_array(_lidc_2mm(shared_path(LIDC_DIR)), chunks=(10, -1, -1))
    return hu, infer.predict_nodule_prob(hu, engine="keras").compute()


# slow: the default run keeps the engines' agreement on this slab's windows (tests/test_float_tolerance.py) and the
# whole detect computation on it with the engine `auto` picks on the machine (tests/test_end_to_end.py: the
# annotated nodule found; the calibration behind `auto` compares Keras and OpenVINO decisions on each machine).
@pytest.mark.slow
@pytest.mark.requires_shared
@pytest.mark.parametrize("engine", OTHER_ENGINES)
def test_same_nodule_prob_as_keras_on_the_lidc_slab(engine, cache, lidc_slab, capsys):
    """The whole detect computation (dask, z-chunks, crop, threshold) with each engine."""
    needs(engine)
    hu, reference = lidc_slab
    got = infer.predict_nodule_prob(hu, engine=engine).compute()
    tolerance = map_tolerance(np.asarray(hu), [got, reference], ("keras", engine))
    stats = _agreement(got, reference, tolerance)
    with capsys.disabled():
        print(f"\n{engine} vs keras, LIDC-IDRI-0001 slab {hu.shape}: {stats}")
    assert stats["keras_p_ge_0.5"] > 500
    assert_prob_maps_agree(got, reference, tolerance)
    assert not np.any((got > 0) & (got < 0.5))


def test_cache_key_has_every_part():
    key = engines.export_key("openvino", weights_sha256=WEIGHTS_SHA256)
    assert key["weights_sha256"] == WEIGHTS_SHA256
    assert set(key["versions"]) == {"keras", "openvino"}
    assert len(key["definition_sha256"]) == 64
    assert key["fold_upsampling"] is True
    literal = engines.export_key("openvino", weights_sha256=WEIGHTS_SHA256, fold_upsampling=False)
    assert engines._key_folder(literal) != engines._key_folder(key)
    other_weights = engines.export_key("openvino", weights_sha256="0" * 64)
    assert engines._key_folder(other_weights) != engines._key_folder(key)
    onnx = engines.export_key("onnxruntime", weights_sha256=WEIGHTS_SHA256)
    assert set(onnx["versions"]) == {"keras", "onnxruntime", "onnx", "tf2onnx"}
    assert engines._key_folder(onnx) != engines._key_folder(key)
    with pytest.raises(ValueError, match="'keras' has no exported graph"):
        engines.export_key("keras", weights_sha256=WEIGHTS_SHA256)


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(engines.CACHE_ENV, str(tmp_path / "c"))
    assert engines.cache_dir() == (tmp_path / "c").resolve()
    monkeypatch.delenv(engines.CACHE_ENV)
    assert engines.cache_dir().name == "lungzarr"


# Two exports each; OpenVINO's (~10 s each here) only in the slow run: the cache logic is the engines' one.
@pytest.mark.parametrize("engine", [pytest.param("openvino", marks=pytest.mark.slow), "onnxruntime"])
def test_export_is_cached_and_rebuilt_when_the_key_changes(engine, tmp_path, monkeypatch):
    needs(engine)
    monkeypatch.setenv(engines.CACHE_ENV, str(tmp_path))
    exports = []
    real_export = engines._export
    monkeypatch.setattr(engines, "_export", lambda *a: exports.append(a[0]) or real_export(*a))
    graph = engines.exported_graph(engine)
    key = json.loads((graph.parent / "key.json").read_text())
    assert key["weights_sha256"] == WEIGHTS_SHA256 and key["export_seconds"] > 0
    assert engines.exported_graph(engine) == graph and exports == [engine]  # the second call reads the cache
    # A new version of a package the graph depends on: a new folder, exported again.
    real_version = engines._version
    monkeypatch.setattr(engines, "_version", lambda p: "99.0" if p == "keras" else real_version(p))
    again = engines.exported_graph(engine)
    assert again != graph and again.is_file() and exports == [engine, engine]
    # Written under a temporary name and renamed: nothing half-written is left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([graph.parent.name, again.parent.name])


def test_auto_is_openvino_on_cpu_and_keras_on_gpu(monkeypatch):
    assert engines.resolve_engine("auto", gpu=True) == "keras"
    assert engines.resolve_engine("onnxruntime", gpu=True) == "onnxruntime"
    if engines.engine_available("openvino"):
        assert engines.resolve_engine("auto") == "openvino"
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    assert engines.resolve_engine("auto") == "keras"
    with pytest.raises(LungzarrError, match="engine must be one of"):
        engines.resolve_engine("tensorrt")


@pytest.mark.parametrize("engine, package", [("openvino", "openvino"), ("onnxruntime", "onnxruntime"),
                                             ("onnxruntime", "tf2onnx")])
def test_missing_engine_is_a_clear_error(engine, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)
    engines._ENGINES.clear()
    with pytest.raises(LungzarrError, match=rf"engine '{engine}' is not installed \('{package}' is not "
                                            rf"installed\): pip install"):
        engines.prepare_engine(engine)
    with pytest.raises(LungzarrError, match=f"engine '{engine}' is not installed"):
        engines.get_engine(engine)


def test_onnxruntime_is_fp32_only():
    needs("onnxruntime")
    with pytest.raises(LungzarrError, match="fp32 only"):
        engines.prepare_engine("onnxruntime", precision="bf16")


def test_missing_engine_stops_the_cli_before_any_patient(tmp_path, monkeypatch):
    from lungzarr.cli import app

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    store = tmp_path / "none.zarr"
    result = CliRunner().invoke(app, ["detect", str(store), "--engine", "onnxruntime", "--scheduler", "threads"])
    assert result.exit_code == 2, result.output
    assert "engine 'onnxruntime' is not installed" in result.output
    assert "pip install 'lungzarr[onnx]'" in result.output
    assert not store.exists()
    result = CliRunner().invoke(app, ["run", str(tmp_path), str(store), "--engine", "tensorrt"])
    assert result.exit_code == 2 and "tensorrt" in result.output


def test_predict_nodule_prob_checks_the_engine_name():
    with pytest.raises(ValueError, match="engine must be one of"):
        infer.predict_nodule_prob(np.zeros((10, 16, 16), np.int16), engine="tflite")


# slow (2 min on 2 AVX2 cores): the default run keeps folded against literal d8 on DSB2017 windows
# (tests/test_model.py) and the literal network reaching the workers through the CLI (tests/test_lung_box.py).
@pytest.mark.slow
@pytest.mark.requires_shared
def test_the_literal_network_through_detect_makes_the_same_decisions(lidc_slab, capsys):
    """``fold_upsampling=False`` reaches the workers' engine: its own task keys, the same p >= 0.5 voxels."""
    hu, folded = lidc_slab
    lazy = infer.predict_nodule_prob(hu, engine="keras", fold_upsampling=False)
    assert lazy.name != infer.predict_nodule_prob(hu, engine="keras").name
    literal = lazy.compute()
    tolerance = map_tolerance(np.asarray(hu), [literal, folded])
    stats = _agreement(literal, folded, tolerance)
    with capsys.disabled():
        print(f"\nliteral vs folded d8 (keras), LIDC-IDRI-0001 slab {hu.shape}: {stats}")
    assert stats["keras_p_ge_0.5"] > 500
    assert_prob_maps_agree(literal, folded, tolerance)
    assert stats["max_dp"] > 0  # another summation order, not the same graph
    assert engines.get_engine("keras", fold_upsampling=False).model is not engines.get_engine("keras").model


# ---------------------------------------------------------------------- auto: the fastest exact engine here

def test_calibration_key_follows_the_instruction_set_and_the_versions(monkeypatch):
    from lungzarr.model.calibration import ISA_ENV, calibration_key, calibration_path

    for name in ISA_ENV:
        monkeypatch.delenv(name, raising=False)
    key = calibration_key(weights_sha256=WEIGHTS_SHA256, windows_shape=(2, 8, 176, 176))
    assert set(key["versions"]) == {"tensorflow", "keras", "openvino"} and key["weights_sha256"] == WEIGHTS_SHA256
    assert key["cpu"]["model"] and key["cpu"]["logical_cpus"] >= 1
    assert ("avx2" in key["cpu"]["isa_flags"]) == ("avx2" in open("/proc/cpuinfo").read())
    paths = {calibration_path(key)}
    for name, value in (("ONEDNN_MAX_CPU_ISA", "AVX2"), ("OV_CPU_MAX_ISA", "AVX2")):
        monkeypatch.setenv(name, value)
        paths.add(calibration_path(calibration_key(weights_sha256=WEIGHTS_SHA256, windows_shape=(2, 8, 176, 176))))
    paths.add(calibration_path(calibration_key(weights_sha256="0" * 64, windows_shape=(2, 8, 176, 176))))
    assert len(paths) == 4 and all(p.parent == engines.cache_dir() for p in paths)


_CHOOSE = """
import json, sys
from lungzarr.model.calibration import calibration_path
from lungzarr.pipeline.engine_choice import calibration_windows, choose_engine
name, result = choose_engine("auto", windows=calibration_windows(n=1, size=64))
print(json.dumps({"engine": name, "cached": result["cached"], "path": str(calibration_path(result["key"])),
                  "result": {k: v for k, v in result.items() if k != "key"}}))
"""


# Three processes, two of them calibrating (TensorFlow, Keras and OpenVINO started in each): 118 s on the
# loaded 2-core AVX2 machine of issue 26, so in the slow run.
@pytest.mark.slow
def test_auto_calibrates_once_per_machine_and_again_under_another_instruction_set(tmp_path):
    """Forcing the ISA (oneDNN's and OpenVINO's caps) is another machine to the cache: calibrated again."""
    import os
    import shutil
    import subprocess

    needs("openvino")
    cache = tmp_path / "cache"
    cache.mkdir()
    for graph in engines.cache_dir().glob("d8-openvino-*"):  # this session's export, not made again
        shutil.copytree(graph, cache / graph.name)
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "OV_CPU_MAX_ISA")}
    env.update({engines.CACHE_ENV: str(cache), "PYTHONPATH": str(REPO)})

    def choose(**isa):
        proc = subprocess.run([sys.executable, "-c", _CHOOSE], env={**env, **isa}, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = choose()
    assert not first["cached"] and first["engine"] in ("keras", "openvino")
    figures = first["result"]
    assert figures["exact"] == (figures["decisions_differ"] == 0 and figures["max_dp"] <= 1e-3)
    assert figures["choice"] == first["engine"] and all(
        figures["engines"][e]["cpu_seconds_per_window"] > 0 for e in ("keras", "openvino"))
    again = choose()
    assert again["cached"] and again["path"] == first["path"] and again["engine"] == first["engine"]
    capped = choose(ONEDNN_MAX_CPU_ISA="AVX2", OV_CPU_MAX_ISA="AVX2")
    assert not capped["cached"] and capped["path"] != first["path"]
    assert sorted(p.name for p in cache.glob("calibration-*.json")) == sorted(
        {os.path.basename(first["path"]), os.path.basename(capped["path"])})


def test_an_explicit_engine_is_never_calibrated(monkeypatch):
    from lungzarr.pipeline import engine_choice

    monkeypatch.setattr("lungzarr.model.calibration.calibrate", lambda *a, **k: pytest.fail("calibrated"))
    assert engine_choice.choose_engine("keras") == ("keras", None)
    assert engine_choice.choose_engine("auto", gpu=True) == ("keras", None)
