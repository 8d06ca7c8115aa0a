"""Cohort tables, each replaced atomically: a fresh group per write, then one switch of their pointer."""
from __future__ import annotations

import errno
import uuid
import warnings
from pathlib import Path

import numpy as np

import lungzarr.io.store.encoding as encoding
from lungzarr._version import __version__
from lungzarr.errors import LungzarrError
from lungzarr.io.store.layout import TABLE_POINTER_KEY, TABLES_GROUP, _jsonable, _now
from lungzarr.io.store.tablelayout import BLOCKS, LAYOUT_KEYS, TABLE_LAYOUT, blocks_to_frame, frame_to_blocks, \
    rows_per_chunk

_TABLE_READ_ATTEMPTS = 20


def _dataset_from_frame(indexed):
    """``xarray.Dataset.from_dataframe(indexed)`` of a table with one flat index: the same Dataset, built at once.

    ``from_dataframe`` adds one column at a time (an alignment and a merge each): 0.2-1.7 CPU-s for the
    two cohort tables' ~80 columns, most of what the end of every run cost; one constructor call takes
    milliseconds. ``tests/test_cpu_stages.py`` checks the two are identical (values, dtypes, order).
    """
    import pandas as pd
    import xarray as xr

    if isinstance(indexed.index, pd.MultiIndex):
        return xr.Dataset.from_dataframe(indexed)
    dim = indexed.index.name
    return xr.Dataset({str(c): ((dim,), np.asarray(indexed[c])) for c in indexed.columns},
                      coords={dim: np.asarray(indexed.index)})


def _frame_dataset(frame, *, dim: str, attrs: dict):
    """A table as the xarray Dataset ``open_cohort`` shows: one variable per column, ``dim`` its index.

    A column named like the dimension (the patient id) becomes its coordinate; strings are ``object``.
    """
    indexed = frame.set_index(dim) if dim in frame.columns else frame.rename_axis(dim)
    ds = _dataset_from_frame(indexed)
    for col in frame.columns:
        if frame[col].dtype == object or str(frame[col].dtype).startswith(("string", "str")):
            ds[col] = ds[col].astype(object)
    if dim in frame.columns:
        ds = ds.assign_coords({dim: ds[dim].astype(object)})
    ds.attrs = dict(attrs)
    return ds


class _LoadedTable:
    """A table read whole: the frame and attributes of the packed layout, or the Dataset of the layout before."""

    def __init__(self, *, frame=None, attrs: dict | None = None, dataset=None):
        self.frame, self.attrs, self.dataset = frame, attrs or {}, dataset

    def as_frame(self):
        if self.frame is not None:
            return self.frame
        ds = self.dataset
        columns = ds.attrs.get("columns")
        frame = ds.to_dataframe()
        frame = frame.reset_index(drop=not (columns and frame.index.name in columns))
        frame = frame[[c for c in ds.attrs.get("columns", frame.columns) if c in frame.columns]]
        for col in frame.columns:
            if frame[col].dtype == object or str(frame[col].dtype).startswith("str"):
                frame[col] = frame[col].astype(object)
        return frame

    def as_dataset(self):
        if self.dataset is not None:
            return self.dataset
        kept = {k: v for k, v in self.attrs.items() if k not in LAYOUT_KEYS}
        return _frame_dataset(self.frame, dim=self.attrs["dim"], attrs=kept)


