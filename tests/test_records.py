"""Failures, damage and warnings: one small document per patient under ``records/``, never the root."""
from __future__ import annotations

import json
import os

import xarray as xr

from lungzarr.errors import PatientError
from lungzarr.io.store import (DAMAGE_KEY, FAILURES_KEY, WARNINGS_KEY, CohortStore, open_cohort, read_damage,
                               read_failures, read_warnings)
from lungzarr.io.store.records import record_document_name


def _root(path):
    return json.loads((path / "zarr.json").read_text())


def _fail(store, patient, stage, reason="unreadable", file=None):
    store.record_failure(PatientError(reason, patient=patient, stage=stage, file=file))


def test_a_record_is_its_patients_document_and_the_root_does_not_change(tmp_path):
    path = tmp_path / "s.zarr"
    store = CohortStore(path)
    store._ready_to_record()
    before = os.stat(path / "zarr.json")
    for k in range(50):
        _fail(store, f"P{k:02d}", "ingest")
    store.record_warnings("P01", "ingest", [{"file": "a.dcm", "reason": "edge slice dropped"}])
    store.record_damage({"P02": [{"stage": "segment", "array": "lungs", "chunk": "0/0/0", "kind": "checksum",
                                  "file": "c/0/0/0", "reason": "changed"}]})
    after = os.stat(path / "zarr.json")
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    doc = json.loads((path / "records" / "P01" / "zarr.json").read_text())
    assert doc["node_type"] == "group"
    assert [f["stage"] for f in doc["attributes"][FAILURES_KEY]] == ["ingest"]
    assert [w["reason"] for w in doc["attributes"][WARNINGS_KEY]] == ["edge slice dropped"]
    assert len(store.failures()) == 50 and len(read_failures(path)) == 50
    assert read_damage(path)[["patient", "chunk"]].values.tolist() == [["P02", "0/0/0"]]
    # zarr sees the documents as groups of the store
    assert xr.open_datatree(path, engine="zarr", group="records/P01", consolidated=False).attrs[FAILURES_KEY][0]["patient"] == "P01"


def test_a_failure_per_patient_and_stage_the_latest_and_a_cleared_patient_leaves_no_document(tmp_path):
    path = tmp_path / "s.zarr"
    store = CohortStore(path)
    _fail(store, "P1", "ingest", "first")
    _fail(store, "P1", "segment", "other stage")
    _fail(store, "P1", "ingest", "second")
    assert sorted((f["stage"], f["reason"]) for f in store.failures()) == [("ingest", "second"),
                                                                          ("segment", "other stage")]
    store.clear_failure("P1", "ingest")
    store._clear_committed("P1", "segment", whole_patient=False)
    assert store.failures() == []
    assert not (path / "records" / "P1").exists()  # the documents present are the patients with records
    store.record_warnings("P1", "ingest", [])  # nothing to clear: nothing written
    assert not (path / "records" / "P1").exists()


def test_an_id_that_cannot_name_a_group_gets_a_digest_document(tmp_path):
    path = tmp_path / "s.zarr"
    store = CohortStore(path)
    for bad in ("bad name", "__x", "zarr.json", "../up", None):
        _fail(store, bad, "ingest", f"refused {bad}")
    names = sorted(p.name for p in (path / "records").iterdir() if p.is_dir())
    assert len(names) == 5 and all(n.startswith("__") and len(n) == 26 for n in names)
    assert sorted(str(f["patient"]) for f in store.failures()) == sorted(
        ["bad name", "__x", "zarr.json", "../up", "None"])
    assert record_document_name("P-1.a_b") == "P-1.a_b"
    assert record_document_name("bad name") != record_document_name("bad_name")


