"""The legacy DSB2017 crop rule (docs/algorithms.md §4) and lazy cropped views."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lungzarr.algorithms.crop import crop_view, legacy_crop_box, mask_bbox
from lungzarr.algorithms.segment import OUTSIDE_LUNG_HU

from conftest import DSB_PATIENT


def _box_mask(shape, z, y, x):
    mask = np.zeros(shape, dtype=bool)
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return mask


@pytest.mark.requires_shared
def test_reproduces_dsb2017_crop_fixture(dsb_dir):
    segmented = np.load(dsb_dir / "input" / "stage1_segmented_2x2x2" / f"{DSB_PATIENT}.npz")["arr_0"]
    expected = np.load(dsb_dir / "input" / "stage1_segmented_2x2x2_crop" / f"{DSB_PATIENT}.npz")["arr_0"]
    # The original ran the rule on its lung filter; the segmented volume holds
    # -2000 exactly outside it.
    lungs = segmented != OUTSIDE_LUNG_HU
    box = legacy_crop_box(lungs)
    assert box["rule"] == "yx"
    cropped = crop_view(segmented, box)
    assert cropped.shape == expected.shape
    np.testing.assert_array_equal(cropped, expected)
    assert np.shares_memory(cropped, segmented)  # a view, not a copy


def test_dask_mask_gives_same_box_and_lazy_view():
    import dask.array as da

    mask = _box_mask((40, 100, 100), (3, 37), (20, 80), (10, 90))
    box = legacy_crop_box(mask)
    lazy = da.from_array(mask, chunks=(8, 100, 100))
    assert legacy_crop_box(lazy) == box
    view = crop_view(lazy, box)
    assert isinstance(view, da.Array)
    np.testing.assert_array_equal(view.compute(), mask[3:37, 10:90, 10:90])


def test_dask_box_reduces_chunks_without_materialising_the_volume():
    import dask.array as da

    seen = []

    def block(block_info=None):
        loc = block_info[None]["array-location"]
        seen.append(loc[0])
        out = np.zeros(block_info[None]["chunk-shape"], dtype=bool)
        out[:, 20:80, 10:90] = True
        return out

    mask = da.map_blocks(block, chunks=((8,) * 5, (100,), (100,)), dtype=bool,
                         meta=np.empty((0, 0, 0), bool))
    box = legacy_crop_box(mask)
    # Each chunk is made exactly once (the three projections share it).
    assert sorted(seen) == [(k, k + 8) for k in range(0, 40, 8)]
    assert box["rule"] == "yx" and box["bbox"] == [0, 20, 10, 40, 80, 90]


def test_yx_rule_takes_a_square_from_min_to_max_of_y_and_x():
    box = legacy_crop_box(_box_mask((50, 120, 120), (4, 45), (30, 90), (12, 100)))
    assert box["rule"] == "yx"
    assert (box["z0"], box["z1"]) == (4, 45)
    assert (box["y0"], box["y1"], box["x0"], box["x1"]) == (12, 100, 12, 100)


def test_z_only_when_y_is_too_short():
    # ylen / H = 40 / 120 <= 0.4: no y/x crop, z crop still.
    box = legacy_crop_box(_box_mask((50, 120, 120), (4, 45), (40, 80), (12, 100)))
    assert box["rule"] == "z"
    assert (box["z0"], box["z1"], box["y0"], box["y1"], box["x0"], box["x1"]) == (4, 45, 0, 120, 0, 120)


def test_zlen_twice_quirk_sends_thin_slabs_to_no_crop():
    # A 10-slice slab with lungs in every slice covering 60 % x 80 % of y/x:
    # the true volume share is 0.48, but zlen*ylen*zlen / volume = 0.06.
    mask = _box_mask((10, 100, 100), (0, 10), (20, 80), (10, 90))
    box = legacy_crop_box(mask)
    assert box["ratios"]["mask_volume"] == pytest.approx(10 * 60 * 10 / (10 * 100 * 100))
    assert box["rule"] == "none"
    # The same lungs in a taller volume pass.
    assert legacy_crop_box(_box_mask((100, 100, 100), (0, 100), (20, 80), (10, 90)))["rule"] == "yx"


def test_literal_512_quirk_and_edge_contact():
    # Slices wider than 512: a box ending past column 512 is not cropped.
    assert legacy_crop_box(_box_mask((60, 520, 520), (1, 59), (10, 500), (60, 515)))["rule"] == "none"
    assert legacy_crop_box(_box_mask((60, 520, 520), (1, 59), (10, 500), (60, 510)))["rule"] == "yx"
    # Touching row or column 0 means no crop.
    assert legacy_crop_box(_box_mask((50, 120, 120), (4, 45), (0, 90), (12, 100)))["rule"] == "none"
    assert legacy_crop_box(_box_mask((50, 120, 120), (4, 45), (30, 90), (0, 100)))["rule"] == "none"


def test_short_z_extent_means_no_crop():
    assert legacy_crop_box(_box_mask((50, 120, 120), (10, 40), (30, 90), (12, 100)))["rule"] == "none"


def test_square_crop_clips_to_the_narrower_axis():
    # H != W: max(y1, x1) exceeds W, the view stops at W as numpy slicing does.
    box = legacy_crop_box(_box_mask((50, 140, 110), (2, 48), (20, 130), (10, 100)))
    assert box["rule"] == "yx"
    assert (box["y0"], box["y1"], box["x0"], box["x1"]) == (10, 130, 10, 110)


def test_empty_mask_gives_no_crop_with_reason():
    box = legacy_crop_box(np.zeros((5, 30, 30), dtype=bool))
    assert box["rule"] == "none" and box["bbox"] is None
    assert "empty" in box["reason"]
    assert mask_bbox(np.zeros((5, 30, 30), dtype=bool)) is None
    assert crop_view(np.ones((5, 30, 30)), box).shape == (5, 30, 30)


def test_box_is_json_attrs():
    box = legacy_crop_box(_box_mask((50, 120, 120), (4, 45), (30, 90), (12, 100)))
    assert json.loads(json.dumps(box)) == box


def test_crop_view_xarray():
    xr = pytest.importorskip("xarray")
    mask = _box_mask((50, 120, 120), (4, 45), (30, 90), (12, 100))
    box = legacy_crop_box(mask)
    coords = {"z2": np.arange(50) * 2.0, "y2": np.arange(120) * 2.0, "x2": np.arange(120) * 2.0}
    ds = xr.Dataset({"lungs": (("z2", "y2", "x2"), mask),
                     "hu": (("z", "y", "x"), np.zeros((3, 4, 4), np.int16))}, coords=coords)
    cropped = crop_view(ds, box)
    assert cropped.sizes["z2"] == 41 and cropped.sizes["y2"] == 88 and cropped.sizes["x2"] == 88
    assert cropped["hu"].shape == (3, 4, 4)  # the native volume is left alone
    assert float(cropped.y2[0]) == 24.0
    da_cropped = crop_view(ds["lungs"], box)
    np.testing.assert_array_equal(da_cropped.values, mask[4:45, 12:100, 12:100])
    assert legacy_crop_box(ds["lungs"]) == box


def test_crop_view_refuses_wrong_grid():
    box = legacy_crop_box(_box_mask((50, 120, 120), (4, 45), (30, 90), (12, 100)))
    with pytest.raises(ValueError, match="shape"):
        crop_view(np.zeros((50, 100, 100)), box)
    with pytest.raises(ValueError, match="legacy_crop_box"):
        crop_view(np.zeros((50, 120, 120)), {"z0": 0})
