"""The embedded demo cohort: real DICOM files with nodules where the phantom says."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lungzarr.algorithms.phantom import DEMO_PATIENTS
from lungzarr.demo import DEMO_SPACING, demo_truth, write_demo_cohort
from lungzarr.evaluate import match_truth
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


def _detection(patient, z, y, x, diameter, *, prob=1.0, passes=True, threshold=0.5):
    return {"patient": patient, "threshold": threshold, "passes_dsb_filter": passes, "z_mm": z, "y_mm": y,
            "x_mm": x, "diameter_mm": diameter, "prob_max": prob}


def test_match_truth_hits_and_misses():
    truth = demo_truth()
    rows = [_detection("DEMO-001", -80.5, -10.0, -55.0, 14.0),
            _detection("DEMO-002", -60.0, 10.0, 50.0, 18.0, prob=0.9),
            _detection("DEMO-001", -60.0, 20.0, 60.0, 9.0, passes=False)]
    verdict = match_truth(pd.DataFrame(rows), truth)
    matched = verdict.truth
    assert matched.found.tolist() == [True, False, False]
    assert matched.distance_mm.iloc[0] == 0.5
    assert matched.distance_mm.iloc[2] == 30.0  # DEMO-002: 30 mm off in z, beyond its 9 mm radius
    assert matched.distance_mm.iloc[1] > 100  # the unfiltered detection at DEMO-001 nodule 2 is not used
    # The DEMO-002 detection lies within no true nodule's radius: a false positive, not a hit.
    assert verdict.false_positives.patient.tolist() == ["DEMO-002"]
    assert verdict.detections.hit.tolist() == [True, False]
    assert verdict.detections.truth_index.tolist() == [0, -1]


def test_verdict_counts_false_positives_and_explains_demo_003():
    """The demo run's situation: every phantom nodule found, two detections on DEMO-003 (no nodule)."""
    truth = demo_truth()
    rows = [_detection("DEMO-001", -80.2, -9.2, -54.8, 14.9),
            _detection("DEMO-001", -60.0, 21.1, 60.0, 9.9),
            _detection("DEMO-001", -60.0, 21.1, 60.0, 6.0, threshold=0.9),   # another threshold: not counted
            _detection("DEMO-002", -90.1, 10.5, 50.3, 19.5),
            _detection("DEMO-002", -90.0, 10.0, 57.0, 4.0, prob=0.7),       # within the 9 mm radius: a hit too
            _detection("DEMO-002", -20.0, 10.0, 50.0, 5.0, prob=0.6),       # 70 mm away: a false positive
            _detection("DEMO-003", -105.1, 15.0, 25.0, 3.9),
            _detection("DEMO-003", -26.4, 11.0, 24.0, 3.1, prob=0.89)]
    verdict = match_truth(pd.DataFrame(rows), truth, patients=[pid for pid, _, _ in DEMO_PATIENTS])
    assert (verdict.n_found, verdict.n_true, len(verdict.false_positives)) == (3, 3, 3)
    assert len(verdict.hits) == 3 and len(verdict.misses) == 0
    assert verdict.without_nodules() == ["DEMO-003"]
    assert verdict.false_positives.patient.tolist() == ["DEMO-002", "DEMO-003", "DEMO-003"]
    assert verdict.summary() == ("3/3 phantom nodules found, 3 false positives (DEMO-003 has no nodule by design: "
                                 "both of its detections are false positives)")
    np.testing.assert_allclose(verdict.truth.distance_mm, [np.sqrt(0.04 + 0.64 + 0.04), np.sqrt(1.21),
                                                          np.sqrt(0.01 + 0.25 + 0.09)])
    text = verdict.text()
    assert "DEMO-003: no phantom nodule (by design), 2 false positives" in text
    assert ("  false positive 3.9 mm at (z -105.1, y 15.0, x 25.0) mm, p 1.00: this patient has no phantom "
            "nodule") in text
    assert ("  hit    14.0 mm nodule at (z -80.0, y -10.0, x -55.0) mm: detected 14.9 mm, centre 0.8 mm away "
            "(within its 7.0 mm radius), p 1.00") in text
    assert "DEMO-002: 1/1 phantom nodule(s) found, 0 missed, 1 false positive" in text
    assert text.splitlines()[-1] == verdict.summary()


def test_verdict_of_a_miss_and_of_a_clean_patient():
    truth = demo_truth()
    verdict = match_truth(pd.DataFrame([_detection("DEMO-001", -80.0, -10.0, -55.0, 14.0)]), truth,
                          patients=["DEMO-001", "DEMO-002", "DEMO-003"])
    assert verdict.summary() == ("1/3 phantom nodules found, 0 false positives (DEMO-003 has no nodule by "
                                 "design: nothing was detected there, as it should be)")
    text = verdict.text()
    assert "missed 9.0 mm nodule at (z -60.0, y 20.0, x 60.0) mm: nearest detection" in text
    assert "missed 18.0 mm nodule at (z -90.0, y 10.0, x 50.0) mm: no detection in this patient" in text
    # An empty nodule table (no candidate anywhere) is a verdict too.
    from lungzarr.algorithms.nodules import empty_nodule_table

    empty = match_truth(empty_nodule_table(), truth, patients=["DEMO-001", "DEMO-002", "DEMO-003"])
    assert empty.n_found == 0 and len(empty.false_positives) == 0 and empty.truth.distance_mm.isna().all()
    with pytest.raises(ValueError, match="not in patients="):
        match_truth(empty_nodule_table(), truth, patients=["DEMO-003"])
