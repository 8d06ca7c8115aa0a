"""The ``lungzarr`` command line: thin, every command calls one library function.

Every long command goes through :func:`_execute`: run-level checks first (before
a cluster starts), then the cluster, the progress bars and the library call; a
:class:`~lungzarr.errors.LungzarrError` or an error of the machine (a full disk)
becomes one message and exit code 2, and SIGINT/SIGTERM one sentence and exit
code 130/143.
Progress and messages go to stderr; data a user may pipe (tables, the demo's
verdict, evaluation figures) to stdout.
"""
from __future__ import annotations

import enum
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lungzarr.errors import LungzarrError, RunStopError

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
    from lungzarr.io.storage import is_store_url

    if value is None or isinstance(value, Path):
        return value
    return str(value) if is_store_url(value) else Path(value)


_STORE_HELP = "The cohort's Zarr store: a folder, or an object store's URL (s3://bucket/cohort.zarr)"
StoreArg = typer.Argument(..., parser=_store_location, help=_STORE_HELP + ".", metavar="STORE")
NewStoreArg = typer.Argument(..., parser=_store_location, help=_STORE_HELP + " (created if needed).",
                             metavar="STORE")


def _show_version(value: bool):
    if value:
        from lungzarr._version import __version__

        typer.echo(f"lungzarr {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", envvar="LUNGZARR_DEBUG",
                                     help="Show the traceback of an error (also LUNGZARR_DEBUG=1)."),
          verbose: bool = typer.Option(False, "-v", "--verbose",
                                       help="Show every start-up and shutdown message of TensorFlow, absl, XLA, "
                                            "gRPC and dask (hidden by default; also LUNGZARR_VERBOSE=1)."),
          version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print lungzarr's version and exit.")):
    """Chest-CT DICOM cohorts to a Zarr store, with lung nodule detection."""
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
                         help="What runs the UNet: auto (OpenVINO on CPU workers when installed, Keras on GPU "
                              "workers), keras, openvino, or onnxruntime (pip install 'lungzarr[onnx]').")


class Crop(str, enum.Enum):
    """``--crop`` choices (lungzarr.model.geometry.CROPS)."""

    fixed = "fixed"
    lungs = "lungs"


FoldOpt = typer.Option(True, "--fold-upsampling/--literal-upsampling",
                       help="The d8 network's form: each upsampling folded into the convolution after it (20 % "
                            "fewer multiply-adds, the same function to float32 rounding), or the original's "
                            "literal layers.")

CropOpt = typer.Option(Crop.fixed, "--crop", case_sensitive=False,
                       help="What the UNet predicts: fixed (the whole slice, the original's; the DSB2017 export "
                            "needs it) or lungs (one box per patient around its lung mask: the same "
                            "probabilities in the lungs for less work, 0 outside the box).")


# ---------------------------------------------------------------------- the one way a command runs

