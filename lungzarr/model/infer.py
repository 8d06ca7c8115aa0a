"""Nodule probability maps: the d8 network as a dask stage over a 2 mm volume.

docs/algorithms.md §5: the unsegmented 2 mm volume loses its first ``H mod 4``
rows and ``W mod 4`` columns (the detection crop), is normalised, and every
window of 8 slices ``i … i+7`` (``i = 0 … Z-9``; the last possible window is
not used, as in the original) gives the probability map of slice ``i + 4``.
Probabilities below 0.5 are stored as 0; the dropped rows and columns and the
slices without a window are 0 too (:func:`predicted_slices` says which slices
have a prediction).

With a prediction box (``box=``, e.g. :func:`lungzarr.algorithms.crop.lung_box`
under ``--crop lungs``) the network sees only the box's rows and columns and
predicts only its slices; the map keeps the full grid, 0 outside the box.

Each z-chunk (with a halo of 4 slices below and 3 above, so a patient can be
split over several workers) is three tasks: ``cut-windows-…`` normalises and
cuts its windows into a :class:`WindowBatch` (the ``(n, 8, h, w, 1)`` float32
batch, sent as the slab of ``n + 7`` slices it is a view of: 8 times fewer
bytes), ``predict-nodule-prob-…`` only calls the engine's ``predict`` on it
(:func:`predict_stats` counts these calls), and ``place-nodule-prob-…``
thresholds the probabilities and puts them into the chunk's full-grid block.
The model (or the engine's compiled graph, :mod:`lungzarr.model.engines`) is
built once per worker process (:func:`lungzarr.model.engines.get_engine`).

GPU workers
-----------
Build the graph, and whatever is built on it (the store write), inside
:func:`annotate_gpu`: the predict tasks then need a ``GPU`` resource
(workers started with ``--resources GPU=1``) and every other task goes to the
``cpu_workers`` given (:func:`lungzarr.pipeline.placement.cpu_task_workers`),
so a GPU worker runs nothing but the network::

    with annotate_gpu(cpu_workers=cpu_only):
        prob = predict_nodule_prob(hu_2mm)
    prob = client.compute(prob, optimize_graph=False)

The annotations are asked per task key (xarray's ``to_zarr(compute=False)``
flattens the graph into one layer) and task fusion is off inside the block;
compute with ``optimize_graph=False``, as fusion would merge a predict task
with its CPU neighbours and drop the annotation.

A predict task holds one patient's chunk: batching several patients' windows
into one call would tie each patient's commit to the others' (the pipeline
streams and commits every patient on its own), and a chunk of 64+ windows
already makes several engine batches.
"""
from __future__ import annotations

import contextlib
import time

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed
from dask.sizeof import sizeof

from lungzarr.errors import PatientError
from lungzarr.model.d8 import _check_precision, verify_weights
from lungzarr.model.engines import ENGINES, get_engine
from lungzarr.model.geometry import HALO, MIN_SLICES_2MM, WINDOW, WINDOW_CENTRE, check_box, detection_crop, fixed_box
from lungzarr.volume import normalize_hu

__all__ = [
    "THRESHOLD",
    "predict_nodule_prob",
    "annotate_gpu",
    "is_predict_key",
    "WindowBatch",
    "predict_stats",
    "box_in_crop",
    "INFER_BATCH",
    "infer_batch",
]

#: Probabilities below this are stored as 0.
THRESHOLD = 0.5

#: 8-slice windows per engine call when none is asked for, on CPU and on GPU workers. On a CPU each window of a
#: call holds the network's activations, ~170 MB at 180 x 180 (OpenVINO f32, linear in the windows and the
#: slice area), kept by the engine for the process's life: 8 windows held 1.4 GB per worker (a whole scan's
#: largest process 1.83 GiB), 2 hold 0.36 GB, for the same CPU-s per window (within 3 %, the noise) and
#: bit-identical probabilities (OpenVINO; tests/test_whole_scan.py; benchmarks/README.md, "Whole scans: memory
#: per process"). A GPU keeps 8 (32 suits a large one).
INFER_BATCH = {"cpu": 2, "gpu": 8}


def infer_batch(batch_size: int | None = None, *, gpu: bool = False) -> int:
    """Windows per engine call: ``batch_size``, or :data:`INFER_BATCH`'s default for CPU or GPU workers."""
    if batch_size is None:
        return INFER_BATCH["gpu" if gpu else "cpu"]
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


