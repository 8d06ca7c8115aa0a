"""Tables and images out of the store (export), the old pipeline's outputs into it (import-legacy)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from lungzarr.cli._app import DashboardOpt, LabelsOpt, OverwriteOpt, PatientsOpt, StoreArg, app, console
from lungzarr.cli._execute import _execute
from lungzarr.cli._progress import _print_summary
from lungzarr.errors import LungzarrError


@app.command(short_help='The original DSB2017 per-patient feature table (CSV).')
def export(store: Path = StoreArg,
           output: Path = typer.Option(..., "-o", "--output",
                                       help="CSV to write (a folder for --format nifti or dicom-seg)."),
           fmt: str = typer.Option("keras8_0313", "--format",
                                   help="keras8_0313 (2525 columns), keras_0311 or base_8 (DSB2017 tables); "
                                        "luna16 (candidates CSV); nifti (lung mask and nodule labels); dicom-seg "
                                        "(a DICOM SEG of lung and nodules per DICOM patient; needs "
                                        "`pip install 'lungzarr[seg]'`)."),
           labels: Optional[Path] = LabelsOpt, patients: Optional[list[str]] = PatientsOpt,
           threshold: float = typer.Option(0.5, "--threshold",
                                           help="luna16/nifti/dicom-seg: the nodule-table threshold of the "
                                                "candidates."),
           filtered: bool = typer.Option(False, "--filtered",
                                         help="luna16/dicom-seg: only candidates passing the DSB filter "
                                              "(as evaluate --filtered)."),
           scheduler: str = typer.Option("threads", "--scheduler", help="As for `run`; default threads."),
           dashboard_address: Optional[str] = DashboardOpt):
    """The original DSB2017 per-patient feature table, LUNA16 candidates, NIfTI masks, or DICOM SEG."""
    from lungzarr.pipeline import export_dicom_seg, export_dsb2017, export_luna16, export_nifti

    if fmt == "luna16":
        table = _execute(lambda client, progress: export_luna16(store, output, threshold=threshold,
                                                                 filtered=filtered),
                         errors=(LungzarrError, ValueError))
        console.print(f"{len(table)} candidate(s) of {table.seriesuid.nunique()} series written to {output}")
        return
    if fmt == "dicom-seg":
        result = _execute(lambda client, progress: export_dicom_seg(store, output, threshold=threshold,
                                                                    filtered=filtered, patients=patients),
                          errors=(LungzarrError, ValueError))
        console.print(f"{len(result['written'])} DICOM SEG file(s) written to {output}")
        for p, reason in result["skipped"].items():
            console.print(f"skipped {p}: {escape(reason)}")
        for p, failure in result["failed"].items():
            console.print(f"[red]failed[/red] {p}: {escape(failure['reason'])}"
                          + (f" (file {escape(str(failure['file']))})" if failure["file"] else ""))
        console.print(f"summary: {result['summary']}")
        # A patient that could not be exported (moved source files) is the user's to fix: exit 1, as `run`.
        raise typer.Exit(1 if result["failed"] else 0)
    if fmt == "nifti":
        written = _execute(lambda client, progress: export_nifti(store, output, threshold=threshold,
                                                                 patients=patients),
                           errors=(LungzarrError, ValueError))
        n_nod = sum(v["nodules"] is not None for v in written.values())
        console.print(f"{len(written)} lung mask(s) and {n_nod} nodule label image(s) written to {output}")
        return
    table = _execute(lambda client, progress: export_dsb2017(store, output, fmt=fmt, labels=labels,
                                                             patients=patients, client=client),
                     scheduler=scheduler, dashboard_address=dashboard_address, errors=(LungzarrError, ValueError))
    console.print(f"{len(table)} patient row(s) x {table.shape[1]} columns written to {output}")


@app.command("import-legacy", short_help="The old pipeline's npz outputs into a store.")
def import_legacy(input_dir: Path = typer.Argument(..., help="The old project's input/ folder (stage1_* npz)."),
                  store: Path = StoreArg,
                  stage: str = typer.Option("stage1", "--stage", help="Folder prefix: stage1 or stage2."),
                  overwrite: bool = OverwriteOpt):
    """Bring the old pipeline's npz outputs into a store (then `nodules` and `export` work on them)."""
    from lungzarr.pipeline import import_legacy as import_cohort

    summary = _execute(lambda client, progress: import_cohort(input_dir, store, stage=stage, overwrite=overwrite,
                                                              progress=progress),
                       progress=True, errors=(LungzarrError, OSError, ValueError))
    raise typer.Exit(_print_summary([summary]))
