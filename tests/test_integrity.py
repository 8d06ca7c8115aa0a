"""Integrity of a store: checksummed chunks, `lungzarr verify`, `run --verify` repairs, atomic cohort tables."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from test_pipeline import _assert_same_store, _assert_same_tables
from typer.testing import CliRunner

import lungzarr
from lungzarr.cli import app
from lungzarr.errors import LungzarrError
from lungzarr.io.store import CohortStore, read_damage
from lungzarr.pipeline import run, verify_store

REPO = Path(__file__).resolve().parents[1]
PATIENT = "SMALL-1"
runner = CliRunner()


@pytest.fixture(scope="module")
def one_small(tmp_path_factory):
    """One small phantom patient as DICOM and a clean full run of it: (input folder, store)."""
    from lungzarr.algorithms.phantom import PhantomNodule, chest_phantom
    from lungzarr.io.dicom import write_series

    root = tmp_path_factory.mktemp("integrity")
    hu, origin = chest_phantom(shape=(24, 96, 96), spacing=(2.5, 2.0, 2.0), seed=1,
                               nodules=(PhantomNodule(-30.0, -5.0, -35.0, 12.0),))
    write_series(hu, root / "input" / PATIENT, spacing=(2.5, 2.0, 2.0), origin=origin, patient_id=PATIENT)
    store = root / "clean.zarr"
    with dask.config.set(scheduler="threads"):
        summaries = run(root / "input", store, chunk_slices=8)
    assert all(s.done == [PATIENT] for s in summaries), [s.failed for s in summaries]
    return root / "input", store


def _arrays(store: Path):
    """(folder, metadata) of every zarr array under ``store``."""
    for meta in sorted(store.rglob("zarr.json")):
        doc = json.loads(meta.read_text())
        if doc["node_type"] == "array":
            yield meta.parent, doc


def test_every_array_is_checksummed_and_every_chunk_written(one_small):
    _, store = one_small
    arrays = list(_arrays(store))
    names = {str(folder.relative_to(store)) for folder, _ in arrays}
    # Voxels, coordinates, both child groups and both cohort tables are all covered.
    for name in ("hu", "hu_2mm", "lungs", "segmented", "nodule_prob", "z", "sop_instance_uid", "x2"):
        assert f"patients/{PATIENT}/{name}" in names
    assert any(n.startswith(f"patients/{PATIENT}/nodules/") for n in names)
    assert any(n.startswith(f"patients/{PATIENT}/dsb2017/") for n in names)
    assert any(n.startswith("tables/nodules.") for n in names) and any(n.startswith("tables/patients.")
                                                                      for n in names)
    for folder, doc in arrays:
        assert doc["codecs"][-1] == {"name": "crc32c"}, folder
        grid = [-(-n // c) for n, c in zip(doc["shape"], doc["chunk_grid"]["configuration"]["chunk_shape"])]
        files = [p for p in (folder / "c").rglob("*") if p.is_file()] if (folder / "c").exists() else []
        if not doc["shape"]:
            files = [folder / "c"] if (folder / "c").is_file() else []
        # nodule_prob is 0 outside the lungs and hu_2mm's edges are fill value: still written.
        assert len(files) == int(np.prod(grid)), folder


def test_a_flipped_byte_raises_on_read_instead_of_decoding(one_small, tmp_path):
    _, clean = one_small
    store = shutil.copytree(clean, tmp_path / "s.zarr")
    chunk = store / "patients" / PATIENT / "hu" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        CohortStore(store, mode="r").open_patient(PATIENT).hu.values


def test_verify_of_a_clean_store(one_small, tmp_path):
    _, clean = one_small
    store = shutil.copytree(clean, tmp_path / "s.zarr")
    result = runner.invoke(app, ["verify", str(store), "--scheduler", "threads"])
    assert result.exit_code == 0, result.output
    assert "1 patient(s)" in result.output and "no damage" in result.output
    assert read_damage(store).empty


def _damage_and_repair(input_dir, clean, store, damaged_array, expect_kind, redone, *, cli=False):
    """verify names the damage (exit 1) and writes nothing; then either ``verify --repair`` records it (status
    shows it) and unmarks the damaged stages and a plain run redoes them (``cli=False``), or ``run --verify``
    finds and redoes them itself (``cli=True``): both end in the clean store."""
    before = CohortStore(store, mode="r").stages(PATIENT)
    result = runner.invoke(app, ["verify", str(store), "--scheduler", "threads"])
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert f"damaged {PATIENT} ({redone[0]}) {damaged_array}:" in flat
    assert "run INPUT STORE --verify" in flat and "verify --repair STORE" in flat
    assert read_damage(store).empty                       # a plain verify records nothing
    assert CohortStore(store, mode="r").stages(PATIENT) == before

    if cli:
        # The clean store was made by the library's run: the CLI's run with the same (default) options
        # redoes the damaged stages into the same store.
        result = runner.invoke(app, ["run", str(input_dir), str(store), "--verify", "--chunk-slices", "8",
                                     "--scheduler", "threads"])
        assert result.exit_code == 0, result.output
    else:
        result = runner.invoke(app, ["verify", str(store), "--repair", "--scheduler", "threads"])
        assert result.exit_code == 1, result.output
        assert f"repaired: {PATIENT}: stage(s) {', '.join(redone)} unmarked" in " ".join(result.output.split())
        frame = read_damage(store)
        assert frame[["patient", "stage", "array", "kind"]].values.tolist() == [
            [PATIENT, redone[0], damaged_array, expect_kind]]
        status = runner.invoke(app, ["status", str(store)])
        assert status.exit_code == 0, status.output
        assert f"damaged {PATIENT} ({redone[0]}) {damaged_array}:" in " ".join(status.output.split())
        with dask.config.set(scheduler="threads"):
            summaries = run(input_dir, store, chunk_slices=8)
        done = [s.stage for s in summaries if s.done == [PATIENT]]
        assert done == list(redone), [s.as_dict() for s in summaries]
    after = CohortStore(store, mode="r").stages(PATIENT)
    for stage in ("ingest", "segment", "lungs3d", "detect", "nodules", "features"):
        assert (after[stage]["id"] != before[stage]["id"]) == (stage in redone), stage
    _assert_same_store(clean, store)
    _assert_same_tables(clean, store)
    assert read_damage(store).empty                       # the redone stages cleared their damage
    assert verify_store(store).ok
    assert f"damaged {PATIENT}" not in " ".join(runner.invoke(app, ["status", str(store)]).output.split())


def test_missing_chunk_of_hu_2mm_is_found_and_reingested(one_small, tmp_path):
    input_dir, clean = one_small
    store = shutil.copytree(clean, tmp_path / "s.zarr")
    (store / "patients" / PATIENT / "hu_2mm" / "c" / "1" / "0" / "0").unlink()
    _damage_and_repair(input_dir, clean, store, "hu_2mm", "missing",
                       ("ingest", "segment", "lungs3d", "detect", "nodules", "features"))


def test_overwritten_bytes_in_segmented_fail_the_checksum_and_segment_is_redone(one_small, tmp_path):
    input_dir, clean = one_small
    store = shutil.copytree(clean, tmp_path / "s.zarr")
    chunk = max((store / "patients" / PATIENT / "segmented" / "c").rglob("*"), key=lambda p: p.stat().st_size
                if p.is_file() else -1)
    data = bytearray(chunk.read_bytes())
    assert len(data) > 200
    middle = len(data) // 2 - 32
    data[middle:middle + 64] = bytes(64)
    chunk.write_bytes(bytes(data))
    _damage_and_repair(input_dir, clean, store, "segmented", "checksum",
                       ("segment", "detect", "nodules", "features"), cli=True)


def test_verify_names_every_kind_of_damage(one_small, tmp_path):
    _, clean = one_small
    store = shutil.copytree(clean, tmp_path / "s.zarr")
    group = store / "patients" / PATIENT
    shutil.rmtree(group / "nodule_prob")                                     # a whole array gone
    sub = next(p for p in sorted((group / "nodules").iterdir()) if (p / "c").is_dir())
    next(p for p in (sub / "c").rglob("*") if p.is_file()).write_bytes(b"not a chunk")
    report = verify_store(store, patients=[PATIENT])
    found = {(d["stage"], d["array"], d["kind"]) for d in report.damage}
    assert found == {("detect", "nodule_prob", "missing"), ("nodules", f"nodules/{sub.name}", "checksum")}
    assert report.damaged_stages() == {PATIENT: "detect"}
    with pytest.raises(LungzarrError, match=r"--patients \['NOPE'\] are not in store"):
        verify_store(store, patients=["NOPE"])


def test_verify_on_a_cluster_runs_one_task_per_patient_keyed_by_store_and_patient(one_small, tmp_path,
                                                                                  cpu_gpu_cluster):
    import distributed

    _, clean = one_small
    a = shutil.copytree(clean, tmp_path / "a.zarr")
    (tmp_path / "link.zarr").symlink_to(a)
    client, _ = cpu_gpu_cluster
    with distributed.get_task_stream(client) as stream:
        report = verify_store(tmp_path / "link.zarr", client=client)
    assert report.ok and report.patients == [PATIENT] and report.chunks > 0
    keys = [str(t["key"]) for t in stream.data if str(t["key"]).startswith("verify-")]
    assert len(keys) == 1 and keys[0].startswith(f"verify-{PATIENT}-")
    # Another store, same patient, same stage markers: another key.
    b = shutil.copytree(clean, tmp_path / "b.zarr")
    with distributed.get_task_stream(client) as stream:
        verify_store(b, client=client)
    assert [str(t["key"]) for t in stream.data if str(t["key"]).startswith("verify-")] != keys


# ---------------------------------------------------------------------- atomic cohort tables

_COLUMNS = [f"c{i:02d}" for i in range(38)]


def _versioned_frame(version: int) -> pd.DataFrame:
    """38 columns of mixed types, ``version`` + 5 rows, every cell telling its version."""
    n = version % 7 + 5
    data = {}
    for i, col in enumerate(_COLUMNS):
        kind = i % 4
        data[col] = (np.full(n, version, dtype=np.int64) if kind == 0 else
                     np.full(n, float(version)) if kind == 1 else
                     np.full(n, version % 2 == 0) if kind == 2 else
                     np.array([f"v{version}"] * n, dtype=object))
    return pd.DataFrame(data)


def _read_version(path) -> tuple[int, bool]:
    """The version a reader sees in the nodule table at ``path`` and whether the table is whole."""
    t = lungzarr.read_nodules(path)
    version = int(t["c00"].iloc[0]) if len(t) else -1
    whole = (list(t.columns) == _COLUMNS and len(t) == version % 7 + 5
             and bool((t["c01"] == float(version)).all()) and bool((t["c03"] == f"v{version}").all())
             and bool((t["c00"] == version).all()))
    return version, whole


class _Steps:
    """Hooks on CohortStore's table steps: ``at[point]`` runs when a writer or a reader reaches ``point``.

    The writer's steps (``write_table``): the new group written whole, ``before-switch``, the pointer moved,
    ``after-switch``, then for the old group ``before-remove`` and ``after-remove``. The reader's
    (``_current_table``): ``after-pointer`` (the pointer read), ``after-open`` (the group opened, not yet
    loaded), ``after-load`` (loaded, before the pointer is read again). Deterministic: the other party's
    action runs synchronously inside the hook, once, with the hooks off.
    """

    def __init__(self, monkeypatch):
        from lungzarr.io.store import backend as storage

        self.at, self.ran, self._busy, self.opens = {}, [], False, 0
        # The store removes folders through its backend (bound when a store is made: make stores after this).
        switch, pointer = CohortStore._switch_table, CohortStore._table_pointer
        open_group, load_group = CohortStore._open_table_group, CohortStore._load_table_group
        backends = (storage._DirectoryBackend, storage._ObjectBackend)
        rmtrees = {backend: backend.rmtree for backend in backends}

        def hooked_switch(store, *a, **k):
            self._hit("before-switch")
            switch(store, *a, **k)
            self._hit("after-switch")

        def hooked_rmtree(backend, *a, **k):
            self._hit("before-remove")
            rmtrees[type(backend)](backend, *a, **k)
            self._hit("after-remove")

        def hooked_pointer(store):
            result = pointer(store)
            # An action runs once (popped): at the reader's first pointer read.
            self._hit("after-pointer")
            return result

        def hooked_open(store, *a, **k):
            if not self._busy:
                self.opens += 1
            opened = open_group(store, *a, **k)
            self._hit("after-open")
            return opened

        def hooked_load(store, *a, **k):
            loaded = load_group(store, *a, **k)
            self._hit("after-load")
            return loaded

        monkeypatch.setattr(CohortStore, "_switch_table", hooked_switch)
        for backend in backends:
            monkeypatch.setattr(backend, "rmtree", hooked_rmtree)
        monkeypatch.setattr(CohortStore, "_table_pointer", hooked_pointer)
        monkeypatch.setattr(CohortStore, "_open_table_group", hooked_open)
        monkeypatch.setattr(CohortStore, "_load_table_group", hooked_load)

    def _hit(self, point):
        action = None if self._busy else self.at.pop(point, None)
        if action is not None:
            self._busy = True
            try:
                self.ran.append((point, action()))
            finally:
                self._busy = False


@pytest.mark.parametrize("point, expected", [("before-switch", 1), ("after-switch", 2), ("before-remove", 2),
                                             ("after-remove", 2)])
def test_a_read_at_every_step_of_a_table_write_sees_the_old_or_the_new_table_whole(tmp_path, monkeypatch,
                                                                                   point, expected):
    steps = _Steps(monkeypatch)
    store = CohortStore(tmp_path / "t.zarr")
    store.write_table("nodules", _versioned_frame(1), dim="nodule")
    steps.at[point] = lambda: _read_version(store.path)
    store.write_table("nodules", _versioned_frame(2), dim="nodule")
    assert steps.ran == [(point, (expected, True))]
    assert _read_version(store.path) == (2, True)


@pytest.mark.parametrize("point", ["after-pointer", "after-open", "after-load"])
@pytest.mark.parametrize("remove_old", [True, False], ids=["switch-and-remove", "switch-only"])
def test_a_table_replaced_during_a_read_is_read_whole(tmp_path, monkeypatch, point, remove_old):
    """The writer replaces the table between the reader's steps: the reader returns one version, whole."""
    from lungzarr.io.store import backend as storage

    steps = _Steps(monkeypatch)
    store = CohortStore(tmp_path / "t.zarr")
    store.write_table("nodules", _versioned_frame(1), dim="nodule")
    if not remove_old:  # a writer caught between its switch and its clean-up
        monkeypatch.setattr(storage._DirectoryBackend, "rmtree", lambda *a, **k: None)
    steps.at[point] = lambda: store.write_table("nodules", _versioned_frame(2), dim="nodule")
    steps.opens = 0
    version, whole = _read_version(store.path)
    assert [p for p, _ in steps.ran] == [point]             # the write did happen inside the read
    # ... between the reader's steps: its first attempt met the old table, then it read again.
    assert steps.opens == 2, steps.opens
    assert whole and version in (1, 2)
    if point != "after-load" or remove_old:
        # The reader's version was replaced before its check: it noticed and read the new one.
        assert version == 2
    assert _read_version(store.path) == (2, True)


