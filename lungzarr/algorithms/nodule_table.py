"""The nodule table's columns and its stored layout.

:data:`NODULE_COLUMNS` names every column of the per-nodule table
(:func:`lungzarr.algorithms.nodules.find_nodules` fills it) with its dtype and
meaning; :func:`nodules_to_dataset` and :func:`dataset_to_nodules` write it to
and read it from the store's compact layout (:data:`NODULE_LAYOUT`), older
layouts included.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

__all__ = [
    "NODULE_COLUMNS",
    "NODULE_LAYOUT",
    "empty_nodule_table",
    "concat_nodule_tables",
    "nodules_to_dataset",
    "dataset_to_nodules",
]

#: Columns of the nodule table: name -> (dtype, unit / meaning).
NODULE_COLUMNS: dict[str, tuple[str, str]] = {
    "patient": ("str", "patient id"),
    "threshold": ("float64", "candidates are voxels with prob > float32(threshold)"),
    "label": ("int32", "component label at this threshold (raster order, from 1)"),
    "voxels": ("int64", "voxel count"),
    "z_vox": ("float64", "centroid (mean voxel index) along z"),
    "y_vox": ("float64", "centroid (mean voxel index) along y"),
    "x_vox": ("float64", "centroid (mean voxel index) along x"),
    "z_mm": ("float64", "centroid in patient coordinates (mm), grid.to_mm"),
    "y_mm": ("float64", "centroid in patient coordinates (mm), grid.to_mm"),
    "x_mm": ("float64", "centroid in patient coordinates (mm), grid.to_mm"),
    "z0": ("int64", "bounding box start (voxel, inclusive)"),
    "y0": ("int64", "bounding box start (voxel, inclusive)"),
    "x0": ("int64", "bounding box start (voxel, inclusive)"),
    "z1": ("int64", "bounding box stop (voxel, exclusive)"),
    "y1": ("int64", "bounding box stop (voxel, exclusive)"),
    "x1": ("int64", "bounding box stop (voxel, exclusive)"),
    "bbox_z_mm": ("float64", "centre of the bounding box's voxel centres (mm)"),
    "bbox_y_mm": ("float64", "centre of the bounding box's voxel centres (mm)"),
    "bbox_x_mm": ("float64", "centre of the bounding box's voxel centres (mm)"),
    "volume_mm3": ("float64", "voxels x the grid's true voxel volume (mm3)"),
    "diameter_mm": ("float64", "diameter of the sphere of that volume (mm)"),
    "extent_z_mm": ("float64", "bounding box size (mm)"),
    "extent_y_mm": ("float64", "bounding box size (mm)"),
    "extent_x_mm": ("float64", "bounding box size (mm)"),
    "irregularity": ("float64", "geometric mean of the extents / diameter"),
    "aspect": ("float64", "smallest / largest extent"),
    "aspect_xy": ("float64", "smaller / larger of the y and x extents"),
    "extent": ("float64", "voxels / bounding box voxels"),
    "hu_min": ("float64", "HU of the unsegmented volume"),
    "hu_max": ("float64", "HU"),
    "hu_mean": ("float64", "HU"),
    "hu_var": ("float64", "HU^2, ddof 1 (NaN for one voxel)"),
    "hu_skew": ("float64", "biased skewness"),
    "hu_kurt": ("float64", "biased Fisher kurtosis"),
    "prob_max": ("float64", "largest probability"),
    "prob_mean": ("float64", "mean probability"),
    "lung_half": ("str", "'left' / 'right' of the lung mask centre (patient sides), "
                         "'outside' when no voxel is in the lung mask"),
    "passes_dsb_filter": ("bool", "the original's filter: mean HU < 396 and diameter > 3 mm"),
    # --- from the 3-D lung mask (stage lungs3d, ``lung_labels``); without it: 'unknown', False, NaN ---
    "lung": ("str", "'right' / 'left': the lung of lung_labels holding most of the nodule's voxels that "
                    "lie in the mask; 'outside' when none does (kept, never dropped); 'unknown' without "
                    "lung_labels"),
    "lung_mask_share": ("float64", "share of the nodule's voxels inside lung_labels"),
    "inside_lung_mask": ("bool", "the voxel at the rounded centroid is inside lung_labels"),
    "distance_to_pleura_centre_mm": ("float64", "signed Euclidean distance (mm, true voxel size) from the "
                                                "centroid's voxel to the mask's border: to the nearest voxel "
                                                "outside the mask, > 0 inside; minus the distance to the "
                                                "nearest voxel inside, < 0 outside"),
    "distance_to_pleura_edge_mm": ("float64", "from the nodule's edge: the smallest inside distance over "
                                              "its voxels in the mask, less one voxel (the largest step), "
                                              "0 = touching; NaN when no voxel is in the mask"),
    "juxtapleural": ("bool", "a voxel of the nodule has a face neighbour outside the lung mask (the "
                             "closing of lungs3d keeps such nodules inside): it touches the pleura"),
    # --- from the HU values of the nodule's voxels (no mask needed) ---
    "solid_share": ("float64", "share of the nodule's voxels above -300 HU (soft tissue)"),
    "ground_glass_share": ("float64", "share of the nodule's voxels in (-800, -300] HU (ground glass); the rest, "
                                      "at or below -800 HU, is aerated lung the candidate took in"),
    "attenuation": ("str", "from the solid part of the nodule's tissue, s = solid_share / (solid_share + "
                           "ground_glass_share): 'solid' (s >= 0.8), 'part-solid' (0.2 <= s < 0.8), "
                           "'non-solid' (s < 0.2, or no voxel above -800 HU); on 2 mm voxels, so a small "
                           "solid nodule's partial-volume rim counts as ground glass"),
    "longest_axial_diameter_mm": ("float64", "largest in-plane distance between the centres of two voxels "
                                             "of one axial slice of the nodule, plus one pixel (mm): what a "
                                             "radiologist measures on the axial slice"),
}

#: Columns added after stores were first written, and what a table read from such a store gets for them
#: (as find_nodules without lung_labels); the attenuation columns are NaN/'unknown' there (not recomputed).
_LATER_COLUMNS = {"lung": "unknown", "lung_mask_share": np.nan, "inside_lung_mask": False,
                  "distance_to_pleura_centre_mm": np.nan, "distance_to_pleura_edge_mm": np.nan,
                  "juxtapleural": False, "solid_share": np.nan, "ground_glass_share": np.nan,
                  "attenuation": "unknown",
                  "longest_axial_diameter_mm": np.nan}


def empty_nodule_table() -> pd.DataFrame:
    """A nodule table without rows, with every column and dtype."""
    return pd.DataFrame({name: pd.Series([], dtype=dtype)
                         for name, (dtype, _) in NODULE_COLUMNS.items()})


def concat_nodule_tables(tables) -> pd.DataFrame:
    """Patients' nodule tables as one cohort table (dtypes kept, empty allowed)."""
    tables = [t for t in tables if len(t)]
    if not tables:
        return empty_nodule_table()
    table = pd.concat(tables, ignore_index=True)
    return table.astype({name: dtype for name, (dtype, _) in NODULE_COLUMNS.items()})