def test_an_older_stores_root_records_are_read_then_moved_by_its_next_writer(tmp_path):
    path = tmp_path / "s.zarr"
    CohortStore(path)
    # What lungzarr before issue 29 kept in the root zarr.json.
    legacy = {
        FAILURES_KEY: [{"patient": "P1", "stage": "ingest", "file": "a", "reason": "old", "time": "2026-01-01T00:00:00"},
                       {"patient": "bad name", "stage": "ingest", "file": None, "reason": "name",
                        "time": "2026-01-01T00:00:01"}],
        WARNINGS_KEY: [{"patient": "P2", "stage": "input", "file": "x.zip", "reason": "an archive",
                        "time": "2026-01-01T00:00:02"}],
        DAMAGE_KEY: [{"patient": "P3", "stage": "segment", "array": "lungs", "chunk": "0/0/0", "kind": "checksum",
                      "file": "f", "reason": "changed", "time": "2026-01-01T00:00:03"}],
    }
    meta = _root(path)
    meta["attributes"].update(legacy)
    (path / "zarr.json").write_text(json.dumps(meta))

    reader = CohortStore(path, mode="r")
    assert [f["reason"] for f in reader.failures()] == ["old", "name"]
    assert reader.warnings() == legacy[WARNINGS_KEY] and reader.damage() == legacy[DAMAGE_KEY]
    assert FAILURES_KEY not in open_cohort(path).attrs  # records are tables of their own
    assert not (path / "records").exists()  # reading wrote nothing

    writer = CohortStore(path)
    _fail(writer, "P1", "segment", "new")  # the first record write moves the root's records first
    assert not set(legacy) & set(_root(path)["attributes"])
    assert sorted((f["patient"], f["stage"], f["reason"]) for f in read_failures(path).to_dict("records")) == [
        ("P1", "ingest", "old"), ("P1", "segment", "new"), ("bad name", "ingest", "name")]
    assert read_warnings(path).to_dict("records") == legacy[WARNINGS_KEY]
    assert read_damage(path)["patient"].tolist() == ["P3"]


def test_a_commit_after_an_older_stores_records_drops_the_patients_moved_failure(tmp_path):
    path = tmp_path / "s.zarr"
    CohortStore(path)
    meta = _root(path)
    meta["attributes"][FAILURES_KEY] = [{"patient": "P1", "stage": "ingest", "file": None, "reason": "old",
                                         "time": "2026-01-01T00:00:00"}]
    (path / "zarr.json").write_text(json.dumps(meta))
    # A run whose first record write is a commit's look (no failure or warning before it).
    CohortStore(path)._clear_committed("P1", "ingest", whole_patient=True)
    assert read_failures(path).empty
    assert FAILURES_KEY not in _root(path)["attributes"]


def test_a_move_killed_half_way_moves_again_and_the_newer_record_wins(tmp_path):
    path = tmp_path / "s.zarr"
    store = CohortStore(path)
    _fail(store, "P1", "ingest", "newer")  # moved already (a run killed before the root was rewritten)
    meta = _root(path)
    meta["attributes"][FAILURES_KEY] = [
        {"patient": "P1", "stage": "ingest", "file": None, "reason": "older", "time": "2026-01-01T00:00:00"},
        {"patient": "P2", "stage": "ingest", "file": None, "reason": "p2", "time": "2026-01-01T00:00:00"}]
    (path / "zarr.json").write_text(json.dumps(meta))
    assert sorted(f["reason"] for f in CohortStore(path, mode="r").failures()) == ["newer", "p2"]
    assert CohortStore(path)._move_root_records() == 2
    assert sorted(f["reason"] for f in CohortStore(path, mode="r").failures()) == ["newer", "p2"]
    assert CohortStore(path)._move_root_records() == 0


