"""Pixels to patient millimetres (part of :mod:`lungzarr.evaluate`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lungzarr.evaluate._lidc import ReaderMark


@dataclass(frozen=True)
class SliceGeometry:
    """Where the pixels of a patient's axial slices lie, in patient mm.

    ``x_mm = x0 + col * dx`` and ``y_mm = y0 + row * dy``: ``(x0, y0)`` are
    the first two ImagePositionPatient values, ``dy, dx`` the PixelSpacing
    (row spacing first in DICOM), signed if the axes run backwards.

    Parameters
    ----------
    x0, y0, dx, dy : float
    z_by_sop : dict of str to float
        Slice position (mm) of each SOPInstanceUID.
    slice_thickness : float, optional
        Thickness (mm) a filled outline stands for; by default the median step
        between the sorted slice positions.
    """

    x0: float
    y0: float
    dx: float
    dy: float
    z_by_sop: dict
    slice_thickness: float | None = None

    def __post_init__(self):
        for name in ("dx", "dy"):
            value = getattr(self, name)
            if not np.isfinite(value) or value == 0:
                raise ValueError(f"{name} must be a finite non-zero spacing in mm, got {value!r}")
        if self.slice_thickness is not None and not self.slice_thickness > 0:
            raise ValueError(f"slice_thickness must be positive (mm), got {self.slice_thickness!r}")

    @classmethod
    def from_axes(cls, x_mm, y_mm, z_mm, sop_uids, *, slice_thickness=None) -> "SliceGeometry":
        """Geometry from a volume's coordinate arrays (e.g. the store's ``hu``).

        Parameters
        ----------
        x_mm, y_mm : array_like
            Column and row centre coordinates (mm), at least 2 each.
        z_mm : array_like
            Slice positions (mm).
        sop_uids : sequence of str
            SOPInstanceUID of each slice, same length as ``z_mm``.
        """
        x_mm, y_mm = np.asarray(x_mm, float), np.asarray(y_mm, float)
        z_mm = np.asarray(z_mm, float)
        if x_mm.size < 2 or y_mm.size < 2:
            raise ValueError(f"x_mm and y_mm need at least 2 values each, got {x_mm.size} and {y_mm.size}")
        if len(sop_uids) != z_mm.size:
            raise ValueError(f"sop_uids has {len(sop_uids)} entries but z_mm has {z_mm.size}: "
                             f"give one SOPInstanceUID per slice")
        steps = []
        for name, axis in (("x_mm", x_mm), ("y_mm", y_mm)):
            # The mean step is exact for a regular axis and robust to rounding.
            step = (axis[-1] - axis[0]) / (axis.size - 1)
            if not np.allclose(np.diff(axis), step, rtol=1e-4, atol=1e-6):
                raise ValueError(f"{name} is not evenly spaced (steps {np.unique(np.diff(axis))[:4]!r}): "
                                 f"pass the pixel-centre coordinates of one regular slice grid")
            steps.append(float(step))
        return cls(float(x_mm[0]), float(y_mm[0]), steps[0], steps[1],
                   {str(u): float(z) for u, z in zip(sop_uids, z_mm)}, slice_thickness)

    @property
    def z_range(self) -> tuple[float, float]:
        """Lowest and highest slice position (mm); NaNs when there are no slices."""
        if not self.z_by_sop:
            return (math.nan, math.nan)
        z = np.fromiter(self.z_by_sop.values(), float)
        return float(z.min()), float(z.max())

    def thickness(self) -> float:
        """Slice thickness (mm) used for volumes."""
        if self.slice_thickness is not None:
            return float(self.slice_thickness)
        z = np.unique(np.fromiter(self.z_by_sop.values(), float))
        if z.size < 2:
            raise ValueError("the geometry has fewer than 2 slices, so the slice thickness is "
                             "unknown: pass slice_thickness= to SliceGeometry")
        return float(np.median(np.diff(z)))

    def col_row_to_mm(self, cols, rows):
        """``(y_mm, x_mm)`` of fractional pixel positions."""
        cols, rows = np.asarray(cols, float), np.asarray(rows, float)
        return self.y0 + rows * self.dy, self.x0 + cols * self.dx


@dataclass(frozen=True)
class MarkMeasure:
    """Centre and size of one reader mark in patient millimetres."""

    z_mm: float
    y_mm: float
    x_mm: float
    diameter_mm: float      # NaN for single-point marks
    volume_mm3: float       # NaN for single-point marks
    n_voxels: int
    n_slices: int
    notes: tuple = ()


def _slice_mask(rois, *, outline):
    """Filled mask of one slice's ROIs in a local box; returns mask, row0, col0."""
    from skimage.draw import polygon

    rows = np.concatenate([r.rows for r in rois])
    cols = np.concatenate([r.cols for r in rois])
    row0, col0 = rows.min() - 1, cols.min() - 1
    shape = (rows.max() - row0 + 2, cols.max() - col0 + 2)

    def interior(roi):
        # Pixels whose centres fall inside the polygon through the outline
        # pixel centres, minus the outline pixels themselves.
        inside = np.zeros(shape, bool)
        rr, cc = polygon(roi.rows - row0, roi.cols - col0, shape)
        inside[rr, cc] = True
        inside[roi.rows - row0, roi.cols - col0] = False
        return inside

    mask = np.zeros(shape, bool)
    for roi in rois:
        if roi.inclusion:
            mask |= interior(roi)
            if outline == "include":
                mask[roi.rows - row0, roi.cols - col0] = True
    for roi in rois:
        if not roi.inclusion:
            # A hole's own outline bounds the hole from outside: those pixels
            # stay nodule under the LIDC convention.
            mask &= ~interior(roi)
            if outline == "include":
                mask[roi.rows - row0, roi.cols - col0] = False
    return mask, row0, col0


