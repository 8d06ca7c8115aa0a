"""Inference engines for the d8 UNet: Keras, OpenVINO and ONNX Runtime on one definition.

The Keras model of :mod:`lungzarr.model.d8` (``build_d8``: the network and the
Theano loader with its kernel flip) is the only definition of the network.
The other engines run a graph *exported from it* by Keras itself, so they
cannot drift from it:

``keras``
    ``model.predict`` on the active Keras backend (TensorFlow by default;
    ``KERAS_BACKEND=torch|jax`` on GPU workers).
``openvino``
    ``model.export(path, format="openvino")``: with the TensorFlow (or JAX)
    backend Keras traces the model's forward pass into a ``tf.function`` and
    hands it to ``openvino.convert_model``; the IR (``.xml`` + ``.bin``) keeps
    the batch, y and x dimensions dynamic (``[?, 8, ?, ?, 1]``). It needs only
    the ``openvino`` package (no tf2onnx/onnx), which is why it was chosen over
    reading Keras' ONNX graph into OpenVINO: both graphs ran at the same speed
    under OpenVINO (3.2 CPU-s per batch of eight 140 x 140 windows) with the
    same probabilities. Export into an empty cache: ~6 s (fp32 model build and
    Keras' exporter; TensorFlow already imported). The IR is compiled once per
    worker process, 0.3-0.4 s; at the first call with a new crop shape the
    dynamic graph is specialised, +0.6-0.7 CPU-s (140², 180²), under the 1 s
    per shape asked for, and kept for that shape. ``precision="fp32"`` sets
    ``INFERENCE_PRECISION_HINT=f32``: OpenVINO's CPU plugin otherwise runs
    bf16 on CPUs with AVX512-BF16/AMX, twice as fast on the benchmark machine
    but it moved p by up to 0.18 (benchmarks/README.md, "Inference engines").
``onnxruntime``
    ``model.export(path, format="onnx")`` (tf2onnx with the TensorFlow
    backend; the ``[onnx]`` extra installs onnxruntime, onnx and tf2onnx),
    run by an ``onnxruntime.InferenceSession`` on the CPU. fp32 only. Export
    ~3 s, session 0.03 s; Keras refuses to export a model never called, so
    the exporter calls it once on a 4 x 4 window first.
``auto``
    OpenVINO on CPU workers when it imports, else Keras; Keras on GPU
    workers (``gpu=True``), on its backend.

Exported graphs are cached on disk, in ``$LUNGZARR_CACHE`` or the user cache
directory (``platformdirs.user_cache_dir("lungzarr")`` when platformdirs is
installed, else ``~/.cache/lungzarr``), one folder per :func:`export_key`:
the weights' sha256, a hash of the network's definition (``d8.py``) and
its form (``fold_upsampling``), the Keras version and the engine's (and its
exporter's) versions. The input
shape is not part of it: the graphs are dynamic in y and x, so one graph
serves every crop shape. A new key is a new folder, so a change of any part
rebuilds the graph; a folder is written under a temporary name and renamed
into place (:func:`os.replace`), so concurrent workers never read a half
written graph. With a warm cache an OpenVINO or ONNX Runtime worker never
imports Keras or TensorFlow.

Every engine object has ``predict(windows, batch_size=...) -> probs`` and
is built once per worker process (:func:`get_engine`), like
:func:`lungzarr.model.d8.get_model`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from lungzarr.errors import LungzarrError
from lungzarr.model.d8 import _check_precision, _sha256, get_model, model_lock, verify_weights

__all__ = [
    "ENGINES",
    "CACHE_ENV",
    "cache_dir",
    "engine_available",
    "get_version",
    "resolve_engine",
    "export_key",
    "exported_graph",
    "get_engine",
    "prepare_engine",
    "require_engine",
    "engine_threads",
    "KerasEngine",
    "OpenVINOEngine",
    "OnnxRuntimeEngine",
]

#: ``--engine`` names.
ENGINES = ("auto", "keras", "openvino", "onnxruntime")
#: Environment variable naming the cache folder of exported graphs.
CACHE_ENV = "LUNGZARR_CACHE"

#: Python packages each engine needs at run time, and what installs them.
_RUNTIME = {"keras": ("keras",), "openvino": ("openvino",), "onnxruntime": ("onnxruntime",)}
#: Packages that export the graph (their versions are part of the cache key).
_EXPORTER = {"openvino": ("openvino",), "onnxruntime": ("onnxruntime", "onnx", "tf2onnx")}
_INSTALL = {"keras": "pip install keras tensorflow", "openvino": "pip install openvino",
            "onnxruntime": "pip install 'lungzarr[onnx]' (onnxruntime, onnx, tf2onnx)"}
#: File each exported graph is read from, inside its cache folder.
_GRAPH_FILE = {"openvino": "d8.xml", "onnxruntime": "d8.onnx"}
#: OpenVINO's inference precision per ``--precision``.
_OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def _check_name(engine) -> str:
    if engine not in ENGINES:
        raise LungzarrError(f"engine must be one of {list(ENGINES)!r}, got {engine!r}")
    return engine


def _import_error(engine: str) -> str | None:
    """Why ``engine``'s runtime does not import here, or None when it does."""
    for module in _RUNTIME[engine] + (_EXPORTER.get(engine, ())):
        if importlib.util.find_spec(module) is None:
            return f"{module!r} is not installed"
    # Keras is a default dependency and imports its backend (seconds): its presence is enough here.
    for module in () if engine == "keras" else _RUNTIME[engine]:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install raises anything from ImportError to OSError
            return f"{module!r} does not import ({type(exc).__name__}: {exc})"
    return None


