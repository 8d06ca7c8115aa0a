"""The per-nodule table: candidates from the probability map, in millimetres.

One row per candidate: a 26-connected component of ``prob > float32(t)`` for
each threshold ``t``, measured on the patient's 2 mm grid in patient
coordinates (docs/algorithms.md §8). Unlike the DSB2017 export
(:mod:`lungzarr.algorithms.features`), nothing here keeps the original's quirks: the
diameter uses the exact 1/3 exponent and the grid's true voxel volume, HU
statistics come from the integer HU in float64, and positions are
millimetres. The original's nodule filter is reported, not applied
(``passes_dsb_filter``).

Labelling is done on the whole patient volume in memory (one patient's 2 mm
arrays are small: ~180 x 170 x 170 voxels), so components are never cut at
chunk borders: the pipeline's ``nodules`` stage is one task per patient.

The table's columns and its stored layout are :mod:`lungzarr.algorithms.nodule_table`
(its names are importable from here too).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from lungzarr.algorithms.components import (
    DSB_THRESHOLDS,
    above_threshold,
    box_shape,
    describe_hu,
    find_components,
    legacy_hu,
    passes_dsb_filter,
    sphere_diameter,
)
from lungzarr.algorithms.nodule_table import (
    NODULE_COLUMNS,
    NODULE_LAYOUT,
    concat_nodule_tables,
    dataset_to_nodules,
    empty_nodule_table,
    nodules_to_dataset,
)
from lungzarr.volume import Grid

__all__ = [
    "DSB_THRESHOLDS",
    "NODULE_COLUMNS",
    "find_nodules",
    "select_nodules",
    "nodule_label_image",
    "REPORTED_THRESHOLD",
    "empty_nodule_table",
    "concat_nodule_tables",
    "nodules_to_dataset",
    "dataset_to_nodules",
    "NODULE_LAYOUT",
    "SOLID_HU",
    "GROUND_GLASS_HU",
    "attenuation_class",
    "longest_axial_diameter",
]

_AXES = ("z", "y", "x")

#: Attenuation classes: HU above which a voxel is solid, above which it is tissue (ground glass or solid),
#: and the solid shares of the tissue that make the classes.
SOLID_HU = -300.0
GROUND_GLASS_HU = -800.0
SOLID_SHARE = 0.8
PART_SOLID_SHARE = 0.2


def attenuation_class(solid_share, ground_glass_share) -> np.ndarray:
    """'solid' / 'part-solid' / 'non-solid' from the solid part of a nodule's tissue (voxels above -800 HU)."""
    solid = np.asarray(solid_share, dtype=np.float64)
    tissue = solid + np.asarray(ground_glass_share, dtype=np.float64)
    share = np.divide(solid, tissue, out=np.zeros_like(solid), where=tissue > 0)
    return np.where(share >= SOLID_SHARE, "solid",
                    np.where(share >= PART_SOLID_SHARE, "part-solid", "non-solid")).astype(object)


def longest_axial_diameter(coords, spacing) -> float:
    """Longest in-plane diameter (mm) of a component given its voxel indices.

    Parameters
    ----------
    coords : ndarray of int, shape (n, 3)
        (z, y, x) indices of the component's voxels.
    spacing : (float, float, float)
        Voxel size in mm.

    Returns
    -------
    float
        Over the axial slices, the largest distance between two voxel centres
        of one slice, plus one pixel (so one voxel measures one pixel).
    """
    from scipy.spatial.distance import pdist

    coords = np.asarray(coords)
    sy, sx = float(spacing[1]), float(spacing[2])
    best = 0.0
    for z in np.unique(coords[:, 0]):
        pts = coords[coords[:, 0] == z][:, 1:] * np.array([sy, sx])
        if len(pts) > 1:
            if len(pts) > 2000:
                from scipy.spatial import ConvexHull

                pts = pts[ConvexHull(pts).vertices]
            best = max(best, float(pdist(pts).max()))
    return best + max(sy, sx)


