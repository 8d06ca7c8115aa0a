"""Connected components of a thresholded map and their statistics.

These are the building blocks shared by the per-nodule table
(:mod:`lungzarr.algorithms.nodules`) and the DSB2017 per-patient export
(:mod:`lungzarr.algorithms.features`): one labelling, one way of gathering a component's
voxels, one HU description. The legacy arithmetic of the original
(``lungs_var3_d8g_222f.py``: float32 pixels, ``pix_to_hu``, the 2017
``scipy.stats.describe``) lives here too, so that both tables apply the
original's nodule filter in the same way (docs/algorithms.md §6).

Plain numpy / scipy on in-memory arrays; no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from lungzarr.volume import normalize_hu

__all__ = [
    "Components",
    "find_components",
    "above_threshold",
    "pix_to_hu",
    "legacy_hu",
    "describe_legacy",
    "describe_hu",
    "legacy_diameter",
    "sphere_diameter",
    "box_shape",
    "passes_dsb_filter",
    "MISSING",
    "NO_LABEL",
    "DSB_THRESHOLDS",
    "HU_STAT_NAMES",
    "DSB_MAX_MEAN_HU",
    "DSB_MIN_DIAMETER_MM",
]

#: The original's marker for a missing value (no nodule, empty selection).
MISSING = -7777
#: The DSB2017 ``cancer`` of a patient without a label (not in the labels CSV, not imported with one).
NO_LABEL = -777

#: Probability thresholds of the DSB2017 tables (candidates are p > float32(t)).
DSB_THRESHOLDS = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.999, 0.9999, 0.99999, 0.999999, 0.9999999)

#: Names of the seven HU statistics, in the order ``scipy.stats.describe`` gives them.
HU_STAT_NAMES = ("vol", "min", "max", "mean", "variance", "skewness", "kurtosis")

#: The original's HU window (normalisation bounds) and zero-centring constant.
_MIN_BOUND = -1000.0
_MAX_BOUND = 400.0
_PIXEL_MEAN = 0.028

#: Nodule filter of the original: mean HU below 0.99 x 400 ...
DSB_MAX_MEAN_HU = 0.99 * _MAX_BOUND
#: ... and diameter above 3 mm (the 2 mm grid's value; 2 mm for finer grids).
DSB_MIN_DIAMETER_MM = 3.0


def above_threshold(prob, threshold: float) -> np.ndarray:
    """``prob > float32(threshold)``, the original's strict float32 comparison.

    Parameters
    ----------
    prob : ndarray of float32
        Probability map.
    threshold : float
        Threshold; rounded to float32 before comparing, as NumPy did with a
        float32 array and a Python float (docs/algorithms.md §6).
    """
    prob = np.asarray(prob)
    if prob.dtype != np.float32:
        raise TypeError(f"prob must be float32 (the network's output), got dtype {prob.dtype!r}; "
                        "cast it with prob.astype(np.float32)")
    return prob > np.float32(threshold)


@dataclass(frozen=True)
class Components:
    """Connected components of a boolean volume, labelled in raster order.

    Attributes
    ----------
    shape : tuple of int
        Shape of the labelled volume.
    count : int
        Number of components. Component ``k`` (0-based) has label ``k + 1``;
        labels follow the order in which each component's first voxel appears
        in a raster (C-order) scan, as ``skimage.measure.label`` numbers them.
    voxels : ndarray of int64, shape (count,)
        Voxel count of each component.
    start, stop : ndarray of int64, shape (count, ndim)
        Bounding box of each component, ``stop`` exclusive.
    """

    shape: tuple
    count: int
    voxels: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    _flat: np.ndarray  # flat voxel indices grouped by label, raster order within a label
    _offsets: np.ndarray  # component k owns _flat[_offsets[k]:_offsets[k + 1]]

    def flat_indices(self, k: int) -> np.ndarray:
        """Flat (C-order) indices of component ``k`` (0-based), in raster order."""
        return self._flat[self._offsets[k]:self._offsets[k + 1]]

    def label_image(self) -> np.ndarray:
        """The int32 label image (0 = background)."""
        labels = np.zeros(self.shape, dtype=np.int32)
        labels.reshape(-1)[self._flat] = np.repeat(np.arange(1, self.count + 1, dtype=np.int32),
                                                   self.voxels)
        return labels

    def _check_shape(self, name: str, array: np.ndarray) -> None:
        if array.shape != self.shape:
            raise ValueError(f"{name} shape {array.shape!r} differs from the labelled "
                             f"volume's shape {self.shape!r}")

    def values(self, image) -> list[np.ndarray]:
        """Each component's voxels of ``image``, in raster order.

        Raster order is what ``image[labels == label]`` gives; float32 sums
        over these values depend on it.
        """
        image = np.asarray(image)
        self._check_shape("image", image)
        if self.count == 0:
            return []
        gathered = image.reshape(-1)[self._flat]
        return np.split(gathered, self._offsets[1:-1])

    def centroids(self) -> np.ndarray:
        """Mean voxel index of each component, shape (count, ndim), float64."""
        if self.count == 0:
            return np.zeros((0, len(self.shape)))
        coords = np.stack(np.unravel_index(self._flat, self.shape), axis=1)
        sums = np.add.reduceat(coords.astype(np.float64), self._offsets[:-1], axis=0)
        return sums / self.voxels[:, None]

    def any_in(self, mask) -> np.ndarray:
        """Whether each component has at least one voxel inside ``mask``."""
        mask = np.asarray(mask, dtype=bool)
        self._check_shape("mask", mask)
        if self.count == 0:
            return np.zeros(0, dtype=bool)
        inside = mask.reshape(-1)[self._flat].astype(np.int64)
        return np.add.reduceat(inside, self._offsets[:-1]) > 0


def _occupied_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    # The smallest box holding every True voxel; labelling only that box gives
    # the same labels (raster order is preserved by cropping) at a fraction of
    # the cost, since probability maps are almost empty.
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def find_components(mask) -> Components:
    """Label ``mask`` with full connectivity (26 neighbours in 3-D).

    Labels come in raster order, as ``skimage.measure.label`` (the original's
    ``neighbors=8``) numbers them.

    Parameters
    ----------
    mask : ndarray of bool
        Candidate voxels, e.g. ``above_threshold(prob, 0.5)``.
    """
    mask = np.asarray(mask, dtype=bool)
    ndim = mask.ndim
    box = _occupied_box(mask)
    if box is None:
        empty = np.zeros((0, ndim), dtype=np.int64)
        return Components(mask.shape, 0, np.zeros(0, dtype=np.int64), empty, empty.copy(),
                          np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64))
    origin = np.array([s.start for s in box], dtype=np.int64)
    labels, count = ndi.label(mask[box], structure=np.ones((3,) * ndim, dtype=bool))
    local = np.flatnonzero(labels)
    owner = labels.reshape(-1)[local]
    # A stable sort keeps the raster order of the voxels within each label.
    order = np.argsort(owner, kind="stable")
    local, owner = local[order], owner[order]
    coords = np.unravel_index(local, labels.shape)
    flat = np.ravel_multi_index(tuple(c + o for c, o in zip(coords, origin)), mask.shape)
    voxels = np.bincount(owner, minlength=count + 1)[1:].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(voxels)]).astype(np.int64)
    boxes = ndi.find_objects(labels, max_label=count)
    start = np.array([[s.start for s in b] for b in boxes], dtype=np.int64).reshape(count, ndim)
    stop = np.array([[s.stop for s in b] for b in boxes], dtype=np.int64).reshape(count, ndim)
    return Components(mask.shape, int(count), voxels, start + origin, stop + origin,
                      flat.astype(np.int64), offsets)


def pix_to_hu(pix) -> np.ndarray:
    """The original's ``pix_to_hu``: ``(pix + 0.028) * 1400 - 1000`` in float32.

    Each operation rounds to float32 (a float32 array with Python floats), so
    the result is not always the integer HU the pixel came from (§6).
    """
    pix = np.asarray(pix)
    if pix.dtype != np.float32:
        raise TypeError(f"pix must be float32 normalised pixels, got dtype {pix.dtype!r}")
    return ((pix + np.float32(_PIXEL_MEAN)) * np.float32(_MAX_BOUND - _MIN_BOUND)
            + np.float32(_MIN_BOUND))


def legacy_hu(hu) -> np.ndarray:
    """HU as the original's features saw them: ``pix_to_hu(normalize_hu(hu))``.

    Clipped to [-1000, 400] by the normalisation and float32.
    """
    return pix_to_hu(normalize_hu(hu))


def _mean32(a: np.ndarray) -> np.float32:
    # NumPy 1.x: float32 pairwise sum, then float32(float64 division by n).
    return np.float32(np.float64(np.add.reduce(a, dtype=np.float32)) / a.size)


def _central_moment32(a: np.ndarray, order: int) -> np.float32:
    # scipy 0.19 ``_moment``: deviations from the float32 mean, powers by
    # squaring in float32, then the float32 mean.
    dev = a - _mean32(a)
    if order == 2:
        s = dev * dev
    elif order == 3:
        s = dev * dev
        s = s * dev
    elif order == 4:
        s = dev * dev
        s = s * s
    else:  # pragma: no cover - only 2, 3, 4 are used
        raise ValueError(f"order must be 2, 3 or 4, got {order!r}")
    return _mean32(s)


def describe_legacy(values) -> dict[str, float]:
    """The original's ``hu_describe``: ``scipy.stats.describe`` of 2017, float32.

    Parameters
    ----------
    values : ndarray of float32
        HU values (``pix_to_hu`` output), in the order the original had them.

    Returns
    -------
    dict
        ``vol`` (count), ``min``, ``max``, ``mean``, ``variance`` (ddof 1),
        ``skewness`` (float32, ``m3 / m2**1.5``), ``kurtosis`` (``m4 / m2**2 - 3``
        in float64 from the float32 moments); ``m2 == 0`` gives skewness 0 and
        kurtosis -3; an empty selection gives -7777 for all seven.
    """
    a = np.asarray(values)
    if a.dtype != np.float32:
        raise TypeError(f"values must be float32 as in the original, got dtype {a.dtype!r}")
    a = a.reshape(-1)
    n = a.size
    if n == 0:
        return {name: MISSING for name in HU_STAT_NAMES}
    mean = _mean32(a)
    # np.var in NumPy 1.x: float32 array division for the mean it subtracts.
    dev = a - np.divide(np.add.reduce(a, dtype=np.float32, keepdims=True), np.float32(n))
    ss = np.add.reduce(dev * dev, dtype=np.float32)
    variance = np.float32(np.float64(ss) / (n - 1)) if n > 1 else np.float32(np.nan)
    m2 = _central_moment32(a, 2)
    m3 = _central_moment32(a, 3)
    m4 = _central_moment32(a, 4)
    if m2 == 0:
        skewness = np.float32(0.0)
        kurtosis = -3.0
    else:
        skewness = np.float32(m3 / (m2 ** np.float32(1.5)))
        kurtosis = float(np.float64(m4) / np.float64(m2) ** 2.0) - 3.0
    return {"vol": int(n), "min": a.min(), "max": a.max(), "mean": mean,
            "variance": variance, "skewness": skewness, "kurtosis": kurtosis}


def describe_hu(values) -> dict[str, float]:
    """HU statistics in float64 (the nodule table's, no legacy rounding).

    ``min, max, mean``, ``variance`` (ddof 1; NaN for one voxel), ``skewness``
    and ``kurtosis`` (Fisher, biased: ``scipy.stats.describe`` defaults).
    Empty input gives NaN.
    """
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    n = a.size
    if n == 0:
        return {name: np.nan for name in HU_STAT_NAMES[1:]}
    mean = a.mean()
    dev = a - mean
    m2 = np.mean(dev ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        skewness = np.mean(dev ** 3) / m2 ** 1.5 if m2 > 0 else 0.0
        kurtosis = np.mean(dev ** 4) / m2 ** 2 - 3.0 if m2 > 0 else -3.0
    return {"min": a.min(), "max": a.max(), "mean": mean,
            "variance": a.var(ddof=1) if n > 1 else np.nan,
            "skewness": float(skewness), "kurtosis": float(kurtosis)}


def legacy_diameter(voxels, voxel_volume_mm3: float = 8) -> np.ndarray:
    """The original's diameter: ``2 * (3 V / 4 pi) ** 0.3333`` (quirk: 0.3333).

    ``V = voxels * 8`` mm³ on the nominal 2 mm grid.
    """
    volume = np.asarray(voxels) * voxel_volume_mm3
    base = np.asarray(3 * volume / (4 * np.pi), dtype=np.float64)
    # libm's pow per value, as the original's 2017 numpy computed it: numpy >= 2's SIMD pow on arrays
    # differs by one ulp for some volumes (e.g. 12 voxels), which changes exported diameters.
    powered = np.array([math.pow(float(b), 0.3333) for b in base.ravel()], dtype=np.float64).reshape(base.shape)
    return 2 * powered


def sphere_diameter(volume_mm3) -> np.ndarray:
    """Diameter (mm) of the sphere of the given volume (exponent exactly 1/3)."""
    return 2 * np.cbrt(3 * np.asarray(volume_mm3, dtype=np.float64) / (4 * np.pi))


def box_shape(extents, diameter) -> dict[str, np.ndarray]:
    """Shape measures of bounding boxes, as the original defined them.

    Parameters
    ----------
    extents : ndarray, shape (n, 3)
        Box sizes along (z, y, x) in mm.
    diameter : ndarray, shape (n,)
        Equivalent diameters (mm).

    Returns
    -------
    dict
        ``irreg_vol`` = geometric mean of the extents / diameter,
        ``irreg_shape`` = population variance of the extents,
        ``aspect`` = min / max extent, ``aspect_xy`` = the same on (y, x).
    """
    extents = np.asarray(extents, dtype=np.float64).reshape(-1, 3)
    diameter = np.asarray(diameter, dtype=np.float64).reshape(-1)
    gmean = np.exp(np.mean(np.log(extents), axis=1))
    return {
        "irreg_vol": gmean / diameter,
        "irreg_shape": np.var(extents, axis=1),
        "aspect": extents.min(axis=1) / extents.max(axis=1),
        "aspect_xy": extents[:, 1:].min(axis=1) / extents[:, 1:].max(axis=1),
    }


def passes_dsb_filter(hu_per_component, voxels) -> np.ndarray:
    """The original's nodule filter: mean HU < 396 and diameter > 3 mm.

    Parameters
    ----------
    hu_per_component : sequence of float32 arrays
        Each component's HU as the original saw them (:func:`pix_to_hu` of
        the normalised pixels, i.e. :func:`legacy_hu` of integer HU).
    voxels : ndarray of int
        Voxel counts; the diameter is :func:`legacy_diameter` (0.3333
        exponent, nominal 8 mm³ voxels), as in the original.
    """
    mean_hu = np.array([np.asarray(values).mean() for values in hu_per_component],
                       dtype=np.float32)
    diameter = legacy_diameter(np.asarray(voxels))
    return (mean_hu < DSB_MAX_MEAN_HU) & (diameter > DSB_MIN_DIAMETER_MM)
