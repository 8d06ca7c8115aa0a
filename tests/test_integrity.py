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
from lungzarr.io.storage import CohortStore, read_damage
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


_READER = """
import json, sys, time
import lungzarr
path, seconds = sys.argv[1], float(sys.argv[2])
end = time.time() + seconds
seen = []
while time.time() < end:
    t = lungzarr.read_nodules(path)
    version = int(t["c00"].iloc[0]) if len(t) else -1
    whole = (list(t.columns) == ["c%02d" % i for i in range(38)] and len(t) == version % 7 + 5
             and bool((t["c01"] == float(version)).all()) and bool((t["c03"] == "v%d" % version).all())
             and bool((t["c00"] == version).all()))
    seen.append([version, len(t), t.shape[1], whole])
print(json.dumps(seen))
"""


def _race_a_table_reader(store, seconds: float, env):
    """Rewrite the nodule table version after version while a reader process (:data:`_READER`) reads it.

    Returns the last version written and what the reader saw (``[version, rows, columns, whole]`` per read).
    """
    store.write_table("nodules", _versioned_frame(0), dim="nodule")
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(store.path), str(seconds)],
                              stdout=subprocess.PIPE, text=True, env=env)
    version = 0
    while reader.poll() is None:
        version += 1
        store.write_table("nodules", _versioned_frame(version), dim="nodule")
    seen = json.loads(reader.stdout.read())
    assert reader.returncode == 0
    return version, seen


def test_a_reader_sees_the_old_or_the_new_table_never_a_torn_one(tmp_path):
    store_path = tmp_path / "t.zarr"
    store = CohortStore(store_path)
    version, seen = _race_a_table_reader(store, 8, {**os.environ, "PYTHONPATH": str(REPO)})
    assert version >= 8 and len(seen) >= 8, (version, len(seen))
    assert all(whole for *_, whole in seen), [s for s in seen if not s[-1]][:5]
    assert len({v for v, *_ in seen}) > 5                  # it did read while the tables changed
    # One table group left, reached through the pointer; the read API and the tree still see it.
    groups = [p.name for p in (store_path / "tables").iterdir() if p.is_dir()]
    assert len(groups) == 1 and groups[0].startswith("nodules.")
    pd.testing.assert_frame_equal(lungzarr.read_nodules(store_path), _versioned_frame(version), check_dtype=False)
    tree = lungzarr.open_cohort(store_path)
    assert list(tree["tables"].children) == ["nodules"]
    assert int(tree["tables/nodules"]["c00"].values[0]) == version


def test_tables_of_a_store_written_before_the_pointer_are_read_and_replaced(tmp_path):
    store = CohortStore(tmp_path / "old.zarr")
    old = _versioned_frame(3)
    # The layout before: the table in place at tables/nodules.
    store.write_table("nodules", old, dim="nodule")
    group = next(p for p in (store.path / "tables").iterdir() if p.is_dir())
    group.rename(group.with_name("nodules"))
    meta = json.loads((store.path / "tables" / "zarr.json").read_text())
    meta["attributes"] = {}
    (store.path / "tables" / "zarr.json").write_text(json.dumps(meta))
    pd.testing.assert_frame_equal(lungzarr.read_nodules(store.path), old, check_dtype=False)
    store.write_table("nodules", _versioned_frame(4), dim="nodule")
    pd.testing.assert_frame_equal(lungzarr.read_nodules(store.path), _versioned_frame(4), check_dtype=False)
    assert not (store.path / "tables" / "nodules").exists()


def test_arrays_written_before_checksums_are_read_but_missing_chunks_not_called_damage(tmp_path, monkeypatch):
    """A store of the layout before: no crc32c, fill-value-only chunks never written."""
    from lungzarr.io import storage
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
