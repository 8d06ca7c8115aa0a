"""One default crop, the lung box, from Python and the command line; the DSB2017 export then refuses those
patients by name and says how to get their table.

The store is real (phantom DICOM through ingest and segment, ``tests/dicom_phantoms.detected_store``), with a
written ``nodule_prob`` and detect record in place of the UNet's: one patient as detected with ``--crop lungs``,
one with ``--crop fixed``.
"""
from __future__ import annotations

import inspect

import pytest
from dicom_phantoms import detected_store

from lungzarr.errors import LungzarrError
from lungzarr.io.store import CohortStore

BLOB = [((slice(12, 15), slice(40, 44), slice(30, 34)), 0.9)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return detected_store(tmp_path_factory.mktemp("crop"), {"BOXED": BLOB, "WHOLE": BLOB},
                          crops={"BOXED": "lungs", "WHOLE": "fixed"}, stages=["nodules", "features"])


def test_python_and_the_cli_predict_inside_the_lungs_by_default():
    from lungzarr.cli._app import Crop, CropOpt
    from lungzarr.model.geometry import CROPS, DEFAULT_CROP
    from lungzarr.pipeline import StageOptions, run

    assert DEFAULT_CROP == "lungs" and DEFAULT_CROP in CROPS
    assert CropOpt.default == Crop.lungs and CropOpt.default.value == DEFAULT_CROP
    assert [c.value for c in Crop] == list(CROPS)
    assert inspect.signature(run).parameters["crop"].default == DEFAULT_CROP
    assert StageOptions().crop == DEFAULT_CROP


def test_features_record_the_crop_their_map_was_predicted_on(store):
    cs = CohortStore(store, mode="r")
    assert cs.stages("BOXED")["features"]["detect_crop"] == "lungs"
    assert cs.stages("WHOLE")["features"]["detect_crop"] == "fixed"


def test_dsb2017_export_refuses_lung_box_patients_by_name(store, tmp_path):
    from lungzarr.pipeline import export_dsb2017

    out = tmp_path / "dsb.csv"
    with pytest.raises(LungzarrError) as err:
        export_dsb2017(store, out)
    message = str(err.value)
    assert "1 patient(s) were detected inside the lung box" in message and "['BOXED']" in message
    assert f"`lungzarr detect {store} --crop fixed --overwrite --patients BOXED`" in message
    assert "`lungzarr run INPUT STORE --crop fixed`" in message and 'crop="fixed"' in message
    assert not out.exists()
    table = export_dsb2017(store, out, patients=["WHOLE"])
    assert list(table.index) == ["WHOLE"]


def test_a_detect_record_without_crop_is_the_fixed_crop(store):
    from lungzarr.pipeline.exports import detect_crop

    cs = CohortStore(store, mode="r")
    assert detect_crop(cs, "WHOLE") == "fixed"

    class Legacy:  # an imported legacy map: a detect record that predates --crop
        def stages(self, patient):
            return {"detect": {"synthetic": True}}

    assert detect_crop(Legacy(), "ANY") == "fixed"
