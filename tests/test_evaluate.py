"""Tests of lungzarr.evaluate: LIDC XML, mm conversion, consensus, matching, FROC/CPM."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungzarr.evaluate import (
    CPM_FP_RATES,
    ReaderMark,
    Roi,
    SliceGeometry,
    consensus_nodules,
    cpm_score,
    evaluate_detections,
    evaluate_lidc_patient,
    froc_curve,
    match_detections,
    measure_mark,
    read_lidc_xml,
    read_luna_csv,
    summarize_lidc_marks,
    write_evaluation,
)

NS = "http://www.nih.gov"


# ---------------------------------------------------------------- helpers

def lidc_geometry(lidc_dir):
    """The slab's geometry computed from its DICOM headers (pydicom: tests only)."""
    import pydicom

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(lidc_dir.glob("*.dcm"))]
    first = headers[0]
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    return SliceGeometry(
        x0=float(first.ImagePositionPatient[0]), y0=float(first.ImagePositionPatient[1]),
        dx=col_spacing, dy=row_spacing,
        z_by_sop={h.SOPInstanceUID: float(h.ImagePositionPatient[2]) for h in headers})


def square_outline(col_lo, col_hi, row_lo, row_hi):
    """Ordered outline pixels around a rectangle (clockwise), as LIDC lists them."""
    cols, rows = [], []
    for c in range(col_lo, col_hi):
        cols.append(c), rows.append(row_lo)
    for r in range(row_lo, row_hi):
        cols.append(col_hi), rows.append(r)
    for c in range(col_hi, col_lo, -1):
        cols.append(c), rows.append(row_hi)
    for r in range(row_hi, row_lo, -1):
        cols.append(col_lo), rows.append(r)
    return np.array(cols), np.array(rows)


def square_mark(reader, *, col, row, half, slices, mark_id="n", kind="nodule"):
    rois = []
    for sop in slices:
        cols, rows = square_outline(col - half, col + half, row - half, row + half)
        rois.append(Roi(None, sop, True, cols, rows))
    return ReaderMark(reader, 0, mark_id, kind, tuple(rois), {})


def point_mark(reader, *, col, row, sop, kind="small_nodule", mark_id="p"):
    return ReaderMark(reader, 0, mark_id, kind,
                      (Roi(None, sop, True, np.array([col]), np.array([row])),), {})


def toy_geometry(n_slices=10):
    # 0.5 mm pixels, 1 mm slices at z = 0, -1, -2, ...; x = -100 + 0.5 col, y = 50 + 0.5 row
    return SliceGeometry(-100.0, 50.0, 0.5, 0.5, {f"s{k}": -float(k) for k in range(n_slices)})


# ---------------------------------------------------------------- LIDC XML parser

def test_read_lidc_xml_real_file(lidc_xml):
    marks = read_lidc_xml(lidc_xml)
    summary = summarize_lidc_marks(marks)
    assert marks.series_uid == "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    assert summary["readers"] == sorted(["540461523", "1428348137", "-750896469", "2103845659"])
    assert [s["reader"] for s in marks.sessions] == ["540461523", "1428348137", "-750896469", "2103845659"]
    assert summary["marks_by_kind"] == {"nodule": 4, "small_nodule": 9, "non_nodule": 13}
    outlined = [m for m in marks if m.kind == "nodule"]
    assert [m.mark_id for m in outlined] == ["Nodule 001", "IL057_127364", "MI014_12127", "0"]
    assert [len(m.rois) for m in outlined] == [8, 7, 8, 9]
    assert summary["outlines"] == 32
    # 3406 edgeMap points in the file; 9 of them are the small nodules' single points.
    assert sum(r.n_points for m in marks if m.kind != "non_nodule" for r in m.rois) == 3406
    assert sum(r.n_points for m in outlined for r in m.rois) == 3397
    assert all(r.inclusion for m in outlined for r in m.rois)
    assert outlined[0].characteristics["malignancy"] == 5
    assert outlined[0].rois[0].z_mm == -125.0
    assert outlined[0].rois[0].sop_uid.endswith("110383487652933113465768208719")
    first = outlined[0].rois[0]
    assert (first.cols[0], first.rows[0]) == (312, 355)  # xCoord is the column, yCoord the row
    assert summary["notes"] == []


