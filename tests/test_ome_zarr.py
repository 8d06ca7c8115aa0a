"""NGFF 0.5 (OME-Zarr) on each patient group (issue 17): an NGFF reader opens a patient without lungzarr.

The ``ome`` multiscales of ``hu`` and ``hu_2mm``, and the NGFF label images ``labels/lungs`` (stage
segment) and ``labels/nodules`` (stage nodules), read back with ome-zarr-py's Reader, validated with
ome-zarr-models and opened with napari-ome-zarr's reader function where those are installed.

The labelled store is real (phantom DICOM through ingest and segment, the nodules stage), with a written
``nodule_prob`` in place of the UNet's (which takes minutes on two cores), as in test_exports.py.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import xarray as xr

from lungzarr.io.store import CohortStore, grid_from_attrs, open_cohort
from lungzarr.pipeline import ingest
from lungzarr.pipeline.tables import patient_nodules

from dicom_phantoms import make_patient

# Probability blobs: (z, y, x slices, value); blob 3 (0.45) stays below 0.5, so it is no nodule label.
BLOBS = [((slice(5, 8), slice(10, 14), slice(10, 13)), 0.9), ((slice(10, 12), slice(30, 33), slice(40, 42)), 0.7),
         ((slice(14, 16), slice(20, 23), slice(60, 63)), 0.45), ((slice(2, 3), slice(40, 41), slice(40, 41)), 0.55)]


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "dicom"
    make_patient(root / "P1", n_slices=12, size=48)
    path = tmp_path / "cohort.zarr"
    ingest(root, path)
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A store with lungs and nodule labels: ingest, segment, a written nodule_prob, nodules."""
    from lungzarr.algorithms.phantom import chest_phantom
    from lungzarr.io.dicom import write_series
    from lungzarr.pipeline import run
    from lungzarr.pipeline.stages._common import DIMS_2MM, encoded

    base = tmp_path_factory.mktemp("ngff")
    hu, origin = chest_phantom(shape=(24, 96, 96), spacing=(2.5, 2.0, 2.0), seed=3)
    write_series(hu, base / "input" / "P1", spacing=(2.5, 2.0, 2.0), origin=origin, patient_id="P1")
    path = base / "cohort.zarr"
    run(base / "input", path, stages=["ingest", "segment"])
    cs = CohortStore(path)
    prob = np.zeros(cs.open_patient("P1").lungs.shape, np.float32)
    for box, value in BLOBS:
        prob[box] = value
    pending = cs.prepare_stage("P1", "detect", encoded(xr.Dataset({"nodule_prob": (DIMS_2MM, prob)}), 16),
                               record={"synthetic": True})
    pending.compute()
    pending.commit()
    run(None, path, stages=["nodules"])
    return path


def _at_05(path):
    table = patient_nodules(CohortStore(path, mode="r"), "P1")
    return table[np.isclose(table.threshold, 0.5)].sort_values("label")


def test_ingest_writes_ngff_05_multiscales_of_hu_then_hu_2mm(store):
    attrs = CohortStore(store, mode="r").patient_attrs("P1")
    ome = attrs["ome"]
    assert ome["version"] == "0.5"
    native, coarse = ome["multiscales"]
    for image, name, dims, grid in ((native, "hu", ["z", "y", "x"], grid_from_attrs(attrs, "grid_native")),
                                    (coarse, "hu_2mm", ["z2", "y2", "x2"], grid_from_attrs(attrs))):
        assert image["name"] == name
        assert [a["name"] for a in image["axes"]] == dims
        assert {(a["type"], a["unit"]) for a in image["axes"]} == {("space", "millimeter")}
        (level,) = image["datasets"]
        assert level["path"] == name
        scale, translation = level["coordinateTransformations"]
        assert scale == {"type": "scale", "scale": [abs(s) for s in grid.step]}
        assert translation == {"type": "translation", "translation": list(grid.origin)}
        # NGFF 0.5: the array's dimension_names are the axes' names.
        meta = json.loads((store / "patients" / "P1" / name / "zarr.json").read_text())
        assert meta["dimension_names"] == dims
    # The xarray read API is unchanged: same variables and dimensions, the NGFF view is only a group attribute.
    ds = open_cohort(store)["patients/P1"].to_dataset()
    assert ds.hu.dims == ("z", "y", "x") and ds.hu_2mm.dims == ("z2", "y2", "x2")
    np.testing.assert_allclose(ds.z2.values, grid_from_attrs(attrs).axis(0))
    np.testing.assert_allclose(ds.y.values, grid_from_attrs(attrs, "grid_native").axis(1))


