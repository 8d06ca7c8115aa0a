"""Lung segmentation (docs/algorithms.md §3): exact against an OpenCV reference, lazy as a dask stage."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from lungzarr.algorithms import segment
from lungzarr.algorithms.segment import (
    OUTSIDE_LUNG_HU,
    blackhat_footprint,
    blackhat_iterations,
    close_outline,
    segment_lung_slice,
    segment_lung_slices,
    segment_lungs,
)
from lungzarr.volume import rescale_n

from conftest import LIDC_DIR, RICORD_DIR, shared_path

cv2 = pytest.importorskip("cv2")


# --- a straight per-slice reference, as the original ran it (OpenCV black-hat) ---

_PATTERN_7 = [[0, 0, 1, 1, 1, 0, 0],
              [0, 1, 1, 1, 1, 1, 0],
              [1, 1, 1, 1, 1, 1, 1],
              [1, 1, 1, 1, 1, 1, 1],
              [1, 1, 1, 1, 1, 1, 1],
              [0, 1, 1, 1, 1, 1, 0],
              [0, 0, 1, 1, 1, 0, 0]]


def reference_lungfilter(image: np.ndarray) -> np.ndarray:
    """``seperate_lungs_cv2`` step by step, with ``cv2.morphologyEx(MORPH_BLACKHAT)``."""
    from skimage import measure, morphology, segmentation

    width = image.shape[1]
    framed = image.copy()
    framed[:, 0] = -1024
    framed[:, 1:9] = 0
    framed[:, width - 1:width] = -1024
    framed[:, width - 9:width - 1] = 0
    internal = segmentation.clear_border(framed < -400, buffer_size=0)
    labels = measure.label(internal)
    areas = sorted(r.area for r in measure.regionprops(labels))
    if len(areas) > 2:
        for region in measure.regionprops(labels):
            if region.area < areas[-2]:
                labels[tuple(region.coords.T)] = 0
    internal = labels > 0
    external = ndimage.binary_dilation(internal, iterations=55) ^ ndimage.binary_dilation(internal, iterations=10)
    markers = np.zeros(internal.shape, dtype=np.int64)
    markers += internal * 255
    markers += external * 128
    reduce_factor = 512 / image.shape[0]
    gradient = np.hypot(ndimage.sobel(image, 1), ndimage.sobel(image, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        gradient *= 255.0 / np.max(gradient)
    basins = segmentation.watershed(gradient, markers)
    outline = ndimage.morphological_gradient(basins, size=(3, 3)).astype(bool)
    kernel = ndimage.iterate_structure(_PATTERN_7, rescale_n(8, reduce_factor)).astype(np.uint8)
    outline += cv2.morphologyEx(outline.astype(np.uint8), cv2.MORPH_BLACKHAT, kernel=kernel).astype(bool)
    lungfilter = internal | outline
    small = ndimage.binary_closing(lungfilter, structure=morphology.disk(2), iterations=3)
    large = ndimage.binary_closing(lungfilter, structure=morphology.disk(rescale_n(7, reduce_factor)),
                                   iterations=3)
    return small | large


# --- synthetic chest slices ---

def synthetic_chest_slice(size: int = 180, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Air outside, a soft-tissue body ellipse, two lungs at -850 HU, noise. Returns (hu, true lungs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    body = (yy / 0.36) ** 2 + (xx / 0.45) ** 2 <= 1
    lungs = (((yy + 0.02) / 0.25) ** 2 + ((np.abs(xx) - 0.19) / 0.13) ** 2) <= 1
    hu = np.where(body, 40.0, -1000.0)
    hu = np.where(lungs, -850.0, hu) + rng.normal(0, 15, hu.shape)
    return np.round(hu).astype(np.int16), lungs


@pytest.mark.parametrize("size", [180, 256, 512])
def test_synthetic_slice_finds_both_lungs(size):
    hu, truth = synthetic_chest_slice(size)
    lungfilter = segment_lung_slice(hu)
    assert lungfilter.dtype == bool and lungfilter.shape == hu.shape
    overlap = (lungfilter & truth).sum() / (lungfilter | truth).sum()
    assert overlap > 0.9, overlap
    # The air around the body is never lung.
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    outside_body = (yy / 0.40) ** 2 + (xx / 0.49) ** 2 > 1
    assert not (lungfilter & outside_body).any()


@pytest.mark.parametrize("size", [180, 256, 512])
def test_synthetic_slice_matches_opencv_reference(size):
    hu, _ = synthetic_chest_slice(size, seed=size)
    np.testing.assert_array_equal(segment_lung_slice(hu), reference_lungfilter(hu))


def test_size_scaling_follows_512_over_rows():
    # rescale_n(8, 512/H) iterations of the 7x7 pattern: 6n+1 wide.
    assert blackhat_iterations(512) == 8 and blackhat_footprint(512).shape == (49, 49)
    assert blackhat_iterations(256) == 4 and blackhat_footprint(256).shape == (25, 25)
    assert blackhat_iterations(168) == 3 and blackhat_footprint(168).shape == (19, 19)
    assert blackhat_iterations(64) == 1 and blackhat_footprint(64).shape == (7, 7)


@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 8])
def test_close_outline_equals_outline_or_opencv_blackhat(iterations):
    # Random outlines with pixels on the border: the decomposed closing must
    # equal OpenCV's black-hat union with the full iterated footprint.
    rng = np.random.default_rng(iterations)
    outline = rng.random((120, 97)) < 0.04
    outline[:, 0] |= rng.random(120) < 0.3
    outline[-1, :] |= rng.random(97) < 0.3
    kernel = ndimage.iterate_structure(_PATTERN_7, iterations).astype(np.uint8)
    expected = outline | cv2.morphologyEx(outline.astype(np.uint8), cv2.MORPH_BLACKHAT,
                                          kernel=kernel).astype(bool)
    np.testing.assert_array_equal(close_outline(outline, iterations), expected)


def test_uniform_slice_gives_empty_mask_without_warnings():
    for value in (-1000, 40):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lungfilter = segment_lung_slice(np.full((64, 64), value, dtype=np.int16))
        assert not lungfilter.any()


def test_bad_slices_are_refused():
    with pytest.raises(TypeError, match="int16"):
        segment_lung_slice(np.zeros((64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        segment_lung_slice(np.zeros((2, 64, 64), dtype=np.int16))
    with pytest.raises(ValueError, match="too small"):
        segment_lung_slice(np.zeros((10, 64), dtype=np.int16))
    with pytest.raises(ValueError, match="3-D"):
        segment_lung_slices(np.zeros((64, 64), dtype=np.int16))
    with pytest.raises(TypeError, match="int16"):
        segment_lungs(np.zeros((2, 64, 64), dtype=np.int32))


def test_segment_lung_slices_outputs():
    block = np.stack([synthetic_chest_slice(120, seed=k)[0] for k in range(3)])
    lungs, segmented = segment_lung_slices(block)
    assert lungs.dtype == bool and segmented.dtype == np.int16
    assert lungs.any()
    np.testing.assert_array_equal(lungs[1], segment_lung_slice(block[1]))
    np.testing.assert_array_equal(segmented[lungs], block[lungs])
    assert (segmented[~lungs] == OUTSIDE_LUNG_HU).all()


# --- the dask stage ---

def test_dask_stage_is_lazy_and_equals_the_slice_loop(monkeypatch):
    import dask
    import dask.array as da
    from dask.callbacks import Callback

    volume = np.stack([synthetic_chest_slice(100, seed=k)[0] for k in range(7)])
    calls = []
    original = segment.segment_lung_slice

    def counting(slice_hu):
        calls.append(1)
        return original(slice_hu)

    monkeypatch.setattr(segment, "segment_lung_slice", counting)
    tasks_run = []
    with Callback(pretask=lambda key, dsk, state: tasks_run.append(key)):
        hu = da.from_array(volume, chunks=(3, 50, 60))
        lungs, segmented = segment_lungs(hu)
    assert calls == [] and tasks_run == []
    assert lungs.dtype == bool and segmented.dtype == np.int16
    assert lungs.chunks == ((3, 3, 1), (100,), (100,))
    assert isinstance(lungs._meta, np.ndarray)

    lungs_np, segmented_np = dask.compute(lungs, segmented, scheduler="sync")
    # Computing both runs the per-slice function once per slice.
    assert len(calls) == volume.shape[0]
    expected_lungs, expected_segmented = segment_lung_slices(volume)
    np.testing.assert_array_equal(lungs_np, expected_lungs)
    np.testing.assert_array_equal(segmented_np, expected_segmented)


def test_dask_stage_reads_only_its_chunk():
    import dask.array as da

    volume = np.stack([synthetic_chest_slice(80, seed=k)[0] for k in range(6)])
    shapes = []

    def probe(block):
        shapes.append(block.shape)
        return block

    hu = da.from_array(volume, chunks=(2, 80, 80)).map_blocks(probe, dtype=np.int16,
                                                                meta=np.empty((0, 0, 0), np.int16))
    lungs, _ = segment_lungs(hu)
    lungs[2:4].compute(scheduler="sync")
    assert shapes == [(2, 80, 80)]


# --- exactness on the real fixtures, every slice after 2 mm resampling ---

def _hu_2mm(folder):
    from dicom_phantoms import fixture_hu_2mm

    return fixture_hu_2mm(str(shared_path(folder)))[0]  # decoded and zoomed once per session, read-only


@pytest.mark.requires_shared
@pytest.mark.parametrize("folder", [LIDC_DIR, RICORD_DIR], ids=["LIDC-IDRI-0001", "RICORD-1A"])
def test_real_fixture_masks_equal_opencv_reference_on_every_slice(folder, record_property):
    hu_2mm = _hu_2mm(folder)
    ours = np.stack([segment_lung_slice(s) for s in hu_2mm])
    reference = np.stack([reference_lungfilter(s) for s in hu_2mm])
    identical = float((ours == reference).mean())
    record_property("identical_voxel_share", float(identical))
    print(f"\n{folder.name}: {hu_2mm.shape} at 2 mm, lung voxels {int(reference.sum())}, "
          f"identical mask voxels {identical:.6%}")
    assert reference.any(axis=(1, 2)).mean() > 0.5  # the comparison covers real lungs
    assert identical == 1.0


@pytest.mark.requires_shared
def test_native_512_and_256_slices_equal_opencv_reference():
    # LIDC is 512 x 512 natively: the 49x49 black-hat; every other pixel gives
    # 256 x 256 slices, which the 512/H scaling must treat as the original did.
    from lungzarr.io.dicom import load_hu

    hu, _ = load_hu(shared_path(LIDC_DIR))
    for k in (0, hu.shape[0] // 2):
        for image in (hu[k], np.ascontiguousarray(hu[k, ::2, ::2])):
            expected = reference_lungfilter(image)
            assert expected.any()
            np.testing.assert_array_equal(segment_lung_slice(image), expected)
