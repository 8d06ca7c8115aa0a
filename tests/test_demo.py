"""The embedded demo cohort: real DICOM files with nodules where the phantom says."""
from __future__ import annotations

import numpy as np
import pandas as pd

from lungzarr.algorithms.phantom import DEMO_PATIENTS
from lungzarr.demo import DEMO_SPACING, demo_truth, match_truth, write_demo_cohort
from lungzarr.io.dicom import load_hu, read_series


def test_demo_cohort_is_real_dicom_with_the_phantom_geometry(tmp_path):
    folders = write_demo_cohort(tmp_path, n_patients=1)
    series = read_series(folders[0])
    assert series.patient == DEMO_PATIENTS[0][0]
    assert series.spacing == DEMO_SPACING
    hu, grid = load_hu(folders[0])
    # The HU at each nodule centre is soft tissue, the lung around it is air-like.
    for n in DEMO_PATIENTS[0][1]:
        k = np.round((np.array([n.z_mm, n.y_mm, n.x_mm]) - np.array(grid.origin)) / np.array(grid.step)).astype(int)
        assert hu[tuple(k)] > -100
        assert hu[k[0], k[1], k[2] + int(round(n.diameter_mm / DEMO_SPACING[2]))] < -600
    # Writing again replaces the files rather than adding to them.
    write_demo_cohort(tmp_path, n_patients=1)
    assert len(list(folders[0].glob("*.dcm"))) == series.shape[0]


def test_match_truth_hits_and_misses():
    truth = demo_truth()
    rows = [{"patient": "DEMO-001", "threshold": 0.5, "passes_dsb_filter": True, "z_mm": -80.5,
             "y_mm": -10.0, "x_mm": -55.0, "diameter_mm": 14.0, "prob_max": 1.0},
            {"patient": "DEMO-002", "threshold": 0.5, "passes_dsb_filter": True, "z_mm": -60.0,
             "y_mm": 10.0, "x_mm": 50.0, "diameter_mm": 18.0, "prob_max": 0.9},
            {"patient": "DEMO-001", "threshold": 0.5, "passes_dsb_filter": False, "z_mm": -60.0,
             "y_mm": 20.0, "x_mm": 60.0, "diameter_mm": 9.0, "prob_max": 1.0}]
    matched = match_truth(pd.DataFrame(rows), truth)
    assert matched.found.tolist() == [True, False, False]
    assert matched.distance_mm.iloc[0] == 0.5
    assert matched.distance_mm.iloc[2] == 30.0  # DEMO-002: 30 mm off in z, beyond its 9 mm radius
    assert matched.distance_mm.iloc[1] > 100  # the unfiltered detection at DEMO-001 nodule 2 is not used
