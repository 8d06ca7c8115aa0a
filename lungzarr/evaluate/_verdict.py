"""Detections judged against known true nodules (a phantom's, or any truth table in patient mm).

A detection hits a true nodule when its centre lies within that nodule's
radius. This is the demo's verdict and the truth drawn in the QC report; the
reader-annotation scoring (ignores, FROC, CPM) is :mod:`lungzarr.evaluate._matching`.
It sits below both the demo and the report, which use it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lungzarr.algorithms.nodules import REPORTED_THRESHOLD

__all__ = ["DemoVerdict", "match_truth"]

#: Spelled-out counts for the verdict's sentences.
_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


@dataclass(frozen=True)
class DemoVerdict:
    """The demo's detections judged against the phantom's truth.

    A detection is a row of :func:`~lungzarr.algorithms.nodules.select_nodules`
    (p > threshold, DSB filter). It is a *hit* of a true nodule when its centre
    lies within that nodule's radius, and a *false positive* when it lies
    within no true nodule's radius. A true nodule with no detection within
    its radius is *missed*.

    Attributes
    ----------
    truth : DataFrame
        One row per true nodule: ``patient, z_mm, y_mm, x_mm, diameter_mm``,
        ``found`` (a detection within its radius), ``distance_mm`` (to the
        nearest detection of the patient, NaN without one), and that
        detection's ``detected_diameter_mm`` and ``prob_max``.
    detections : DataFrame
        The selected detections with ``hit`` (within a true nodule's radius),
        ``truth_index`` (row of ``truth`` it hits, -1 for none) and
        ``distance_mm`` (to the nearest true nodule's centre, NaN without one).
    patients : tuple of str
        Every patient judged, including those without a true nodule.
    threshold : float
    noun : str
        What the truth is, in the text: "phantom nodule" (the demo) or "true nodule".
    empty_reason : str
        Why a patient has no true nodule, in the text: "by design" (DEMO-003).
    """

    truth: pd.DataFrame
    detections: pd.DataFrame
    patients: tuple[str, ...]
    threshold: float
    noun: str = "phantom nodule"
    empty_reason: str = "by design"

    @property
    def n_true(self) -> int:
        return int(len(self.truth))

    @property
    def n_found(self) -> int:
        return int(self.truth.found.sum()) if len(self.truth) else 0

    @property
    def hits(self) -> pd.DataFrame:
        """True nodules with a detection within their radius."""
        return self.truth[self.truth.found] if len(self.truth) else self.truth

    @property
    def misses(self) -> pd.DataFrame:
        """True nodules without a detection within their radius."""
        return self.truth[~self.truth.found] if len(self.truth) else self.truth

    @property
    def false_positives(self) -> pd.DataFrame:
        """Detections within no true nodule's radius."""
        return self.detections[~self.detections.hit] if len(self.detections) else self.detections

    def without_nodules(self) -> list[str]:
        """Patients with no true nodule (DEMO-003 by design)."""
        have = set(self.truth.patient) if len(self.truth) else set()
        return [p for p in self.patients if p not in have]

    def summary(self) -> str:
        """One line, e.g. ``3/3 phantom nodules found, 2 false positives (DEMO-003 has no nodule by design: ...)``."""
        fp = self.false_positives
        line = f"{self.n_found}/{self.n_true} {self.noun}s found, {_count(len(fp), 'false positive')}"
        notes = []
        for patient in self.without_nodules():
            n = int((fp.patient == patient).sum()) if len(fp) else 0
            if n == 0:
                what = "nothing was detected there, as it should be"
            elif n == 1:
                what = "its one detection is a false positive"
            elif n == 2:
                what = "both of its detections are false positives"
            else:
                what = f"all {_COUNT_WORDS.get(n, n)} of its detections are false positives"
            notes.append(f"{patient} has no nodule {self.empty_reason}: {what}")
        return line + (f" ({'; '.join(notes)})" if notes else "")

    def patient_lines(self, patient: str) -> list[str]:
        """The verdict of one patient: a heading line, then one line per true nodule and false positive."""
        truth = self.truth[self.truth.patient == patient] if len(self.truth) else self.truth
        fps = self.false_positives
        fps = fps[fps.patient == patient] if len(fps) else fps
        found = int(truth.found.sum()) if len(truth) else 0
        if len(truth):
            head = (f"{patient}: {found}/{len(truth)} {self.noun}(s) found, {len(truth) - found} missed, "
                    f"{_count(len(fps), 'false positive')}")
        else:
            head = f"{patient}: no {self.noun} ({self.empty_reason}), {_count(len(fps), 'false positive')}"
        lines = [head]
        for t in truth.itertuples(index=False):
            where = f"{t.diameter_mm:.1f} mm nodule at (z {t.z_mm:.1f}, y {t.y_mm:.1f}, x {t.x_mm:.1f}) mm"
            if t.found:
                lines.append(f"  hit    {where}: detected {t.detected_diameter_mm:.1f} mm, centre "
                             f"{t.distance_mm:.1f} mm away (within its {t.diameter_mm / 2:.1f} mm radius), "
                             f"p {t.prob_max:.2f}")
            elif np.isfinite(t.distance_mm):
                lines.append(f"  missed {where}: nearest detection {t.distance_mm:.1f} mm away, beyond its "
                             f"{t.diameter_mm / 2:.1f} mm radius")
            else:
                lines.append(f"  missed {where}: no detection in this patient")
        for d in fps.itertuples(index=False):
            why = (f"within no {self.noun} (nearest centre {d.distance_mm:.1f} mm away)" if len(truth)
                   else f"this patient has no {self.noun}")
            lines.append(f"  false positive {d.diameter_mm:.1f} mm at (z {d.z_mm:.1f}, y {d.y_mm:.1f}, "
                         f"x {d.x_mm:.1f}) mm, p {d.prob_max:.2f}: {why}")
        return lines

    def text(self) -> str:
        """Every patient's lines and the summary line, as the ``demo`` command prints them."""
        lines = [line for p in self.patients for line in self.patient_lines(p)]
        return "\n".join(lines + [self.summary()])


def match_truth(nodules: pd.DataFrame, truth: pd.DataFrame, *, threshold: float = REPORTED_THRESHOLD,
                patients=None, noun: str = "phantom nodule", empty_reason: str = "by design") -> DemoVerdict:
    """Judge the detections (p > ``threshold``, DSB filter) against true nodules.

    Parameters
    ----------
    nodules : DataFrame
        A nodule table (:data:`~lungzarr.algorithms.nodules.NODULE_COLUMNS`), every threshold.
    truth : DataFrame
        ``patient, z_mm, y_mm, x_mm, diameter_mm`` per true nodule (e.g. :func:`lungzarr.demo.demo_truth`).
    threshold : float
        The detections' threshold.
    patients : sequence of str, optional
        The patients judged (a patient without a true nodule makes its every
        detection a false positive); default those in ``truth`` or the detections.
    noun, empty_reason : str
        Wording of the verdict's text (:class:`DemoVerdict`); the defaults are the demo's.

    Returns
    -------
    DemoVerdict
    """
    from lungzarr.algorithms.nodules import select_nodules

    found = select_nodules(nodules, threshold=threshold).reset_index(drop=True)
    truth = truth.reset_index(drop=True)
    if patients is None:
        patients = list(dict.fromkeys([*truth.patient, *found.patient]))
    patients = tuple(str(p) for p in patients)
    unknown = sorted(set(truth.patient) - set(patients))
    if unknown:
        raise ValueError(f"truth has patients {unknown!r} that are not in patients={list(patients)!r}; "
                         "pass every patient of the cohort")
    det_xyz = found[["z_mm", "y_mm", "x_mm"]].to_numpy(dtype=np.float64) if len(found) else np.zeros((0, 3))
    true_xyz = truth[["z_mm", "y_mm", "x_mm"]].to_numpy(dtype=np.float64)
    # distance[i, j]: true nodule i to detection j; infinite across patients.
    distance = np.sqrt(((true_xyz[:, None, :] - det_xyz[None, :, :]) ** 2).sum(axis=-1))
    same = truth.patient.to_numpy()[:, None] == (found.patient.to_numpy() if len(found) else np.array([]))[None, :]
    distance = np.where(same, distance, np.inf)
    within = distance <= truth.diameter_mm.to_numpy(dtype=np.float64)[:, None] / 2.0

    rows = []
    for i, t in enumerate(truth[["patient", "z_mm", "y_mm", "x_mm", "diameter_mm"]].itertuples(index=False)):
        row = {**t._asdict(), "found": bool(within[i].any()), "distance_mm": np.nan,
               "detected_diameter_mm": np.nan, "prob_max": np.nan}
        if np.isfinite(distance[i]).any():
            j = int(np.argmin(distance[i]))
            row.update(distance_mm=float(distance[i, j]), detected_diameter_mm=float(found.diameter_mm.iloc[j]),
                       prob_max=float(found.prob_max.iloc[j]))
        rows.append(row)
    truth_out = pd.DataFrame(rows, columns=["patient", "z_mm", "y_mm", "x_mm", "diameter_mm", "found",
                                            "distance_mm", "detected_diameter_mm", "prob_max"])
    truth_out["found"] = truth_out["found"].astype(bool)

    detections = found.copy()
    hit_of = np.where(within, distance, np.inf)
    detections["hit"] = within.any(axis=0) if len(truth) else np.zeros(len(found), dtype=bool)
    detections["truth_index"] = (np.where(detections["hit"], np.argmin(hit_of, axis=0), -1)
                                 if len(truth) else np.full(len(found), -1))
    nearest = distance.min(axis=0) if len(truth) else np.full(len(found), np.inf)
    detections["distance_mm"] = np.where(np.isfinite(nearest), nearest, np.nan)
    return DemoVerdict(truth=truth_out, detections=detections, patients=patients, threshold=float(threshold),
                       noun=noun, empty_reason=empty_reason)
