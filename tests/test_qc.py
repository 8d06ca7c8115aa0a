"""QC pictures: three mid-planes with the lung mask outlined."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lungzarr.algorithms.segment import segment_lung_slices
from lungzarr.reports.qc import mid_planes, qc_figure


def _chest(shape=(24, 96, 96)):
    nz, ny, nx = shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-0.5, 0.5, ny), np.linspace(-0.5, 0.5, nx),
                             indexing="ij")
    body = (yy / 0.36) ** 2 + (xx / 0.45) ** 2 <= 1
    lungs = ((yy + 0.02) / 0.25) ** 2 + ((np.abs(xx) - 0.19) / 0.13) ** 2 + (zz / 1.3) ** 2 <= 1
    hu = np.where(body, 40, -1000)
    hu = np.where(lungs, -850, hu)
    return hu.astype(np.int16)


def _png_pixels(path):
    import matplotlib.image as mpimg

    return mpimg.imread(path)


def test_qc_png_is_written_and_not_blank(tmp_path):
    hu = _chest()
    lungs, _ = segment_lung_slices(hu)
    nodules = pd.DataFrame({"z_index": [12], "y_index": [45], "x_index": [30], "diameter_mm": [8.0]})
    path = qc_figure(hu, lungs, nodules=nodules, path=tmp_path / "sub" / "qc.png", title="phantom")
    assert path.exists()
    pixels = _png_pixels(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 300
    assert pixels[..., :3].var() > 0
    # The lung outline is drawn in red: some pixels are clearly red.
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
    assert red.sum() > 50


class _ReadCounter:
    """An array-like that counts the voxels dask reads from it (like a Zarr array)."""

    def __init__(self, array):
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.voxels_read = 0

    def __getitem__(self, index):
        out = self.array[index]
        self.voxels_read += np.size(out)
        return out


def test_qc_with_dask_reads_only_the_planes(tmp_path):
    import dask.array as da

    hu = _chest()
    lungs, _ = segment_lung_slices(hu)
    sources = [_ReadCounter(hu), _ReadCounter(lungs)]
    lazy = [da.from_array(s, chunks=(4, 96, 96)) for s in sources]
    path = qc_figure(*lazy, path=tmp_path / "qc.png")
    assert _png_pixels(path)[..., :3].var() > 0
    nz, ny, nx = hu.shape
    planes = ny * nx + nz * nx + nz * ny
    for source in sources:
        assert 0 < source.voxels_read <= planes, (source.voxels_read, planes, hu.size)


def test_mid_planes_shapes_and_xarray():
    xr = pytest.importorskip("xarray")
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    axial, coronal, sagittal = mid_planes(xr.DataArray(vol, dims=("z2", "y2", "x2")))
    np.testing.assert_array_equal(axial, vol[2])
    np.testing.assert_array_equal(coronal, vol[:, 2, :])
    np.testing.assert_array_equal(sagittal, vol[:, :, 3])


def test_qc_refuses_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="differ"):
        qc_figure(np.zeros((4, 30, 30), np.int16), np.zeros((4, 30, 31), bool), path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="diameter_mm"):
        qc_figure(np.zeros((4, 30, 30), np.int16), np.zeros((4, 30, 30), bool),
                  nodules=pd.DataFrame({"z_index": [1]}), path=tmp_path / "x.png")
