"""evaluate: sensitivity, FP per scan, FROC and CPM of a store (or a candidates CSV) against annotations."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lungzarr.cli._app import _store_location, app, console, out
from lungzarr.cli._execute import _execute, _fail
from lungzarr.errors import LungzarrError


@app.command(short_help='Sensitivity, FP per scan, FROC and CPM vs annotations.')
def evaluate(store: Optional[Path] = typer.Argument(None, parser=_store_location,
                                                    help="The cohort's Zarr store (or give --candidates)."),
             output: Path = typer.Option(..., "-o", "--output", help="Folder for results.json, CSVs and froc.png."),
             lidc_xml: Optional[Path] = typer.Option(None, "--lidc-xml", help="LIDC-IDRI XML file or folder. "
                                                     "With a STORE, exactly one of --lidc-xml and --luna-csv."),
             luna_csv: Optional[Path] = typer.Option(None, "--luna-csv", help="LUNA16 annotations.csv. "
                                                     "With a STORE, exactly one of --lidc-xml and --luna-csv."),
             luna_excluded: Optional[Path] = typer.Option(
                 None, "--luna-excluded", help="LUNA16 annotations_excluded.csv: findings neither hit nor FP."),
             candidates: Optional[Path] = typer.Option(
                 None, "--candidates", help="Score this LUNA16 candidates CSV instead of a store (needs --luna-csv)."),
             seriesuids: Optional[Path] = typer.Option(
                 None, "--seriesuids", help="With --candidates: LUNA16 seriesuids.csv, the scans evaluated."),
             threshold: float = typer.Option(0.5, "--threshold", help="Nodule-table threshold of the detections."),
             filtered: bool = typer.Option(False, "--filtered", help="Only detections passing the DSB filter."),
             min_readers: int = typer.Option(3, "--min-readers", help="Readers needed for a target nodule."),
             min_diameter: float = typer.Option(3.0, "--min-diameter", help="Smallest target diameter (mm)."),
             max_marks: int = typer.Option(100, "--max-marks",
                                           help="LUNA16's cap of marks per scan (official tie rule); 0: none."),
             cpm: str = typer.Option("exact", "--cpm", help="Which CPM is `cpm`: exact (LUNA16 paper) or grid; "
                                                            "results.json has both."),
             n_bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap samples for the CPM interval.")):
    """Sensitivity, false positives per scan, FROC and CPM against reader annotations.

    With a STORE the annotations come from exactly one of --lidc-xml and --luna-csv; --candidates FILE scores
    a LUNA16 candidates CSV against --luna-csv without a store.
    """
    from lungzarr.evaluate import CPM_CONVENTIONS
    from lungzarr.pipeline import evaluate_candidates, evaluate_store

    if cpm not in CPM_CONVENTIONS:
        _fail(LungzarrError(f"--cpm must be one of {list(CPM_CONVENTIONS)!r}, got {cpm!r}"))
    cap = max_marks or None
    if candidates is not None:
        if store is not None or lidc_xml is not None or luna_csv is None:
            _fail(LungzarrError("--candidates FILE is scored against --luna-csv FILE [--luna-excluded FILE] "
                                "[--seriesuids FILE], without a STORE or --lidc-xml"))
        result = _execute(lambda client, progress: evaluate_candidates(
            candidates, output, luna_csv=luna_csv, luna_excluded=luna_excluded, seriesuids=seriesuids,
            n_bootstrap=n_bootstrap, max_marks_per_scan=cap, cpm_convention=cpm),
            errors=(LungzarrError, ValueError))
    else:
        if store is None:
            _fail(LungzarrError("give a STORE, or --candidates FILE with --luna-csv FILE"))
        if seriesuids is not None:
            _fail(LungzarrError("--seriesuids goes with --candidates; a store's scans are its patients"))
        if (lidc_xml is None) == (luna_csv is None):
            given = "both" if lidc_xml is not None else "neither"
            _fail(LungzarrError(f"evaluate needs exactly one source of annotations, {given} given: pass "
                                f"--lidc-xml DIR_OR_FILE (LIDC-IDRI reader XML) or --luna-csv FILE (LUNA16 "
                                f"annotations.csv)"))
        result = _execute(lambda client, progress: evaluate_store(
            store, output, lidc_xml=lidc_xml, luna_csv=luna_csv, luna_excluded=luna_excluded, threshold=threshold,
            filtered=filtered, min_readers=min_readers, min_diameter_mm=min_diameter, n_bootstrap=n_bootstrap,
            max_marks_per_scan=cap, cpm_convention=cpm),
            errors=(LungzarrError, ValueError))
    s = result["result"].summary
    ci = s.get("cpm_ci")
    ci_text = f" (CI {ci[0]:.3f}–{ci[1]:.3f})" if ci and None not in ci else ""
    out.print(f"{s['n_scans']} scan(s), {s['n_targets']} target nodule(s): sensitivity "
              f"{s['sensitivity']:.3f} at {s['fps_per_scan']:.2f} FP/scan; CPM {s['cpm']:.4f} ({s['cpm_convention']}; "
              f"exact {s['cpm_exact']:.4f}, grid {s['cpm_grid']:.4f}){ci_text}", soft_wrap=True, highlight=False)
    if s.get("n_outside_nodules"):
        console.print(f"{s['n_outside_nodules']} annotated nodule(s) lie outside the scanned slices and are not "
                      f"scored (status 'outside' in nodules.csv)", soft_wrap=True, highlight=False)
    if result.get("unmatched"):
        console.print(f"no annotation for {len(result['unmatched'])} patient(s): {result['unmatched'][:5]}")
    if result.get("dropped_candidates"):
        console.print(f"{result['dropped_candidates']} candidate(s) of series not evaluated left out")
    console.print(f"written: {', '.join(str(v) for v in result['files'].values())}", soft_wrap=True,
                  highlight=False)