def measure_mark(mark: ReaderMark, geometry: SliceGeometry, *, outline: str = "exclude") -> MarkMeasure:
    """Centroid and equivalent diameter of a reader mark from its filled outlines.

    Each slice's ``inclusion=TRUE`` outlines are filled (union) and its
    ``inclusion=FALSE`` outlines cut holes. The centroid is the mean position
    of the filled voxels; the volume is ``n_voxels * |dx| * |dy| * thickness``
    and the diameter that of the sphere of the same volume,
    ``(6 V / pi) ** (1/3)``.

    Parameters
    ----------
    mark : ReaderMark
    geometry : SliceGeometry
        The slice's z comes from ``geometry.z_by_sop[roi.sop_uid]``; when the
        SOP UID is unknown to the geometry the XML's ``imageZposition`` is
        used and a note says so.
    outline : {"exclude", "include"}
        The LIDC protocol asked readers to draw the outline just outside the
        nodule, so by default the outline pixels are not nodule
        (``"exclude"``). ``"include"`` counts them (larger diameter). A slice
        whose interior is empty (an outline a pixel or two wide) falls back to
        its outline pixels.

    Returns
    -------
    MarkMeasure
        For a single-point mark (small nodule, non-nodule) the centre is the
        point and diameter/volume are NaN.
    """
    if outline not in ("exclude", "include"):
        raise ValueError(f"outline must be 'exclude' or 'include', got {outline!r}")
    if not mark.rois:
        raise ValueError(f"mark {mark.mark_id!r} of reader {mark.reader!r} has no roi, so no "
                         f"position: drop it before measuring")
    notes = []
    by_slice = {}
    for roi in mark.rois:
        z = geometry.z_by_sop.get(roi.sop_uid) if roi.sop_uid is not None else None
        if z is None:
            if roi.z_mm is None:
                notes.append(f"roi on unknown slice {roi.sop_uid!r} without imageZposition: dropped")
                continue
            z = roi.z_mm
            notes.append(f"slice {roi.sop_uid!r} not in the geometry: z from imageZposition {z}")
        by_slice.setdefault(round(float(z), 4), []).append(roi)
    if not by_slice:
        raise ValueError(f"mark {mark.mark_id!r} of reader {mark.reader!r} has no roi the "
                         f"geometry can place")

    if all(r.n_points == 1 for rois in by_slice.values() for r in rois if r.inclusion):
        zs, ys, xs = [], [], []
        for z, rois in by_slice.items():
            for roi in rois:
                y, x = geometry.col_row_to_mm(roi.cols, roi.rows)
                zs.append(np.full(y.shape, z)), ys.append(y), xs.append(x)
        zs, ys, xs = (np.concatenate(a) for a in (zs, ys, xs))
        return MarkMeasure(float(zs.mean()), float(ys.mean()), float(xs.mean()),
                           math.nan, math.nan, 0, len(by_slice), tuple(notes))

    sum_z = sum_row = sum_col = 0.0
    n_total = 0
    for z, rois in by_slice.items():
        mask, row0, col0 = _slice_mask(rois, outline=outline)
        if not mask.any():
            notes.append(f"slice z={z}: empty interior, outline pixels used")
            mask, row0, col0 = _slice_mask(rois, outline="include")
        rr, cc = np.nonzero(mask)
        n = rr.size
        n_total += n
        sum_z += z * n
        sum_row += (rr + row0).sum()
        sum_col += (cc + col0).sum()
    if n_total == 0:
        raise ValueError(f"mark {mark.mark_id!r} of reader {mark.reader!r} fills no pixel "
                         f"(only holes?)")
    y_mm, x_mm = geometry.col_row_to_mm(sum_col / n_total, sum_row / n_total)
    thickness = geometry.thickness()
    volume = n_total * abs(geometry.dx) * abs(geometry.dy) * thickness
    diameter = (6.0 * volume / math.pi) ** (1.0 / 3.0)
    return MarkMeasure(sum_z / n_total, float(y_mm), float(x_mm), float(diameter), float(volume),
                       int(n_total), len(by_slice), tuple(notes))


def measure_marks(marks, geometry: SliceGeometry, *, outline: str = "exclude",
                  patient: str | None = None) -> pd.DataFrame:
    """One row per reader mark: reader, id, kind, centre (mm), diameter, volume.

    Marks without any position (no roi) are left out.
    """
    rows = []
    for mark in marks:
        if not mark.rois:
            continue
        m = measure_mark(mark, geometry, outline=outline)
        slice_z = [geometry.z_by_sop.get(r.sop_uid, r.z_mm) for r in mark.rois]
        slice_z = [z for z in slice_z if z is not None]
        rows.append({"patient": patient, "reader": mark.reader, "session": mark.session,
                     "mark_id": mark.mark_id, "kind": mark.kind, "z_mm": m.z_mm, "y_mm": m.y_mm,
                     "x_mm": m.x_mm, "diameter_mm": m.diameter_mm, "volume_mm3": m.volume_mm3,
                     "n_voxels": m.n_voxels, "n_slices": m.n_slices,
                     "z_min_mm": min(slice_z), "z_max_mm": max(slice_z),
                     "notes": "; ".join(mark.notes + m.notes)})
    columns = ["patient", "reader", "session", "mark_id", "kind", "z_mm", "y_mm", "x_mm",
               "diameter_mm", "volume_mm3", "n_voxels", "n_slices", "z_min_mm", "z_max_mm", "notes"]
    return pd.DataFrame(rows, columns=columns)


