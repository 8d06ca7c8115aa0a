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
its interpolation are computed as that script does (see :func:`froc_curve`);
the script defines no CPM, so :func:`cpm_score` offers the LUNA16 paper's
(``"exact"``, the default) and the grid reading of the script's curve
(``"grid"``). LUNA16's 100 marks per scan are capped by the script's rule
(:func:`cap_marks`).

This module reads XML and CSV only: no pydicom, no zarr. The slice geometry a
LIDC outline needs comes in as a :class:`SliceGeometry`, which the caller
builds from the store's coordinates (:meth:`SliceGeometry.from_axes`).

The parts: ``_lidc`` (reader XML), ``_geometry`` (outlines to millimetres),
``_luna`` (LUNA16 CSV), ``_consensus`` (grouping the readers' marks),
``_matching`` (hits, ignores, false positives), ``_froc`` (FROC, CPM,
bootstrap), ``_result`` (a whole evaluation and its files) and ``_verdict``
(detections against known true nodules: the demo's verdict, the report's truth).
"""
from __future__ import annotations

from lungzarr.evaluate._consensus import consensus_nodules
from lungzarr.evaluate._constants import (
    CPM_CONVENTIONS,
    CPM_DEFAULT,
    CPM_FP_RATES,
    DETECTION_COLUMNS,
    LIDC_NAMESPACE,
    LUNA16_MAX_MARKS,
    TRUTH_COLUMNS,
    UNKNOWN_DIAMETER_MM,
)
from lungzarr.evaluate._froc import bootstrap_froc, cap_marks, cpm_score, froc_curve
from lungzarr.evaluate._geometry import MarkMeasure, SliceGeometry, measure_mark, measure_marks
from lungzarr.evaluate._lidc import ReaderMark, ReaderMarks, Roi, read_lidc_xml, summarize_lidc_marks
from lungzarr.evaluate._luna import read_luna_annotations, read_luna_candidates, read_luna_csv, read_seriesuids
from lungzarr.evaluate._matching import match_detections
from lungzarr.evaluate._result import EvaluationResult, evaluate_detections, evaluate_lidc_patient, write_evaluation
from lungzarr.evaluate._verdict import DemoVerdict, match_truth

__all__ = [
    "LIDC_NAMESPACE",
    "CPM_FP_RATES",
    "CPM_CONVENTIONS",
    "CPM_DEFAULT",
    "LUNA16_MAX_MARKS",
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
    "read_luna_annotations",
    "read_luna_candidates",
    "read_seriesuids",
    "cap_marks",
    "consensus_nodules",
    "match_detections",
    "froc_curve",
    "cpm_score",
    "bootstrap_froc",
    "evaluate_detections",
    "evaluate_lidc_patient",
    "write_evaluation",
    "TRUTH_COLUMNS",
    "DETECTION_COLUMNS",
    "UNKNOWN_DIAMETER_MM",
    "DemoVerdict",
    "match_truth",
]
