"""The DSB2017 crop box of a 2 mm volume (docs/algorithms.md §4), lazy cropped views, and the lung box.

:func:`lung_box` is the other box: the rows, columns and slices the d8
network predicts under ``--crop lungs`` (docs/algorithms.md §5).

The legacy rule decides from the bounding box of the whole lung mask whether
the segmented volume is cropped to a y/x square and in z, in z only, or not at
all. Its quirks are kept on purpose (old models were trained on its output):

* the "mask volume" ratio multiplies the z extent twice (``zlen * ylen * zlen``),
  so thin slabs fall through to "no crop";
* the y/x upper bound is compared with a literal 512, whatever the slice size;
* the y/x crop is a square ``[min(y0, x0):max(y1, x1)]`` on both axes.

The box is a small dict of plain ints and strings (it goes into the patient
group's attrs); :func:`crop_view` applies it lazily to numpy, dask or xarray
data, so no second copy of the voxels is stored.
"""
from __future__ import annotations

import numpy as np

__all__ = ["legacy_crop_box", "crop_view", "mask_bbox", "lung_box", "SPECK_SHARE"]

#: The rule's thresholds, as in the original.
MASK_VOLUME_MIN = 0.08
Z_RATIO_MIN = 0.6
Y_RATIO_MIN = 0.4
X_RATIO_MIN = 0.6
#: The original's hard-coded slice size in the y/x bound check (quirk).
LEGACY_SLICE_SIZE = 512

_XARRAY_DIMS_2MM = ("z2", "y2", "x2")

#: :func:`lung_box` drops the lung mask's connected components smaller than this share of the largest one
#: (specks of the per-slice segmentation: bowel gas, air outside the body, a few voxels at the trachea),
#: so they do not widen the box. On the RICORD slab it drops 4 of 5 components (the largest of them 3 % of the
#: lungs, in the first 21 slices): the box loses 14 slices and 40 rows (without it: every row of 180).
SPECK_SHARE = 0.05


def _axis_extent(profile: np.ndarray) -> tuple[int, int] | None:
    hits = np.flatnonzero(profile)
    if hits.size == 0:
        return None
    return int(hits[0]), int(hits[-1]) + 1


def _unwrap_xarray(arr):
    """The (numpy or dask) array under an xarray.DataArray, else ``arr`` itself."""
    if type(arr).__module__.startswith("xarray") and hasattr(arr, "variable"):
        return arr.data
    return arr


def mask_bbox(lungs) -> tuple[int, int, int, int, int, int] | None:
    """Bounding box ``(z0, y0, x0, z1, y1, x1)`` of all True voxels (stops exclusive).

    Equal to ``regionprops(mask.astype(int8))[0].bbox`` of the original (one
    label for the whole mask, connected or not). Only the three per-axis
    projections are computed, so a dask mask is reduced chunk by chunk and
    never held whole. Returns None for an empty mask.

    Parameters
    ----------
    lungs : (z, y, x) array of bool (numpy, dask or xarray)
    """
    data = _unwrap_xarray(lungs)
    if getattr(data, "ndim", None) != 3:
        raise ValueError(f"lungs must be a 3-D (z, y, x) mask, got shape {getattr(data, 'shape', None)!r}")
    if hasattr(data, "dask"):
        import dask

        projections = dask.compute(data.any(axis=(1, 2)), data.any(axis=(0, 2)), data.any(axis=(0, 1)))
    else:
        data = np.asarray(data)
        projections = (data.any(axis=(1, 2)), data.any(axis=(0, 2)), data.any(axis=(0, 1)))
    extents = [_axis_extent(np.asarray(p)) for p in projections]
    if any(e is None for e in extents):
        return None
    (z0, z1), (y0, y1), (x0, x1) = extents
    return z0, y0, x0, z1, y1, x1


