"""The DSB2017 per-patient feature table, column for column.

Re-implements the patient rows that ``lungs_var3_d8g_222f.py`` of
astoc/kaggle_dsb2017 wrote (docs/algorithms.md §6): ``keras8_0313`` (2525 columns,
``recalc_features_keras_3dx_0313`` with ``withinsegonly=False``),
``keras_0311`` (the same without the ``xcenter_*_n*_0`` columns and the three
shapes) and ``base_8`` (302 columns, ``calc_features_keras_3dx``). Every quirk
of the original is kept on purpose, so models trained on its CSVs keep
working; the per-nodule table (:mod:`lungzarr.algorithms.nodules`) is the place without
quirks.

Inputs are arrays, not files: the normalised float32 volumes cropped by the
detection box and the probability maps of the network's windows
(window ``i`` covers slices ``i ... i+7`` and belongs to slice ``i + 4``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from lungzarr.algorithms.components import (
    DSB_THRESHOLDS,
    HU_STAT_NAMES,
    MISSING,
    above_threshold,
    box_shape,
    describe_legacy,
    find_components,
    legacy_diameter,
    passes_dsb_filter,
    pix_to_hu,
)
from lungzarr.errors import PatientError
from lungzarr.model.geometry import MIN_SLICES_2MM, WINDOW, detection_crop, window_maps
from lungzarr.model.geometry import WINDOW_CENTRE as MID
from lungzarr.volume import normalize_hu

__all__ = [
    "DSB_THRESHOLDS",
    "BASE8_THRESHOLDS",
    "FORMATS",
    "lung_measures",
    "legacy_nodules",
    "dsb2017_features",
    "dsb2017_table",
    "dsb2017_inputs",
    "dsb2017_arrays",
    "dsb2017_row",
    "unsegmented",
    "segment_ranges",
]

#: Thresholds of the base_8 table, in the original's order.
BASE8_THRESHOLDS = (0.75, 0.9999999, 0.99999)
#: Table layouts :func:`dsb2017_features` can write.
FORMATS = ("keras8_0313", "keras_0311", "base_8")

#: Voxel size (mm) the original assumed (RESIZE_SPACING); legacy columns use it
#: whatever the true grid step is.
_LEGACY_SPACING = (2, 2, 2)
_LEGACY_VOXEL_MM3 = 8
#: Nodules reported per (segment, threshold).
_TOP_NODULES = 5
#: Lung and emphysema HU bands of the original (both ends excluded).
_HU_LUNG_MIN = -990
_HU_LUNG_MAX = -400
_HU_EMPHYSEMA = -950
_HU_EMPHYSEMA2 = -970
_NODULE_COLUMNS = ("zcenter", "ycenter", "xcenter", "diameter", "irreg_vol", "irreg_shape")


def _hu_to_pix32(hu: float) -> np.float32:
    # A threshold as the original compared it: float64 normalisation, then
    # rounded to float32 against the float32 pixels.
    return np.float32((hu - (-1000.0)) / 1400.0 - 0.028)


def _band(ims_seg: np.ndarray, low: float) -> np.ndarray:
    return (ims_seg > _hu_to_pix32(low)) & (ims_seg < _hu_to_pix32(_HU_LUNG_MAX))


def segment_ranges(n: int) -> tuple[tuple[int, int], ...]:
    """The original's three z segments: 0 = [0, n//2), 1 = [n//2, n), 2 = all."""
    return ((0, n // 2), (n // 2, n), (0, n))


def _check_float32(name: str, array, ndim: int = 3) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.float32 or array.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D float32 array, got dtype {array.dtype!r} "
                         f"and shape {array.shape!r}; normalise HU with volume.normalize_hu")
    return array


def lung_measures(ims_seg) -> dict:
    """Lung volume, emphysema fractions and lung centre of the original.

    Parameters
    ----------
    ims_seg : ndarray of float32, shape (n, H, W)
        Normalised segmented slices the predictions belong to
        (``segmented_norm[4:-4]``).

    Returns
    -------
    dict
        ``lvol_s`` (voxels with -990 < HU < -400, compared in float32),
        ``emphy_s`` = (lvol - #(-950 < HU < -400)) / (lvol + 1) and
        ``emphy2_s`` (with -970) for segments s = 0, 1, 2 (first half,
        second half, all), and ``centre``: the lung voxels' centre of gravity
        (z, y, x) in voxels over the whole volume (NaN without lung voxels).
    """
    ims_seg = _check_float32("ims_seg", ims_seg)
    lungs = _band(ims_seg, _HU_LUNG_MIN)
    emphysema = _band(ims_seg, _HU_EMPHYSEMA)
    emphysema2 = _band(ims_seg, _HU_EMPHYSEMA2)
    out: dict = {}
    for segment, (start, stop) in enumerate(segment_ranges(ims_seg.shape[0])):
        lvol = np.int64(np.count_nonzero(lungs[start:stop]))
        out[f"lvol_{segment}"] = int(lvol)
        out[f"emphy_{segment}"] = float((lvol - np.count_nonzero(emphysema[start:stop])) / (lvol + 1))
        out[f"emphy2_{segment}"] = float((lvol - np.count_nonzero(emphysema2[start:stop])) / (lvol + 1))
    centre = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        per_index = lungs.sum(axis=others, dtype=np.int64)
        total = per_index.sum()
        weighted = (per_index * np.arange(per_index.size, dtype=np.int64)).sum()
        centre.append(float(weighted / total) if total else float("nan"))
    out["centre"] = tuple(centre)
    return out


def legacy_nodules(pms, ims, threshold: float, *, centre=(0.0, 0.0, 0.0)) -> pd.DataFrame:
    """Candidate nodules of one (segment, threshold), as the original measured them.

    Parameters
    ----------
    pms : ndarray of float32, shape (n, H, W)
        Probability maps of the segment.
    ims : ndarray of float32, shape (n, H, W)
        Normalised unsegmented slices of the segment.
    threshold : float
        Candidates are the 26-connected components of ``pms > float32(threshold)``.
    centre : tuple of float
        Subtracted from the box centres (the lung centre in the 0313 table,
        zeros in base_8).

    Returns
    -------
    pandas.DataFrame
        One row per component in label (raster) order: ``label``, ``area``
        (voxels), ``zcenter``/``ycenter``/``xcenter`` ((start + stop) / 2 of the
        box minus ``centre``), ``diameter`` (0.3333 exponent, 8 mm³ voxels),
        ``irreg_vol``, ``irreg_shape``, ``aspect``, ``aspect_xy``, ``extent``,
        ``hu`` (float32 ``pix_to_hu`` values in raster order) and ``kept``
        (mean HU < 396 and diameter > 3 mm, the original's filter).
    """
    comps = find_components(above_threshold(pms, threshold))
    extents = (comps.stop - comps.start) * np.asarray(_LEGACY_SPACING)
    diameter = legacy_diameter(comps.voxels, _LEGACY_VOXEL_MM3)
    shape = box_shape(extents, diameter)
    centres = (comps.start + comps.stop) / 2 - np.asarray(centre, dtype=np.float64)
    hu = [pix_to_hu(values) for values in comps.values(ims)]
    table = pd.DataFrame({
        "label": np.arange(1, comps.count + 1),
        "area": comps.voxels,
        "zcenter": centres[:, 0], "ycenter": centres[:, 1], "xcenter": centres[:, 2],
        "diameter": diameter,
        **shape,
        "extent": comps.voxels / np.prod(comps.stop - comps.start, axis=1),
        "hu": pd.Series(hu, dtype=object),
        "kept": passes_dsb_filter(hu, comps.voxels),
    })
    return table


def _describe_columns(values, part: str) -> list[tuple[str, object]]:
    # hu_describe's keys came out in sorted order (old pandas sorted dict keys).
    stats = describe_legacy(values)
    if len(values) == 0:
        # hu_describe([]) filled its frame with the int -7777: int64 columns.
        return [(f"{name}_{part}", int(MISSING)) for name in sorted(HU_STAT_NAMES)]
    return [(f"{name}_{part}", int(stats[name]) if name == "vol" else float(stats[name]))
            for name in sorted(HU_STAT_NAMES)]


def _keras8_0313_columns(ims, ims_seg, pmav, measures) -> list[tuple[str, object]]:
    columns: list[tuple[str, object]] = []
    centre = measures["centre"]
    for segment, (start, stop) in enumerate(segment_ranges(ims.shape[0])):
        seg_ims, seg_pms = ims[start:stop], pmav[start:stop]
        height, width = seg_ims.shape[1:]
        for threshold in DSB_THRESHOLDS:
            part = f"{segment}_{threshold}"
            cands = legacy_nodules(seg_pms, seg_ims, threshold, centre=centre)
            kept = cands[cands["kept"].to_numpy(dtype=bool)]
            if len(kept):
                # Area-weighted centres in label order (before the sort below).
                area = kept["area"].to_numpy(dtype=np.float64)
                weight = area.sum()
                zrel = float(np.sum(area * kept["zcenter"].to_numpy()) / weight / seg_ims.shape[0])
                yweighted = np.sum(area * kept["ycenter"].to_numpy()) / weight
                yrel = float(yweighted / height)
                xrel = float(yweighted / width)  # quirk: the original used y for xrel
            else:
                zrel = yrel = xrel = int(MISSING)  # the original's int -7777
            # Explicit stable sort: ties keep label order.
            order = np.argsort(-kept["diameter"].to_numpy(), kind="stable")
            kept = kept.iloc[order]
            hu_all = (np.concatenate(list(kept["hu"])) if len(kept)
                      else np.zeros(0, dtype=np.float32))
            columns += _describe_columns(hu_all, part)
            for n in range(_TOP_NODULES):
                npart = f"{part}_n{n}_0"
                if n < len(kept):
                    row = kept.iloc[n]
                    columns += _describe_columns(row["hu"], npart)
                    columns += [(f"{col}_{npart}", float(row[col])) for col in _NODULE_COLUMNS]
                else:
                    columns += _describe_columns(np.zeros(0, dtype=np.float32), npart)
                    columns += [(f"{col}_{npart}", int(MISSING)) for col in _NODULE_COLUMNS]
            columns += [(f"zrel_{part}_ns", zrel), (f"yrel_{part}_ns", yrel),
                        (f"xrel_{part}_ns", xrel), (f"ncount_{part}", int(len(kept)))]
        columns += [(f"{name}_{segment}", measures[f"{name}_{segment}"])
                    for name in ("lvol", "emphy", "emphy2")]
    return columns


def _base8_columns(ims, pmav, measures) -> list[tuple[str, object]]:
    columns: list[tuple[str, object]] = []
    # Quirk: calc_features_keras_3dx never emptied its per-threshold frames
    # between segments, so segment s repeats the columns of segments < s.
    accumulated: list[tuple[str, object]] = []
    for segment, (start, stop) in enumerate(segment_ranges(ims.shape[0])):
        seg_ims, seg_pms = ims[start:stop], pmav[start:stop]
        for threshold in BASE8_THRESHOLDS:
            part = f"{segment}_{threshold}"
            selected = above_threshold(seg_pms, threshold)
            block = _describe_columns(pix_to_hu(seg_ims[selected]), part)
            cands = legacy_nodules(seg_pms, seg_ims, threshold)
            if len(cands):
                area = cands["area"].to_numpy()
                largest = int(np.argmax(area))  # first of the largest, as list.index(max)
                zcentres = cands["zcenter"].to_numpy()
                # Python's sum over the components, in label order.
                zweighted = sum(float(a) * float(z) for a, z in zip(area, zcentres)) / int(area.sum())
                zrel = float(zweighted / seg_ims.shape[0])
                hu_largest = cands["hu"].iloc[largest]
            else:
                zrel = -777  # int, as the original's
                hu_largest = np.zeros(0, dtype=np.float32)
            block += _describe_columns(hu_largest, f"{part}_n1")
            block += [(f"zrel_{part}_n1", zrel), (f"ncount_{part}", int(len(cands)))]
            accumulated += block
        columns += accumulated
        columns += [(f"{name}_{segment}", measures[f"{name}_{segment}"])
                    for name in ("lvol", "emphy", "emphy2")]
    return columns


def _unique_names(names: list[str]) -> list[str]:
    # base_8 repeats column names; pandas reads the k-th repeat as "name.k",
    # which is how the reference CSVs spell them. Use those unique names.
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        k = seen.get(name, 0)
        unique.append(name if k == 0 else f"{name}.{k}")
        seen[name] = k + 1
    return unique


def dsb2017_features(images_norm, segmented_norm, pmav, *, cancer: int = -777,
                     fmt: str = "keras8_0313", patient: str | None = None) -> pd.DataFrame:
    """One patient's DSB2017 feature row, as the original wrote it.

    Parameters
    ----------
    images_norm : ndarray of float32, shape (Z, H', W')
        Unsegmented 2 mm volume cropped by the detection box and normalised
        (:func:`lungzarr.volume.normalize_hu`).
    segmented_norm : ndarray of float32, shape (Z, H', W')
        Segmented volume (-2000 outside the lungs), cropped and normalised the
        same way.
    pmav : ndarray of float32, shape (Z - 8, H', W')
        Probability map of window ``i``, which belongs to slice ``i + 4``
        (the d8 network's middle slice).
    cancer : int, optional
        The label; -777 when the patient is not in the labels CSV.
    fmt : {'keras8_0313', 'keras_0311', 'base_8'}, optional
        Table layout.
    patient : str, optional
        Row index (column ``id`` of the CSV).

    Returns
    -------
    pandas.DataFrame
        One row, index named ``id``; columns in the original's order and
        names (``base_8`` repeats names, as the original did; the k-th
        repeat is named ``name.k`` as pandas reads it back and as the
        reference CSVs spell it). Counts are
        int64, everything else float64 holding the original's float32 or
        float64 values exactly; -7777 marks a missing nodule or statistic.
        Column dtypes are those of the original's one-patient frame: a
        missing value is the int -7777 (int64 column), as ``hu_describe([])``
        and the original's ``= -7777`` assignments made it, and -777 for a
        missing ``zrel_*_n1`` of base_8. Concatenate patients with
        :func:`dsb2017_table`, which types the columns as the original's CSVs.

    Notes
    -----
    Candidates are sorted by diameter with a stable sort: ties keep label
    (raster) order. The original's sort was stable for up to 16 candidates
    only; beyond that its order of ties is not reproducible.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS!r}, got {fmt!r}")
    images_norm = _check_float32("images_norm", images_norm)
    segmented_norm = _check_float32("segmented_norm", segmented_norm)
    pmav = _check_float32("pmav", pmav)
    if images_norm.shape != segmented_norm.shape:
        raise ValueError(f"images_norm {images_norm.shape!r} and segmented_norm "
                         f"{segmented_norm.shape!r} must have the same shape")
    z = images_norm.shape[0]
    if z <= WINDOW or pmav.shape != (z - WINDOW,) + images_norm.shape[1:]:
        raise ValueError(f"pmav must have shape {(z - WINDOW,) + images_norm.shape[1:]!r} "
                         f"(one map per {WINDOW}-slice window of a volume of {z} slices), "
                         f"got {pmav.shape!r}")
    # Window i's prediction and the slice it belongs to (the original's images3[:, 0, mid]).
    ims = images_norm[MID:MID + pmav.shape[0]]
    ims_seg = segmented_norm[MID:MID + pmav.shape[0]]
    measures = lung_measures(ims_seg)
    if fmt == "base_8":
        columns = _base8_columns(ims, pmav, measures)
    else:
        columns = _keras8_0313_columns(ims, ims_seg, pmav, measures)
    # Quirk: lvol_sct3...6 were meant as central sections but all equal lvol_2.
    columns += [(f"lvol_sct{sections}", measures["lvol_2"]) for sections in range(3, 7)]
    columns.append(("cancer", int(cancer)))
    if fmt == "keras8_0313":
        columns += [("zshape", int(ims.shape[0])), ("yshape", int(ims.shape[1])),
                    ("xshape", int(ims.shape[2]))]
    elif fmt == "keras_0311":
        columns = [(name, value) for name, value in columns
                   if not (name.startswith("xcenter_") and name.endswith("_0"))]
    names = _unique_names([name for name, _ in columns])
    row = pd.DataFrame([[value for _, value in columns]], columns=names,
                       index=pd.Index([patient], name="id"))
    return row


def dsb2017_table(rows) -> pd.DataFrame:
    """Patient rows of :func:`dsb2017_features` as one table, typed as the original's CSVs.

    Parameters
    ----------
    rows : iterable of pandas.DataFrame
        One-row frames of the same format, in the order to write.

    Returns
    -------
    pandas.DataFrame
        The rows concatenated as the original's ``pd.concat(frames)``: a
        column stays int64 only where it is int64 in every row, otherwise it
        becomes float64. So a missing value prints as ``-7777`` in the CSV
        only where no patient of the table has that value (say nodule n3 of
        a (segment, threshold)) and as ``-7777.0`` where any other patient
        has it. A patient's CSV text therefore depends on the cohort it was
        written with; the values do not.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty; pass at least one dsb2017_features row")
    columns = rows[0].columns
    for k, row in enumerate(rows):
        if not isinstance(row, pd.DataFrame) or not row.columns.equals(columns):
            raise ValueError(f"rows[{k}] must be a dsb2017_features frame with the columns of "
                             f"rows[0]; mix no formats (got {type(row).__name__} with "
                             f"{getattr(row, 'shape', None)!r})")
    return pd.concat(rows)


def dsb2017_inputs(hu, segmented, prob_windows, *, box=None):
    """Arrays for :func:`dsb2017_features` from HU volumes and window maps.

    Parameters
    ----------
    hu, segmented : ndarray of int16, shape (Z, H, W)
        Unsegmented and segmented 2 mm volumes in HU.
    prob_windows : ndarray of float32
        One map per window, shape (Z - 8, H', W') or the legacy
        (Z - 8, 1, 1, H', W').
    box : mapping, optional
        Detection box ``by_min, by_max, bx_min, bx_max``; default: drop the
        first ``H mod 4`` rows and ``W mod 4`` columns (§5).

    Returns
    -------
    images_norm, segmented_norm, pmav : ndarray of float32
    """
    hu = np.asarray(hu)
    segmented = np.asarray(segmented)
    if hu.shape != segmented.shape or hu.ndim != 3:
        raise ValueError(f"hu {hu.shape!r} and segmented {segmented.shape!r} must be 3-D "
                         "volumes of the same shape")
    if box is None:
        rows, cols = detection_crop(hu.shape)
        box = {"by_min": rows, "by_max": hu.shape[1], "bx_min": cols, "bx_max": hu.shape[2]}
    ys = slice(int(box["by_min"]), int(box["by_max"]))
    xs = slice(int(box["bx_min"]), int(box["bx_max"]))
    pmav = np.asarray(prob_windows)
    if pmav.ndim == 5:
        if pmav.shape[1:3] != (1, 1):
            raise ValueError(f"legacy prob_windows must have shape (Z-8, 1, 1, H', W'), "
                             f"got {pmav.shape!r}")
        pmav = pmav[:, 0, 0]
    return normalize_hu(hu[:, ys, xs]), normalize_hu(segmented[:, ys, xs]), pmav


def unsegmented(ds):
    """``hu_2mm`` of a patient Dataset; for legacy imports that never kept it, the segmented volume
    as the stand-in of docs/algorithms.md §7."""
    return ds.hu_2mm if "hu_2mm" in ds else ds.segmented


def dsb2017_arrays(ds, *, patient: str | None = None):
    """The original's feature inputs from one patient's Dataset (docs/algorithms.md §6).

    The unsegmented volume (:func:`unsegmented`), ``segmented`` and
    ``nodule_prob`` mapped back to windows (:func:`lungzarr.model.geometry.window_maps`),
    cropped by the detection box and normalised: ``(images_norm, segmented_norm, pmav)``.
    """
    prob = ds.nodule_prob.values
    if prob.shape[0] < MIN_SLICES_2MM:
        raise PatientError(f"{prob.shape[0]} slices at 2 mm: the d8 windows need at least {MIN_SLICES_2MM}, so "
                           f"there are no features", patient=patient, stage="features")
    return dsb2017_inputs(unsegmented(ds).values, ds.segmented.values, window_maps(prob))


def dsb2017_row(ds, *, fmt: str = "keras8_0313", cancer: int = -777, patient: str | None = None):
    """The original per-patient feature row of a patient Dataset (a 1-row DataFrame indexed by ``id``)."""
    images, segmented_norm, pmav = dsb2017_arrays(ds, patient=patient)
    return dsb2017_features(images, segmented_norm, pmav, cancer=cancer, fmt=fmt, patient=patient)