def _write_xml(path, body):
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage xmlns="{NS}">'
                    f"<ResponseHeader><SeriesInstanceUid>1.2.3</SeriesInstanceUid></ResponseHeader>"
                    f"{body}</LidcReadMessage>")
    return path


def _edge(points):
    return "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points)


def test_read_lidc_xml_odd_file_is_recorded(tmp_path):
    square = [(10, 10), (14, 10), (14, 14), (10, 14)]
    body = (
        "<readingSession><servicingRadiologistID>r1</servicingRadiologistID>"
        "<unblindedReadNodule><noduleID>a</noduleID>"
        f"<roi><imageZposition>-1</imageZposition><imageSOP_UID>s1</imageSOP_UID>"
        f"<inclusion>TRUE</inclusion>{_edge(square)}</roi>"
        f"<roi><imageZposition>-2</imageZposition>{_edge(square)}</roi>"  # no SOP, no inclusion
        "<roi><imageZposition>-3</imageZposition><imageSOP_UID>s3</imageSOP_UID></roi>"  # no points
        "</unblindedReadNodule></readingSession>"
        "<readingSession><unblindedReadNodule><noduleID>b</noduleID>"  # no reader id
        f"<roi><imageSOP_UID>s1</imageSOP_UID><inclusion>TRUE</inclusion>{_edge([(5, 6)])}</roi>"
        "</unblindedReadNodule></readingSession>"
        "<readingSession><servicingRadiologistID>r1</servicingRadiologistID>"  # r1 again
        "<nonNodule><nonNoduleID>nn</nonNoduleID><imageZposition>-4</imageZposition>"
        "<imageSOP_UID>s4</imageSOP_UID><locus><xCoord>7</xCoord><yCoord>8</yCoord></locus></nonNodule>"
        "</readingSession>"
        "<readingSession><servicingRadiologistID>r3</servicingRadiologistID></readingSession>"
    )
    marks = read_lidc_xml(_write_xml(tmp_path / "odd.xml", body))
    assert [(m.reader, m.session, m.mark_id, m.kind) for m in marks] == [
        ("r1", 0, "a", "nodule"), ("session-1", 1, "b", "small_nodule"), ("r1", 2, "nn", "non_nodule")]
    a = marks[0]
    assert len(a.rois) == 2  # the roi without points is dropped
    assert a.rois[1].sop_uid is None and a.rois[1].inclusion is True
    assert any("no imageSOP_UID" in n for n in a.notes)
    assert any("no inclusion flag" in n for n in a.notes)
    assert any("no edgeMap points" in n for n in a.notes)
    assert any("without characteristics" in n for n in a.notes)
    assert any("several sessions" in n and "'r1'" in n for n in marks.notes)
    assert any("no servicingRadiologistID" in n for n in marks.notes)
    assert any("session 3" in n and "no marks" in n for n in marks.notes)
    assert (marks[2].rois[0].cols[0], marks[2].rois[0].rows[0]) == (7, 8)
    summary = summarize_lidc_marks(marks)
    assert summary["readers"] == ["r1", "r3", "session-1"]


