"""The d8 network's geometry: one place for its window, halo and crop (docs/algorithms.md §5).

Plain arithmetic (no Keras, no numpy), so every layer that needs these facts — the
inference, the DSB2017 features, the pipeline's checks, the command line's options — imports
them from here (the CLI at start-up, which stays numpy-free).
"""
from __future__ import annotations

from numbers import Integral

__all__ = ["WINDOW", "WINDOW_CENTRE", "HALO", "MIN_SLICES_2MM", "ROW_COL_MULTIPLE", "LUNG_BOX_MARGIN", "CROPS",
           "DEFAULT_CROP", "detection_crop", "predicted_slices", "window_maps", "fixed_box", "box_around", "check_box"]

#: Slices of one input window of the network.
WINDOW = 8
#: Window ``i`` (slices ``i … i+7``) predicts slice ``i + WINDOW_CENTRE``.
WINDOW_CENTRE = WINDOW // 2
#: Slices a prediction needs below and above its own (the map_overlap halo).
HALO = (WINDOW_CENTRE, WINDOW - 1 - WINDOW_CENTRE)
#: Fewest 2 mm slices with a prediction: windows ``i = 0 … Z-9`` (the original never uses the last
#: possible window), so one window needs ``Z >= WINDOW + 1``.
MIN_SLICES_2MM = WINDOW + 1
#: The network halves y and x twice: the detection crop keeps rows and columns in multiples of 4.
ROW_COL_MULTIPLE = 4

#: Rows/columns a prediction box keeps beyond every lung voxel (``--crop lungs``, docs/algorithms.md §5).
#: It is the d8 network's reach in y and x: an output pixel depends on input pixels at most 23 away.
#: Counted in input pixels, layer by layer along one axis: the four 3x3x3 convolutions at full resolution
#: (down 1, up 2) reach 1 each, the four at half resolution (down 2, up 1) 2 each, the two at quarter
#: resolution (bottom) 4 each: 4 + 8 + 8 = 20; the 2-pixel pool cells and nearest upsampling add the
#: column's offset inside its quarter-resolution cell, 0 ... 3 (the z-only layers and the head add none).
#: Exactly, output column c sees input columns c-22 ... c+21, c-23 ... c+20, c-20 ... c+23, c-21 ... c+22
#: for c = 0, 1, 2, 3 mod 4 (tests/test_lung_box.py measures these intervals with the trained weights).
#: Hence, with the box's first row/column a multiple of ROW_COL_MULTIPLE from the detection crop's (so every
#: pool cell and upsampled pixel covers the same input pixels as in the fixed crop) and every lung voxel at
#: least LUNG_BOX_MARGIN from the box's edges (or on an edge the fixed crop shares), each lung voxel's
#: prediction sees the same inputs as with the fixed crop: it is the same number, not an approximation.
#: A smaller margin (the issue measured 8) is exact only where p happens to be ~0 near the lungs' extremes.
LUNG_BOX_MARGIN = 23

#: ``--crop`` choices: ``fixed`` predicts the whole detection crop (the original; the DSB2017 export needs
#: it), ``lungs`` one y/x box per patient around its lung mask (:func:`box_around`).
CROPS = ("fixed", "lungs")
#: The crop of a run that names none, from Python (``pipeline.run``) and the command line (``lungzarr run``,
#: ``lungzarr detect``) alike: the lung box, exact inside the lungs and cheaper on whole scans
#: (docs/user-guide/engines.md). The DSB2017 export refuses its patients: ask for ``fixed`` to get that table.
DEFAULT_CROP = "lungs"


def detection_crop(shape) -> tuple[int, int]:
    """Rows and columns the detection crop drops from the start: ``(H mod 4, W mod 4)``.

    The original cropped the 2 mm slice to multiples of :data:`ROW_COL_MULTIPLE`
    by dropping the *first* rows and columns.
    """
    _, h, w = shape
    return h % ROW_COL_MULTIPLE, w % ROW_COL_MULTIPLE


def predicted_slices(nz: int) -> slice:
    """The slices of an ``nz``-slice volume that get a prediction.

    Windows ``i = 0 … nz-9`` predict slices ``4 … nz-5``, so the first 4 and
    the last 4 slices have none. Empty when ``nz <= 8``.
    """
    nz = int(nz)
    if nz < 0:
        raise ValueError(f"nz must be >= 0, got {nz!r}")
    return slice(WINDOW_CENTRE, max(WINDOW_CENTRE, nz - WINDOW_CENTRE))


def window_maps(prob):
    """The per-window maps of a stored probability volume: window ``i`` is slice ``i + 4``, cropped.

    ``prob[4:nz-4, H mod 4:, W mod 4:]``, the ``pmav`` of the original's features.
    """
    rows, cols = detection_crop(prob.shape)
    return prob[predicted_slices(prob.shape[0]), rows:, cols:]


