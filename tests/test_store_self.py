"""A store that knows itself, and inputs that change (issue 25: defects 6, 8, the table write of 9, 12's verify).

- ``verify`` names every patient the tables know whose group (or its ``zarr.json``) is gone, a group
  nobody wrote whole, stale tables and a patient's stale consolidated metadata (its listing);
  it writes nothing (``--repair`` does).
- ``open_cohort`` never serves a patient from a stale listing; the readers leave out
  (with a warning) or refuse the rows of a patient whose group is gone; a store without tables
  says so in one sentence.
- A table write that fails (a full disk) keeps the previous table.
- A DICOM file changed after ingest (rewritten, touched, added, removed) makes the next run ingest
  that patient again, with every stage computed from it, and say so.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import dask
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

import lungzarr.io.store.directory as storage
from lungzarr.cli import app
from lungzarr.errors import LungzarrError
from lungzarr.io.store import CohortStore, open_cohort, read_damage, read_nodules, read_patients, read_warnings
from lungzarr.pipeline import ingest, run, verify_store

from dicom_phantoms import make_patient

runner = CliRunner()
PATIENTS = ("P1", "P2", "P3")


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Three small phantom patients, ingested (chunks of 4 slices): (input folder, store)."""
    root = tmp_path_factory.mktemp("storeself")
    for seed, pid in enumerate(PATIENTS, start=1):
        make_patient(root / "input" / pid, seed=seed)
    with dask.config.set(scheduler="threads"):
        summary = ingest(root / "input", root / "base.zarr", chunk_slices=4)
    assert summary.done == list(PATIENTS), summary.failed
    return root / "input", root / "base.zarr"


@pytest.fixture
def cohort(base, tmp_path):
    """A copy of the base store to damage: (input folder, store)."""
    input_dir, clean = base
    return input_dir, Path(shutil.copytree(clean, tmp_path / "s.zarr"))


def _verify(store, **kwargs):
    with dask.config.set(scheduler="threads"):
        return verify_store(store, **kwargs)


