"""The cohort tables: ``tables/nodules`` and ``tables/patients``, rebuilt from the patient groups."""
from __future__ import annotations

import numpy as np

from lungzarr.algorithms.components import NO_LABEL
from lungzarr.io.store.tablelayout import TABLE_LAYOUT
from lungzarr.pipeline.stages import stage_names

__all__ = ["gather_tables", "patient_nodules", "LUNG_MEASURES", "LUNG3D_MEASURES", "PATIENT_COLUMNS",
           "COHORT_TABLES"]

#: The cohort tables :func:`gather_tables` writes: name -> the dimension of their rows.
COHORT_TABLES = {"nodules": "nodule", "patients": "patient"}

#: Lung measures of the features stage copied into the patient table (docs/algorithms.md §6).
LUNG_MEASURES = ("lvol_0", "lvol_1", "lvol_2", "emphy_0", "emphy_1", "emphy_2", "emphy2_0", "emphy2_1", "emphy2_2")
#: Per-side measures of the lungs3d stage's mask (its stage record; NaN without it): volume (ml), mean HU,
#: emphysema share (HU < -950), and the two lungs' volume.
LUNG3D_MEASURES = ("lung3d_right_ml", "lung3d_left_ml", "lung3d_ml", "lung3d_right_mean_hu", "lung3d_left_mean_hu",
                   "lung3d_right_emphysema", "lung3d_left_emphysema")


#: Columns of the patient table (``tables/patients``, :func:`lungzarr.read_patients`): name -> meaning.
#: ``stage_<name>`` stands for one column per stage of the registry.
PATIENT_COLUMNS: dict[str, str] = {
    "patient": "patient id (the name of its INPUT folder)",
    "stage_<name>": "True when that stage is complete for the patient (one column per stage)",
    "series_instance_uid": "SeriesInstanceUID (0020,000E) of the series used",
    "n_slices": "slices of the native series",
    "slice_spacing_mm": "native slice spacing (mm)",
    "shape_2mm": "shape z x y x x of the 2 x 2 x 2 mm grid",
    "lung_volume_ml": "lung mask volume (ml) on the 2 mm grid; NaN before the features stage",
    "n_nodules_0.5_filtered": "nodules at p > 0.5 passing the DSB filter (select_nodules); -1 before the "
                              "nodules stage",
    "cancer": f"DSB2017 label (1 cancer, 0 none); {NO_LABEL} = no label: not in --labels nor imported with one",
    **{f"lvol_{s}": f"lung voxels (-990 < HU < -400) of segment {s} ({part})"
       for s, part in enumerate(("first half of the predicted slices", "second half", "all"))},
    **{f"emphy_{s}": f"(lvol_{s} - voxels with -950 < HU < -400) / (lvol_{s} + 1)" for s in range(3)},
    **{f"emphy2_{s}": f"(lvol_{s} - voxels with -970 < HU < -400) / (lvol_{s} + 1)" for s in range(3)},
    **{f"lung_centre_{a}_vox": f"lung voxels' centre of gravity along {a}, in voxels of the DSB2017 "
                                  "feature volume (features.lung_measures)"
       for a in "zyx"},
    "lung3d_right_ml": "right lung volume (ml) of the 3-D mask (stage lungs3d); NaN without it",
    "lung3d_left_ml": "left lung volume (ml) of the 3-D mask",
    "lung3d_ml": "both lungs' volume (ml) of the 3-D mask",
    "lung3d_right_mean_hu": "mean HU of the right lung (3-D mask)",
    "lung3d_left_mean_hu": "mean HU of the left lung (3-D mask)",
    "lung3d_right_emphysema": "share of the right lung's voxels below -950 HU (3-D mask)",
    "lung3d_left_emphysema": "share of the left lung's voxels below -950 HU (3-D mask)",
}


def patient_nodules(store, patient: str):
    """One patient's stored nodule table (``patients/<id>/nodules``) as a DataFrame.

    Reads the compact layout (one array, :data:`~lungzarr.algorithms.nodules.NODULE_LAYOUT`) with one
    open and one chunk read; a store written before it (one array per column) through xarray.

    Parameters
    ----------
    store : path, str or CohortStore
        The store: its folder or URL (opened read-only), or a store already open.
    patient : str
        The patient id (``patients/<id>``).

    Returns
    -------
    DataFrame
        One row per candidate nodule, the columns of
        :data:`~lungzarr.algorithms.nodules.NODULE_COLUMNS`.
    """
    from lungzarr.algorithms.nodules import dataset_to_nodules

    if not hasattr(store, "load_patient"):     # a path or URL, as read_nodules takes
        from lungzarr.io.store import CohortStore

        store = CohortStore(store, mode="r")
    ds = store.load_patient(patient, ["table"], subgroup="nodules")
    if "table" not in ds:
        ds = store.open_patient(patient, subgroup="nodules").load()
    return dataset_to_nodules(ds)


def gather_tables(store) -> dict:
    """Rebuild the cohort-wide ``tables/nodules`` and ``tables/patients`` from the patient groups.

    A table whose content did not change (and that reads back whole) is left as it is. Returns the rows
    of each table and ``written``: the tables written.
    """
    import pandas as pd

    from lungzarr.algorithms.nodules import concat_nodule_tables
    from lungzarr.io.store import STAGES_KEY

    nodule_tables, rows = [], []
    for patient in store.patients():
        attrs = store.patient_attrs(patient)
        stages = attrs.get(STAGES_KEY, {})
        if "nodules" in stages:
            try:  # not has_subgroup first: on object storage that is a request per patient per run
                nodule_tables.append(patient_nodules(store, patient))
            except FileNotFoundError:
                pass  # its nodules group is gone (`lungzarr verify` reports it): no rows
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
    written = []
    for name, frame in (("nodules", nodules), ("patients", patients)):
        dim = COHORT_TABLES[name]
        # Writing a table (one array per column) is most of what a run's end costs; a run that did not
        # change it (a segment run leaves the nodule table as it was) leaves it in place.
        content = frame_digest(frame)
        stored = store.table_attrs(name)
        # A table of the older one-array-per-column layout is written again, packed, whatever its content.
        if stored.get(DIGEST_KEY) != content or stored.get("layout") != TABLE_LAYOUT or not _readable(store, name):
            store.write_table(name, frame, dim=dim, attrs={DIGEST_KEY: content})
            written.append(name)
    return {"nodules": len(nodules), "patients": len(patients), "written": written}


def _readable(store, name: str) -> bool:
    """Whether the stored table reads back whole (every chunk decoded and checksummed; a few ms): a damaged
    table is written again by the next run, as when every run rewrote the tables."""
    try:
        store.read_table(name)
    except Exception:  # a checksum, a missing chunk, unreadable metadata: whatever it is, write it anew
        return False
    return True


#: Table attribute: :func:`frame_digest` of the frame the table was written from.
DIGEST_KEY = "lungzarr:content_sha256"


def frame_digest(frame) -> str:
    """SHA-256 of a table's content: column names, dtypes, every value (bit for bit) in row order, and
    the lungzarr version (whose write_table may store the same frame differently)."""
    import hashlib

    from lungzarr._version import __version__

    h = hashlib.sha256(repr((__version__, [(str(c), str(t)) for c, t in frame.dtypes.items()],
                             len(frame))).encode())
    for col in frame.columns:
        values = frame[col].to_numpy()
        # Numbers by their bytes (-0.0 is not 0.0, NaN payloads kept); anything else by repr (None is not "None").
        h.update(np.ascontiguousarray(values).tobytes() if values.dtype.kind in "biufcM"
                 else repr(values.tolist()).encode())
    return h.hexdigest()
