"""Whole evaluation (part of :mod:`lungzarr.evaluate`)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lungzarr.evaluate._consensus import consensus_nodules
from lungzarr.evaluate._constants import _FROC_GRID_MAX, _FROC_GRID_MIN, CPM_CONVENTIONS, CPM_DEFAULT, CPM_FP_RATES
from lungzarr.evaluate._froc import _froc_grid, bootstrap_froc, cap_marks, cpm_score, froc_curve
from lungzarr.evaluate._geometry import SliceGeometry
from lungzarr.evaluate._lidc import read_lidc_xml, summarize_lidc_marks
from lungzarr.evaluate._matching import _check_detections, _check_truth, match_detections


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
                        confidence: float = 0.95, max_marks_per_scan: int | None = None,
                        cpm_convention: str = CPM_DEFAULT) -> EvaluationResult:
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
        Keep only the most probable detections of each scan, by the official
        script's rule (:func:`cap_marks`: above the ``n + 1``-th highest
        probability, a tie at the cut dropping the tied group; LUNA16 used 100).
    cpm_convention : {"exact", "grid"}
        Which CPM ``summary["cpm"]`` is (and the bootstrap's); both are in the
        summary as ``cpm_exact`` and ``cpm_grid`` (see :func:`cpm_score`).

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
        detections = cap_marks(detections, max_marks_per_scan)
    if cpm_convention not in CPM_CONVENTIONS:
        raise ValueError(f"cpm_convention must be one of {list(CPM_CONVENTIONS)!r}, got {cpm_convention!r}")
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
    cpms = {}
    for convention in CPM_CONVENTIONS:
        if n_targets:
            cpms[convention] = cpm_score(froc, convention=convention)
        else:
            cpms[convention] = (math.nan, {float(r): math.nan for r in CPM_FP_RATES})
    cpm, at_rates = cpms[cpm_convention]
    boot = None
    if n_bootstrap:
        boot = bootstrap_froc(nod, det, scans=all_scans, n_bootstrap=n_bootstrap, seed=seed,
                              confidence=confidence, convention=cpm_convention)
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
        "cpm_convention": cpm_convention,
        "cpm_sensitivities": {str(k): v for k, v in at_rates.items()},
        **{f"cpm_{c}": cpms[c][0] for c in CPM_CONVENTIONS},
        **{f"cpm_{c}_sensitivities": {str(k): v for k, v in cpms[c][1].items()} for c in CPM_CONVENTIONS},
        "cpm_ci": (None if boot is None else [boot["cpm_lower"], boot["cpm_upper"]]),
        "settings": {"n_bootstrap": int(n_bootstrap), "seed": int(seed),
                     "confidence": float(confidence), "max_marks_per_scan": max_marks_per_scan,
                     "cpm_convention": cpm_convention,
                     "rule": "LUNA16 (noduleCADEvaluationLUNA16.py): hit when dx²+dy²+dz² < (diameter/2)²"},
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
    ``tp``/``fp``/``ignored``. ``froc.csv`` and ``results.json`` write the
    first FROC point's threshold (nothing counted, ``inf`` in memory) as
    missing: an empty cell, ``null``. The plot is the FROC curve on a log2 axis from
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
    # The first FROC point (nothing counted) has threshold inf in memory; JSON has no inf, so both
    # files write it as missing (null in results.json, an empty cell in froc.csv).
    result.froc.replace([np.inf, -np.inf], np.nan).to_csv(paths["froc"], index=False)
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
        # The curve rises from the lower left to the upper right: the lower right stays clear.
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
