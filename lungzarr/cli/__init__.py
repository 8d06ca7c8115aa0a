"""The ``lungzarr`` command line: thin, every command calls one library function.

Every long command goes through :func:`_execute`: run-level checks first (before
a cluster starts), then the cluster, the progress bars and the library call; a
:class:`~lungzarr.errors.LungzarrError` or an error of the machine (a full disk)
becomes one message and exit code 2, and SIGINT/SIGTERM one sentence and exit
code 130/143.
Progress and messages go to stderr; data a user may pipe (tables, the demo's
verdict, evaluation figures) to stdout.

The package: ``_app`` (the Typer app, its callback, the options shared by
commands), ``_execute`` (the one way a command runs: checks, cluster, signals,
errors), ``_progress`` (the bars, the lines and the summary table), and one
module per command group: ``pipeline`` (ingest, run, segment, lungs3d,
detect, nodules), ``exports`` (export, import-legacy), ``inspection`` (qc,
report, verify, status), ``demo`` and ``evaluation`` (evaluate). A command
module registers its commands on :data:`app` when imported, below.
"""
from __future__ import annotations

from lungzarr.cli._app import app
# Imported for their @app.command registrations; the order is the order of `lungzarr --help`.
from lungzarr.cli import pipeline, exports, inspection, demo, evaluation  # noqa: F401,I001

__all__ = ["app", "main"]


def main():  # pragma: no cover - console entry point
    app()
