"""Which exact engine is fastest on this machine: a short calibration, cached per machine and version set.

Which engine runs d8 fastest depends on the CPU: on AVX-512 Keras on
TensorFlow was 1.13x faster than OpenVINO f32, on AVX2 OpenVINO was ~3.4x
faster (benchmarks/README.md). ``--engine auto`` therefore measures both on a
handful of windows (:func:`calibrate`) and keeps the faster one of those that
are *exact*: the same decisions as Keras (every voxel on the same side of
p = 0.5) and no probability more than :data:`MAX_DP` from Keras'.

:data:`MAX_DP` is 1e-3: ten times the largest difference two float32
evaluations of d8 may show from rounding alone (1e-5 to 1e-4 by
tests/float_tolerance.py's model of the network's arithmetic), and ten times
below what a wrong window, row or slice does (1e-2 or more). "Fastest" is
the process CPU time per window (every thread of the engine): what a
cluster's workers, sharing the cores, pay per window; wall seconds per
window are recorded beside it.

The result is cached beside the exported graphs
(:func:`lungzarr.model.engines.cache_dir`), one file per
:func:`calibration_key`: the CPU (model, the instruction-set flags that
change the kernels, logical CPUs), the environment variables that cap the
instruction set (``ONEDNN_MAX_CPU_ISA`` for oneDNN in TensorFlow and
OpenVINO, ``OV_CPU_MAX_ISA`` for OpenVINO's own kernels), the versions of
TensorFlow, Keras and OpenVINO, the weights, the network's definition and
form, and the calibration windows' shape. Any change calibrates again.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = ["MAX_DP", "ISA_ENV", "CALIBRATED_ENGINES", "cpu_description", "calibration_key", "calibration_path",
           "cached_calibration", "calibrate"]

#: Largest |p - p_keras| of an exact engine (module docstring).
MAX_DP = 1e-3
#: Environment variables that change the kernels the engines run (they are part of the key).
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OV_CPU_MAX_ISA", "TF_ENABLE_ONEDNN_OPTS")
#: The engines compared, the reference first.
CALIBRATED_ENGINES = ("keras", "openvino")
#: CPU flags that select other kernels in oneDNN and OpenVINO.
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
#: Bumped when the calibration's method changes (the old results are then not used).
_METHOD = 1


def cpu_description() -> dict:
    """The CPU as the engines see it: its model name, its instruction-set flags, logical CPUs."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name" and value.strip():
            model = value.strip()
        elif name.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"model": model, "isa_flags": [f for f in _ISA_FLAGS if f in flags], "logical_cpus": os.cpu_count()}


def calibration_key(*, weights_sha256: str, fold_upsampling: bool = True, windows_shape=()) -> dict:
    """Everything the calibration's result depends on (one cached result per distinct key)."""
    from lungzarr.model.engines import _DEFINITION, _sha256, _version

    return {"method": _METHOD, "cpu": cpu_description(),
            "isa_env": {name: os.environ.get(name) for name in ISA_ENV},
            "versions": {p: _version(p) for p in ("tensorflow", "keras", "openvino")},
            "weights_sha256": str(weights_sha256), "definition_sha256": _sha256(_DEFINITION),
            "fold_upsampling": bool(fold_upsampling), "windows": [int(n) for n in windows_shape]}


def calibration_path(key: dict) -> Path:
    """``<cache>/calibration-<key hash>.json``, beside the exported graphs."""
    from lungzarr.model.engines import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"calibration-{digest}.json"


def cached_calibration(key: dict) -> dict | None:
    """The calibration stored for ``key``, or None (never calibrated so, or unreadable)."""
    try:
        result = json.loads(calibration_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("key") == key else None


def _timed_predict(engine, windows) -> tuple[np.ndarray, float, float]:
    """Probabilities of a first call (it also specialises the graph to the shape), then one timed call's
    wall and process CPU seconds."""
    prob = engine.predict(windows, batch_size=len(windows))
    wall, cpu = time.perf_counter(), time.process_time()
    engine.predict(windows, batch_size=len(windows))
    return prob, time.perf_counter() - wall, time.process_time() - cpu


def calibrate(windows, *, weights=None, fold_upsampling: bool = True) -> dict:
    """Time Keras and OpenVINO (f32) on ``windows``, compare them, keep the result beside the graphs.

    Parameters
    ----------
    windows : ndarray, (n, 8, h, w, 1) float32
        Normalised 8-slice windows (a handful: each engine predicts them twice).
    weights, fold_upsampling
        See :func:`lungzarr.model.d8.build_d8`.

    Returns
    -------
    dict
        ``choice`` (the engine ``auto`` runs), per engine ``seconds_per_window``
        and ``cpu_seconds_per_window``, OpenVINO's ``max_dp`` and
        ``decisions_differ`` against Keras, ``exact``, ``calibrated`` (UTC),
        ``seconds`` (the calibration's own) and the ``key``.
    """
    from lungzarr.model.d8 import verify_weights
    from lungzarr.model.engines import _sha256, cache_dir, get_engine

    windows = np.ascontiguousarray(windows, dtype=np.float32)
    path = verify_weights(weights)
    key = calibration_key(weights_sha256=_sha256(path), fold_upsampling=fold_upsampling,
                          windows_shape=windows.shape[:4])
    t0 = time.perf_counter()
    figures, probs = {}, {}
    for name in CALIBRATED_ENGINES:
        engine = get_engine(name, str(path), "fp32", fold_upsampling)
        probs[name], wall, cpu = _timed_predict(engine, windows)
        figures[name] = {"seconds_per_window": round(wall / len(windows), 4),
                         "cpu_seconds_per_window": round(cpu / len(windows), 4)}
    reference, other = probs["keras"], probs["openvino"]
    max_dp = float(np.abs(other - reference).max())
    differ = int(((other >= 0.5) != (reference >= 0.5)).sum())
    exact = differ == 0 and max_dp <= MAX_DP
    faster = figures["openvino"]["cpu_seconds_per_window"] < figures["keras"]["cpu_seconds_per_window"]
    result = {"choice": "openvino" if exact and faster else "keras", "engines": figures,
              "max_dp": max_dp, "decisions_differ": differ, "voxels_p_ge_0.5": int((reference >= 0.5).sum()),
              "exact": exact, "max_dp_allowed": MAX_DP,
              "calibrated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "seconds": round(time.perf_counter() - t0, 2), "key": key}
    target = calibration_path(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=1) + "\n")
        os.replace(temp, target)  # concurrent runs write the same key: whole files only
    except OSError as exc:
        from lungzarr.errors import LungzarrError

        raise LungzarrError(f"cannot write the engine calibration into {str(cache_dir())!r} ({exc}); set "
                            f"LUNGZARR_CACHE to a writable folder, or choose --engine") from exc
    return result