def test_read_lidc_xml_rejects_other_xml(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text("<root/>")
    with pytest.raises(ValueError, match="LidcReadMessage"):
        read_lidc_xml(path)


# ---------------------------------------------------------------- mm conversion and measures

def test_slice_geometry_mm_conversion_and_from_axes():
    geo = SliceGeometry(-166.0, -171.7, 0.703125, 0.7, {"a": -100.0, "b": -102.5})
    y, x = geo.col_row_to_mm([0, 312], [0, 355])
    np.testing.assert_allclose(x, [-166.0, -166.0 + 312 * 0.703125])
    np.testing.assert_allclose(y, [-171.7, -171.7 + 355 * 0.7])
    assert geo.thickness() == 2.5
    assert geo.z_range == (-102.5, -100.0)
    same = SliceGeometry.from_axes(-166.0 + 0.703125 * np.arange(512), -171.7 + 0.7 * np.arange(512),
                                   [-100.0, -102.5], ["a", "b"])
    assert (same.x0, same.y0, same.z_by_sop) == (geo.x0, geo.y0, geo.z_by_sop)
    assert same.dx == pytest.approx(geo.dx, abs=1e-12) and same.dy == pytest.approx(geo.dy, abs=1e-12)
    with pytest.raises(ValueError, match="evenly spaced"):
        SliceGeometry.from_axes([0.0, 1.0, 3.0], [0.0, 1.0], [0.0], ["a"])
    with pytest.raises(ValueError, match="sop_uids"):
        SliceGeometry.from_axes(np.arange(3.0), np.arange(3.0), [0.0, 1.0], ["a"])
    with pytest.raises(ValueError, match="dx"):
        SliceGeometry(0.0, 0.0, 0.0, 1.0, {})


def test_measure_mark_square_by_hand():
    geo = toy_geometry()
    # Outline on columns/rows 10..20: interior 11..19 = 9 x 9 pixels on 3 slices (z 0, -1, -2).
    mark = square_mark("r", col=15, row=15, half=5, slices=["s0", "s1", "s2"])
    m = measure_mark(mark, geo)
    assert m.n_voxels == 81 * 3
    assert m.z_mm == pytest.approx(-1.0)
    assert m.x_mm == pytest.approx(-100.0 + 15 * 0.5)
    assert m.y_mm == pytest.approx(50.0 + 15 * 0.5)
    volume = 81 * 3 * 0.5 * 0.5 * 1.0
    assert m.volume_mm3 == pytest.approx(volume)
    assert m.diameter_mm == pytest.approx((6 * volume / math.pi) ** (1 / 3))
    with_outline = measure_mark(mark, geo, outline="include")
    assert with_outline.n_voxels == 121 * 3


def test_measure_mark_hole_by_hand():
    geo = toy_geometry()
    outer_c, outer_r = square_outline(10, 30, 10, 30)     # interior 11..29: 19 x 19
    hole_c, hole_r = square_outline(15, 19, 21, 25)       # hole interior cols 16..18, rows 22..24
    mark = ReaderMark("r", 0, "h", "nodule", (Roi(None, "s0", True, outer_c, outer_r),
                                              Roi(None, "s0", False, hole_c, hole_r)), {})
    m = measure_mark(mark, geo)
    n = 19 * 19 - 3 * 3
    assert m.n_voxels == n
    col = (19 * 19 * 20 - 9 * 17) / n
    row = (19 * 19 * 20 - 9 * 23) / n
    assert m.x_mm == pytest.approx(-100.0 + 0.5 * col)
    assert m.y_mm == pytest.approx(50.0 + 0.5 * row)


def test_measure_mark_point_and_unknown_slice():
    geo = toy_geometry()
    m = measure_mark(point_mark("r", col=4, row=6, sop="s3"), geo)
    assert (m.z_mm, m.y_mm, m.x_mm) == (-3.0, 53.0, -98.0)
    assert math.isnan(m.diameter_mm)
    roi = Roi(-42.5, "not-in-slab", True, np.array([4]), np.array([6]))
    m = measure_mark(ReaderMark("r", 0, "x", "small_nodule", (roi,), {}), geo)
    assert m.z_mm == -42.5 and "not in the geometry" in m.notes[0]


def test_real_mark_centroid_matches_independent_fill(lidc_xml, lidc_dir):
    from matplotlib.path import Path as MplPath

    geo = lidc_geometry(lidc_dir)
    marks = read_lidc_xml(lidc_xml)
    for mark in [m for m in marks if m.kind == "nodule"]:
        m = measure_mark(mark, geo)
        # Independent: matplotlib point-in-polygon on the pixel centres of the
        # outline's bounding box, minus the outline pixels (LIDC outlines lie
        # just outside the nodule).
        sums = np.zeros(3)
        count = 0
        for roi in mark.rois:
            rr, cc = np.mgrid[roi.rows.min():roi.rows.max() + 1, roi.cols.min():roi.cols.max() + 1]
            rr, cc = rr.ravel(), cc.ravel()
            inside = MplPath(np.column_stack([roi.cols, roi.rows])).contains_points(np.column_stack([cc, rr]))
            on_outline = np.isin(rr * 512 + cc, roi.rows * 512 + roi.cols)
            keep = inside & ~on_outline
            r, c = rr[keep], cc[keep]
            z = geo.z_by_sop[roi.sop_uid]
            sums += [z * r.size, (geo.y0 + geo.dy * r).sum(), (geo.x0 + geo.dx * c).sum()]
            count += r.size
        expected = sums / count
        assert np.abs(np.array([m.z_mm, m.y_mm, m.x_mm]) - expected).max() < 1.0
        # Cruder still: per slice the polygon's area centroid (shoelace), weighted by area.
        acc = np.zeros(4)
        for roi in mark.rois:
            x, y = geo.x0 + geo.dx * roi.cols, geo.y0 + geo.dy * roi.rows
            cross = x * np.roll(y, -1) - np.roll(x, -1) * y
            area = cross.sum() / 2
            cx = ((x + np.roll(x, -1)) * cross).sum() / (6 * area)
            cy = ((y + np.roll(y, -1)) * cross).sum() / (6 * area)
            acc += abs(area) * np.array([geo.z_by_sop[roi.sop_uid], cy, cx, 1.0])
        assert np.abs(np.array([m.z_mm, m.y_mm, m.x_mm]) - acc[:3] / acc[3]).max() < 1.0


# ---------------------------------------------------------------- consensus

def test_consensus_real_fixture(lidc_xml, lidc_dir):
    geo = lidc_geometry(lidc_dir)
    marks = read_lidc_xml(lidc_xml)
    truth = consensus_nodules(marks, geo, patient="LIDC-IDRI-0001")
    targets = truth[truth["status"] == "target"]
    assert len(targets) == 1
    nodule = targets.iloc[0]
    assert nodule["n_readers"] == 4 and nodule["n_marks"] == 4
    # SOURCES.md: readers' centroid about z = -116, y = 86, x = 56 mm.
    assert abs(nodule["z_mm"] + 116) < 1 and abs(nodule["y_mm"] - 86) < 1 and abs(nodule["x_mm"] - 56) < 1
    assert 15 < nodule["diameter_mm"] < 30
    # Every other mark lies outside the 16-slice slab (z -95 .. -132.5).
    assert set(truth["status"]) == {"target", "outside"}
    everything = consensus_nodules(marks, geo, restrict_to_geometry=False)
    assert (everything["status"] == "ignore").sum() == len(truth) - 1
    small = everything[everything["kind"] == "small_nodule"]
    assert sorted(small["n_readers"]) == [3, 3, 3]  # 3 small nodules, each marked by 3 readers


def test_consensus_rules_by_hand():
    geo = toy_geometry()
    slices = ["s3", "s4", "s5", "s6", "s7"]
    marks = [
        # A: three readers, overlapping, ~ 5 mm: target
        square_mark("r1", col=100, row=100, half=6, slices=slices, mark_id="a1"),
        square_mark("r2", col=102, row=101, half=6, slices=slices, mark_id="a2"),
        square_mark("r3", col=99, row=100, half=5, slices=slices, mark_id="a3"),
        # B: two readers only: ignore
        square_mark("r1", col=300, row=300, half=6, slices=slices, mark_id="b1"),
        square_mark("r2", col=301, row=300, half=6, slices=slices, mark_id="b2"),
        # C: three readers but tiny (3 x 3 pixels on one slice ~ 1.2 mm): ignore
        square_mark("r1", col=200, row=50, half=2, slices=["s5"], mark_id="c1"),
        square_mark("r2", col=200, row=50, half=2, slices=["s5"], mark_id="c2"),
        square_mark("r3", col=200, row=50, half=2, slices=["s5"], mark_id="c3"),
        # D: one reader marks twice near A's place far away -> own group; same reader never links
        square_mark("r4", col=400, row=100, half=6, slices=slices, mark_id="d1"),
        square_mark("r4", col=401, row=100, half=6, slices=slices, mark_id="d2"),
    ]
    truth = consensus_nodules(marks, geo, patient="p")
    by_first = {row["nodule_id"].split("+")[0]: row for _, row in truth.iterrows()}
    assert by_first["r1:a1"]["status"] == "target" and by_first["r1:a1"]["n_readers"] == 3
    a = [measure_mark(m, geo) for m in marks[:3]]
    assert by_first["r1:a1"]["x_mm"] == pytest.approx(np.mean([m.x_mm for m in a]))
    assert by_first["r1:a1"]["diameter_mm"] == pytest.approx(np.mean([m.diameter_mm for m in a]))
    assert by_first["r1:b1"]["status"] == "ignore" and by_first["r1:b1"]["n_readers"] == 2
    assert by_first["r1:c1"]["status"] == "ignore" and by_first["r1:c1"]["diameter_mm"] < 3
    assert by_first["r1:c1"]["n_readers"] == 3
    assert by_first["r4:d1"]["n_readers"] == 1 and by_first["r4:d2"]["n_readers"] == 1
    assert len(truth) == 5
    # Options move nodules across the line.
    relaxed = consensus_nodules(marks, geo, min_readers=2, min_diameter_mm=1.0)
    assert (relaxed["status"] == "target").sum() == 3
    # A fixed link distance larger than A-B gap merges them.
    merged = consensus_nodules(marks[:5], geo, link_distance_mm=200.0)
    assert len(merged) == 1 and merged.iloc[0]["n_readers"] == 3 and merged.iloc[0]["n_marks"] == 5


def test_consensus_links_by_radius_without_overlap():
    geo = toy_geometry()
    # Two readers, same place, but r2's outline lies on other slices: no shared voxel.
    # Centres 2 mm apart in z, radius ~ 3 mm: linked by the larger-radius rule.
    r1 = square_mark("r1", col=100, row=100, half=8, slices=["s0", "s1"])
    r2 = square_mark("r2", col=100, row=100, half=8, slices=["s2", "s3"])
    assert len(consensus_nodules([r1, r2], geo, min_readers=1)) == 1
    far = square_mark("r2", col=100, row=100, half=8, slices=["s8", "s9"])  # 8 mm away
    assert len(consensus_nodules([r1, far], geo, min_readers=1)) == 2


# ---------------------------------------------------------------- matching

def _truth(rows):
    return pd.DataFrame(rows, columns=["patient", "nodule_id", "z_mm", "y_mm", "x_mm", "diameter_mm", "status"])


def _detections(rows):
    return pd.DataFrame(rows, columns=["patient", "z_mm", "y_mm", "x_mm", "prob"])


def test_match_detections_luna16_rules():
    truth = _truth([("p", "T", 0, 0, 0, 10.0, "target"),
                    ("p", "I", 0, 0, 50, 6.0, "ignore"),
                    ("p", "U", 0, 0, -50, np.nan, "ignore"),   # unknown size: 10 mm
                    ("p", "M", 0, 80, 0, 8.0, "target"),       # never hit
                    ("p", "O", 500, 0, 0, 8.0, "outside")])
    det = _detections([("p", 0, 0, 4.0, 0.5),     # tp
                       ("p", 0, 3, 0, 0.8),       # tp, the best
                       ("p", 0, 0, -5.0, 0.9),    # exactly on the radius: not within -> fp
                       ("p", 0, 0, 52, 0.7),      # on the ignored nodule
                       ("p", 0, 0, -46, 0.6),     # within 5 mm of the unknown-size one
                       ("p", 500, 0, 0, 0.4),     # on an "outside" nodule: fp
                       ("q", 0, 0, 0, 0.95)])     # other patient: fp
    d, n = match_detections(det, truth)
    assert d["outcome"].tolist() == ["tp", "tp", "fp", "ignored", "ignored", "fp", "fp"]
    t = n.set_index("nodule_id")
    assert bool(t.loc["T", "hit"]) and t.loc["T", "prob"] == 0.8 and t.loc["T", "n_hits"] == 2
    assert t.loc["T", "distance_mm"] == pytest.approx(3.0)
    assert t.loc["T", "nearest_detection_mm"] == pytest.approx(3.0)
    assert not t.loc["M", "hit"] and t.loc["M", "distance_mm"] == pytest.approx(77.0)  # nearest: (0, 3, 0)
    assert not t.loc["O", "hit"]


def test_detection_hitting_two_overlapping_targets_counts_for_both():
    truth = _truth([("p", "A", 0, 0, 0, 10.0, "target"), ("p", "B", 0, 0, 4, 10.0, "target")])
    d, n = match_detections(_detections([("p", 0, 0, 2, 0.5)]), truth)
    assert n["hit"].tolist() == [True, True] and d["outcome"].tolist() == ["tp"]


# ---------------------------------------------------------------- FROC / CPM

def test_froc_and_cpm_hand_case():
    # Two scans, two targets. Scan A: target hit at 0.9, FPs 0.8 and 0.3.
    # Scan B: target hit at 0.4, FPs 0.6 and 0.2.
    truth = _truth([("A", "t1", 0, 0, 0, 10.0, "target"), ("B", "t2", 0, 0, 0, 10.0, "target")])
    det = _detections([("A", 0, 0, 1, 0.9), ("A", 50, 0, 0, 0.8), ("A", 90, 0, 0, 0.3),
                       ("B", 0, 1, 0, 0.4), ("B", 50, 0, 0, 0.6), ("B", 90, 0, 0, 0.2)])
    result = evaluate_detections(det, truth, n_scans=2, n_bootstrap=0)
    froc = result.froc
    # Thresholds 0.9, 0.8, 0.6, 0.4, 0.3, 0.2: FPs/scan 0, .5, 1, 1, 1.5, 2; sensitivity
    # .5, .5, .5, 1, 1, 1.
    assert froc["threshold"].tolist()[1:] == [0.9, 0.8, 0.6, 0.4, 0.3, 0.2]
    assert froc["fps_per_scan"].tolist() == [0, 0, 0.5, 1, 1, 1.5, 2]
    assert froc["sensitivity"].tolist() == [0, 0.5, 0.5, 0.5, 1, 1, 1]
    # The grid reading takes each rate at the grid point at or just below it: 1/8 .. 1 FP/scan
    # see 0.5 (1 FP/scan is read at 0.99991, before the jump), 2, 4, 8 see 1.0.
    assert result.summary["cpm_grid_sensitivities"] == {str(float(r)): v for r, v in
                                                        zip(CPM_FP_RATES, [.5, .5, .5, .5, 1, 1, 1])}
    assert result.summary["cpm_grid"] == pytest.approx(5 / 7)
    # The paper's reading (the default) takes the curve at exactly 1 FP/scan: the top of the
    # jump there (the best sensitivity with at most 1 FP/scan), 1.0.
    assert result.summary["cpm_exact_sensitivities"] == {str(float(r)): v for r, v in
                                                         zip(CPM_FP_RATES, [.5, .5, .5, 1, 1, 1, 1])}
    assert result.summary["cpm"] == result.summary["cpm_exact"] == pytest.approx(5.5 / 7)
    assert result.summary["cpm_convention"] == "exact"
    assert result.summary["sensitivity"] == 1.0 and result.summary["fps_per_scan"] == 2.0


def test_froc_misses_cap_sensitivity_and_ties():
    froc = froc_curve([0.7], [0.7, 0.1], n_targets=4, n_scans=1)
    # A hit and a FP tied at 0.7 enter together.
    assert froc["fps_per_scan"].tolist() == [0, 1, 2]
    assert froc["sensitivity"].tolist() == [0, 0.25, 0.25]
    cpm, at = cpm_score(froc)
    # The tie makes a diagonal from (0, 0) to (1, 0.25): at 1/8 FP/scan, 0.25 / 8.
    assert at[0.125] == pytest.approx(0.25 / 8)
    assert at[8.0] == 0.25
    # No false positives at all: the curve sits at FP 0 (LUNA16's border case).
    cpm, at = cpm_score(froc_curve([0.9, 0.8], [], n_targets=2, n_scans=3))
    assert cpm == 1.0


def test_bootstrap_is_seeded_and_brackets_cpm():
    rng = np.random.default_rng(1)
    rows, truth_rows = [], []
    for s in range(12):
        truth_rows.append((f"s{s}", f"t{s}", 0, 0, 0, 10.0, "target"))
        if s % 3:
            rows.append((f"s{s}", 0, 0, 1, float(rng.uniform(0.3, 1))))
        for k in range(3):
            rows.append((f"s{s}", 100 + k * 20, 0, 0, float(rng.uniform(0, 1))))
    truth, det = _truth(truth_rows), _detections(rows)
    a = evaluate_detections(det, truth, n_bootstrap=200, seed=7)
    b = evaluate_detections(det, truth, n_bootstrap=200, seed=7)
    c = evaluate_detections(det, truth, n_bootstrap=200, seed=8)
    assert a.summary["cpm_ci"] == b.summary["cpm_ci"]
    assert a.summary["cpm_ci"] != c.summary["cpm_ci"]
    lo, hi = a.summary["cpm_ci"]
    assert lo <= a.summary["cpm"] <= hi and lo < hi
    assert a.summary["n_scans"] == 12


def test_evaluate_detections_checks_inputs():
    truth = _truth([("p", "t", 0, 0, 0, 10.0, "target")])
    with pytest.raises(ValueError, match="prob"):
        evaluate_detections(pd.DataFrame({"patient": ["p"], "z_mm": [0], "y_mm": [0], "x_mm": [0]}), truth)
    with pytest.raises(ValueError, match="n_scans"):
        evaluate_detections(_detections([("q", 0, 0, 0, 0.5)]), truth, n_scans=1)
    with pytest.raises(ValueError, match="scans"):
        evaluate_detections(_detections([("q", 0, 0, 0, 0.5)]), truth, scans=["p"])


def test_max_marks_per_scan_keeps_most_probable():
    truth = _truth([("p", "t", 0, 0, 0, 10.0, "target")])
    det = _detections([("p", 0, 0, 0, 0.2), ("p", 50, 0, 0, 0.9), ("p", 90, 0, 0, 0.8)])
    r = evaluate_detections(det, truth, n_bootstrap=0, max_marks_per_scan=2)
    assert r.summary["n_hit_targets"] == 0 and r.summary["n_false_positives"] == 2


# ---------------------------------------------------------------- LUNA16 CSV

def test_read_luna_csv_and_evaluate(tmp_path):
    (tmp_path / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        "1.2.3,-128.7,-175.3,-298.4,5.65\n"
        "1.2.4,103.8,-211.9,-227.1,4.22\n")
    (tmp_path / "annotations_excluded.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        "1.2.3,10.0,20.0,-100.0,-1\n")
    truth = pd.concat([read_luna_csv(tmp_path / "annotations.csv"),
                       read_luna_csv(tmp_path / "annotations_excluded.csv", status="ignore")])
    first = truth.iloc[0]
    assert (first["patient"], first["z_mm"], first["y_mm"], first["x_mm"], first["diameter_mm"]) == \
        ("1.2.3", -298.4, -175.3, -128.7, 5.65)
    assert math.isnan(truth.iloc[2]["diameter_mm"]) and truth.iloc[2]["status"] == "ignore"
    det = _detections([("1.2.3", -298.0, -175.0, -128.0, 0.9),   # hit (~0.86 mm away)
                       ("1.2.3", -100.0, 20.0, 14.0, 0.8),       # 4 mm from the excluded one: ignored
                       ("1.2.4", -227.1, -211.9, 110.0, 0.7)])   # 6.2 mm from a 4.22 mm nodule: fp
    r = evaluate_detections(det, truth, n_bootstrap=0)
    assert r.detections["outcome"].tolist() == ["tp", "ignored", "fp"]
    assert r.summary["sensitivity"] == 0.5 and r.summary["n_scans"] == 2
    with pytest.raises(ValueError, match="diameter_mm"):
        (tmp_path / "bad.csv").write_text("seriesuid,coordX,coordY,coordZ\n1,2,3,4\n")
        read_luna_csv(tmp_path / "bad.csv")


# ---------------------------------------------------------------- one LIDC patient, end to end

def test_evaluate_lidc_patient_synthetic_detections(lidc_xml, lidc_dir, tmp_path):
    geo = lidc_geometry(lidc_dir)
    truth = consensus_nodules(read_lidc_xml(lidc_xml), geo)
    centre = truth.loc[truth["status"] == "target", ["z_mm", "y_mm", "x_mm"]].iloc[0].to_numpy()
    det = pd.DataFrame({"patient": ["LIDC-IDRI-0001"] * 2,
                        "z_mm": [centre[0], -100.0], "y_mm": [centre[1], -80.0],
                        "x_mm": [centre[2], -60.0], "prob": [0.9, 0.6],
                        "threshold": [0.5, 0.5], "label": [1, 2]})
    result = evaluate_lidc_patient(det, lidc_xml, geo, n_bootstrap=50, seed=3)
    s = result.summary
    assert s["sensitivity"] == 1.0 and s["n_targets"] == 1 and s["n_false_positives"] == 1
    assert s["fps_per_scan"] == 1.0
    assert result.detections["outcome"].tolist() == ["tp", "fp"]
    assert result.nodules.loc[result.nodules["status"] == "target", "distance_mm"].iloc[0] < 1e-9
    assert s["lidc"]["readers"] and s["settings"]["min_readers"] == 3

    paths = write_evaluation(result, tmp_path / "out", title="synthetic")
    loaded = json.loads((tmp_path / "out" / "results.json").read_text())
    assert loaded["sensitivity"] == 1.0 and loaded["n_targets"] == 1 and len(loaded["froc"]) == 3
    froc_csv = pd.read_csv(paths["froc"])
    assert len(froc_csv) == 3
    # The first point (nothing counted) has no finite threshold: missing in both files, never "inf" in one.
    assert np.isnan(froc_csv["threshold"].iloc[0]) and loaded["froc"][0]["threshold"] is None
    assert "inf" not in Path(paths["froc"]).read_text().lower()
    assert froc_csv["threshold"].tolist()[1:] == [row["threshold"] for row in loaded["froc"][1:]]
    nodules = pd.read_csv(paths["nodules"])
    target = nodules[nodules["status"] == "target"].iloc[0]
    assert bool(target["hit"]) and target["n_readers"] == 4
    import matplotlib.image as mpimg

    png = mpimg.imread(paths["froc_png"])
    assert png.shape[0] > 100 and png.shape[1] > 100
