"""Looking at a store: qc (one patient's picture), report (HTML), verify (every chunk), status (counts)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from lungzarr.cli._app import DashboardOpt, PatientsOpt, SchedulerOpt, StoreArg, _engine_lines, app, console, out
from lungzarr.cli._execute import _execute, _read_checks, _run_checks


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


def _damage_line(rec) -> str:
    if rec.get("patient") is None:  # the store's own: a cohort table, a patient's listing
        return f"damaged store ({rec['array']}): {rec['reason']} — file: {rec['file']}"
    array = f" {rec['array']}" if rec.get("array") else ""
    return f"damaged {rec['patient']} ({rec['stage']}){array}: {rec['reason']} — file: {rec['file']}"


@app.command(short_help='Read every stored chunk; list damaged patients (--repair: record and rebuild).')
def verify(store: Path = StoreArg,
           patients: Optional[list[str]] = PatientsOpt, scheduler: str = SchedulerOpt,
           dashboard_address: Optional[str] = DashboardOpt,
           repair: bool = typer.Option(False, "--repair", help="Record what is found (`lungzarr status` lists it), "
                                                               "unmark the damaged stages for the next run, rebuild "
                                                               "the cohort tables and stale per-patient "
                                                               "consolidated metadata. Without it nothing is "
                                                               "written.")):
    """Read every chunk of every completed stage and check what the store knows of itself (patients the
    tables name, the tables, each patient's consolidated metadata); list what is damaged (exit 1 if any).

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
                      "tables and stale per-patient consolidated metadata and unmarks the damaged stages; "
                      "`lungzarr run INPUT STORE --verify` redoes the damaged stages (and every later one) and "
                      "ingests lost patients again", soft_wrap=True)
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
    for line in _engine_lines():
        out.print(line, markup=False, highlight=False)