def test_ome_zarr_reader_opens_the_patient_at_the_native_grid(store):
    pytest.importorskip("ome_zarr", reason="ome-zarr is not installed (pip install ome-zarr): the NGFF reader check "
                                           "needs it")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    attrs = CohortStore(store, mode="r").patient_attrs("P1")
    grid = grid_from_attrs(attrs, "grid_native")
    location = parse_url(str(store / "patients" / "P1"))
    assert location is not None and location.version == "0.5"
    nodes = list(Reader(location)())
    image = nodes[0]
    assert any(isinstance(spec, Multiscales) for spec in image.specs)
    (transforms,) = image.metadata["coordinateTransformations"]
    by_type = {t["type"]: t for t in transforms}
    np.testing.assert_allclose(by_type["scale"]["scale"], [abs(s) for s in grid.step])
    np.testing.assert_allclose(by_type["translation"]["translation"], grid.origin)
    assert [a["name"] for a in image.metadata["axes"]] == ["z", "y", "x"]
    (level0,) = image.data
    assert tuple(level0.shape) == tuple(grid.shape)
    hu = open_cohort(store)["patients/P1"].to_dataset().hu.values
    np.testing.assert_array_equal(np.asarray(level0), hu)


def test_a_negative_step_is_stored_as_its_magnitude_with_the_origin_as_translation():
    from lungzarr.io.store import ome_multiscales

    attrs = {"grid_2mm": {"shape": [10, 8, 8], "origin_mm": [50.0, -20.0, -30.0], "step_mm": [-2.0, 1.9, 2.1]}}
    (image,) = ome_multiscales(attrs)["multiscales"]
    level = image["datasets"][0]
    assert level["coordinateTransformations"] == [{"type": "scale", "scale": [2.0, 1.9, 2.1]},
                                                  {"type": "translation", "translation": [50.0, -20.0, -30.0]}]
    assert ome_multiscales({}) is None
    # An image is listed only when its array is in the group (a legacy import has no hu).
    both = {**attrs, "grid_native": {"shape": [20, 16, 16], "origin_mm": [50.0, -20.0, -30.0],
                                     "step_mm": [-1.0, 0.95, 1.05]}}
    assert [m["name"] for m in ome_multiscales(both)["multiscales"]] == ["hu", "hu_2mm"]
    assert [m["name"] for m in ome_multiscales(both, arrays={"hu_2mm", "lungs"})["multiscales"]] == ["hu_2mm"]


