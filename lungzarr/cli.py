"""The ``lungzarr`` command line: thin, every command calls one library function."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lungzarr.errors import LungzarrError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Chest-CT DICOM cohorts to a Zarr store, with lung nodule detection.")
console = Console(stderr=True)

SchedulerOpt = typer.Option("local", "--scheduler",
                            help="'local' (a LocalCluster on this machine), 'threads' (no cluster), "
                                 "or the address of a running dask scheduler, e.g. tcp://127.0.0.1:8786")
ChunkOpt = typer.Option(16, "--chunk-slices", min=1, help="Slices per chunk along z.")
BatchOpt = typer.Option(4, "--batch-size", min=1,
                        help="Patients in flight per stage (bounds memory; stages of different patients overlap).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Redo patients already done.")
PatientsOpt = typer.Option(None, "--patients", help="Only these patient ids (repeat the option).")


def _stage_progress():
    """A rich Progress that shows one bar per stage (see :func:`_bar_progress`)."""
    columns = (TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    return Progress(*columns, console=console)


def _fail(exc: Exception):
    from rich.markup import escape

    # escape: a message's own brackets (paths, "lungzarr[onnx]") are not rich markup.
    console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
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


def _bar_progress(bar: Progress):
    """The pipeline's progress protocol drawn as one rich bar per stage."""
    tasks, failed = {}, {}

    def progress(event):
        if event.event == "begin":
            tasks[event.stage] = bar.add_task(event.stage, total=event.total, failed=0)
            failed[event.stage] = 0
            return
        if event.event == "failed":
            failed[event.stage] += 1
        bar.update(tasks[event.stage], advance=1, failed=failed[event.stage])
    return progress


StrictOpt = typer.Option(False, "--strict", help="Every damaged DICOM file is an error (default: a damaged "
                         "slice at either end of the stack is dropped with a warning).")


@app.command()
def ingest(input_dir: Path = typer.Argument(..., help="Folder with one sub-folder of DICOM files per patient."),
           store: Path = typer.Argument(..., help="The cohort's Zarr store (created if needed)."),
           chunk_slices: int = ChunkOpt, batch_size: int = BatchOpt, overwrite: bool = OverwriteOpt,
           patients: Optional[list[str]] = PatientsOpt, scheduler: str = SchedulerOpt,
           strict: bool = StrictOpt):
    """Read DICOM series into the store as HU volumes (native grid and 2 mm)."""
    from lungzarr.cluster import dask_client
    from lungzarr.pipeline import ingest as ingest_cohort

    try:
        with dask_client(scheduler, echo=console.print) as client, _stage_progress() as bar:
            summary = ingest_cohort(input_dir, store, chunk_slices=chunk_slices, overwrite=overwrite,
                                    patients=patients, batch_size=batch_size, client=client,
                                    progress=_bar_progress(bar), strict=strict)
    except LungzarrError as exc:
        _fail(exc)
    raise typer.Exit(_print_summary([summary]))


WeightsOpt = typer.Option(None, "--weights", help="d8 weights (.h5); default the shipped file, sha256-checked.")
PrecisionOpt = typer.Option("fp32", "--precision", help="UNet precision on GPU: fp32, bf16 or fp16.")
LabelsOpt = typer.Option(None, "--labels", help="Labels CSV (id,cancer) for the DSB2017 'cancer' column.")
InferBatchOpt = typer.Option(8, "--infer-batch", min=1, help="8-slice windows per UNet batch (32 suits a GPU).")


class Engine(str, Enum):
    """``--engine`` choices (lungzarr.model.engines.ENGINES)."""

    auto = "auto"
    keras = "keras"
    openvino = "openvino"
    onnxruntime = "onnxruntime"


EngineOpt = typer.Option(Engine.auto, "--engine", case_sensitive=False,
                         help="What runs the UNet: auto (OpenVINO on CPU workers when installed, Keras on GPU "
                              "workers), keras, openvino, or onnxruntime (pip install 'lungzarr[onnx]').")


def _gpu_flag(client) -> bool:
    from lungzarr.cluster import gpu_worker_count

    n = gpu_worker_count(client)
    if n:
        console.print(f"{n} GPU worker(s): the UNet runs there only")
    return n > 0


@app.command()
def run(input_dir: Path = typer.Argument(..., help="Folder with one sub-folder of DICOM files per patient."),
        store: Path = typer.Argument(..., help="The cohort's Zarr store (created if needed)."),
        labels: Optional[Path] = LabelsOpt, weights: Optional[Path] = WeightsOpt,
        chunk_slices: int = ChunkOpt, batch_size: int = BatchOpt, precision: str = PrecisionOpt,
        infer_batch: int = InferBatchOpt, patients: Optional[list[str]] = PatientsOpt,
        overwrite: bool = OverwriteOpt, scheduler: str = SchedulerOpt, strict: bool = StrictOpt,
        engine: Engine = EngineOpt):
    """The whole pipeline: ingest, 2 mm, segment, crop, detect, nodules, features."""
    from lungzarr.cluster import dask_client
    from lungzarr.pipeline import run as run_pipeline

    try:
        with dask_client(scheduler, echo=console.print) as client, _stage_progress() as bar:
            summaries = run_pipeline(input_dir, store, labels=labels, weights=weights, chunk_slices=chunk_slices,
                                     batch_size=batch_size, precision=precision, infer_batch=infer_batch,
                                     patients=patients, overwrite=overwrite, client=client,
                                     gpu=_gpu_flag(client), engine=engine.value,
                                     progress=_bar_progress(bar), strict=strict)
    except LungzarrError as exc:
        _fail(exc)
    raise typer.Exit(_print_summary(summaries))


