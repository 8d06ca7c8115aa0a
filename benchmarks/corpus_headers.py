"""What a DICOM corpus holds and what each file's own headers say, read with pydicom only (not through lungzarr).

The lower half of :mod:`benchmarks.corpus_check`: finding the series folders,
and for one accepted series, every stored slice against its file's headers and
pixels (:func:`check_against_headers`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: The eight exact in-plane layouts of a slice: (transpose, flip rows, flip columns), applied in that order.
LAYOUTS = [(t, r, c) for t in (False, True) for r in (False, True) for c in (False, True)]
#: Stored value lungzarr (as the original pipeline) sets to 0 before the rescale: the scanner's padding.
PADDING = -2000


# --------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------

def _dataset(path, *, pixels: bool = False):
    """The pydicom dataset of ``path``, or None when it is not a DICOM file."""
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not pixels)
    except Exception:
        return None


def _is_ct_image(ds) -> bool:
    return ds is not None and ds.get("Modality") == "CT" and "Rows" in ds and "Columns" in ds


def find_series_folders(root) -> list[Path]:
    """Every folder below ``root`` that directly holds at least one CT image (a series folder), sorted."""
    root = Path(root)
    found = []
    for folder, _, names in os.walk(root, followlinks=True):
        for name in sorted(names):
            if not name.startswith(".") and _is_ct_image(_dataset(Path(folder) / name)):
                found.append(Path(folder))
                break
    return sorted(found)


def label_of(folder, root) -> str:
    """The series' name in the table: its folder relative to the corpus root, with '/'."""
    return Path(os.path.relpath(folder, root)).as_posix()


def describe_folder(folder) -> dict:
    """What the folder holds, from pydicom: images (with pixel data) and other files."""
    images, other, kinds = 0, 0, {}
    for p in sorted(Path(folder).iterdir()):
        if not p.is_file():
            continue
        ds = _dataset(p)
        if ds is None or "Rows" not in ds:
            other += 1
            continue
        images += 1
        kind = "\\".join(ds.get("ImageType", []) or ["?"])
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"images": images, "other_files": other, "image_types": kinds}


# --------------------------------------------------------------------------
# geometry and values from the headers, with pydicom only
# --------------------------------------------------------------------------

