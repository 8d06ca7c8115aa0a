"""Resampling to 2 x 2 x 2 mm, whole-volume and as a lazy chunked dask stage.

docs/algorithms.md §2: ``new_shape = round(shape * spacing / 2)``, then a cubic
spline ``zoom`` to ``new_shape / shape`` with the 2017 scipy boundary, which is
``mode='mirror'`` on today's scipy, output int16.

The spline prefilter is global along each axis. The chunked version works per
output chunk (as dask-image's ``affine_transform`` does): it takes the input
slices the chunk needs plus a halo, prefilters that window and evaluates the
spline there. The prefilter's influence decays as ``|z|**k`` with the cubic
pole ``z = sqrt(3) - 2``, so the halo depth follows from the tolerance.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from lungzarr.volume import TARGET_SPACING_MM, Grid, resample_grid, resampled_shape, z_chunks

__all__ = ["resample_to_2mm_numpy", "resample_to_2mm", "spline_halo_depth", "nearest_on_axes"]

_CUBIC_POLE = math.sqrt(3.0) - 2.0
#: Largest HU span a CT volume has (-2048 .. 3071 for 12-bit data, with margin).
_HU_RANGE = 6000.0


def spline_halo_depth(*, tolerance_hu: float = 0.01, value_range: float = _HU_RANGE) -> int:
    """Input slices of halo a chunked cubic-spline prefilter needs.

    A window edge perturbs the prefiltered coefficients by at most
    ``value_range * |pole|**k`` at ``k`` slices from the edge; the spline
    support adds 2 slices. ``tolerance_hu=0.01`` gives 13 slices.
    """
    if tolerance_hu <= 0:
        raise ValueError(f"tolerance_hu must be positive, got {tolerance_hu!r}")
    k = math.log(tolerance_hu / value_range) / math.log(abs(_CUBIC_POLE))
    return int(math.ceil(k)) + 2


def _check_volume(hu, grid: Grid):
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3-D (z, y, x) volume, got shape {hu.shape!r}")
    if tuple(hu.shape) != tuple(grid.shape):
        raise ValueError(f"hu shape {tuple(hu.shape)!r} does not match grid shape {grid.shape!r}")


def resample_to_2mm_numpy(hu: np.ndarray, grid: Grid, *, target: float = TARGET_SPACING_MM):
    """Whole-volume resampling exactly as the original (in memory).

    Returns
    -------
    hu_2mm : ndarray of int16
    grid_2mm : Grid
        The true (corner-aligned) grid of the output.
    """
    _check_volume(hu, grid)
    new_shape = resampled_shape(hu.shape, grid.spacing, target)
    real_factor = np.asarray(new_shape, dtype=np.float64) / np.asarray(hu.shape, dtype=np.float64)
    out = ndimage.zoom(np.asarray(hu), real_factor, mode="mirror", order=3)
    return out.astype(np.int16, copy=False), resample_grid(grid, out.shape)


def _zoom_slices_yx(block, *, out_yx):
    """Cubic-spline zoom of each slice in y and x, kept in float64 (no rounding yet)."""
    factors = (out_yx[0] / block.shape[1], out_yx[1] / block.shape[2])
    out = np.empty((block.shape[0],) + tuple(out_yx), dtype=np.float64)
    for k in range(block.shape[0]):
        ndimage.zoom(block[k], factors, output=out[k], order=3, mode="mirror")
    return out


def _mirror_index(idx: np.ndarray, n: int) -> np.ndarray:
    """scipy's 'mirror' boundary for coefficient indices (-1 -> 1, n -> n - 2)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def _cubic_bspline_weights(t: np.ndarray) -> np.ndarray:
    """Weights of coefficients floor(p)-1 .. floor(p)+2 at fraction ``t`` (shape (4, n))."""
    t2, t3 = t * t, t * t * t
    return np.stack([(1 - t) ** 3 / 6.0, (4.0 - 6.0 * t2 + 3.0 * t3) / 6.0,
                     (1.0 + 3.0 * t + 3.0 * t2 - 3.0 * t3) / 6.0, t3 / 6.0])


def _round_half_away_to_int16(values: np.ndarray) -> np.ndarray:
    # scipy's integer output of geometric transforms: add +-0.5, then truncate.
    return np.trunc(values + np.copysign(0.5, values)).astype(np.int16)


def _zoom_window_z(window, *, positions, window_start, n_total):
    """Cubic-spline interpolation along z of a y/x-resampled float64 window.

    ``positions`` are the global input z positions of the output slices; the
    window holds input slices ``window_start ...``. Mirror boundaries apply only
    where the window reaches the volume's ends; elsewhere the halo absorbs the
    prefilter's edge effect.
    """
    coeffs = ndimage.spline_filter1d(window, order=3, axis=0, output=np.float64, mode="mirror")
    positions = np.asarray(positions, dtype=np.float64)
    base = np.floor(positions).astype(np.int64)
    weights = _cubic_bspline_weights(positions - base)
    out = np.zeros((len(positions),) + window.shape[1:], dtype=np.float64)
    for j, offset in enumerate((-1, 0, 1, 2)):
        idx = _mirror_index(base + offset, n_total) - window_start
        out += weights[j][:, None, None] * coeffs[idx]
    return _round_half_away_to_int16(out)


