"""Out of a store: the original DSB2017 per-patient table, the nodule table, LUNA16 candidates, NIfTI masks,
DICOM SEG."""
from __future__ import annotations

from pathlib import Path

from lungzarr.errors import LungzarrError
from lungzarr.pipeline.stages.features import cancer_label

__all__ = ["export_dsb2017", "export_nodules", "export_luna16", "export_nifti", "export_dicom_seg"]


def _patients_done(store, store_path, patients, stages, *, has: str, command: str) -> list[str]:
    """The store's patients (of ``patients``, if given) that completed every stage of ``stages``.

    None is a LungzarrError: "no patient of STORE has {has}; run `lungzarr run` or `lungzarr {command}` first".
    """
    wanted = None if patients is None else set(patients)
    ids = [p for p in store.patients() if all(store.is_complete(p, stage) for stage in stages)
           and (wanted is None or p in wanted)]
    if not ids:
        raise LungzarrError(f"no patient of {str(store_path)!r} has {has}; run `lungzarr run` or "
                            f"`lungzarr {command}` first")
    return ids


def detect_crop(store, patient: str) -> str:
    """What ``patient``'s UNet predicted: ``"fixed"`` (the whole detection crop) or ``"lungs"`` (the lung box).

    From the detect stage's record (``crop``, as asked); a record without it (older stores, imported
    legacy maps) is the fixed crop, the only one there was.
    """
    return str(store.stages(patient).get("detect", {}).get("crop") or "fixed")


def _check_whole_crop(store, ids) -> None:
    """Refuse patients detected inside the lung box: their DSB2017 row would not be the original's.

    The original's features take every p >= 0.5 component of the whole detection crop, inside the lungs
    or not (``withinsegonly=False``, docs/algorithms.md §6); under ``--crop lungs`` the map is exact
    inside the lungs only and 0 beyond the box.
    """
    boxed = [p for p in ids if detect_crop(store, p) == "lungs"]
    if boxed:
        more = " ..." if len(boxed) > 5 else ""
        shown = " ".join(f"--patients {p}" for p in boxed[:5]) + more
        raise LungzarrError(
            f"{len(boxed)} patient(s) were detected inside the lung box (crop 'lungs', the default of `lungzarr run` "
            f"and `lungzarr.pipeline.run`): {boxed[:5]!r}{more}. The DSB2017 features are the original's only on "
            f"the whole detection crop: detect them again with it, `lungzarr detect {store.path} --crop fixed "
            f"--overwrite {shown}` (a cohort not yet run: `lungzarr run INPUT STORE --crop fixed`, or "
            f"`lungzarr.pipeline.run(..., crop=\"fixed\")`), or leave them out with --patients")


