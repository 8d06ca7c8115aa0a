"""Tables out of a store: the original DSB2017 per-patient table and the nodule table."""
from __future__ import annotations

from pathlib import Path

from lungzarr.errors import LungzarrError
from lungzarr.pipeline.stages.features import cancer_label

__all__ = ["export_dsb2017", "export_nodules"]


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
