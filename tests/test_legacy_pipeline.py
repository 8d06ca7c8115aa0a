"""The old DSB2017 outputs through the store: import-legacy -> nodules -> export, via the CLI."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import lungzarr
from lungzarr.cli import app
from lungzarr.io.store import CohortStore

from conftest import DSB_PATIENT

runner = CliRunner()


@pytest.fixture(scope="module")
def legacy_store(tmp_path_factory):
    from conftest import DSB_DIR, shared_path

    dsb = shared_path(DSB_DIR)
    store = tmp_path_factory.mktemp("legacy") / "dsb.zarr"
    r = runner.invoke(app, ["import-legacy", str(dsb / "input"), str(store)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["nodules", str(store), "--scheduler", "threads",
                            "--labels", str(dsb / "input" / "stage1_labels.csv")])
    assert r.exit_code == 0, r.output
    return store, dsb


def _reference(dsb, name):
    return pd.read_csv(dsb / "reference" / name, index_col="id")


@pytest.mark.parametrize("fmt, name", [("keras8_0313", "features_keras8_0313.csv"),
                                       ("keras_0311", "features_keras_0311.csv"),
                                       ("base_8", "features_base_8.csv")])
def test_export_reproduces_the_reference_rows(legacy_store, tmp_path, fmt, name):
    store, dsb = legacy_store
    out = tmp_path / f"{fmt}.csv"
    r = runner.invoke(app, ["export", str(store), "-o", str(out), "--format", fmt,
                            "--labels", str(dsb / "input" / "stage1_labels.csv")])
    assert r.exit_code == 0, r.output
    got = pd.read_csv(out, index_col="id")
    ref = _reference(dsb, name)
    assert list(got.columns) == list(ref.columns)
    assert list(got.index) == [DSB_PATIENT]
    # The refactor never found the labels (docs/algorithms.md §7): its rows say -777 where the label is 1.
    assert ref.loc[DSB_PATIENT, "cancer"] == -777 and got.loc[DSB_PATIENT, "cancer"] == 1
    cols = [c for c in ref.columns if c != "cancer"]
    np.testing.assert_array_equal(got[cols].to_numpy(), ref[cols].to_numpy())


def test_export_without_labels_keeps_the_imported_label(legacy_store, tmp_path):
    """One label rule for the features stage and export: --labels wins, else the imported label, else -777."""
    store, dsb = legacy_store
    out = tmp_path / "nolabels.csv"
    r = runner.invoke(app, ["export", str(store), "-o", str(out), "--format", "keras8_0313"])
    assert r.exit_code == 0, r.output
    assert pd.read_csv(out, index_col="id").loc[DSB_PATIENT, "cancer"] == 1      # stage1_labels.csv says 1
    other = tmp_path / "labels.csv"
    other.write_text("id,cancer\nsomeone-else,0\n")
    r = runner.invoke(app, ["export", str(store), "-o", str(out), "--labels", str(other)])
    assert r.exit_code == 0, r.output
    assert pd.read_csv(out, index_col="id").loc[DSB_PATIENT, "cancer"] == 1      # not in that CSV: imported one
    other.write_text(f"id,cancer\n{DSB_PATIENT},0\n")
    r = runner.invoke(app, ["export", str(store), "-o", str(out), "--labels", str(other)])
    assert pd.read_csv(out, index_col="id").loc[DSB_PATIENT, "cancer"] == 0      # the CSV wins


def test_patient_table_lung_measures_equal_the_reference(legacy_store):
    store, dsb = legacy_store
    patients = lungzarr.read_patients(store).set_index("patient")
    ref = _reference(dsb, "features_keras8_0313.csv").loc[DSB_PATIENT]
    row = patients.loc[DSB_PATIENT]
    for seg in range(3):
        assert row[f"lvol_{seg}"] == ref[f"lvol_{seg}"]
        for name in (f"emphy_{seg}", f"emphy2_{seg}"):
            assert row[name] == pytest.approx(ref[name], rel=1e-12)
    assert row["cancer"] == 1
    assert row["n_nodules_0.5_filtered"] == ref["ncount_2_0.5"]


def test_nodule_export_and_read_api(legacy_store, tmp_path):
    store, _ = legacy_store
    out = tmp_path / "nodules.parquet"
    r = runner.invoke(app, ["nodules", str(store), "--scheduler", "threads", "-o", str(out)])
    assert r.exit_code == 0, r.output
    table = pd.read_parquet(out)
    assert len(table) == len(lungzarr.read_nodules(store)) > 0
    assert set(table.threshold.round(7)) <= {0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.999, 0.9999, 0.99999,
                                            0.999999, 0.9999999}
    csv_out = tmp_path / "nodules.csv"
    assert runner.invoke(app, ["nodules", str(store), "--scheduler", "threads", "-o", str(csv_out)]).exit_code == 0
    assert len(pd.read_csv(csv_out)) == len(table)
    # Re-running finds nothing to do: the stages are complete.
    assert "nodules" in CohortStore(store, mode="r").stages(DSB_PATIENT)


def test_qc_and_report_write_pictures(legacy_store, tmp_path):
    store, _ = legacy_store
    png = tmp_path / "qc.png"
    r = runner.invoke(app, ["qc", str(store), DSB_PATIENT, "-o", str(png)])
    assert r.exit_code == 0, r.output
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.std() > 10
    html = tmp_path / "report.html"
    r = runner.invoke(app, ["report", str(store), "-o", str(html)])
    assert r.exit_code == 0, r.output
    text = html.read_text()
    assert DSB_PATIENT in text and "report_files/cohort.png" in text
    assert (tmp_path / "report_files" / f"{DSB_PATIENT}.png").stat().st_size > 10_000


def test_status_lists_stages(legacy_store):
    store, _ = legacy_store
    r = runner.invoke(app, ["status", str(store)])
    assert r.exit_code == 0, r.output
    assert "features" in r.output and "1 patient" in r.output