def _process(store, stages, **kwargs):
    from lungzarr.cluster import dask_client
    from lungzarr.pipeline import run as run_pipeline

    scheduler = kwargs.pop("scheduler")
    try:
        with dask_client(scheduler, echo=console.print) as client, _stage_progress() as bar:
            summaries = run_pipeline(None, store, stages=stages, client=client, gpu=_gpu_flag(client),
                                     progress=_bar_progress(bar), **kwargs)
    except LungzarrError as exc:
        _fail(exc)
    raise typer.Exit(_print_summary(summaries))


@app.command()
def segment(store: Path = typer.Argument(..., help="The cohort's Zarr store."),
            chunk_slices: int = ChunkOpt, batch_size: int = BatchOpt,
            patients: Optional[list[str]] = PatientsOpt, overwrite: bool = OverwriteOpt,
            scheduler: str = SchedulerOpt):
    """Lung segmentation (and the crop box) of every ingested patient not yet segmented."""
    _process(store, ["segment"], chunk_slices=chunk_slices, batch_size=batch_size, patients=patients,
             overwrite=overwrite, scheduler=scheduler)


@app.command()
def detect(store: Path = typer.Argument(..., help="The cohort's Zarr store."),
           weights: Optional[Path] = WeightsOpt, precision: str = PrecisionOpt,
           infer_batch: int = InferBatchOpt, chunk_slices: int = ChunkOpt, batch_size: int = BatchOpt,
           patients: Optional[list[str]] = PatientsOpt, overwrite: bool = OverwriteOpt,
           scheduler: str = SchedulerOpt, engine: Engine = EngineOpt):
    """The d8 UNet: nodule probability maps of every segmented patient."""
    _process(store, ["detect"], weights=weights, precision=precision, infer_batch=infer_batch,
             chunk_slices=chunk_slices, engine=engine.value,
             batch_size=batch_size, patients=patients, overwrite=overwrite, scheduler=scheduler)


@app.command()
def nodules(store: Path = typer.Argument(..., help="The cohort's Zarr store."),
            output: Optional[Path] = typer.Option(None, "-o", "--output",
                                                  help="Also export the table: .parquet or .csv"),
            labels: Optional[Path] = LabelsOpt, batch_size: int = BatchOpt,
            patients: Optional[list[str]] = PatientsOpt, overwrite: bool = OverwriteOpt,
            scheduler: str = SchedulerOpt):
    """Per-nodule tables (and patient measures) of every detected patient; optionally export them."""
    from lungzarr.cluster import dask_client
    from lungzarr.pipeline import export_nodules
    from lungzarr.pipeline import run as run_pipeline

    try:
        with dask_client(scheduler, echo=console.print) as client, _stage_progress() as bar:
            summaries = run_pipeline(None, store, stages=["nodules", "features"], labels=labels,
                                     batch_size=batch_size, patients=patients, overwrite=overwrite, client=client,
                                     progress=_bar_progress(bar))
        if output is not None:
            table = export_nodules(store, output)
            console.print(f"{len(table)} nodule rows written to {output}")
    except LungzarrError as exc:
        _fail(exc)
    raise typer.Exit(_print_summary(summaries))


@app.command()
def export(store: Path = typer.Argument(..., help="The cohort's Zarr store."),
           output: Path = typer.Option(..., "-o", "--output", help="CSV to write."),
           fmt: str = typer.Option("keras8_0313", "--format",
                                   help="keras8_0313 (2525 columns), keras_0311 or base_8."),
           labels: Optional[Path] = LabelsOpt, patients: Optional[list[str]] = PatientsOpt,
           scheduler: str = typer.Option("threads", "--scheduler", help="As for `run`; default threads.")):
    """The original DSB2017 per-patient feature table, column for column."""
    from lungzarr.cluster import dask_client
    from lungzarr.pipeline import export_dsb2017

    try:
        with dask_client(scheduler, echo=console.print) as client:
            table = export_dsb2017(store, output, fmt=fmt, labels=labels, patients=patients, client=client)
    except (LungzarrError, ValueError) as exc:
        _fail(exc)
    console.print(f"{len(table)} patient row(s) x {table.shape[1]} columns written to {output}")


