"""The demo: a synthetic cohort as DICOM, run through the whole pipeline and judged against its truth."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lungzarr.cli._app import DashboardOpt, SchedulerOpt, app
from lungzarr.cli._execute import _execute, _run_checks
from lungzarr.cli._progress import _print_summary


@app.command(short_help='A synthetic cohort as DICOM, run through the pipeline.')
def demo(folder: Path = typer.Option(Path("input/demo"), "--input", help="Where the demo DICOM files go."),
         store: Path = typer.Option(Path("demo.zarr"), "--store", help="The demo's Zarr store."),
         scheduler: str = SchedulerOpt, dashboard_address: Optional[str] = DashboardOpt):
    """Write a synthetic chest-CT cohort as DICOM and run the whole pipeline on it."""
    from lungzarr.demo import run_demo
    from lungzarr.pipeline.stages import stage_names

    result = _execute(lambda client, progress: run_demo(folder, store, client=client, progress=progress),
                      scheduler=scheduler, dashboard_address=dashboard_address, progress=True,
                      checks=_run_checks(store, stage_names(), scheduler=scheduler))
    code = _print_summary(result["summaries"])
    verdict = result["verdict"]
    cols = ["patient", "z_mm", "y_mm", "x_mm", "diameter_mm", "prob_max", "hu_mean", "lung_half"]
    typer.echo("Detections (p > 0.5, original filter; mm in patient coordinates), judged against the phantom")
    detections = verdict.detections.assign(verdict=["hit" if h else "false positive" for h in verdict.detections.hit])
    typer.echo(detections[cols + ["verdict"]].round(1).to_string(index=False) if len(detections) else "none")
    typer.echo("Against the phantom's truth (a hit lies within a true nodule's radius)")
    typer.echo(verdict.text())
    typer.echo(f"store: {store}    QC report: {result['report']} (pictures in its _files folder)")
    raise typer.Exit(code)
