"""Consolidated metadata per patient (issues 19 and 29): a patient opens with one metadata read whatever the
cohort's size, nothing lists the whole cohort, and a listing is never stale."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import xarray as xr

import lungzarr
from lungzarr.io.store import CohortStore, open_cohort, open_patient, open_patients
from lungzarr.pipeline import ingest

from dicom_phantoms import make_patient

PATIENTS = ("P1", "P2", "P3")


def _plain_open(path, patient):
    """``xr.open_dataset(STORE/patients/<id>, engine="zarr")`` as a user types it; the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = xr.open_dataset(path / "patients" / patient, engine="zarr")
    return ds, [str(w.message) for w in caught]


def _assert_listing_is_current(path, patient):
    """The patient's listing names exactly the nodes of its group on disk, each with its own zarr.json."""
    group = path / "patients" / patient
    meta = json.loads((group / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    on_disk = {}
    for node in group.rglob("zarr.json"):
        rel = node.parent.relative_to(group).as_posix()
        if rel == "." or "/c/" in f"/{rel}/":
            continue
        on_disk[rel] = json.loads(node.read_text())
    assert sorted(meta) == sorted(on_disk)
    for rel, node in on_disk.items():
        listed = dict(meta[rel])
        listed.pop("consolidated_metadata", None)
        assert listed == node, rel


def _has_listing(path, patient) -> bool:
    return "consolidated_metadata" in json.loads((path / "patients" / patient / "zarr.json").read_text())


@pytest.fixture
def cohort(tmp_path):
    root = tmp_path / "input"
    for seed, pid in enumerate(PATIENTS, start=1):
        make_patient(root / pid, seed=seed)
    return root, tmp_path / "cohort.zarr"


def test_a_run_lists_each_patient_in_its_own_group_and_nothing_lists_the_cohort(cohort, tmp_path):
    root, store = cohort
    ingest(root, store)
    assert "consolidated_metadata" not in json.loads((store / "zarr.json").read_text())
    for pid in PATIENTS:
        _assert_listing_is_current(store, pid)
        ds, caught = _plain_open(store, pid)          # plain xarray, its defaults: the listing, no warning
        assert not caught, caught
        assert {"hu", "hu_2mm"} <= set(ds.data_vars) and ds.attrs["patient"] == pid
    # The layout is zarr's own: zarr.consolidate_metadata of the group on a copy writes the same listing.
    import zarr

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(copy, path="patients/P2")
    ours = json.loads((store / "patients/P2/zarr.json").read_text())
    theirs = json.loads((copy / "patients/P2/zarr.json").read_text())
    assert ours == theirs
    # The group= spelling reads the same dataset (xarray looks for a listing at the store's root only, so
    # it warns that it found none there: documented in the store guide).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        by_group = xr.open_dataset(store, group="patients/P2", engine="zarr")
    xr.testing.assert_identical(by_group.load(), _plain_open(store, "P2")[0].load())


def test_a_patient_opens_without_reading_any_other_patient(cohort):
    root, store = cohort
    ingest(root, store)
    # Every other patient's metadata made unreadable: what opening P1 costs cannot depend on them.
    for pid in ("P2", "P3"):
        for meta in (store / "patients" / pid).rglob("zarr.json"):
            meta.write_text("{not json")
    expected = xr.open_dataset(store / "patients" / "P1", engine="zarr").load()
    tree = open_patient(store, "P1")
    xr.testing.assert_identical(tree.to_dataset().load(), expected)
    assert open_patients(store)["P1"].to_dataset().hu.shape == expected.hu.shape
    assert lungzarr.open_patient is open_patient
    assert CohortStore(store, mode="r").open_patient("P1").hu.shape == expected.hu.shape


def _calls(monkeypatch, method: str) -> list:
    """The first argument of each call of ``CohortStore.<method>`` from now on (the method still runs)."""
    calls, original = [], getattr(CohortStore, method)

    def counting(self, first, *args, **kwargs):
        calls.append(first)
        return original(self, first, *args, **kwargs)

    monkeypatch.setattr(CohortStore, method, counting)
    return calls


def test_open_patients_lists_ids_only_and_opens_each_on_access(cohort, monkeypatch):
    root, store = cohort
    ingest(root, store)
    opened = _calls(monkeypatch, "patient_source")
    trees = open_patients(store)
    assert opened == [] and list(trees) == list(PATIENTS) and len(trees) == 3 and "P2" in trees
    assert "NOPE" not in trees and "P2" in repr(trees)
    with pytest.raises(KeyError):
        trees["NOPE"]
    assert trees["P2"].attrs["patient"] == "P2" and opened == ["P2"]
    # The same node as open_cohort's.
    xr.testing.assert_identical(trees["P3"].to_dataset(), open_cohort(store)["patients/P3"].to_dataset())
    with pytest.raises(lungzarr.errors.LungzarrError, match=r"patient 'NOPE' is not in store .*`lungzarr status"):
        open_patient(store, "NOPE")
    assert sorted(open_cohort(store, patients=["P3", "P1"])["patients"].children) == ["P1", "P3"]
    with pytest.raises(lungzarr.errors.LungzarrError, match=r"patient 'NOPE' is not in store"):
        open_cohort(store, patients=["P1", "NOPE"])
    with pytest.raises(lungzarr.errors.LungzarrError, match=r"patient id '\.\./P1' cannot name a store group"):
        open_patient(store, "../P1")


def test_opening_a_patient_reads_its_group_metadata_once(cohort, monkeypatch):
    """One read of the group's zarr.json decides whether the patient is there and gives its listing (on
    object storage each read is a request: no existence check first)."""
    root, store = cohort
    ingest(root, store)
    reads = _calls(monkeypatch, "_node_meta")
    monkeypatch.setattr(CohortStore, "has_patient", lambda self, p: pytest.fail("an existence check first"))
    assert open_patient(store, "P2").attrs["patient"] == "P2"
    assert reads == ["patients/P2"]
    reads.clear()
    assert sorted(open_cohort(store, patients=["P3", "P1"])["patients"].children) == ["P1", "P3"]
    assert sorted(r for r in reads if r.startswith("patients/")) == ["patients/P1", "patients/P3"]


def test_open_cohort_is_the_same_tree_with_and_without_the_listings(cohort):
    root, store = cohort
    ingest(root, store)
    with_listing = open_cohort(store)
    s = CohortStore(store)
    for pid in PATIENTS:
        s._changing(pid)                  # what the first write of a run to each patient does
        assert not _has_listing(store, pid)
    without = open_cohort(store)
    assert sorted(with_listing["patients"].children) == sorted(without["patients"].children) == list(PATIENTS)
    for pid in PATIENTS:
        a, b = with_listing[f"patients/{pid}"].to_dataset(), without[f"patients/{pid}"].to_dataset()
        assert a.attrs == b.attrs
        xr.testing.assert_identical(a.load(), b.load())
    assert with_listing.attrs == without.attrs


def test_a_listing_is_dropped_while_its_patient_is_written_and_current_after_each_commit(cohort):
    root, store = cohort
    ingest(root, store)
    s = CohortStore(store)
    with s.lock():
        pending = s.prepare_task("P1", "segment", None)
        assert not _has_listing(store, "P1") and _has_listing(store, "P2")   # only the patient written
        ds, caught = _plain_open(store, "P1")                                # a reader in between: no listing
        assert "hu_2mm" in ds and [m for m in caught if "consolidated" in m]
        pending.commit()
        assert "segment" in s.stages("P1")
        _assert_listing_is_current(store, "P1")
    # A stage that adds arrays; a re-ingest (a new group swapped in); a removal.
    lungzarr.pipeline.run(None, store, stages=["segment"], patients=["P2"])
    listed = CohortStore(store, mode="r").listing("P2")
    assert {"lungs", "segmented"} <= set(listed)
    _assert_listing_is_current(store, "P2")
    ingest(root, store, patients=["P3"], overwrite=True)
    _assert_listing_is_current(store, "P3")
    with s.lock():
        s.remove_patient("P3")
    with pytest.warns(UserWarning, match=r"patients table .* \('P3'\): those rows are left out"):
        assert sorted(open_cohort(store)["patients"].children) == ["P1", "P2"]


def test_a_failed_stage_leaves_its_patient_unlisted_and_readable(cohort):
    root, store = cohort
    ingest(root, store)
    s = CohortStore(store)
    with pytest.raises(RuntimeError):
        with s.lock():
            s.prepare_task("P1", "segment", None)
            raise RuntimeError("killed mid-run")
    # Tasks of a failed run may still be writing: no listing, readers read each node.
    assert not _has_listing(store, "P1")
    assert open_patient(store, "P1").to_dataset().hu.shape == open_patient(store, "P2").to_dataset().hu.shape


def test_an_older_stores_cohort_listing_is_dropped_by_the_first_write(cohort):
    root, store = cohort
    ingest(root, store)
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(store)  # what lungzarr before per-patient listings left in the root
    assert "consolidated_metadata" in json.loads((store / "zarr.json").read_text())
    s = CohortStore(store)
    s.record_warnings("P1", "input", [{"file": "x.zip", "reason": "an archive"}])
    root_meta = json.loads((store / "zarr.json").read_text())
    assert "consolidated_metadata" not in root_meta
    assert "lungzarr:warnings" not in root_meta["attributes"]  # each patient's records are its own document
    assert s.warnings()[0]["file"] == "x.zip"
    assert CohortStore(store, mode="r").warnings()[0]["file"] == "x.zip"
    for pid in PATIENTS:
        _assert_listing_is_current(store, pid)


def test_a_listing_made_by_a_worker_is_spliced_in_as_the_same_document(cohort):
    """The client writes the worker's listing text into the group's zarr.json without parsing it: the file
    is the one a listing given as nodes writes (but for the marker's time and id), and zarr and xarray read it as consolidated."""
    from lungzarr.io.store import ListingText, PendingStage

    root, store = cohort
    ingest(root, store)
    s = CohortStore(store)
    group = s.group_path("P1")
    entries = s._backend.node_metadata(group)
    meta = entries.pop(".")
    record = {"depends_on": {"ingest": "x"}}
    PendingStage(s, "P1", "probe", None, record, group_path=group).commit()  # the listing read by the client
    as_nodes = (store / group / "zarr.json").read_text()
    s.unmark_stages("P1", ["probe"])
    PendingStage(s, "P1", "probe", None, record, group_path=group).commit(listing=ListingText(entries))
    as_text = (store / group / "zarr.json").read_text()
    drop_time = lambda text: {**json.loads(text), "attributes": {  # noqa: E731
        k: v if k != "lungzarr:stages" else {st: {**r, "completed": None, "id": None} for st, r in v.items()}
        for k, v in json.loads(text)["attributes"].items()}}
    assert drop_time(as_text) == drop_time(as_nodes)
    assert as_text.index('"consolidated_metadata"') > as_text.index('"attributes"')
    assert json.loads(as_text)["consolidated_metadata"] == json.loads(as_nodes)["consolidated_metadata"]
    assert meta["node_type"] == "group"
    _assert_listing_is_current(store, "P1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "failed to open consolidated metadata" warning
        ds = xr.open_zarr(store / group, consolidated=True)
    assert "hu" in ds and ds.hu.shape == open_patient(store, "P1").to_dataset().hu.shape
