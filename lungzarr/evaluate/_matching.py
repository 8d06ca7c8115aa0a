"""Matching (part of :mod:`lungzarr.evaluate`)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from lungzarr.evaluate._constants import DETECTION_COLUMNS, UNKNOWN_DIAMETER_MM


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

    LUNA16 rules: a detection is within a nodule when its squared distance
    ``dx² + dy² + dz²`` (summed in world x, y, z order) is strictly below the
    squared radius ``(d / 2)²``, as ``noduleCADEvaluationLUNA16.py`` computes
    it (diameter NaN: :data:`UNKNOWN_DIAMETER_MM`).
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
        # LUNA16's test, operation for operation: squared differences summed in
        # world x, y, z order against the squared radius. A Euclidean norm
        # compared with the radius rounds differently and flips a detection
        # within an ulp of the radius (d = 26.3466: dist² 173.53583288999997 <
        # r² 173.53583289, yet norm == r).
        dz, dy, dx = (det_xyz[in_patient, k] - float(n[c]) for k, c in enumerate(("z_mm", "y_mm", "x_mm")))
        dist2 = dx * dx + dy * dy + dz * dz
        dist = np.sqrt(dist2)
        nod.loc[i, "nearest_detection_mm"] = float(dist.min())
        diameter = float(n["diameter_mm"]) if np.isfinite(n["diameter_mm"]) else UNKNOWN_DIAMETER_MM
        inside = dist2 < (diameter / 2.0) ** 2
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