def _dsb_row_task(store_path, patient, fmt, cancer):
    from lungzarr.algorithms.features import dsb2017_row
    from lungzarr.io.store import CohortStore

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
    from lungzarr.io.store import CohortStore

    if fmt not in FORMATS:
        raise LungzarrError(f"--format must be one of {list(FORMATS)!r}, got {fmt!r}")
    store = CohortStore(store_path, mode="r")
    label_map = read_legacy_labels(labels) if labels is not None else None
    ids = _patients_done(store, store_path, patients, ("detect", "segment"), has="completed detection",
                         command="detect")
    _check_whole_crop(store, ids)
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
    from lungzarr.io.store import read_nodules

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
    from lungzarr.io.store import CohortStore, read_nodules

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
    ``label`` (:func:`lungzarr.algorithms.nodules.nodule_label_image`, as the store's NGFF ``labels/nodules``),
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

    from lungzarr.io.store import CohortStore, grid_from_attrs
    from lungzarr.io.volumes import write_nifti

    store = CohortStore(store_path, mode="r")
    ids = _patients_done(store, store_path, patients, ("segment",), has="a lung mask", command="segment")
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
            labels, _ = _patient_nodule_labels(store, p, threshold, ds=ds)
            nodules_path = out_dir / f"{p}_nodules.nii.gz"
            write_nifti(labels, grid, nodules_path, intent="label")
        written[p] = {"lungs": str(lungs_path), "nodules": None if nodules_path is None else str(nodules_path)}
    return written


def _patient_nodule_labels(store, patient: str, threshold: float, *, ds=None):
    """One patient's nodule label image (2 mm grid) and its nodule-table rows at ``threshold``.

    The label rule is :func:`lungzarr.algorithms.nodules.nodule_label_image` (the one every label
    image lungzarr writes uses: NIfTI, DICOM SEG, the NGFF ``labels/nodules``), checked against
    the stored table.

    Returns
    -------
    labels : ndarray of int32, (z2, y2, x2)
    rows : pandas.DataFrame
        The patient's nodule rows at ``threshold``, sorted by ``label``.

    Raises
    ------
    LungzarrError
        When the table at this threshold is not these components (a table from
        another ``nodule_prob`` would give labels that name other nodules).
    """
    import numpy as np

    from lungzarr.algorithms.nodules import nodule_label_image
    from lungzarr.pipeline.tables import patient_nodules

    ds = store.open_patient(patient) if ds is None else ds
    table = patient_nodules(store, patient)
    try:
        labels = nodule_label_image(ds.nodule_prob.values, table, threshold=threshold)
    except ValueError as exc:
        raise LungzarrError(f"patient {patient!r}: {exc}; rerun `lungzarr nodules {str(store.path)}`") from None
    rows = table[np.isclose(table.threshold.to_numpy(float), float(threshold), rtol=0, atol=1e-12)]
    return labels, rows.sort_values("label")


#: Display colours of the SEG's segments (RGB): the lung in light blue, the nodules in yellow.
_LUNG_RGB = (128, 174, 255)
_NODULE_RGB = (255, 221, 0)
#: Name of the export summary written beside the SEG files.
DICOM_SEG_SUMMARY = "dicom_seg_summary.json"


def _dicom_seg_patient(store, patient, out_dir, *, threshold, filtered):
    """Write one patient's SEG; return its summary entry. Raises PatientError for what the user must fix."""
    import numpy as np

    from lungzarr._version import __version__
    from lungzarr.algorithms.resample import nearest_on_axes
    from lungzarr.io import dicom_seg

    ds = store.open_patient(patient)
    attrs = dict(ds.attrs)
    uids = [str(u) for u in ds.sop_instance_uid.values]
    z = ds.z.values
    src_axes, dst_axes = (ds.z2.values, ds.y2.values, ds.x2.values), (z, ds.y.values, ds.x.values)
    recorded = ds.dicom_file.values if "dicom_file" in ds.coords else None
    files, found = dicom_seg.locate_source_files(recorded, attrs.get("source_folder"), uids, patient=patient)
    images, notes = dicom_seg.read_source_images(files, patient=patient, sop_uids=uids,
                                                 series_uid=attrs["series_instance_uid"], z_positions=z,
                                                 folder=attrs.get("source_folder"))
    notes = ([found] if found else []) + notes
    stages = store.stages(patient)
    # What the SEG shows: same source, same stage results, same selection -> same UIDs.
    key = (attrs["series_instance_uid"], patient, stages.get("segment", {}).get("id"),
           stages.get("nodules", {}).get("id"), float(threshold), bool(filtered))
    lungs = nearest_on_axes(np.asarray(ds.lungs.values, dtype=bool), src_axes, dst_axes)
    specs = [dicom_seg.SegmentSpec(label="Lung", kind="lung", tracking_id="lungzarr lungs (segment stage)",
                                   tracking_uid=dicom_seg.deterministic_uid("tracking-lungs", *key),
                                   algorithm="lungzarr seperate_lungs_cv2 (DSB2017 lung mask)", rgb=_LUNG_RGB)]
    segments = [{"number": 1, "label": "Lung", "kind": "lung", "nodule_label": None,
                 "voxels": int(np.count_nonzero(lungs))}]
    labels, kept = None, []
    if store.is_complete(patient, "nodules"):
        labels_2mm, rows = _patient_nodule_labels(store, patient, threshold, ds=ds)
        if filtered:
            rows = rows[rows.passes_dsb_filter.astype(bool)]
        # The smallest integer type that holds the labels: the native label image is one value per voxel.
        dtype = np.uint16 if labels_2mm.max(initial=0) < 2 ** 16 else np.int32
        labels = nearest_on_axes(labels_2mm.astype(dtype), src_axes, dst_axes)
        counts = np.bincount(labels.ravel(), minlength=int(labels_2mm.max(initial=0)) + 1)
        for row in rows.itertuples():
            if counts[int(row.label)] == 0:
                notes.append(f"nodule {int(row.label)} ({int(row.voxels)} voxel(s) at 2 mm) falls between the "
                             f"native slices: no segment")
                continue
            name = f"Nodule {int(row.label)}"
            kept.append(int(row.label))
            specs.append(dicom_seg.SegmentSpec(
                label=name, kind="nodule", tracking_id=f"lungzarr nodule {int(row.label)} at threshold {threshold!r}",
                tracking_uid=dicom_seg.deterministic_uid("tracking-nodule", *key, int(row.label)),
                algorithm="lungzarr DSB2017 d8 3-D UNet", rgb=_NODULE_RGB))
            segments.append({"number": len(specs), "label": name, "kind": "nodule",
                             "nodule_label": int(row.label), "voxels": int(counts[int(row.label)]),
                             "prob_max": float(row.prob_max),
                             "centre_mm": [float(row.z_mm), float(row.y_mm), float(row.x_mm)]})
    else:
        notes.append("the nodules stage is not complete: the lung segment only")
    # (slices, rows, columns, segments), one byte a voxel and segment, filled in place: the stack highdicom
    # packs to one bit per pixel and frame.
    masks = np.zeros(lungs.shape + (len(specs),), dtype=bool)
    masks[..., 0] = lungs
    del lungs
    if kept:
        # Nodules are sparse: set their voxels only (a pass of `labels == label` per nodule costs seconds).
        segment_of = np.zeros(int(labels.max()) + 1, dtype=np.intp)
        segment_of[kept] = np.arange(1, len(kept) + 1)
        voxels = np.flatnonzero(labels)
        number = segment_of[labels.ravel()[voxels]]
        masks.reshape(-1, len(specs))[voxels[number > 0], number[number > 0]] = True
    del labels
    path = dicom_seg.write_segmentation(
        images, masks, specs, Path(out_dir) / f"{patient}_seg.dcm",
        series_uid=dicom_seg.deterministic_uid("seg-series", *key),
        sop_uid=dicom_seg.deterministic_uid("seg-instance", *key), version=__version__)
    return {"file": str(path), "source_series_instance_uid": attrs["series_instance_uid"],
            "n_source_images": len(images), "segments": segments, "notes": notes}


def export_dicom_seg(store_path, out_dir, *, threshold: float = 0.5, filtered: bool = False,
                     patients=None) -> dict:
    """Write one DICOM Segmentation (SEG) per DICOM patient: the lung mask and one segment per nodule.

    ``<patient>_seg.dcm`` is a BINARY SEG (highdicom; ``pip install 'lungzarr[seg]'``)
    on the source images' pixel grid, referencing the source series: patient,
    study, series and frame of reference come from the source files and each
    frame names its source image's SOPInstanceUID and position, so a PACS or
    OHIF files it with the CT and overlays it.

    Segment 1 is ``Lung`` (the ``lungs`` mask); then one segment ``Nodule <label>``
    per row of the nodule table at ``threshold`` (only rows passing the DSB
    filter with ``filtered``), in label order: the components of
    :func:`lungzarr.algorithms.nodules.nodule_label_image`, the NIfTI export's label rule. One segment per
    nodule, not one ``nodule`` segment: a viewer lists each segment with its
    own visibility and colour, so a reader steps through the candidates one
    by one, and ``TrackingID`` names the table row. Nodules and lung overlap,
    hence BINARY (not LABELMAP).

    The 2 mm masks are put on the native grid by nearest neighbour in mm
    (:func:`lungzarr.algorithms.resample.nearest_on_axes`). A nodule that
    falls between native slices gets no segment (noted in the summary).

    The source files are the ones recorded at ingest (the ``dicom_file``
    coordinate) or, where they are not all there (files renamed in place,
    stores ingested before it was recorded), the files of ``source_folder``
    with the stored SOPInstanceUIDs; a moved or changed file fails the patient
    with its name and the fix. Patients not ingested from
    DICOM (NIfTI, MetaImage) are skipped with the reason. ``dicom_seg_summary.json``
    in ``out_dir`` records every patient's outcome.

    Memory: the mask stack is one byte per native voxel and segment (a 300 x
    512 x 512 scan with 10 nodules: 0.9 GB); ``filtered`` keeps it small.

    Parameters
    ----------
    store_path, out_dir : path
    threshold : float
        One of the nodule table's thresholds.
    filtered : bool
        Only nodules passing the original's filter.
    patients : list of str, optional

    Returns
    -------
    dict
        ``{"written": {patient: entry}, "skipped": {patient: reason}, "failed": {patient: {"reason", "file"}},
        "threshold", "filtered", "summary"}``.

    Raises
    ------
    LungzarrError
        Before any patient: highdicom missing, no patient with a lung mask, or a threshold the nodule
        table does not have.
    """
    import json

    import numpy as np

    from lungzarr.errors import PatientError
    from lungzarr.io import dicom_seg
    from lungzarr.io.store import CohortStore, read_nodules

    dicom_seg.require_highdicom()
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise LungzarrError(f"-o {str(out_dir)!r} is a file; --format dicom-seg writes a folder of .dcm files: "
                            f"name a folder")
    store = CohortStore(store_path, mode="r")
    ids = _patients_done(store, store_path, patients, ("segment",), has="a lung mask", command="segment")
    if any(store.is_complete(p, "nodules") for p in ids):
        table = read_nodules(store_path)
        known = sorted(set(table.threshold.astype(float)))
        if known and not np.isclose(known, float(threshold), rtol=0, atol=1e-12).any():
            raise LungzarrError(f"--threshold {threshold!r} is not a threshold of the nodule table: "
                                f"use one of {known!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"written": {}, "skipped": {}, "failed": {}, "threshold": float(threshold), "filtered": bool(filtered)}
    for p in ids:
        ds = store.open_patient(p)
        if "sop_instance_uid" not in ds.coords:
            fmt = ds.attrs.get("source_format", "a volume file")
            result["skipped"][p] = (f"not ingested from DICOM ({fmt} {ds.attrs.get('source_file', '')!s}): a DICOM "
                                    f"SEG references source DICOM images; use --format nifti")
            continue
        try:
            result["written"][p] = _dicom_seg_patient(store, p, out_dir, threshold=threshold, filtered=filtered)
        except PatientError as exc:
            result["failed"][p] = {"reason": exc.reason, "file": exc.file}
    result["summary"] = str(out_dir / DICOM_SEG_SUMMARY)
    (out_dir / DICOM_SEG_SUMMARY).write_text(json.dumps(result, indent=2))
    return result