def test_tables_are_replaced_through_the_pointer_and_read_by_every_reader(tmp_path):
    store_path = tmp_path / "t.zarr"
    store = CohortStore(store_path)
    for version in range(3):
        store.write_table("nodules", _versioned_frame(version), dim="nodule")
    # One table group left, reached through the pointer; the read API and the tree still see it.
    groups = [p.name for p in (store_path / "tables").iterdir() if p.is_dir()]
    assert len(groups) == 1 and groups[0].startswith("nodules.")
    pd.testing.assert_frame_equal(lungzarr.read_nodules(store_path), _versioned_frame(2), check_dtype=False)
    tree = lungzarr.open_cohort(store_path)
    assert list(tree["tables"].children) == ["nodules"]
    assert int(tree["tables/nodules"]["c00"].values[0]) == 2


def _write_per_column_table(store, group: str, frame, dim: str, attrs: dict | None = None) -> None:
    """A table group as lungzarr wrote it before the packed layout: one array per column, through xarray."""
    from lungzarr.io.store import encoding
    from lungzarr.io.store.tables import _frame_dataset

    ds = _frame_dataset(frame, dim=dim, attrs={**(attrs or {}), "columns": [str(c) for c in frame.columns]})
    encoding._checksummed(ds).to_zarr(store._zstore, group=f"tables/{group}", mode="w", **encoding._WRITE)