def legacy_crop_box(lungs) -> dict:
    """The DSB2017 ``_crop`` rule for a lung mask (docs/algorithms.md §4).

    Parameters
    ----------
    lungs : (z, y, x) array of bool (numpy, dask or xarray)
        The lung filter of the whole 2 mm volume. A dask mask is reduced to
        its three axis projections; the volume itself is not computed whole.

    Returns
    -------
    box : dict
        ``z0, z1, y0, y1, x0, x1`` (ints, stops exclusive, within ``shape``):
        the view to take; ``rule``: ``"yx"`` (square y/x crop and z crop),
        ``"z"`` (z only) or ``"none"``; ``reason``: why; ``shape``: the shape
        the box applies to; ``bbox``: the mask's ``[z0, y0, x0, z1, y1, x1]``
        or None for an empty mask (the original crashed there); ``ratios``:
        the figures the rule compared. Plain ints, floats, strings and lists,
        so the dict can be stored as JSON attrs.
    """
    shape = tuple(int(n) for n in getattr(lungs, "shape", ()))
    bbox = mask_bbox(lungs)
    nz, ny, nx = shape
    box = {"z0": 0, "z1": nz, "y0": 0, "y1": ny, "x0": 0, "x1": nx, "rule": "none",
           "shape": list(shape), "bbox": None, "ratios": None}
    if bbox is None:
        box["reason"] = "empty lung mask: nothing to crop to (the original crashed here)"
        return box
    z0, y0, x0, z1, y1, x1 = bbox
    zlen, ylen, xlen = z1 - z0, y1 - y0, x1 - x0
    bxy_min = min(y0, x0)
    bxy_max = max(y1, x1)
    # Quirk: zlen twice (kept: it sends thin slabs to "no crop").
    mask_volume = zlen * ylen * zlen / (nz * ny * nx)
    ratios = {"mask_volume": mask_volume, "z": zlen / nz, "y": ylen / ny, "x": xlen / nx}
    box["bbox"] = [z0, y0, x0, z1, y1, x1]
    box["ratios"] = ratios
    # Quirk: the literal 512 whatever the slice size.
    inside = bxy_min > 0 and bxy_max < LEGACY_SLICE_SIZE
    z_ok = inside and mask_volume > MASK_VOLUME_MIN and ratios["z"] > Z_RATIO_MIN
    if z_ok and ratios["y"] > Y_RATIO_MIN and ratios["x"] > X_RATIO_MIN:
        # A square on y and x; slicing clips the stop to the axis length.
        box.update(z0=z0, z1=z1, y0=bxy_min, y1=min(bxy_max, ny), x0=bxy_min, x1=min(bxy_max, nx),
                   rule="yx", reason="lung box large enough: z crop and square y/x crop")
    elif z_ok:
        box.update(z0=z0, z1=z1, rule="z",
                   reason="lung box too small in y or x for a y/x crop: z crop only")
    else:
        box["reason"] = ("lung box touches the y/x edge, or covers too little of the volume "
                         "(mask volume <= 0.08 or z ratio <= 0.6): no crop")
    return box


def _check_box(box: dict, shape) -> tuple[slice, slice, slice]:
    missing = [k for k in ("z0", "z1", "y0", "y1", "x0", "x1") if k not in box]
    if missing:
        raise ValueError(f"box lacks {missing!r}; make it with legacy_crop_box()")
    expected = box.get("shape")
    if expected is not None and tuple(expected) != tuple(shape):
        raise ValueError(f"box was made for shape {tuple(expected)!r} but the array has shape "
                         f"{tuple(shape)!r}; compute the box on this array's grid")
    return (slice(box["z0"], box["z1"]), slice(box["y0"], box["y1"]), slice(box["x0"], box["x1"]))


