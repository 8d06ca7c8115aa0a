"""The external yardstick (issue 25, Build 9): dcm2niix's CT validation corpus, checked against its headers.

The corpus (``neurolabusc/dcm_qa_ct`` and the CT series of ``icometrix/dicom2nifti``'s
``tests/data``) is kept outside the repository. Where ``LUNGZARR_DICOM_CORPUS`` points
to a copy, every CT series folder in it must be either accepted with every voxel
centre within half a voxel of where its own headers (read with pydicom) put it and
the HU of its files exactly, or refused with a PatientError naming what the series
is (:data:`benchmarks.corpus_check.EXPECTED_REFUSALS`). Without the variable these
tests skip, under CI too: the corpus is an optional yardstick, not a shared fixture.
``python benchmarks/corpus_check.py CORPUS`` runs the same check with dcm2niix as a
second opinion and prints the table.

The checker itself is tested on small synthetic series (always run): it must see a
grid one voxel off, a slice stored mirrored and a changed value.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import REPO
from dicom_phantoms import SPACING, edit_header, make_patient

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.corpus_check import (  # noqa: E402
    EXPECTED_REFUSALS,
    VARIANT_SOURCE,
    VARIANTS,
    check_against_headers,
    check_series,
    check_variant,
    find_series_folders,
    label_of,
    names_its_reason,
)
from lungzarr.io.dicom import read_series, series_to_hu  # noqa: E402

CORPUS_ENV = "LUNGZARR_DICOM_CORPUS"


def _corpus_root() -> Path | None:
    value = os.environ.get(CORPUS_ENV)
    return Path(value) if value else None


def _corpus_params():
    root = _corpus_root()
    if root is None or not root.is_dir():
        return [pytest.param(None, id="no-corpus")]
    folders = find_series_folders(root)
    return [pytest.param(f, id=label_of(f, root)) for f in folders] or [pytest.param(None, id="empty-corpus")]


def _require_corpus() -> Path:
    root = _corpus_root()
    if root is None:
        pytest.skip(f"optional external yardstick: set {CORPUS_ENV} to a copy of dcm2niix's CT corpus "
                    f"(github neurolabusc/dcm_qa_ct, and icometrix/dicom2nifti's tests/data) to run it")
    if not root.is_dir():
        pytest.fail(f"{CORPUS_ENV}={str(root)!r} is not a folder: point it to the corpus copy or unset it")
    return root


@pytest.mark.parametrize("folder", _corpus_params())
def test_corpus_series_is_exact_or_refused_with_its_reason(folder):
    root = _require_corpus()
    if folder is None:
        pytest.fail(f"{CORPUS_ENV}={str(root)!r} holds no folder of CT images: is it the corpus?")
    _assert_exact_or_named(check_series(folder, root=root))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_corpus_variant_is_exact_or_refused_with_its_reason(name, tmp_path):
    """Issue 25's header edits (tilt, rotation, shear, mirrored slice, acquisitions) on the real Philips series."""
    root = _require_corpus()
    if not (root / VARIANT_SOURCE).is_dir():
        pytest.skip(f"the corpus copy has no {VARIANT_SOURCE} to edit")
    row = check_variant(name, root, tmp_path)
    assert row["lungzarr"] == row["expected"], row.get("message", row)
    _assert_exact_or_named(row)


def _assert_exact_or_named(row):
    if row["lungzarr"] == "accepted":
        limit = row["half_voxel_lps_mm"]
        assert row["within_half_voxel"], (f"{row['series']}: voxel centres up to {row['max_position_error_lps_mm']} "
                                          f"mm (x, y, z) from their headers, half a voxel {limit}")
        assert row["max_abs_dhu"] == 0, f"{row['series']}: stored HU differ from the files' by {row['max_abs_dhu']}"
        assert row["padding_max_abs_dhu_vs_rule"] == 0, row
        assert row["slices_used"] == row["shape"][0]
        assert row["images_unaccounted"] == [], f"{row['series']}: images neither used nor listed as skipped"
    else:
        assert row["message"].strip(), row
        assert row["names_reason"], (f"{row['series']}: the refusal does not name what the series is "
                                     f"(expected {row['expected_words']}): {row['message']}")


# --------------------------------------------------------------------------
# the checker, on synthetic series
# --------------------------------------------------------------------------

def _read(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        series = read_series(folder)
    return series, np.asarray(series_to_hu(series).compute(scheduler="synchronous"))


def test_checker_finds_an_exact_series_exact(tmp_path):
    series, hu = _read(_patient(tmp_path))
    out = check_against_headers(series, hu)
    assert out["max_position_error_mm"] < 1e-6
    assert out["within_half_voxel"] and out["max_abs_dhu"] == 0
    assert out["layouts"] == {"(False, False, False)": len(series.paths)}


def _patient(tmp_path):
    folder = tmp_path / "P"
    make_patient(folder, n_slices=6, size=32)
    return folder


def test_checker_sees_a_grid_one_voxel_off(tmp_path):
    series, hu = _read(_patient(tmp_path))
    origin = list(series.grid.origin)
    origin[2] += SPACING[2]  # x, one column
    shifted = replace(series, grid=replace(series.grid, origin=tuple(origin)))
    out = check_against_headers(shifted, hu)
    assert out["max_position_error_lps_mm"][0] == pytest.approx(SPACING[2])
    assert not out["within_half_voxel"]


def test_checker_sees_a_mirrored_slice_and_a_changed_value(tmp_path):
    series, hu = _read(_patient(tmp_path))
    hu[2] = hu[2][:, ::-1]  # stored mirrored: its voxels lie a whole row's width from their headers in x
    hu[4, 3, 3] += 1
    out = check_against_headers(series, hu)
    assert out["max_position_error_lps_mm"][0] == pytest.approx(31 * SPACING[2])
    assert out["layout_differs_from_reader"] == [Path(series.paths[2]).name]
    assert out["max_abs_dhu"] == 1


def test_checker_follows_a_slice_stored_mirrored_by_its_header(tmp_path):
    """A slice whose IOP says it is stored mirrored (issue 25's first repro): exact once reoriented."""
    folder = _patient(tmp_path)
    first = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    ipp = [float(v) for v in ds.ImagePositionPatient]
    edit_header(first, ImageOrientationPatient=[-1, 0, 0, 0, 1, 0],
                ImagePositionPatient=[ipp[0] + (ds.Columns - 1) * float(ds.PixelSpacing[1]), ipp[1], ipp[2]])
    ds = pydicom.dcmread(first)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.save_as(first)
    series, hu = _read(folder)
    out = check_against_headers(series, hu)
    assert out["layouts"]["(False, False, True)"] == 1
    assert out["max_position_error_mm"] < 1e-6 and out["max_abs_dhu"] == 0
    assert out["layout_differs_from_reader"] == []


def test_a_refusal_must_name_what_the_series_is():
    label = "dcm_qa_ct/In/Philips/S21610/S3010"
    assert label in EXPECTED_REFUSALS
    assert names_its_reason(label, "gantry tilt of 16.5 deg; resample it")
    assert not names_its_reason(label, "not an axial image")
    assert names_its_reason("some/other/series", "slice spacing is not regular")
    assert not names_its_reason("some/other/series", " ")
