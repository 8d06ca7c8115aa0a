"""QC pictures per patient and a cohort report (HTML with PNGs)."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from lungzarr.errors import LungzarrError

__all__ = ["qc_patient", "write_report"]


def _nodule_markers(store, patient):
    """The patient's reported nodules (:func:`~lungzarr.algorithms.nodules.select_nodules`) as QC markers
    (voxel indices), or None."""
    if not store.has_subgroup(patient, "nodules"):
        return None
    from lungzarr.algorithms.nodules import dataset_to_nodules, select_nodules

    table = select_nodules(dataset_to_nodules(store.open_patient(patient, subgroup="nodules").load()))
    return table.assign(z_index=table.z_vox, y_index=table.y_vox, x_index=table.x_vox)


def qc_patient(store_path, patient: str, output) -> Path:
    """Axial, coronal and sagittal mid-planes of a patient with the lung outline and nodules, as PNG."""
    from lungzarr.io.storage import CohortStore, grid_from_attrs
    from lungzarr.reports.qc import qc_figure

    store = CohortStore(store_path, mode="r")
    known = store.patients()
    if patient not in known:
        shown = ", ".join(known[:10]) + (f", … ({len(known)} in all)" if len(known) > 10 else "")
        raise LungzarrError(f"no patient {patient!r} in {str(store_path)!r}; patients: {shown or 'none yet'}")
    if not store.is_complete(patient, "segment"):
        raise LungzarrError(f"patient {patient!r} has no lung mask yet; run `lungzarr segment {store_path}` first")
    ds = store.open_patient(patient)
    markers = _nodule_markers(store, patient)
    centre = None
    if markers is not None and len(markers):
        top = markers.sort_values("diameter_mm", ascending=False).iloc[0]
        centre = tuple(int(round(v)) for v in (top.z_vox, top.y_vox, top.x_vox))
    step = np.abs(grid_from_attrs(ds.attrs).step)
    hu = ds.hu_2mm if "hu_2mm" in ds else ds.segmented
    return qc_figure(hu.data, ds.lungs.data, path=output, nodules=markers, spacing=tuple(step),
                     title=patient, centre=centre)


def _cohort_plots(patients, nodules, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lungzarr.algorithms.nodules import select_nodules

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    kept = select_nodules(nodules)
    counts = (kept.groupby("patient").size().reindex(patients.patient, fill_value=0).to_numpy()
              if len(patients) else np.zeros(0, dtype=int))
    axes[0].hist(counts, bins=np.arange(0, max(5, int(counts.max(initial=0)) + 2)) - 0.5, color="tab:blue")
    axes[0].set_xlabel("nodules per patient (p > 0.5, DSB filter)")
    axes[0].set_ylabel("patients")
    volumes = patients.lung_volume_ml.dropna() if "lung_volume_ml" in patients else []
    axes[1].hist(np.asarray(volumes), bins=20, color="tab:green")
    axes[1].set_xlabel("lung volume (ml)")
    axes[1].set_ylabel("patients")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(store_path, output) -> Path:
    """A cohort QC report: ``output`` (.html) plus a ``<name>_files/`` folder of PNGs.

    Per patient: mid-plane views with lung outline and nodule markers, and the
    patient's row; for the cohort: nodule-count and lung-volume distributions
    and the failures table.
    """
    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.io.storage import CohortStore, read_failures, read_nodules, read_patients

    output = Path(output)
    files = output.with_name(output.stem + "_files")
    files.mkdir(parents=True, exist_ok=True)
    store = CohortStore(store_path, mode="r")
    patients = read_patients(store_path)
    nodules = read_nodules(store_path)
    failures = read_failures(store_path)
    cohort_png = _cohort_plots(patients, nodules, files / "cohort.png")
    parts = [f"<h1>lungzarr report — {html.escape(str(store_path))}</h1>",
             f"<p>{len(store.patients())} patient(s), {len(nodules)} candidate rows, "
             f"{len(failures)} failure(s).</p>",
             f'<img src="{files.name}/{cohort_png.name}" alt="cohort distributions">']
    if len(failures):
        parts.append("<h2>Failures</h2>" + failures.to_html(index=False))
    parts.append("<h2>Patients</h2>")
    for patient in store.patients():
        parts.append(f"<h3>{html.escape(patient)}</h3>")
        if store.is_complete(patient, "segment"):
            png = qc_patient(store_path, patient, files / f"{patient}.png")
            parts.append(f'<img src="{files.name}/{png.name}" alt="{html.escape(patient)} QC" width="900">')
        if len(nodules):
            mine = select_nodules(nodules[nodules.patient == patient], dsb_filter=False)
            cols = ["label", "z_mm", "y_mm", "x_mm", "diameter_mm", "prob_max", "hu_mean", "lung_half",
                    "passes_dsb_filter"]
            parts.append(mine[cols].round(2).to_html(index=False) if len(mine) else "<p>no candidate at p &gt; 0.5</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>lungzarr report</title>"
            "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    output.write_text(page, encoding="utf-8")
    return output
