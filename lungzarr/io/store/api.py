"""The read API: the cohort as an xarray DataTree, and its tables as pandas DataFrames, from a store's path."""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

from lungzarr.errors import LungzarrError
from lungzarr.io.store.cohort import CohortStore
from lungzarr.io.store.layout import PATIENTS_GROUP, TABLES_GROUP
from lungzarr.io.store.records import RECORD_KEYS


def open_cohort(path, *, patients=None):
    """The cohort as a lazy :class:`xarray.DataTree` (no voxel is loaded).

    ``patients/<id>`` for each patient, ``tables/<name>`` for the cohort
    tables, the store's own attributes (lungzarr's version, when it was
    created) at the root; the records of failures, warnings and damage are
    tables of their own (:func:`read_failures`, :func:`read_warnings`,
    :func:`read_damage`). Each
    patient's group is opened with one metadata read (its listing, see
    :mod:`lungzarr.io.store.consolidated`), so the time this takes grows with
    the patients opened: about 10 ms each on a local disk. For a cohort of
    thousands, open only the patients you need (``patients=``) or use
    :func:`open_patients`, which opens each on access.

    A patient's listing is checked against the nodes it names first (a stat
    each, no voxel read); when the store changed outside lungzarr (an array's
    folder removed by hand), it is not used: that patient is read from each
    node's own metadata, so no array is served whose chunks are gone (zarr
    would read them as zeros), and a warning says so. Reading never writes
    the store: ``lungzarr verify --repair`` writes the listing afresh.

    The cohort tables (``tables/<name>``) leave out the rows of patients
    whose group is gone, with a warning, as :func:`read_nodules` does.

    Parameters
    ----------
    path : path or str
        The store.
    patients : iterable of str, optional
        Only these patients (each must be in the store); default all.

    Examples
    --------
    >>> tree = lungzarr.open_cohort("cohort.zarr")            # doctest: +SKIP
    >>> ds = tree["patients/LIDC-IDRI-0001"].to_dataset()     # doctest: +SKIP
    >>> ds.hu_2mm.sel(z2=-116, method="nearest").plot()       # doctest: +SKIP
    """
    import xarray as xr

    store = CohortStore(path, mode="r")
    # An unknown patient is refused by its group's read (patient_source): no existence check first.
    ids = store.patients() if patients is None else list(patients)
    trees = {p: _patient_tree(store, p, stacklevel=3) for p in ids}
    # Without the records an older store still keeps in its root (until its next writer moves them).
    root = xr.Dataset(attrs={k: v for k, v in store._root_attrs().items() if k not in RECORD_KEYS})
    return xr.DataTree(dataset=root, children={PATIENTS_GROUP: xr.DataTree(children=trees),
                                               TABLES_GROUP: _tables_tree(store)})


def open_patient(path, patient: str):
    """One patient's group (and its child groups, e.g. ``nodules``) as a lazy :class:`xarray.DataTree`.

    The same node as ``open_cohort(path)["patients/<id>"]``, read with one
    metadata read whatever the cohort's size (see :func:`open_cohort` for
    the check of the patient's listing).

    Parameters
    ----------
    path : path or str
        The store.
    patient : str
        The patient's identifier (``lungzarr status`` lists them).

    Examples
    --------
    >>> ds = lungzarr.open_patient("cohort.zarr", "LIDC-IDRI-0001").to_dataset()  # doctest: +SKIP
    """
    store = CohortStore(path, mode="r")
    return _patient_tree(store, patient, stacklevel=3)


class PatientTrees(Mapping):
    """The patients of a store as a read-only mapping ``{id: DataTree}``; each group is opened on access.

    Made by :func:`open_patients`. The identifiers are listed once, when it
    is made (one listing of ``patients/``); nothing else is read until a
    patient is looked up, and a patient is opened afresh at each lookup
    (nothing is kept: iterating over 75,000 patients holds one at a time).
    On object storage the listing does not check each group's ``zarr.json``
    (a request per patient): a patient whose commit is under way is listed
    and its lookup refused (:class:`~lungzarr.errors.LungzarrError`, "not in
    store") until the commit ends.
    """

    def __init__(self, store: CohortStore):
        self._store = store
        self._ids = store.patients(checked=False)  # a lookup's open refuses a folder that is no group
        self._known = frozenset(self._ids)

    def __getitem__(self, patient: str):
        if patient not in self._known:
            raise KeyError(patient)
        return _patient_tree(self._store, patient, stacklevel=3)

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, patient) -> bool:
        return patient in self._known

    def __repr__(self) -> str:
        shown = ", ".join(self._ids[:3]) + (", ..." if len(self._ids) > 3 else "")
        return f"<PatientTrees of {str(self._store.path)!r}: {len(self._ids)} patients ({shown})>"


def open_patients(path) -> PatientTrees:
    """Every patient of a store as a lazy mapping ``{id: DataTree}``: a group is opened when looked up.

    The way through a cohort of any size: making it lists the patients'
    identifiers only, and each lookup costs what :func:`open_patient` costs
    (one metadata read), whatever the cohort's size.

    Examples
    --------
    >>> for pid, tree in lungzarr.open_patients("cohort.zarr").items():   # doctest: +SKIP
    ...     print(pid, float(tree["hu_2mm"].mean()))
    """
    return PatientTrees(CohortStore(path, mode="r"))


