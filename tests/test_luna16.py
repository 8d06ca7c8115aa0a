"""LUNA16 evaluation as the official ``noduleCADEvaluationLUNA16.py`` scores, and the LUNA16 / NIfTI exports.

``_official`` below re-states the official script's rules in plain Python (lists, ``float`` on CSV text,
one candidate at a time), written from the rules, not from lungzarr's code:

* scans: the series of ``seriesuids.csv``; candidates and findings of other series are not seen;
* a scan with more than 100 candidates keeps those with probability strictly above the 101st highest;
* a scan's findings are its ``annotations.csv`` rows, then its ``annotations_excluded.csv`` rows; for each
  finding (diameter < 0 -> 10 mm) a candidate is within it when ``dx² + dy² + dz² < (d / 2)²``
  (x, y, z order); a candidate within a target is a hit (the target keeps its best probability) and no longer
  a false positive; a candidate within an excluded finding only is dropped; the rest are false positives;
* FROC: a missed target is left out of the curve but counts in the sensitivity's denominator; at each distinct
  probability t (descending), FP/scan = (FP(>= t) / n_FP) * n_FP / n_scans and sensitivity =
  (TP(>= t) / n_hit) * n_hit / n_targets (sklearn's rates, rescaled), after a first point (0, 0);
* the curve is ``np.interp``-olated on ``np.linspace(1/8, 8, 10001)``.

The two CPM readings: "grid" = the grid sample at the largest grid point <= each rate; "exact" = ``np.interp``
of the curve at each rate.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lungzarr.cli import app
from lungzarr.evaluate import cap_marks, read_luna_annotations, read_luna_candidates
from lungzarr.pipeline import evaluate_candidates

RATES = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
runner = CliRunner()


# ---------------------------------------------------------------- the official rules, re-stated

def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _official(candidates_csv, annotations_csv, excluded_csv, seriesuids_csv, max_marks=100):
    scans = [line.strip() for line in open(seriesuids_csv) if line.strip()]
    cands = _rows(candidates_csv)
    included = _rows(annotations_csv)
    excluded = _rows(excluded_csv) if excluded_csv else []
    gt, probs, dropped_from_curve = [], [], []
    n_tp = n_fn = n_fp = n_ignored = n_tie_cuts = 0
    for uid in scans:
        mine = [c for c in cands if c["seriesuid"] == uid]
        if len(mine) > max_marks:
            ordered = sorted((float(c["probability"]) for c in mine), reverse=True)
            cut = ordered[max_marks]
            mine = [c for c in mine if float(c["probability"]) > cut]
            n_tie_cuts += len(mine) < max_marks
        remaining = dict(enumerate(mine))
        findings = ([(a, True) for a in included if a["seriesuid"] == uid]
                    + [(a, False) for a in excluded if a["seriesuid"] == uid])
        for a, is_target in findings:
            x, y, z = float(a["coordX"]), float(a["coordY"]), float(a["coordZ"])
            d = float(a["diameter_mm"])
            if d < 0.0:
                d = 10.0
            r2 = (d / 2.0) ** 2
            matches = []
            for key, c in enumerate(mine):
                dist = (x - float(c["coordX"])) ** 2 + (y - float(c["coordY"])) ** 2 + (z - float(c["coordZ"])) ** 2
                if dist < r2:
                    if is_target:
                        matches.append(float(c["probability"]))
                        remaining.pop(key, None)
                    elif key in remaining:
                        n_ignored += 1
                        del remaining[key]
            if is_target:
                gt.append(1)
                if matches:
                    probs.append(max(matches))
                    dropped_from_curve.append(False)
                    n_tp += 1
                else:
                    probs.append(-1e9)
                    dropped_from_curve.append(True)
                    n_fn += 1
        for c in remaining.values():
            gt.append(0)
            probs.append(float(c["probability"]))
            dropped_from_curve.append(False)
            n_fp += 1
    n_targets = sum(gt)
    local = [(g, p) for g, p, x in zip(gt, probs, dropped_from_curve) if not x]
    n_hit = sum(g for g, _ in local)
    n_false = len(local) - n_hit
    fps, sens = [0.0], [0.0]
    for t in sorted({p for _, p in local}, reverse=True):
        tp = sum(1 for g, p in local if g == 1 and p >= t)
        fp = sum(1 for g, p in local if g == 0 and p >= t)
        fps.append((fp / n_false) * n_false / len(scans) if n_false else 0.0)
        sens.append((tp / n_hit) * n_hit / n_targets if n_hit else 0.0)
    grid = np.linspace(0.125, 8, num=10001)
    curve = np.interp(grid, fps, sens)
    at_grid = [float(curve[max(k for k in range(grid.size) if grid[k] <= r)]) for r in RATES]
    at_exact = [float(v) for v in np.interp(RATES, fps, sens)]
    return {"n_scans": len(scans), "n_targets": n_targets, "n_hit_targets": n_tp, "n_missed": n_fn,
            "n_false_positives": n_fp, "n_ignored_detections": n_ignored, "n_tie_cuts": n_tie_cuts,
            "fps": fps, "sens": sens, "curve": curve,
            "cpm_grid": float(np.mean(at_grid)), "cpm_exact": float(np.mean(at_exact)),
            "at_grid": at_grid, "at_exact": at_exact}


# ---------------------------------------------------------------- synthetic cases

def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow([repr(v) if isinstance(v, float) else v for v in row])


def _synthetic_case(folder, seed, n_scans=60):
    """60 scans: targets, excluded findings (some of unknown size), hits, near misses, ties, crowded scans."""
    rng = np.random.default_rng(seed)
    uids = [f"1.3.6.1.4.1.{seed}.{i}" for i in range(n_scans)]
    ann, exc, cand = [], [], []
    for i, uid in enumerate(uids):
        for _ in range(rng.integers(0, 4)):
            centre = rng.uniform(-150, 150, 3)
            d = float(rng.choice([rng.uniform(3, 32), 26.3466]))
            ann.append((uid, *map(float, centre), d))
            for _ in range(rng.integers(0, 3)):      # candidates within, near the edge or just outside
                u = rng.normal(size=3)
                u /= np.linalg.norm(u)
                r = d / 2 * float(rng.choice([rng.uniform(0, 0.95), rng.uniform(0.98, 1.02)]))
                cand.append((uid, *map(float, centre + u * r), float(np.round(rng.uniform(0.2, 1), 2))))
        for _ in range(rng.integers(0, 3)):
            centre = rng.uniform(-150, 150, 3)
            exc.append((uid, *map(float, centre), float(rng.choice([-1.0, rng.uniform(2, 12)]))))
            if rng.uniform() < 0.6:
                cand.append((uid, *map(float, centre + rng.uniform(-3, 3, 3)), float(np.round(rng.uniform(), 2))))
        # A few false positives a scan, mostly unlikely; every tenth scan is crowded (over 100 marks).
        n_fp = int(rng.integers(100, 130) if i % 10 == 3 else rng.integers(0, 12))
        for _ in range(n_fp):                          # probabilities on a 0.01 grid: many ties
            cand.append((uid, *map(float, rng.uniform(-200, 200, 3)), float(np.round(rng.beta(1, 4), 2))))
    order = rng.permutation(len(cand))
    cand = [cand[k] for k in order]
    _write_csv(folder / "annotations.csv", ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"], ann)
    _write_csv(folder / "annotations_excluded.csv", ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"],
               exc)
    _write_csv(folder / "candidates.csv", ["seriesuid", "coordX", "coordY", "coordZ", "probability"], cand)
    (folder / "seriesuids.csv").write_text("".join(u + "\n" for u in uids))
    return folder


def _files(folder):
    return dict(luna_csv=folder / "annotations.csv", luna_excluded=folder / "annotations_excluded.csv",
                seriesuids=folder / "seriesuids.csv")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_synthetic_cases_agree_with_the_official_rules(tmp_path, seed):
    folder = _synthetic_case(tmp_path, seed)
    ref = _official(folder / "candidates.csv", folder / "annotations.csv", folder / "annotations_excluded.csv",
                    folder / "seriesuids.csv")
    got = evaluate_candidates(folder / "candidates.csv", tmp_path / "out", n_bootstrap=0, **_files(folder))
    s = got["result"].summary
    # The case exercises what it should: excluded findings, hits, crowded scans cut inside a tie.
    assert ref["n_targets"] > 50 and ref["n_ignored_detections"] > 5 and ref["n_hit_targets"] > 20
    assert ref["n_tie_cuts"] >= 3
    for key in ("n_scans", "n_targets", "n_hit_targets", "n_false_positives", "n_ignored_detections"):
        assert s[key] == ref[key], key
    froc = got["result"].froc
    assert froc["fps_per_scan"].tolist() == ref["fps"]
    assert froc["sensitivity"].tolist() == ref["sens"]
    assert s["cpm_grid"] == ref["cpm_grid"] and s["cpm_exact"] == ref["cpm_exact"]
    assert list(s["cpm_grid_sensitivities"].values()) == ref["at_grid"]
    assert list(s["cpm_exact_sensitivities"].values()) == ref["at_exact"]
    assert s["cpm"] == s["cpm_exact"] and s["cpm_convention"] == "exact"
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["cpm_grid"] == ref["cpm_grid"] and on_disk["cpm_exact"] == ref["cpm_exact"]


def test_synthetic_case_through_the_cli(tmp_path):
    folder = _synthetic_case(tmp_path, 1)
    ref = _official(folder / "candidates.csv", folder / "annotations.csv", folder / "annotations_excluded.csv",
                    folder / "seriesuids.csv")
    r = runner.invoke(app, ["evaluate", "--candidates", str(folder / "candidates.csv"),
                            "--luna-csv", str(folder / "annotations.csv"),
                            "--luna-excluded", str(folder / "annotations_excluded.csv"),
                            "--seriesuids", str(folder / "seriesuids.csv"), "--bootstrap", "0",
                            "--cpm", "grid", "-o", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert res["cpm"] == res["cpm_grid"] == ref["cpm_grid"] and res["cpm_exact"] == ref["cpm_exact"]
    assert (res["n_hit_targets"], res["n_false_positives"]) == (ref["n_hit_targets"], ref["n_false_positives"])
    # Without the excluded findings, the detections on them become false positives.
    r = runner.invoke(app, ["evaluate", "--candidates", str(folder / "candidates.csv"),
                            "--luna-csv", str(folder / "annotations.csv"),
                            "--seriesuids", str(folder / "seriesuids.csv"), "--bootstrap", "0",
                            "-o", str(tmp_path / "cli2")])
    assert r.exit_code == 0, r.output
    res2 = json.loads((tmp_path / "cli2" / "results.json").read_text())
    assert res2["n_false_positives"] == ref["n_false_positives"] + ref["n_ignored_detections"]
    r = runner.invoke(app, ["evaluate", "--candidates", str(folder / "candidates.csv"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--luna-csv" in r.output


# ---------------------------------------------------------------- the ulp case and the tie case

def test_hit_test_is_the_squared_distance_to_the_ulp(tmp_path):
    # d = 26.3466: this candidate's squared distance 173.53583288999997 is below r² = 173.53583289,
    # while its Euclidean distance equals the radius 13.1733 (a norm < radius test misses it).
    nodule = (0.0, -180.3, -250.7)
    cand = (2.1092, -171.09400000000002, -241.51649999999998)
    d = 26.3466
    dist2 = sum((a - b) ** 2 for a, b in zip(nodule, cand))
    assert dist2 == 173.53583288999997 < (d / 2) ** 2 == 173.53583289
    assert float(np.linalg.norm(np.subtract(cand, nodule))) == d / 2
    _write_csv(tmp_path / "annotations.csv", ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"],
               [("s1", *nodule, d)])
    _write_csv(tmp_path / "candidates.csv", ["seriesuid", "coordX", "coordY", "coordZ", "probability"],
               [("s1", *cand, 0.9), ("s1", 50.0, 50.0, 50.0, 0.5)])
    (tmp_path / "seriesuids.csv").write_text("s1\ns2\n")
    res = evaluate_candidates(tmp_path / "candidates.csv", tmp_path / "out", luna_csv=tmp_path / "annotations.csv",
                              seriesuids=tmp_path / "seriesuids.csv", n_bootstrap=0)["result"]
    s = res.summary
    assert (s["n_hit_targets"], s["n_false_positives"], s["n_scans"]) == (1, 1, 2)
    assert res.detections["outcome"].tolist() == ["tp", "fp"]
    # Hit at 0.9 before any FP: sensitivity 1 from 0 FP/scan on, both readings.
    assert s["cpm_exact"] == s["cpm_grid"] == 1.0


def test_cap_keeps_marks_above_the_101st_and_drops_a_tie_at_the_cut(tmp_path):
    # 99 false positives at 0.60 ... 0.994, then three candidates tied at 0.5: the target's hit (first in the
    # file) and two false positives. The 101st highest is 0.5, so the whole tied group goes: 99 marks remain,
    # the target is missed. A stable top-100 would have kept the hit.
    rows = [("s1", 0.0, 0.0, 0.0, 0.5), ("s1", 90.0, 0.0, 0.0, 0.5), ("s1", 95.0, 0.0, 0.0, 0.5)]
    rows += [("s1", 100.0 + k, 100.0, 100.0, round(0.6 + 0.004 * k, 3)) for k in range(99)]
    _write_csv(tmp_path / "annotations.csv", ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"],
               [("s1", 0.0, 0.0, 1.0, 6.0)])
    _write_csv(tmp_path / "candidates.csv", ["seriesuid", "coordX", "coordY", "coordZ", "probability"], rows)
    (tmp_path / "seriesuids.csv").write_text("s1\n")
    kw = dict(luna_csv=tmp_path / "annotations.csv", seriesuids=tmp_path / "seriesuids.csv", n_bootstrap=0)
    s = evaluate_candidates(tmp_path / "candidates.csv", tmp_path / "out", **kw)["result"].summary
    assert (s["n_detections"], s["n_hit_targets"], s["n_false_positives"]) == (99, 0, 99)
    assert s["cpm_exact"] == s["cpm_grid"] == 0.0
    ref = _official(tmp_path / "candidates.csv", tmp_path / "annotations.csv", None, tmp_path / "seriesuids.csv")
    assert (ref["n_hit_targets"], ref["n_false_positives"]) == (0, 99)
    # No cap: the hit at 0.5 comes after all 101 false positives above it ... 99 FP, then 1 hit + 2 FP.
    s = evaluate_candidates(tmp_path / "candidates.csv", tmp_path / "out2", max_marks_per_scan=None,
                            **kw)["result"].summary
    assert (s["n_hit_targets"], s["n_false_positives"]) == (1, 101)
    # 0 sensitivity up to 99 FP/scan, then 1: every CPM rate (<= 8 FP/scan) reads 0.
    assert s["cpm_exact"] == 0.0
    # 101 marks where the 101st (0.5) is below the 100th: exactly 100 kept.
    det = read_luna_candidates(tmp_path / "candidates.csv").iloc[2:]
    det = pd.concat([det, det.iloc[:1].assign(prob=0.4)])
    kept = cap_marks(det, 100)
    assert len(det) == 101 and len(kept) == 100 and kept.prob.min() == 0.5


def test_cpm_conventions_differ_where_the_curve_is_steep_below_a_rate():
    from lungzarr.evaluate import cpm_score, froc_curve

    # One scan, two targets. FP at 0.9, hit at 0.8, seven more FPs, hit at 0.1: the curve jumps from 0 to
    # 0.5 at 1 FP/scan and from 0.5 to 1 at 8. Read exactly at 1, the curve is at the top of the jump (0.5);
    # the grid point below 1 (0.9999125) is still before it (0). At 8 the grid has the point 8 itself.
    froc = froc_curve([0.8, 0.1], [0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15], n_targets=2, n_scans=1)
    exact, at_exact = cpm_score(froc, convention="exact")
    grid, at_grid = cpm_score(froc, convention="grid")
    assert at_exact[1.0] == 0.5 and at_grid[1.0] == 0.0
    assert at_exact[8.0] == at_grid[8.0] == 1.0
    assert exact == pytest.approx((0 + 0 + 0 + 0.5 + 0.5 + 0.5 + 1.0) / 7)
    assert grid == pytest.approx((0 + 0 + 0 + 0 + 0.5 + 0.5 + 1.0) / 7)
    with pytest.raises(ValueError, match="convention"):
        cpm_score(froc, convention="paper")


def test_target_and_excluded_ids_stay_distinct(tmp_path):
    header = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
    (tmp_path / "a.csv").write_text(header + "s,1,2,3,5\ns,4,5,6,7\n")
    (tmp_path / "e.csv").write_text(header + "s,10,20,30,-1\n")
    truth = read_luna_annotations(tmp_path / "a.csv", tmp_path / "e.csv")
    assert truth.nodule_id.tolist() == ["luna-0", "luna-1", "luna-excluded-0"]
    assert truth.nodule_id.is_unique and truth.status.tolist() == ["target", "target", "ignore"]
    assert math.isnan(truth.diameter_mm.iloc[2])


def test_csv_numbers_parse_as_python_float(tmp_path):
    # pandas' default converter is not correctly rounded; the official script calls float() on the text.
    values = ["-241.51649999999998", "-171.09400000000002", "0.1", "103.78018411", "-298.38750587"]
    (tmp_path / "c.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\n"
                                    + "".join(f"s,{v},{v},{v},0.5\n" for v in values))
    det = read_luna_candidates(tmp_path / "c.csv")
    assert det.x_mm.tolist() == [float(v) for v in values]
    (tmp_path / "bad.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\ns,1,2,3,\n")
    with pytest.raises(ValueError, match="probability"):
        read_luna_candidates(tmp_path / "bad.csv")


def test_evaluate_cli_refuses_mixed_inputs(tmp_path):
    folder = _synthetic_case(tmp_path, 4, n_scans=3)
    cases = [
        (["evaluate", "-o", str(tmp_path / "o")], "STORE"),
        (["evaluate", str(tmp_path / "s.zarr"), "--luna-csv", str(folder / "annotations.csv"),
          "--seriesuids", str(folder / "seriesuids.csv"), "-o", str(tmp_path / "o")], "--seriesuids"),
        (["evaluate", "--candidates", str(folder / "candidates.csv"), "--luna-csv", str(folder / "annotations.csv"),
          "--lidc-xml", str(tmp_path), "-o", str(tmp_path / "o")], "--lidc-xml"),
        (["evaluate", "--candidates", str(tmp_path / "missing.csv"), "--luna-csv", str(folder / "annotations.csv"),
          "-o", str(tmp_path / "o")], "missing.csv"),
        (["evaluate", "--candidates", str(folder / "candidates.csv"), "--luna-csv", str(folder / "annotations.csv"),
          "--cpm", "paper", "-o", str(tmp_path / "o")], "--cpm"),
    ]
    for args, word in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and word in r.output, (args, r.output)
