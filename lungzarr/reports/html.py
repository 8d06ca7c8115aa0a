"""QC pictures per patient and a cohort report (HTML with PNGs)."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from lungzarr.errors import LungzarrError

__all__ = ["qc_patient", "write_report"]

#: Nodule-table columns a patient card shows (their meanings come from NODULE_COLUMNS).
_CARD_COLUMNS = ("label", "z_mm", "y_mm", "x_mm", "diameter_mm", "prob_max", "hu_mean", "lung_half",
                 "lung", "juxtapleural", "attenuation", "passes_dsb_filter")
#: Patient-table columns of the cohort table (the rest are in the store's tables/patients).
_PATIENT_TABLE_COLUMNS = ("patient", "n_slices", "slice_spacing_mm", "lung_volume_ml", "n_nodules_0.5_filtered",
                          "cancer")
_TRUTH_COLUMNS = ("patient", "z_mm", "y_mm", "x_mm", "diameter_mm")

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;line-height:1.35;color:#222}
h1{font-size:1.4em;margin:.2em 0} h2{font-size:1.15em;margin:1.2em 0 .4em} h3{margin:0 0 .3em;font-size:1.05em}
img{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:12px;margin:.3em 0}
td,th{border:1px solid #ccc;padding:2px 5px;text-align:right} th{background:#f3f3f3;font-weight:600}
td:first-child,th:first-child{text-align:left;white-space:nowrap}
th[title]{text-decoration:underline dotted;cursor:help}
/* Every table sits in a .scroll box: a table wider than its box scrolls sideways inside it instead of being cut
   off, and the shadows at its edges (local backgrounds over scroll ones) show that there is more to either side. */
.scroll{overflow-x:auto;max-width:100%;
 background:linear-gradient(to right,#fff 30%,#fff0) left/2.5em 100% no-repeat local,
  linear-gradient(to left,#fff 30%,#fff0) right/2.5em 100% no-repeat local,
  radial-gradient(farthest-side at 0 50%,#0003,#0000) left/.8em 100% no-repeat scroll,
  radial-gradient(farthest-side at 100% 50%,#0003,#0000) right/.8em 100% no-repeat scroll}
.top{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,420px),1fr));gap:1em;align-items:start}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,900px),1fr));gap:1em}
.card{border:1px solid #ddd;border-radius:6px;padding:.7em;background:#fff;min-width:0}
.card-body{display:flex;flex-wrap:wrap;gap:.6em 1.2em} .pic{flex:3 1 520px;min-width:0}
.info{flex:2 1 320px;min-width:0}
/* The candidates take the card's whole width, below the picture and the verdict: beside the picture they had a
   third of it and their right-hand columns were cut off. */
.candidates{flex:1 1 100%;min-width:0} .info ul{padding-left:1.2em;margin:.2em 0} .info p{margin:.3em 0}
.legend{list-style:none;padding:0;margin:.3em 0;font-size:13px}
.legend li{display:flex;align-items:center;gap:.5em;margin:.15em 0}
.legend svg{flex:none;background:#333;border-radius:3px}
.verdict{font-weight:600} .hit{color:#17692b} .miss,.fp{color:#a31515}
details{font-size:12px;margin:.3em 0} dt{font-family:monospace;font-weight:600} dd{margin:0 0 .2em 1.2em}
.muted{color:#666;font-size:12px} .phone{display:none}
/* Phones: the three planes would be ~120 px each at the screen's width; keep them legible and scroll sideways. */
@media (max-width:600px){.pic a{display:block;overflow-x:auto}.pic img{max-width:none;width:760px}.phone{display:block}}
"""


def _nodule_markers(store, patient):
    """The patient's reported nodules (:func:`~lungzarr.algorithms.nodules.select_nodules`) as QC markers
    (voxel indices), or None."""
    if not store.has_subgroup(patient, "nodules"):
        return None
    from lungzarr.algorithms.nodules import select_nodules
    from lungzarr.pipeline.tables import patient_nodules

    table = select_nodules(patient_nodules(store, patient))
    return table.assign(z_index=table.z_vox, y_index=table.y_vox, x_index=table.x_vox)


