"""The CPU stages' per-patient fixed costs cut in issue 15, each shown to change no output.

* ``CohortStore.load_patient`` (one zarr open, arrays read whole) gives what ``open_patient`` gives;
* the cohort tables are built without ``Dataset.from_dataframe`` (the same Dataset) and left in place
  when a run did not change their content;
* a whole pipeline on a real patient writes the same tables as before (``tests/test_pipeline.py`` and
  ``benchmarks/bench_cpu_stages.py compare`` compare whole stores).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from lungzarr.errors import LungzarrError
from lungzarr.io.store import CohortStore, read_nodules, read_patients


@pytest.fixture(scope="module")
def lidc_store(tmp_path_factory):
    """The LIDC slab ingested, segmented and through lungs3d (no UNet), in a store of its own."""
    from lungzarr import pipeline

    from conftest import LIDC_DIR, shared_path

    src = shared_path(LIDC_DIR)
    work = tmp_path_factory.mktemp("lidc")
    (work / "input").mkdir()
    (work / "input" / src.name).symlink_to(src)
    store = work / "s.zarr"
    pipeline.run(work / "input", store, stages=["ingest", "segment", "lungs3d"])
    return store


def test_load_patient_equals_open_patient(lidc_store):
    store = CohortStore(lidc_store, mode="r")
    (patient,) = store.patients()
    names = ["hu_2mm", "lungs", "segmented", "lung_labels", "not_there"]
    loaded = store.load_patient(patient, names)
    opened = store.open_patient(patient)
    assert sorted(loaded.data_vars) == sorted(n for n in names if n in opened)
    assert loaded.attrs == opened.attrs
    for name in loaded.data_vars:
        a, b = loaded[name], opened[name]
        assert a.dims == b.dims and a.dtype == b.dtype and a.attrs == b.attrs, name
        assert np.array_equal(a.values, b.values), name


def test_load_patient_of_a_missing_patient_names_it(lidc_store):
    from lungzarr.errors import LungzarrError

    with pytest.raises(LungzarrError, match="'nobody' is not in store"):
        CohortStore(lidc_store, mode="r").load_patient("nobody", ["hu_2mm"])


def _frames():
    nod = pd.DataFrame({"patient": ["b", "a", "a"], "threshold": [0.5, 0.5, 0.9], "label": np.array([1, 2, 1], np.int32),
                        "v": [np.nan, -0.0, 1e-300], "ok": [True, False, True]})
    pat = pd.DataFrame({"patient": ["b", "a"], "series": ["1.2", None], "n": [3, 4], "x": [np.nan, 2.5]})
    return [(nod, "nodule"), (pat, "patient"), (nod.iloc[:0], "nodule"), (pat.iloc[:0], "patient"),
            (pd.DataFrame({"s": pd.array(["x", None], dtype="str"), "i": [1, 2]}), "nodule"),
            (pd.DataFrame({"patient": ["a", "a"], "v": [1, 2]}), "patient")]  # from_dataframe keeps repeats


@pytest.mark.parametrize("k", range(6))
def test_table_dataset_is_the_one_from_dataframe_builds(k):
    from lungzarr.io.store.tables import _dataset_from_frame

    frame, dim = _frames()[k]
    frame = frame.reset_index(drop=True)
    indexed = frame.set_index(dim) if dim in frame.columns else frame.rename_axis(dim)
    a, b = xr.Dataset.from_dataframe(indexed), _dataset_from_frame(indexed)
    xr.testing.assert_identical(a, b)
    assert {v: a[v].dtype for v in a.variables} == {v: b[v].dtype for v in b.variables}


def test_unchanged_tables_are_left_in_place_and_changed_ones_replaced(lidc_store, tmp_path):
    import shutil

    from lungzarr.pipeline.tables import gather_tables

    path = tmp_path / "copy.zarr"
    shutil.copytree(lidc_store, path)
    store = CohortStore(path)
    before = {n: store._table_pointer()[n] for n in ("nodules", "patients")}
    frames = read_nodules(path), read_patients(path)
    gather_tables(store)  # nothing changed: both stay, same groups
    assert store._table_pointer() == before
    (patient,) = store.patients()
    store.unmark_stages(patient, ["lungs3d"])
    gather_tables(store)  # the patient table's stage_lungs3d changed: only it is replaced
    after = store._table_pointer()
    assert after["nodules"] == before["nodules"] and after["patients"] != before["patients"]
    pd.testing.assert_frame_equal(read_nodules(path), frames[0])
    assert not read_patients(path).stage_lungs3d.any() and frames[1].stage_lungs3d.all()
    # A table whose digest attribute is missing (an older lungzarr wrote it) is written again.
    store.write_table("nodules", frames[0], dim="nodule")
    gather_tables(store)
    assert store._table_pointer()["nodules"] != after["nodules"]
    pd.testing.assert_frame_equal(read_nodules(path), frames[0])


def test_a_damaged_table_is_written_again_even_when_its_content_is_unchanged(lidc_store, tmp_path):
    import shutil

    from lungzarr.pipeline.tables import gather_tables

    path = tmp_path / "copy.zarr"
    shutil.copytree(lidc_store, path)
    store = CohortStore(path)
    frame = read_patients(path)
    group = path / "tables" / store._table_pointer()["patients"]
    chunk = next(p for p in sorted((group / "float64").rglob("*")) if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(LungzarrError, match=r"the patients table of store .* cannot be read \(ValueError: Stored "
                                            r"and computed checksum do not match.*`lungzarr verify --repair"):
        read_patients(path)
    gather_tables(store)
    pd.testing.assert_frame_equal(read_patients(path), frame)