@app.command("import-legacy")
def import_legacy(input_dir: Path = typer.Argument(..., help="The old project's input/ folder (stage1_* npz)."),
                  store: Path = typer.Argument(..., help="The cohort's Zarr store."),
                  stage: str = typer.Option("stage1", "--stage", help="Folder prefix: stage1 or stage2."),
                  overwrite: bool = OverwriteOpt):
    """Bring the old pipeline's npz outputs into a store (then `nodules` and `export` work on them)."""
    from lungzarr.pipeline import import_legacy as import_cohort

    try:
        with _stage_progress() as bar:
            summary = import_cohort(input_dir, store, stage=stage, overwrite=overwrite,
                                    progress=_bar_progress(bar))
    except (LungzarrError, OSError, ValueError) as exc:
        _fail(exc)
    raise typer.Exit(_print_summary([summary]))


@app.command()
def qc(store: Path = typer.Argument(..., help="The cohort's Zarr store."),
       patient: str = typer.Argument(..., help="Patient id."),
       output: Path = typer.Option(..., "-o", "--output", help="PNG to write.")):
    """Axial, coronal and sagittal planes of one patient with the lung outline and nodules."""
    from lungzarr.reports.html import qc_patient

    try:
        path = qc_patient(store, patient, output)
    except LungzarrError as exc:
        _fail(exc)
    console.print(f"QC picture written to {path}")


@app.command()
def report(store: Path = typer.Argument(..., help="The cohort's Zarr store."),
           output: Path = typer.Option(..., "-o", "--output", help="HTML file; PNGs go to <name>_files/.")):
    """A cohort QC report: per-patient views, nodule tables, cohort distributions, failures."""
    from lungzarr.reports.html import write_report

    try:
        path = write_report(store, output)
    except LungzarrError as exc:
        _fail(exc)
    console.print(f"report written to {path}")


@app.command()
def demo(folder: Path = typer.Option(Path("input/demo"), "--input", help="Where the demo DICOM files go."),
         store: Path = typer.Option(Path("demo.zarr"), "--store", help="The demo's Zarr store."),
         scheduler: str = SchedulerOpt):
    """Write a synthetic chest-CT cohort as DICOM and run the whole pipeline on it."""
    from lungzarr.cluster import dask_client
    from lungzarr.demo import run_demo

    try:
        with dask_client(scheduler, echo=console.print) as client, _stage_progress() as bar:
            result = run_demo(folder, store, client=client, progress=_bar_progress(bar))
    except LungzarrError as exc:
        _fail(exc)
    code = _print_summary(result["summaries"])
    cols = ["patient", "z_mm", "y_mm", "x_mm", "diameter_mm", "prob_max", "hu_mean", "lung_half"]
    typer.echo("Nodules found (p > 0.5, original filter; mm in patient coordinates)")
    typer.echo(result["nodules"][cols].round(1).to_string(index=False))
    typer.echo("Phantom nodules and the nearest detection")
    typer.echo(result["truth"].round(1).to_string(index=False))
    typer.echo(f"store: {store}    QC report: {result['report']} (pictures in its _files folder)")
    raise typer.Exit(code)


@app.command()
def evaluate(store: Path = typer.Argument(..., help="The cohort's Zarr store."),
             output: Path = typer.Option(..., "-o", "--output", help="Folder for results.json, CSVs and froc.png."),
             lidc_xml: Optional[Path] = typer.Option(None, "--lidc-xml", help="LIDC-IDRI XML file or folder."),
             luna_csv: Optional[Path] = typer.Option(None, "--luna-csv", help="LUNA16 annotations.csv."),
             threshold: float = typer.Option(0.5, "--threshold", help="Nodule-table threshold of the detections."),
             filtered: bool = typer.Option(False, "--filtered", help="Only detections passing the DSB filter."),
             min_readers: int = typer.Option(3, "--min-readers", help="Readers needed for a target nodule."),
             min_diameter: float = typer.Option(3.0, "--min-diameter", help="Smallest target diameter (mm)."),
             n_bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap samples for the CPM interval.")):
    """Sensitivity, false positives per scan, FROC and CPM against reader annotations."""
    from lungzarr.pipeline import evaluate_store

    try:
        out = evaluate_store(store, output, lidc_xml=lidc_xml, luna_csv=luna_csv, threshold=threshold,
                             filtered=filtered, min_readers=min_readers, min_diameter_mm=min_diameter,
                             n_bootstrap=n_bootstrap)
    except (LungzarrError, ValueError) as exc:
        _fail(exc)
    s = out["result"].summary
    Console().print(f"{s['n_scans']} scan(s), {s['n_targets']} target nodule(s): sensitivity "
                    f"{s['sensitivity']:.3f} at {s['fps_per_scan']:.2f} FP/scan; CPM {s['cpm']:.3f} "
                    f"(CI {s['cpm_ci']})")
    if out["unmatched"]:
        console.print(f"no annotation for {len(out['unmatched'])} patient(s): {out['unmatched'][:5]}")
    Console().print(f"written: {', '.join(str(v) for v in out['files'].values())}")


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
    for rec in info["warnings"]:
        Console().print(f"warning {rec['patient']} ({rec['stage']}): {rec['reason']}"
                        + (f" — file: {rec['file']}" if rec.get("file") else ""))


def main():  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