def test_segment_and_nodules_write_ngff_labels_with_the_nodule_table_labels(labelled):
    from lungzarr.algorithms.nodules import nodule_label_image

    cs = CohortStore(labelled, mode="r")
    attrs = cs.patient_attrs("P1")
    group = labelled / "patients" / "P1" / "labels"
    assert json.loads((group / "zarr.json").read_text())["attributes"]["ome"] == {"version": "0.5",
                                                                                 "labels": ["lungs", "nodules"]}
    ds = cs.open_patient("P1")
    grid = grid_from_attrs(attrs)
    for name, dtype in (("lungs", "uint8"), ("nodules", "uint32")):
        ome = json.loads((group / name / "zarr.json").read_text())["attributes"]["ome"]
        (image,) = ome["multiscales"]
        assert [a["name"] for a in image["axes"]] == ["z2", "y2", "x2"]
        # The label voxels are hu_2mm's: the same scale and translation.
        assert (image["datasets"][0]["coordinateTransformations"]
                == attrs["ome"]["multiscales"][1]["datasets"][0]["coordinateTransformations"])
        assert image["datasets"][0]["path"] == "0"
        assert ome["image-label"]["source"] == {"image": "../../"}
        meta = json.loads((group / name / "0" / "zarr.json").read_text())
        assert meta["data_type"] == dtype and meta["dimension_names"] == ["z2", "y2", "x2"]
        assert tuple(meta["shape"]) == tuple(grid.shape)
    tree = open_cohort(labelled)
    lungs = tree["patients/P1/labels/lungs"].to_dataset()["0"].values
    np.testing.assert_array_equal(lungs, ds.lungs.values.astype(np.uint8))
    nodules = tree["patients/P1/labels/nodules"].to_dataset()["0"].values
    prob = ds.nodule_prob.values
    np.testing.assert_array_equal(nodules, nodule_label_image(prob))
    # Each label is a candidate of the table at 0.5 (blob 3, at 0.45, is none): its label and its voxels.
    rows = _at_05(labelled)
    assert len(rows) == 3 and sorted(set(np.unique(nodules)) - {0}) == rows.label.tolist()
    for row in rows.itertuples():
        assert int((nodules == row.label).sum()) == row.voxels
        assert np.all(prob[nodules == row.label] > 0.5)
    assert not np.any(nodules[prob <= 0.5])
    props = json.loads((group / "nodules" / "zarr.json").read_text())["attributes"]["ome"]["image-label"]
    by_label = {p["label-value"]: p for p in props["properties"]}
    assert sorted(by_label) == rows.label.tolist()
    for row in rows.itertuples():
        assert by_label[row.label]["prob_max"] == pytest.approx(row.prob_max)
        assert by_label[row.label]["voxels"] == row.voxels
        assert by_label[row.label]["z_mm"] == pytest.approx(row.z_mm)
    assert sorted(c["label-value"] for c in props["colors"]) == rows.label.tolist()
    # The patient's own Dataset is what it was: no label array among its variables.
    assert set(tree["patients/P1"].to_dataset().data_vars) == {"hu", "hu_2mm", "lungs", "segmented", "nodule_prob"}


def test_the_nifti_export_and_the_ngff_labels_are_one_label_image(labelled, tmp_path):
    nib = pytest.importorskip("nibabel")
    from lungzarr.pipeline.exports import export_nifti

    written = export_nifti(labelled, tmp_path / "nifti")
    nifti = np.asarray(nib.load(written["P1"]["nodules"]).dataobj)
    ngff = open_cohort(labelled)["patients/P1/labels/nodules"].to_dataset()["0"].values
    # NIfTI holds (x, y, z): the same labels, transposed.
    np.testing.assert_array_equal(nifti.transpose(2, 1, 0), ngff)


def test_ome_zarr_reader_finds_the_labels_with_their_values(labelled):
    pytest.importorskip("ome_zarr", reason="ome-zarr is not installed (pip install ome-zarr): the NGFF reader check "
                                           "needs it")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Labels, Multiscales, Reader

    cs = CohortStore(labelled, mode="r")
    attrs = cs.patient_attrs("P1")
    ds = cs.open_patient("P1")
    grid = grid_from_attrs(attrs)
    nodes = list(Reader(parse_url(str(labelled / "patients" / "P1")))())
    assert isinstance(nodes[0].specs[0], Multiscales) and nodes[0].metadata["name"] == "hu"
    assert any(isinstance(s, Labels) for n in nodes for s in n.specs)
    labels = {n.metadata["name"]: n for n in nodes if any(isinstance(s, Label) for s in n.specs)}
    assert sorted(labels) == ["lungs", "nodules"]
    for name, node in labels.items():
        (level0,) = node.data
        assert tuple(level0.shape) == tuple(grid.shape)
        (transforms,) = node.metadata["coordinateTransformations"]
        by_type = {t["type"]: t for t in transforms}
        np.testing.assert_allclose(by_type["scale"]["scale"], np.abs(grid.step))
        np.testing.assert_allclose(by_type["translation"]["translation"], grid.origin)
    np.testing.assert_array_equal(np.asarray(labels["lungs"].data[0]), ds.lungs.values.astype(np.uint8))
    rows = _at_05(labelled)
    nodules = np.asarray(labels["nodules"].data[0])
    assert sorted(set(np.unique(nodules)) - {0}) == rows.label.tolist()
    assert sorted(labels["nodules"].metadata["properties"]) == rows.label.tolist()
    assert labels["nodules"].metadata["properties"][1]["prob_max"] == pytest.approx(float(rows.prob_max.iloc[0]))
    assert sorted(labels["lungs"].metadata["color"]) == [1]


