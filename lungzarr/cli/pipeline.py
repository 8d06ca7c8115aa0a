"""The pipeline's commands: ingest, run, and the stages one at a time (segment, lungs3d, detect, nodules)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lungzarr.cli._app import (BatchOpt, ChunkOpt, Crop, CropOpt, DashboardOpt, Engine, EngineOpt, FoldOpt,
                               InferBatchOpt, LabelsOpt, NewStoreArg, OverwriteOpt, PatientsOpt, Precision,
                               PrecisionOpt, SchedulerOpt, StoreArg, StrictOpt, WeightsOpt, app, console)
from lungzarr.cli._execute import _execute, _gpu_flag, _run_checks, _stages
from lungzarr.cli._progress import _print_summary


_INPUT_HELP = ("Folder with one entry per patient: a DICOM sub-folder, or a .mhd/.mha/.nii/.nii.gz file; or such a "
               "prefix on object storage (s3://bucket/cohort/, any fsspec URL; credentials from the environment).")


@app.command(short_help='Scans (DICOM, MetaImage, NIfTI) into the store as HU volumes (native and 2 mm).')
def ingest(input_dir: str = typer.Argument(..., help=_INPUT_HELP),  # str: Path turns s3://b/k into s3:/b/k
           store: Path = NewStoreArg,
           chunk_slices: int = ChunkOpt, batch_size: int = BatchOpt, overwrite: bool = OverwriteOpt,
           patients: Optional[list[str]] = PatientsOpt, scheduler: str = SchedulerOpt,
           dashboard_address: Optional[str] = DashboardOpt, strict: bool = StrictOpt):
    """Read DICOM series into the store as HU volumes (native grid and 2 mm)."""
    from lungzarr.pipeline import ingest as ingest_cohort

    summary = _execute(
        lambda client, progress: ingest_cohort(input_dir, store, chunk_slices=chunk_slices, overwrite=overwrite,
                                               patients=patients, batch_size=batch_size, client=client,
                                               progress=progress, strict=strict),
        scheduler=scheduler, dashboard_address=dashboard_address, progress=True,
        checks=_run_checks(store, ["ingest"], scheduler=scheduler))
    raise typer.Exit(_print_summary([summary]))


@app.command(short_help='The whole pipeline, ingest to features.')
def run(input_dir: str = typer.Argument(..., help=_INPUT_HELP),  # str: Path turns s3://b/k into s3:/b/k
        store: Path = NewStoreArg,
        labels: Optional[Path] = LabelsOpt, weights: Optional[Path] = WeightsOpt,
        chunk_slices: int = ChunkOpt, batch_size: int = BatchOpt, precision: Precision = PrecisionOpt,
        infer_batch: Optional[int] = InferBatchOpt, patients: Optional[list[str]] = PatientsOpt,
        overwrite: bool = OverwriteOpt, scheduler: str = SchedulerOpt,
        dashboard_address: Optional[str] = DashboardOpt, strict: bool = StrictOpt, engine: Engine = EngineOpt,
        crop: Crop = CropOpt, fold_upsampling: bool = FoldOpt,
        verify: bool = typer.Option(False, "--verify", help="First read every stored chunk of these patients "
                                                            "and redo the damaged stages (see `lungzarr verify`).")):
    """The whole pipeline: ingest, 2 mm, segment, crop, lungs3d, detect, nodules, features."""
    from lungzarr.pipeline import run as run_pipeline
    from lungzarr.pipeline.stages import stage_names

    summaries = _execute(
        lambda client, progress: run_pipeline(
            input_dir, store, labels=labels, weights=weights, chunk_slices=chunk_slices, batch_size=batch_size,
            precision=precision.value, infer_batch=infer_batch, patients=patients, overwrite=overwrite,
            client=client, gpu=_gpu_flag(client), progress=progress, strict=strict, verify=verify,
            engine=engine.value, crop=crop.value, fold_upsampling=fold_upsampling),
        scheduler=scheduler, dashboard_address=dashboard_address, progress=True,
        checks=_run_checks(store, stage_names(), weights=weights, precision=precision.value, scheduler=scheduler,
                           engine=engine.value))
    raise typer.Exit(_print_summary(summaries))


@app.command(short_help='Lung masks and crop boxes of the ingested patients.')
def segment(store: Path = StoreArg,
            chunk_slices: int = ChunkOpt, batch_size: int = BatchOpt,
            patients: Optional[list[str]] = PatientsOpt, overwrite: bool = OverwriteOpt,
            scheduler: str = SchedulerOpt, dashboard_address: Optional[str] = DashboardOpt):
    """Lung segmentation (and the crop box) of every ingested patient not yet segmented."""
    raise typer.Exit(_print_summary(_stages(
        store, ["segment"], chunk_slices=chunk_slices, batch_size=batch_size, patients=patients,
        overwrite=overwrite, scheduler=scheduler, dashboard_address=dashboard_address)))


@app.command(short_help="The 3-D lung mask (right/left lungs).")
def lungs3d(store: Path = StoreArg,
            chunk_slices: int = ChunkOpt, batch_size: int = BatchOpt,
            patients: Optional[list[str]] = PatientsOpt, overwrite: bool = OverwriteOpt,
            scheduler: str = SchedulerOpt, dashboard_address: Optional[str] = DashboardOpt):
    """The 3-D lung mask (right/left, no airway, no bowel gas) → lung_labels, beside the legacy mask."""
    raise typer.Exit(_print_summary(_stages(
        store, ["lungs3d"], chunk_slices=chunk_slices, batch_size=batch_size, patients=patients,
        overwrite=overwrite, scheduler=scheduler, dashboard_address=dashboard_address)))


@app.command(short_help="The d8 UNet's nodule probability maps.")
def detect(store: Path = StoreArg,
           weights: Optional[Path] = WeightsOpt, precision: Precision = PrecisionOpt,
           infer_batch: Optional[int] = InferBatchOpt, chunk_slices: int = ChunkOpt, batch_size: int = BatchOpt,
           patients: Optional[list[str]] = PatientsOpt, overwrite: bool = OverwriteOpt,
           scheduler: str = SchedulerOpt, dashboard_address: Optional[str] = DashboardOpt,
           engine: Engine = EngineOpt, crop: Crop = CropOpt, fold_upsampling: bool = FoldOpt):
    """The d8 UNet: nodule probability maps of every segmented patient."""
    raise typer.Exit(_print_summary(_stages(
        store, ["detect"], weights=weights, precision=precision.value, infer_batch=infer_batch,
        chunk_slices=chunk_slices, batch_size=batch_size, patients=patients, overwrite=overwrite,
        scheduler=scheduler, dashboard_address=dashboard_address, engine=engine.value, crop=crop.value,
        fold_upsampling=fold_upsampling)))


@app.command(short_help='Per-nodule tables and patient measures; optional export.')
def nodules(store: Path = StoreArg,
            output: Optional[Path] = typer.Option(None, "-o", "--output",
                                                  help="Also export the table: .parquet or .csv"),
            labels: Optional[Path] = LabelsOpt, batch_size: int = BatchOpt,
            patients: Optional[list[str]] = PatientsOpt, overwrite: bool = OverwriteOpt,
            scheduler: str = SchedulerOpt, dashboard_address: Optional[str] = DashboardOpt):
    """Per-nodule tables (and patient measures) of every detected patient; optionally export them."""
    from lungzarr.pipeline import export_nodules

    summaries = _stages(store, ["nodules", "features"], labels=labels, batch_size=batch_size, patients=patients,
                        overwrite=overwrite, scheduler=scheduler, dashboard_address=dashboard_address)
    if output is not None:
        table = _execute(lambda client, progress: export_nodules(store, output))
        console.print(f"{len(table)} nodule rows written to {output}")
    raise typer.Exit(_print_summary(summaries))
