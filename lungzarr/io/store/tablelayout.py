"""How a cohort table is laid out in its group: its columns packed into a few 2-D arrays, one per storage type.

A cohort table (``tables/<name>.<uuid>``, see :mod:`lungzarr.io.store.tables`) holds its
columns in at most three arrays ("blocks"), each ``row x column`` with the table's rows along
the first axis:

- ``float64``: the float, bool and integer columns (integers whose every value float64 keeps
  exactly, below 2**53 in magnitude), each read back in its own dtype;
- ``int64``: the integer columns beyond 2**53;
- ``str``: the string columns (Zarr's ``vlen-utf8``; a missing string is stored as ``""``,
  as the one-array-per-column layout stored it).

The group's attributes say which column is where (:data:`TABLE_LAYOUT`, ``columns``, ``dtypes``,
``blocks``, ``dim``). Why: a Zarr array is at least two objects (its ``zarr.json`` and a chunk)
and on object storage each is a request, several when it is created (zarr checks the node and
its parents first), so one array per column made the two cohort tables (~80 columns) most of
the requests of a run on S3; packed, a table is a handful
(``benchmarks/bench_s3_requests.py``, ``benchmarks/results/s3_requests.json``). The blocks stay
plain Zarr arrays, checksummed and verified like every other chunk, and readable without lungzarr.
"""
from __future__ import annotations

import numpy as np

#: The layout of a cohort table group (its attribute ``layout``). A group without it is the layout
#: before: one array per column and the index as a coordinate array, read through xarray.
TABLE_LAYOUT = "lungzarr table blocks v1"

#: The blocks, in the order they are written.
BLOCKS = ("float64", "int64", "str")

#: Largest chunk of a block (bytes of its values, 8 per cell): rows are split into chunks of at most
#: this, so a table of any size is read in a few requests and never needs one chunk of its whole size.
CHUNK_BYTES = 8 * 2 ** 20

#: The group attributes of the layout itself (the rest are the caller's and the writer's).
LAYOUT_KEYS = ("layout", "dtypes", "blocks", "dim")

_EXACT_INT = 2 ** 53


def _block_of(name: str, series) -> str:
    """The block column ``name`` is stored in; ValueError for a dtype no block keeps exactly."""
    dtype = series.dtype
    if dtype == object or str(dtype).startswith(("string", "str")):
        return "str"
    kind = getattr(dtype, "kind", "")
    if kind == "b" or (kind == "f" and dtype.itemsize <= 8):
        return "float64"
    if kind in "iu":
        values = series.to_numpy()
        if not len(values):
            return "float64"
        if kind == "u" and int(values.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"column {name!r} holds unsigned integers beyond int64, which no table block keeps")
        big = max(abs(int(values.min())), abs(int(values.max())))
        return "float64" if big < _EXACT_INT else "int64"
    raise ValueError(f"column {name!r} has dtype {dtype}, which a cohort table does not store; "
                     f"convert it to a number, a bool or a string")


def frame_to_blocks(frame) -> tuple[dict, dict]:
    """A DataFrame as its blocks ``{block: 2-D array}`` and the layout attributes that name their columns.

    Column names are strings (``str(c)``); the frame's index is not stored (the caller's rows are
    in order).
    """
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        raise ValueError(f"the table has repeated column names {sorted({c for c in columns if columns.count(c) > 1})!r}")
    placed = {block: [] for block in BLOCKS}
    for col, name in zip(frame.columns, columns):
        placed[_block_of(name, frame[col])].append((col, name))
    n = len(frame)
    blocks = {}
    for block, cols in placed.items():
        if not cols:
            continue
        if block == "str":
            data = np.empty((n, len(cols)), dtype=object)
            for j, (col, _) in enumerate(cols):
                data[:, j] = [v if isinstance(v, str) else ("" if _missing(v) else str(v)) for v in frame[col]]
        else:
            data = np.empty((n, len(cols)), dtype=block)
            for j, (col, _) in enumerate(cols):
                data[:, j] = frame[col].to_numpy().astype(block)
        blocks[block] = data
    attrs = {"layout": TABLE_LAYOUT, "columns": columns,
             "dtypes": {name: _dtype_name(frame[col]) for col, name in zip(frame.columns, columns)},
             "blocks": {block: [name for _, name in cols] for block, cols in placed.items() if cols}}
    return blocks, attrs


def blocks_to_frame(blocks: dict, attrs: dict):
    """Back from :func:`frame_to_blocks`: the DataFrame, its columns in order and in their dtypes.

    String columns come back as ``object`` columns of ``str``.
    """
    import pandas as pd

    where = {name: (block, j) for block, names in attrs["blocks"].items() for j, name in enumerate(names)}
    data = {}
    for name in attrs["columns"]:
        block, j = where[name]
        values = np.asarray(blocks[block])[:, j]
        if block == "str":  # object, not pandas' own string dtype: the columns lungzarr's readers always gave
            data[name] = pd.Series([str(v) for v in values], dtype=object)
        else:
            data[name] = pd.Series(values.astype(attrs["dtypes"][name]))
    return pd.DataFrame(data, columns=list(attrs["columns"]))


def rows_per_chunk(n_rows: int, n_columns: int) -> int:
    """Rows of one chunk of a block of ``n_columns``: all of them up to :data:`CHUNK_BYTES`."""
    return max(1, min(max(n_rows, 1), CHUNK_BYTES // (8 * max(n_columns, 1))))


def _missing(value) -> bool:
    """None, NaN, ``pd.NA`` or ``NaT``: what a string column holds for "no string"."""
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or an array: not one missing value
        return False


def _dtype_name(series) -> str:
    """The numpy dtype a column is read back in (``object`` for strings)."""
    dtype = series.dtype
    if dtype == object or str(dtype).startswith(("string", "str")):
        return "object"
    return str(np.dtype(dtype))
