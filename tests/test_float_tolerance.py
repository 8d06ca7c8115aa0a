"""The float32 tolerance model of the d8 network (tests/float_tolerance.py) against what the CPU running the
suite actually computes: no network test's tolerance may be tighter than the rounding measured here."""
from __future__ import annotations

import numpy as np
import pytest

from lungzarr.model import engines

from float_tolerance import ENGINE_SPREAD, LAMBDA, exact_prob, prob_tolerance, rounding_sd, windows_of
from test_infer import synthetic_hu


def _lidc_windows(lidc_dir):
    from lungzarr.algorithms.resample import resample_to_2mm_numpy
    from lungzarr.io.dicom import load_hu

    hu, grid = load_hu(lidc_dir)
    # Four windows through the annotated nodule (2 mm slices 4-7 of the slab's 20), its rows and columns.
    return windows_of(resample_to_2mm_numpy(hu, grid)[0])[4:8, :, 40:140, 100:180]


def _check_engines_within_their_allowance(windows, label):
    sd = rounding_sd(windows)
    exact = exact_prob(windows)
    seen = {}
    for name in ENGINE_SPREAD:
        if not engines.engine_available(name):
            continue
        for batch_size in (1, len(windows)):
            got = engines.get_engine(name).predict(windows, batch_size=batch_size)
            # In units of this engine's allowance: <= 1 everywhere.
            ratio = np.abs(got - exact) / (LAMBDA * ENGINE_SPREAD[name] * sd)
            seen[f"{name} batch {batch_size}"] = float(ratio.max())
    print(f"\n{label}: largest |p - p_float64| as a share of each engine's allowance: "
          + ", ".join(f"{k} {v:.2f}" for k, v in seen.items()))
    assert "keras batch 1" in seen
    assert all(v <= 1 for v in seen.values()), seen
    return sd


def test_every_engine_stays_within_its_allowance_of_the_float64_network():
    windows = windows_of(synthetic_hu((17, 30, 35)))
    sd = _check_engines_within_their_allowance(windows, "synthetic windows")
    # The model is not vacuous: its tolerances are small against what a wrong window does.
    tolerance = prob_tolerance(windows, ("keras", "openvino"))
    assert tolerance < 1e-4
    prob = engines.get_engine("keras").predict(windows, batch_size=1)
    moved = np.abs(prob[1:] - prob[:-1]).max()  # each window's map against its neighbour's
    assert moved > 100 * tolerance, (moved, tolerance)
    assert sd.max() > 0


@pytest.mark.requires_shared
def test_every_engine_stays_within_its_allowance_on_the_lidc_slab(lidc_dir):
    _check_engines_within_their_allowance(_lidc_windows(lidc_dir), "LIDC-IDRI-0001 slab windows")