def engine_available(engine: str) -> bool:
    """Whether ``engine`` (``keras``, ``openvino`` or ``onnxruntime``) is installed and imports here."""
    if _check_name(engine) == "auto":
        raise ValueError("engine_available() takes a concrete engine; resolve 'auto' with resolve_engine()")
    return _import_error(engine) is None


def resolve_engine(engine: str = "auto", *, gpu: bool = False) -> str:
    """The concrete engine for ``engine``: ``auto`` becomes ``openvino`` or ``keras``.

    Parameters
    ----------
    engine : {"auto", "keras", "openvino", "onnxruntime"}
    gpu : bool, optional
        The prediction runs on GPU workers: ``auto`` is Keras there (on its backend).

    Returns
    -------
    str
        ``keras``, ``openvino`` or ``onnxruntime``. Not checked further; see
        :func:`prepare_engine`.
    """
    _check_name(engine)
    if engine != "auto":
        return engine
    if not gpu and _import_error("openvino") is None:
        return "openvino"
    return "keras"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def get_version(engine: str) -> str:
    """The installed version of ``engine``'s runtime package (``"none"`` when it is not installed)."""
    return _version(_RUNTIME[resolve_engine(engine)][0])


def cache_dir() -> Path:
    """The folder of exported graphs: ``$LUNGZARR_CACHE``, else the user cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if importlib.util.find_spec("platformdirs") is not None:
        import platformdirs

        return Path(platformdirs.user_cache_dir("lungzarr", appauthor=False))
    return Path.home() / ".cache" / "lungzarr"


_DEFINITION = Path(__file__).resolve().parent / "d8.py"


def export_key(engine: str, *, weights_sha256: str, fold_upsampling: bool = True) -> dict:
    """Everything an exported graph depends on (one cache folder per distinct key).

    Parameters
    ----------
    engine : {"openvino", "onnxruntime"}
    weights_sha256 : str
        sha256 of the weights file the graph was exported with.
    fold_upsampling : bool, optional
        The network's form (:func:`lungzarr.model.d8.build_d8`).

    Returns
    -------
    dict
        ``engine``, the versions of the engine's packages, of Keras, the
        weights' sha256, the sha256 of the network's definition (``d8.py``)
        and its form.
        No input shape: the graphs are dynamic in batch, y and x.
    """
    if engine not in _GRAPH_FILE:
        raise ValueError(f"engine {engine!r} has no exported graph; choose among {sorted(_GRAPH_FILE)!r}")
    return {"engine": engine,
            "versions": {p: _version(p) for p in ("keras",) + _EXPORTER[engine]},
            "weights_sha256": str(weights_sha256),
            "definition_sha256": _sha256(_DEFINITION),
            "fold_upsampling": bool(fold_upsampling)}


def _key_folder(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"d8-{key['engine']}-{digest}"


def _export(engine: str, weights, folder: Path, fold_upsampling: bool = True) -> None:
    """Write ``engine``'s graph of the fp32 d8 model into ``folder`` (Keras' own exporter)."""
    from lungzarr.model.d8 import build_d8

    # Always the fp32 model: Keras exports float32 dtype policies only; the engine's own
    # precision setting (OpenVINO's inference precision) applies the 16-bit ones.
    model = build_d8(weights=weights, precision="fp32", fold_upsampling=fold_upsampling)
    # Keras' ONNX exporter refuses a model that was never called; the signature it then
    # exports is still the model's own, (None, 8, None, None, 1): one tiny call is enough.
    model(np.zeros((1, 8, 4, 4, 1), np.float32))
    path = folder / _GRAPH_FILE[engine]
    model.export(str(path), format="openvino" if engine == "openvino" else "onnx", verbose=False)
    if not path.is_file():
        raise RuntimeError(f"Keras' exporter wrote no {path.name}")


def exported_graph(engine: str, *, weights=None, fold_upsampling: bool = True) -> Path:
    """The cached graph file of ``engine`` for ``weights``, exported first when missing.

    Parameters
    ----------
    engine : {"openvino", "onnxruntime"}
    weights : str or path-like, optional
        See :func:`lungzarr.model.d8.resolve_weights` (sha256-checked).
    fold_upsampling : bool, optional
        See :func:`lungzarr.model.d8.build_d8`.

    Returns
    -------
    pathlib.Path
        ``<cache>/d8-<engine>-<key hash>/d8.xml`` (or ``d8.onnx``), beside a
        ``key.json`` with the key and the export's seconds.

    Raises
    ------
    LungzarrError
        When the export fails or the cache folder cannot be written.
    """
    path = verify_weights(weights)
    key = export_key(engine, weights_sha256=_sha256(path), fold_upsampling=fold_upsampling)
    root = cache_dir()
    final = root / _key_folder(key)
    graph = final / _GRAPH_FILE[engine]
    if graph.is_file():
        return graph
    try:
        root.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    except OSError as exc:
        raise LungzarrError(f"cannot write the {engine} graph cache {str(root)!r} ({exc}); set "
                            f"{CACHE_ENV} to a writable folder") from exc
    try:
        t0 = time.perf_counter()
        try:
            _export(engine, path, temp, fold_upsampling)
        except Exception as exc:
            raise LungzarrError(
                f"exporting the d8 model to {engine} failed ({type(exc).__name__}: {exc}); check the "
                f"install ({_INSTALL[engine]}) or choose --engine keras") from exc
        (temp / "key.json").write_text(json.dumps(
            {**key, "export_seconds": round(time.perf_counter() - t0, 2)}, indent=1) + "\n")
        try:
            os.replace(temp, final)
        except OSError:
            # Another process renamed its copy into place first: the same key, the same graph.
            if not graph.is_file():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return graph


# ---------------------------------------------------------------------- the engines

#: The environment variable that says how many threads a process's native libraries may use.
THREADS_ENV = "OMP_NUM_THREADS"


def engine_threads() -> int | None:
    """Threads an exported graph's runtime may use in this process: ``$OMP_NUM_THREADS``, else None (all cores).

    distributed starts every LocalCluster worker with ``OMP_NUM_THREADS=1``
    (one single-threaded worker process per core: the BLAS and OpenMP
    libraries obey it), but OpenVINO's CPU plugin (TBB) and ONNX Runtime do
    not read it and run one call on every core. Two such workers on two cores
    then run four compute threads, which wait for each other at every layer:
    on the 2-core AVX2 machine of ``benchmarks/README.md`` ("Whole scans")
    the same windows took 0.67 CPU-s each with two threads per worker and 0.57
    with one. The probabilities do not depend on the number of threads
    (bit for bit in tests/test_engine_threads.py: oneDNN splits a
    convolution over its outputs, not over the sums that make one output).
    """
    value = os.environ.get(THREADS_ENV, "").strip()
    try:
        threads = int(value)
    except ValueError:  # unset or not a number: the runtime's own default
        return None
    return threads if threads >= 1 else None


class KerasEngine:
    """``model.predict`` of the d8 Keras model (:func:`lungzarr.model.d8.get_model`)."""

    name = "keras"

    def __init__(self, *, weights=None, precision: str = "fp32", fold_upsampling: bool = True):
        self.model = get_model(weights, precision, fold_upsampling)
        self.version = _version("keras")

    def predict(self, windows, *, batch_size: int = 8) -> np.ndarray:
        """Probabilities ``(n, 1, H, W, 1)`` float32 of windows ``(n, 8, H, W, 1)`` float32."""
        with model_lock(self.model):
            prob = self.model.predict(windows, batch_size=batch_size, verbose=0)
        return np.asarray(prob, dtype=np.float32)


class _BatchedEngine:
    """An exported graph run one batch at a time by ``self._run(batch) -> probs`` (set by the subclass)."""

    def predict(self, windows, *, batch_size: int = 8) -> np.ndarray:
        """Probabilities ``(n, 1, H, W, 1)`` float32 of windows ``(n, 8, H, W, 1)`` float32."""
        windows = np.asarray(windows)
        if windows.ndim != 5 or windows.shape[1] != 8 or windows.shape[-1] != 1:
            raise ValueError(f"windows must be (n, 8, H, W, 1), got shape {windows.shape!r}")
        out = []
        # One call at a time: the runtime already spreads one call over every core.
        with self._lock:
            for start in range(0, len(windows), batch_size):
                # One call's windows copied at a time: the windows are often a strided view of a slab
                # (lungzarr.model.infer.WindowBatch), 8 times its size when copied whole.
                batch = np.ascontiguousarray(windows[start:start + batch_size], dtype=np.float32)
                out.append(np.array(self._run(batch), dtype=np.float32))
        if not out:
            return np.zeros((0, 1) + windows.shape[2:], np.float32)
        return np.concatenate(out)


class OpenVINOEngine(_BatchedEngine):
    """The exported d8 IR, compiled once by OpenVINO's CPU plugin (dynamic batch, y and x)."""

    name = "openvino"

    def __init__(self, *, weights=None, precision: str = "fp32", fold_upsampling: bool = True):
        import openvino as ov

        self.graph = exported_graph("openvino", weights=weights, fold_upsampling=fold_upsampling)
        self.version = _version("openvino")
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision]}
        self.threads = engine_threads()
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.threads
        t0 = time.perf_counter()
        self.compiled = core.compile_model(core.read_model(self.graph), "CPU", config)
        self.compile_seconds = time.perf_counter() - t0
        request = self.compiled.create_infer_request()
        # The request's output tensor is reused by the next call: predict() copies each result.
        self._run = lambda batch: request.infer({0: batch})[0]
        self._lock = threading.Lock()


