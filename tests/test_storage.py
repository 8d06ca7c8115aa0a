"""The cohort store after ingest: lazy DataTree, millimetre coordinates, provenance, the writer lock."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pydicom
import pytest
import xarray as xr
from dask.callbacks import Callback
from typer.testing import CliRunner

import lungzarr
from lungzarr.algorithms.resample import resample_to_2mm_numpy
from lungzarr.cli import app
from lungzarr.errors import LungzarrError, StoreLockedError
from lungzarr.io import dicom
from lungzarr.io.store import STAGING_GROUP, CohortStore, open_cohort, read_failures
from lungzarr.pipeline import ingest

from dicom_phantoms import make_patient

REPO = Path(__file__).resolve().parents[1]
LIDC = "LIDC-IDRI-0001"


class TaskCounter(Callback):
    """Counts the dask tasks that run while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def _pretask(self, key, dsk, state):
        self.count += 1


@pytest.fixture(scope="module")
def lidc_store(tmp_path_factory):
    from conftest import LIDC_DIR, shared_path

    lidc = shared_path(LIDC_DIR)
    root = tmp_path_factory.mktemp("store") / "input"
    root.mkdir()
    (root / LIDC).symlink_to(lidc, target_is_directory=True)
    make_patient(root / "PHANTOM1")
    store = root.parent / "cohort.zarr"
    summary = ingest(root, store, chunk_slices=8)
    assert summary.done == [LIDC, "PHANTOM1"], summary.failed
    return lidc, store


@pytest.mark.requires_shared
def test_open_cohort_is_a_lazy_datatree(lidc_store):
    _, store = lidc_store
    with TaskCounter() as counter:
        tree = open_cohort(store)
        ds = tree[f"patients/{LIDC}"].to_dataset()
        axial = ds.hu.sel(z=-116.0, method="nearest")
        slab = ds.hu_2mm.isel(z2=slice(3, 9)).sel(y2=slice(0, 80))
    assert isinstance(tree, xr.DataTree)
    assert counter.count == 0                       # opening and selecting computed nothing
    for var in ("hu", "hu_2mm"):
        assert isinstance(ds[var].data, da.Array)
        assert ds[var].dtype == np.int16
    assert ds.hu.data.chunks[0] == (8, 8)           # the ingest's z chunks, y/x whole
    assert ds.hu.dims == ("z", "y", "x") and ds.hu_2mm.dims == ("z2", "y2", "x2")
    assert isinstance(axial.data, da.Array) and isinstance(slab.data, da.Array)
    with TaskCounter() as counter:
        values = axial.values
    assert counter.count > 0
    hu, grid = dicom.load_hu(lidc_store[0])
    k = int(np.argmin(np.abs(grid.axis(0) + 116.0)))
    np.testing.assert_array_equal(values, hu[k])
    assert sorted(tree["patients"].children) == [LIDC, "PHANTOM1"]


@pytest.mark.requires_shared
def test_open_cohort_reads_no_voxel_until_asked(lidc_store, tmp_path):
    # Stronger than counting tasks: with the voxel chunks gone from disk, opening and selecting
    # still work; only computing needs them.
    store = shutil.copytree(lidc_store[1], tmp_path / "copy.zarr")
    shutil.rmtree(store / "patients" / LIDC / "hu" / "c")
    tree = open_cohort(store)
    ds = tree[f"patients/{LIDC}"].to_dataset()
    sub = ds.hu.isel(z=slice(0, 4)).sel(x=slice(-50, 50))
    assert sub.shape[0] == 4
    assert ds.hu.encoding["fill_value"] == 0
    np.testing.assert_array_equal(sub.values, 0)    # computing reads the (now missing) chunks: fill value
    assert ds.hu_2mm.isel(z2=0).values.std() > 0     # the other array is untouched


