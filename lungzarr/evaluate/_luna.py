"""LUNA16 CSV (part of :mod:`lungzarr.evaluate`)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from lungzarr.evaluate._constants import TRUTH_COLUMNS


def read_luna_csv(path, *, status: str = "target") -> pd.DataFrame:
    """Read a LUNA16 ``annotations.csv`` (or ``annotations_excluded.csv``).

    Parameters
    ----------
    path : str or Path
        CSV with columns ``seriesuid, coordX, coordY, coordZ, diameter_mm``
        (world millimetres).
    status : {"target", "ignore"}
        ``"ignore"`` for ``annotations_excluded.csv``; a diameter of ``-1``
        there means unknown (LUNA16's script then uses 10 mm).

    Returns
    -------
    truth : DataFrame
        The truth table (columns :data:`TRUTH_COLUMNS`); ``patient`` is the
        series UID, coordinates in (z, y, x) mm.
    """
    if status not in ("target", "ignore"):
        raise ValueError(f"status must be 'target' or 'ignore', got {status!r}")
    table = pd.read_csv(path)
    needed = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"{str(path)!r} lacks column(s) {missing!r}: a LUNA16 annotations file "
                         f"has {needed!r}")
    diameter = table["diameter_mm"].astype(float)
    truth = pd.DataFrame({
        "patient": table["seriesuid"].astype(str),
        "nodule_id": [f"luna-{i}" for i in range(len(table))],
        "z_mm": table["coordZ"].astype(float),
        "y_mm": table["coordY"].astype(float),
        "x_mm": table["coordX"].astype(float),
        "diameter_mm": diameter.where(diameter >= 0, np.nan),
        "n_readers": np.nan,
        "readers": "",
        "n_marks": np.nan,
        "kind": "nodule",
        "status": status,
    })
    return truth[TRUTH_COLUMNS]