class OnnxRuntimeEngine(_BatchedEngine):
    """Keras' ONNX graph of d8 in an ONNX Runtime CPU session (fp32)."""

    name = "onnxruntime"

    def __init__(self, *, weights=None, precision: str = "fp32", fold_upsampling: bool = True):
        import onnxruntime as ort

        if precision != "fp32":
            raise LungzarrError(f"engine 'onnxruntime' runs fp32 only, got precision {precision!r}; "
                                f"use --engine openvino or keras for {precision}")
        self.graph = exported_graph("onnxruntime", weights=weights, fold_upsampling=fold_upsampling)
        self.version = _version("onnxruntime")
        options = ort.SessionOptions()
        self.threads = engine_threads()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(str(self.graph), options, providers=["CPUExecutionProvider"])
        self.compile_seconds = time.perf_counter() - t0
        first = self.session.get_inputs()[0].name
        self._run = lambda batch: self.session.run(None, {first: batch})[0]
        self._lock = threading.Lock()


_CLASSES = {"keras": KerasEngine, "openvino": OpenVINOEngine, "onnxruntime": OnnxRuntimeEngine}
_ENGINES: dict = {}
_ENGINES_LOCK = threading.Lock()


def _missing(engine: str, why: str) -> LungzarrError:
    return LungzarrError(f"engine {engine!r} is not installed ({why}): {_INSTALL[engine]}, "
                         f"or choose another --engine among {list(ENGINES)!r}")


