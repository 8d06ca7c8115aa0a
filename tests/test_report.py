"""The cohort report: legend, millimetres, described columns, the truth overlay, readable histograms.

The store is real (DICOM -> ingest -> segment -> nodules -> features) but small, and its
``nodule_prob`` is written from known spheres instead of the UNet, so the report's
content is known: one hit, one false positive, one patient without a nodule.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungzarr.algorithms.nodules import NODULE_COLUMNS
from lungzarr.pipeline.tables import PATIENT_COLUMNS

SHAPE, SPACING = (24, 96, 96), (2.5, 2.0, 2.0)
NODULE = dict(z_mm=-30.0, y_mm=-5.0, x_mm=-35.0, diameter_mm=12.0)
#: A sphere of probability in the other lung, where no true nodule is: a false positive.
FALSE_POSITIVE = dict(z_mm=-30.0, y_mm=-5.0, x_mm=35.0, diameter_mm=8.0)


def _write_prob(store_path, patient, spheres):
    """nodule_prob from spheres (centre, diameter in patient mm, probability), as the detect stage stores it."""
    import xarray as xr

    from lungzarr.io.store import CohortStore, grid_from_attrs

    store = CohortStore(store_path)
    ds = store.open_patient(patient)
    grid = grid_from_attrs(ds.attrs)
    zz, yy, xx = np.meshgrid(grid.axis(0), grid.axis(1), grid.axis(2), indexing="ij", sparse=True)
    prob = np.zeros(grid.shape, dtype=np.float32)
    for sphere, p in spheres:
        inside = ((zz - sphere["z_mm"]) ** 2 + (yy - sphere["y_mm"]) ** 2 + (xx - sphere["x_mm"]) ** 2
                  <= (sphere["diameter_mm"] / 2) ** 2)
        prob[inside] = p
    out = xr.Dataset({"nodule_prob": (("z2", "y2", "x2"), prob)})
    pending = store.prepare_stage(patient, "detect", out, record={"weights": "spheres written by the test"})
    pending.compute()
    pending.commit()


@pytest.fixture(scope="module")
def report_store(tmp_path_factory):
    from lungzarr.algorithms.phantom import PhantomNodule, chest_phantom
    from lungzarr.io.dicom import write_series
    from lungzarr.pipeline import run

    root = tmp_path_factory.mktemp("report")
    for pid, seed, nodules in (("R-1", 1, (PhantomNodule(**NODULE),)), ("R-2", 2, ())):
        hu, origin = chest_phantom(shape=SHAPE, spacing=SPACING, seed=seed, nodules=nodules)
        write_series(hu, root / "input" / pid, spacing=SPACING, origin=origin, patient_id=pid)
    store = root / "r.zarr"
    run(root / "input", store, stages=["ingest", "segment"])
    _write_prob(store, "R-1", [(NODULE, 0.99), (FALSE_POSITIVE, 0.8)])
    _write_prob(store, "R-2", [])
    run(None, store, stages=["nodules", "features"])
    truth = pd.DataFrame([{"patient": "R-1", **NODULE}])
    return store, truth


def test_report_has_legend_mm_titles_described_columns_and_truth(report_store, tmp_path):
    from lungzarr.reports.html import write_report
    from lungzarr.reports.qc import LEGEND

    store, truth = report_store
    out = write_report(store, tmp_path / "report.html", truth=truth)
    text = out.read_text()
    # The legend says what every marker and line means, truth markers included.
    for _, _, _, meaning in LEGEND:
        assert meaning.replace(">", "&gt;") in text, meaning
    # The counts are explained.
    assert re.search(r"<b>\d+ candidate rows</b> = every connected component at each of the 11 thresholds", text)
    assert "shown</b> in the cards = p &gt; 0.5" in text
    # Column meanings come from NODULE_COLUMNS and PATIENT_COLUMNS.
    assert f'title="{NODULE_COLUMNS["diameter_mm"][1]}"' in text
    assert "<dt>passes_dsb_filter</dt><dd>the original&#x27;s filter" in text
    assert "-777 = no label: not in --labels nor imported with one" in text
    assert "cancer</code> -777 = no label" in text  # have no label
    # The truth: one hit on R-1, the sphere in the other lung a false positive, R-2 none.
    assert ("Against the truth: 1/1 true nodules found, 1 false positive (R-2 has no nodule in the truth table: "
            "nothing was detected there, as it should be)") in text
    assert re.search(r'<li class="hit">hit +12\.0 mm nodule at \(z -30\.0, y -5\.0, x -35\.0\) mm', text)
    assert re.search(r'<li class="fp">false positive [\d.]+ mm at \(z -30\.\d, y -\d\.\d, x 3\d\.\d\) mm', text)
    # A compact layout: patient cards in a CSS grid, sized for phones too.
    assert text.count('<section class="card">') == 2 and "display:grid" in text
    assert "name='viewport'" in text


def test_qc_titles_are_millimetres_and_truth_is_drawn(report_store, tmp_path):
    from lungzarr.reports.html import qc_patient

    store, truth = report_store
    plain = qc_patient(store, "R-1", tmp_path / "plain.png")
    marked = qc_patient(store, "R-1", tmp_path / "truth.png", truth=truth)
    from PIL import Image

    a = np.asarray(Image.open(plain).convert("RGB"), dtype=int)
    b = np.asarray(Image.open(marked).convert("RGB"), dtype=int)
    cyan = lambda px: ((px[..., 0] < 80) & (px[..., 1] > 200) & (px[..., 2] > 200)).sum()  # noqa: E731
    # The true nodule's squares are cyan, which nothing else in the picture is.
    assert cyan(a) == 0 and cyan(b) > 100


def test_qc_figure_titles_in_patient_mm(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from lungzarr.reports.qc import qc_figure
    from lungzarr.volume import Grid

    titles = []
    savefig = Figure.savefig

    def keep_titles(fig, *args, **kwargs):
        titles.extend(ax.get_title() for ax in fig.axes)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_titles)
    hu = np.full((10, 20, 30), -850, dtype=np.int16)
    lungs = np.zeros(hu.shape, dtype=bool)
    lungs[2:8, 5:15, 5:25] = True
    grid = Grid(hu.shape, (-120.0, -10.0, -30.0), (2.0, 1.5, 1.0))
    qc_figure(hu, lungs, path=tmp_path / "q.png", grid=grid, centre=(2, 6, 8))
    # Positions are grid.to_mm of the centre; areas are pixels x the plane's pixel size.
    assert titles == ["axial z = -116.0 mm, lungs 3 cm²", "coronal y = -1.0 mm, lungs 2 cm²",
                      "sagittal x = -22.0 mm, lungs 2 cm²"]


def test_cohort_histograms_have_integer_counts_and_plain_litres(tmp_path, monkeypatch):
    """Counts tick at whole patients and nodules; volumes are litres without an offset."""
    from matplotlib.figure import Figure

    from lungzarr.reports.html import _cohort_plots

    patients = pd.DataFrame({"patient": ["a", "b", "c"], "lung_volume_ml": [2298.6, 2298.5, 2298.4]})
    nodules = pd.DataFrame({"patient": ["a", "a", "b"], "threshold": [0.5] * 3, "passes_dsb_filter": [True] * 3})
    seen = []
    savefig = Figure.savefig

    def inspect(fig, *args, **kwargs):
        fig.canvas.draw()
        seen.extend((ax.get_xlabel(), [t.get_text().replace("\u2212", "-") for t in ax.get_xticklabels()],
                     list(ax.get_yticks()), ax.xaxis.get_offset_text().get_text()) for ax in fig.axes)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", inspect)
    _cohort_plots(patients, nodules, tmp_path / "c.png")
    (_, count_ticks, count_y, _), (vol_label, vol_ticks, vol_y, offset) = seen
    # Before: "0.44 ... 0.56" with "+2.298e3" beside the axis, and patients ticked in quarters.
    assert vol_label == "lung volume (litres)" and offset == ""
    assert "2.3" in vol_ticks
    assert count_ticks and all(float(t).is_integer() for t in count_ticks if t)
    assert all(float(y).is_integer() for y in count_y + vol_y)


def test_patient_columns_describe_every_column(report_store):
    import lungzarr

    store, _ = report_store
    columns = lungzarr.read_patients(store).columns
    described = {c for c in PATIENT_COLUMNS if "<" not in c}
    stage_columns = {c for c in columns if c.startswith("stage_")}
    assert set(columns) - stage_columns == described
    assert "-777" in PATIENT_COLUMNS["cancer"]


def test_truth_needs_its_columns(report_store, tmp_path):
    from lungzarr.reports.html import write_report

    store, _ = report_store
    with pytest.raises(ValueError, match=r"truth lacks columns \['diameter_mm'\]"):
        write_report(store, tmp_path / "r.html", truth=pd.DataFrame({"patient": ["R-1"], "z_mm": [0.0],
                                                                     "y_mm": [0.0], "x_mm": [0.0]}))


def test_readme_example_plots_radiologically(report_store, monkeypatch):
    """The store page's plotting example runs on a store and draws y down, as the QC pictures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import lungzarr
    from lungzarr.algorithms.nodules import select_nodules

    store, _ = report_store
    readme = (Path(__file__).resolve().parents[1] / "docs" / "user-guide" / "store.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(import lungzarr\n.*?)```", readme, re.S).group(1)
    code = block.replace('"demo.zarr"', repr(str(store))).replace("DEMO-001", "R-1")
    plt.close("all")
    scope: dict = {}
    exec(compile(code, "store.md", "exec"), scope)
    ax = plt.gca()
    assert ax.yaxis_inverted() and not ax.xaxis_inverted()
    z = float(scope["plane"].z2)
    kept = select_nodules(lungzarr.read_nodules(store))
    cut = kept[(kept.patient == "R-1") & ((kept.z_mm - z).abs() <= kept.diameter_mm / 2)]
    assert len(ax.patches) == len(cut) > 0
    plt.close("all")