def _check_truth(truth):
    missing = [c for c in _TRUTH_COLUMNS if c not in truth.columns]
    if missing:
        raise ValueError(f"truth lacks columns {missing!r}; it needs {list(_TRUTH_COLUMNS)!r} "
                         "(one row per true nodule, centre and diameter in patient mm), e.g. demo_truth()")


def _truth_markers(truth, patient, grid):
    """The patient's true nodules as QC markers: patient mm -> fractional voxel indices of ``grid``."""
    mine = truth[truth.patient == patient]
    index = (mine[["z_mm", "y_mm", "x_mm"]].to_numpy(dtype=np.float64) - np.asarray(grid.origin)) / np.asarray(
        grid.step)
    return mine.assign(z_index=index[:, 0], y_index=index[:, 1], x_index=index[:, 2])


def qc_patient(store_path, patient: str, output, *, truth=None) -> Path:
    """Axial, coronal and sagittal planes of a patient with the lung outline and nodules, as PNG.

    The planes go through the largest reported nodule (else the largest true
    nodule, else the middle of the volume).

    Parameters
    ----------
    store_path : path
    patient : str
    output : path of the PNG
    truth : pandas.DataFrame, optional
        True nodules (``patient, z_mm, y_mm, x_mm, diameter_mm``, e.g.
        :func:`lungzarr.demo.demo_truth`); this patient's are drawn as squares.
    """
    from lungzarr.io.store import CohortStore, grid_from_attrs
    from lungzarr.reports.qc import qc_figure

    store = CohortStore(store_path, mode="r")
    known = store.patients()
    if patient not in known:
        shown = ", ".join(known[:10]) + (f", … ({len(known)} in all)" if len(known) > 10 else "")
        raise LungzarrError(f"no patient {patient!r} in {str(store_path)!r}; patients: {shown or 'none yet'}")
    if not store.is_complete(patient, "segment"):
        raise LungzarrError(f"patient {patient!r} has no lung mask yet; run `lungzarr segment {store_path}` first")
    ds = store.open_patient(patient)
    grid = grid_from_attrs(ds.attrs)
    markers = _nodule_markers(store, patient)
    true_markers = None
    if truth is not None:
        _check_truth(truth)
        true_markers = _truth_markers(truth, patient, grid)
    centre = None
    for table in (markers, true_markers):
        if table is not None and len(table):
            top = table.sort_values("diameter_mm", ascending=False).iloc[0]
            centre = tuple(int(round(v)) for v in (top.z_index, top.y_index, top.x_index))
            centre = tuple(min(max(c, 0), n - 1) for c, n in zip(centre, grid.shape))
            break
    hu = ds.hu_2mm if "hu_2mm" in ds else ds.segmented
    # The 3-D mask (stage lungs3d) is outlined per side when the patient has it.
    labels = ds.lung_labels.data if "lung_labels" in ds and store.is_complete(patient, "lungs3d") else None
    return qc_figure(hu.data, ds.lungs.data, path=output, nodules=markers, truth=true_markers, grid=grid,
                     title=patient, centre=centre, lung_labels=labels)


