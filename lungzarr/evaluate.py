"""Evaluation of nodule detections against reader annotations.

Ground truth comes from the LIDC-IDRI reader XML files (each radiologist's
outlines, slice by slice, in pixels) or from the LUNA16 ``annotations.csv``
(one row per nodule, world millimetres). Both end up in the same *truth
table*: one row per nodule with its centre ``(z_mm, y_mm, x_mm)`` in patient
millimetres, its diameter, the readers who marked it and its ``status``:

``"target"``
    A nodule the detector must find (LUNA16: marked by at least 3 of the 4
    readers and at least 3 mm across).
``"ignore"``
    Something a reader marked that is not a target (too small, too few
    readers, a non-nodule). Detections on it are neither hits nor false
    positives.
``"outside"``
    A nodule whose centre lies outside the scanned slab; left out of every
    count.

Scoring follows the LUNA16 evaluation script (``noduleCADEvaluationLUNA16.py``):
a detection hits a target when its centre is closer to the target's centre
than the target's radius; each target counts once, with the highest
probability among its hits; a detection within the radius of an ignored
nodule is dropped; every other detection is a false positive. The FROC curve,
its interpolation and the CPM score are computed as that script does (see
:func:`froc_curve` and :func:`cpm_score`).

This module reads XML and CSV only: no pydicom, no zarr. The slice geometry a
LIDC outline needs comes in as a :class:`SliceGeometry`, which the caller
builds from the store's coordinates (:meth:`SliceGeometry.from_axes`).
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "LIDC_NAMESPACE",
    "CPM_FP_RATES",
    "Roi",
    "ReaderMark",
    "ReaderMarks",
    "SliceGeometry",
    "MarkMeasure",
    "EvaluationResult",
    "read_lidc_xml",
    "summarize_lidc_marks",
    "measure_mark",
    "measure_marks",
    "read_luna_csv",
    "consensus_nodules",
    "match_detections",
    "froc_curve",
    "cpm_score",
    "bootstrap_froc",
    "evaluate_detections",
    "evaluate_lidc_patient",
    "write_evaluation",
]

#: XML namespace of LIDC-IDRI ``LidcReadMessage`` files.
LIDC_NAMESPACE = "http://www.nih.gov"
_NS = {"n": LIDC_NAMESPACE}

#: False-positive rates (per scan) whose mean sensitivity is the CPM score.
CPM_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

# LUNA16 interpolates the FROC curve on this many points between these rates.
_FROC_GRID_MIN = 0.125
_FROC_GRID_MAX = 8.0
_FROC_GRID_N = 10001

#: Diameter (mm) LUNA16's script gives an annotation without one (``-1``).
UNKNOWN_DIAMETER_MM = 10.0

TRUTH_COLUMNS = ["patient", "nodule_id", "z_mm", "y_mm", "x_mm", "diameter_mm",
                 "n_readers", "readers", "n_marks", "kind", "status"]
DETECTION_COLUMNS = ["patient", "z_mm", "y_mm", "x_mm", "prob"]


# --------------------------------------------------------------------------
# LIDC-IDRI XML
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Roi:
    """One outline (or single point) of a reader mark on one slice.

    Parameters
    ----------
    z_mm : float or None
        ``imageZposition`` as written in the XML (``None`` when absent).
    sop_uid : str or None
        ``imageSOP_UID`` of the slice the outline was drawn on.
    inclusion : bool
        ``False`` when the outline cuts a hole out of the nodule.
    cols, rows : ndarray of int
        Outline pixels: ``xCoord`` is the column, ``yCoord`` the row.
    """

    z_mm: float | None
    sop_uid: str | None
    inclusion: bool
    cols: np.ndarray = field(repr=False)
    rows: np.ndarray = field(repr=False)

    @property
    def n_points(self) -> int:
        return int(self.cols.size)


@dataclass(frozen=True)
class ReaderMark:
    """One reader's mark: a nodule (outlined or small) or a non-nodule.

    Parameters
    ----------
    reader : str
        ``servicingRadiologistID`` (``"session-<i>"`` when absent).
    session : int
        Index of the ``readingSession`` in the file (0-based).
    mark_id : str
        ``noduleID`` or ``nonNoduleID``.
    kind : {"nodule", "small_nodule", "non_nodule"}
        ``"nodule"``: outlined (≥ 3 mm per the LIDC protocol);
        ``"small_nodule"``: an ``unblindedReadNodule`` whose ROIs are single
        points (< 3 mm); ``"non_nodule"``: a ``nonNodule`` locus.
    rois : tuple of Roi
    characteristics : dict
        The ``characteristics`` sub-elements as integers (empty if none).
    series_uid : str or None
        ``SeriesInstanceUid`` of the file's ``ResponseHeader``.
    notes : tuple of str
        Anything missing or odd the parser met in this mark.
    """

    reader: str
    session: int
    mark_id: str
    kind: str
    rois: tuple
    characteristics: dict
    series_uid: str | None = None
    notes: tuple = ()


class ReaderMarks(list):
    """A list of :class:`ReaderMark` plus what the parser met in the file.

    Attributes
    ----------
    path : str
    series_uid : str or None
    sessions : list of dict
        One entry per ``readingSession``: index, reader, annotation version,
        number of marks of each kind.
    notes : list of str
        File-level findings (readers with several sessions, empty sessions,
        missing fields), in reading order.
    """

    def __init__(self, marks=(), *, path=None, series_uid=None, sessions=None, notes=None):
        super().__init__(marks)
        self.path = None if path is None else str(path)
        self.series_uid = series_uid
        self.sessions = list(sessions or [])
        self.notes = list(notes or [])


def _text(element, tag):
    if element is None:
        return None
    found = element.find(f"n:{tag}", _NS)
    if found is None or found.text is None:
        return None
    text = found.text.strip()
    return text or None


def _float_or_none(text):
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def _points(element, tag):
    """``xCoord``/``yCoord`` pairs of the ``tag`` children; bad pairs skipped."""
    cols, rows, bad = [], [], 0
    for point in element.findall(f"n:{tag}", _NS):
        x = _float_or_none(_text(point, "xCoord"))
        y = _float_or_none(_text(point, "yCoord"))
        if x is None or y is None:
            bad += 1
            continue
        cols.append(int(round(x)))
        rows.append(int(round(y)))
    return np.asarray(cols, dtype=np.int64), np.asarray(rows, dtype=np.int64), bad


def _read_characteristics(element):
    chars = {}
    node = element.find("n:characteristics", _NS)
    if node is None:
        return chars
    for child in node:
        name = child.tag.split("}")[-1]
        value = (child.text or "").strip()
        if value:
            try:
                chars[name] = int(value)
            except ValueError:
                chars[name] = value
    return chars


def _mark_id(element, tag, fallback, notes):
    """The mark's id, or ``fallback`` (numbered by position) with a note."""
    mark_id = _text(element, tag)
    if mark_id is None:
        notes.append(f"no {tag}: numbered by position")
        return fallback
    return mark_id


