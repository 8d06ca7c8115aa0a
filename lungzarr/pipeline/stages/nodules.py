"""Stage ``nodules``: the per-nodule table of a patient (every threshold, millimetres) → subgroup ``nodules``;
the NGFF label image ``labels/nodules``."""
from __future__ import annotations

from lungzarr.pipeline.stage import Stage

__all__ = ["NODULES"]


#: NGFF colours of the nodule labels (RGBA, 0-255): candidates passing the original's filter in red,
#: the others in orange.
NODULE_LABEL_RGBA = {True: (255, 40, 40, 255), False: (255, 170, 0, 255)}
#: Columns of the nodule table given as each nodule label's NGFF properties.
NODULE_LABEL_PROPERTIES = ("prob_max", "diameter_mm", "voxels", "z_mm", "y_mm", "x_mm", "passes_dsb_filter", "lung")


def _write_nodule_labels(store, patient, prob, table, *, chunk_slices):
    """The NGFF label image ``labels/nodules``: every candidate at p > 0.5 labelled with its table ``label``.

    The label rule is :func:`~lungzarr.algorithms.nodules.nodule_label_image`
    (as the NIfTI export's); each label's NGFF properties are its nodule
    table row (``label``, ``threshold`` and :data:`NODULE_LABEL_PROPERTIES`).
    """
    import numpy as np

    from lungzarr.algorithms.nodules import REPORTED_THRESHOLD, nodule_label_image, select_nodules

    labels = nodule_label_image(prob, table, threshold=REPORTED_THRESHOLD)
    rows = select_nodules(table, threshold=REPORTED_THRESHOLD, dsb_filter=False)
    rows = rows.sort_values("label") if len(rows) else rows
    properties = [{"label-value": int(r["label"]), "nodule_label": int(r["label"]),
                   "threshold": float(r["threshold"]), **{c: r[c] for c in NODULE_LABEL_PROPERTIES}}
                  for _, r in rows.iterrows()]
    colors = [{"label-value": p["label-value"], "rgba": list(NODULE_LABEL_RGBA[bool(p["passes_dsb_filter"])])}
              for p in properties]
    # uint32: the label values are >= 0, and viewers' segmentation layers (neuroglancer) want unsigned labels.
    store.write_labels(patient, "nodules", labels.astype(np.uint32), colors=colors, properties=properties,
                       chunk_slices=chunk_slices)


def _nodule_task(store_path, patient, chunk_slices=16):
    """Compute one patient's nodule table on a worker and write it to the patient's ``nodules`` group.

    One task per patient: components are labelled on the whole 2 mm volume, never cut at chunk borders.
    """
    from lungzarr.algorithms.features import unsegmented
    from lungzarr.algorithms.nodules import find_nodules, nodules_to_dataset, select_nodules
    from lungzarr.io.store import CohortStore, grid_from_attrs

    store = CohortStore(store_path, mode="r+")  # made by the run's client: not looked for
    # One open of the group, the four arrays read whole: no xarray backend reading every coordinate and
    # every variable's metadata, no dask graph (issue 15's profile: ~0.3 CPU-s per realistic patient).
    ds = store.load_patient(patient, ["nodule_prob", "hu_2mm", "lungs", "lung_labels"])
    if "hu_2mm" not in ds:  # a legacy import: the segmented volume stands in (features.unsegmented)
        ds = store.load_patient(patient, ["nodule_prob", "segmented", "lungs", "lung_labels"])
    # The 3-D mask is used when the patient has it (stage lungs3d runs before nodules in `lungzarr run`);
    # it is not required, so legacy imports (no hu_2mm, no ingest) still get their table.
    lung_labels = ds.lung_labels.values if "lung_labels" in ds else None
    table = find_nodules(ds.nodule_prob.values, unsegmented(ds).values, grid=grid_from_attrs(ds.attrs),
                         lungs=ds.lungs.values, lung_labels=lung_labels, patient=patient)
    store.write_subgroup(patient, "nodules", nodules_to_dataset(table))
    _write_nodule_labels(store, patient, ds.nodule_prob.values, table, chunk_slices=chunk_slices)
    return {"n_candidates": int(len(table)), "n_nodules_0.5_filtered": int(len(select_nodules(table))),
            "lung_labels": lung_labels is not None}


def _prepare(store, patient, _, options):
    import dask

    return store.prepare_task(patient, "nodules",
                              dask.delayed(_nodule_task, pure=False)(str(store.path), patient, options.chunk_slices),
                              record={"thresholds": "DSB2017 (0.5 ... 0.9999999)"})


NODULES = Stage(
    name="nodules",
    requires=("detect",),
    prepare=_prepare,
    summary="one row per candidate nodule and threshold, centres in patient mm → subgroup nodules "
            "(and NGFF labels/nodules)",
    subgroups=("nodules", "labels/nodules"),
)