def _cohort_plots(patients, nodules, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator, MultipleLocator

    from lungzarr.algorithms.nodules import select_nodules

    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    kept = select_nodules(nodules)
    counts = (kept.groupby("patient").size().reindex(patients.patient, fill_value=0).to_numpy()
              if len(patients) else np.zeros(0, dtype=int))
    axes[0].hist(counts, bins=np.arange(0, max(5, int(counts.max(initial=0)) + 2)) - 0.5, color="tab:blue",
                 rwidth=0.85)
    axes[0].set_xlabel("nodules per patient (p > 0.5, DSB filter)")
    volumes = (patients.lung_volume_ml.dropna().to_numpy() / 1000.0 if "lung_volume_ml" in patients
               else np.zeros(0))
    edges = _litre_bins(volumes)
    axes[1].hist(volumes, bins=edges, color="tab:green", rwidth=0.85)
    axes[1].set_xlabel("lung volume (litres)")
    # Ticks on the round bin edges (at most ~8), labelled plainly: no offset, no exponent.
    width = edges[1] - edges[0]
    axes[1].xaxis.set_major_locator(MultipleLocator(width * max(1, int(np.ceil((len(edges) - 1) / 8)))))
    axes[1].xaxis.set_major_formatter(FormatStrFormatter("%g"))
    for ax in axes:
        ax.set_ylabel("patients")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _litre_bins(volumes) -> np.ndarray:
    """Bin edges at round litres (0.1, 0.25 or 0.5 l wide) with an empty bin either side.

    Round edges keep equal volumes in one bin, and the axis reads 2.2, 2.3 ...
    rather than 20 slivers between 2.2984 and 2.2986.
    """
    lo, hi = (float(np.min(volumes)), float(np.max(volumes))) if len(volumes) else (0.0, 1.0)
    width = 0.1 if hi - lo <= 2 else 0.25 if hi - lo <= 5 else 0.5
    first, last = np.floor(lo / width) - 1, np.floor(hi / width) + 2
    return np.arange(first, last + 1) * width


def _svg_marker(kind, colour, style) -> str:
    dash = {"-": "", "--": ' stroke-dasharray="4 3"', ":": ' stroke-dasharray="1.5 2"'}[style]
    line = f'<line x1="2" y1="10" x2="26" y2="10" stroke="{colour}" stroke-width="2"{dash}/>'
    shape = {"line": line, "side": line,
             "circle": f'<circle cx="14" cy="10" r="7" fill="none" stroke="{colour}" stroke-width="1.6"{dash}/>',
             "square": f'<rect x="6" y="2" width="16" height="16" fill="none" stroke="{colour}" '
                       f'stroke-width="1.6"{dash}/>'}[kind]
    return f'<svg width="28" height="20" viewBox="0 0 28 20" aria-hidden="true">{shape}</svg>'


def _legend_html(*, truth: bool, sides: bool = True) -> str:
    from lungzarr.reports.qc import LEGEND

    items = "".join(f"<li>{_svg_marker(kind, colour, style)}<span>{html.escape(meaning)}</span></li>"
                    for kind, colour, style, meaning in LEGEND
                    if (truth or kind != "square") and (sides or kind != "side"))
    return (f'<ul class="legend">{items}</ul><p class="muted">Each picture shows three planes through the largest '
            "nodule (else the middle of the volume); a plane's title gives its position in patient mm and "
            "the lung area it cuts. Axial planes are in radiological orientation: the patient's right on "
            "the left of the picture, anterior at the top.</p>")


def _table_html(frame, descriptions: dict, *, digits: int = 1) -> str:
    """A table whose headers carry the column meanings (hover) and a list of them below (tap)."""
    def name(column):
        # A break opportunity after each underscore: long names wrap instead of widening the table.
        return "_<wbr>".join(html.escape(part) for part in str(column).split("_"))

    head = "".join(f'<th title="{html.escape(descriptions.get(c, ""))}">{name(c)}</th>'
                   if descriptions.get(c) else f"<th>{name(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for value in row:
            if isinstance(value, (float, np.floating)):
                text = "" if np.isnan(value) else f"{value:.{digits}f}"
            else:
                text = str(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    meanings = "".join(f"<dt>{html.escape(str(c))}</dt><dd>{html.escape(descriptions[c])}</dd>"
                       for c in frame.columns if descriptions.get(c))
    return (f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'
            + (f"<details><summary>what the columns mean</summary><dl>{meanings}</dl></details>" if meanings else ""))


def _nodule_descriptions() -> dict:
    from lungzarr.algorithms.nodules import NODULE_COLUMNS

    return {name: meaning for name, (_, meaning) in NODULE_COLUMNS.items()}


def _truth_html(verdict, patient) -> str:
    """The patient's true nodules and false positives, one list item each (from the verdict)."""
    lines = verdict.patient_lines(patient)
    head, rest = lines[0], lines[1:]
    items = []
    for line in rest:
        text = line.strip()
        kind = "hit" if text.startswith("hit") else "miss" if text.startswith("missed") else "fp"
        items.append(f'<li class="{kind}">{html.escape(text)}</li>')
    return f'<p class="verdict">{html.escape(head.split(": ", 1)[1])}</p><ul>{"".join(items)}</ul>'


def write_report(store_path, output, *, truth=None) -> Path:
    """A cohort QC report: ``output`` (.html) plus a ``<name>_files/`` folder of PNGs.

    For the cohort: what the counts mean, a legend of the pictures, the
    nodule-count and lung-volume distributions, the failures and the patient
    table (columns described, :data:`~lungzarr.pipeline.tables.PATIENT_COLUMNS`).
    Per patient, one card: three planes with the lung outline and nodule
    markers, and the patient's candidates at p > 0.5 (columns described from
    :data:`~lungzarr.algorithms.nodules.NODULE_COLUMNS`).

    Parameters
    ----------
    store_path : path
    output : path
        The HTML file.
    truth : pandas.DataFrame, optional
        Known nodules, one row each: ``patient, z_mm, y_mm, x_mm, diameter_mm``
        (patient mm; e.g. :func:`lungzarr.demo.demo_truth`). Drawn as squares
        in the pictures, and each patient's card lists its hits, misses and
        false positives (:func:`lungzarr.evaluate.match_truth`). Rows of patients
        not in the store are left out and named. ``truth.attrs`` ``noun`` and
        ``empty_reason`` word the verdict (demo_truth: "phantom nodule", "by design").
    """
    from lungzarr.algorithms.components import DSB_MAX_MEAN_HU, DSB_MIN_DIAMETER_MM, DSB_THRESHOLDS, MISSING, NO_LABEL
    from lungzarr.algorithms.nodules import REPORTED_THRESHOLD, select_nodules
    from lungzarr.io.store import CohortStore, read_failures, read_nodules, read_patients
    from lungzarr.pipeline.tables import PATIENT_COLUMNS

    if truth is not None:
        _check_truth(truth)
    output = Path(output)
    files = output.with_name(output.stem + "_files")
    files.mkdir(parents=True, exist_ok=True)
    store = CohortStore(store_path, mode="r")
    patients = read_patients(store_path)
    nodules = read_nodules(store_path)
    failures = read_failures(store_path)
    ids = store.patients()
    verdict = None
    if truth is not None:
        from lungzarr.evaluate import match_truth

        # demo_truth() names its nodules in attrs ("phantom nodule", "by design"); other tables get plain words.
        verdict = match_truth(nodules, truth[truth.patient.isin(ids)], patients=ids,
                              noun=truth.attrs.get("noun", "true nodule"),
                              empty_reason=truth.attrs.get("empty_reason", "in the truth table"))
        elsewhere = sorted(set(truth.patient) - set(ids))
    cohort_png = _cohort_plots(patients, nodules, files / "cohort.png")
    at_half = select_nodules(nodules, dsb_filter=False)
    reported = select_nodules(nodules)
    thresholds = f"{DSB_THRESHOLDS[0]} … {DSB_THRESHOLDS[-1]}"
    parts = [f"<h1>lungzarr report — {html.escape(str(store_path))}</h1>",
             f"<p>{len(ids)} patient(s), {len(failures)} failure(s). The nodule table has "
             f"<b>{len(nodules)} candidate rows</b> = every connected component at each of the "
             f"{len(DSB_THRESHOLDS)} thresholds ({thresholds}), so one nodule appears once per threshold it "
             f"passes; <b>{len(at_half)} shown</b> in the cards = p &gt; {REPORTED_THRESHOLD:g}; of those, "
             f"<b>{len(reported)} reported nodules</b> pass the DSB filter (mean HU &lt; {DSB_MAX_MEAN_HU:g}, "
             f"diameter &gt; {DSB_MIN_DIAMETER_MM:g} mm) "
             "and are drawn in the pictures. Positions are patient coordinates in mm.</p>"]
    pending = [pid for pid in ids if not store.is_complete(pid, "nodules")]
    if pending:
        parts.append(f"<p><b>{len(pending)} patient(s) without the nodules stage yet</b> (no candidates to show): "
                     f"{html.escape(', '.join(pending[:10]))}{' …' if len(pending) > 10 else ''}.</p>")
    if verdict is not None:
        parts.append(f'<p class="verdict">Against the truth: {html.escape(verdict.summary())}.</p>')
        if elsewhere:
            parts.append(f"<p class='muted'>The truth table also has {len(elsewhere)} patient(s) not in this store, "
                         f"left out: {html.escape(', '.join(elsewhere[:10]))}{' …' if len(elsewhere) > 10 else ''}."
                         "</p>")
    parts.append('<div class="top">'
                 f"<div><h2>Legend</h2>{_legend_html(truth=truth is not None)}</div>"
                 f'<div><h2>Cohort</h2><img src="{files.name}/{cohort_png.name}" alt="cohort distributions: '
                 f'nodules per patient and lung volume"></div></div>')
    if len(failures):
        parts.append("<h2>Failures</h2>" + _table_html(failures, {}))
    if len(patients):
        cols = [c for c in _PATIENT_TABLE_COLUMNS if c in patients.columns]
        parts.append("<h2>Patient table</h2><p class='muted'>A few columns of tables/patients "
                     "(<code>lungzarr.read_patients</code>); the rest are described with "
                     "<code>lungzarr.pipeline.tables.PATIENT_COLUMNS</code>.</p>"
                     + _table_html(patients[cols], PATIENT_COLUMNS))
        if "cancer" in patients and (patients.cancer == NO_LABEL).any():
            parts.append(f"<p class='muted'><code>cancer</code> {NO_LABEL} = no label: the patient is not in "
                         "the <code>--labels</code> CSV nor was it imported with one (<code>import-legacy</code> "
                         "keeps the old stage1_labels.csv label). The DSB2017 export writes the same value; "
                         f"there, {MISSING} marks a missing nodule or statistic.</p>")
    parts.append('<h2>Patients</h2><div class="cards">')
    descriptions = _nodule_descriptions()
    for patient in ids:
        card = [f'<section class="card"><h3>{html.escape(patient)}</h3><div class="card-body"><div class="pic">']
        if store.is_complete(patient, "segment"):
            png = qc_patient(store_path, patient, files / f"{patient}.png", truth=truth)
            card.append(f'<a href="{files.name}/{png.name}"><img src="{files.name}/{png.name}" '
                        f'alt="{html.escape(patient)}: axial, coronal and sagittal planes"></a>'
                        '<p class="muted phone">scroll the picture sideways, or tap it for full size</p>')
        else:
            card.append("<p>not segmented yet: no picture.</p>")
        card.append('</div><div class="info">')
        if verdict is not None:
            card.append(_truth_html(verdict, patient))
        mine = at_half[at_half.patient == patient] if len(at_half) else at_half
        if len(mine):
            n_pass = int(mine.passes_dsb_filter.sum())
            card.append(f"<p class='muted'>{len(mine)} candidate(s) at p &gt; {REPORTED_THRESHOLD:g}, "
                        f"{n_pass} passing the DSB filter (drawn in the picture).</p></div>"
                        '<div class="candidates">'
                        + _table_html(mine[[c for c in _CARD_COLUMNS if c in mine.columns]], descriptions))
        else:
            card.append(f"<p class='muted'>no candidate at p &gt; {REPORTED_THRESHOLD:g}.</p>")
        card.append("</div></div>")
        card.append("</section>")
        parts.append("".join(card))
    parts.append("</div>")
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>lungzarr report — {html.escape(Path(str(store_path)).name)}</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>")
    output.write_text(page, encoding="utf-8")
    return output