def get_engine(engine: str = "keras", weights=None, precision: str = "fp32", fold_upsampling: bool = True):
    """The engine object for ``(engine, weights, precision, fold_upsampling)``, built once per process.

    Dask workers call this inside their tasks, so each worker process loads
    (or exports) the graph and compiles it once, whatever the number of
    chunks, patients or crop shapes it predicts.

    Parameters
    ----------
    engine : {"auto", "keras", "openvino", "onnxruntime"}
        ``auto`` is resolved here with ``gpu=False`` (see :func:`resolve_engine`).
    weights, precision, fold_upsampling
        See :func:`lungzarr.model.d8.build_d8`.

    Returns
    -------
    KerasEngine, OpenVINOEngine or OnnxRuntimeEngine
        ``predict(windows, batch_size=...)`` is thread-safe (calls are serialised).

    Raises
    ------
    LungzarrError
        When the engine does not import here (the message says what to install).
    """
    _check_precision(precision)
    name = resolve_engine(engine)
    from lungzarr.model.d8 import resolve_weights

    key = (name, str(resolve_weights(weights)), precision, bool(fold_upsampling))
    with _ENGINES_LOCK:
        obj = _ENGINES.get(key)
        if obj is None:
            why = _import_error(name)
            if why is not None:
                raise _missing(name, why)
            obj = _CLASSES[name](weights=key[1], precision=precision, fold_upsampling=key[3])
            _ENGINES[key] = obj
    return obj