def _patient_tree(store, patient: str, *, stacklevel: int):
    source = store.patient_source(patient)
    stale = source[2]
    if stale:
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        warnings.warn(f"the consolidated metadata of patient {patient!r} in store {str(store.path)!r} is stale "
                      f"({'; '.join(stale[:3])}{more}): not used, each node's own metadata is read instead; "
                      f"`lungzarr verify {store.path}` lists what the store lost, `lungzarr verify --repair "
                      f"{store.path}` writes the listing afresh", UserWarning, stacklevel=stacklevel + 1)
    return store.open_patient_tree(patient, source=source)


def _tables_tree(store):
    """The cohort tables as ``tables/<name>``, each read whole through its pointer (small; never a
    torn or removed table group: see CohortStore.write_table), rows of lost patients left out."""
    import xarray as xr

    stored = set(store.patients(checked=False))
    tables = {}
    for name in store.table_names():
        ds = store._table_dataset(name)
        if ds is not None and "patient" in ds.variables:
            # stacklevel: the warning names the caller of open_cohort.
            kept = _rows_of_stored_patients(store, ds["patient"].values, name, stored, missing="drop",
                                            stacklevel=3)
            if not kept.all():
                ds = ds.isel({ds["patient"].dims[0]: kept})
        tables[name] = xr.DataTree(dataset=ds)
    return xr.DataTree(children=tables)


#: What the readers do with table rows of patients whose group is gone from the store.
MISSING_ROWS = ("drop", "raise")


def _rows_of_stored_patients(store, patients, table: str, stored: set, *, missing: str, stacklevel: int):
    """A boolean mask of the rows (``patients``: each row's patient id) whose patient has a group in the
    store; warn about (``missing="drop"``) or refuse (``"raise"``) the others."""
    if missing not in MISSING_ROWS:
        raise ValueError(f"missing must be one of {MISSING_ROWS!r}, got {missing!r}")
    ids = np.asarray(patients, dtype=object).astype(str)
    keep = np.isin(ids, np.array(sorted(stored), dtype=object).astype(str)) if len(ids) else np.ones(0, bool)
    if keep.all():
        return keep
    gone = sorted({str(p) for p in ids[~keep]})
    listed = ", ".join(repr(p) for p in gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
    said = (f"the {table} table of store {str(store.path)!r} has {int((~keep).sum())} row(s) of {len(gone)} "
            f"patient(s) whose group is gone from the store ({listed})")
    fix = (f"`lungzarr verify {store.path}` lists what the store lost; `lungzarr run INPUT {store.path}` ingests "
           f"them again, or `lungzarr verify --repair {store.path}` rebuilds the tables without them")
    if missing == "raise":
        raise LungzarrError(f"{said}; {fix}")
    warnings.warn(f"{said}: those rows are left out; {fix}", UserWarning, stacklevel=stacklevel + 1)
    return keep


def _read_cohort_table(path, name: str, missing: str):
    store = CohortStore(path, mode="r")
    frame = store.read_table(name)
    if frame.empty or "patient" not in frame.columns:
        return frame
    keep = _rows_of_stored_patients(store, frame["patient"].to_numpy(), name, set(store.patients(checked=False)),
                                    missing=missing, stacklevel=3)
    return frame if keep.all() else frame[keep].reset_index(drop=True)


_READER_NOTES = """
    A row whose patient's group is gone from the store (removed by hand, lost
    with a disk) describes data the store no longer holds: no figure of it
    can be traced back to its voxels, and the next rebuild of the tables
    (the end of a run, ``lungzarr verify --repair``) leaves it out. So it is
    left out here too, with a warning naming the patients (``missing="drop"``,
    the default: the rest of the cohort stays readable), or refused with
    ``missing="raise"`` (for a script that must stop rather than publish a
    cohort that shrank). A row is never kept with a flag: a flag is a
    column a count or a mean ignores.

    Parameters
    ----------
    path : path or str
        The store.
    missing : {"drop", "raise"}
        What to do with the rows of patients whose group is gone.

    Raises
    ------
    LungzarrError
        The store has patients but no cohort tables (its ``tables`` group
        removed, or no run got to its end), the table cannot be read, or
        ``missing="raise"`` and rows of lost patients were found. A store
        with no patient yet gives an empty DataFrame.
"""


def read_nodules(path, *, missing: str = "drop"):
    return _read_cohort_table(path, "nodules", missing)


def read_patients(path, *, missing: str = "drop"):
    return _read_cohort_table(path, "patients", missing)


read_nodules.__doc__ = "The cohort's nodule table (one row per candidate nodule) as a DataFrame.\n" + _READER_NOTES
read_patients.__doc__ = "The cohort's patient table (lung measures, stage states) as a DataFrame.\n" + _READER_NOTES


def read_failures(path):
    """Every recorded failure: patient, stage, file, reason, time."""
    import pandas as pd

    return pd.DataFrame(CohortStore(path, mode="r").failures(),
                        columns=["patient", "stage", "file", "reason", "time"])


def read_warnings(path):
    """Every recorded warning (nothing stopped, but a user should know): patient, stage, file, reason, time."""
    import pandas as pd

    return pd.DataFrame(CohortStore(path, mode="r").warnings(),
                        columns=["patient", "stage", "file", "reason", "time"])


def read_damage(path):
    """Every damaged chunk or array found by ``lungzarr verify``: patient, stage, array, chunk, kind, file, reason, time."""
    import pandas as pd

    return pd.DataFrame(CohortStore(path, mode="r").damage(),
                        columns=["patient", "stage", "array", "chunk", "kind", "file", "reason", "time"])