def _box(mask, margin=0):
    """The bounding box of ``mask``'s voxels grown by ``margin`` and clipped to the array, as slices; or None."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _union(a, b):
    if a is None or b is None:
        return a or b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


class _PleuraDistances:
    """The two Euclidean distance maps of the lung mask, computed on the boxes that decide them.

    ``inside(flat)``: at voxels of the mask, the distance to the nearest voxel
    outside it; ``outside(flat)``: at voxels outside, the distance to the
    nearest voxel inside. Both are ``scipy.ndimage.distance_transform_edt``
    of the whole volume read at those voxels (flat indices into it), with the
    same values, computed on boxes instead (the whole-volume maps were three
    quarters of the nodules stage):

    * inside: the mask's bounding box grown by one voxel. Every voxel of its
      border layer (where that lies inside the volume) is outside the mask, and
      any voxel q beyond the box, clamped to the box, gives a border voxel q'
      with ``|p - q'| <= |p - q|`` on every axis and strictly on one: strictly
      nearer to every p in the box, so no voxel beyond can be the nearest.
    * outside: a box holding every voxel of the mask (all the features) and
      every voxel asked (centroids lie in the bounding box of the components
      at the lowest threshold, which hold those at the higher ones); computed
      only if a centroid lies outside the mask.

    ``tests/test_nodules.py`` checks the values bit for bit against the
    whole-volume maps. ``candidates()`` returns the voxels of the components at
    the lowest threshold.
    """

    def __init__(self, inside, candidates, spacing):
        self.mask, self.spacing = inside, spacing
        self.candidates = candidates
        self._inside = self._outside = None

    def _edt(self, box, mask):
        from scipy import ndimage as ndi

        if box is None:  # an empty mask (or nothing asked): the whole volume, as before
            box = tuple(slice(0, n) for n in mask.shape)
        return box, ndi.distance_transform_edt(mask[box], sampling=self.spacing)

    def _read(self, box_map, flat):
        box, dist = box_map
        index = np.unravel_index(np.asarray(flat, dtype=np.int64), self.mask.shape)
        return dist[tuple(i - b.start for i, b in zip(index, box))]

    def inside(self, flat):
        if self._inside is None:
            self._inside = self._edt(_box(self.mask, margin=1), self.mask)
        return self._read(self._inside, flat)

    def outside(self, flat):
        if self._outside is None:
            box = _union(_box(self.mask), _box(self.candidates()))
            self._outside = self._edt(box if _box(self.mask) is not None else None, ~self.mask)
        return self._read(self._outside, flat)


def _mask_columns(comps, centroid, labels, spacing):
    """The lung-mask columns of one threshold's components (see NODULE_COLUMNS)."""
    n = comps.count
    if labels is None:
        return {"lung": np.full(n, "unknown", dtype=object), "lung_mask_share": np.full(n, np.nan),
                "inside_lung_mask": np.zeros(n, dtype=bool),
                "distance_to_pleura_centre_mm": np.full(n, np.nan),
                "distance_to_pleura_edge_mm": np.full(n, np.nan), "juxtapleural": np.zeros(n, dtype=bool)}
    lab, maps = labels
    flat_lab = lab.reshape(-1)
    step = float(max(spacing))
    centre = np.clip(np.rint(centroid).astype(np.int64), 0, np.array(lab.shape) - 1)
    centre_flat = np.ravel_multi_index(tuple(centre.T), lab.shape)
    side, share, edge, touching = [], [], [], []
    for k in range(n):
        idx = comps.flat_indices(k)
        values = flat_lab[idx]
        in_mask = values > 0
        share.append(float(in_mask.mean()))
        if in_mask.any():
            right, left = int((values == 1).sum()), int((values == 2).sum())
            side.append("right" if right >= left else "left")
            nearest = float(maps.inside(idx[in_mask]).min())
            edge.append(max(0.0, nearest - step))
            # The inside distance of a voxel with a face neighbour outside is at most one (largest) step.
            touching.append(nearest <= step * (1 + 1e-9) or bool((~in_mask).any()))
        else:
            side.append("outside")
            edge.append(np.nan)
            touching.append(False)
    centre_in = flat_lab[centre_flat] > 0
    signed = np.zeros(n, dtype=np.float64)
    signed[centre_in] = maps.inside(centre_flat[centre_in])
    if (~centre_in).any():  # the outside map is computed only when a centroid lies outside the mask
        signed[~centre_in] = -maps.outside(centre_flat[~centre_in])
    return {"lung": np.array(side, dtype=object), "lung_mask_share": np.array(share),
            "inside_lung_mask": centre_in, "distance_to_pleura_centre_mm": signed.astype(np.float64),
            "distance_to_pleura_edge_mm": np.array(edge), "juxtapleural": np.array(touching, dtype=bool)}