def _stage_progress():
    """A rich Progress that shows one bar per stage (fed by :func:`_bar_progress`)."""
    columns = (TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    return Progress(*columns, console=console)


def _bar_progress(bar: Progress):
    """The pipeline's progress protocol (:class:`~lungzarr.pipeline.runner.ProgressEvent`) as rich bars."""
    tasks, failed = {}, {}

    def progress(event):
        if event.event == "begin":
            tasks[event.stage] = bar.add_task(event.stage, total=event.total, failed=0)
            failed[event.stage] = 0
            return
        if event.event == "failed":
            failed[event.stage] += 1
        bar.update(tasks[event.stage], advance=1, failed=failed[event.stage])
        for line in _warning_lines(event):  # above the bars, as they come
            bar.console.print(f"[yellow]warning[/yellow] {escape(line)}", soft_wrap=True, highlight=False)
    return progress


#: Warnings shown per patient and stage in the run's output (then a count); `lungzarr status` lists them all.
WARNINGS_SHOWN = 3


def _warning_lines(event) -> list[str]:
    """A done patient's warnings, one line each after ``warning``: at most :data:`WARNINGS_SHOWN`, then a count."""
    records = list(event.warnings)
    head = f"{event.patient} ({event.stage}): "
    lines = [head + str(r.get("reason")) + (f" — file: {r['file']}" if r.get("file") else "")
             for r in records[:WARNINGS_SHOWN]]
    if len(records) > WARNINGS_SHOWN:
        lines.append(head + f"{len(records) - WARNINGS_SHOWN} more warning(s); `lungzarr status STORE` lists "
                            f"them all")
    return lines


#: Seconds between the summary lines of :class:`_LineProgress`.
SUMMARY_INTERVAL_S = 60.0


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 600 else f"{value / 60:.1f} min"


class _LineProgress:
    """The progress protocol as plain lines, for a stderr that is not a terminal (a log file, CI, a batch job).

    One line per patient and stage as it ends (``ingest P1 done 2.3 s``,
    ``detect P2 failed after 1.2 s: reason``), and every ``interval`` seconds
    one line with each stage's done/failed/left counts, so a log shows that a
    long run is alive.
    """

    def __init__(self, write: Callable[[str], None], *, interval: float = SUMMARY_INTERVAL_S):
        self.write, self.interval = write, interval
        self.totals, self.counts = {}, {}
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.interval and self.interval > 0:
            self._thread = threading.Thread(target=self._tick, name="lungzarr-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return False

    def _tick(self):
        while not self._stop.wait(self.interval):
            with self._lock:
                if self.totals and self._left():
                    self.write(self.summary_line())

    def _left(self) -> int:
        return sum(self.totals[s] - sum(self.counts[s].values()) for s in self.totals)

    def summary_line(self) -> str:
        """``after 2.0 min: ingest 3/3 done; segment 1/3 done, 1 failed, 1 left; ...``."""
        parts = []
        for stage, total in self.totals.items():
            c = self.counts[stage]
            done = c.get("done", 0) + c.get("skipped", 0)
            left = total - sum(c.values())
            part = f"{stage} {done}/{total} done"
            if c.get("failed"):
                part += f", {c['failed']} failed"
            if c.get("blocked"):
                part += f", {c['blocked']} blocked"
            if left:
                part += f", {left} left"
            parts.append(part)
        return f"after {_seconds(time.monotonic() - self.started)}: " + "; ".join(parts)

    def __call__(self, event):
        with self._lock:
            if event.event == "begin":
                self.totals[event.stage] = event.total or 0
                self.counts[event.stage] = {}
                return
            counts = self.counts.setdefault(event.stage, {})
            counts[event.event] = counts.get(event.event, 0) + 1
            line = f"{event.stage} {event.patient} {event.event}"
            if event.event == "done" and event.seconds is not None:
                line += f" {_seconds(event.seconds)}"
            elif event.event == "failed":
                if event.seconds is not None:
                    line += f" after {_seconds(event.seconds)}"
                if event.reason:
                    line += f": {event.reason}"
            elif event.event == "skipped":
                line += " (done already)"
            elif event.event == "blocked":
                line += " (a stage it needs is missing or failed)"
            self.write(line)
            for warning in _warning_lines(event):
                self.write("warning " + warning)


def _progress_display():
    """Rich bars on a terminal; :class:`_LineProgress` lines elsewhere. Yields (context, progress callable)."""
    if console.is_terminal:
        bar = _stage_progress()
        return bar, lambda: _bar_progress(bar)
    lines = _LineProgress(lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True))
    return lines, lambda: lines


def _fail(exc: Exception, *, cause: BaseException | None = None):
    """One message and exit code 2; the traceback (of ``cause``, else ``exc``) too with ``--debug``."""
    from lungzarr.io.locations import blank_secrets

    if _debug["on"]:
        sys.stderr.write(blank_secrets("".join(traceback.format_exception(cause or exc))))
    console.print(f"[red]error:[/red] {escape(blank_secrets(str(exc)))}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command: raised once, in the main thread, by :func:`_stop_on_signals`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: Seconds between the tries of an interrupt that arrived while distributed's ``sync`` waited.
INTERRUPT_RETRY_S = 0.05


def _inside_distributed_sync(frame) -> bool:
    """Whether the main thread waits in ``distributed.utils.sync`` (a client call run on its event loop).

    An exception raised there makes distributed schedule a ``cancel`` of a
    future that may not exist yet, which fails with a NameError traceback in
    the event loop's thread (distributed 2025.x).
    """
    tail = os.path.join("distributed", "utils.py")
    while frame is not None:
        if frame.f_code.co_name == "sync" and frame.f_code.co_filename.endswith(tail):
            return True
        frame = frame.f_back
    return False


@contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM stop the command cleanly: the first raises :class:`_Interrupted`, so the
    runner cancels the work in flight and the cluster closes; a second one while that happens stops the
    process at once (the store is then as after a kill: writes are atomic per patient and stage, the next run
    resumes). Outside the main thread (where no handler can be set) nothing changes.

    A signal that arrives while the main thread waits in a dask client call is
    raised a moment later, once the call returned (the signal is sent again to
    this process every :data:`INTERRUPT_RETRY_S` until then).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"signum": None, "raised": False}

    def handler(signum, frame):
        if state["raised"]:
            os.write(2, b"\ninterrupted again: stopping at once; run the same command again to resume\n")
            os._exit(128 + state["signum"])
        state["signum"] = state["signum"] or signum
        if _inside_distributed_sync(frame):
            threading.Timer(INTERRUPT_RETRY_S, os.kill, (os.getpid(), signum)).start()
            return
        state["raised"] = True
        raise _Interrupted(state["signum"])

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Tally:
    """The patients through every stage of a command (done or skipped in its last stage), for the
    sentence of an interrupt. Stages begin in run order, before any patient."""

    def __init__(self):
        self.last, self.total, self.done = None, 0, set()

    def __call__(self, event):
        if event.event == "begin":
            self.last, self.total, self.done = event.stage, event.total or 0, set()
        elif event.stage == self.last and event.event in ("done", "skipped"):
            self.done.add(event.patient)


def _interrupted(signum: int, seconds: float, tally: _Tally):
    """The one sentence of an interrupted command; exit code 128 + the signal's number (130, 143)."""
    text = f"interrupted ({signal.Signals(signum).name}) after {_seconds(seconds)}"
    if tally.last is not None:
        text += f": {len(tally.done)} of {tally.total} patient(s) done"
    console.print(text + "; run the same command again to resume", soft_wrap=True, highlight=False, markup=False)
    # Work the interrupt abandoned (zarr's asynchronous writes of a stage not committed) leaves coroutines
    # that were never awaited; Python would report each one as this process exits ("sys:1: RuntimeWarning").
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    raise typer.Exit(128 + signum)


def _execute(work: Callable, *, scheduler: str | None = None, dashboard_address: str | None = None,
             checks: Callable | None = None, progress: bool = False, errors=(LungzarrError,)):
    """Run ``work(client, progress)``: checks first, then the cluster and the bars; errors → exit 2.

    Parameters
    ----------
    work : callable
        ``work(client, progress)`` calls one library function; ``client`` is
        None without a ``scheduler``, ``progress`` None without ``progress=True``.
    scheduler, dashboard_address : str, optional
        Open a dask cluster (:func:`lungzarr.cluster.dask_client`) around the call.
    checks : callable, optional
        Run-level checks, called before the cluster starts.
    progress : bool
        Show one progress bar per stage on a terminal, one line per patient
        and stage (and a summary line a minute) elsewhere.
    errors : tuple of exception types
        What becomes one message and exit code 2. So does an error of the
        machine (a full disk, a read-only file system, memory, an object store
        that does not answer): one sentence, never a traceback.

    Notes
    -----
    SIGINT (Ctrl-C) and SIGTERM stop the command cleanly (:func:`_stop_on_signals`):
    the work in flight is cancelled, the cluster closed, one sentence says
    how many patients are done, and the exit code is 130 or 143.
    """
    started, tally = time.monotonic(), _Tally()
    try:
        with _stop_on_signals():
            if checks is not None:
                checks()
            if scheduler is None:
                cluster = nullcontext(None)
            else:
                from lungzarr.cluster import dask_client

                cluster = dask_client(scheduler, echo=console.print, dashboard_address=dashboard_address)
            display, callback = _progress_display() if progress else (nullcontext(None), lambda: None)
            with cluster as client, display:
                shown = callback()
                return work(client, None if shown is None else lambda event: (tally(event), shown(event)))
    except KeyboardInterrupt as exc:
        _interrupted(getattr(exc, "signum", signal.SIGINT), time.monotonic() - started, tally)
    except errors as exc:
        _fail(exc)
    except Exception as exc:
        from lungzarr.pipeline.runner import machine_reason

        reason = machine_reason(exc)
        if reason is None:
            raise  # a defect of lungzarr: its traceback is what a report needs
        _fail(RunStopError(reason), cause=exc)


def _run_checks(store, stages, *, weights=None, precision="fp32", scheduler=None, create=True, engine=None):
    def checks():
        from lungzarr.pipeline.checks import check_run_config

        check_run_config(store=store, stages=stages, weights=weights, precision=precision, scheduler=scheduler,
                         create=create, engine=engine)
    return checks


def _read_checks(store, *, scheduler=None):
    """The run-level checks of a command that only reads the store: it exists, the scheduler's spelling."""
    def checks():
        from lungzarr.pipeline.checks import check_scheduler, check_store

        if scheduler is not None:
            check_scheduler(scheduler)
        check_store(store, create=False, write=False)
    return checks


def _gpu_flag(client) -> bool:
    from lungzarr.cluster import gpu_worker_count

    n = gpu_worker_count(client)
    if n:
        console.print(f"{n} GPU worker(s): the UNet runs there only")
    return n > 0


def _print_summary(summaries) -> int:
    """The per-stage table, the INPUT entries not used and the failures; the exit code (1 if any failed).

    Per stage two times, labelled: the work (its patients' computations added
    up) and the wall span (its first start to its last end). Streamed stages
    overlap, so neither column adds up to the run's duration.
    """
    table = Table(title="lungzarr")
    for col, justify in (("stage", "left"), ("done", "right"), ("skipped", "right"), ("failed", "right"),
                         ("work s", "right"), ("wall span s", "right")):
        table.add_column(col, justify=justify)
    failed = []
    for s in summaries:
        d = s.as_dict()
        table.add_row(str(d["stage"]), str(d["done"]), str(d["skipped"]), str(d["failed"]),
                      f"{s.work_seconds:.1f}", f"{s.seconds:.1f}")
        failed.extend(s.failed)
    console.print(table)
    console.print("work: a stage's per-patient computations added up (they run in parallel); wall span: its "
                  "first start to its last end (stages overlap)", soft_wrap=True, highlight=False)
    for s in summaries:
        for rec in s.ignored:
            console.print(f"[yellow]not used[/yellow] {escape(str(rec['file']))}: {escape(rec['reason'])}",
                          soft_wrap=True)
        for rec in s.redone:
            console.print(f"[yellow]redone[/yellow] {escape(str(rec['patient']))} ({s.stage}): "
                          f"{escape(rec['reason'])}; the stages computed from it are redone too (in this run, or the next "
                          f"that runs them)", soft_wrap=True)
    for rec in failed:
        console.print(f"[red]failed[/red] {escape(str(rec['patient']))} ({rec['stage']}): {escape(rec['reason'])}"
                      + (f" [dim]file: {escape(str(rec['file']))}[/dim]" if rec.get("file") else ""), soft_wrap=True)
    return 1 if failed else 0


def _stages(store, stages, **options):
    """Later stages on the patients already in the store (segment, detect, nodules+features)."""
    from lungzarr.pipeline import run as run_pipeline

    scheduler, dashboard_address = options.pop("scheduler"), options.pop("dashboard_address")
    summaries = _execute(
        lambda client, progress: run_pipeline(None, store, stages=stages, client=client, gpu=_gpu_flag(client),
                                              progress=progress, **options),
        scheduler=scheduler, dashboard_address=dashboard_address, progress=True,
        checks=_run_checks(store, stages, weights=options.get("weights"),
                           precision=options.get("precision", "fp32"), scheduler=scheduler, create=False,
                           engine=options.get("engine")))
    return summaries


# ---------------------------------------------------------------------- commands

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
    """The whole pipeline: ingest, 2 mm, segment, crop, detect, nodules, features."""
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


@app.command(short_help="One patient's QC picture (three planes, lungs, nodules).")
def qc(store: Path = StoreArg,
       patient: str = typer.Argument(..., help="Patient id."),
       output: Path = typer.Option(..., "-o", "--output", help="PNG to write.")):
    """Axial, coronal and sagittal planes of one patient with the lung outline and nodules."""
    from lungzarr.reports.html import qc_patient

    path = _execute(lambda client, progress: qc_patient(store, patient, output))
    console.print(f"QC picture written to {path}")


@app.command(short_help='A cohort QC report (HTML).')
def report(store: Path = StoreArg,
           output: Path = typer.Option(..., "-o", "--output", help="HTML file; PNGs go to <name>_files/.")):
    """A cohort QC report: per-patient views, nodule tables, cohort distributions, failures."""
    from lungzarr.reports.html import write_report

    path = _execute(lambda client, progress: write_report(store, output))
    console.print(f"report written to {path}")


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


def _damage_line(rec) -> str:
    if rec.get("patient") is None:  # the store's own: a cohort table, the consolidated metadata
        return f"damaged store ({rec['array']}): {rec['reason']} — file: {rec['file']}"
    array = f" {rec['array']}" if rec.get("array") else ""
    return f"damaged {rec['patient']} ({rec['stage']}){array}: {rec['reason']} — file: {rec['file']}"


@app.command(short_help='Read every stored chunk; list damaged patients (--repair: record and rebuild).')
def verify(store: Path = StoreArg,
           patients: Optional[list[str]] = PatientsOpt, scheduler: str = SchedulerOpt,
           dashboard_address: Optional[str] = DashboardOpt,
           repair: bool = typer.Option(False, "--repair", help="Record what is found (`lungzarr status` lists it), "
                                                               "unmark the damaged stages for the next run, rebuild "
                                                               "the cohort tables and the consolidated metadata. "
                                                               "Without it nothing is written.")):
    """Read every chunk of every completed stage and check what the store knows of itself (patients the
    tables or the consolidated metadata name, the tables); list what is damaged (exit 1 if any).

    Writes nothing (a read-only store can be verified) unless ``--repair``.
    """
    from lungzarr.pipeline import verify_store

    report = _execute(lambda client, progress: verify_store(store, patients=patients, client=client,
                                                            repair=repair),
                      scheduler=scheduler, dashboard_address=dashboard_address,
                      checks=_run_checks(store, [], scheduler=scheduler, create=False) if repair
                      else _read_checks(store, scheduler=scheduler))
    damaged = report.damaged_stages()
    found = ([f"{len(damaged)} patient(s) damaged"] if damaged else []) + (
        [f"{len(report.store_damage)} problem(s) of the store itself"] if report.store_damage else [])
    console.print(f"{len(report.patients)} patient(s), {report.arrays} array(s), {report.chunks} chunk(s) "
                  f"({report.bytes / 1e6:.1f} MB) read in {report.seconds:.1f} s: "
                  + (", ".join(found) if found else "no damage"), soft_wrap=True)
    for rec in report.store_damage + report.damage:
        out.print(_damage_line(rec), soft_wrap=True, markup=False, highlight=False)
    if report.writer:
        console.print(f"[yellow]note[/yellow]: a run ({escape(report.writer)}) is writing this store: what it is "
                      f"rewriting may show as damage; verify again once it has finished", soft_wrap=True)
    if report.unchecksummed:
        console.print(f"{len(report.unchecksummed)} array(s) were written before lungzarr checksummed every chunk "
                      f"(e.g. {report.unchecksummed[0]}): read, but a missing chunk there is not seen as damage; "
                      f"`lungzarr run INPUT STORE --overwrite` rewrites them with checksums", soft_wrap=True)
    for line in report.repaired:
        out.print(f"repaired: {line}", soft_wrap=True, markup=False, highlight=False)
    if found and not repair:
        console.print("`lungzarr verify --repair STORE` records this (`lungzarr status` lists it), rebuilds the "
                      "tables and the consolidated metadata and unmarks the damaged stages; `lungzarr run INPUT "
                      "STORE --verify` redoes the damaged stages (and every later one) and ingests lost patients "
                      "again", soft_wrap=True)
    elif damaged:
        console.print("`lungzarr run INPUT STORE --verify` redoes the damaged stages (and every later one) and "
                      "ingests lost patients again", soft_wrap=True)
    raise typer.Exit(1 if damaged or (report.store_damage and not repair) else 0)


@app.command(short_help='Per-stage counts, failures, damage, warnings, size.')
def status(store: Path = StoreArg):
    """Per-stage counts, failures with their reasons, damage, warnings, and the store's size."""
    from lungzarr.pipeline import store_status

    info = _execute(lambda client, progress: store_status(store))
    # The store's name on its own line, not a table title: a long path wraps there, not mid-phrase.
    out.print(f"{store}: {info['n_patients']} patient(s), {info['size_mb']:.1f} MB", markup=False,
              highlight=False, soft_wrap=True)
    table = Table()
    for col, justify in (("stage", "left"), ("complete", "right"), ("failed", "right"), ("damaged", "right")):
        table.add_column(col, justify=justify)
    for stage, row in info["stages"].items():
        table.add_row(stage, str(row["complete"]), str(row["failed"]), str(row["damaged"]))
    out.print(table)
    for rec in info["failures"]:
        out.print(f"failed {rec['patient']} ({rec['stage']}): {rec['reason']}"
                  + (f" — file: {rec['file']}" if rec.get("file") else ""), markup=False, highlight=False, soft_wrap=True)
    for rec in info["damage"]:
        out.print(_damage_line(rec), soft_wrap=True, markup=False, highlight=False)
    for rec in info["warnings"]:
        out.print(f"warning {rec['patient']} ({rec['stage']}): {rec['reason']}"
                  + (f" — file: {rec['file']}" if rec.get("file") else ""), markup=False, highlight=False, soft_wrap=True)


def main():  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
