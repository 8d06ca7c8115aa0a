"""The ``lungzarr`` command line: thin, every command calls one library function."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table

from lungzarr.errors import LungzarrError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Chest-CT DICOM cohorts to a Zarr store, with lung nodule detection.")
console = Console(stderr=True)

SchedulerOpt = typer.Option("local", "--scheduler",
                            help="'local' (a LocalCluster on this machine), 'threads' (no cluster), "
                                 "or the address of a running dask scheduler, e.g. tcp://127.0.0.1:8786")
ChunkOpt = typer.Option(16, "--chunk-slices", min=1, help="Slices per chunk along z.")
BatchOpt = typer.Option(4, "--batch-size", min=1, help="Patients computed at once (bounds memory).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Redo patients already done.")
PatientsOpt = typer.Option(None, "--patients", help="Only these patient ids (repeat the option).")


@contextmanager
def _progress(title: str, total: int):
    """A rich progress bar fed by the library's ``progress(event, patient)`` callback."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(title, total=total, failed=0)
        failed = 0

        def update(event, patient):
            nonlocal failed
            if event == "failed":
                failed += 1
            bar.update(task, advance=1, failed=failed)

        yield update


def _stage_progress(titles):
    """A rich Progress with one bar per stage; returns (context, factory)."""
    columns = (TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    return Progress(*columns, console=console)


def _fail(exc: Exception):
    console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    raise typer.Exit(2)


def _print_summary(summaries) -> int:
    table = Table(title="lungzarr")
    for col in ("stage", "done", "skipped", "failed", "seconds"):
        table.add_column(col)
    failed = []
    for s in summaries:
        d = s.as_dict()
        table.add_row(*(str(d[c]) for c in ("stage", "done", "skipped", "failed", "seconds")))
        failed.extend(s.failed)
    console.print(table)
    for rec in failed:
        console.print(f"[red]failed[/red] {rec['patient']} ({rec['stage']}): {rec['reason']}"
                      + (f" [dim]file: {rec['file']}[/dim]" if rec.get("file") else ""), soft_wrap=True)
    return 1 if failed else 0


def _progress_factory(bar: Progress):
    def make(stage: str, total: int):
        task = bar.add_task(stage, total=total, failed=0)
        count = {"failed": 0}

        def update(event, patient):
            if event == "failed":
                count["failed"] += 1
            bar.update(task, advance=1, failed=count["failed"])
        return update
    return make


@app.command()
def ingest(input_dir: Path = typer.Argument(..., help="Folder with one sub-folder of DICOM files per patient."),
           store: Path = typer.Argument(..., help="The cohort's Zarr store (created if needed)."),
           chunk_slices: int = ChunkOpt, batch_size: int = BatchOpt, overwrite: bool = OverwriteOpt,
           patients: Optional[list[str]] = PatientsOpt, scheduler: str = SchedulerOpt):
    """Read DICOM series into the store as HU volumes (native grid and 2 mm)."""
    from lungzarr.cluster import dask_client
    from lungzarr.pipeline import find_patients, ingest as ingest_cohort

    try:
        total = len(find_patients(input_dir, patients=patients))
        with dask_client(scheduler, echo=console.print) as client, _stage_progress(["ingest"]) as bar:
            summary = ingest_cohort(input_dir, store, chunk_slices=chunk_slices, overwrite=overwrite,
                                    patients=patients, batch_size=batch_size, client=client,
                                    progress=_progress_factory(bar)("ingest", total))
    except LungzarrError as exc:
        _fail(exc)
    raise typer.Exit(_print_summary([summary]))


@app.command()
def status(store: Path = typer.Argument(..., help="The cohort's Zarr store.")):
    """Per-stage counts, failures with their reasons, and the store's size."""
    from lungzarr.pipeline import store_status

    try:
        info = store_status(store)
    except LungzarrError as exc:
        _fail(exc)
    table = Table(title=f"{store} — {info['n_patients']} patient(s), {info['size_mb']:.1f} MB")
    table.add_column("stage")
    table.add_column("complete")
    table.add_column("failed")
    for stage, row in info["stages"].items():
        table.add_row(stage, str(row["complete"]), str(row["failed"]))
    Console().print(table)
    for rec in info["failures"]:
        Console().print(f"failed {rec['patient']} ({rec['stage']}): {rec['reason']}"
                        + (f" — file: {rec['file']}" if rec.get("file") else ""))


def main():  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