#: The network's tasks are named ``predict-nodule-prob-<token>`` (only they need a GPU).
PREDICT_TASK_PREFIX = "predict-nodule-prob-"


def _check_volume(hu_2mm, patient):
    if hu_2mm.ndim != 3:
        raise ValueError(f"hu_2mm must be 3-D (z, y, x), got shape {hu_2mm.shape!r}")
    nz, h, w = hu_2mm.shape
    if nz < MIN_SLICES_2MM:
        raise PatientError(
            f"the 2 mm volume has {nz} slices; the nodule identifier needs at least "
            f"{MIN_SLICES_2MM} (one window of {WINDOW} slices plus the unused last window). "
            f"Use a series that covers at least {2 * MIN_SLICES_2MM} mm.",
            patient=patient, stage="detect")
    if h < 4 or w < 4:
        raise PatientError(
            f"the 2 mm slices are {h} x {w} voxels; the nodule identifier needs at least 4 x 4. "
            f"Check the series' PixelSpacing and Rows/Columns.", patient=patient, stage="detect")


#: This process's model.predict totals (read on a worker with ``client.run(predict_stats)``).
_PREDICT_STATS = {"calls": 0, "windows": 0, "seconds": 0.0}


def predict_stats(*, reset: bool = False) -> dict:
    """``model.predict`` calls, windows and seconds in this process so far.

    Profiling aid for GPU workers: compare with the predict tasks' compute
    time to see how much of a task is the network itself.
    """
    stats = dict(_PREDICT_STATS)
    if reset:
        _PREDICT_STATS.update(calls=0, windows=0, seconds=0.0)
    return stats


