"""FROC and CPM (part of :mod:`lungzarr.evaluate`)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lungzarr.evaluate._constants import (
    _FROC_GRID_MAX,
    _FROC_GRID_MIN,
    _FROC_GRID_N,
    CPM_CONVENTIONS,
    CPM_DEFAULT,
    CPM_FP_RATES,
)


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
    # The official script's arithmetic (sklearn's roc_curve rates, then
    # ``fpr * n_fp / n_scans`` and ``tpr * n_hit / n_targets``), so that a
    # curve point on a CPM rate (15 FP over 60 scans = 1/4) rounds as there.
    n_fp, n_hit = fp.size, tp.size
    fps_per_scan = (fps / n_fp) * n_fp / n_scans if n_fp else np.zeros(fps.shape)
    if not n_targets:
        sensitivity = np.full(tps.shape, np.nan)
    elif n_hit:
        sensitivity = (tps / n_hit) * n_hit / n_targets
    else:
        sensitivity = np.zeros(tps.shape)
    return pd.DataFrame({
        "threshold": np.r_[np.inf, scores[last_of_value]],
        "fps_per_scan": np.r_[0.0, fps_per_scan],
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


def cpm_score(froc: pd.DataFrame, *, convention: str = CPM_DEFAULT) -> tuple[float, dict]:
    """Competition performance metric of a FROC curve: the mean sensitivity at 1/8 ... 8 FP/scan.

    The official ``noduleCADEvaluationLUNA16.py`` defines no CPM; it only
    interpolates the curve (``np.interp``; beyond its last point the last
    sensitivity holds) on 10001 points evenly spaced from 1/8 to 8 FP/scan.
    Two readings of that curve are in use (:data:`CPM_CONVENTIONS`):

    ``"exact"`` (the default)
        The sensitivity of the linearly interpolated curve at exactly each
        rate: the definition of the LUNA16 paper (Setio et al., *Medical
        Image Analysis* 42:1-13, 2017: "the average sensitivity at seven
        predefined false positive rates: 1/8, 1/4, 1/2, 1, 2, 4, and 8 FPs
        per scan", after Niemeijer et al., *IEEE TMI* 30(2):215-223, 2011).
    ``"grid"``
        The sensitivity at the grid point at or just below each rate, index
        ``int((rate - 1/8) * 10000 / (8 - 1/8))`` of the official script's
        10001-point interpolated curve (its ``fps_itp``/``sens_itp``, the
        curve it plots and writes to its FROC CSV). The curve is the
        script's; the index rule is not official (it is lungzarr's reading
        before the ``"exact"`` default; other scripts take the nearest grid
        point instead). It differs from ``"exact"`` where the curve rises
        steeply just below a rate, e.g. a jump exactly at 1/4 FP/scan (15 FP
        over 60 scans), read before the jump here and at its top there.

    Parameters
    ----------
    froc : DataFrame
        From :func:`froc_curve`.
    convention : {"exact", "grid"}

    Returns
    -------
    cpm : float
    sensitivities : dict
        Rate -> sensitivity.
    """
    if convention not in CPM_CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CPM_CONVENTIONS)!r}, got {convention!r}")
    xp, fp = froc["fps_per_scan"].to_numpy(float), froc["sensitivity"].to_numpy(float)
    if convention == "grid":
        values = np.interp(_froc_grid(), xp, fp)[_cpm_indices()]
    else:
        values = np.interp(np.asarray(CPM_FP_RATES, float), xp, fp)
    return float(np.mean(values)), {float(r): float(v) for r, v in zip(CPM_FP_RATES, values)}


def cap_marks(detections: pd.DataFrame, max_marks: int = 100) -> pd.DataFrame:
    """LUNA16's limit on marks per scan, with the official script's tie rule.

    A scan with more than ``max_marks`` detections keeps those whose
    probability is strictly above the ``max_marks + 1``-th highest one; a
    tie at the cut drops the whole tied group (so a scan can keep fewer
    than ``max_marks``). Scans with at most ``max_marks`` keep all.

    Parameters
    ----------
    detections : DataFrame
        Columns ``patient`` and ``prob`` at least.
    max_marks : int
        LUNA16 used 100.

    Returns
    -------
    DataFrame
        The kept rows, in their input order.
    """
    if max_marks < 1:
        raise ValueError(f"max_marks_per_scan must be at least 1, got {max_marks!r}")
    keep = np.ones(len(detections), bool)
    probs = detections["prob"].to_numpy(float)
    for rows in detections.groupby(detections["patient"].astype(str), sort=False).indices.values():
        if rows.size > max_marks:
            cut = np.sort(probs[rows])[::-1][max_marks]
            keep[rows] = probs[rows] > cut
    return detections[keep]


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
                   seed: int = 0, confidence: float = 0.95, convention: str = CPM_DEFAULT) -> dict:
    """Bootstrap over scans (LUNA16 ``computeFROC_bootstrap``), seeded.

    Scans are drawn with replacement (a scan drawn twice counts twice); each
    sample's FROC curve is interpolated on LUNA16's grid. The bounds are
    LUNA16's: the sorted samples at ``floor(P * n)`` and ``floor((1 - P) * n)``
    with ``P = (1 - confidence) / 2``. Samples without any target have no
    sensitivity and are left out (counted in ``n_without_targets``). Each
    sample's CPM is read by ``convention`` (see :func:`cpm_score`).

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
        cpms.append(cpm_score(froc, convention=convention)[0])
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