def fixed_box(shape) -> dict:
    """The original's prediction box of a ``shape`` volume: the predicted slices, the detection crop's rows/columns.

    A box is ``{"z": [z0, z1], "y": [y0, y1], "x": [x0, x1]}`` in voxels of the
    2 mm grid, stops exclusive: slices ``z0 … z1-1`` get a prediction, and the
    network sees (and predicts) rows ``y0 … y1-1`` and columns ``x0 … x1-1``.
    """
    nz, h, w = (int(n) for n in shape)
    rows, cols = detection_crop(shape)
    have = predicted_slices(nz)
    return {"z": [have.start, have.stop], "y": [rows, h], "x": [cols, w]}


def _aligned(lo: int, hi: int, origin: int, length: int, margin: int) -> list[int]:
    """``[lo - margin, hi + margin)`` widened to multiples of ROW_COL_MULTIPLE from ``origin``, within ``origin … length``."""
    m = ROW_COL_MULTIPLE
    start = origin + max(0, (lo - margin - origin) // m * m)
    stop = min(length, origin + -(-(hi + margin - origin) // m) * m)
    return [int(start), int(stop)]


def box_around(bbox, shape, *, margin: int = LUNG_BOX_MARGIN) -> dict:
    """The prediction box for the voxels inside ``bbox`` (see :data:`LUNG_BOX_MARGIN`).

    Parameters
    ----------
    bbox : sequence of 6 int
        ``(z0, y0, x0, z1, y1, x1)``, stops exclusive (e.g. the lung mask's
        bounding box).
    shape : (Z, H, W)
        The 2 mm volume's shape.
    margin : int, optional
        Rows and columns kept beyond ``bbox`` before the alignment.

    Returns
    -------
    dict
        A box as :func:`fixed_box`: slices whose window holds a slice of
        ``bbox`` (``z0 - 3 … z1 + 3``, within the predicted slices); rows and
        columns ``margin`` beyond ``bbox``, widened so the box starts a
        multiple of 4 from the detection crop and spans a multiple of 4,
        within the detection crop.
    """
    if isinstance(margin, bool) or not isinstance(margin, Integral) or margin < 0:
        raise ValueError(f"margin must be an integer >= 0, got {margin!r}")
    z0, y0, x0, z1, y1, x1 = (int(v) for v in bbox)
    nz, h, w = (int(n) for n in shape)
    if not (0 <= z0 < z1 <= nz and 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(f"bbox {tuple(bbox)!r} must be a non-empty box inside shape {tuple(shape)!r}")
    rows, cols = detection_crop(shape)
    have = predicted_slices(nz)
    # Window i (slices i … i+7) predicts slice i+4: slice s has a window holding bbox's slices
    # when s+3 >= z0 and s-4 < z1.
    zs = max(have.start, z0 - HALO[1])
    ze = max(zs, min(have.stop, z1 + HALO[0]))
    return {"z": [int(zs), int(ze)], "y": _aligned(y0, y1, rows, h, int(margin)),
            "x": _aligned(x0, x1, cols, w, int(margin))}


def check_box(box, shape) -> dict:
    """``box`` as ``{"z", "y", "x"}`` lists of ints, checked against a ``shape`` volume; ValueError if it is not one.

    The rows and columns must lie in the detection crop, start a multiple of 4
    from it and span a non-zero multiple of 4 (the network halves y and x
    twice); the slices must lie in :func:`predicted_slices`.
    """
    try:
        out = {axis: [int(box[axis][0]), int(box[axis][1])] for axis in ("z", "y", "x")}
    except (KeyError, IndexError, TypeError, ValueError):
        raise ValueError(f"box must be a dict with 'z', 'y' and 'x' [start, stop] pairs, got {box!r}") from None
    full = fixed_box(shape)
    (zs, ze), (fzs, fze) = out["z"], full["z"]
    if not fzs <= zs <= ze <= fze:
        raise ValueError(f"box slices {out['z']!r} must lie within the predicted slices {full['z']!r}")
    for axis in ("y", "x"):
        (start, stop), (origin, length) = out[axis], full[axis]
        if not (origin <= start < stop <= length and (start - origin) % ROW_COL_MULTIPLE == 0
                and (stop - start) % ROW_COL_MULTIPLE == 0):
            raise ValueError(f"box {axis} {out[axis]!r} must lie within {full[axis]!r}, start a multiple of "
                             f"{ROW_COL_MULTIPLE} from {origin} and span a multiple of {ROW_COL_MULTIPLE}")
    return out
