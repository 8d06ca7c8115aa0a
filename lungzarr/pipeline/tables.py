"""The cohort tables: ``tables/nodules`` and ``tables/patients``, rebuilt from the patient groups."""
from __future__ import annotations

import numpy as np

from lungzarr.algorithms.components import NO_LABEL
from lungzarr.pipeline.stages import stage_names

__all__ = ["gather_tables", "LUNG_MEASURES", "LUNG3D_MEASURES"]

#: Lung measures of the features stage copied into the patient table (docs/algorithms.md §6).
LUNG_MEASURES = ("lvol_0", "lvol_1", "lvol_2", "emphy_0", "emphy_1", "emphy_2", "emphy2_0", "emphy2_1", "emphy2_2")
#: Per-side measures of the lungs3d stage's mask (its stage record; NaN without it): volume (ml), mean HU,
#: emphysema share (HU < -950), and the two lungs' volume.
LUNG3D_MEASURES = ("lung3d_right_ml", "lung3d_left_ml", "lung3d_ml", "lung3d_right_mean_hu", "lung3d_left_mean_hu",
                   "lung3d_right_emphysema", "lung3d_left_emphysema")


def gather_tables(store) -> dict:
    """Rebuild the cohort-wide ``tables/nodules`` and ``tables/patients`` from the patient groups."""
    import pandas as pd

    from lungzarr.algorithms.nodules import concat_nodule_tables, dataset_to_nodules
    from lungzarr.io.storage import STAGES_KEY

    nodule_tables, rows = [], []
    for patient in store.patients():
        attrs = store.patient_attrs(patient)
        stages = attrs.get(STAGES_KEY, {})
        if "nodules" in stages and store.has_subgroup(patient, "nodules"):
            nodule_tables.append(dataset_to_nodules(store.open_patient(patient, subgroup="nodules").load()))
        feat = stages.get("features", {})
        grid2 = attrs.get("grid_2mm", {})
        rows.append({
            "patient": patient,
            **{f"stage_{s}": s in stages for s in stage_names()},
            "series_instance_uid": attrs.get("series_instance_uid", ""),
            "n_slices": int(attrs.get("grid_native", {}).get("shape", [0])[0]),
            "slice_spacing_mm": float((attrs.get("spacing_mm") or [np.nan])[0]),
            "shape_2mm": "x".join(str(n) for n in grid2.get("shape", [])),
            "lung_volume_ml": float(feat.get("lung_volume_ml", np.nan)),
            "n_nodules_0.5_filtered": int(stages.get("nodules", {}).get("n_nodules_0.5_filtered", -1)),
            "cancer": int(feat.get("cancer", NO_LABEL)),
            **{k: float(feat.get(k, np.nan)) for k in LUNG_MEASURES},
            **{k: float(stages.get("lungs3d", {}).get(k, np.nan)) for k in LUNG3D_MEASURES},
            **{f"lung_centre_{a}_vox": float((feat.get("lung_centre_vox") or [np.nan] * 3)[i])
               for i, a in enumerate("zyx")},
        })
    nodules = concat_nodule_tables(nodule_tables)
    patients = pd.DataFrame(rows)
    store.write_table("nodules", nodules, dim="nodule")
    store.write_table("patients", patients, dim="patient")
    return {"nodules": len(nodules), "patients": len(patients)}