#: Layout of a patient's stored nodule table (``patients/<id>/nodules``, attribute ``layout``): one 2-D
#: float64 array ``table`` (``nodule`` x ``column``) with the column names, dtypes and string categories
#: in the group attributes. Before it, the group held one array per column (38 arrays, no ``layout``).
NODULE_LAYOUT = "lungzarr nodules 2d-float64 v1"

# Why one float64 array and not a Parquet/Arrow blob or 38 arrays: every column of the table is a float64,
# an integer well below 2**53 (voxel counts, box corners, labels), a bool or one of a few strings, so each
# maps to float64 exactly (strings as codes into a sorted per-column category list in the attributes), and
# the table reads back bit for bit. One array is one chunk and one metadata file: written and read in a
# fraction of the time of 38 arrays (+ their coordinate), checksummed and verified like every other chunk,
# readable by any Zarr reader without lungzarr (xarray, zarr-python, the NGFF tools), and with no new
# dependency; a Parquet blob would be opaque bytes in a uint8 array, readable only through pyarrow.
_EXACT_INT = 2 ** 53


def nodules_to_dataset(df: pd.DataFrame) -> xr.Dataset:
    """The nodule table as a compact xarray Dataset: one 2-D float64 variable ``table`` (``nodule`` x ``column``).

    Every column maps to float64 exactly: floats as they are, integers
    (checked to be below 2**53 in magnitude) and bools as numbers, strings as
    codes into the sorted category list ``attrs['categories'][column]``. The
    column names, their dtypes (:data:`NODULE_COLUMNS`) and descriptions are
    the Dataset's attributes; :func:`dataset_to_nodules` reads it back
    identically. No coordinate is written, so the stored group holds one array.
    """
    missing = [name for name in NODULE_COLUMNS if name not in df.columns]
    if missing:
        raise ValueError(f"df lacks nodule table columns {missing!r}; build it with find_nodules")
    n = len(df)
    table = np.empty((n, len(NODULE_COLUMNS)), dtype=np.float64)
    categories = {}
    for j, (name, (dtype, _)) in enumerate(NODULE_COLUMNS.items()):
        values = df[name].to_numpy()
        if dtype == "str":
            strings = np.array([("" if v is None else str(v)) for v in values], dtype=object)
            cats, codes = np.unique(strings.astype(str), return_inverse=True) if n else (np.array([], str), [])
            categories[name] = [str(c) for c in cats]
            table[:, j] = codes
        elif dtype == "float64":
            table[:, j] = values.astype(np.float64)
        else:
            typed = values.astype(dtype)
            if dtype != "bool" and n and int(np.abs(typed.astype(np.int64)).max()) >= _EXACT_INT:
                raise ValueError(f"column {name!r} holds integers beyond 2**53, which float64 cannot keep exactly")
            table[:, j] = typed
    return xr.Dataset({"table": (("nodule", "column"), table)},
                      attrs={"table": "lungzarr nodules", "layout": NODULE_LAYOUT,
                             "columns": list(NODULE_COLUMNS),
                             "dtypes": {name: dtype for name, (dtype, _) in NODULE_COLUMNS.items()},
                             "categories": categories,
                             "descriptions": {name: d for name, (_, d) in NODULE_COLUMNS.items()}})