def test_tables_of_a_store_written_before_the_pointer_are_read_and_replaced(tmp_path):
    store = CohortStore(tmp_path / "old.zarr")
    old = _versioned_frame(3)
    # The layout before: the table in place at tables/nodules, one array per column, no pointer.
    _write_per_column_table(store, "nodules", old, "nodule")
    assert store._table_pointer() == {} and store.table_names() == ["nodules"]
    pd.testing.assert_frame_equal(lungzarr.read_nodules(store.path), old, check_dtype=False)
    store.write_table("nodules", _versioned_frame(4), dim="nodule")
    pd.testing.assert_frame_equal(lungzarr.read_nodules(store.path), _versioned_frame(4), check_dtype=False)
    assert not (store.path / "tables" / "nodules").exists()


def test_a_run_writes_a_per_column_table_again_packed_even_when_its_content_is_unchanged(one_small, tmp_path):
    """The migration of a store of the older layout: the end of the next run (gather_tables) writes each
    table packed, with the same rows."""
    import uuid

    from lungzarr.io.store.tablelayout import TABLE_LAYOUT
    from lungzarr.pipeline.tables import DIGEST_KEY, gather_tables

    _, clean = one_small
    path = shutil.copytree(clean, tmp_path / "old.zarr")
    store = CohortStore(path)
    frames = {}
    for name, dim in (("nodules", "nodule"), ("patients", "patient")):
        frames[name] = store.read_table(name)
        group = f"{name}.{uuid.uuid4().hex}"
        # As the older lungzarr left it: the same content and its digest, one array per column.
        _write_per_column_table(store, group, frames[name], dim, {DIGEST_KEY: store.table_attrs(name)[DIGEST_KEY]})
        store._switch_table(name, group)
        assert "layout" not in store.table_attrs(name)
    assert gather_tables(store)["written"] == ["nodules", "patients"]
    for name, frame in frames.items():
        assert store.table_attrs(name)["layout"] == TABLE_LAYOUT
        pd.testing.assert_frame_equal(store.read_table(name), frame)
    assert gather_tables(store)["written"] == []      # packed and unchanged: left in place