def resample_to_2mm(hu, grid: Grid, *, target: float = TARGET_SPACING_MM, chunk_slices: int = 16,
                    halo: int | None = None):
    """Lazy, chunked resampling of a dask volume to 2 mm.

    Parameters
    ----------
    hu : dask.array.Array
        int16 HU, (z, y, x), chunked along z (y and x whole).
    grid : Grid
        Native grid of ``hu``.
    target : float, optional
        Target spacing in mm.
    chunk_slices : int, optional
        Output slices per chunk.
    halo : int, optional
        Input slices added on both sides of each window; default from
        :func:`spline_halo_depth`.

    Returns
    -------
    hu_2mm : dask.array.Array of int16
    grid_2mm : Grid
    """
    import dask.array as da

    _check_volume(hu, grid)
    hu = da.asarray(hu)
    halo = spline_halo_depth() if halo is None else int(halo)
    if halo < 2:
        raise ValueError(f"halo must be >= 2 slices (the cubic spline's support), got {halo!r}")
    new_shape = resampled_shape(hu.shape, grid.spacing, target)
    if min(new_shape) < 1:
        raise ValueError(f"volume of shape {hu.shape!r} resamples to an empty shape {new_shape!r}")
    n_in = hu.shape[0]
    # y/x first, slice by slice (no halo: y and x are whole in every chunk); the
    # tensor-product spline makes this equal to the 3-D zoom up to rounding.
    hu = hu.rechunk({1: -1, 2: -1})
    zoomed_yx = hu.map_blocks(_zoom_slices_yx, out_yx=tuple(new_shape[1:]),
                              chunks=(hu.chunks[0], (new_shape[1],), (new_shape[2],)),
                              dtype=np.float64, meta=np.empty((0, 0, 0), dtype=np.float64))
    # zoom's corner-aligned mapping: output k sits at input k * (n_in - 1) / (n_out - 1).
    step_z = (n_in - 1) / (new_shape[0] - 1) if new_shape[0] > 1 else 0.0
    blocks = []
    k0 = 0
    for size in z_chunks(new_shape[0], chunk_slices):
        positions = np.arange(k0, k0 + size, dtype=np.float64) * step_z
        w0 = max(0, int(math.floor(positions[0])) - halo)
        w1 = min(n_in, int(math.floor(positions[-1])) + 3 + halo)
        window = zoomed_yx[w0:w1].rechunk({0: -1})
        out_shape = (size, new_shape[1], new_shape[2])
        blocks.append(window.map_blocks(
            _zoom_window_z, positions=positions, window_start=w0, n_total=n_in,
            chunks=out_shape, dtype=np.int16, meta=np.empty((0, 0, 0), dtype=np.int16)))
        k0 += size
    out = da.concatenate(blocks, axis=0)
    return out, resample_grid(grid, new_shape)


def nearest_on_axes(values, src_axes, dst_axes) -> np.ndarray:
    """``values`` (a mask or label image) at other voxel centres, by nearest neighbour in millimetres.

    For putting the 2 mm grid's masks on the native grid (e.g. the source
    images' pixel grid of a DICOM SEG): labels stay labels (no interpolation
    invents a value), and each target voxel takes the value of the source voxel
    whose centre is nearest along each axis; a tie goes to the higher index.

    Parameters
    ----------
    values : ndarray, (z, y, x)
        On a regular grid whose voxel-centre coordinates (mm) along each axis are ``src_axes``.
    src_axes, dst_axes : three 1-D arrays each
        Voxel-centre coordinates (mm) of the source and the target grid along z, y, x (the store's
        ``z2, y2, x2`` and ``z, y, x`` coordinates). The target may be irregular (native slice positions).

    Raises
    ------
    ValueError
        When a target centre lies more than half a source voxel outside the source grid: the two grids
        do not cover the same patient space, so nearest neighbour would repeat an edge value there.
    """
    values = np.asarray(values)
    if values.ndim != len(src_axes) or len(src_axes) != len(dst_axes):
        raise ValueError(f"values is {values.ndim}-D with {len(src_axes)} source and {len(dst_axes)} target axes")
    index = []
    for axis, (src, dst) in enumerate(zip(src_axes, dst_axes)):
        src = np.asarray(src, dtype=np.float64)
        dst = np.asarray(dst, dtype=np.float64)
        if src.shape != (values.shape[axis],):
            raise ValueError(f"axis {axis}: {src.size} source coordinates for {values.shape[axis]} voxels")
        if src.size == 1:
            step = 1.0
            t = np.zeros_like(dst)
        else:
            step = (src[-1] - src[0]) / (src.size - 1)
            t = (dst - src[0]) / step
        outside = (t < -0.5 - 1e-6) | (t > src.size - 0.5 + 1e-6)
        if src.size > 1 and outside.any():
            raise ValueError(f"axis {axis}: target centre {dst[outside][0]!r} mm is outside the source grid "
                             f"[{src[0]!r}, {src[-1]!r}] mm by more than half a voxel")
        index.append(np.clip(np.floor(t + 0.5), 0, src.size - 1).astype(np.intp))
    return values[np.ix_(*index)]