def _slice_reference(element, notes, where=""):
    """``(imageZposition, imageSOP_UID)`` of a roi or locus, noting what is missing."""
    z = _float_or_none(_text(element, "imageZposition"))
    sop = _text(element, "imageSOP_UID")
    if z is None:
        notes.append(f"{where}no imageZposition")
    if sop is None:
        notes.append(f"{where}no imageSOP_UID")
    return z, sop


def _read_nodule(element, *, reader, session, series_uid, index):
    notes = []
    mark_id = _mark_id(element, "noduleID", f"session{session}-nodule{index}", notes)
    rois = []
    for k, roi in enumerate(element.findall("n:roi", _NS)):
        z, sop = _slice_reference(roi, notes, where=f"roi {k}: ")
        inclusion_text = _text(roi, "inclusion")
        if inclusion_text is None:
            notes.append(f"roi {k}: no inclusion flag, taken as TRUE")
        inclusion = (inclusion_text or "TRUE").upper() != "FALSE"
        cols, rows, bad = _points(roi, "edgeMap")
        if bad:
            notes.append(f"roi {k}: {bad} edgeMap point(s) without xCoord/yCoord skipped")
        if cols.size == 0:
            notes.append(f"roi {k}: no edgeMap points, roi dropped")
            continue
        rois.append(Roi(z, sop, inclusion, cols, rows))
    if not rois:
        notes.append("no usable roi")
    included = [r for r in rois if r.inclusion]
    # LIDC: nodules < 3 mm are marked by a single point (one-pixel roi per slice).
    kind = "small_nodule" if included and all(r.n_points == 1 for r in included) else "nodule"
    chars = _read_characteristics(element)
    if kind == "nodule" and not chars:
        notes.append("outlined nodule without characteristics")
    return ReaderMark(reader, session, mark_id, kind, tuple(rois), chars, series_uid, tuple(notes))


def _read_non_nodule(element, *, reader, session, series_uid, index):
    notes = []
    mark_id = _mark_id(element, "nonNoduleID", f"session{session}-nonnodule{index}", notes)
    z, sop = _slice_reference(element, notes)
    cols, rows, bad = _points(element, "locus")
    if bad:
        notes.append(f"{bad} locus point(s) without xCoord/yCoord skipped")
    rois = (Roi(z, sop, True, cols, rows),) if cols.size else ()
    if not rois:
        notes.append("no locus: mark has no position")
    return ReaderMark(reader, session, mark_id, "non_nodule", rois, {}, series_uid, tuple(notes))


