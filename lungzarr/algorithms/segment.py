"""Per-slice lung segmentation of 2 mm axial slices, and its lazy dask stage.

docs/algorithms.md §3, the original's ``seperate_lungs_cv2``: a marker-controlled
watershed of the Sobel gradient, whose outline is closed by a black-hat and
two binary closings. The original ran OpenCV's black-hat; here it is done with
scipy with OpenCV's border rule (pixels outside the slice are ignored), and a
test compares the masks with an OpenCV run on every slice of the real fixtures.

Every step keeps the original's calls, dtypes and quirks:

* the frame of columns set to -1024 / 0 only feeds the internal marker;
* ``clear_border`` and ``label`` use 8-connectivity (scikit-image's default);
* the dilations, Sobel filters, morphological gradient and closings are
  ``scipy.ndimage`` calls with the same arguments (Sobel of an int16 slice is
  int16, as scipy keeps the input dtype);
* iteration counts and the closing disk scale with ``512 / H`` through
  :func:`lungzarr.volume.rescale_n`, so slices that are not 512 rows high
  behave as the original.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from lungzarr.volume import rescale_n

__all__ = [
    "segment_lung_slice",
    "segment_lung_slices",
    "segment_lungs",
    "blackhat_footprint",
    "blackhat_iterations",
    "OUTSIDE_LUNG_HU",
]

#: Value the segmented volume holds outside the lung filter.
OUTSIDE_LUNG_HU = -2000
#: Internal-marker threshold (HU): darker pixels are lung or air candidates.
MARKER_THRESHOLD_HU = -400
#: Columns 1..8 and W-9..W-2 are set to 0 HU (and 0 and W-1 to -1024) before
#: thresholding, which closes lungs touching the left/right edge.
FRAME_WIDTH = 9
#: Iterations of scipy's cross-shaped dilation giving the external marker band.
EXTERNAL_INNER_ITERATIONS = 10
EXTERNAL_OUTER_ITERATIONS = 55
#: Watershed marker labels.
INTERNAL_LABEL = 255
EXTERNAL_LABEL = 128
#: Iterations of the 7x7 black-hat pattern and radius of the large closing
#: disk, both for a 512-row slice (scaled by ``512 / H``).
BLACKHAT_ITERATIONS_512 = 8
CLOSING_RADIUS_512 = 7
SMALL_CLOSING_RADIUS = 2
CLOSING_ITERATIONS = 3
#: The original's reference slice height.
REFERENCE_ROWS = 512

_BLACKHAT_PATTERN = np.array([[0, 0, 1, 1, 1, 0, 0],
                              [0, 1, 1, 1, 1, 1, 0],
                              [1, 1, 1, 1, 1, 1, 1],
                              [1, 1, 1, 1, 1, 1, 1],
                              [1, 1, 1, 1, 1, 1, 1],
                              [0, 1, 1, 1, 1, 1, 0],
                              [0, 0, 1, 1, 1, 0, 0]], dtype=bool)


def _check_int16(name, arr) -> None:
    if arr.dtype != np.int16:
        # The Sobel step keeps the input dtype (int16 in the original): any
        # other dtype changes the gradient and with it the mask.
        raise TypeError(f"{name} must be int16 HU, got dtype {arr.dtype!r}; convert with .astype(np.int16)")


def _check_slice(slice_hu) -> np.ndarray:
    slice_hu = np.asarray(slice_hu)
    if slice_hu.ndim != 2:
        raise ValueError(f"slice_hu must be a 2-D (y, x) slice, got shape {slice_hu.shape!r}")
    _check_int16("slice_hu", slice_hu)
    if min(slice_hu.shape) < 2 * FRAME_WIDTH + 1:
        raise ValueError(f"slice_hu of shape {slice_hu.shape!r} is too small: the marker frame "
                         f"needs at least {2 * FRAME_WIDTH + 1} rows and columns")
    return slice_hu


def _reduce_factor(n_rows: int) -> float:
    return REFERENCE_ROWS / n_rows


def blackhat_iterations(n_rows: int) -> int:
    """How often the 7x7 black-hat pattern is iterated for ``n_rows`` rows.

    ``rescale_n(8, 512 / n_rows)``: 8 at 512 rows, 3 at 168-180 rows.
    """
    return rescale_n(BLACKHAT_ITERATIONS_512, _reduce_factor(n_rows))


def blackhat_footprint(n_rows: int) -> np.ndarray:
    """The black-hat footprint for slices of ``n_rows`` rows, as the original built it.

    The 7x7 disk-like pattern iterated :func:`blackhat_iterations` times with
    :func:`scipy.ndimage.iterate_structure` (49x49 at 512 rows, 19x19 at
    168 rows).
    """
    return ndimage.iterate_structure(_BLACKHAT_PATTERN, blackhat_iterations(n_rows)).astype(bool)


def internal_marker(slice_hu: np.ndarray) -> np.ndarray:
    """Internal watershed marker: the two largest dark regions off the border.

    The framed copy (columns 0 and W-1 at -1024, 1..8 and W-9..W-2 at 0) is
    thresholded at -400 HU; regions touching the border are cleared and, when
    more than two remain, every region smaller than the second largest is
    dropped (ties with it are kept, as the original did).
    """
    from skimage import measure, segmentation

    slice_hu = _check_slice(slice_hu)
    width = slice_hu.shape[1]
    framed = slice_hu.copy()
    framed[:, 0] = -1024
    framed[:, 1:FRAME_WIDTH] = 0
    framed[:, width - 1:width] = -1024
    framed[:, width - FRAME_WIDTH:width - 1] = 0
    marker = framed < MARKER_THRESHOLD_HU
    marker = segmentation.clear_border(marker, buffer_size=0)
    labels = measure.label(marker, connectivity=2)
    areas = np.bincount(labels.ravel())[1:]
    if areas.size > 2:
        second_largest = np.sort(areas)[-2]
        keep = np.concatenate([[False], areas >= second_largest])
        return keep[labels]
    return labels > 0


def watershed_markers(internal: np.ndarray) -> np.ndarray:
    """Watershed markers: 255 on the internal marker, 128 on the band around it.

    The band is ``dilate(internal, 55) XOR dilate(internal, 10)`` with scipy's
    default cross-shaped structure.
    """
    inner = ndimage.binary_dilation(internal, iterations=EXTERNAL_INNER_ITERATIONS)
    outer = ndimage.binary_dilation(internal, iterations=EXTERNAL_OUTER_ITERATIONS)
    external = outer ^ inner
    markers = np.zeros(internal.shape, dtype=np.int64)
    markers += internal * INTERNAL_LABEL
    markers += external * EXTERNAL_LABEL
    return markers


def sobel_magnitude(slice_hu: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude scaled to a maximum of 255 (float32).

    ``ndimage.sobel`` of the int16 slice stays int16 (as in the original,
    including any wrap-around on extreme contrasts); ``hypot`` of two int16
    arrays is float32 and the scaling is done in float32. A slice without any
    gradient keeps a zero gradient (the original divided by zero there; its
    markers are empty in that case, so the mask is empty either way).
    """
    dx = ndimage.sobel(slice_hu, 1)
    dy = ndimage.sobel(slice_hu, 0)
    magnitude = np.hypot(dx, dy)
    peak = magnitude.max()
    if peak > 0:
        magnitude *= np.float32(255.0 / float(peak))
    return magnitude