def test_records_on_an_object_store_are_one_object_per_patient(tmp_path):
    """On a real S3 server (moto on loopback): the same documents as objects, read back, cleared."""
    import uuid

    import boto3

    from s3_server import moto_s3

    with moto_s3(key_id=f"LZRECKEY{uuid.uuid4().hex[:10].upper()}", secret=f"lz-{uuid.uuid4().hex}"):
        bucket = f"lz-{uuid.uuid4().hex[:12]}"
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/c.zarr"
        store = CohortStore(url)
        _fail(store, "P1", "ingest", "unreadable")
        _fail(store, "bad name", "ingest", "its name")
        store.record_warnings("P2", "input", [{"file": "x.zip", "reason": "an archive"}])
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="c.zarr/records/")["Contents"])
        assert keys[0] == "c.zarr/records/P1/zarr.json" and len(keys) == 4  # P1, P2, the digest, the group
        assert FAILURES_KEY not in json.loads(s3.get_object(Bucket=bucket, Key="c.zarr/zarr.json")["Body"].read())[
            "attributes"]
        reader = CohortStore(url, mode="r")
        assert sorted(f["reason"] for f in reader.failures()) == ["its name", "unreadable"]
        assert [w["file"] for w in reader.warnings()] == ["x.zip"]
        store._clear_committed("P1", "ingest", whole_patient=True)
        store.record_warnings("P2", "input", [])
        left = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="c.zarr/records/")["Contents"])
        assert len(left) == 2 and "c.zarr/records/P1/zarr.json" not in left


def test_reading_every_record_while_a_writer_removes_one_reads_again(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    store = CohortStore(path)
    _fail(store, "P1", "ingest")
    _fail(store, "P2", "ingest")
    reader = CohortStore(path, mode="r")
    listed = reader._backend.node_metadata
    calls = []

    def racing(group):
        calls.append(group)
        if len(calls) == 1:  # the writer clears P1 between this reader's listing and its read
            store.clear_failure("P1", "ingest")
            raise FileNotFoundError(str(path / group / "P1" / "zarr.json"))
        return listed(group)

    monkeypatch.setattr(reader._backend, "node_metadata", racing)
    assert [f["patient"] for f in reader.failures()] == ["P2"] and len(calls) == 2


def test_a_task_opens_the_store_without_looking_for_it(tmp_path, monkeypatch):
    """A task on a worker (mode "r+") writes the store its run made without opening the root or looking for
    its groups, which "a" does (five requests per task on object storage)."""
    import zarr

    path = tmp_path / "s.zarr"
    CohortStore(path)
    opened = []
    real = zarr.open_group
    monkeypatch.setattr(zarr, "open_group", lambda *a, **k: opened.append(k.get("path")) or real(*a, **k))
    task_store = CohortStore(path, mode="r+")
    assert opened == []
    CohortStore(path)
    assert opened == [None]  # "a": the root
    _fail(task_store, "P1", "ingest")  # and it writes
    assert [f["patient"] for f in CohortStore(path, mode="r").failures()] == ["P1"]


_ROOT_READS = {"target": None, "count": 0}


def _count_root_reads(event, args):
    if event == "open" and _ROOT_READS["target"] is not None and args and str(args[0]) == _ROOT_READS["target"]:
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        if "r" in mode and "+" not in mode:
            _ROOT_READS["count"] += 1


def test_a_patients_stages_do_not_read_the_roots_metadata(tmp_path):
    """Writing a patient's stages reads no ``zarr.json`` above its group: zarr's look for parent groups
    before each array (through a store rooted at the group), a task's look for an older store's listing, a
    commit's look for records (one small document). On S3 each was a request; the root's reads of a run are
    the same for 1 patient as for 3."""
    import sys

    import dask

    from dicom_phantoms import make_patient
    from lungzarr.pipeline import run

    sys.addaudithook(_count_root_reads)  # stays for the process: inert while no target is set
    counts = {}
    for n in (1, 3):
        for k in range(n):
            make_patient(tmp_path / f"in{n}" / f"P{k}", seed=k)
        store = (tmp_path / f"s{n}.zarr").resolve()
        run(tmp_path / f"in{n}", store, stages=["ingest"])  # the store made: its root written
        _ROOT_READS.update(target=str(store / "zarr.json"), count=0)
        try:
            with dask.config.set(scheduler="synchronous"):
                summaries = run(tmp_path / f"in{n}", store, stages=["ingest", "segment"], overwrite=True)
        finally:
            counts[n] = _ROOT_READS["count"]
            _ROOT_READS["target"] = None
        assert all(len(s.done) == n for s in summaries)
    assert counts[3] == counts[1], counts
