"""Stage ``nodules``: the per-nodule table of a patient (every threshold, millimetres) → subgroup ``nodules``."""
from __future__ import annotations

from lungzarr.pipeline.stage import Stage

__all__ = ["NODULES"]


def _nodule_task(store_path, patient):
    """Compute one patient's nodule table on a worker and write it to the patient's ``nodules`` group.

    One task per patient: components are labelled on the whole 2 mm volume, never cut at chunk borders.
    """
    from lungzarr.algorithms.features import unsegmented
    from lungzarr.algorithms.nodules import find_nodules, nodules_to_dataset, select_nodules
    from lungzarr.io.storage import CohortStore, grid_from_attrs

    store = CohortStore(store_path)
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
    return {"n_candidates": int(len(table)), "n_nodules_0.5_filtered": int(len(select_nodules(table))),
            "lung_labels": lung_labels is not None}


def _prepare(store, patient, _, options):
    import dask

    return store.prepare_task(patient, "nodules",
                              dask.delayed(_nodule_task, pure=False)(str(store.path), patient),
                              record={"thresholds": "DSB2017 (0.5 ... 0.9999999)"})


NODULES = Stage(
    name="nodules",
    requires=("detect",),
    prepare=_prepare,
    summary="one row per candidate nodule and threshold, centres in patient mm → subgroup nodules",
    subgroups=("nodules",),
)