def require_engine(engine: str = "auto", *, gpu: bool = False) -> str:
    """The concrete engine ``engine`` resolves to, if it is installed and imports; else a LungzarrError."""
    name = resolve_engine(engine, gpu=gpu)
    why = _import_error(name)
    if why is not None:
        raise _missing(name, why)
    return name


def prepare_engine(engine: str = "auto", *, weights=None, precision: str = "fp32", gpu: bool = False,
                   fold_upsampling: bool = True) -> str:
    """Check an engine before a run: resolve ``auto``, check it imports, export its graph to the cache.

    Run once in the client before any patient, so a missing or broken engine
    stops the run with one message instead of failing every patient; on a
    cold cache it also exports the graph once for the workers of this machine.

    Parameters
    ----------
    engine : {"auto", "keras", "openvino", "onnxruntime"}
    weights, precision
        See :func:`lungzarr.model.d8.build_d8`.
    gpu : bool
        The UNet runs on GPU workers (``auto`` is Keras there).
    fold_upsampling : bool, optional
        The network's form whose graph is exported (see :func:`lungzarr.model.d8.build_d8`).

    Returns
    -------
    str
        The concrete engine name the workers are to use.

    Raises
    ------
    LungzarrError
        The engine is not installed or does not import, its export fails, or
        it does not support ``precision``.
    """
    _check_precision(precision)
    name = require_engine(engine, gpu=gpu)
    if name == "onnxruntime" and precision != "fp32":
        raise LungzarrError(f"engine 'onnxruntime' runs fp32 only, got precision {precision!r}; "
                            f"use --engine openvino or keras for {precision}")
    if name in _GRAPH_FILE:
        exported_graph(name, weights=weights, fold_upsampling=fold_upsampling)
    return name

