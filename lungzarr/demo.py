"""The embedded default cohort: synthetic chest CTs written as real DICOM files."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lungzarr.algorithms.nodules import REPORTED_THRESHOLD
from lungzarr.algorithms.phantom import DEMO_PATIENTS, chest_phantom

__all__ = ["write_demo_cohort", "demo_truth"]

#: Geometry of the demo series: 48 slices of 2.5 mm, 192 x 192 pixels of 1.6 mm (small, so the
#: UNet on 2 CPU cores takes a few minutes for the cohort).
DEMO_SHAPE = (48, 192, 192)
DEMO_SPACING = (2.5, 1.6, 1.6)


def write_demo_cohort(folder="input/demo", *, n_patients: int | None = None) -> list[Path]:
    """Write the demo patients as DICOM series into ``folder/<patient>/``.

    Existing patient folders are rewritten, so the demo always starts from the
    same input. Returns the patient folders.
    """
    from lungzarr.io.dicom import write_series

    folder = Path(folder)
    out = []
    for pid, nodules, seed in DEMO_PATIENTS[:n_patients]:
        hu, origin = chest_phantom(shape=DEMO_SHAPE, spacing=DEMO_SPACING, nodules=nodules, seed=seed)
        target = folder / pid
        if target.exists():
            for f in target.glob("*.dcm"):
                f.unlink()
        write_series(hu, target, spacing=DEMO_SPACING, origin=origin, patient_id=pid,
                     slice_thickness=DEMO_SPACING[0])
        out.append(target)
    return out


def demo_truth() -> pd.DataFrame:
    """The demo's nodules: patient, centre (mm) and diameter."""
    rows = [{"patient": pid, "z_mm": n.z_mm, "y_mm": n.y_mm, "x_mm": n.x_mm, "diameter_mm": n.diameter_mm}
            for pid, nodules, _ in DEMO_PATIENTS for n in nodules]
    return pd.DataFrame(rows, columns=["patient", "z_mm", "y_mm", "x_mm", "diameter_mm"])


def match_truth(nodules: pd.DataFrame, truth: pd.DataFrame, *, threshold: float = REPORTED_THRESHOLD) -> pd.DataFrame:
    """For each true nodule, the nearest detection (p > threshold, DSB filter) and whether it is a hit.

    A hit is a detection whose centre lies within the true nodule's radius.
    """
    import numpy as np

    from lungzarr.algorithms.nodules import select_nodules

    found = select_nodules(nodules, threshold=threshold)
    rows = []
    for t in truth.itertuples(index=False):
        mine = found[found.patient == t.patient]
        if len(mine):
            d = np.sqrt((mine.z_mm - t.z_mm) ** 2 + (mine.y_mm - t.y_mm) ** 2 + (mine.x_mm - t.x_mm) ** 2)
            best = int(np.argmin(d.to_numpy()))
            hit = mine.iloc[best]
            rows.append({**t._asdict(), "distance_mm": float(d.iloc[best]), "found": bool(d.iloc[best] <= t.diameter_mm / 2),
                         "detected_diameter_mm": float(hit.diameter_mm), "prob_max": float(hit.prob_max)})
        else:
            rows.append({**t._asdict(), "distance_mm": float("nan"), "found": False,
                         "detected_diameter_mm": float("nan"), "prob_max": float("nan")})
    return pd.DataFrame(rows)


def run_demo(folder="input/demo", store="demo.zarr", *, client=None, progress=None, report=True):
    """Write the demo cohort, run the whole pipeline on it and write a QC report.

    Returns
    -------
    dict
        ``summaries`` (per stage), ``nodules`` (p > 0.5, DSB filter),
        ``truth`` (each phantom nodule with its nearest detection) and
        ``report`` (the HTML path, or None).
    """
    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.io.storage import read_nodules
    from lungzarr.pipeline import run

    write_demo_cohort(folder)
    summaries = run(folder, store, client=client, progress=progress)
    nodules = read_nodules(store)
    kept = select_nodules(nodules)
    out = {"summaries": summaries, "nodules": kept, "truth": match_truth(nodules, demo_truth()), "report": None}
    if report:
        from lungzarr.reports.html import write_report

        out["report"] = write_report(store, Path(store).with_suffix("").as_posix() + "_report.html")
    return out