@pytest.mark.parametrize("k", range(6))
def test_a_packed_table_reads_back_as_the_one_array_per_column_table_did(tmp_path, k):
    """Each of test_cpu_stages' frames (mixed dtypes, -0.0, NaN, None, repeated index values), written in the
    packed layout and in the layout before it: the same DataFrame (dtypes included) and the same Dataset
    in open_cohort's tables node; a missing string reads as "" in both."""
    import uuid

    import xarray as xr
    from test_cpu_stages import _frames

    from lungzarr.io.store.tablelayout import TABLE_LAYOUT

    frame, dim = _frames()[k]
    frame = frame.reset_index(drop=True)
    packed, before = CohortStore(tmp_path / "packed.zarr"), CohortStore(tmp_path / "before.zarr")
    packed.write_table("nodules", frame, dim=dim)
    group = f"nodules.{uuid.uuid4().hex}"
    _write_per_column_table(before, group, frame, dim)
    before._switch_table("nodules", group)
    assert packed.table_attrs("nodules")["layout"] == TABLE_LAYOUT and "layout" not in before.table_attrs("nodules")
    a, b = packed.read_table("nodules"), before.read_table("nodules")
    if len(frame):
        pd.testing.assert_frame_equal(a, b)
        xr.testing.assert_equal(packed._table_dataset("nodules"), before._table_dataset("nodules"))
    else:  # the layout before read an empty string column as float64; the packed one keeps it a string
        assert list(a.columns) == list(b.columns) == [str(c) for c in frame.columns] and a.empty
    expected = frame.copy()
    for c in frame.columns:
        if frame[c].dtype == object or str(frame[c].dtype).startswith("str"):
            expected[c] = pd.Series([v if isinstance(v, str) else "" for v in frame[c]], dtype=object)
    pd.testing.assert_frame_equal(a, expected)
    # Floats bit for bit (-0.0 is not 0.0).
    for c in frame.columns:
        if frame[c].dtype.kind == "f":
            assert a[c].to_numpy().tobytes() == frame[c].to_numpy().tobytes(), c


