"""The embedded default cohort: synthetic chest CTs written as real DICOM files."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lungzarr.algorithms.phantom import DEMO_PATIENTS, chest_phantom
from lungzarr.evaluate import match_truth

__all__ = ["write_demo_cohort", "demo_truth", "run_demo"]

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
    """The demo's nodules: patient, centre (mm) and diameter (DEMO-003 has none, by design)."""
    rows = [{"patient": pid, "z_mm": n.z_mm, "y_mm": n.y_mm, "x_mm": n.x_mm, "diameter_mm": n.diameter_mm}
            for pid, nodules, _ in DEMO_PATIENTS for n in nodules]
    truth = pd.DataFrame(rows, columns=["patient", "z_mm", "y_mm", "x_mm", "diameter_mm"])
    # How the verdict names them (the report reads these): every patient without one is so by design.
    truth.attrs.update(noun="phantom nodule", empty_reason="by design")
    return truth


def run_demo(folder="input/demo", store="demo.zarr", *, client=None, progress=None, report=True) -> dict:
    """Write the demo cohort, run the whole pipeline on it, judge it against the truth, write a QC report.

    Returns
    -------
    dict
        ``summaries`` (per stage), ``nodules`` (the detections: p > 0.5, DSB filter),
        ``verdict`` (:class:`~lungzarr.evaluate.DemoVerdict`: hits, misses and false positives against
        the phantom's truth; ``verdict.text()`` is what the ``demo`` command prints),
        ``truth`` (``verdict.truth``: each phantom nodule with its nearest detection) and
        ``report`` (the HTML path, or None; the truth is drawn in its pictures).
    """
    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.io.store import read_nodules
    from lungzarr.pipeline import run

    write_demo_cohort(folder)
    summaries = run(folder, store, client=client, progress=progress)
    nodules = read_nodules(store)
    verdict = match_truth(nodules, demo_truth(), patients=[pid for pid, _, _ in DEMO_PATIENTS])
    out = {"summaries": summaries, "nodules": select_nodules(nodules), "verdict": verdict,
           "truth": verdict.truth, "report": None}
    if report:
        from lungzarr.reports.html import write_report

        out["report"] = write_report(store, Path(store).with_suffix("").as_posix() + "_report.html",
                                     truth=demo_truth())
    return out