def crop_view(arr, box: dict, *, dims=None):
    """The cropped view of a (z, y, x) array, without copying.

    Parameters
    ----------
    arr : numpy.ndarray, dask.array.Array, xarray.DataArray or xarray.Dataset
        Volume(s) on the grid ``box`` was made for. For a DataArray the last
        three dims are cropped; for a Dataset the dims named by ``dims``.
    box : dict
        From :func:`legacy_crop_box`.
    dims : sequence of 3 str, optional
        Dataset dims to crop, default ``("z2", "y2", "x2")`` (the 2 mm grid
        of the patient group; the native ``hu`` is left as it is).

    Returns
    -------
    The same kind of object, sliced (a numpy view, a lazy dask slice, or an
    xarray object with its coordinates cropped too).
    """
    try:
        import xarray as xr
    except ImportError:  # pragma: no cover - xarray is a dependency
        xr = None
    if xr is not None and isinstance(arr, xr.Dataset):
        dims = tuple(dims or _XARRAY_DIMS_2MM)
        absent = [d for d in dims if d not in arr.sizes]
        if len(dims) != 3 or absent:
            raise ValueError(f"dims must name 3 dims of the Dataset, got {dims!r} "
                             f"(absent: {absent!r}; the Dataset has {tuple(arr.sizes)!r})")
        slices = _check_box(box, tuple(arr.sizes[d] for d in dims))
        return arr.isel(dict(zip(dims, slices)))
    if xr is not None and isinstance(arr, xr.DataArray):
        dims = tuple(dims or arr.dims[-3:])
        if len(dims) != 3 or any(d not in arr.dims for d in dims):
            raise ValueError(f"dims must name 3 dims of the DataArray, got {dims!r} (it has {arr.dims!r})")
        slices = _check_box(box, tuple(arr.sizes[d] for d in dims))
        return arr.isel(dict(zip(dims, slices)))
    if getattr(arr, "ndim", None) != 3:
        raise ValueError(f"arr must be a 3-D (z, y, x) array, got shape {getattr(arr, 'shape', None)!r}")
    return arr[_check_box(box, arr.shape)]


def lung_box(lungs, *, margin: int | None = None, speck_share: float = SPECK_SHARE) -> dict:
    """The d8 network's prediction box of one patient under ``--crop lungs`` (docs/algorithms.md §5).

    The lung mask's 26-connected components smaller than ``speck_share`` of
    the largest are dropped; the box is the bounding box of the rest, widened
    by :func:`lungzarr.model.geometry.box_around` (``margin`` rows and columns,
    aligned to the detection crop's multiples of 4; slices whose window holds
    a lung slice). With the default margin
    (:data:`lungzarr.model.geometry.LUNG_BOX_MARGIN`, the network's reach) every
    voxel of the kept components gets the fixed crop's prediction exactly.

    Parameters
    ----------
    lungs : (z, y, x) array of bool
        The 2 mm lung mask (``lungs`` of stage segment), numpy or dask (computed
        whole: it is small, and the components need all of it).
    margin : int, optional
        Rows/columns beyond the lungs; default ``LUNG_BOX_MARGIN``.
    speck_share : float, optional
        Components below this share of the largest one are ignored.

    Returns
    -------
    dict
        ``z``, ``y``, ``x``: ``[start, stop]`` of the box (as
        :func:`lungzarr.model.geometry.fixed_box`); ``crop``: ``"lungs"``, or
        ``"fixed"`` when the mask is empty (then the box is the fixed crop's
        and ``reason`` says so); ``lung_bbox`` (``[z0, y0, x0, z1, y1, x1]`` of
        the kept components, or None), ``margin``, ``components``,
        ``dropped_components`` and ``dropped_voxels``. Plain ints, lists and
        strings: it goes into the stage record and the array's attrs.
    """
    from lungzarr.algorithms.components import find_components
    from lungzarr.model.geometry import LUNG_BOX_MARGIN, box_around, fixed_box

    margin = LUNG_BOX_MARGIN if margin is None else margin
    if not 0 <= float(speck_share) <= 1:
        raise ValueError(f"speck_share must be within [0, 1], got {speck_share!r}")
    mask = np.asarray(_unwrap_xarray(lungs), dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"lungs must be a 3-D (z, y, x) mask, got shape {mask.shape!r}")
    comps = find_components(mask)  # 26-connected, with each component's voxels and bounding box
    sizes = comps.voxels
    out = {"crop": "lungs", "margin": int(margin), "speck_share": float(speck_share), "components": int(comps.count),
           "dropped_components": 0, "dropped_voxels": 0, "lung_bbox": None}
    if comps.count == 0:
        out.update(fixed_box(mask.shape), crop="fixed",
                   reason="the lung mask is empty: the whole detection crop is predicted (--crop fixed)")
        return out
    small = sizes < float(speck_share) * sizes.max()
    out.update(dropped_components=int(small.sum()), dropped_voxels=int(sizes[small].sum()))
    # The kept components' bounding box is the union of their own boxes.
    bbox = (*comps.start[~small].min(axis=0), *comps.stop[~small].max(axis=0))
    out["lung_bbox"] = [int(v) for v in bbox]
    out.update(box_around(bbox, mask.shape, margin=margin))
    return out