def _z_chunks_at_least(chunks: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    """Merge z-chunks so that every one holds at least ``minimum`` slices.

    map_overlap needs each neighbour to hold the whole halo; merging keeps the
    caller's boundaries wherever they already allow it.
    """
    merged: list[int] = []
    for size in chunks:
        if merged and merged[-1] < minimum:
            merged[-1] += size
        else:
            merged.append(size)
    if len(merged) > 1 and merged[-1] < minimum:
        last = merged.pop()
        merged[-1] += last
    return tuple(merged)


def box_in_crop(box, shape) -> tuple[slice, slice, slice]:
    """A prediction box (:func:`lungzarr.model.geometry.check_box`) as slices of the detection-cropped volume.

    ``(slices, rows, columns)``: the slices to predict (in the volume's own
    numbering) and the rows/columns of the cropped volume the network sees.
    ``box`` None is the fixed crop (:func:`lungzarr.model.geometry.fixed_box`).
    """
    box = fixed_box(shape) if box is None else check_box(box, shape)
    rows, cols = detection_crop(shape)
    (z0, z1), (y0, y1), (x0, x1) = box["z"], box["y"], box["x"]
    return slice(z0, z1), slice(y0 - rows, y1 - rows), slice(x0 - cols, x1 - cols)


class WindowBatch:
    """The 8-slice windows of one z-chunk, cut on a CPU worker for the network.

    ``windows`` is the ``(n, 8, h, w, 1)`` float32 batch the engine predicts:
    window ``i`` is ``slab[i:i + 8]``, a view of one C-contiguous slab of
    ``n + 7`` normalised slices (the box's rows and columns only). Only the
    slab travels between workers (pickled out of band): a batch of
    materialised windows would be 8 times larger (each slice is in 8
    windows) and distributed serialises a strided view as a copy.
    """

    __slots__ = ("slab",)

    def __init__(self, slab: np.ndarray):
        if slab.ndim != 3 or slab.dtype != np.float32 or not slab.flags.c_contiguous:
            raise ValueError(f"slab must be a C-contiguous float32 (z, y, x) array, got {slab.dtype} "
                             f"{slab.shape!r}")
        self.slab = slab

    def __len__(self) -> int:
        return max(0, self.slab.shape[0] - (WINDOW - 1))

    @property
    def windows(self) -> np.ndarray:
        """The ``(n, 8, h, w, 1)`` float32 windows (a read-only view of :attr:`slab`; nothing is copied)."""
        s0, s1, s2 = self.slab.strides
        return np.lib.stride_tricks.as_strided(
            self.slab, shape=(len(self), WINDOW) + self.slab.shape[1:] + (1,),
            strides=(s0, s0, s1, s2, self.slab.itemsize), writeable=False)

    def __reduce__(self):
        return WindowBatch, (self.slab,)


@sizeof.register(WindowBatch)
def _sizeof_window_batch(batch) -> int:
    # What the scheduler counts against a worker's memory (the default would be a few bytes).
    return int(batch.slab.nbytes)


def _chunk_windows(k, offsets, shape, box):
    """The predicted slices ``first … last - 1`` of z-chunk ``k`` and the box's rows/columns (cropped volume)."""
    start, stop = offsets[k], offsets[k + 1]
    have, rows, cols = box_in_crop(box, shape)
    return start, stop, max(start, have.start), min(stop, have.stop), rows, cols


def _cut_windows(block, *, k, offsets, shape, box=None) -> WindowBatch:
    """CPU task: the windows of z-chunk ``k`` inside ``box`` from its normalised slices and halo."""
    start, stop, first, last, rows, cols = _chunk_windows(k, offsets, shape, box)
    # boundary='none': the first chunk has no halo below, the last none above.
    below = HALO[0] if k > 0 else 0
    above = HALO[1] if k < len(offsets) - 2 else 0
    if block.shape[0] != below + (stop - start) + above:
        raise RuntimeError(f"chunk {k} has {block.shape[0]} slices with its halo, expected "
                           f"{below + (stop - start) + above}")
    if first >= last:
        return WindowBatch(np.zeros((0,) + block[:, rows, cols].shape[1:], np.float32))
    # Slice s is predicted by the window of slices s-4 … s+3; in block coordinates
    # that window starts at s - 4 - (start - below): the windows of first … last-1 are one slab.
    origin = first - WINDOW_CENTRE - (start - below)
    slab = block[origin:origin + (last - first) + WINDOW - 1, rows, cols]
    return WindowBatch(np.ascontiguousarray(slab, dtype=np.float32))


def _predict_windows(batch: WindowBatch, *, weights, precision, batch_size, engine="keras",
                     fold_upsampling=True) -> np.ndarray:
    """GPU task (or any worker without GPUs): the network's probabilities ``(n, h, w)`` float32 of a batch.

    Nothing else runs here: the windows come cut, and the probabilities are
    thresholded and placed in the grid by a CPU task (:func:`_place_prob`).
    """
    if len(batch) == 0:
        return np.zeros((0,) + batch.slab.shape[1:], np.float32)
    from lungzarr.errors import LungzarrError
    from lungzarr.model.shipping import task_weights

    try:
        # The copy shipped to this worker (lungzarr.model.shipping), not a path on the client's filesystem;
        # its sha256 is checked before the model is built from it.
        runner = get_engine(engine, task_weights(weights), precision, fold_upsampling)
    except LungzarrError as exc:  # a missing or damaged copy, an engine that does not import on this worker
        raise PatientError(str(exc), stage="detect") from exc
    t0 = time.perf_counter()
    prob = runner.predict(batch.windows, batch_size=batch_size)
    _PREDICT_STATS["seconds"] += time.perf_counter() - t0
    _PREDICT_STATS["calls"] += 1
    _PREDICT_STATS["windows"] += len(batch)
    return np.ascontiguousarray(np.asarray(prob, dtype=np.float32)[:, 0, :, :, 0])


def _place_prob(prob, *, k, offsets, shape, box=None) -> np.ndarray:
    """CPU task: z-chunk ``k`` of the full-grid map, ``prob`` >= 0.5 in the box, 0 elsewhere."""
    start, stop, first, last, rows, cols = _chunk_windows(k, offsets, shape, box)
    dy, dx = detection_crop(shape)
    out = np.zeros((stop - start,) + tuple(shape[1:]), dtype=np.float32)
    if first >= last:
        return out
    if prob.shape[0] != last - first:
        raise RuntimeError(f"chunk {k}: {prob.shape[0]} predicted slices, expected {last - first}")
    prob = np.array(prob, dtype=np.float32)
    prob[prob < THRESHOLD] = 0
    out[first - start:last - start, dy + rows.start:dy + rows.stop, dx + cols.start:dx + cols.stop] = prob
    return out


def predict_nodule_prob(hu_2mm, *, weights=None, batch_size: int | None = None,
                        precision: str = "fp32", patient: str | None = None,
                        engine: str = "keras", box=None, fold_upsampling: bool = True) -> da.Array:
    """Lazy nodule probability map of a 2 mm volume (the "detect" stage).

    Parameters
    ----------
    hu_2mm : dask or numpy array, shape (Z, H, W)
        The *unsegmented* 2 mm volume in HU (``hu_2mm`` of the store).
    weights : str or path-like, optional
        d8 weights file (see :func:`lungzarr.model.d8.resolve_weights`); checked
        now, loaded by each worker process on first use: the copy
        :func:`lungzarr.model.shipping.ship_weights` shipped to the worker
        when there is one (workers elsewhere), else this path. A
        :class:`~lungzarr.model.shipping.ShippedWeights` (what the pipeline
        passes after shipping) is not checked again here.
    batch_size : int, optional
        Windows per engine call; default :data:`INFER_BATCH` ``["cpu"]`` (pass
        ``INFER_BATCH["gpu"]`` or more for GPU workers). It bounds the engine's
        memory, not the probabilities.
    precision : {"fp32", "bf16", "fp16"}, optional
        Compute precision (16-bit: GPU only).
    patient : str, optional
        Patient id for error messages.
    engine : {"keras", "openvino", "onnxruntime", "auto"}, optional
        What runs the network (:mod:`lungzarr.model.engines`): Keras'
        ``model.predict`` (the default here: it runs wherever the tasks go,
        GPU workers included), or a graph exported from the same Keras model.
        ``auto`` is OpenVINO when installed; the pipeline resolves it per run
        (Keras on GPU workers).
    box : dict or dask Delayed, optional
        The prediction box (:func:`lungzarr.model.geometry.check_box`): only its
        slices are predicted, and the network sees only its rows and columns.
        A Delayed (e.g. ``dask.delayed(lung_box)(lungs)``) is computed by a
        task and handed to every prediction task, so the box is never
        computed in the client. None (default): the fixed crop, every row and
        column of the detection crop (the original).
    fold_upsampling : bool, optional
        The network's form (:func:`lungzarr.model.d8.build_d8`): upsampling
        folded into the next convolution (default; 20 % less work, 1.3x faster, the same
        function to float32 rounding), or False for the original's literal layers.

    Returns
    -------
    prob : dask.array.Array of float32, shape (Z, H, W)
        Probabilities >= 0.5, else 0; 0 in the rows/columns dropped by the
        detection crop, in the slices outside :func:`predicted_slices` and
        outside ``box``.
        Nothing is computed until you compute it.

    Raises
    ------
    PatientError
        When the volume has 8 slices or fewer (no window) or slices smaller
        than 4 x 4.
    """
    batch_size = infer_batch(batch_size)
    _check_precision(precision)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)!r}, got {engine!r}")
    hu = da.asarray(hu_2mm)
    _check_volume(hu, patient)
    from lungzarr.model.shipping import ShippedWeights

    if not isinstance(weights, ShippedWeights):  # shipped ones were verified by the run, once
        weights = str(verify_weights(weights))
    shape = tuple(int(n) for n in hu.shape)
    if box is not None and not isinstance(box, Delayed):
        box = check_box(box, shape)
    dy, dx = detection_crop(shape)

    # The network sees whole slices: one chunk in y and x, z-chunks >= the halo.
    hu = hu[:, dy:, dx:]
    z_chunks = _z_chunks_at_least(hu.chunks[0], max(HALO))
    hu = hu.rechunk((z_chunks, -1, -1))
    normalised = hu.map_blocks(normalize_hu, dtype=np.float32, meta=np.empty((0, 0, 0), dtype=np.float32))
    # Each z-chunk with 4 slices of the chunk below and 3 of the one above (none at the ends).
    halo = da.overlap.overlap(normalised, depth={0: HALO, 1: 0, 2: 0}, boundary="none")
    blocks = halo.to_delayed(optimize_graph=False).ravel()
    offsets = tuple(int(o) for o in np.cumsum((0,) + z_chunks))
    # Task names from the inputs: the volume's dask name (store path, patient, file stat), the box's
    # (its task's key, or its values) and every option that changes the result.
    base = tokenize(normalised.name, offsets, shape, box.key if isinstance(box, Delayed) else box, weights,
                    precision, int(batch_size), engine, bool(fold_upsampling))
    where = dict(offsets=offsets, shape=shape, box=box)
    placed = []
    # One predict task per z-chunk (the stage's task_slices, 64+ slices: 64+ windows, several engine batches).
    # Patients are not batched together: a task holding two patients' windows would make each patient's
    # commit wait for the other's, and the runner streams and commits each patient on its own.
    for k, block in enumerate(blocks):
        token = tokenize(base, k)
        batch = dask.delayed(_cut_windows)(block, k=k, dask_key_name=f"cut-windows-{token}", **where)
        prob = dask.delayed(_predict_windows)(batch, weights=weights, precision=precision,
                                              batch_size=int(batch_size), engine=engine,
                                              fold_upsampling=bool(fold_upsampling),
                                              dask_key_name=f"{PREDICT_TASK_PREFIX}{token}")
        out = dask.delayed(_place_prob)(prob, k=k, dask_key_name=f"place-nodule-prob-{token}", **where)
        placed.append(da.from_delayed(out, shape=(offsets[k + 1] - offsets[k],) + shape[1:], dtype=np.float32,
                                      meta=np.empty((0, 0, 0), dtype=np.float32)))
    return da.concatenate(placed, axis=0)