@pytest.mark.requires_shared
def test_coordinates_are_patient_millimetres(lidc_store):
    lidc, store = lidc_store
    ds = open_cohort(store)[f"patients/{LIDC}"].to_dataset()
    headers = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in lidc.iterdir()),
                     key=lambda h: float(h.ImagePositionPatient[2]))
    ipp = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    row_mm, col_mm = (float(v) for v in headers[0].PixelSpacing)
    np.testing.assert_allclose(ds.z.values, ipp[:, 2])
    np.testing.assert_allclose(ds.y.values, ipp[0, 1] + row_mm * np.arange(512))
    np.testing.assert_allclose(ds.x.values, ipp[0, 0] + col_mm * np.arange(512))
    assert list(ds.sop_instance_uid.values) == [str(h.SOPInstanceUID) for h in headers]
    # 2 mm grid: corner-aligned zoom, true step (n_in - 1) / (n_out - 1) x spacing, same origin.
    n2 = ds.sizes["z2"], ds.sizes["y2"], ds.sizes["x2"]
    assert n2 == (20, 180, 180)
    np.testing.assert_allclose(ds.z2.values, ipp[0, 2] + np.arange(20) * 15 / 19 * 2.5)
    np.testing.assert_allclose(ds.y2.values, ipp[0, 1] + np.arange(180) * 511 / 179 * row_mm)
    np.testing.assert_allclose(ds.x2.values, ipp[0, 0] + np.arange(180) * 511 / 179 * col_mm)
    assert ds.z2.values[-1] == pytest.approx(ipp[-1, 2])          # corners meet
    for name in ("z", "y", "x", "z2", "y2", "x2"):
        assert ds[name].attrs["units"] == "mm"
    assert ds.hu.attrs["units"] == "HU"


@pytest.mark.requires_shared
def test_provenance_attrs(lidc_store):
    lidc, store = lidc_store
    ds = open_cohort(store)[f"patients/{LIDC}"].to_dataset()
    first = pydicom.dcmread(next(lidc.iterdir()), stop_before_pixels=True)
    attrs = ds.attrs
    assert attrs["patient"] == LIDC
    assert attrs["source_folder"] == str(store.parent / "input" / LIDC)
    assert attrs["series_instance_uid"] == str(first.SeriesInstanceUID)
    assert attrs["lungzarr_version"] == lungzarr.__version__
    assert attrs["spacing_mm"] == pytest.approx([2.5, 0.703125, 0.703125])
    assert attrs["orientation"] == pytest.approx([1, 0, 0, 0, 1, 0])
    assert attrs["n_files_used"] == 16 and attrs["n_files_skipped"] == 0
    assert attrs["acquisition_number"] is None
    assert attrs["grid_2mm"]["shape"] == [20, 180, 180]
    assert attrs["grid_2mm"]["step_mm"][0] == pytest.approx(15 / 19 * 2.5)
    stage = attrs["lungzarr:stages"]["ingest"]
    assert stage["series_instance_uid"] == attrs["series_instance_uid"] and stage["chunk_slices"] == 8
    assert stage["lungzarr_version"] == lungzarr.__version__ and stage["completed"]
    assert CohortStore(store, mode="r")._root(mode="r").attrs["lungzarr:version"] == lungzarr.__version__


@pytest.mark.requires_shared
def test_stored_volumes_equal_the_in_memory_reference(lidc_store):
    lidc, store = lidc_store
    ds = CohortStore(store, mode="r").open_patient(LIDC)
    hu, grid = dicom.load_hu(lidc)
    np.testing.assert_array_equal(ds.hu.values, hu)
    hu_2mm, _ = resample_to_2mm_numpy(hu, grid)
    np.testing.assert_array_equal(ds.hu_2mm.values, hu_2mm)


def test_read_api_on_a_missing_store(tmp_path):
    with pytest.raises(LungzarrError, match="no lungzarr store at .*run `lungzarr ingest INPUT"):
        open_cohort(tmp_path / "nothing.zarr")
    assert not (tmp_path / "nothing.zarr").exists()


def test_read_failures_of_a_clean_store(tmp_path):
    make_patient(tmp_path / "in" / "P1")
    ingest(tmp_path / "in", tmp_path / "s.zarr")
    frame = read_failures(tmp_path / "s.zarr")
    assert frame.empty and list(frame.columns) == ["patient", "stage", "file", "reason", "time"]