def _check_inputs(prob, hu, grid, lungs):
    prob = np.asarray(prob)
    hu = np.asarray(hu)
    if prob.dtype != np.float32 or prob.ndim != 3:
        raise ValueError(f"prob must be a 3-D float32 array (the nodule_prob map), got dtype "
                         f"{prob.dtype!r} and shape {prob.shape!r}")
    if hu.shape != prob.shape:
        raise ValueError(f"hu shape {hu.shape!r} must equal prob shape {prob.shape!r}; "
                         "pass the unsegmented 2 mm HU volume (hu_2mm)")
    if not isinstance(grid, Grid):
        raise TypeError(f"grid must be a lungzarr.volume.Grid, got {type(grid).__name__!r}")
    if tuple(grid.shape) != prob.shape:
        raise ValueError(f"grid shape {tuple(grid.shape)!r} must equal prob shape {prob.shape!r}")
    if lungs is not None:
        lungs = np.asarray(lungs, dtype=bool)
        if lungs.shape != prob.shape:
            raise ValueError(f"lungs shape {lungs.shape!r} must equal prob shape {prob.shape!r}")
    return prob, hu, lungs


def _lung_centre_x_mm(grid: Grid, lungs) -> float | None:
    if lungs is None:
        return float(grid.to_mm([0.0, 0.0, (grid.shape[2] - 1) / 2])[2])
    per_x = lungs.sum(axis=(0, 1), dtype=np.int64)
    if per_x.sum() == 0:
        return None
    centre = float((per_x * np.arange(per_x.size)).sum() / per_x.sum())
    return float(grid.to_mm([0.0, 0.0, centre])[2])


