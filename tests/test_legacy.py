"""Readers of the original pipeline's npz/csv layout."""
from __future__ import annotations

import numpy as np
import pytest

from lungzarr.errors import PatientError
from lungzarr.io.legacy import list_legacy_patients, read_legacy_labels, read_legacy_patient

from conftest import DSB_PATIENT


@pytest.mark.requires_shared
def test_reads_fixture_patient(dsb_dir):
    root = dsb_dir / "input"
    assert list_legacy_patients(root) == [DSB_PATIENT]
    p = read_legacy_patient(root, DSB_PATIENT)
    assert p.hu is None  # stage1_2x2x2 is not shipped
    assert p.segmented.shape == (183, 140, 140) and p.segmented.dtype == np.int16
    assert p.segmented_crop.shape == (183, 128, 128)
    assert p.prob_windows.shape == (175, 1, 1, 140, 140) and p.prob_windows.dtype == np.float32
    assert p.box == {"by_min": 0, "by_max": 140, "bx_min": 0, "bx_max": 140}
    assert p.cancer == 1
    assert p.segmented.min() == -2000
    assert 0 < np.count_nonzero(p.prob_windows) and p.prob_windows[p.prob_windows > 0].min() >= 0.5


def _write_layout(root, patient="abc", *, labels="id,cancer\nabc,0\n", box=True):
    seg = root / "stage1_segmented_2x2x2"
    seg.mkdir(parents=True)
    np.savez_compressed(seg / f"{patient}.npz", np.full((10, 8, 8), -2000, dtype=np.int16))
    pred = root / "stage1_2x2x2_mpred3_8"
    pred.mkdir()
    np.savez_compressed(pred / f"{patient}.npz", np.zeros((2, 1, 1, 8, 8), dtype=np.float32))
    if box:
        (pred / f"{patient}.csv").write_text(f",bx_max,bx_min,by_max,by_min\n{patient},8,0,8,0\n")
    if labels is not None:
        (root / "stage1_labels.csv").write_text(labels)


def test_labels_and_unknown_patient(tmp_path):
    _write_layout(tmp_path)
    p = read_legacy_patient(tmp_path, "abc")
    assert p.cancer == 0 and p.segmented_crop is None and p.hu is None
    assert read_legacy_patient(tmp_path, "abc", labels={}).cancer == -777
    with pytest.raises(PatientError, match="no zzz.npz"):
        read_legacy_patient(tmp_path, "zzz")


def test_missing_labels_file_means_unknown(tmp_path):
    _write_layout(tmp_path, labels=None)
    assert read_legacy_patient(tmp_path, "abc").cancer == -777


def test_maps_without_box_are_refused(tmp_path):
    _write_layout(tmp_path, box=False)
    with pytest.raises(PatientError, match="box CSV"):
        read_legacy_patient(tmp_path, "abc")


def test_bad_labels_csv(tmp_path):
    (tmp_path / "labels.csv").write_text("patient,label\nx,1\n")
    with pytest.raises(ValueError, match="'id' and 'cancer'"):
        read_legacy_labels(tmp_path / "labels.csv")
    with pytest.raises(FileNotFoundError):
        list_legacy_patients(tmp_path / "nowhere")