def test_demo_truth_wording_and_truth_of_other_patients(report_store, tmp_path):
    """demo_truth() speaks of phantom nodules; truth rows of patients not in the store are named, not matched."""
    from lungzarr.demo import demo_truth
    from lungzarr.reports.html import write_report

    store, truth = report_store
    mixed = pd.concat([demo_truth(), truth], ignore_index=True)
    mixed.attrs.update(demo_truth().attrs)
    text = write_report(store, tmp_path / "r.html", truth=mixed).read_text()
    assert ("Against the truth: 1/1 phantom nodules found, 1 false positive (R-2 has no nodule by design: "
            "nothing was detected there, as it should be)") in text
    assert "2 patient(s) not in this store, left out: DEMO-001, DEMO-002." in text


def test_report_tables_scroll_inside_their_box_and_candidates_take_the_card_width(report_store, tmp_path):
    """No table is cut off: each sits in a box that scrolls sideways, the candidates below the picture.

    Seen in headless Chromium at 1366 px: the candidates beside the picture had a third of the card and lost
    their right-hand columns; at 390 px every wide table needs to scroll.
    """
    from lungzarr.reports.html import write_report

    store, truth = report_store
    text = write_report(store, tmp_path / "report.html", truth=truth).read_text()
    css = dict(re.findall(r"\n(\.[\w-]+)\{([^}]*)\}", text))
    assert "overflow-x:auto" in css[".scroll"]
    assert "flex:1 1 100%" in css[".candidates"]
    tables = text.count("<table")
    assert tables == 2                                   # the patient table and R-1's candidates
    assert text.count('<div class="scroll"><table>') == tables
    # R-1's candidates follow its picture and verdict in a box of their own, not inside the picture's column.
    card = text.split('<section class="card"><h3>R-1</h3>', 1)[1].split("</section>", 1)[0]
    pic, info, candidates = (card.index(f'<div class="{name}">') for name in ("pic", "info", "candidates"))
    assert pic < info < candidates < card.index("<table")
    assert card.count("<div") == card.count("</div>")


