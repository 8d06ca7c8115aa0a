"""The Typer app, its callback (--debug, --verbose, --version), the consoles, and the options commands share."""
from __future__ import annotations

import enum
import os
from pathlib import Path

import typer
from rich.console import Console

from lungzarr.model.geometry import CROPS, DEFAULT_CROP


# rich_markup_mode=None: Typer's rich help shows every flag as "--overwrite <bool>"; Click's plain help
# shows flags as flags (and fits an 80-column terminal as well).
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Chest-CT DICOM cohorts to a Zarr store, with lung nodule detection.")
#: Progress and messages.
console = Console(stderr=True)
#: Data a user may pipe.
out = Console()
#: Set by the app callback: ``--debug`` or ``LUNGZARR_DEBUG=1`` shows the traceback of a run-level error.
_debug = {"on": False}


def _store_location(value):
    """A STORE argument: a directory path, or an object store's URL (``s3://bucket/cohort.zarr``) kept as text."""
    from lungzarr.io.store import is_store_url

    if value is None or isinstance(value, Path):
        return value
    return str(value) if is_store_url(value) else Path(value)


_STORE_HELP = "The cohort's Zarr store: a folder, or an object store's URL (s3://bucket/cohort.zarr)"
StoreArg = typer.Argument(..., parser=_store_location, help=_STORE_HELP + ".", metavar="STORE")
NewStoreArg = typer.Argument(..., parser=_store_location, help=_STORE_HELP + " (created if needed).",
                             metavar="STORE")


def _engine_lines(report: dict | None = None) -> list[str]:
    """What ``--engine auto`` runs on this machine and why (for ``--version -v`` and ``status``), from
    ``report`` (:func:`~lungzarr.pipeline.engine_choice.engine_report`; made here when not given)."""
    if report is None:
        from lungzarr.pipeline.engine_choice import engine_report

        report = engine_report()
    if report["engine"] is None:
        return [f"engine auto on this machine: {report['reason']}"]
    return [f"engine auto on this machine: {report['engine']} ({report['reason']})"]


def _show_version(verbose: bool):
    from lungzarr._version import __version__

    typer.echo(f"lungzarr {__version__}")
    if verbose:
        from lungzarr.pipeline.engine_choice import engine_report

        report = engine_report()
        typer.echo("packages: " + ", ".join(f"{p} {v}" for p, v in report["versions"].items()))
        cpu = report["cpu"]
        typer.echo(f"cpu: {cpu['model']}, {cpu['logical_cpus']} logical CPUs, {' '.join(cpu['isa_flags'])}")
        for line in _engine_lines(report):
            typer.echo(line)
    raise typer.Exit(0)


@app.callback(invoke_without_command=True)
def _main(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", envvar="LUNGZARR_DEBUG",
                                     help="Show the traceback of an error (also LUNGZARR_DEBUG=1)."),
          verbose: bool = typer.Option(False, "-v", "--verbose",
                                       help="Show every start-up and shutdown message of TensorFlow, absl, XLA, "
                                            "gRPC and dask (hidden by default; also LUNGZARR_VERBOSE=1)."),
          version: bool = typer.Option(False, "--version",
                                       help="Print lungzarr's version and exit (with -v: the engines' versions, "
                                            "the CPU and what --engine auto runs here).")):
    """Chest-CT DICOM cohorts to a Zarr store, with lung nodule detection."""
    if version:  # not eager: -v after --version is read too
        _show_version(verbose)
    if ctx.invoked_subcommand is None:
        ctx.fail("Missing command.")
    _debug["on"] = debug
    if verbose:
        from lungzarr.model.quiet import VERBOSE_ENV

        # The environment, not a global: LocalCluster workers inherit it (lungzarr.model.quiet reads it).
        os.environ[VERBOSE_ENV] = "1"


SchedulerOpt = typer.Option("local", "--scheduler",
                            help="'local' (a LocalCluster on this machine), 'threads' (no cluster), "
                                 "or the address of a running dask scheduler, e.g. tcp://127.0.0.1:8786")
ChunkOpt = typer.Option(16, "--chunk-slices", min=1, help="Slices per chunk along z.")
BatchOpt = typer.Option(4, "--batch-size", min=1,
                        help="Patients in flight per stage (bounds memory; stages of different patients overlap).")
DashboardOpt = typer.Option(None, "--dashboard-address",
                            help="Where the local cluster's dashboard listens; default 127.0.0.1:0 (this machine "
                                 "only: reach it through `ssh -L 8787:127.0.0.1:PORT host`). ':8787' listens on "
                                 "every interface.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Redo patients already done.")
PatientsOpt = typer.Option(None, "--patients", help="Only these patient ids (repeat the option).")
StrictOpt = typer.Option(False, "--strict", help="Every damaged DICOM file is an error (default: a damaged "
                         "slice at either end of the stack is dropped with a warning).")
WeightsOpt = typer.Option(None, "--weights", help="d8 weights (.h5); default the shipped file, sha256-checked.")
LabelsOpt = typer.Option(None, "--labels", help="Labels CSV (id,cancer) for the DSB2017 'cancer' column.")
InferBatchOpt = typer.Option(None, "--infer-batch", min=1,
                             help="8-slice windows per UNet call; default 2 on CPU workers (each window holds "
                                  "~170 MB of the engine's activations), 8 on GPU workers (32 suits a large GPU).")


class Precision(str, enum.Enum):
    """``--precision`` choices (lungzarr.model.d8.PRECISIONS)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


PrecisionOpt = typer.Option(Precision.fp32, "--precision", case_sensitive=False,
                            help="UNet precision on GPU: fp32 (the reference), bf16 or fp16.")


class Engine(str, enum.Enum):
    """``--engine`` choices (lungzarr.model.engines.ENGINES)."""

    auto = "auto"
    keras = "keras"
    openvino = "openvino"
    onnxruntime = "onnxruntime"


EngineOpt = typer.Option(Engine.auto, "--engine", case_sensitive=False,
                         help="What runs the UNet: auto (on CPU workers the faster exact one of Keras and OpenVINO "
                              "here, calibrated once per machine: see `lungzarr --version -v`; Keras on GPU "
                              "workers), keras, openvino, or onnxruntime (pip install 'lungzarr[onnx]').")


#: ``--crop`` choices, one member per :data:`lungzarr.model.geometry.CROPS` (``Crop.lungs``, ``Crop.fixed``).
Crop = enum.Enum("Crop", [(c, c) for c in CROPS], type=str, module=__name__, qualname="Crop")


FoldOpt = typer.Option(True, "--fold-upsampling/--literal-upsampling",
                       help="The d8 network's form: each upsampling folded into the convolution after it (20 % "
                            "fewer multiply-adds, the same function to float32 rounding), or the original's "
                            "literal layers.")

CropOpt = typer.Option(Crop(DEFAULT_CROP), "--crop", case_sensitive=False,
                       help="What the UNet predicts: lungs (one box per patient around its lung mask, the same "
                            "probabilities in the lungs for 1.5x less work, 0 outside the box) or fixed (the "
                            "whole slice, the original's; the DSB2017 feature export needs it). The default, "
                            f"{DEFAULT_CROP}, is the library's too (lungzarr.pipeline.run(crop=...)).")