def close_outline(outline: np.ndarray, iterations: int) -> np.ndarray:
    """``outline | blackhat(outline)`` with OpenCV's border rule.

    The black-hat of a binary image is ``closing(outline) & ~outline`` and a
    closing contains its input, so the union is the closing itself, here with
    the 7x7 pattern iterated ``iterations`` times (:func:`blackhat_footprint`).

    OpenCV ignores pixels outside the image (its default border is -inf for
    the dilation and +inf for the erosion). The iterated pattern is the
    Minkowski sum of ``iterations`` copies of the 7x7 pattern, so the closing
    is done as ``iterations`` small dilations then erosions, which is several
    times faster than one large footprint and gives the same pixels provided
    intermediate dilations may grow outside the slice: the slice is padded
    with False by the footprint's radius for the dilation; the erosion treats
    the outside as True at every iteration (``border_value=1``), which is
    exactly "ignore".
    """
    radius = (_BLACKHAT_PATTERN.shape[0] // 2) * iterations
    padded = np.pad(outline, radius, mode="constant", constant_values=False)
    dilated = ndimage.binary_dilation(padded, structure=_BLACKHAT_PATTERN, iterations=iterations,
                                      border_value=0)
    dilated = dilated[radius:-radius, radius:-radius]
    return ndimage.binary_erosion(dilated, structure=_BLACKHAT_PATTERN, iterations=iterations,
                                  border_value=1)


def segment_lung_slice(slice_hu: np.ndarray) -> np.ndarray:
    """Lung filter of one 2 mm axial slice (docs/algorithms.md §3).

    Parameters
    ----------
    slice_hu : (H, W) ndarray of int16
        One axial slice in Hounsfield units.

    Returns
    -------
    lungfilter : (H, W) ndarray of bool
        True on the lungs (and, as in the original, on any other large dark
        region such as the trachea or bowel gas).

    Notes
    -----
    ``segmented = np.where(lungfilter, slice_hu, -2000)``; see
    :func:`segment_lung_slices`.
    """
    from skimage import morphology, segmentation

    slice_hu = _check_slice(slice_hu)
    reduce_factor = _reduce_factor(slice_hu.shape[0])
    internal = internal_marker(slice_hu)
    markers = watershed_markers(internal)
    gradient = sobel_magnitude(slice_hu)
    basins = segmentation.watershed(gradient, markers, connectivity=1)
    outline = ndimage.morphological_gradient(basins, size=(3, 3)).astype(bool)
    outline = close_outline(outline, blackhat_iterations(slice_hu.shape[0]))
    lungfilter = internal | outline
    small = morphology.disk(SMALL_CLOSING_RADIUS)
    large = morphology.disk(rescale_n(CLOSING_RADIUS_512, reduce_factor))
    closed_small = ndimage.binary_closing(lungfilter, structure=small, iterations=CLOSING_ITERATIONS)
    closed_large = ndimage.binary_closing(lungfilter, structure=large, iterations=CLOSING_ITERATIONS)
    return closed_small | closed_large


def _check_block(block) -> np.ndarray:
    block = np.asarray(block)
    if block.ndim != 3:
        raise ValueError(f"block must be a 3-D (z, y, x) volume, got shape {block.shape!r}")
    return block


def segment_lung_slices(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment every axial slice of a (z, y, x) int16 block.

    Returns
    -------
    lungs : ndarray of bool, same shape
    segmented : ndarray of int16, same shape
        ``block`` inside the lungs, -2000 outside.
    """
    block = _check_block(block)
    lungs = _lung_mask_block(block)
    return lungs, np.where(lungs, block, np.int16(OUTSIDE_LUNG_HU)).astype(np.int16)


def _lung_mask_block(block: np.ndarray) -> np.ndarray:
    lungs = np.zeros(block.shape, dtype=bool)
    for k in range(block.shape[0]):
        lungs[k] = segment_lung_slice(block[k])
    return lungs


def segment_lungs(hu_2mm):
    """Lazy lung segmentation of a 2 mm volume, one z-chunk per task.

    Parameters
    ----------
    hu_2mm : dask.array.Array (or array-like) of int16, (z, y, x)
        The 2 mm volume. Chunks along y and x are merged (each task needs
        whole slices); z-chunks are kept, and a task reads only its own chunk.

    Returns
    -------
    lungs : dask.array.Array of bool
    segmented : dask.array.Array of int16
        ``hu_2mm`` inside the lungs, -2000 outside; derived element-wise from
        ``lungs``, so computing or storing both in one call (``dask.compute``,
        ``da.store([lungs, segmented], ...)``) runs the segmentation once per
        chunk; two separate calls would run it twice.
    """
    import dask.array as da

    hu_2mm = da.asarray(hu_2mm)
    if hu_2mm.ndim != 3:
        raise ValueError(f"hu_2mm must be a 3-D (z, y, x) volume, got shape {hu_2mm.shape!r}")
    _check_int16("hu_2mm", hu_2mm)
    # Per-slice operation: whole slices per chunk, no halo along z.
    hu_2mm = hu_2mm.rechunk({1: -1, 2: -1})
    lungs = hu_2mm.map_blocks(_lung_mask_block, dtype=bool,
                              meta=np.empty((0, 0, 0), dtype=bool), token="segment-lungs")
    segmented = da.where(lungs, hu_2mm, np.int16(OUTSIDE_LUNG_HU)).astype(np.int16)
    return lungs, segmented
