"""The read API: the cohort as an xarray DataTree, and its tables as pandas DataFrames, from a store's path."""
from __future__ import annotations

import warnings

import numpy as np

from lungzarr.errors import LungzarrError
from lungzarr.io.store.cohort import CohortStore
from lungzarr.io.store.layout import CONSOLIDATED_KEY, PATIENTS_GROUP, STAGING_GROUP, TABLES_GROUP


def open_cohort(path):
    """The whole cohort as a lazy :class:`xarray.DataTree` (no voxel is loaded).

    With the store's consolidated metadata (written at the end of each run)
    every group's metadata comes from one file; without it (a run in
    progress, a killed one, a store of an older lungzarr) each group's own is
    read, the same tree, only slower.

    The consolidated metadata is checked against the groups it names first
    (:meth:`CohortStore.stale_consolidated`: a stat per node, no voxel read).
    When the store changed outside lungzarr (a patient's folder or an array
    removed, a group copied in), it is not used: the tree is read from each
    group's own metadata, so a patient whose group is gone is not listed and
    no array is served whose chunks are gone (zarr would read them as zeros),
    and a warning says so. Reading never writes the store (a reader may have
    no write access, and a run may hold it): ``lungzarr verify --repair``
    writes the consolidated metadata afresh.

    The cohort tables (``tables/<name>``) leave out the rows of patients
    whose group is gone, with a warning, as :func:`read_nodules` does.

    Examples
    --------
    >>> tree = lungzarr.open_cohort("cohort.zarr")            # doctest: +SKIP
    >>> ds = tree["patients/LIDC-IDRI-0001"].to_dataset()     # doctest: +SKIP
    >>> ds.hu_2mm.sel(z2=-116, method="nearest").plot()       # doctest: +SKIP
    """
    import xarray as xr

    store = CohortStore(path, mode="r")
    options = {"engine": "zarr", "chunks": {}, "zarr_format": 3}
    tree = None
    meta = store._root_meta()
    consolidated = meta.get(CONSOLIDATED_KEY) is not None
    stale = store.stale_consolidated(meta) if consolidated else []
    if stale:
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        warnings.warn(f"the consolidated metadata of store {str(store.path)!r} is stale ({'; '.join(stale[:3])}"
                      f"{more}): not used, every group's own metadata is read instead; `lungzarr verify "
                      f"{store.path}` lists what the store lost, `lungzarr verify --repair {store.path}` "
                      f"writes the consolidated metadata afresh", UserWarning, stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        if consolidated and not stale:
            try:
                tree = xr.open_datatree(store._zstore, consolidated=True, **options)
            except (ValueError, KeyError, FileNotFoundError):
                tree = None  # dropped by a run that started meanwhile: read each group's own
        if tree is None:
            options["consolidated"] = False
            root = xr.open_dataset(store._zstore, **options)
            children = {name: xr.open_datatree(store._zstore, group=name, **options)
                        for name in (PATIENTS_GROUP, STAGING_GROUP) if (store.path / name / "zarr.json").exists()}
    tables = _tables_tree(store)
    if tree is None:
        return xr.DataTree(dataset=root, children={**children, TABLES_GROUP: tables})
    # Swap only the tables node: building a new tree would copy (and re-align) every patient's node.
    if TABLES_GROUP in tree.children:
        del tree[TABLES_GROUP]
    tree[TABLES_GROUP] = tables
    return tree


def _tables_tree(store):
    """The cohort tables as ``tables/<name>``, each read whole through its pointer (small; never a
    torn or removed table group: see CohortStore.write_table), rows of lost patients left out."""
    import xarray as xr

    stored = set(store.patients())
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
    keep = _rows_of_stored_patients(store, frame["patient"].to_numpy(), name, set(store.patients()),
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
