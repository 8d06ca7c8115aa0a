"""The embedded default cohort: synthetic chest CTs written as real DICOM files."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lungzarr.phantom import DEMO_PATIENTS, chest_phantom

__all__ = ["write_demo_cohort", "demo_truth"]

#: Geometry of the demo series: 64 slices of 2.5 mm, 256 x 256 pixels of 1.4 mm.
DEMO_SHAPE = (64, 256, 256)
DEMO_SPACING = (2.5, 1.4, 1.4)


def write_demo_cohort(folder="input/demo", *, n_patients: int | None = None) -> list[Path]:
    """Write the demo patients as DICOM series into ``folder/<patient>/``.

    Existing patient folders are rewritten, so the demo always starts from the
    same input. Returns the patient folders.
    """
    from lungzarr.dicom import write_series

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
