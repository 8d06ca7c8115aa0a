"""Scoring a store's nodules against reader annotations (the glue between the store and :mod:`lungzarr.evaluate`)."""
from __future__ import annotations

from pathlib import Path

from lungzarr.errors import LungzarrError

__all__ = ["evaluate_store"]


def _store_detections(store, *, threshold: float, filtered: bool):
    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.io.storage import read_nodules

    nodules = read_nodules(store.path)
    if not len(nodules):
        return nodules.assign(prob=[])
    rows = select_nodules(nodules, threshold=threshold, dsb_filter=filtered)
    return rows.assign(prob=rows.prob_max)


def evaluate_store(store_path, out_dir, *, lidc_xml=None, luna_csv=None, threshold: float = 0.5,
                   filtered: bool = False, min_readers: int = 3, min_diameter_mm: float = 3.0,
                   n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Score the store's nodules against reader annotations (LUNA16 rules).

    Parameters
    ----------
    store_path, out_dir : path
    lidc_xml : path, optional
        An LIDC-IDRI XML file or a folder searched for them; matched to
        patients by SeriesInstanceUID.
    luna_csv : path, optional
        A LUNA16 ``annotations.csv``; ``seriesuid`` matched likewise.
    threshold : float
        The nodule table's threshold whose components are the detections
        (scored by their largest probability).
    filtered : bool
        Keep only detections passing the original's filter.

    Returns
    -------
    dict
        ``result`` (EvaluationResult), ``files`` written, ``scans`` evaluated
        and ``unmatched`` patients without annotations.
    """
    import pandas as pd

    from lungzarr import evaluate as ev
    from lungzarr.io.storage import CohortStore

    if (lidc_xml is None) == (luna_csv is None):
        raise LungzarrError("give exactly one of --lidc-xml DIR_OR_FILE and --luna-csv FILE")
    store = CohortStore(store_path, mode="r")
    patients = [p for p in store.patients() if store.is_complete(p, "nodules")]
    if not patients:
        raise LungzarrError(f"no patient of {str(store_path)!r} has a nodule table; run `lungzarr run` first")
    by_series = {store.patient_attrs(p).get("series_instance_uid"): p for p in patients}
    truths, scans, unmatched = [], [], []
    if lidc_xml is not None:
        lidc_xml = Path(lidc_xml)
        files = [lidc_xml] if lidc_xml.is_file() else sorted(lidc_xml.rglob("*.xml"))
        xml_for = {}
        for f in files:
            marks = ev.read_lidc_xml(f)
            if marks.series_uid in by_series:
                xml_for[by_series[marks.series_uid]] = marks
        for p in patients:
            if p not in xml_for:
                unmatched.append(p)
                continue
            hu = store.open_patient(p)
            if "sop_instance_uid" not in hu.coords:
                raise LungzarrError(f"patient {p!r} was read from a volume file ({hu.attrs.get('source_file')!r}), "
                                    f"which keeps no SOPInstanceUIDs, and LIDC XML marks nodules by them; "
                                    f"ingest its DICOM folder instead, or score it with --luna-csv")
            geometry = ev.SliceGeometry.from_axes(hu.x.values, hu.y.values, hu.z.values,
                                                  [str(u) for u in hu.sop_instance_uid.values])
            truths.append(ev.consensus_nodules(xml_for[p], geometry, patient=p, min_readers=min_readers,
                                               min_diameter_mm=min_diameter_mm))
            scans.append(p)
    else:
        truth = ev.read_luna_csv(luna_csv)
        truth = truth[truth.patient.isin(by_series)]
        truth = truth.assign(patient=truth.patient.map(by_series))
        truths.append(truth)
        # LUNA16 scores every listed scan: patients with no annotation are scans without nodules.
        scans = patients
    truth = pd.concat(truths, ignore_index=True) if truths else None
    if truth is None or not scans:
        raise LungzarrError(f"no annotation matches a patient of {str(store_path)!r} (by SeriesInstanceUID); "
                            f"check the XML folder / CSV")
    detections = _store_detections(store, threshold=threshold, filtered=filtered)
    detections = detections[detections.patient.isin(scans)]
    result = ev.evaluate_detections(detections, truth, n_scans=len(scans), scans=scans,
                                    n_bootstrap=n_bootstrap, seed=seed)
    files = ev.write_evaluation(result, out_dir, title=f"lungzarr — {Path(store_path).name}")
    return {"result": result, "files": files, "scans": scans, "unmatched": unmatched}
