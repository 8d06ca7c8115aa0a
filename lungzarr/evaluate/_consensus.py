"""Reader consensus (part of :mod:`lungzarr.evaluate`)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lungzarr.evaluate._constants import TRUTH_COLUMNS
from lungzarr.evaluate._geometry import SliceGeometry, _slice_mask, measure_marks


def _marks_link(a, b, voxels_a, voxels_b, *, link_distance_mm, point_diameter_mm):
    da = a["diameter_mm"] if np.isfinite(a["diameter_mm"]) else point_diameter_mm
    db = b["diameter_mm"] if np.isfinite(b["diameter_mm"]) else point_diameter_mm
    dist = math.dist((a["z_mm"], a["y_mm"], a["x_mm"]), (b["z_mm"], b["y_mm"], b["x_mm"]))
    if link_distance_mm is not None:
        return dist < link_distance_mm
    if voxels_a and voxels_b and voxels_a & voxels_b:
        return True
    return dist < max(da, db) / 2.0


def consensus_nodules(marks, geometry: SliceGeometry, *, patient: str | None = None,
                      min_readers: int = 3, min_diameter_mm: float = 3.0,
                      link_distance_mm: float | None = None, outline: str = "exclude",
                      point_diameter_mm: float = 3.0, include_non_nodules: bool = True,
                      restrict_to_geometry: bool = True) -> pd.DataFrame:
    """Group the marks of different readers into nodules and decide targets.

    Two marks link when their filled voxels overlap or their centres are
    closer than the larger of their radii (or, with ``link_distance_mm``,
    closer than that). A nodule is a connected group of linked marks; its
    centre and diameter are the means over its marks, and ``n_readers``
    counts the distinct readers in it. It is a ``"target"`` when it has
    outlined marks, ``n_readers >= min_readers`` and ``diameter >=
    min_diameter_mm``; otherwise ``"ignore"`` (as LUNA16's
    ``annotations_excluded.csv``). A group of single-point marks (LIDC
    "small nodule", < 3 mm) has no measured diameter; it is always ignored
    and gets :data:`UNKNOWN_DIAMETER_MM` as its ignore diameter, as LUNA16's
    script does for ``-1``.

    Parameters
    ----------
    marks : sequence of ReaderMark
    geometry : SliceGeometry
    patient : str, optional
        Written to the ``patient`` column.
    min_readers : int
    min_diameter_mm : float
    link_distance_mm : float, optional
        Replace the default linking rule by a fixed centre distance.
    outline : {"exclude", "include"}
        See :func:`measure_mark`.
    point_diameter_mm : float
        Size a single-point mark is given for linking (LIDC: < 3 mm).
    include_non_nodules : bool
        Keep readers' non-nodule marks as ignore regions (LUNA16 does).
    restrict_to_geometry : bool
        Mark nodules whose centre lies outside the geometry's z range (by more
        than half a slice) as ``"outside"``: a slab only scores what it holds.

    Returns
    -------
    truth : DataFrame
        The truth table (:data:`TRUTH_COLUMNS`), one row per nodule.
    """
    if min_readers < 1:
        raise ValueError(f"min_readers must be at least 1, got {min_readers!r}")
    if not min_diameter_mm >= 0:
        raise ValueError(f"min_diameter_mm must be >= 0 mm, got {min_diameter_mm!r}")
    marks = [m for m in marks if m.rois and (include_non_nodules or m.kind != "non_nodule")]
    table = measure_marks(marks, geometry, outline=outline, patient=patient)
    voxels = []
    for mark in marks:
        cells = set()
        if mark.kind == "nodule":
            for roi in mark.rois:
                z = geometry.z_by_sop.get(roi.sop_uid, roi.z_mm)
                if roi.inclusion and roi.n_points > 1:
                    mask, row0, col0 = _slice_mask([roi], outline="include")
                    rr, cc = np.nonzero(mask)
                    cells.update(zip([round(z, 4)] * rr.size, (rr + row0).tolist(), (cc + col0).tolist()))
        voxels.append(cells)

    # Union-find over links between marks of different readers; nodules and
    # non-nodules never merge (LUNA16 keeps them in separate lists).
    parent = list(range(len(marks)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    records = table.to_dict("records")
    for i in range(len(marks)):
        for j in range(i + 1, len(marks)):
            if marks[i].reader == marks[j].reader:
                continue
            if (marks[i].kind == "non_nodule") != (marks[j].kind == "non_nodule"):
                continue
            if _marks_link(records[i], records[j], voxels[i], voxels[j],
                           link_distance_mm=link_distance_mm, point_diameter_mm=point_diameter_mm):
                parent[find(j)] = find(i)

    groups = {}
    for i in range(len(marks)):
        groups.setdefault(find(i), []).append(i)
    z_lo, z_hi = geometry.z_range
    try:
        half = geometry.thickness() / 2.0
    except ValueError:
        half = 0.0
    rows = []
    for members in groups.values():
        sub = table.iloc[members]
        kinds = set(sub["kind"])
        outlined = sub[sub["kind"] == "nodule"]
        if not outlined.empty:
            # Centre and size from the outlined marks only; a reader's point
            # mark in the same group still counts as a reader.
            centre_rows, kind = outlined, "nodule"
            diameter = float(outlined["diameter_mm"].mean())
        else:
            centre_rows = sub
            kind = "non_nodule" if kinds == {"non_nodule"} else "small_nodule"
            diameter = math.nan
        readers = sorted(set(sub["reader"]))
        z, y, x = (float(centre_rows[c].mean()) for c in ("z_mm", "y_mm", "x_mm"))
        if kind == "nodule" and len(readers) >= min_readers and diameter >= min_diameter_mm:
            status = "target"
        else:
            status = "ignore"
        if restrict_to_geometry and np.isfinite(z_lo) and not (z_lo - half <= z <= z_hi + half):
            status = "outside"
        rows.append({"patient": patient, "nodule_id": "+".join(f"{r}:{m}" for r, m in
                                                               zip(sub["reader"], sub["mark_id"])),
                     "z_mm": z, "y_mm": y, "x_mm": x, "diameter_mm": diameter,
                     "n_readers": len(readers), "readers": ";".join(readers),
                     "n_marks": len(members), "kind": kind, "status": status})
    truth = pd.DataFrame(rows, columns=TRUTH_COLUMNS)
    order = {"target": 0, "ignore": 1, "outside": 2}
    truth = truth.sort_values(["status", "z_mm"], key=lambda s: s.map(order) if s.name == "status" else s,
                              kind="stable").reset_index(drop=True)
    return truth


