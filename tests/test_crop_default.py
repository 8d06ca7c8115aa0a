"""`lungzarr run` predicts inside the lung box by default; the DSB2017 export then refuses those patients by name.

The store is real (phantom DICOM through ingest and segment), with a written ``nodule_prob`` and detect
record in place of the UNet's (which takes minutes on two cores): one patient as detected with
``--crop lungs``, one with ``--crop fixed``.
"""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from lungzarr.errors import LungzarrError
from lungzarr.io.store import CohortStore


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from lungzarr.algorithms.phantom import chest_phantom
    from lungzarr.io.dicom import write_series
    from lungzarr.pipeline import run
    from lungzarr.pipeline.stages._common import DIMS_2MM, encoded

    base = tmp_path_factory.mktemp("crop")
    for pid, seed in (("BOXED", 1), ("WHOLE", 2)):
        hu, origin = chest_phantom(shape=(24, 96, 96), spacing=(2.5, 2.0, 2.0), seed=seed)
        write_series(hu, base / "input" / pid, spacing=(2.5, 2.0, 2.0), origin=origin, patient_id=pid)
    path = base / "cohort.zarr"
    run(base / "input", path, stages=["ingest", "segment"])
    cs = CohortStore(path)
    for p, crop in (("BOXED", "lungs"), ("WHOLE", "fixed")):
        prob = np.zeros(cs.open_patient(p).lungs.shape, np.float32)
        prob[12:15, 40:44, 30:34] = 0.9
        pending = cs.prepare_stage(p, "detect", encoded(xr.Dataset({"nodule_prob": (DIMS_2MM, prob)}), 16),
                                   record={"synthetic": True, "crop": crop})
        pending.compute()
        pending.commit()
    run(None, path, stages=["nodules", "features"])
    return path


def test_the_cli_predicts_inside_the_lungs_by_default():
    from lungzarr.cli._app import Crop, CropOpt

    assert CropOpt.default == Crop.lungs


def test_features_record_the_crop_their_map_was_predicted_on(store):
    cs = CohortStore(store, mode="r")
    assert cs.stages("BOXED")["features"]["detect_crop"] == "lungs"
    assert cs.stages("WHOLE")["features"]["detect_crop"] == "fixed"


def test_dsb2017_export_refuses_lung_box_patients_by_name(store, tmp_path):
    from lungzarr.pipeline import export_dsb2017

    out = tmp_path / "dsb.csv"
    with pytest.raises(LungzarrError, match=r"'BOXED'.*lungzarr detect --crop fixed --overwrite --patients BOXED"):
        export_dsb2017(store, out)
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
