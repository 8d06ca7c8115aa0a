"""Out of a store: the original DSB2017 per-patient table, the nodule table, LUNA16 candidates, NIfTI masks."""
from __future__ import annotations

from pathlib import Path

from lungzarr.errors import LungzarrError
from lungzarr.pipeline.stages.features import cancer_label

__all__ = ["export_dsb2017", "export_nodules", "export_luna16", "export_nifti"]


def _dsb_row_task(store_path, patient, fmt, cancer):
    from lungzarr.algorithms.features import dsb2017_row
    from lungzarr.io.storage import CohortStore

    return dsb2017_row(CohortStore(store_path, mode="r").open_patient(patient), fmt=fmt, cancer=cancer,
                       patient=patient)


def export_dsb2017(store_path, out, *, fmt: str = "keras8_0313", labels=None, patients=None, client=None):
    """Write the original per-patient feature table (CSV, index ``id``) of every detected patient.

    Parameters
    ----------
    store_path : path
    out : path
        The CSV to write.
    fmt : {"keras8_0313", "keras_0311", "base_8"}
    labels : path, optional
        Labels CSV (``id,cancer``). The label rule is the features stage's
        (:func:`~lungzarr.pipeline.stages.features.cancer_label`): this CSV
        wins, else the label the patient was imported with, else -777.
    patients : list of str, optional
    client : distributed.Client, optional

    Returns
    -------
    pandas.DataFrame
        The table written.
    """
    import dask

    from lungzarr.algorithms.features import FORMATS, dsb2017_table
    from lungzarr.io.legacy import read_legacy_labels
    from lungzarr.io.storage import CohortStore

    if fmt not in FORMATS:
        raise LungzarrError(f"--format must be one of {list(FORMATS)!r}, got {fmt!r}")
    store = CohortStore(store_path, mode="r")
    label_map = read_legacy_labels(labels) if labels is not None else None
    ids = [p for p in store.patients() if store.is_complete(p, "detect") and store.is_complete(p, "segment")
           and (patients is None or p in set(patients))]
    if not ids:
        raise LungzarrError(f"no patient of {str(store_path)!r} has completed detection; run `lungzarr run` or "
                            f"`lungzarr detect` first")
    tasks = [dask.delayed(_dsb_row_task, pure=False)(
        str(store.path), p, fmt, cancer_label(p, labels=label_map, attrs=store.patient_attrs(p))) for p in ids]
    rows = (client.gather(client.compute(tasks)) if client is not None else dask.compute(*tasks))
    # One concat of all rows, as the original: a column is float where any patient has a value.
    table = dsb2017_table(list(rows))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out)
    return table


def export_nodules(store_path, out, *, threshold: float | None = None, filtered: bool = False):
    """Write the cohort nodule table to Parquet (``.parquet``) or CSV (any other suffix).

    ``threshold`` keeps one threshold's rows, ``filtered`` only those passing the original's filter
    (:func:`~lungzarr.algorithms.nodules.select_nodules`).
    """
    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.io.storage import read_nodules

    table = select_nodules(read_nodules(store_path), threshold=threshold, dsb_filter=filtered)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        table.to_parquet(out, index=False)
    else:
        table.to_csv(out, index=False)
    return table


#: Columns of a LUNA16 candidates (submission) file, in its order.
LUNA16_CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]


def export_luna16(store_path, out, *, threshold: float = 0.5, filtered: bool = False):
    """Write the store's nodules as a LUNA16 candidates CSV (``seriesuid, coordX, coordY, coordZ, probability``).

    One row per candidate: the nodule table at ``threshold`` (the same rows
    ``lungzarr evaluate STORE`` scores), ``probability = prob_max``, the
    centroid in world mm. LUNA16's world coordinates are the ITK physical
    coordinates of the scan, i.e. DICOM patient LPS millimetres, which is what
    the store holds: ``coordX = x_mm``, ``coordY = y_mm``, ``coordZ = z_mm``
    with no sign flip (only the order changes, x, y, z). ``seriesuid`` is the
    patient's ``series_instance_uid`` attribute. Floats are written at full
    precision (they read back bit for bit).

    Parameters
    ----------
    store_path : path
    out : path
        The CSV to write.
    threshold : float
        One of the nodule table's thresholds (0.5, 0.75, ...).
    filtered : bool
        Only candidates passing the original's filter.

    Returns
    -------
    pandas.DataFrame
        The table written.
    """
    import pandas as pd

    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.io.storage import CohortStore, read_nodules

    store = CohortStore(store_path, mode="r")
    patients = [p for p in store.patients() if store.is_complete(p, "nodules")]
    if not patients:
        raise LungzarrError(f"no patient of {str(store_path)!r} has a nodule table; run `lungzarr run` first")
    series = {p: store.patient_attrs(p).get("series_instance_uid") for p in patients}
    lacking = [p for p, uid in series.items() if not uid]
    if lacking:
        raise LungzarrError(f"patient(s) {lacking[:5]!r} of {str(store_path)!r} have no series_instance_uid "
                            f"attribute, which LUNA16's seriesuid needs; ingest them from DICOM")
    table = read_nodules(store_path)
    table = table[table.patient.isin(patients)]
    if len(table):
        known = sorted(set(table.threshold.astype(float)))
        if not any(abs(t - float(threshold)) < 1e-12 for t in known):
            raise LungzarrError(f"--threshold {threshold!r} is not a threshold of the nodule table: "
                                f"use one of {known!r}")
        table = select_nodules(table, threshold=threshold, dsb_filter=filtered)
    out_table = pd.DataFrame({
        "seriesuid": table.patient.map(series).astype(str).to_numpy() if len(table) else [],
        "coordX": table.x_mm.to_numpy(float) if len(table) else [],
        "coordY": table.y_mm.to_numpy(float) if len(table) else [],
        "coordZ": table.z_mm.to_numpy(float) if len(table) else [],
        "probability": table.prob_max.to_numpy(float) if len(table) else [],
    }, columns=LUNA16_CANDIDATE_COLUMNS)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out_table.to_csv(out, index=False)
    return out_table