def dataset_to_nodules(ds: xr.Dataset) -> pd.DataFrame:
    """Back from :func:`nodules_to_dataset` to the nodule table (also the older one-array-per-column layout)."""
    if "table" in ds.variables and ds.attrs.get("layout") is not None:
        return _compact_to_nodules(ds)
    missing = [name for name in NODULE_COLUMNS if name not in ds.variables and name not in _LATER_COLUMNS]
    if missing:
        raise ValueError(f"ds lacks nodule variables {missing!r}; was it written by "
                         "nodules_to_dataset?")
    n = ds.sizes.get("nodule", 0)
    # A table written before the lung-mask columns existed reads with their 'not measured' values.
    columns = {name: (np.asarray(ds[name].values) if name in ds.variables
                      else np.full(n, _LATER_COLUMNS[name], dtype=object if isinstance(_LATER_COLUMNS[name], str)
                                   else type(_LATER_COLUMNS[name])))
               for name in NODULE_COLUMNS}
    table = pd.DataFrame(columns)
    return table.astype({name: dtype for name, (dtype, _) in NODULE_COLUMNS.items()})


def _compact_to_nodules(ds: xr.Dataset) -> pd.DataFrame:
    layout = ds.attrs.get("layout")
    if layout != NODULE_LAYOUT:
        raise ValueError(f"nodule table layout {layout!r} is not one this lungzarr reads ({NODULE_LAYOUT!r}); "
                         f"rerun the nodules stage (`lungzarr run STORE --stages nodules --overwrite`)")
    stored = [str(c) for c in ds.attrs["columns"]]
    values = np.asarray(ds["table"].values, dtype=np.float64).reshape(-1, len(stored))
    categories = ds.attrs.get("categories", {})
    n = values.shape[0]
    columns = {}
    for name, (dtype, _) in NODULE_COLUMNS.items():
        if name not in stored:
            later = _LATER_COLUMNS.get(name)
            if later is None:
                raise ValueError(f"the stored nodule table lacks column {name!r}; rerun the nodules stage")
            columns[name] = np.full(n, later, dtype=object if isinstance(later, str) else type(later))
            continue
        col = values[:, stored.index(name)]
        if dtype == "str":
            cats = np.array(list(categories.get(name, [])), dtype=object)
            columns[name] = cats[col.astype(np.int64)] if n else np.array([], dtype=object)
        elif dtype == "float64":
            columns[name] = col.copy()
        else:
            columns[name] = col.astype(dtype)
    table = pd.DataFrame(columns)
    return table.astype({name: dtype for name, (dtype, _) in NODULE_COLUMNS.items()})