def header_geometry(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """(IPP, row cosines, column cosines, PixelSpacing (between rows, between columns)) of one file, LPS mm."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    ps = tuple(float(v) for v in ds.PixelSpacing)
    return ipp, iop[:3], iop[3:], ps


def pixel_lps(ds, rows, cols) -> np.ndarray:
    """Patient LPS mm of the file's pixels (row, col) as its own headers place them: IPP + r dr C + c dc R."""
    ipp, row_cos, col_cos, (dr, dc) = header_geometry(ds)
    rows = np.asarray(rows, dtype=np.float64)[..., None]
    cols = np.asarray(cols, dtype=np.float64)[..., None]
    return ipp + rows * dr * col_cos + cols * dc * row_cos


def file_hu(ds) -> tuple[np.ndarray, np.ndarray]:
    """(HU as float64 = stored * RescaleSlope + RescaleIntercept, mask of stored values equal to -2000)."""
    stored = ds.pixel_array
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return stored.astype(np.float64) * slope + intercept, stored == PADDING


def apply_layout(array: np.ndarray, layout) -> np.ndarray:
    transpose, flip_rows, flip_cols = layout
    if transpose:
        array = array.T
    if flip_rows:
        array = array[::-1]
    if flip_cols:
        array = array[:, ::-1]
    return array


def layout_index(rows, cols, shape, layout) -> tuple[np.ndarray, np.ndarray]:
    """Where the file's pixel (row, col) lands in ``apply_layout(file, layout)`` (``shape``: the file's)."""
    transpose, flip_rows, flip_cols = layout
    i, j = np.asarray(rows), np.asarray(cols)
    n0, n1 = shape
    if transpose:
        i, j, n0, n1 = j, i, n1, n0
    if flip_rows:
        i = n0 - 1 - i
    if flip_cols:
        j = n1 - 1 - j
    return i, j


def _corners(shape):
    r = np.array([0, 0, shape[0] - 1, shape[0] - 1])
    c = np.array([0, shape[1] - 1, 0, shape[1] - 1])
    return r, c


def check_against_headers(series, hu: np.ndarray) -> dict:
    """Every stored slice of an accepted series against its file's own headers and pixels (pydicom).

    Returns the largest distance (mm, Euclidean and per LPS axis) between where a file's corner pixel
    lies by its headers and where the stored grid puts the voxel that holds it, half a voxel per axis,
    the largest |stored - file HU| (padding pixels apart), and the layouts found.
    """
    grid = series.grid
    origin, step = np.asarray(grid.origin, dtype=np.float64), np.asarray(grid.step, dtype=np.float64)
    worst = {"mm": 0.0, "xyz": np.zeros(3), "file": None}
    max_dhu, padding_pixels, padding_dhu = 0.0, 0, 0.0
    layouts, ambiguous, disagree_with_reader = {}, [], []
    for k, path in enumerate(series.paths):
        ds = _dataset(path, pixels=True)
        ref, pad = file_hu(ds)
        stored = hu[k].astype(np.float64)
        # The layout is found from the values, so the geometry check does not take lungzarr's word for it.
        scores = []
        for layout in LAYOUTS:
            cand, cand_pad = apply_layout(ref, layout), apply_layout(pad, layout)
            if cand.shape != stored.shape:
                continue
            diff = np.abs(stored - cand)
            scores.append((float(diff[~cand_pad].max(initial=0.0)), layout, diff, cand_pad))
        best = min(s[0] for s in scores)
        tied = [s for s in scores if s[0] == best]
        if len(tied) > 1:
            ambiguous.append(Path(path).name)
        r, c = _corners(ref.shape)
        true = pixel_lps(ds, r, c)
        placements = []
        for dhu, layout, diff, cand_pad in tied:
            i, j = layout_index(r, c, ref.shape, layout)
            at = np.stack([origin[2] + j * step[2], origin[1] + i * step[1], origin[0] + np.full(4, k) * step[0]],
                          axis=-1)
            placements.append((float(np.linalg.norm(true - at, axis=-1).max()), np.abs(true - at).max(axis=0),
                               layout, diff, cand_pad))
        mm, xyz, layout, diff, cand_pad = min(placements, key=lambda p: p[0])
        layouts[str(layout)] = layouts.get(str(layout), 0) + 1
        reader = getattr(series.headers[k], "reorient", None)
        reader_layout = (False, False, False) if reader is None else (reader.transpose, reader.flip_rows,
                                                                       reader.flip_cols)
        if reader_layout != layout:
            disagree_with_reader.append(Path(path).name)
        max_dhu = max(max_dhu, best)
        if cand_pad.any():
            padding_pixels += int(cand_pad.sum())
            # lungzarr's rule for padding: 0 before the rescale, i.e. the (truncated) intercept.
            rule = np.trunc(float(ds.get("RescaleIntercept", 0) or 0))
            padding_dhu = max(padding_dhu, float(np.abs(stored[cand_pad] - rule).max()))
        worst["xyz"] = np.maximum(worst["xyz"], xyz)
        if mm >= worst["mm"]:
            worst.update(mm=mm, file=Path(path).name)
    half = 0.5 * np.abs(step)  # (z, y, x)
    return {
        "max_position_error_mm": float(worst["mm"]),
        "max_position_error_lps_mm": [float(v) for v in worst["xyz"]],
        "half_voxel_lps_mm": [float(half[2]), float(half[1]), float(half[0])],
        "within_half_voxel": bool(np.all(worst["xyz"] <= half[::-1] + 1e-9)),
        "worst_file": worst["file"],
        "max_abs_dhu": float(max_dhu),
        "padding_pixels": padding_pixels,
        "padding_max_abs_dhu_vs_rule": float(padding_dhu),
        "layouts": layouts,
        "ambiguous_layout_files": ambiguous,
        "layout_differs_from_reader": disagree_with_reader,
    }