def is_predict_key(key) -> bool:
    """Whether a task key is one of the network's tasks (``predict-nodule-prob-…``, whatever dask appends)."""
    name = key[0] if isinstance(key, tuple) else key
    return isinstance(name, str) and name.startswith(PREDICT_TASK_PREFIX)


class _ByTask:
    """A per-key annotation value: ``predict`` for the network's tasks, ``other`` for the rest (None: none).

    A callable because xarray's ``to_zarr(compute=False)`` hands the arrays to
    ``dask.delayed``, which flattens their graph into one layer (and renames
    every key): layer annotations made while building the graph are lost, but
    a callable annotation of the layer is asked per key. Equal by value, so
    layers annotated in one block stay fusable.
    """

    __slots__ = ("predict", "other")

    def __init__(self, predict, other):
        self.predict, self.other = predict, other

    def __call__(self, key):
        return self.predict if is_predict_key(key) else self.other

    def __eq__(self, other):
        return isinstance(other, _ByTask) and (self.predict, self.other) == (other.predict, other.other)

    def __hash__(self):
        return hash(repr((self.predict, self.other)))

    def __repr__(self):
        return f"_ByTask(predict={self.predict!r}, other={self.other!r})"


@contextlib.contextmanager
def annotate_gpu(gpus: int = 1, *, cpu_workers=()):
    """Run the network's tasks built inside the block on workers with a ``GPU`` resource, the rest elsewhere.

    Workers that should run inference are started with ``--resources GPU=1``.
    Only the predict tasks (:func:`is_predict_key`: the engine's call on a
    batch of ready windows) need a GPU; the tasks that read, crop, normalise
    and cut the windows, place the probabilities and write them are CPU work
    and go to ``cpu_workers`` (addresses; without them anywhere, which on a
    cluster often means the GPU worker, next to the predictions they take).
    Inside the block low-level task fusion is off (it would merge a predict
    task with its CPU neighbours into one task). Build the write inside the
    block too (xarray re-wraps the graph) and compute with
    ``optimize_graph=False``::

        with annotate_gpu(cpu_workers=cpu_only):
            prob = predict_nodule_prob(hu_2mm)
        client.compute(prob, optimize_graph=False)

    Parameters
    ----------
    gpus : int, optional
        GPU resource units each predict task holds while it runs.
    cpu_workers : list of str, optional
        Worker addresses for every other task built in the block.
    """
    if not isinstance(gpus, (int, np.integer)) or gpus < 1:
        raise ValueError(f"gpus must be an integer >= 1, got {gpus!r}")
    if isinstance(cpu_workers, str):
        raise ValueError(f"cpu_workers must be a list of worker addresses, got the string {cpu_workers!r}")
    annotations = {"resources": _ByTask({"GPU": int(gpus)}, None)}
    cpu_workers = sorted(cpu_workers or ())
    if cpu_workers:
        annotations.update(workers=_ByTask(None, cpu_workers), allow_other_workers=False)
    # Low-level fusion would hide a predict task in a CPU one; fusing layers with different annotations
    # would merge these callables as if they were values.
    with dask.annotate(**annotations), dask.config.set({"optimization.fuse.active": False,
                                                        "optimization.annotations.fuse": False}):
        yield