def test_qc_legend_lies_below_the_planes(tmp_path, monkeypatch):
    """The PNG's legend (three rows with the 3-D mask and the truth) covers no pixel of any plane."""
    import pandas as pd
    from matplotlib.figure import Figure

    from lungzarr.reports.qc import qc_figure

    drawn = []
    savefig = Figure.savefig

    def keep_figure(fig, *args, **kwargs):
        result = savefig(fig, *args, **kwargs)
        drawn.append(fig)
        return result

    monkeypatch.setattr(Figure, "savefig", keep_figure)
    hu = np.full((40, 60, 60), -850, dtype=np.int16)
    lungs = np.zeros(hu.shape, dtype=bool)
    lungs[5:35, 10:50, 5:55] = True
    labels = np.where(lungs, 1, 0).astype(np.uint8)
    labels[:, :, 30:] *= 2
    marker = pd.DataFrame([dict(z_index=20, y_index=30, x_index=20, diameter_mm=8.0)])
    qc_figure(hu, lungs, path=tmp_path / "q.png", nodules=marker, truth=marker, lung_labels=labels, title="P")
    (fig,) = drawn
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert len(fig.legends[0].get_texts()) == 7
    for ax in fig.axes:
        picture = ax.images[0].get_window_extent(renderer)
        assert legend.y1 <= picture.y0, (ax.get_title(), legend, picture)
