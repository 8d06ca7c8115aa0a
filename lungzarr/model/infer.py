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

The windows are cut with ``map_overlap`` along z (a halo of 4 slices below
and 3 above), so a patient can be split into z-chunks over several workers;
the model (or the engine's compiled graph, :mod:`lungzarr.model.engines`) is
built once per worker process (:func:`lungzarr.model.engines.get_engine`).

GPU workers
-----------
Build the graph inside :func:`annotate_gpu` to restrict the prediction tasks
to workers started with ``--resources GPU=1``::

    with annotate_gpu():
        prob = predict_nodule_prob(hu_2mm)
    prob = client.compute(prob, optimize_graph=False)

Compute with ``optimize_graph=False``: graph optimisation (low-level task
fusion) can merge annotated tasks with unannotated ones and drop the
annotation, and the predictions would then run on any worker.
"""
from __future__ import annotations

import contextlib
import time

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from lungzarr.errors import PatientError
from lungzarr.model.d8 import _check_precision, verify_weights
from lungzarr.model.engines import ENGINES, get_engine
from lungzarr.model.geometry import HALO, MIN_SLICES_2MM, WINDOW, WINDOW_CENTRE, check_box, detection_crop, fixed_box
from lungzarr.volume import normalize_hu

__all__ = [
    "THRESHOLD",
    "predict_nodule_prob",
    "annotate_gpu",
    "predict_stats",
    "box_in_crop",
]

#: Probabilities below this are stored as 0.
THRESHOLD = 0.5


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


def _predict_block(block, *, offsets, shape, weights, precision, batch_size, engine="keras", box=None,
                   block_info=None):
    """Probability maps of the slices of one z-chunk (called by map_overlap), inside ``box``."""
    k = block_info[0]["chunk-location"][0]
    start, stop = offsets[k], offsets[k + 1]
    # boundary='none': the first chunk has no halo below, the last none above.
    below = HALO[0] if k > 0 else 0
    above = HALO[1] if k < len(offsets) - 2 else 0
    if block.shape[0] != below + (stop - start) + above:
        raise RuntimeError(f"chunk {k} has {block.shape[0]} slices with its halo, expected "
                           f"{below + (stop - start) + above}")
    out = np.zeros((stop - start,) + block.shape[1:], dtype=np.float32)
    have, rows, cols = box_in_crop(box, shape)
    first, last = max(start, have.start), min(stop, have.stop)
    if first >= last:
        return out
    # Slice s is predicted by the window of slices s-4 … s+3; in block coordinates
    # that window starts at s - 4 - (start - below).
    origins = [s - WINDOW_CENTRE - (start - below) for s in range(first, last)]
    windows = np.stack([block[o:o + WINDOW, rows, cols] for o in origins])[..., np.newaxis]
    from lungzarr.errors import LungzarrError
    from lungzarr.model.shipping import task_weights

    try:
        # The copy shipped to this worker (lungzarr.model.shipping), not a path on the client's filesystem;
        # its sha256 is checked before the model is built from it.
        runner = get_engine(engine, task_weights(weights), precision)
    except LungzarrError as exc:  # a missing or damaged copy, an engine that does not import on this worker
        raise PatientError(str(exc), stage="detect") from exc
    t0 = time.perf_counter()
    prob = runner.predict(windows, batch_size=batch_size)
    _PREDICT_STATS["seconds"] += time.perf_counter() - t0
    _PREDICT_STATS["calls"] += 1
    _PREDICT_STATS["windows"] += len(windows)
    prob = np.asarray(prob, dtype=np.float32)[:, 0, :, :, 0]
    prob[prob < THRESHOLD] = 0
    out[first - start:last - start, rows, cols] = prob
    return out


def predict_nodule_prob(hu_2mm, *, weights=None, batch_size: int = 8,
                        precision: str = "fp32", patient: str | None = None,
                        engine: str = "keras", box=None) -> da.Array:
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
        Windows per ``model.predict`` batch.
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
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
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
    normalised = hu.map_blocks(normalize_hu, dtype=np.float32,
                               meta=np.empty((0, 0, 0), dtype=np.float32))
    offsets = tuple(int(o) for o in np.cumsum((0,) + z_chunks))
    prob = normalised.map_overlap(
        _predict_block, depth={0: HALO, 1: 0, 2: 0}, boundary="none", trim=False,
        chunks=normalised.chunks, dtype=np.float32, meta=np.empty((0, 0, 0), dtype=np.float32),
        offsets=offsets, shape=shape, weights=weights, precision=precision,
        batch_size=int(batch_size), engine=engine, box=box, token="predict-nodule-prob")
    prob = da.pad(prob, ((0, 0), (dy, 0), (dx, 0)), mode="constant", constant_values=0)
    return prob.rechunk((z_chunks, -1, -1))


@contextlib.contextmanager
def annotate_gpu(gpus: int = 1):
    """Restrict the tasks built inside the block to workers with a ``GPU`` resource.

    Workers that should run inference are started with ``--resources GPU=1``;
    CPU-only workers keep the other stages. Compute the result with
    ``optimize_graph=False`` so fusion does not drop the annotation::

        with annotate_gpu():
            prob = predict_nodule_prob(hu_2mm)
        client.compute(prob, optimize_graph=False)

    Parameters
    ----------
    gpus : int, optional
        GPU resource units each task holds while it runs.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus!r}")
    with dask.annotate(resources={"GPU": gpus}):
        yield