def test_ome_zarr_models_validates_the_patient_image_and_its_labels(labelled):
    pytest.importorskip("ome_zarr_models", reason="ome-zarr-models is not installed (pip install ome-zarr-models)")
    import zarr
    from ome_zarr_models.v05.image import Image

    image = Image.from_zarr(zarr.open_group(labelled / "patients" / "P1", mode="r"))
    assert [m.name for m in image.ome_attributes.multiscales] == ["hu", "hu_2mm"]
    assert image.labels.label_paths == ["lungs", "nodules"]
    label = image.labels.get_image_labels_group("nodules")
    assert label.ome_attributes.multiscales[0].datasets[0].path == "0"


def test_napari_ome_zarr_reader_gives_the_ct_and_both_label_layers(labelled):
    napari_ome_zarr = pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr is not installed "
                                                                    "(pip install napari-ome-zarr)")
    cs = CohortStore(labelled, mode="r")
    attrs = cs.patient_attrs("P1")
    ds = cs.open_patient("P1")
    path = str(labelled / "patients" / "P1")
    reader = napari_ome_zarr.napari_get_reader(path)
    assert reader is not None
    layers = reader(path)
    kinds = [kind for _, _, kind in layers]
    assert kinds.count("image") == 1 and kinds.count("labels") == 2, kinds
    (image,) = [(data, meta) for data, meta, kind in layers if kind == "image"]
    data, meta = image
    level0 = data[0] if isinstance(data, list) else data
    np.testing.assert_array_equal(np.asarray(level0), ds.hu.values)
    np.testing.assert_allclose(meta["scale"], np.abs(grid_from_attrs(attrs, "grid_native").step))
    found = {}
    for data, meta, kind in layers:
        if kind == "labels":
            level0 = data[0] if isinstance(data, list) else data
            found[meta["name"].rsplit("/", 1)[-1]] = np.asarray(level0)
            np.testing.assert_allclose(meta["scale"], np.abs(grid_from_attrs(attrs).step))
    assert sorted(found) == ["lungs", "nodules"]
    np.testing.assert_array_equal(found["lungs"], ds.lungs.values.astype(np.uint8))
    assert sorted(set(np.unique(found["nodules"])) - {0}) == _at_05(labelled).label.tolist()


def test_verify_finds_a_damaged_or_missing_label_image_and_names_its_stage(labelled, tmp_path):
    from lungzarr.pipeline import verify_store

    copy = tmp_path / "copy.zarr"
    shutil.copytree(labelled, copy)
    report = verify_store(copy)
    assert report.ok, report.damage
    labels = copy / "patients" / "P1" / "labels"
    chunk = next(p for p in sorted((labels / "nodules" / "0" / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    shutil.rmtree(labels / "lungs")
    report = verify_store(copy)
    found = sorted((d["stage"], d["array"], d["kind"]) for d in report.damage)
    assert found == [("nodules", "labels/nodules/0", "checksum"), ("segment", "labels/lungs", "missing")], found
    assert report.damaged_stages() == {"P1": "segment"}


def test_a_rerun_of_segment_rewrites_its_label_image_and_keeps_the_nodules_one(labelled, tmp_path):
    from lungzarr.pipeline import run

    copy = tmp_path / "copy.zarr"
    shutil.copytree(labelled, copy)
    cs = CohortStore(copy)
    cs.unmark_stages("P1", ["segment"])
    before = (copy / "patients" / "P1" / "labels" / "lungs" / "zarr.json").stat().st_mtime_ns
    run(None, copy, stages=["segment"])
    assert cs.is_complete("P1", "segment")
    assert (copy / "patients" / "P1" / "labels" / "lungs" / "zarr.json").stat().st_mtime_ns != before
    listing = json.loads((copy / "patients" / "P1" / "labels" / "zarr.json").read_text())["attributes"]["ome"]
    assert listing["labels"] == ["lungs", "nodules"]
    # Plain xarray still opens the whole store (the label groups align with the patient's 2 mm grid).
    tree = xr.open_datatree(copy, engine="zarr")
    assert set(tree["patients/P1"].children) == {"nodules", "labels"}