def test_warnings_are_replaced_per_patient_and_stage(tmp_path):
    from lungzarr.io.store import read_warnings

    make_patient(tmp_path / "in" / "P1")
    ingest(tmp_path / "in", tmp_path / "s.zarr")
    store = CohortStore(tmp_path / "s.zarr")
    store.record_warnings("P1", "ingest", [{"file": tmp_path / "a.dcm", "reason": "edge slice dropped"}])
    store.record_warnings("P2", "input", [{"file": None, "reason": "hidden folder"}])
    frame = read_warnings(tmp_path / "s.zarr").fillna({"file": ""})
    assert list(frame.columns) == ["patient", "stage", "file", "reason", "time"]
    assert frame[["patient", "stage", "file", "reason"]].values.tolist() == [
        ["P1", "ingest", str(tmp_path / "a.dcm"), "edge slice dropped"], ["P2", "input", "", "hidden folder"]]
    store.record_warnings("P1", "ingest", [])      # what is no longer true goes away
    assert read_warnings(tmp_path / "s.zarr").patient.tolist() == ["P2"]


# ---------------------------------------------------------------------- the writer lock

_HOLD_LOCK = """
import sys
from lungzarr.io.store import CohortStore
store = CohortStore(sys.argv[1])
with store.lock():
    if len(sys.argv) > 2:
        # A run in the middle of writing a patient: its staged group exists, not yet marked.
        store._zarr.open_group(store.path, path="staging/" + sys.argv[2], mode="w", zarr_format=3)
    print("locked", flush=True)
    sys.stdin.read()          # hold until the test closes stdin
"""


@pytest.fixture
def lock_holder(tmp_path):
    """Start a process that holds the store's lock (and stages patient 'P9'); yield (store, its pid)."""
    store = tmp_path / "cohort.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(store), "P9"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield store, proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_lock_refuses_a_second_writer(lock_holder, tmp_path):
    store, pid = lock_holder
    with pytest.raises(StoreLockedError) as info:
        with CohortStore(store).lock():
            pass
    message = str(info.value)
    assert f"pid {pid}" in message and str(store) in message
    assert "wait for that run to finish" in message

    make_patient(tmp_path / "input" / "P1")
    with pytest.raises(StoreLockedError):
        ingest(tmp_path / "input", store)
    assert CohortStore(store, mode="r").patients() == []
    # The other run's half-written patient is its business: a refused writer must not touch it.
    assert (store / STAGING_GROUP / "P9" / "zarr.json").exists()

    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "input"), str(store), "--scheduler", "threads"])
    assert result.exit_code == 2
    assert "".join(f"is being written by pid {pid}".split()) in "".join(result.output.split())
    assert (store / STAGING_GROUP / "P9" / "zarr.json").exists()


def test_lock_is_released_when_the_holder_ends(tmp_path):
    store = tmp_path / "cohort.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(store)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    proc.kill()                                      # killed, not a clean exit: the kernel frees the lock
    proc.wait(timeout=30)
    make_patient(tmp_path / "input" / "P1")
    assert ingest(tmp_path / "input", store).done == ["P1"]


def test_lock_follows_the_resolved_store(lock_holder, tmp_path, monkeypatch):
    """A symlink to the store, a relative path or ``a/../store`` names the same lock."""
    store, pid = lock_holder
    (tmp_path / "link.zarr").symlink_to(store, target_is_directory=True)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    for spelling in (tmp_path / "link.zarr", Path("cohort.zarr"), Path("sub/../cohort.zarr"),
                     Path("link.zarr"), tmp_path / "sub" / ".." / "link.zarr"):
        with pytest.raises(StoreLockedError, match=f"pid {pid}"):
            with CohortStore(spelling).lock():
                pass
    assert CohortStore(tmp_path / "link.zarr").lock_path == CohortStore(store).lock_path == \
        tmp_path / "cohort.zarr.lock"
    make_patient(tmp_path / "input" / "P1")
    with pytest.raises(StoreLockedError):
        ingest(tmp_path / "input", tmp_path / "link.zarr")
    assert CohortStore(store, mode="r").patients() == []
    assert not (tmp_path / "link.zarr.lock").exists()