class _CohortTables:
    """Part of :class:`~lungzarr.io.store.CohortStore`: the cohort-wide tables."""

    # ------------------------------------------------------------------ tables
    # A cohort table is replaced atomically. Each write goes to a fresh group
    # ``tables/<name>.<uuid>``; the ``tables`` group's attribute ``lungzarr:tables``
    # ({name: group}) says which group is current and is switched by one
    # ``os.replace`` of ``tables/zarr.json``; the old group is removed after the
    # switch. A reader reads the pointer, loads that group whole, and reads the
    # pointer again: unchanged means the group was current for the whole read (a
    # group is removed only after the pointer moved away from it), so the reader
    # saw one complete table; changed means it may have read a group being
    # removed (zarr reads a vanished chunk as the fill value), so it reads the new
    # one. Group names are never reused, so "unchanged" cannot be a new table of
    # the same name. Stores written before this layout have ``tables/<name>``
    # itself, read when the pointer does not name the table. A group holds the
    # table's columns packed into a few arrays (``tablelayout.py``); one written
    # before that holds one array per column and is read through xarray; the
    # next run's table write replaces it with the packed layout.

    def _tables_meta_path(self) -> Path:
        return self.path / TABLES_GROUP / "zarr.json"

    def _table_pointer(self) -> dict:
        import json

        try:
            meta = json.loads(self._tables_meta_path().read_text())
        except FileNotFoundError:
            return {}
        return dict(meta.get("attributes", {}).get(TABLE_POINTER_KEY, {}))

    def _switch_table(self, name: str, group: str) -> None:
        """Point ``name`` at ``group`` with one atomic replace of the tables group's metadata."""
        import json

        meta_path = self._tables_meta_path()
        meta = json.loads(meta_path.read_text())
        attributes = dict(meta.get("attributes", {}))
        attributes[TABLE_POINTER_KEY] = {**attributes.get(TABLE_POINTER_KEY, {}), name: group}
        meta["attributes"] = attributes
        self._backend.replace_text(meta_path, json.dumps(meta, indent=2))

    def write_table(self, name: str, frame, *, dim: str, attrs: dict | None = None) -> None:
        """Store a pandas DataFrame as the cohort table ``name`` (dimension ``dim``), replacing it atomically.

        The columns are packed into a few 2-D arrays (:mod:`lungzarr.io.store.tablelayout`).
        A concurrent :meth:`read_table` sees the old table or the new one, whole.
        ``attrs`` are kept with the table (:meth:`table_attrs`), written in the same switch.
        """
        frame = frame.reset_index(drop=True)
        blocks, layout = frame_to_blocks(frame)
        group_attrs = {**_jsonable(attrs or {}), "lungzarr:written": _now(), "lungzarr_version": __version__,
                       **layout, "dim": dim}
        group = f"{name}.{uuid.uuid4().hex}"
        self._changing()
        try:
            # The new group is written whole before the pointer moves to it: a write that fails (a full
            # disk) leaves the previous table current and readable.
            self._write_table_group(f"{TABLES_GROUP}/{group}", blocks, group_attrs, dim=dim)
            self._switch_table(name, group)
        except OSError as exc:
            encoding.settle_writes()  # the call's other chunk writes end first, or one would land after the removal
            self._rmtree(self.path / TABLES_GROUP / group, ignore_errors=True)
            kept = "the previous table is kept" if self._table_pointer().get(name) else "it has none yet"
            full = exc.errno == errno.ENOSPC
            cause = "no space left on the device" if full else f"{type(exc).__name__}: {exc}"
            raise LungzarrError(f"the {name} table of store {str(self.path)!r} could not be written ({cause}); "
                                f"{kept}: {'free space' if full else 'fix that'} and run the command again (or "
                                f"`lungzarr verify --repair {self.path}`, which writes only the tables)") from None
        # Only now is the old group unreachable for a new reader; remove it, an old-layout
        # tables/<name>, and any group a killed writer left before its switch.
        for folder in (self.path / TABLES_GROUP).iterdir():
            if folder.is_dir() and folder.name != group and (
                    folder.name == name or (folder.name.startswith(name + ".")
                                            and folder.name[len(name) + 1:].isalnum())):
                self._rmtree(folder, ignore_errors=True)

    def _write_table_group(self, path: str, blocks: dict, attrs: dict, *, dim: str) -> None:
        """Write a table's group: its metadata, then each block (every chunk written, checksummed).

        Straight through zarr, not ``Dataset.to_zarr``: xarray writes each array's metadata
        twice and clears the group's prefix first, requests a fresh group does not need.
        """
        group = self._zarr.create_group(self._zstore, path=path, attributes=_jsonable(attrs), zarr_format=3)
        for block in BLOCKS:
            if block not in blocks:
                continue
            data = blocks[block]
            n, k = data.shape
            array = group.create_array(block, shape=data.shape, dtype=str if block == "str" else block,
                                       chunks=(rows_per_chunk(n, k), max(k, 1)),
                                       compressors=encoding.table_compressors(),
                                       dimension_names=(dim, f"{block}_column"),
                                       config={"write_empty_chunks": True})
            if n:
                array[...] = data

    def has_tables(self) -> bool:
        """Whether the store has its ``tables`` group (every store lungzarr creates has one)."""
        return self._tables_meta_path().exists()

    def _current_table(self, name: str) -> "_LoadedTable | None":
        """The current table ``name``, loaded whole and checked to be current throughout; or None.

        Raises
        ------
        LungzarrError
            The table the pointer names cannot be read (gone, damaged).
        """
        for _ in range(_TABLE_READ_ATTEMPTS):
            group = self._table_pointer().get(name)
            if group is None:
                if not (self.path / TABLES_GROUP / name / "zarr.json").exists():
                    return None
                group = name  # a store written before the pointer
            try:
                loaded = self._load_table_group(self._open_table_group(group))
            except (FileNotFoundError, KeyError, ValueError, self._zarr.errors.BaseZarrError) as exc:
                if self._table_pointer().get(name, name) == group:
                    # The current table itself cannot be read: damage, not a race.
                    raise LungzarrError(f"the {name} table of store {str(self.path)!r} ({TABLES_GROUP}/{group}) "
                                        f"cannot be read ({type(exc).__name__}: {exc}); `lungzarr verify --repair "
                                        f"{self.path}` writes it again from the patient groups") from None
                continue  # replaced (and removed) while we opened it: read the new one
            if self._table_pointer().get(name, name) == group:
                return loaded
        raise LungzarrError(f"table {name!r} of {str(self.path)!r} was replaced {_TABLE_READ_ATTEMPTS} times "
                            f"while being read; read it again once the run writing the store has finished")

    def _open_table_group(self, group: str):
        """The reader's first step: a table group opened (its metadata read), nothing loaded yet."""
        path = f"{TABLES_GROUP}/{group}"
        opened = self._zarr.open_group(self._zstore, path=path, mode="r", zarr_format=3, use_consolidated=False)
        if opened.attrs.get("layout") is not None:
            return opened
        import xarray as xr

        with warnings.catch_warnings():  # the layout before: one array per column
            warnings.simplefilter("ignore", category=UserWarning)
            return xr.open_dataset(self._zstore, group=path, engine="zarr", consolidated=False, zarr_format=3)

    def _load_table_group(self, opened) -> "_LoadedTable":
        """The reader's second step: every block (or, in the layout before, every column) read."""
        if not isinstance(opened, self._zarr.Group):
            return _LoadedTable(dataset=opened.load())
        attrs = dict(opened.attrs)
        if attrs["layout"] != TABLE_LAYOUT:
            raise LungzarrError(f"cohort table {opened.path!r} of store {str(self.path)!r} has layout "
                                f"{attrs['layout']!r}, which this lungzarr does not read ({TABLE_LAYOUT!r}): "
                                f"a newer lungzarr wrote it; upgrade, or `lungzarr verify --repair {self.path}` "
                                f"writes the tables again in this version's layout")
        blocks = {block: opened[block][...] for block in attrs["blocks"]}
        return _LoadedTable(frame=blocks_to_frame(blocks, attrs), attrs=attrs)

    def _table_dataset(self, name: str):
        """The current table ``name`` as an xarray Dataset (one variable per column, ``dim`` the index); or None."""
        loaded = self._current_table(name)
        return None if loaded is None else loaded.as_dataset()

    def table_attrs(self, name: str) -> dict:
        """The attributes the current table ``name`` was written with (one metadata read); {} without it."""
        import json

        group = self._table_pointer().get(name)
        if group is None:
            return {}
        try:
            meta = json.loads((self.path / TABLES_GROUP / group / "zarr.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}  # replaced meanwhile (or damaged): the caller writes the table again
        return dict(meta.get("attributes", {}))

    def read_table(self, name: str):
        """The cohort table ``name`` as a pandas DataFrame: the old or the new one, never torn.

        Empty on a store that has no patient yet (a run writes its tables at its end).

        Raises
        ------
        LungzarrError
            The store has patients but not this table (its ``tables`` group
            removed, or the runs so far stopped before their end), or the
            table cannot be read: one sentence naming the store and the fix.
        """
        import pandas as pd

        loaded = self._current_table(name)
        if loaded is None:
            # Asked only now: on object storage each check is a request, and a table read says it.
            if not self.has_tables():
                raise LungzarrError(f"store {str(self.path)!r} has no cohort tables (its {TABLES_GROUP}/ group is "
                                    f"gone); `lungzarr verify --repair {self.path}` rebuilds them from the patient "
                                    f"groups")
            if self.patients():
                raise LungzarrError(f"store {str(self.path)!r} has patients but no {name} table (a run writes it "
                                    f"at its end; did the last one stop before?); `lungzarr verify --repair "
                                    f"{self.path}` writes it from the patient groups")
            return pd.DataFrame()
        return loaded.as_frame()

    def table_names(self) -> list[str]:
        """Names of the cohort tables in the store."""
        names = set(self._table_pointer())
        folder = self.path / TABLES_GROUP
        if folder.is_dir():
            names.update(p.name for p in folder.iterdir() if "." not in p.name and (p / "zarr.json").exists())
        return sorted(names)