def find_nodules(prob, hu, *, grid: Grid, lungs=None, lung_labels=None, thresholds=DSB_THRESHOLDS,
                 patient: str | None = None) -> pd.DataFrame:
    """Nodule candidates of one patient, one row per (threshold, component).

    Parameters
    ----------
    prob : ndarray of float32, shape (Z, Y, X)
        Nodule probability on the 2 mm grid (``nodule_prob``).
    hu : ndarray, shape (Z, Y, X)
        Unsegmented HU on the same grid (``hu_2mm``).
    grid : lungzarr.volume.Grid
        The 2 mm grid (true step, patient origin).
    lungs : ndarray of bool, optional
        Lung mask on the same grid. Gives ``lung_half``; without it the side
        is taken from the middle of the x axis and no candidate is 'outside'.
    lung_labels : ndarray of uint8, optional
        The 3-D lung mask of stage ``lungs3d`` (0 outside, 1 right, 2 left) on
        the same grid. Gives ``lung``, ``lung_mask_share``,
        ``inside_lung_mask``, the distances to the pleura and
        ``juxtapleural``; without it those columns are 'unknown' / NaN /
        False. Candidates outside the mask are kept and flagged.
    thresholds : sequence of float, optional
        Candidates are the 26-connected components of ``prob > float32(t)``.
    patient : str, optional
        Written to the ``patient`` column.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`NODULE_COLUMNS`, rows by threshold (in the given
        order) then label. The centre is the centroid (mean index of the
        component's voxels), in voxels (``z_vox``...) and in patient mm
        (``z_mm``... via ``grid.to_mm``); the bounding box is ``z0...x1``
        (stop exclusive) and its centre ``bbox_*_mm``.

    Notes
    -----
    ``lung_half`` uses DICOM patient coordinates: +x points to the patient's
    left, so a centroid at larger x than the lung mask's centre is 'left'.
    ``passes_dsb_filter`` is the original's filter verbatim (mean of the HU
    clipped to [-1000, 400] in float32 below 396, and the 0.3333-exponent
    diameter of 8 mm³ voxels above 3 mm), so that selecting on it gives the
    DSB2017 export's nodules.
    """
    prob, hu, lungs = _check_inputs(prob, hu, grid, lungs)
    spacing = np.asarray(grid.spacing, dtype=np.float64)
    mask_maps = None
    if lung_labels is not None:
        lung_labels = np.asarray(lung_labels)
        if lung_labels.shape != prob.shape:
            raise ValueError(f"lung_labels shape {lung_labels.shape!r} must equal prob shape {prob.shape!r}; "
                             "pass the lungs3d stage's lung_labels of this patient")
        inside = lung_labels > 0
        mask_maps = (lung_labels, _PleuraDistances(inside, lambda: above_threshold(prob, min(thresholds)), spacing))
    centre_x_mm = _lung_centre_x_mm(grid, lungs)
    frames = []
    for threshold in thresholds:
        comps = find_components(above_threshold(prob, threshold))
        if comps.count == 0:
            continue
        centroid = comps.centroids()
        centroid_mm = grid.to_mm(centroid)
        bbox_mm = grid.to_mm((comps.start + comps.stop - 1) / 2)
        extents = (comps.stop - comps.start) * spacing
        volume = comps.voxels * float(np.prod(spacing))
        diameter = sphere_diameter(volume)
        shape = box_shape(extents, diameter)
        hu_values = comps.values(hu)
        hu_stats = [describe_hu(values) for values in hu_values]
        prob_values = comps.values(prob)
        solid = np.array([float((v > SOLID_HU).mean()) for v in hu_values])
        glass = np.array([float(((v > GROUND_GLASS_HU) & (v <= SOLID_HU)).mean()) for v in hu_values])
        axial = [longest_axial_diameter(np.stack(np.unravel_index(comps.flat_indices(k), comps.shape), axis=1),
                                        spacing) for k in range(comps.count)]
        if centre_x_mm is None:
            side = np.full(comps.count, "outside", dtype=object)
        else:
            side = np.where(centroid_mm[:, 2] > centre_x_mm, "left", "right").astype(object)
            if lungs is not None:
                side[~comps.any_in(lungs)] = "outside"
        columns = {
            "patient": [patient] * comps.count,
            "threshold": np.full(comps.count, float(threshold)),
            "label": np.arange(1, comps.count + 1, dtype=np.int32),
            "voxels": comps.voxels,
            **{f"{a}_vox": centroid[:, i] for i, a in enumerate(_AXES)},
            **{f"{a}_mm": centroid_mm[:, i] for i, a in enumerate(_AXES)},
            **{f"{a}0": comps.start[:, i] for i, a in enumerate(_AXES)},
            **{f"{a}1": comps.stop[:, i] for i, a in enumerate(_AXES)},
            **{f"bbox_{a}_mm": bbox_mm[:, i] for i, a in enumerate(_AXES)},
            "volume_mm3": volume,
            "diameter_mm": diameter,
            **{f"extent_{a}_mm": extents[:, i] for i, a in enumerate(_AXES)},
            "irregularity": shape["irreg_vol"],
            "aspect": shape["aspect"],
            "aspect_xy": shape["aspect_xy"],
            "extent": comps.voxels / np.prod(comps.stop - comps.start, axis=1),
            **{f"hu_{short}": [s[name] for s in hu_stats]
               for short, name in [("min", "min"), ("max", "max"), ("mean", "mean"),
                                   ("var", "variance"), ("skew", "skewness"),
                                   ("kurt", "kurtosis")]},
            "prob_max": [float(v.max()) for v in prob_values],
            "prob_mean": [float(v.mean(dtype=np.float64)) for v in prob_values],
            "lung_half": side,
            "passes_dsb_filter": passes_dsb_filter([legacy_hu(v) for v in hu_values],
                                                   comps.voxels),
            **_mask_columns(comps, centroid, mask_maps, spacing),
            "solid_share": solid,
            "ground_glass_share": glass,
            "attenuation": attenuation_class(solid, glass),
            "longest_axial_diameter_mm": np.array(axial, dtype=np.float64),
        }
        frames.append(pd.DataFrame(columns))
    if not frames:
        table = empty_nodule_table()
    else:
        table = pd.concat(frames, ignore_index=True)
    return table.astype({name: dtype for name, (dtype, _) in NODULE_COLUMNS.items()})


