"""LUNA16 CSV files: annotations, excluded findings, candidates, series lists (part of :mod:`lungzarr.evaluate`).

LUNA16's world coordinates (``coordX, coordY, coordZ``) are the ITK physical
coordinates of the scans, which for DICOM-derived images are the patient LPS
millimetres lungzarr stores: ``x_mm = coordX``, ``y_mm = coordY``,
``z_mm = coordZ``, no sign flip.

Numbers are parsed by Python's ``float`` from the text: the official script
reads the CSV as text and calls ``float``, and pandas before 3.0 parses with
a converter that can be one ulp off, which flips a detection on the edge of
a nodule's radius.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lungzarr.evaluate._constants import DETECTION_COLUMNS, TRUTH_COLUMNS

_ANNOTATION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
_CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]


def _read(path, needed, what):
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} does not exist: give the path of a LUNA16 {what}") from None
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"{str(path)!r} lacks column(s) {missing!r}: a LUNA16 {what} has {needed!r}")
    for column in needed[1:]:
        values = table[column].to_numpy()
        try:
            table[column] = np.array([float(v) for v in values], dtype=np.float64)
        except ValueError:
            row = next(i for i, v in enumerate(values) if not _is_float(v))
            raise ValueError(f"{str(path)!r} row {row + 2}: {column} {values[row]!r} is not a number") from None
    return table


def _is_float(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_luna_csv(path, *, status: str = "target", id_prefix: str | None = None) -> pd.DataFrame:
    """Read a LUNA16 ``annotations.csv`` (or ``annotations_excluded.csv``).

    Parameters
    ----------
    path : str or Path
        CSV with columns ``seriesuid, coordX, coordY, coordZ, diameter_mm``
        (world millimetres).
    status : {"target", "ignore"}
        ``"ignore"`` for ``annotations_excluded.csv``; a diameter of ``-1``
        there means unknown (LUNA16's script then uses 10 mm).
    id_prefix : str, optional
        ``nodule_id`` is ``<prefix><row>`` (row from 0 in the file). Default
        ``"luna-"`` for targets and ``"luna-excluded-"`` for ignored findings,
        so that the two files' ids stay distinct once concatenated.

    Returns
    -------
    truth : DataFrame
        The truth table (columns :data:`TRUTH_COLUMNS`); ``patient`` is the
        series UID, coordinates in (z, y, x) mm.
    """
    if status not in ("target", "ignore"):
        raise ValueError(f"status must be 'target' or 'ignore', got {status!r}")
    if id_prefix is None:
        id_prefix = "luna-" if status == "target" else "luna-excluded-"
    table = _read(path, _ANNOTATION_COLUMNS, "annotations file")
    diameter = table["diameter_mm"].astype(float)
    truth = pd.DataFrame({
        "patient": table["seriesuid"].astype(str),
        "nodule_id": [f"{id_prefix}{i}" for i in range(len(table))],
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


def read_luna_annotations(annotations, excluded=None) -> pd.DataFrame:
    """The truth table of ``annotations.csv`` (targets) and ``annotations_excluded.csv`` (ignored).

    Targets come first, as the official script lists each scan's findings;
    ids are ``luna-<row>`` and ``luna-excluded-<row>``.
    """
    parts = [read_luna_csv(annotations, status="target")]
    if excluded is not None:
        parts.append(read_luna_csv(excluded, status="ignore"))
    return pd.concat(parts, ignore_index=True)


def read_luna_candidates(path) -> pd.DataFrame:
    """Read a LUNA16 candidates (submission) CSV as a detection table.

    Parameters
    ----------
    path : str or Path
        CSV with columns ``seriesuid, coordX, coordY, coordZ, probability``
        (world mm; lungzarr's ``export --format luna16`` or any detector's).

    Returns
    -------
    DataFrame
        Columns :data:`DETECTION_COLUMNS` (``patient`` = series UID, centre in
        (z, y, x) mm, ``prob``), one row per candidate in file order.
    """
    table = _read(path, _CANDIDATE_COLUMNS, "candidates file")
    prob = table["probability"].astype(float)
    if not np.isfinite(prob).all():
        bad = int(np.flatnonzero(~np.isfinite(prob.to_numpy()))[0])
        raise ValueError(f"{str(path)!r} row {bad + 2}: probability {table['probability'].iloc[bad]!r} is not a "
                         f"finite number; every candidate needs one")
    out = pd.DataFrame({
        "patient": table["seriesuid"].astype(str),
        "z_mm": table["coordZ"].astype(float),
        "y_mm": table["coordY"].astype(float),
        "x_mm": table["coordX"].astype(float),
        "prob": prob,
    })
    return out[DETECTION_COLUMNS]


def read_seriesuids(path) -> list[str]:
    """The scans of an evaluation: LUNA16's ``seriesuids.csv`` (one UID a line, no header).

    A first line ``seriesuid`` is taken as a header and skipped; blank lines
    are skipped; duplicates are kept once.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist: give LUNA16's seriesuids.csv (one series UID a line)")
    uids = [line.split(",")[0].strip() for line in path.read_text().splitlines()]
    uids = [u for u in uids if u]
    if uids and uids[0] == "seriesuid":
        uids = uids[1:]
    if not uids:
        raise ValueError(f"{str(path)!r} lists no series UID: one UID a line, as LUNA16's seriesuids.csv")
    return list(dict.fromkeys(uids))
