"""NGFF 0.5 (OME-Zarr) metadata on each patient group (issue 17): an NGFF reader opens a patient without lungzarr."""
from __future__ import annotations

import numpy as np
import pytest

from lungzarr.io.storage import CohortStore, grid_from_attrs, open_cohort
from lungzarr.pipeline import ingest

from dicom_phantoms import make_patient


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "dicom"
    make_patient(root / "P1", n_slices=12, size=48)
    path = tmp_path / "cohort.zarr"
    ingest(root, path)
    return path


def test_ingest_writes_ngff_05_multiscales_of_hu_2mm(store):
    attrs = CohortStore(store, mode="r").patient_attrs("P1")
    grid = grid_from_attrs(attrs)
    ome = attrs["ome"]
    assert ome["version"] == "0.5"
    (image,) = ome["multiscales"]
    assert [a["name"] for a in image["axes"]] == ["z2", "y2", "x2"]
    assert {(a["type"], a["unit"]) for a in image["axes"]} == {("space", "millimeter")}
    (level,) = image["datasets"]
    assert level["path"] == "hu_2mm"
    scale, translation = level["coordinateTransformations"]
    assert scale == {"type": "scale", "scale": [abs(s) for s in grid.step]}
    assert translation == {"type": "translation", "translation": list(grid.origin)}
    # The xarray read API is unchanged: same variables and dimensions, the NGFF view is only a group attribute.
    ds = open_cohort(store)["patients/P1"].to_dataset()
    assert ds.hu_2mm.dims == ("z2", "y2", "x2")
    np.testing.assert_allclose(ds.z2.values, grid.axis(0))


def test_ome_zarr_reader_opens_the_patient_at_the_stored_grid(store):
    pytest.importorskip("ome_zarr", reason="ome-zarr is not installed (pip install ome-zarr): the NGFF reader check "
                                           "needs it")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    attrs = CohortStore(store, mode="r").patient_attrs("P1")
    grid = grid_from_attrs(attrs)
    location = parse_url(str(store / "patients" / "P1"))
    assert location is not None and location.version == "0.5"
    nodes = list(Reader(location)())
    image = nodes[0]
    assert any(isinstance(spec, Multiscales) for spec in image.specs)
    (transforms,) = image.metadata["coordinateTransformations"]
    by_type = {t["type"]: t for t in transforms}
    np.testing.assert_allclose(by_type["scale"]["scale"], [abs(s) for s in grid.step])
    np.testing.assert_allclose(by_type["translation"]["translation"], grid.origin)
    assert [a["name"] for a in image.metadata["axes"]] == ["z2", "y2", "x2"]
    (level0,) = image.data
    assert tuple(level0.shape) == tuple(grid.shape)
    hu_2mm = open_cohort(store)["patients/P1"].to_dataset().hu_2mm.values
    np.testing.assert_array_equal(np.asarray(level0), hu_2mm)


def test_a_negative_step_is_stored_as_its_magnitude_with_the_origin_as_translation():
    from lungzarr.io.storage import ome_multiscales

    attrs = {"grid_2mm": {"shape": [10, 8, 8], "origin_mm": [50.0, -20.0, -30.0], "step_mm": [-2.0, 1.9, 2.1]}}
    level = ome_multiscales(attrs)["multiscales"][0]["datasets"][0]
    assert level["coordinateTransformations"] == [{"type": "scale", "scale": [2.0, 1.9, 2.1]},
                                                  {"type": "translation", "translation": [50.0, -20.0, -30.0]}]
    assert ome_multiscales({}) is None