#: The nodules a report, the demo and the DSB2017 counts show: components at this threshold ...
REPORTED_THRESHOLD = 0.5


def select_nodules(table: pd.DataFrame, *, threshold: float | None = REPORTED_THRESHOLD,
                   dsb_filter: bool = True) -> pd.DataFrame:
    """The rows of a nodule table at one threshold that pass the original's filter.

    The one selection behind "nodules found": the demo, the report, the
    patient table's ``n_nodules_0.5_filtered``, ``export_nodules`` and the
    evaluation use it.

    Parameters
    ----------
    table : DataFrame
        A nodule table (:data:`NODULE_COLUMNS`); may be empty.
    threshold : float or None
        Keep rows of this threshold (compared with ``np.isclose``); None keeps every threshold.
    dsb_filter : bool
        Keep only rows with ``passes_dsb_filter`` (mean HU < 396, diameter > 3 mm).
    """
    if not len(table):
        return table
    keep = np.ones(len(table), dtype=bool)
    if threshold is not None:
        keep &= np.isclose(table["threshold"].to_numpy(dtype=np.float64), threshold)
    if dsb_filter:
        keep &= table["passes_dsb_filter"].to_numpy(dtype=bool)
    return table[keep]


def nodule_label_image(prob, table=None, *, threshold: float = REPORTED_THRESHOLD) -> np.ndarray:
    """The nodule label image: each candidate at ``threshold`` labelled with its nodule table ``label``.

    The one label rule of every nodule label image lungzarr writes (the NIfTI
    export, the NGFF ``labels/nodules`` image): the 26-connected components
    of ``prob > float32(threshold)``, numbered as :func:`find_nodules` numbers
    them (raster order, from 1), so a voxel's value is the ``label`` of its
    row at that threshold; 0 elsewhere.

    Parameters
    ----------
    prob : ndarray of float32, shape (Z, Y, X)
        The patient's ``nodule_prob``.
    table : DataFrame, optional
        The patient's nodule table. When given, its rows at ``threshold`` must
        be these components, label for label (same count, same voxels per
        label): a table computed from another ``nodule_prob`` would give
        labels that name other nodules.
    threshold : float
        One of the table's thresholds.

    Returns
    -------
    ndarray of int32

    Raises
    ------
    ValueError
        The table's rows at ``threshold`` are not these components.
    """
    comps = find_components(above_threshold(prob, threshold))
    labels = comps.label_image()
    if table is not None:
        rows = table[np.isclose(table["threshold"].to_numpy(np.float64), float(threshold), rtol=0, atol=1e-12)]
        rows = rows.sort_values("label")
        counts = np.bincount(labels.ravel(), minlength=comps.count + 1)[1:]
        if (len(rows) != comps.count or not np.array_equal(rows["label"].to_numpy(), np.arange(1, comps.count + 1))
                or not np.array_equal(rows["voxels"].to_numpy(), counts)):
            raise ValueError(f"the nodule table at threshold {threshold!r} does not match nodule_prob "
                             f"({len(rows)} rows, {comps.count} components)")
    return labels
