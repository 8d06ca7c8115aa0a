"""What a command shows while it runs and after: one bar per stage on a terminal, plain lines elsewhere,
the per-stage summary table."""
from __future__ import annotations

import threading
import time
from typing import Callable

from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lungzarr.cli._app import console


def _stage_progress():
    """A rich Progress that shows one bar per stage (fed by :func:`_bar_progress`)."""
    columns = (TextColumn("[bold]{task.description:<9}"), BarColumn(), TextColumn("{task.fields[patients]} done,"),
               TextColumn("{task.fields[failed]} failed"), TextColumn("{task.fields[chunks]}"), TimeElapsedColumn(),
               TextColumn("ETA {task.fields[eta]}"))
    return Progress(*columns, console=console)


def _in_flight(view) -> str:
    """``chunks 3/8``: the z-chunks computed of the patients a stage computes now (empty when none)."""
    done, total = view.chunks
    return f"chunks {done}/{total}" if total else ""


def _eta(view) -> str | None:
    left = view.eta(time.monotonic())
    return None if left is None else _seconds(left)


def _bar_progress(bar: Progress):
    """The pipeline's progress protocol (:class:`~lungzarr.pipeline.runner.ProgressEvent`) as rich bars: each
    stage's bar moves with every z-chunk computed; its ETA shows once one of its patients is done."""
    from lungzarr.pipeline.progress import ProgressBoard

    board, tasks = ProgressBoard(), {}

    def progress(event):
        board(event)
        if event.event == "begin":
            tasks[event.stage] = bar.add_task(event.stage, total=event.total, failed=0,
                                              patients=f"0/{event.total}", chunks="", eta="-")
            return
        view = board.view(event.stage)
        bar.update(tasks[event.stage], completed=view.completed, failed=view.counts.get("failed", 0),
                   patients=f"{view.finished}/{view.total}", chunks=_in_flight(view), eta=_eta(view) or "-")
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

    One line per patient and stage as it ends (``ingest P1 done 2.3 s``: its
    computation time, as the summary's ``compute s`` counts it;
    ``detect P2 failed after 1.2 s: reason``), and every ``interval`` seconds
    one line with each stage's done/failed/left counts, the z-chunks of the
    patients in flight and, once one of its patients is done, the stage's
    ETA, so a log shows that a long run is alive and moving.
    """

    def __init__(self, write: Callable[[str], None], *, interval: float = SUMMARY_INTERVAL_S):
        from lungzarr.pipeline.progress import ProgressBoard

        self.write, self.interval = write, interval
        self.totals, self.counts = {}, {}
        self.board = ProgressBoard()
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
                view = self.board.view(stage)
                if _in_flight(view):
                    part += f" ({_in_flight(view)} in flight)"
                if _eta(view):
                    part += f", ETA {_eta(view)}"
            parts.append(part)
        return f"after {_seconds(time.monotonic() - self.started)}: " + "; ".join(parts)

    def __call__(self, event):
        self.board(event)
        if event.event in ("started", "chunk"):  # in the summary lines, not a line each
            return
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
    lines = _LineProgress(_write_line)
    return lines, lambda: lines


def _write_line(text: str) -> None:
    """One progress line, as it is, on the console's stream (not a terminal here): rich's ``print`` of a line
    cost ~0.25 ms of the run's CPU, ~8 lines per patient (``benchmarks/README.md``)."""
    stream = console.file
    stream.write(text + "\n")
    stream.flush()


def _print_summary(summaries) -> int:
    """The per-stage table, the INPUT entries not used and the failures; the exit code (1 if any failed).

    Per stage two times, labelled: the compute time (its tasks' time on the
    workers added up, :attr:`~lungzarr.pipeline.runner.StageSummary.work_seconds`:
    no queueing) and the wall span (its first start to its last end). Streamed
    stages overlap, so neither column adds up to the run's duration.
    """
    table = Table(title="lungzarr")
    for col, justify in (("stage", "left"), ("done", "right"), ("skipped", "right"), ("failed", "right"),
                         ("compute s", "right"), ("wall span s", "right")):
        table.add_column(col, justify=justify)
    failed = []
    for s in summaries:
        d = s.as_dict()
        table.add_row(str(d["stage"]), str(d["done"]), str(d["skipped"]), str(d["failed"]),
                      "?" if s.work_seconds is None else f"{s.work_seconds:.1f}", f"{s.seconds:.1f}")
        failed.extend(s.failed)
    console.print(table)
    console.print("compute: the time a stage's tasks ran on the workers, added up (they run in parallel; "
                  "queueing not counted; ? where a lost worker took its figures); wall span: its first start to "
                  "its last end (stages overlap)", soft_wrap=True, highlight=False)
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
