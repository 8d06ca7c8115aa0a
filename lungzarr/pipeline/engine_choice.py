"""``--engine auto``: the fastest exact engine on this machine, calibrated once per machine and version set.

:func:`choose_engine` is what a run calls before any patient: an explicit
engine stays as it is; ``auto`` on CPU workers with fp32 is Keras or
OpenVINO by the calibration of :mod:`lungzarr.model.calibration`, read from
the cache beside the exported graphs, or run now (a few seconds: each engine
predicts :data:`CALIBRATION_WINDOWS` windows twice) when this machine, its
instruction-set settings or a version changed. ``auto`` is Keras on GPU
workers, and OpenVINO (when installed) for 16-bit precisions, as before.

The windows are realistic in size and content: 8-slice windows of the
shipped chest phantom at 2 mm, 176 x 176 (the detection crop of a 512²
0.7 mm CT is about 180²), around a 14 mm nodule, so the decisions compared
include voxels at p >= 0.5.
"""
from __future__ import annotations

import numpy as np

__all__ = ["CALIBRATION_WINDOWS", "CALIBRATION_SIZE", "calibration_windows", "choose_engine", "engine_report"]

#: Windows each engine predicts (twice) in the calibration, and their rows and columns at 2 mm.
CALIBRATION_WINDOWS, CALIBRATION_SIZE = 2, 176
#: The shape (windows, slices, rows, columns) of :func:`calibration_windows`' default windows.
_DEFAULT_SHAPE = (CALIBRATION_WINDOWS, 8, CALIBRATION_SIZE, CALIBRATION_SIZE)


def calibration_windows(n: int = CALIBRATION_WINDOWS, size: int = CALIBRATION_SIZE) -> np.ndarray:
    """``n`` normalised 8-slice windows ``(n, 8, size, size, 1)`` of the chest phantom around a nodule."""
    from lungzarr.algorithms.phantom import DEMO_PATIENTS, chest_phantom
    from lungzarr.volume import normalize_hu

    _, nodules, seed = DEMO_PATIENTS[0]
    # The slab's middle slice at the first nodule's centre; the demo's y/x positions, at 2 mm.
    slices = n + 7
    z0 = nodules[0].z_mm - 2.0 * (slices // 2)
    half = (size - 1) * 2.0 / 2.0
    hu, _ = chest_phantom(shape=(slices, size, size), spacing=(2.0, 2.0, 2.0), origin=(z0, -half, -half),
                          nodules=nodules, seed=seed)
    slab = normalize_hu(hu).astype(np.float32)
    return np.stack([slab[i:i + 8] for i in range(n)])[..., np.newaxis]


def _calibrated_here(precision: str, gpu: bool) -> bool:
    from lungzarr.model.engines import engine_available

    return not gpu and precision == "fp32" and engine_available("openvino") and engine_available("keras")


def _key(weights, fold_upsampling, windows_shape):
    from lungzarr.model.calibration import calibration_key
    from lungzarr.model.d8 import verify_weights
    from lungzarr.model.engines import _sha256

    return calibration_key(weights_sha256=_sha256(verify_weights(weights)), fold_upsampling=fold_upsampling,
                           windows_shape=windows_shape)


def choose_engine(engine: str = "auto", *, weights=None, precision: str = "fp32", gpu: bool = False,
                  fold_upsampling: bool = True, windows: np.ndarray | None = None) -> tuple[str, dict | None]:
    """The concrete engine a run uses for ``engine``, and the calibration that chose it (None: no choice made).

    Parameters
    ----------
    engine : {"auto", "keras", "openvino", "onnxruntime"}
        Anything but ``auto`` is returned as it is (``--engine`` overrides).
    weights, precision, gpu, fold_upsampling
        As the run's (:func:`lungzarr.pipeline.run`).
    windows : ndarray, optional
        Calibration windows; default :func:`calibration_windows`.

    Returns
    -------
    (str, dict or None)
        The engine, and the calibration's result (:func:`lungzarr.model.calibration.calibrate`,
        with ``cached``: whether it was read from the cache).
    """
    from lungzarr.model.calibration import cached_calibration
    from lungzarr.model.engines import resolve_engine

    if engine != "auto" or not _calibrated_here(precision, gpu):
        return resolve_engine(engine, gpu=gpu), None
    # The key needs only the windows' shape: the phantom is drawn only when a calibration is due.
    shape = _DEFAULT_SHAPE if windows is None else windows.shape[:4]
    cached = cached_calibration(_key(weights, fold_upsampling, shape))
    if cached is not None:
        return cached["choice"], {**cached, "cached": True}
    windows = calibration_windows() if windows is None else windows
    result = _calibrate_apart(windows, weights=weights, fold_upsampling=fold_upsampling)
    return result["choice"], {**result, "cached": False}


def _calibrate_apart(windows: np.ndarray, **options) -> dict:
    """:func:`~lungzarr.model.calibration.calibrate` in a process of its own, which ends with it.

    The run's client never imports TensorFlow or OpenVINO (they would stay in
    its memory for the whole run: about 1 GB), and the CPU time measured is
    the engines' alone.
    """
    import concurrent.futures
    import multiprocessing

    from lungzarr.model.calibration import calibrate

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as apart:
        return apart.submit(calibrate, windows, **options).result()


def engine_report(*, weights=None, fold_upsampling: bool = True) -> dict:
    """What ``auto`` runs on this machine, without calibrating: for ``lungzarr status`` and ``--version -v``.

    Returns
    -------
    dict
        ``engine`` (the choice, or the rule's when nothing is calibrated),
        ``calibration`` (the cached result or None), ``reason`` (one line),
        ``versions`` of the engines' packages and ``cpu``.
    """
    from lungzarr.model.calibration import cached_calibration, cpu_description
    from lungzarr.model.engines import _version, resolve_engine

    versions = {p: _version(p) for p in ("tensorflow", "keras", "openvino", "onnxruntime")}
    out = {"versions": versions, "cpu": cpu_description(), "calibration": None}
    if not _calibrated_here("fp32", False):
        out.update(engine=resolve_engine("auto"), reason="OpenVINO is not installed: auto runs Keras")
        return out
    calibration = cached_calibration(_key(weights, fold_upsampling, _DEFAULT_SHAPE))
    if calibration is None:
        out.update(engine=None, reason="not calibrated on this machine and version set yet; the next run that "
                                       "detects calibrates it (a few seconds)")
        return out
    k, o = calibration["engines"]["keras"], calibration["engines"]["openvino"]
    why = "faster and exact" if calibration["choice"] == "openvino" else (
        "faster" if calibration["exact"] else f"OpenVINO not exact (max |dp| {calibration['max_dp']:.1e}, "
                                              f"{calibration['decisions_differ']} decisions differ)")
    out.update(engine=calibration["choice"], calibration=calibration,
               reason=f"{why}; CPU-s per window: keras {k['cpu_seconds_per_window']:.3g}, openvino "
                      f"{o['cpu_seconds_per_window']:.3g} (wall {k['seconds_per_window']:.3g} and "
                      f"{o['seconds_per_window']:.3g} s); max |dp| {calibration['max_dp']:.1e}; calibrated "
                      f"{calibration['calibrated']}")
    return out