def test_a_packed_table_is_a_few_arrays_in_few_chunks(tmp_path, monkeypatch):
    """The nodule and patient tables of a run: at most three arrays each, split into chunks of at most
    tablelayout.CHUNK_BYTES by rows, every chunk checksummed and each column read back in its dtype."""
    import zarr

    from lungzarr.io.store import tablelayout

    store = CohortStore(tmp_path / "t.zarr")
    n = 1000
    frame = pd.DataFrame({"patient": [f"P{i % 7}" for i in range(n)], "v": np.linspace(0, 1, n),
                          "big": np.arange(n, dtype=np.int64) + 2 ** 60, "ok": np.arange(n) % 2 == 0})
    monkeypatch.setattr(tablelayout, "CHUNK_BYTES", 8 * 2 * 300)  # 300 rows of a 2-column block
    store.write_table("nodules", frame, dim="nodule")
    group = zarr.open_group(store._zstore, path=f"tables/{store._table_pointer()['nodules']}", mode="r")
    arrays = dict(group.arrays())
    assert sorted(arrays) == ["float64", "int64", "str"]
    assert arrays["float64"].shape == (n, 2) and arrays["float64"].chunks == (300, 2)
    assert arrays["int64"].chunks == arrays["str"].chunks == (600, 1) and arrays["str"].shape == (n, 1)
    assert all(type(a.compressors[-1]).__name__ == "Crc32cCodec" for a in arrays.values())
    chunks = [p for p in (store.path / "tables").rglob("c/*/*") if p.is_file()]
    assert len(chunks) == 4 + 2 + 2
    pd.testing.assert_frame_equal(store.read_table("nodules"), frame.astype({"patient": object}))