def export_nifti(store_path, out_dir, *, threshold: float = 0.5, patients=None) -> dict:
    """Write each patient's lung mask and nodule labels as NIfTI (``.nii.gz``) on the 2 mm grid.

    ``<patient>_lungs.nii.gz``: ``lungs`` as uint8 (1 = lung).
    ``<patient>_nodules.nii.gz``: int32, each 26-connected component of
    ``nodule_prob > float32(threshold)`` labelled with its nodule row's
    ``label`` (the labelling of :func:`lungzarr.algorithms.nodules.find_nodules`),
    0 elsewhere; written only when the nodule table is complete, and checked
    against it (same count, same voxels per label).

    Voxels are in NIfTI's (i, j, k) = (x, y, z) order and the affine is
    :func:`lungzarr.io.volumes.nifti_affine` (RAS), so a viewer shows the patient the right way
    round and voxel centres map to the store's LPS mm with x and y negated.

    Parameters
    ----------
    store_path, out_dir : path
    threshold : float
        One of the nodule table's thresholds.
    patients : list of str, optional

    Returns
    -------
    dict
        ``patient -> {"lungs": path, "nodules": path or None}``.
    """
    import numpy as np

    from lungzarr.algorithms.components import above_threshold, find_components
    from lungzarr.io.storage import CohortStore, grid_from_attrs
    from lungzarr.io.volumes import write_nifti
    from lungzarr.pipeline.tables import patient_nodules

    store = CohortStore(store_path, mode="r")
    ids = [p for p in store.patients() if store.is_complete(p, "segment")
           and (patients is None or p in set(patients))]
    if not ids:
        raise LungzarrError(f"no patient of {str(store_path)!r} has a lung mask; run `lungzarr run` or "
                            f"`lungzarr segment` first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for p in ids:
        ds = store.open_patient(p)
        grid = grid_from_attrs(ds.attrs)
        lungs_path = out_dir / f"{p}_lungs.nii.gz"
        write_nifti(np.asarray(ds.lungs.values, dtype=np.uint8), grid, lungs_path, intent="none")
        nodules_path = None
        if store.is_complete(p, "nodules"):
            comps = find_components(above_threshold(ds.nodule_prob.values, threshold))
            labels = comps.label_image()
            # The table's rows at this threshold must be these components, label for label:
            # a table from another nodule_prob would give labels that name other nodules.
            rows = patient_nodules(store, p)
            rows = rows[np.isclose(rows.threshold.to_numpy(float), float(threshold), rtol=0, atol=1e-12)]
            rows = rows.sort_values("label")
            counts = np.bincount(labels.ravel(), minlength=comps.count + 1)[1:]
            if (len(rows) != comps.count or not np.array_equal(rows.label.to_numpy(), np.arange(1, comps.count + 1))
                    or not np.array_equal(rows.voxels.to_numpy(), counts)):
                raise LungzarrError(f"patient {p!r}: the nodule table at threshold {threshold!r} does not match "
                                    f"nodule_prob ({len(rows)} rows, {comps.count} components); rerun "
                                    f"`lungzarr nodules {store_path}`")
            nodules_path = out_dir / f"{p}_nodules.nii.gz"
            write_nifti(labels, grid, nodules_path, intent="label")
        written[p] = {"lungs": str(lungs_path), "nodules": None if nodules_path is None else str(nodules_path)}
    return written