def test_lock_file_is_removed_after_a_clean_run(tmp_path):
    make_patient(tmp_path / "input" / "P1")
    store = tmp_path / "cohort.zarr"
    with CohortStore(store).lock():
        assert (tmp_path / "cohort.zarr.lock").read_text().startswith(f"pid {os.getpid()} since ")
    assert not (tmp_path / "cohort.zarr.lock").exists()
    assert ingest(tmp_path / "input", store).done == ["P1"]
    assert not (tmp_path / "cohort.zarr.lock").exists()


def test_a_writer_that_opened_the_removed_lock_file_locks_the_new_one(tmp_path):
    """A process that opened the lock file just before the holder removed it must not hold a lock on nothing."""
    import fcntl

    store = CohortStore(tmp_path / "cohort.zarr")
    lock_path = store.lock_path
    stale = open(lock_path, "a+")                    # opened, then its name goes away and comes back as a new file
    fcntl.flock(stale.fileno(), fcntl.LOCK_EX)
    os.unlink(lock_path)
    try:
        with store.lock():
            # Ours is the file the name points to, so a third writer is refused, not let in beside us.
            assert lock_path.read_text().startswith(f"pid {os.getpid()} ")
            with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
                with CohortStore(tmp_path / "cohort.zarr").lock():
                    pass
    finally:
        stale.close()
    assert not lock_path.exists()


def test_lazy_array_equals_the_datasets_variable_and_is_named_per_patient_and_store(tmp_path):
    root = tmp_path / "in"
    make_patient(root / "P1", seed=1)
    shutil.copytree(root / "P1", root / "P2")
    stores = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    for store in stores:
        ingest(root, store, chunk_slices=4)
    cohort = CohortStore(stores[0], mode="r")
    lazy, opened = cohort.lazy_array("P1", "hu_2mm"), cohort.open_patient("P1").hu_2mm.data
    assert lazy.dtype == opened.dtype and lazy.chunks == opened.chunks
    np.testing.assert_array_equal(lazy.compute(), opened.compute())
    # Same files, other patient or other store: never one key (dask would merge them).
    names = {cohort.lazy_array("P1", "hu_2mm").name, cohort.lazy_array("P2", "hu_2mm").name,
             CohortStore(stores[1], mode="r").lazy_array("P1", "hu_2mm").name}
    assert len(names) == 3
    with pytest.raises(LungzarrError, match="no array 'lungs'"):
        cohort.lazy_array("P1", "lungs")
    with pytest.raises(LungzarrError, match="not in store"):
        cohort.lazy_array("P3", "hu_2mm")


def test_lazy_array_name_changes_with_every_commit_even_when_the_metadata_stat_does_not(tmp_path, monkeypatch):
    """An object's mtime has 1 s resolution and a same-shape rewrite leaves its metadata unchanged: the name
    still changes with the patient's stage commits (each has its own id), so dask never merges the two."""
    root = tmp_path / "in"
    make_patient(root / "P1", seed=1)
    store = tmp_path / "s.zarr"
    ingest(root, store, chunk_slices=4)
    before = CohortStore(store, mode="r").lazy_array("P1", "hu_2mm").name
    meta = store / "patients" / "P1" / "hu_2mm" / "zarr.json"
    frozen = meta.stat()
    ingest(root, store, chunk_slices=4, overwrite=True)
    os.utime(meta, ns=(frozen.st_atime_ns, frozen.st_mtime_ns))  # as if rewritten within the same instant
    assert meta.stat().st_mtime_ns == frozen.st_mtime_ns and meta.stat().st_size == frozen.st_size
    assert CohortStore(store, mode="r").lazy_array("P1", "hu_2mm").name != before
