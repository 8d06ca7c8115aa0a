"""Shared constants and table columns (part of :mod:`lungzarr.evaluate`)."""
from __future__ import annotations

#: XML namespace of LIDC-IDRI ``LidcReadMessage`` files.
LIDC_NAMESPACE = "http://www.nih.gov"
_NS = {"n": LIDC_NAMESPACE}

#: False-positive rates (per scan) whose mean sensitivity is the CPM score.
CPM_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

#: How the CPM reads the FROC curve at those rates (see :func:`~lungzarr.evaluate.cpm_score`):
#: ``"exact"`` at the rates themselves (the LUNA16 paper), ``"grid"`` at the official
#: script's 10001-point grid point at or below each rate.
CPM_CONVENTIONS = ("exact", "grid")
CPM_DEFAULT = "exact"

#: LUNA16's limit of CAD marks per scan (the official script's ``maxNumberOfCADMarks``).
LUNA16_MAX_MARKS = 100

# LUNA16 interpolates the FROC curve on this many points between these rates.
_FROC_GRID_MIN = 0.125
_FROC_GRID_MAX = 8.0
_FROC_GRID_N = 10001

#: Diameter (mm) LUNA16's script gives an annotation without one (``-1``).
UNKNOWN_DIAMETER_MM = 10.0

TRUTH_COLUMNS = ["patient", "nodule_id", "z_mm", "y_mm", "x_mm", "diameter_mm",
                 "n_readers", "readers", "n_marks", "kind", "status"]
DETECTION_COLUMNS = ["patient", "z_mm", "y_mm", "x_mm", "prob"]