def test_arrays_written_before_checksums_are_read_but_missing_chunks_not_called_damage(tmp_path, monkeypatch):
    """A store of the layout before: no crc32c, fill-value-only chunks never written."""
    from lungzarr.io.store import encoding as storage
    from lungzarr.pipeline import ingest

    from dicom_phantoms import make_patient

    make_patient(tmp_path / "in" / "P1")
    monkeypatch.setattr(storage, "CHECKSUM_CHUNKS", False)
    monkeypatch.setattr(storage, "_WRITE", {**storage._WRITE, "write_empty_chunks": False})
    ingest(tmp_path / "in", tmp_path / "old.zarr", chunk_slices=4)
    monkeypatch.undo()
    report = verify_store(tmp_path / "old.zarr")
    assert report.ok and report.arrays > 0
    assert "P1/hu" in report.unchecksummed and "P1/hu_2mm" in report.unchecksummed
    result = runner.invoke(app, ["verify", str(tmp_path / "old.zarr"), "--scheduler", "threads"])
    assert result.exit_code == 0 and "written before lungzarr checksummed" in " ".join(result.output.split())


def test_read_nodules_leaves_out_the_rows_of_a_patient_whose_group_is_gone(one_small, tmp_path):
    """Real nodule rows (a full run): the lost patient's rows are left out with a warning, the others kept."""
    from dicom_phantoms import make_patient

    from lungzarr.pipeline import ingest

    _, clean = one_small
    store = shutil.copytree(clean, tmp_path / "s.zarr")
    make_patient(tmp_path / "more" / "OTHER", seed=5)
    with dask.config.set(scheduler="threads"):
        ingest(tmp_path / "more", store, chunk_slices=8)
    rows = lungzarr.read_nodules(store)
    assert len(rows) > 0 and set(rows.patient) == {PATIENT}
    assert lungzarr.read_patients(store).patient.tolist() == ["OTHER", PATIENT]
    shutil.rmtree(store / "patients" / PATIENT)
    with pytest.warns(UserWarning, match=rf"the nodules table of store .* has {len(rows)} row\(s\) of 1 patient\(s\) "
                                         rf"whose group is gone from the store \('{PATIENT}'\): those rows are left "
                                         rf"out; `lungzarr verify"):
        left = lungzarr.read_nodules(store)
    assert left.empty and list(left.columns) == list(rows.columns)
    with pytest.warns(UserWarning, match=rf"\('{PATIENT}'\)"):
        assert lungzarr.read_patients(store).patient.tolist() == ["OTHER"]
    with pytest.raises(LungzarrError, match=rf"nodules table .* \('{PATIENT}'\); `lungzarr verify"):
        lungzarr.read_nodules(store, missing="raise")
