"""Consolidated metadata (issue 19): a cohort opens with one metadata read, and the view is never stale."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import xarray as xr

from lungzarr.io.store import CohortStore, open_cohort
from lungzarr.pipeline import ingest

from dicom_phantoms import make_patient


def _plain_open(path):
    """``xr.open_datatree(store, engine="zarr")`` as a user types it; the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = xr.open_datatree(path, engine="zarr")
    return tree, [str(w.message) for w in caught]


def _listed_patients(path) -> list[str]:
    meta = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    return sorted(k.split("/")[1] for k in meta if k.count("/") == 1 and k.startswith("patients/"))


def _assert_view_is_current(path):
    """The consolidated view lists exactly the nodes on disk, each with the metadata of its own zarr.json."""
    meta = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    on_disk = {}
    for node in path.rglob("zarr.json"):
        rel = node.parent.relative_to(path).as_posix()
        if rel == "." or rel.startswith("staging/") or "/c/" in f"/{rel}/":
            continue
        on_disk[rel] = json.loads(node.read_text())
    assert sorted(meta) == sorted(on_disk)
    for rel, node in on_disk.items():
        listed = dict(meta[rel])
        listed.pop("consolidated_metadata", None)
        assert listed == node, rel


@pytest.fixture
def cohort(tmp_path):
    root = tmp_path / "input"
    for pid, seed in (("P1", 1), ("P2", 2), ("P3", 3)):
        make_patient(root / pid, seed=seed)
    return root, tmp_path / "cohort.zarr"


def test_a_run_leaves_consolidated_metadata_that_plain_xarray_uses(cohort, tmp_path):
    root, store = cohort
    ingest(root, store)
    assert CohortStore(store, mode="r").is_consolidated()
    tree, caught = _plain_open(store)
    assert not [m for m in caught if "consolidated" in m.lower()], caught
    assert sorted(tree["patients"].children) == ["P1", "P2", "P3"]
    _assert_view_is_current(store)
    # The layout is zarr's own: zarr.consolidate_metadata on a copy writes the same listing.
    import zarr

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(copy)
    ours = json.loads((store / "zarr.json").read_text())
    theirs = json.loads((copy / "zarr.json").read_text())
    assert ours["attributes"] == theirs["attributes"]
    assert ours["consolidated_metadata"] == theirs["consolidated_metadata"]


def test_open_cohort_is_the_same_tree_with_and_without_the_view(cohort):
    root, store = cohort
    ingest(root, store)
    with_view = open_cohort(store)
    CohortStore(store)._changing()  # what the first write of a run does
    assert not CohortStore(store, mode="r").is_consolidated()
    without = open_cohort(store)
    assert sorted(with_view["patients"].children) == sorted(without["patients"].children) == ["P1", "P2", "P3"]
    for pid in ("P1", "P2", "P3"):
        a, b = with_view[f"patients/{pid}"].to_dataset(), without[f"patients/{pid}"].to_dataset()
        assert a.attrs == b.attrs
        xr.testing.assert_identical(a.load(), b.load())


def test_view_is_dropped_while_a_run_writes_and_right_after_reingest_and_removal(cohort):
    root, store = cohort
    ingest(root, store)
    assert _listed_patients(store) == ["P1", "P2", "P3"]

    # A write to a patient drops the view first: a reader in between lists every group itself.
    s = CohortStore(store)
    with s.lock():
        s.prepare_task("P1", "segment", None)
        assert not s.is_consolidated()
        tree, caught = _plain_open(store)
        assert sorted(tree["patients"].children) == ["P1", "P2", "P3"]
    assert s.is_consolidated()  # the end of the writer's session writes it again
    _assert_view_is_current(store)

    # Re-ingest one patient (a new group swapped in) and remove another.
    ingest(root, store, patients=["P2"], overwrite=True)
    _assert_view_is_current(store)
    with s.lock():
        s.remove_patient("P3")
    assert _listed_patients(store) == ["P1", "P2"]
    _assert_view_is_current(store)
    tree, _ = _plain_open(store)
    assert sorted(tree["patients"].children) == ["P1", "P2"]
    with pytest.warns(UserWarning, match=r"patients table .* \('P3'\): those rows are left out"):
        assert sorted(open_cohort(store)["patients"].children) == ["P1", "P2"]


def test_root_attributes_keep_the_view(cohort):
    root, store = cohort
    ingest(root, store)
    s = CohortStore(store)
    s.record_warnings("P1", "input", [{"file": "x.zip", "reason": "an archive"}])
    assert s.is_consolidated()
    _assert_view_is_current(store)
    tree, _ = _plain_open(store)
    assert tree.attrs["lungzarr:warnings"][0]["file"] == "x.zip"


def test_a_failed_run_leaves_no_view(cohort):
    root, store = cohort
    ingest(root, store)
    s = CohortStore(store)
    with pytest.raises(RuntimeError):
        with s.lock():
            s.prepare_task("P1", "segment", None)
            raise RuntimeError("killed mid-run")
    # Tasks of a failed run may still be writing: no view, readers list the groups.
    assert not s.is_consolidated()
    tree, caught = _plain_open(store)
    assert sorted(tree["patients"].children) == ["P1", "P2", "P3"]
    assert sorted(open_cohort(store)["patients"].children) == ["P1", "P2", "P3"]
