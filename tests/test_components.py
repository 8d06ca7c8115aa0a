"""Component labelling and gathering shared by the nodule and patient tables."""
from __future__ import annotations

import numpy as np
import pytest
from skimage import measure

from lungzarr.algorithms.components import above_threshold, find_components, legacy_diameter, sphere_diameter


@pytest.mark.parametrize("seed", range(4))
def test_labels_boxes_and_values_match_skimage(seed):
    rng = np.random.default_rng(seed)
    prob = np.zeros((20, 30, 30), dtype=np.float32)
    prob[3:17, 5:25, 4:26] = rng.random((14, 20, 22), dtype=np.float32)
    comps = find_components(above_threshold(prob, 0.8))
    expected = measure.label(prob > np.float32(0.8), connectivity=3)
    assert (comps.label_image() == expected).all()
    props = measure.regionprops(expected)
    assert comps.count == len(props) > 10
    image = rng.random(prob.shape).astype(np.float32)
    for k, (rp, values) in enumerate(zip(props, comps.values(image))):
        assert comps.voxels[k] == rp.area
        assert tuple(comps.start[k]) + tuple(comps.stop[k]) == rp.bbox
        # Raster order, as image[labels == label] gives it.
        assert (values == image[expected == rp.label]).all()
        assert comps.centroids()[k] == pytest.approx(rp.centroid)


def test_threshold_is_strict_in_float32():
    t = 0.99  # float32(0.99) is above 0.99
    prob = np.array([np.float32(t), np.nextafter(np.float32(t), np.float32(1))], dtype=np.float32)
    assert above_threshold(prob, t).tolist() == [False, True]
    # A float64 comparison would keep the voxel at exactly float32(0.99).
    assert (prob.astype(np.float64) > t).tolist() == [True, True]
    with pytest.raises(TypeError, match="float32"):
        above_threshold(prob.astype(np.float64), t)


def test_empty_mask_and_touching():
    comps = find_components(np.zeros((4, 4, 4), dtype=bool))
    assert comps.count == 0 and comps.values(np.zeros((4, 4, 4))) == []
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[3, 3, 3] = True
    comps = find_components(mask)
    lungs = np.zeros_like(mask)
    lungs[3, 3, 3] = True
    assert comps.any_in(lungs).tolist() == [False, True]


def test_diameters():
    assert sphere_diameter(4 / 3 * np.pi * 27) == pytest.approx(6.0)
    # The legacy 0.3333 exponent is slightly smaller than the true one.
    assert legacy_diameter(64) < sphere_diameter(64 * 8)
    assert legacy_diameter(64) == pytest.approx(2 * (3 * 512 / (4 * np.pi)) ** 0.3333)


def test_legacy_diameter_uses_libm_pow_on_arrays_too():
    # numpy >= 2 computes array ** 0.3333 with SIMD code that is one ulp off libm for 12 voxels;
    # the original (and the DSB2017 reference rows) got libm's value.
    import math

    voxels = np.array([12, 1, 2383])
    expected = [2 * math.pow(3 * (v * 8.0) / (4 * math.pi), 0.3333) for v in voxels]
    assert legacy_diameter(voxels).tolist() == expected
    assert float(legacy_diameter(12)) == expected[0]
