"""FROC and CPM (part of :mod:`lungzarr.evaluate`)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lungzarr.evaluate._constants import _FROC_GRID_MAX, _FROC_GRID_MIN, _FROC_GRID_N, CPM_FP_RATES


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


