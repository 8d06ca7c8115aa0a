"""Read a lungzarr DICOM SEG back with highdicom and pydicom and check it against the store (not a test module).

Used by tests/test_exports.py (phantom store) and tests/test_end_to_end.py (the LIDC-IDRI-0001 slab).
The geometry of the expected masks comes from the source files' headers, not from lungzarr's code.
"""
from __future__ import annotations

import numpy as np
import pytest

from lungzarr.io.store import CohortStore, grid_from_attrs, read_nodules


def seg_readback(path, sources):
    """A SEG read back with highdicom and pydicom, against its source files (read with pydicom).

    Returns ``(seg, raw, headers, masks, frames)``: highdicom's Segmentation; pydicom's dataset of it;
    the sources' headers in z order; per segment number a (slices, rows, columns) bool mask in that
    order, built from each frame's referenced SOPInstanceUID; per frame (referenced SOP,
    ImagePositionPatient).
    """
    hd = pytest.importorskip("highdicom")
    import pydicom

    seg = hd.seg.segread(path)
    raw = pydicom.dcmread(path)
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in sources),
                     key=lambda h: float(h.ImagePositionPatient[2]))   # the store's z order
    index = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    pixels = raw.pixel_array.reshape(int(raw.NumberOfFrames), int(raw.Rows), int(raw.Columns)).astype(bool)
    masks = {int(s.SegmentNumber): np.zeros((len(headers), int(raw.Rows), int(raw.Columns)), bool)
             for s in raw.SegmentSequence}
    frames = []
    shared = raw.SharedFunctionalGroupsSequence[0]
    for pixel, fg in zip(pixels, raw.PerFrameFunctionalGroupsSequence):
        uid = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        # One segment: its identification is shared by every frame.
        ident = fg if "SegmentIdentificationSequence" in fg else shared
        number = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        masks[number][index[uid]] = pixel
        frames.append((uid, [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]))
    return seg, raw, headers, masks, frames


def _expected_on_sources(values_2mm, grid2, headers):
    """The 2 mm grid's values at the source pixels' centres by nearest neighbour, from the source headers'
    geometry (IPP, PixelSpacing; axial identity orientation) — independent of the export's code."""
    assert all([float(v) for v in h.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0] for h in headers)
    ps = [float(v) for v in headers[0].PixelSpacing]
    ipp = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    z = ipp[:, 2]
    y = ipp[0, 1] + np.arange(int(headers[0].Rows)) * ps[0]
    x = ipp[0, 0] + np.arange(int(headers[0].Columns)) * ps[1]
    idx = [np.clip(np.rint((c - o) / s), 0, n - 1).astype(int)
           for c, o, s, n in zip((z, y, x), grid2.origin, grid2.step, grid2.shape)]
    return np.asarray(values_2mm)[np.ix_(*idx)], (z, y, x)


def check_seg_against_store(store_path, patient, seg_path, sources, *, threshold=0.5):
    """Referenced UIDs, frame positions, the lung mask and every nodule segment against the store and sources.

    Returns the numbers a report quotes."""
    from skimage.measure import label as sk_label

    seg, raw, headers, masks, frames = seg_readback(seg_path, sources)
    cs = CohortStore(store_path, mode="r")
    ds = cs.open_patient(patient)
    # The source series, study, frame of reference and every image are referenced.
    h0 = headers[0]
    assert (raw.StudyInstanceUID, raw.FrameOfReferenceUID, raw.PatientID) == \
        (h0.StudyInstanceUID, h0.FrameOfReferenceUID, h0.PatientID)
    assert raw.Modality == "SEG" and raw.SegmentationType == "BINARY"
    ref = raw.ReferencedSeriesSequence
    assert [str(r.SeriesInstanceUID) for r in ref] == [str(h0.SeriesInstanceUID)] \
        == [ds.attrs["series_instance_uid"]]
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in ref[0].ReferencedInstanceSequence) == \
        sorted(str(h.SOPInstanceUID) for h in headers) == sorted(str(u) for u in ds.sop_instance_uid.values)
    assert {tuple(u) for u in seg.get_source_image_uids()} == \
        {(str(h.StudyInstanceUID), str(h.SeriesInstanceUID), str(h.SOPInstanceUID)) for h in headers}
    # Every frame sits exactly where its source image is.
    by_uid = {str(h.SOPInstanceUID): [float(v) for v in h.ImagePositionPatient] for h in headers}
    assert frames and all(pos == by_uid[uid] for uid, pos in frames)
    assert [float(v) for v in raw.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == \
        [float(v) for v in h0.PixelSpacing]
    grid2 = grid_from_attrs(ds.attrs)
    # Segment 1: the lung mask, the store's `lungs` at the source pixels.
    lungs, (z, y, x) = _expected_on_sources(ds.lungs.values, grid2, headers)
    labels_seg = {int(s.SegmentNumber): str(s.SegmentLabel) for s in raw.SegmentSequence}
    assert labels_seg[1] == "Lung"
    assert np.array_equal(masks[1], lungs) and masks[1].any()
    native_voxel = abs(float(z[1] - z[0])) * float(h0.PixelSpacing[0]) * float(h0.PixelSpacing[1])
    lung_ml = (masks[1].sum() * native_voxel / 1000.0, int(ds.lungs.sum()) * float(np.prod(grid2.spacing)) / 1000.0)
    assert lung_ml[0] == pytest.approx(lung_ml[1], rel=0.03)
    # Nodule segments: the table's rows at the threshold, label for label (skimage labels p > t as the table).
    table = read_nodules(store_path)
    rows = table[(table.patient == patient) & np.isclose(table.threshold, threshold)]
    comps = sk_label(ds.nodule_prob.values > np.float32(threshold), connectivity=3)
    mapped, _ = _expected_on_sources(comps, grid2, headers)
    expected = {int(r.label): r for r in rows.itertuples() if (mapped == r.label).any()}
    got = {int(name.split()[1]): n for n, name in labels_seg.items() if name.startswith("Nodule ")}
    assert sorted(got) == sorted(expected)
    assert sorted(got.values()) == list(range(2, len(got) + 2))
    offsets = []
    for lab, number in got.items():
        row = expected[lab]
        assert np.array_equal(masks[number], mapped == lab)
        k, r, c = np.argwhere(masks[number]).mean(axis=0)
        centre = np.array([np.interp(k, np.arange(len(z)), z), y[0] + r * (y[1] - y[0]), x[0] + c * (x[1] - x[0])])
        offset = np.abs(centre - [row.z_mm, row.y_mm, row.x_mm])
        assert np.all(offset <= [abs(z[1] - z[0]), abs(y[1] - y[0]), abs(x[1] - x[0])]), (lab, offset)
        offsets.append(offset)
        seg_desc = next(s for s in raw.SegmentSequence if int(s.SegmentNumber) == number)
        assert seg_desc.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Nodule"
        assert str(seg_desc.TrackingID).startswith(f"lungzarr nodule {lab} ")
    return {"lung_voxels": int(masks[1].sum()), "lung_ml_native_vs_2mm": lung_ml, "n_frames": len(frames),
            "nodule_segments": len(got), "table_rows": len(rows), "centre_offsets_mm": offsets}