def _snapshot(store: Path) -> dict:
    """Every file below the store (and the lock file beside it): size, mtime and content hash."""
    files = {}
    for p in sorted(store.rglob("*")) + [store.with_name(store.name + ".lock")]:
        if p.is_file():
            st = p.stat()
            files[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return files


# ---------------------------------------------------------------------- 1. what the store lost

def test_verify_names_a_removed_patient_and_a_group_that_lost_its_metadata(cohort):
    input_dir, store = cohort
    shutil.rmtree(store / "patients" / "P2")
    (store / "patients" / "P3" / "zarr.json").unlink()
    before = _snapshot(store)
    report = _verify(store)
    assert not report.ok
    lost = {(d["patient"], d["stage"], d["array"], d["kind"]): d for d in report.damage}
    assert set(lost) == {("P2", "ingest", None, "missing"), ("P3", "ingest", None, "missing")}
    assert "the group of patient 'P2' is gone from the store (named by the patients table)" in \
           lost["P2", "ingest", None, "missing"]["reason"]
    assert "patients/P3/zarr.json, which holds its stage markers) is gone" in \
           lost["P3", "ingest", None, "missing"]["reason"]
    assert report.damaged_stages() == {"P2": "ingest", "P3": "ingest"}
    found = {(d["array"], d["kind"]) for d in report.store_damage}
    assert found == {("tables/patients", "stale")}
    said = " ".join(d["reason"] for d in report.store_damage)
    assert "rows of 2 patient(s) whose group is gone ('P2', 'P3')" in said
    assert _snapshot(store) == before                    # report only: nothing written, no lock file

    result = runner.invoke(app, ["verify", str(store), "--scheduler", "threads"])
    assert result.exit_code == 1, result.output
    flat = _flat(result.output)
    assert "2 patient(s) damaged, 1 problem(s) of the store itself" in flat
    assert "damaged P2 (ingest): the group of patient 'P2' is gone from the store" in flat
    assert "`lungzarr run INPUT" in flat and "ingests it again" in flat
    assert read_damage(store).empty

    # --repair records it and rebuilds the tables; a run ingests them again.
    result = runner.invoke(app, ["verify", str(store), "--repair", "--scheduler", "threads"])
    assert result.exit_code == 1, result.output
    assert "repaired: cohort table(s) patients rebuilt from the patient groups (1 patient(s)" in _flat(result.output)
    assert sorted(read_damage(store).patient) == ["P2", "P3"]
    assert "damaged P2 (ingest)" in _flat(runner.invoke(app, ["status", str(store)]).output)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # the rebuilt table names no lost patient
        assert read_patients(store).patient.tolist() == ["P1"]
    s = CohortStore(store, mode="r")
    assert s.listing("P1") is not None and s.stale_listing("P1") == []
    with dask.config.set(scheduler="threads"):
        summary = ingest(input_dir, store, chunk_slices=4)
    assert summary.done == ["P2", "P3"] and summary.skipped == ["P1"]
    assert read_damage(store).empty and _verify(store).ok
    assert read_patients(store).patient.tolist() == list(PATIENTS)


def test_verify_names_a_lost_array_metadata_and_a_group_nobody_wrote(cohort):
    import zarr

    _, store = cohort
    (store / "patients" / "P1" / "hu" / "zarr.json").unlink()
    zarr.open_group(store / "patients" / "P9", mode="w", zarr_format=3)   # copied in by hand: no stage marker
    report = _verify(store)
    kinds = {(d["patient"], d["array"], d["kind"]) for d in report.damage}
    assert ("P1", "hu", "missing") in kinds and ("P9", None, "unrecorded") in kinds
    p9 = next(d for d in report.damage if d["patient"] == "P9")
    assert "has no completed stage (no stage marker" in p9["reason"]
    (stale,) = report.store_damage
    assert stale["array"] == "patients/P1 consolidated metadata" and stale["kind"] == "stale"
    assert "the consolidated metadata of patient 'P1' is stale (patients/P1/hu/zarr.json is gone)" in stale["reason"]
    assert report.stale_listings == ["P1"]
    # --repair lists P1's group afresh (without the lost array); P9, never listed, is left unlisted.
    result = runner.invoke(app, ["verify", str(store), "--repair", "--scheduler", "threads"])
    assert "repaired: consolidated metadata of 1 patient(s) written afresh (P1)" in _flat(result.output)
    s = CohortStore(store, mode="r")
    assert "hu" not in s.listing("P1") and "hu_2mm" in s.listing("P1") and s.listing("P9") is None
    with pytest.raises(LungzarrError, match=r"--patients \['NOPE'\] are not in store"):
        _verify(store, patients=["NOPE"])
    # Only the chosen patients: no store-wide findings.
    assert {d["patient"] for d in _verify(store, patients=["P9"]).damage} == {"P9"}


def test_open_cohort_never_serves_a_patient_or_an_array_from_stale_consolidated_metadata(cohort):
    _, store = cohort
    assert CohortStore(store, mode="r").listing("P1") is not None
    shutil.rmtree(store / "patients" / "P2")
    shutil.rmtree(store / "patients" / "P1" / "hu_2mm")
    with pytest.warns(UserWarning) as caught:
        tree = open_cohort(store)
    said = [str(w.message) for w in caught]
    assert any("the consolidated metadata of patient 'P1'" in m and "is stale (patients/P1/hu_2mm/zarr.json is "
               "gone)" in m and "not used" in m for m in said), said
    assert any("patients table" in m and "('P2'): those rows are left out" in m for m in said), said
    assert sorted(tree["patients"].children) == ["P1", "P3"]
    assert "hu_2mm" not in tree["patients/P1"].to_dataset()
    for pid in ("P1", "P3"):
        ds = tree[f"patients/{pid}"].to_dataset()
        for name, var in ds.data_vars.items():
            values = var.values
            assert values.min() != values.max(), (pid, name)   # no array read back as its fill value
    assert tree["tables/patients"].to_dataset().patient.values.tolist() == ["P1", "P3"]
    assert "hu_2mm" in CohortStore(store, mode="r").listing("P1")   # reading wrote nothing


def test_readers_leave_out_or_refuse_rows_of_a_removed_patient(cohort):
    _, store = cohort
    shutil.rmtree(store / "patients" / "P2")
    with pytest.warns(UserWarning, match=r"the patients table of store .* has 1 row\(s\) of 1 patient\(s\) whose "
                                         r"group is gone from the store \('P2'\): those rows are left out"):
        assert read_patients(store).patient.tolist() == ["P1", "P3"]
    with pytest.raises(LungzarrError, match=r"whose group is gone from the store \('P2'\); `lungzarr verify"):
        read_patients(store, missing="raise")
    with pytest.raises(ValueError, match="missing must be one of"):
        read_patients(store, missing="keep")


def test_readers_on_a_store_without_tables_say_so_in_one_sentence(cohort, tmp_path):
    _, store = cohort
    fresh = CohortStore(tmp_path / "fresh.zarr")                  # a store no run has written yet
    assert read_nodules(fresh.path).empty and read_patients(fresh.path).empty
    shutil.rmtree(store / "tables")
    for reader in (read_nodules, read_patients):
        with pytest.raises(LungzarrError) as err:
            reader(store)
        text = str(err.value)
        assert text == (f"store {str(store)!r} has no cohort tables (its tables/ group is gone); `lungzarr verify "
                        f"--repair {store}` rebuilds them from the patient groups")
    report = _verify(store)
    assert [(d["array"], d["kind"]) for d in report.store_damage] == [("tables", "missing")]
    result = runner.invoke(app, ["verify", str(store), "--repair", "--scheduler", "threads"])
    assert result.exit_code == 0, result.output
    assert read_patients(store).patient.tolist() == list(PATIENTS) and read_nodules(store).empty
    # A table pointer that names a group that is gone: the same kind of sentence.
    group = json.loads((store / "tables" / "zarr.json").read_text())["attributes"]["lungzarr:tables"]["patients"]
    shutil.rmtree(store / "tables" / group)
    with pytest.raises(LungzarrError, match=rf"the patients table of store .* \(tables/{group}\) cannot be read .*"
                                            rf"`lungzarr verify --repair"):
        read_patients(store)


# ---------------------------------------------------------------------- 2. verify writes nothing

def test_verify_writes_nothing_to_the_store(cohort, monkeypatch):
    """Root ignores write permissions, so every way the store writes is made to fail instead."""
    import zarr.storage

    _, store = cohort
    shutil.rmtree(store / "patients" / "P2")
    chunk = next(p for p in (store / "patients" / "P1" / "hu" / "c").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    for path in [store, *store.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)                # what a read-only store is (for anyone but root)
    before = _snapshot(store)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "read-only store (test)")

    async def refuse_async(*args, **kwargs):
        refuse()

    for name in ("replace_text", "rmtree", "commit_staged", "hold_lock"):
        monkeypatch.setattr(storage._DirectoryBackend, name, refuse)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", refuse_async)
    monkeypatch.setattr(zarr.storage.LocalStore, "delete", refuse_async)
    try:
        result = runner.invoke(app, ["verify", str(store), "--scheduler", "threads"])
        assert result.exit_code == 1, result.output
        flat = _flat(result.output)
        assert "damaged P2 (ingest)" in flat and "damaged P1 (ingest) hu: chunk" in flat, flat
        assert "fails its checksum" in flat
        assert _snapshot(store) == before
        assert not store.with_name(store.name + ".lock").exists()
    finally:
        for path in [store, *store.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_a_report_only_verify_says_when_a_run_is_writing_the_store(cohort):
    _, store = cohort
    with CohortStore(store).lock():
        report = _verify(store)
        assert report.ok and report.writer.startswith(f"pid {os.getpid()} since ")
        result = runner.invoke(app, ["verify", str(store), "--scheduler", "threads"])
        assert result.exit_code == 0 and "is writing this store" in _flat(result.output), result.output
    assert _verify(store).writer is None


# ---------------------------------------------------------------------- 3. a table write that fails

def _enospc_after(monkeypatch, n_writes: int, *, under: str = "tables/"):
    """Every write to a key below ``under`` after the first ``n_writes`` raises ENOSPC (a disk that fills)."""
    import zarr.storage

    real = zarr.storage.LocalStore.set
    seen = {"writes": 0}

    async def set_(self, key, value, *args, **kwargs):
        if key.startswith(under):
            seen["writes"] += 1
            if seen["writes"] > n_writes:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, key, value, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)
    return seen


# A packed table is 5 writes: the group's zarr.json, then each of its 2 blocks' zarr.json and chunk.
@pytest.mark.parametrize("n_writes", [0, 2, 4])
def test_a_table_write_that_fails_midway_keeps_the_previous_table(cohort, monkeypatch, n_writes):
    _, store = cohort
    old = read_patients(store)
    old_groups = sorted(p.name for p in (store / "tables").iterdir())
    s = CohortStore(store)
    seen = _enospc_after(monkeypatch, n_writes)
    new = old.assign(lung_volume_ml=1.0)
    with pytest.raises(LungzarrError, match=r"the patients table of store .* could not be written \(no space left "
                                            r"on the device\); the previous table is kept"):
        s.write_table("patients", new, dim="patient")
    assert seen["writes"] > n_writes                           # it failed where asked, midway through the group
    monkeypatch.undo()
    assert read_patients(store).equals(old)
    assert sorted(p.name for p in (store / "tables").iterdir()) == old_groups   # the partial group is gone


def test_a_failed_switch_of_the_table_pointer_keeps_the_previous_table(cohort, monkeypatch):
    _, store = cohort
    old = read_patients(store)
    s = CohortStore(store)
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == store / "tables" / "zarr.json":
            raise OSError(errno.ENOSPC, "No space left on device")   # the new pointer file could not be moved in
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(storage.os, "replace", replace)
    with pytest.raises(LungzarrError, match="no space left on the device"):
        s.write_table("patients", old.assign(lung_volume_ml=1.0), dim="patient")
    monkeypatch.undo()
    assert read_patients(store).equals(old)
    left = sorted(p.name for p in (store / "tables").iterdir())
    assert len([n for n in left if n.startswith("patients.")]) == 1 and not [n for n in left if n.endswith(".tmp")]


def test_disk_full_at_the_table_write_of_a_run_is_one_sentence_and_keeps_the_tables(cohort, monkeypatch, tmp_path):
    input_dir, store = cohort
    extra = Path(shutil.copytree(input_dir, tmp_path / "input"))
    make_patient(extra / "P4", seed=4)
    old = read_patients(store)
    _enospc_after(monkeypatch, 3)
    result = runner.invoke(app, ["ingest", str(extra), str(store), "--chunk-slices", "4", "--scheduler", "threads"])
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "could not be written (no space left on the device); the previous table is kept" in _flat(result.output)
    assert read_patients(store).equals(old)                   # not an empty frame
    said = " ".join(d["reason"] for d in _verify(store).store_damage)
    assert "the patients table lacks 1 patient(s) ('P4')" in said
    result = runner.invoke(app, ["verify", str(store), "--repair", "--scheduler", "threads"])
    assert result.exit_code == 0, result.output
    assert read_patients(store).patient.tolist() == [*PATIENTS, "P4"]


# ---------------------------------------------------------------------- 4. inputs that change

def _rewrite_pixels(path: Path, add: int) -> np.ndarray:
    """Add ``add`` to every stored value of one DICOM file (a re-export with other pixels); the new HU."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.int32) + add
    ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(path)
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _slice_of(store, patient, file):
    ds = CohortStore(store, mode="r").open_patient(patient)
    names = [Path(f).name for f in ds.dicom_file.values]
    return ds.hu.values[names.index(file.name)]


def test_a_changed_dicom_file_redoes_ingest_and_every_later_stage(tmp_path):
    input_dir = tmp_path / "input"
    files = make_patient(input_dir / "P1", seed=1)
    make_patient(input_dir / "P2", seed=2)
    store = tmp_path / "s.zarr"
    stages = ["ingest", "segment"]
    with dask.config.set(scheduler="threads"):
        first = run(input_dir, store, stages=stages, chunk_slices=4)
    assert [s.done for s in first] == [["P1", "P2"]] * 2
    record = CohortStore(store, mode="r").stages("P1")["ingest"]["input_files"]
    assert record["files"] == 12 and record["bytes"] == sum(f.stat().st_size for f in files)
    before = {p: CohortStore(store, mode="r").stages(p) for p in ("P1", "P2")}
    with dask.config.set(scheduler="threads"):
        again = run(input_dir, store, stages=stages, chunk_slices=4)
    assert [s.skipped for s in again] == [["P1", "P2"]] * 2       # nothing changed: nothing redone

    new_hu = _rewrite_pixels(files[5], 37)
    assert not np.array_equal(_slice_of(store, "P1", files[5]), new_hu)
    with dask.config.set(scheduler="threads"):
        summaries = run(input_dir, store, stages=stages, chunk_slices=4)
    assert [(s.done, s.skipped) for s in summaries] == [(["P1"], ["P2"])] * 2
    (redone,) = summaries[0].redone
    assert redone["patient"] == "P1" and "its INPUT files changed since it was ingested" in redone["reason"]
    assert "newest file now '0005.dcm'" in redone["reason"]
    np.testing.assert_array_equal(_slice_of(store, "P1", files[5]), new_hu)   # the new pixels reached hu
    after = {p: CohortStore(store, mode="r").stages(p) for p in ("P1", "P2")}
    for stage in stages:
        assert after["P1"][stage]["id"] != before["P1"][stage]["id"]
        assert after["P2"][stage]["id"] == before["P2"][stage]["id"]
    warned = read_warnings(store)
    assert any("its INPUT files changed" in r and "ingested again" in r for r in warned[warned.patient == "P1"].reason)
    assert "its INPUT files changed" in _flat(runner.invoke(app, ["status", str(store)]).output)

    # Touched only (same bytes, new mtime), through the CLI: it says so; `run --verify` checks it too.
    os.utime(files[0], ns=(files[0].stat().st_atime_ns, files[0].stat().st_mtime_ns + 10**9))
    result = runner.invoke(app, ["ingest", str(input_dir), str(store), "--chunk-slices", "4", "--scheduler",
                                 "threads"])
    assert result.exit_code == 0, result.output
    assert "redone P1 (ingest): its INPUT files changed since it was ingested" in _flat(result.output)
    (input_dir / "P2" / "notes.txt").write_text("a file added to the folder")
    with dask.config.set(scheduler="threads"):
        summaries = run(input_dir, store, stages=stages, chunk_slices=4, verify=True)
    assert [(s.done, s.skipped) for s in summaries] == [(["P2"], ["P1"]), (["P1", "P2"], [])]
    assert "13 of" in summaries[0].redone[0]["reason"]
    files[-1].unlink()                                       # one slice fewer
    with dask.config.set(scheduler="threads"):
        summaries = run(input_dir, store, stages=["ingest"], chunk_slices=4)
    assert summaries[0].done == ["P1"]
    assert CohortStore(store, mode="r").open_patient("P1").hu.shape[0] == 11


def test_a_store_written_before_fingerprints_is_not_redone(tmp_path):
    input_dir = tmp_path / "input"
    make_patient(input_dir / "P1", seed=1)
    store = tmp_path / "s.zarr"
    with dask.config.set(scheduler="threads"):
        ingest(input_dir, store, chunk_slices=4)
    s = CohortStore(store)
    attrs = s.patient_attrs("P1")
    del attrs["lungzarr:stages"]["ingest"]["input_files"]   # as an older lungzarr wrote it
    s._group(s.group_path("P1")).attrs.put(attrs)
    with dask.config.set(scheduler="threads"):
        summary = ingest(input_dir, store, chunk_slices=4)
    assert summary.skipped == ["P1"] and summary.redone == []


def test_an_object_changed_on_object_storage_redoes_its_patient(tmp_path):
    """INPUT on S3 (a loopback moto server): the fingerprint holds each object's ETag; a rewritten object
    (other bytes) redoes the patient, the same bytes written again (a new LastModified, the same ETag) do not."""
    import fsspec

    from lungzarr.pipeline.sources import input_fingerprint
    from s3_server import moto_s3

    files = make_patient(tmp_path / "local" / "P1", seed=1)
    with moto_s3(key_id="AKIATESTSTORESELF", secret="storeself-secret") as _:
        fs = fsspec.filesystem("s3")
        fs.mkdir("storeself")
        fs.put(str(tmp_path / "local" / "P1"), "storeself/cohort/P1", recursive=True)
        url = "s3://storeself/cohort"
        first = input_fingerprint(f"{url}/P1")
        assert first["files"] == 12 and first["bytes"] == sum(f.stat().st_size for f in files)
        store = tmp_path / "s.zarr"
        with dask.config.set(scheduler="threads"):
            assert ingest(url, store, chunk_slices=4).done == ["P1"]
        fs.pipe_file("storeself/cohort/P1/0003.dcm", files[3].read_bytes())     # the same bytes again
        assert input_fingerprint(f"{url}/P1")["sha256"] == first["sha256"]
        with dask.config.set(scheduler="threads"):
            assert ingest(url, store, chunk_slices=4).skipped == ["P1"]
        new_hu = _rewrite_pixels(files[3], 11)
        fs.pipe_file("storeself/cohort/P1/0003.dcm", files[3].read_bytes())
        with dask.config.set(scheduler="threads"):
            summary = ingest(url, store, chunk_slices=4)
        assert summary.done == ["P1"] and "its INPUT files changed" in summary.redone[0]["reason"]
        np.testing.assert_array_equal(_slice_of(store, "P1", files[3]), new_hu)


def test_the_size_status_gives_is_every_file_below_the_store(cohort):
    """``lungzarr status`` says the store's size: every file at every depth (chunks are several folders down),
    as a walk of the folder counts them, whatever a file outside the store holds."""
    _, store = cohort
    (store.parent / "beside.bin").write_bytes(b"x" * 12345)  # not in the store
    walked = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(store)
                 for name in names)
    deepest = max(len(Path(folder).relative_to(store).parts) for folder, _, names in os.walk(store) if names)
    assert deepest >= 4 and walked > 0
    assert CohortStore(store, mode="r").size_bytes() == walked


def test_a_commit_parses_the_cohorts_records_only_when_they_changed(cohort, monkeypatch):
    """Failures, damage and warnings are records in the root ``zarr.json``, which grows with them, and every
    patient's commit asks whether it has one to drop (issue 29: 14 ms a commit with 5,000 failures). The store
    parses the root again only when the file changed, and a record another writer added is still dropped."""
    from lungzarr.errors import PatientError

    _, store_path = cohort
    store, other = CohortStore(store_path), CohortStore(store_path)
    for i in range(200):
        store.record_failure(PatientError("unreadable", patient=f"X{i:03d}"), stage="ingest")
    parsed = []
    root_meta = CohortStore._root_meta
    monkeypatch.setattr(CohortStore, "_root_meta", lambda self: (parsed.append(1), root_meta(self))[1])
    store._clear_committed("P1", "segment", whole_patient=False)  # knows the root as it is now: one parse
    assert len(parsed) <= 1
    parsed.clear()
    for _ in range(10):
        store._clear_committed("P1", "segment", whole_patient=False)
        store.record_warnings("P1", "ingest", [])
    assert parsed == []
    # Another writer records a failure of P1: the next commit of P1's stage sees the root changed and drops it.
    other.record_failure(PatientError("a broken slice", patient="P1"), stage="segment")
    store._clear_committed("P1", "segment", whole_patient=False)
    failures = CohortStore(store_path, mode="r").failures()
    assert len(failures) == 200 and "P1" not in {f["patient"] for f in failures}