def read_lidc_xml(path) -> ReaderMarks:
    """Read every reader mark of a LIDC-IDRI ``LidcReadMessage`` XML file.

    Parameters
    ----------
    path : str or Path
        The XML file (namespace ``http://www.nih.gov``).

    Returns
    -------
    marks : ReaderMarks
        A list of :class:`ReaderMark`, in file order, with the file-level
        findings in ``marks.sessions`` and ``marks.notes``.

    Notes
    -----
    The reader is identified by ``servicingRadiologistID``; a reader who
    appears in several ``readingSession`` elements keeps one identity (their
    marks still carry the session index) and a note says so. Missing fields
    never stop the parse: the affected part is dropped or defaulted and a note
    is recorded on the mark.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"cannot read LIDC XML {str(path)!r}: {exc}; pass a LidcReadMessage "
                         f"XML file from the LIDC-IDRI download") from exc
    if root.tag != f"{{{LIDC_NAMESPACE}}}LidcReadMessage":
        raise ValueError(f"{str(path)!r} is not a LIDC-IDRI read message: root element "
                         f"{root.tag!r}, expected 'LidcReadMessage' in namespace {LIDC_NAMESPACE!r}")
    series_uid = _text(root.find("n:ResponseHeader", _NS), "SeriesInstanceUid")
    notes = []
    if series_uid is None:
        notes.append("no SeriesInstanceUid in ResponseHeader")
    marks, sessions, seen_readers = [], [], {}
    for s, session in enumerate(root.findall("n:readingSession", _NS)):
        reader = _text(session, "servicingRadiologistID")
        if reader is None:
            reader = f"session-{s}"
            notes.append(f"session {s}: no servicingRadiologistID, reader named {reader!r}")
        if reader in seen_readers:
            notes.append(f"reader {reader!r} has several sessions ({seen_readers[reader]} and {s}): "
                         f"marks kept, counted as one reader")
        seen_readers.setdefault(reader, s)
        session_marks = [
            _read_nodule(el, reader=reader, session=s, series_uid=series_uid, index=i)
            for i, el in enumerate(session.findall("n:unblindedReadNodule", _NS))
        ] + [
            _read_non_nodule(el, reader=reader, session=s, series_uid=series_uid, index=i)
            for i, el in enumerate(session.findall("n:nonNodule", _NS))
        ]
        if not session_marks:
            notes.append(f"session {s} (reader {reader!r}) has no marks")
        counts = {k: sum(m.kind == k for m in session_marks)
                  for k in ("nodule", "small_nodule", "non_nodule")}
        sessions.append({"session": s, "reader": reader,
                         "annotation_version": _text(session, "annotationVersion"), **counts})
        marks.extend(session_marks)
    if not sessions:
        notes.append("no readingSession")
    return ReaderMarks(marks, path=path, series_uid=series_uid, sessions=sessions, notes=notes)


def summarize_lidc_marks(marks: ReaderMarks) -> dict:
    """What a LIDC file holds, as a JSON-able dict (readers, sessions, notes)."""
    kinds = {}
    for mark in marks:
        kinds[mark.kind] = kinds.get(mark.kind, 0) + 1
    mark_notes = [f"{m.reader}/{m.mark_id}: {note}" for m in marks for note in m.notes]
    return {
        "path": getattr(marks, "path", None),
        "series_uid": getattr(marks, "series_uid", None),
        "readers": sorted({m.reader for m in marks}
                          | {s["reader"] for s in getattr(marks, "sessions", [])}),
        "sessions": list(getattr(marks, "sessions", [])),
        "marks_by_kind": kinds,
        "outlines": sum(len(m.rois) for m in marks if m.kind == "nodule"),
        "notes": list(getattr(marks, "notes", [])) + mark_notes,
    }


# --------------------------------------------------------------------------
# Pixels to patient millimetres
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# LUNA16 CSV
# --------------------------------------------------------------------------

def read_luna_csv(path, *, status: str = "target") -> pd.DataFrame:
    """Read a LUNA16 ``annotations.csv`` (or ``annotations_excluded.csv``).

    Parameters
    ----------
    path : str or Path
        CSV with columns ``seriesuid, coordX, coordY, coordZ, diameter_mm``
        (world millimetres).
    status : {"target", "ignore"}
        ``"ignore"`` for ``annotations_excluded.csv``; a diameter of ``-1``
        there means unknown (LUNA16's script then uses 10 mm).

    Returns
    -------
    truth : DataFrame
        The truth table (columns :data:`TRUTH_COLUMNS`); ``patient`` is the
        series UID, coordinates in (z, y, x) mm.
    """
    if status not in ("target", "ignore"):
        raise ValueError(f"status must be 'target' or 'ignore', got {status!r}")
    table = pd.read_csv(path)
    needed = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"{str(path)!r} lacks column(s) {missing!r}: a LUNA16 annotations file "
                         f"has {needed!r}")
    diameter = table["diameter_mm"].astype(float)
    truth = pd.DataFrame({
        "patient": table["seriesuid"].astype(str),
        "nodule_id": [f"luna-{i}" for i in range(len(table))],
        "z_mm": table["coordZ"].astype(float),
        "y_mm": table["coordY"].astype(float),
        "x_mm": table["coordX"].astype(float),
        "diameter_mm": diameter.where(diameter >= 0, np.nan),
        "n_readers": np.nan,
        "readers": "",
        "n_marks": np.nan,
        "kind": "nodule",
        "status": status,
    })
    return truth[TRUTH_COLUMNS]


# --------------------------------------------------------------------------
# Reader consensus
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------

def _check_detections(detections):
    if not isinstance(detections, pd.DataFrame):
        raise TypeError(f"detections must be a pandas DataFrame with columns {DETECTION_COLUMNS!r}, "
                        f"got {type(detections).__name__}")
    missing = [c for c in DETECTION_COLUMNS if c not in detections.columns]
    if missing:
        raise ValueError(f"detections lack column(s) {missing!r}: need {DETECTION_COLUMNS!r} "
                         f"(centre in patient mm, probability)")


def _check_truth(truth):
    if not isinstance(truth, pd.DataFrame):
        raise TypeError(f"truth must be a truth-table DataFrame (see read_luna_csv / "
                        f"consensus_nodules), got {type(truth).__name__}")
    needed = ["patient", "z_mm", "y_mm", "x_mm", "diameter_mm", "status"]
    missing = [c for c in needed if c not in truth.columns]
    if missing:
        raise ValueError(f"truth lacks column(s) {missing!r}: build it with read_luna_csv or "
                         f"consensus_nodules")


def match_detections(detections: pd.DataFrame, truth: pd.DataFrame):
    """Label detections hit / false positive / ignored and nodules hit / missed.

    LUNA16 rules: a detection is within a nodule when its centre is strictly
    closer than the nodule's radius (diameter NaN: :data:`UNKNOWN_DIAMETER_MM`).
    Within a target it is a hit (a detection may hit two overlapping
    targets); within only ignored nodules it is dropped; else a false
    positive. A target keeps its best-probability hit. ``"outside"`` rows
    are skipped.

    Returns
    -------
    detections : DataFrame
        Input rows plus ``outcome`` ("tp", "fp", "ignored"), ``nodule_id``
        (the hit target, else the ignored nodule) and ``distance_mm``.
    nodules : DataFrame
        Truth rows plus ``hit``, ``prob`` (best hit), ``distance_mm`` (of the
        best hit; for a miss the nearest detection of that patient),
        ``n_hits``, ``nearest_detection_mm``.
    """
    _check_detections(detections)
    _check_truth(truth)
    det = detections.reset_index(drop=True).copy()
    nod = truth.reset_index(drop=True).copy()
    if "nodule_id" not in nod.columns:
        nod["nodule_id"] = [f"nodule-{i}" for i in range(len(nod))]
    det["patient"] = det["patient"].astype(str)
    nod["patient"] = nod["patient"].astype(str)
    det["outcome"] = "fp"
    det["nodule_id"] = None
    det["distance_mm"] = np.nan
    nod["hit"] = False
    nod["prob"] = np.nan
    nod["distance_mm"] = np.nan
    nod["n_hits"] = 0
    nod["nearest_detection_mm"] = np.nan

    det_xyz = det[["z_mm", "y_mm", "x_mm"]].to_numpy(float)
    for i, n in nod.iterrows():
        if n["status"] == "outside":
            continue
        in_patient = np.flatnonzero(det["patient"].to_numpy() == n["patient"])
        if in_patient.size == 0:
            continue
        centre = np.array([n["z_mm"], n["y_mm"], n["x_mm"]], float)
        dist = np.linalg.norm(det_xyz[in_patient] - centre, axis=1)
        nod.loc[i, "nearest_detection_mm"] = float(dist.min())
        diameter = n["diameter_mm"] if np.isfinite(n["diameter_mm"]) else UNKNOWN_DIAMETER_MM
        inside = dist < diameter / 2.0
        if n["status"] == "target":
            hits = in_patient[inside]
            if hits.size:
                best = hits[np.argmax(det.loc[hits, "prob"].to_numpy(float))]
                nod.loc[i, ["hit", "prob", "n_hits"]] = [True, float(det.loc[best, "prob"]), int(hits.size)]
                nod.loc[i, "distance_mm"] = float(dist[in_patient == best][0])
                for h, d in zip(hits, dist[inside]):
                    if det.loc[h, "outcome"] != "tp":
                        det.loc[h, ["outcome", "nodule_id", "distance_mm"]] = ["tp", n["nodule_id"], d]
            else:
                nod.loc[i, "distance_mm"] = float(dist.min())
        elif n["status"] == "ignore":
            for h, d in zip(in_patient[inside], dist[inside]):
                if det.loc[h, "outcome"] == "fp":
                    det.loc[h, ["outcome", "nodule_id", "distance_mm"]] = ["ignored", n["nodule_id"], d]
    return det, nod


# --------------------------------------------------------------------------
# FROC and CPM
# --------------------------------------------------------------------------

def froc_curve(target_probs, fp_probs, *, n_targets: int, n_scans: int) -> pd.DataFrame:
    """FROC operating points, as LUNA16's ``computeFROC`` computes them.

    Parameters
    ----------
    target_probs : array_like
        Best probability of each *hit* target.
    fp_probs : array_like
        Probability of each false-positive detection.
    n_targets : int
        All targets, hit or missed (missed ones cap the sensitivity).
    n_scans : int
        Scans the false positives are averaged over.

    Returns
    -------
    DataFrame
        Columns ``threshold``, ``fps_per_scan``, ``sensitivity``: one row
        per distinct probability (descending), after a first row at
        threshold ``inf`` (nothing detected). Counting a detection when its
        probability is >= threshold.
    """
    if n_scans < 1:
        raise ValueError(f"n_scans must be at least 1, got {n_scans!r}")
    tp = np.asarray(target_probs, float).ravel()
    fp = np.asarray(fp_probs, float).ravel()
    if tp.size > n_targets:
        raise ValueError(f"{tp.size} hit targets but n_targets={n_targets!r}: n_targets counts "
                         f"every target, hit or missed")
    scores = np.concatenate([tp, fp])
    labels = np.concatenate([np.ones(tp.size), np.zeros(fp.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1] if scores.size else np.array([], int)
    tps = np.cumsum(labels)[last_of_value]
    fps = np.cumsum(1 - labels)[last_of_value]
    sensitivity = tps / n_targets if n_targets else np.full(tps.shape, np.nan)
    return pd.DataFrame({
        "threshold": np.r_[np.inf, scores[last_of_value]],
        "fps_per_scan": np.r_[0.0, fps / n_scans],
        "sensitivity": np.r_[0.0 if n_targets else np.nan, sensitivity],
    })


def _froc_grid():
    return np.linspace(_FROC_GRID_MIN, _FROC_GRID_MAX, num=_FROC_GRID_N)


def _cpm_indices():
    # LUNA16 reads the sensitivity at these indices of its 10001-point grid:
    # int((rate - 1/8) * 10000 / (8 - 1/8)), the grid point at or just below
    # each rate.
    rates = np.asarray(CPM_FP_RATES)
    return (((rates - _FROC_GRID_MIN) * (_FROC_GRID_N - 1)) / (_FROC_GRID_MAX - _FROC_GRID_MIN)).astype(int)


def cpm_score(froc: pd.DataFrame) -> tuple[float, dict]:
    """Competition performance metric of a FROC curve, as LUNA16 computes it.

    The curve is linearly interpolated (``np.interp``; beyond its last point
    the last sensitivity holds) on 10001 points evenly spaced from 1/8 to 8
    false positives per scan, and the sensitivity is read at the grid point
    at or just below each of 1/8, 1/4, 1/2, 1, 2, 4, 8 FP/scan. CPM is their
    mean.

    Returns
    -------
    cpm : float
    sensitivities : dict
        Rate -> sensitivity.
    """
    sens_grid = np.interp(_froc_grid(), froc["fps_per_scan"].to_numpy(float),
                          froc["sensitivity"].to_numpy(float))
    values = sens_grid[_cpm_indices()]
    return float(np.mean(values)), {float(r): float(v) for r, v in zip(CPM_FP_RATES, values)}


def _scan_entries(nodules, detections):
    """Per scan: (target probs of hits, n targets, fp probs)."""
    entries = {}
    targets = nodules[nodules["status"] == "target"]
    for patient, group in targets.groupby("patient", sort=False):
        entry = entries.setdefault(patient, [[], 0, []])
        entry[0].extend(group.loc[group["hit"], "prob"].astype(float).tolist())
        entry[1] += len(group)
    for patient, group in detections[detections["outcome"] == "fp"].groupby("patient", sort=False):
        entries.setdefault(patient, [[], 0, []])[2].extend(group["prob"].astype(float).tolist())
    return entries


def bootstrap_froc(nodules: pd.DataFrame, detections: pd.DataFrame, *, scans, n_bootstrap: int = 1000,
                   seed: int = 0, confidence: float = 0.95) -> dict:
    """Bootstrap over scans (LUNA16 ``computeFROC_bootstrap``), seeded.

    Scans are drawn with replacement (a scan drawn twice counts twice); each
    sample's FROC curve is interpolated on LUNA16's grid. The bounds are
    LUNA16's: the sorted samples at ``floor(P * n)`` and ``floor((1 - P) * n)``
    with ``P = (1 - confidence) / 2``. Samples without any target have no
    sensitivity and are left out (counted in ``n_without_targets``).

    Returns
    -------
    dict
        ``fps_per_scan`` (grid), ``sensitivity_mean/lower/upper`` (curves),
        ``cpm_mean/lower/upper``, ``n_bootstrap``, ``n_without_targets``.
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie between 0 and 1, got {confidence!r}")
    scans = list(scans)
    entries = _scan_entries(nodules, detections)
    rng = np.random.default_rng(seed)
    grid = _froc_grid()
    curves, cpms = [], []
    empty = 0
    for _ in range(n_bootstrap):
        drawn = rng.integers(len(scans), size=len(scans))
        tp, fp, n_targets = [], [], 0
        for k in drawn:
            entry = entries.get(scans[k])
            if entry is not None:
                tp.extend(entry[0])
                n_targets += entry[1]
                fp.extend(entry[2])
        if n_targets == 0:
            empty += 1
            continue
        froc = froc_curve(tp, fp, n_targets=n_targets, n_scans=len(scans))
        curves.append(np.interp(grid, froc["fps_per_scan"].to_numpy(), froc["sensitivity"].to_numpy()))
        cpms.append(float(np.mean(curves[-1][_cpm_indices()])))
    result = {"n_bootstrap": int(n_bootstrap), "seed": int(seed), "confidence": float(confidence),
              "n_without_targets": int(empty), "fps_per_scan": grid}
    if not curves:
        nan_curve = np.full(grid.shape, np.nan)
        result.update(sensitivity_mean=nan_curve, sensitivity_lower=nan_curve,
                      sensitivity_upper=nan_curve, cpm_mean=math.nan, cpm_lower=math.nan,
                      cpm_upper=math.nan)
        return result
    curves = np.sort(np.asarray(curves), axis=0)
    cpms = np.sort(np.asarray(cpms))
    p = (1.0 - confidence) / 2.0
    lo, hi = math.floor(p * len(cpms)), min(math.floor((1.0 - p) * len(cpms)), len(cpms) - 1)
    result.update(sensitivity_mean=curves.mean(axis=0), sensitivity_lower=curves[lo],
                  sensitivity_upper=curves[hi], cpm_mean=float(cpms.mean()),
                  cpm_lower=float(cpms[lo]), cpm_upper=float(cpms[hi]))
    return result


# --------------------------------------------------------------------------
# Whole evaluation
# --------------------------------------------------------------------------

@dataclass
class EvaluationResult:
    """Everything an evaluation found; :func:`write_evaluation` saves it."""

    summary: dict
    froc: pd.DataFrame
    nodules: pd.DataFrame
    detections: pd.DataFrame
    bootstrap: dict | None = None

    def to_dict(self) -> dict:
        """JSON-able summary, FROC points and bootstrap CPM (not the curves)."""
        out = dict(self.summary)
        out["froc"] = [{k: (None if not np.isfinite(v) else float(v)) for k, v in row.items()}
                       for row in self.froc.to_dict("records")]
        if self.bootstrap is not None:
            out["bootstrap"] = {k: v for k, v in self.bootstrap.items()
                                if not isinstance(v, np.ndarray)}
        return out


def evaluate_detections(detections: pd.DataFrame, truth: pd.DataFrame, *, n_scans: int | None = None,
                        scans=None, n_bootstrap: int = 1000, seed: int = 0,
                        confidence: float = 0.95, max_marks_per_scan: int | None = None) -> EvaluationResult:
    """Score detections against a truth table (LUNA16 rules).

    Parameters
    ----------
    detections : DataFrame
        Columns ``patient, z_mm, y_mm, x_mm, prob`` (others are kept).
    truth : DataFrame
        From :func:`consensus_nodules` or :func:`read_luna_csv`.
    n_scans : int, optional
        Scans evaluated (false positives are averaged over them); at least the
        number of patients named in ``detections`` and ``truth``. Default: that
        number, or ``len(scans)``.
    scans : sequence of str, optional
        The evaluated scans by name; scans beyond those named are taken as
        scans without detections or nodules (they matter to the bootstrap).
    n_bootstrap : int
        Bootstrap samples for the confidence interval (0: none).
    seed : int
        Seed of the bootstrap.
    confidence : float
    max_marks_per_scan : int, optional
        Keep only the most probable detections of each scan (LUNA16 used 100).

    Returns
    -------
    EvaluationResult
    """
    _check_detections(detections)
    _check_truth(truth)
    detections = detections.copy()
    detections["patient"] = detections["patient"].astype(str)
    truth = truth.copy()
    truth["patient"] = truth["patient"].astype(str)
    if max_marks_per_scan is not None:
        if max_marks_per_scan < 1:
            raise ValueError(f"max_marks_per_scan must be at least 1, got {max_marks_per_scan!r}")
        detections = (detections.sort_values("prob", ascending=False, kind="stable")
                      .groupby("patient", sort=False).head(max_marks_per_scan).sort_index())
    named = list(dict.fromkeys(list(scans or []) + detections["patient"].tolist()
                               + truth.loc[truth["status"] != "outside", "patient"].tolist()))
    if scans is not None:
        extra = sorted(set(named) - set(map(str, scans)))
        if extra:
            raise ValueError(f"patients {extra[:5]!r} appear in detections or truth but not in "
                             f"scans: add them to scans or drop their rows")
    if n_scans is None:
        n_scans = len(named)
    if n_scans < max(1, len(named)):
        raise ValueError(f"n_scans={n_scans!r} but {len(named)} patients appear in the detections "
                         f"and truth: give the number of scans evaluated")
    all_scans = named + [f"<scan without marks {i}>" for i in range(n_scans - len(named))]

    det, nod = match_detections(detections, truth)
    targets = nod[nod["status"] == "target"]
    n_targets = int(len(targets))
    hit_probs = targets.loc[targets["hit"], "prob"].to_numpy(float)
    fp_probs = det.loc[det["outcome"] == "fp", "prob"].to_numpy(float)
    froc = froc_curve(hit_probs, fp_probs, n_targets=n_targets, n_scans=n_scans)
    if n_targets:
        cpm, at_rates = cpm_score(froc)
    else:
        cpm, at_rates = math.nan, {float(r): math.nan for r in CPM_FP_RATES}
    boot = None
    if n_bootstrap:
        boot = bootstrap_froc(nod, det, scans=all_scans, n_bootstrap=n_bootstrap, seed=seed,
                              confidence=confidence)
    summary = {
        "n_scans": int(n_scans),
        "n_targets": n_targets,
        "n_ignored_nodules": int((nod["status"] == "ignore").sum()),
        "n_outside_nodules": int((nod["status"] == "outside").sum()),
        "n_detections": int(len(det)),
        "n_true_positive_detections": int((det["outcome"] == "tp").sum()),
        "n_false_positives": int(len(fp_probs)),
        "n_ignored_detections": int((det["outcome"] == "ignored").sum()),
        "n_hit_targets": int(targets["hit"].sum()),
        "sensitivity": (float(targets["hit"].mean()) if n_targets else math.nan),
        "fps_per_scan": float(len(fp_probs) / n_scans),
        "cpm": cpm,
        "cpm_sensitivities": {str(k): v for k, v in at_rates.items()},
        "cpm_ci": (None if boot is None else [boot["cpm_lower"], boot["cpm_upper"]]),
        "settings": {"n_bootstrap": int(n_bootstrap), "seed": int(seed),
                     "confidence": float(confidence), "max_marks_per_scan": max_marks_per_scan,
                     "rule": "LUNA16: hit when the detection centre is closer than the nodule radius"},
    }
    return EvaluationResult(summary, froc, nod, det, boot)


def evaluate_lidc_patient(detections: pd.DataFrame, xml_path, geometry: SliceGeometry, *,
                          patient: str | None = None, min_readers: int = 3,
                          min_diameter_mm: float = 3.0, link_distance_mm: float | None = None,
                          outline: str = "exclude", n_bootstrap: int = 1000,
                          seed: int = 0) -> EvaluationResult:
    """Evaluate one patient's detections against its LIDC-IDRI XML.

    Parameters
    ----------
    detections : DataFrame
        The patient's detections (``patient, z_mm, y_mm, x_mm, prob``).
    xml_path : str or Path
        The patient's LIDC reader XML.
    geometry : SliceGeometry
        The scanned slices (see :meth:`SliceGeometry.from_axes`); nodules
        outside its z range are ``"outside"`` and not scored.
    patient : str, optional
        Patient name; default: the single patient in ``detections`` (or the
        XML's series UID when there are no detections).

    Returns
    -------
    EvaluationResult
        Its ``summary["lidc"]`` holds what the parser met in the XML.
    """
    marks = read_lidc_xml(xml_path)
    if patient is None:
        names = detections["patient"].astype(str).unique() if "patient" in detections else []
        if len(names) > 1:
            raise ValueError(f"detections hold several patients {list(names)[:5]!r}: pass patient= "
                             f"and only that patient's rows")
        patient = str(names[0]) if len(names) else (marks.series_uid or Path(xml_path).stem)
    detections = detections[detections["patient"].astype(str) == str(patient)]
    truth = consensus_nodules(marks, geometry, patient=str(patient), min_readers=min_readers,
                              min_diameter_mm=min_diameter_mm, link_distance_mm=link_distance_mm,
                              outline=outline)
    result = evaluate_detections(detections, truth, n_scans=1, scans=[str(patient)],
                                 n_bootstrap=n_bootstrap, seed=seed)
    result.summary["lidc"] = summarize_lidc_marks(marks)
    result.summary["settings"].update(min_readers=min_readers, min_diameter_mm=min_diameter_mm,
                                      link_distance_mm=link_distance_mm, outline=outline)
    return result


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_evaluation(result: EvaluationResult, out_dir, *, title: str = "lungzarr") -> dict:
    """Write ``results.json``, ``nodules.csv``, ``detections.csv``, ``froc.csv``, ``froc.png``.

    ``nodules.csv`` has one row per truth nodule: status, centre, diameter,
    readers, ``hit``, best ``prob``, ``distance_mm`` (of that hit, or of the
    nearest detection for a miss). ``detections.csv`` labels each detection
    ``tp``/``fp``/``ignored``. The plot is the FROC curve on a log2 axis from
    1/8 to 8 FP/scan with the bootstrap band.

    Parameters
    ----------
    result : EvaluationResult
    out_dir : str or Path
        Created if needed; existing files of the same names are replaced.
    title : str
        Name on the plot.

    Returns
    -------
    dict
        Name -> path of each file written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "nodules": out_dir / "nodules.csv",
             "detections": out_dir / "detections.csv", "froc": out_dir / "froc.csv",
             "froc_png": out_dir / "froc.png"}
    with open(paths["json"], "w") as fh:
        json.dump(_nan_to_none(result.to_dict()), fh, indent=2, default=_json_default)
        fh.write("\n")
    result.nodules.to_csv(paths["nodules"], index=False)
    result.detections.to_csv(paths["detections"], index=False)
    result.froc.to_csv(paths["froc"], index=False)
    _plot_froc(result, paths["froc_png"], title=title)
    return {k: str(v) for k, v in paths.items()}


def _plot_froc(result, path, *, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedFormatter, FixedLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    try:
        grid = _froc_grid()
        froc = result.froc
        if result.summary["n_targets"]:
            sens = np.interp(grid, froc["fps_per_scan"].to_numpy(float),
                             froc["sensitivity"].to_numpy(float))
            ax.plot(grid, sens, color="C0", lw=2,
                    label=f"{title} (CPM {result.summary['cpm']:.3f})")
            rates = np.asarray(CPM_FP_RATES)
            ax.plot(rates, [result.summary["cpm_sensitivities"][str(float(r))] for r in rates],
                    "o", color="C0", ms=5)
            boot = result.bootstrap
            if boot is not None and np.isfinite(boot["cpm_mean"]):
                ax.plot(boot["fps_per_scan"], boot["sensitivity_mean"], color="C0", ls="--", lw=1,
                        label=f"bootstrap mean, {boot['confidence']:.0%} CI "
                              f"[{boot['cpm_lower']:.3f}, {boot['cpm_upper']:.3f}]")
                ax.fill_between(boot["fps_per_scan"], boot["sensitivity_lower"],
                                boot["sensitivity_upper"], color="C0", alpha=0.15)
        else:
            ax.text(0.5, 0.5, "no target nodules", transform=ax.transAxes, ha="center")
        ax.set_xscale("log", base=2)
        ax.set_xlim(_FROC_GRID_MIN, _FROC_GRID_MAX)
        ax.xaxis.set_major_locator(FixedLocator(list(CPM_FP_RATES)))
        ax.xaxis.set_major_formatter(FixedFormatter(["1/8", "1/4", "1/2", "1", "2", "4", "8"]))
        ax.xaxis.set_minor_locator(FixedLocator([]))
        ax.set_ylim(0, 1.02)
        ax.set_yticks(np.arange(0, 1.01, 0.1))
        ax.grid(True, which="both", alpha=0.4)
        ax.set_xlabel("Average number of false positives per scan")
        ax.set_ylabel("Sensitivity")
        s = result.summary
        ax.set_title(f"FROC: {s['n_hit_targets']}/{s['n_targets']} nodules hit, "
                     f"{s['n_scans']} scan(s), {s['n_false_positives']} FP")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
