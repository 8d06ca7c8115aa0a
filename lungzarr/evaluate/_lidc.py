"""LIDC-IDRI XML (part of :mod:`lungzarr.evaluate`)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungzarr.evaluate._constants import _NS, LIDC_NAMESPACE


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


