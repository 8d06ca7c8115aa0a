"""Scoring a store's nodules against reader annotations (the glue between the store and :mod:`lungzarr.evaluate`)."""
from __future__ import annotations

from pathlib import Path

from lungzarr.errors import LungzarrError

__all__ = ["evaluate_store", "evaluate_candidates"]


def _store_detections(store, *, threshold: float, filtered: bool):
    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.io.store import read_nodules

    nodules = read_nodules(store.path)
    if not len(nodules):
        return nodules.assign(prob=[])
    rows = select_nodules(nodules, threshold=threshold, dsb_filter=filtered)
    return rows.assign(prob=rows.prob_max)


def evaluate_store(store_path, out_dir, *, lidc_xml=None, luna_csv=None, luna_excluded=None,
                   threshold: float = 0.5, filtered: bool = False, min_readers: int = 3,
                   min_diameter_mm: float = 3.0, n_bootstrap: int = 1000, seed: int = 0,
                   max_marks_per_scan: int | None = 100, cpm_convention: str = "exact") -> dict:
    """Score the store's nodules against reader annotations (LUNA16 rules).

    Parameters
    ----------
    store_path, out_dir : path
    lidc_xml : path, optional
        An LIDC-IDRI XML file or a folder searched for them; matched to
        patients by SeriesInstanceUID.
    luna_csv : path, optional
        A LUNA16 ``annotations.csv``; ``seriesuid`` matched likewise.
    luna_excluded : path, optional
        LUNA16's ``annotations_excluded.csv`` (with ``luna_csv`` only): its
        findings are ignored, so detections on them are not false positives.
    threshold : float
        The nodule table's threshold whose components are the detections
        (scored by their largest probability).
    filtered : bool
        Keep only detections passing the original's filter.
    max_marks_per_scan : int or None
        LUNA16's cap of marks per scan (100), by the official rule
        (:func:`lungzarr.evaluate.cap_marks`); None: no cap.
    cpm_convention : {"exact", "grid"}
        Which CPM is ``cpm`` (both are written; :func:`lungzarr.evaluate.cpm_score`).

    Returns
    -------
    dict
        ``result`` (EvaluationResult), ``files`` written, ``scans`` evaluated
        and ``unmatched`` patients without annotations.
    """
    import pandas as pd

    from lungzarr import evaluate as ev
    from lungzarr.io.store import CohortStore

    if (lidc_xml is None) == (luna_csv is None):
        raise LungzarrError("give exactly one of --lidc-xml DIR_OR_FILE and --luna-csv FILE")
    if luna_excluded is not None and luna_csv is None:
        raise LungzarrError(f"--luna-excluded {str(luna_excluded)!r} needs --luna-csv FILE (LUNA16's annotations.csv)")
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
        truth = ev.read_luna_annotations(luna_csv, luna_excluded)
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
                                    n_bootstrap=n_bootstrap, seed=seed, max_marks_per_scan=max_marks_per_scan,
                                    cpm_convention=cpm_convention)
    files = ev.write_evaluation(result, out_dir, title=f"lungzarr — {Path(store_path).name}")
    return {"result": result, "files": files, "scans": scans, "unmatched": unmatched}


def evaluate_candidates(candidates, out_dir, *, luna_csv, luna_excluded=None, seriesuids=None,
                        n_bootstrap: int = 1000, seed: int = 0, max_marks_per_scan: int | None = 100,
                        cpm_convention: str = "exact") -> dict:
    """Score a LUNA16-format candidates CSV (any detector's) without a store, as the official script does.

    Parameters
    ----------
    candidates : path
        ``seriesuid, coordX, coordY, coordZ, probability`` (world mm), e.g.
        ``lungzarr export STORE --format luna16``.
    out_dir : path
        Where ``results.json``, the CSVs and ``froc.png`` go.
    luna_csv : path
        LUNA16's ``annotations.csv`` (the targets).
    luna_excluded : path, optional
        LUNA16's ``annotations_excluded.csv`` (ignored findings).
    seriesuids : path, optional
        LUNA16's ``seriesuids.csv``: the scans evaluated. Candidates and
        annotations of other series are left out, as the official script
        does. Without it the scans are the series named in the candidates
        and the annotation files (a scan with neither is then not counted:
        give the file to average the false positives over every scan).
    max_marks_per_scan : int or None
        LUNA16's 100 by the official rule; None: no cap.
    cpm_convention : {"exact", "grid"}

    Returns
    -------
    dict
        ``result``, ``files``, ``scans``, ``scans_from`` (``"seriesuids"`` or
        ``"candidates+annotations"``) and ``dropped_candidates`` (rows of
        series not evaluated).
    """
    from lungzarr import evaluate as ev

    try:
        detections = ev.read_luna_candidates(candidates)
        truth = ev.read_luna_annotations(luna_csv, luna_excluded)
        listed = ev.read_seriesuids(seriesuids) if seriesuids is not None else None
    except ValueError as exc:
        raise LungzarrError(str(exc)) from None
    if listed is None:
        scans = list(dict.fromkeys(detections.patient.tolist() + truth.patient.tolist()))
        scans_from = "candidates+annotations"
    else:
        scans, scans_from = listed, "seriesuids"
    if not scans:
        raise LungzarrError(f"{str(candidates)!r} and {str(luna_csv)!r} name no series: nothing to evaluate")
    keep = set(scans)
    dropped = int((~detections.patient.isin(keep)).sum())
    detections = detections[detections.patient.isin(keep)]
    truth = truth[truth.patient.isin(keep)]
    result = ev.evaluate_detections(detections, truth, n_scans=len(scans), scans=scans, n_bootstrap=n_bootstrap,
                                    seed=seed, max_marks_per_scan=max_marks_per_scan, cpm_convention=cpm_convention)
    result.summary["settings"].update(candidates=str(candidates), luna_csv=str(luna_csv),
                                      luna_excluded=None if luna_excluded is None else str(luna_excluded),
                                      seriesuids=None if seriesuids is None else str(seriesuids),
                                      scans_from=scans_from, dropped_candidates=dropped)
    files = ev.write_evaluation(result, out_dir, title=f"lungzarr — {Path(candidates).name}")
    return {"result": result, "files": files, "scans": scans, "scans_from": scans_from,
            "dropped_candidates": dropped}
