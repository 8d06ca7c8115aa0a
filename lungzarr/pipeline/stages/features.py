"""Stage ``features``: lung measures and the DSB2017 feature row of a patient → subgroup ``dsb2017``."""
from __future__ import annotations

import numpy as np

from lungzarr.algorithms.components import NO_LABEL
from lungzarr.pipeline.stage import Stage

__all__ = ["FEATURES", "cancer_label"]


def cancer_label(patient: str, *, labels: dict | None, attrs: dict) -> int:
    """The DSB2017 ``cancer`` of a patient: the labels CSV's wins, else the label it was imported with
    (``import-legacy`` keeps the old ``stage1_labels.csv`` one), else :data:`NO_LABEL` (-777)."""
    imported = int(attrs.get("cancer", NO_LABEL))
    return imported if labels is None else int(labels.get(patient, imported))


def _features_task(store_path, patient, cancer):
    """Patient-level measures on a worker: lung measures and the DSB2017 row, as a child group."""
    import xarray as xr

    from lungzarr.algorithms.features import dsb2017_arrays, dsb2017_features, lung_measures
    from lungzarr.io.store import CohortStore, grid_from_attrs
    from lungzarr.model.geometry import predicted_slices

    store = CohortStore(store_path, mode="r+")  # made by the run's client: not looked for
    ds = store.load_patient(patient, ["nodule_prob", "hu_2mm", "segmented", "lungs"])
    images, segmented_norm, pmav = dsb2017_arrays(ds, patient=patient)
    row = dsb2017_features(images, segmented_norm, pmav, cancer=cancer, fmt="keras8_0313", patient=patient)
    # row.dtypes, not row[c] per column: 2525 column lookups cost a quarter of this task.
    integer = [str(c) for c, dtype in row.dtypes.items() if np.issubdtype(dtype, np.integer)]
    out = xr.Dataset({"value": (("feature",), row.iloc[0].to_numpy(dtype=np.float64))},
                     coords={"feature": np.array(list(row.columns), dtype=object)},
                     attrs={"format": "keras8_0313", "integer_features": integer, "cancer": int(cancer)})
    store.write_subgroup(patient, "dsb2017", out)
    measures = lung_measures(segmented_norm[predicted_slices(segmented_norm.shape[0])])
    centre = measures.pop("centre")
    step = np.abs(grid_from_attrs(ds.attrs).step)
    lungs_ml = float(ds.lungs.values.sum()) * float(np.prod(step)) / 1000.0
    return {"lung_volume_ml": lungs_ml, "cancer": int(cancer), **measures,
            "lung_centre_vox": [float(c) for c in centre]}


def _prepare(store, patient, _, options):
    import dask

    cancer = cancer_label(patient, labels=options.labels, attrs=store.patient_attrs(patient))
    return store.prepare_task(patient, "features",
                              dask.delayed(_features_task, pure=False)(str(store.path), patient, cancer),
                              # The DSB2017 row is the original's only on the fixed crop's map (exports.detect_crop).
                              record={"format": "keras8_0313",
                                      "detect_crop": store.stages(patient).get("detect", {}).get("crop") or "fixed"})


FEATURES = Stage(
    name="features",
    requires=("nodules",),
    prepare=_prepare,
    summary="lung volume, emphysema and the DSB2017 feature row (2525 columns) → subgroup dsb2017",
    subgroups=("dsb2017",),
)
