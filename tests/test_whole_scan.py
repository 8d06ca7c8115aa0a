"""The whole CT of LIDC-IDRI-0001 (133 slices of 512², 2.5 mm) through `lungzarr run` with the defaults, scored
by `lungzarr evaluate` against LUNA16's own tables (slow: minutes of CPU).

The run is the command a user types (a subprocess: the default LocalCluster of worker processes), watched from
outside: every process of its tree is polled for its resident set, and none may pass 2 GiB. The store is then
scored with LUNA16's ``annotations.csv`` and ``annotations_excluded.csv`` (the whole tables of
``../shared/fixtures/luna16``: the scan is found among LUNA16's 601 annotated series by its SeriesInstanceUID):
the one LUNA16 nodule (23.35 mm, x 56.21, y 86.34, z -115.87 mm) must be hit, and the false positives stay under
the bound :data:`MAX_FALSE_POSITIVES`.

The default run's cheaper real-data path (the 16-slice slab of the same series, scored against the same LUNA16
rows) is in ``tests/test_end_to_end.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import FIXTURES, REPO, shared_path

WHOLE_DIR = FIXTURES / "lidc-whole" / "LIDC-IDRI-0001"
LUNA_DIR = FIXTURES / "luna16"
SERIES_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
#: LUNA16's nodule of this scan (annotations.csv; x, y, z in LPS mm as LUNA16 writes them).
LUNA_NODULE_XYZ_MM = np.array([56.20840547, 86.34341278, -115.8675792])
LUNA_NODULE_DIAMETER_MM = 23.35064438
#: False positives allowed on this scan at p >= 0.5 (detections hitting neither the nodule nor one of the 25
#: excluded findings). Measured: 1 (benchmarks/results/whole_scan*.json: a 7 mm part-solid candidate at x 118.9,
#: y -27.1, z -189.0 mm, p 0.99999, 6.0 mm from the nearest excluded finding, whose radius LUNA16 sets to 5 mm),
#: as in the issue's two LIDC scans (1 FP in 2 scans). The bound, 2, is LUNA16's FROC operating point of 2 FP per
#: scan (its seven points are 1/8 ... 8 FP per scan; the CPM averages the sensitivity over them): one more FP than
#: measured is tolerated (an engine or rounding change that moves one weak candidate across 0.5); three mean the
#: detector changed, and the test says so.
MAX_FALSE_POSITIVES = 2
#: Peak resident set of any one process of the run (issue 26: <= 2 GiB per process on whole scans).
MAX_RSS_BYTES = 2 * 2 ** 30
#: The run's wall-clock limit: several CPU-minutes on 2 cores, more when they are shared.
RUN_TIMEOUT_S = 1500


@pytest.mark.slow
@pytest.mark.requires_shared
@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_whole_scan_run_finds_the_luna16_nodule_within_memory(tmp_path):
    from benchmarks.bench_whole_scan import TreeSampler

    whole = shared_path(WHOLE_DIR)
    luna_csv = shared_path(LUNA_DIR / "annotations.csv")
    luna_excluded = shared_path(LUNA_DIR / "annotations_excluded.csv")
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / whole.name).symlink_to(whole)
    store = tmp_path / "whole.zarr"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lungzarr.cli", "run", str(tmp_path / "input"), str(store)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            sampler.stop()
            if proc.poll() is None:
                proc.kill()
    output = (tmp_path / "run.log").read_text()
    assert rc == 0, output[-4000:]
    peaks = sorted(((r["peak_rss"], r["pid"], " ".join(r["cmdline"])[:80]) for r in sampler.procs.values()),
                   reverse=True)
    print("\npeak RSS per process (GiB): " + "; ".join(f"{b / 2 ** 30:.2f} ({c})" for b, _, c in peaks[:4]))
    assert peaks[0][0] <= MAX_RSS_BYTES, peaks[:4]

    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "lungzarr.cli", "evaluate", str(store), "--luna-csv", str(luna_csv),
                        "--luna-excluded", str(luna_excluded), "--bootstrap", "0", "-o", str(out)],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "results.json").read_text())
    detections = pd.read_csv(out / "detections.csv")
    print(f"LUNA16 on the whole scan: {summary['n_hit_targets']}/{summary['n_targets']} hit, "
          f"{summary['n_false_positives']} FP, {summary['n_ignored_detections']} on excluded findings, "
          f"{summary['n_detections']} detections")
    assert summary["n_scans"] == 1 and summary["n_targets"] == 1
    assert summary["n_hit_targets"] == 1 and summary["sensitivity"] == 1.0
    assert summary["n_false_positives"] <= MAX_FALSE_POSITIVES, detections.to_string()

    # The hit in millimetres: the nodule table's component at p >= 0.5 nearest LUNA16's centre.
    import lungzarr
    from lungzarr.algorithms.nodules import select_nodules

    nodules = select_nodules(lungzarr.read_nodules(store), dsb_filter=False)
    xyz = nodules[["x_mm", "y_mm", "z_mm"]].to_numpy()
    distances = np.linalg.norm(xyz - LUNA_NODULE_XYZ_MM, axis=1)
    best = nodules.iloc[int(np.argmin(distances))]
    print(f"nearest component: x {best.x_mm:.2f}, y {best.y_mm:.2f}, z {best.z_mm:.2f} mm, "
          f"{distances.min():.2f} mm from LUNA16's centre, diameter {best.diameter_mm:.1f} mm "
          f"(LUNA16: {LUNA_NODULE_DIAMETER_MM:.1f} mm), p {best.prob_max:.3f}")
    assert distances.min() < 3.0  # the slab's run: 0.6-2.4 mm (issue 26); LUNA16's hit radius is 11.7 mm
    assert 15 < best.diameter_mm < 35


@pytest.mark.requires_shared
def test_cpu_default_windows_per_call_change_no_probability(dsb_dir):
    """The CPU workers' default of windows per engine call (2, for memory) gives OpenVINO's probabilities bit
    for bit as the former default of 8 does, on real windows cut as the detect stage cuts them (a strided view
    of one normalised slab, which the engine copies one call at a time)."""
    from lungzarr.model import engines
    from lungzarr.model.infer import INFER_BATCH, WindowBatch, infer_batch
    from lungzarr.volume import normalize_hu

    from conftest import DSB_PATIENT, DSB_WINDOWS

    if not engines.engine_available("openvino"):
        pytest.skip("OpenVINO is not installed here (the CPU workers' default engine)")
    hu = np.load(dsb_dir / "input" / "stage1_segmented_2x2x2" / f"{DSB_PATIENT}.npz")["arr_0"]
    _, h, w = hu.shape
    first = DSB_WINDOWS[1] - 2  # windows 137 ... 141: through the candidates of windows 139-141
    slab = normalize_hu(hu[first:first + 5 + 7, h % 4:, w % 4:]).astype(np.float32)
    windows = WindowBatch(np.ascontiguousarray(slab)).windows
    assert infer_batch() == INFER_BATCH["cpu"] == 2 and infer_batch(gpu=True) == INFER_BATCH["gpu"] == 8
    engine = engines.get_engine("openvino")
    by_two = engine.predict(windows, batch_size=infer_batch())
    by_eight = engine.predict(windows, batch_size=INFER_BATCH["gpu"])
    assert by_two.shape == (5, 1) + slab.shape[1:] + (1,)
    print(f"\n{int((by_two >= 0.5).sum())} voxels at p >= 0.5 in windows {first}-{first + 4}")
    assert (by_two >= 0.5).sum() > 50  # the windows hold candidates: not a comparison of zeros
    np.testing.assert_array_equal(by_two, by_eight)
