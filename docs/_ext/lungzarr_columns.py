"""Tables of the site read from lungzarr's own objects at build time.

``lungzarr-columns``: the table of a column dictionary. ``lungzarr-stages``: the stage registry
(``lungzarr.pipeline.stages.STAGES``: name, what it requires, where it runs, what it writes).

``NODULE_COLUMNS`` (name -> (dtype, meaning)) and ``PATIENT_COLUMNS`` (name -> meaning) are what the
code writes and the report describes; the site prints them from the same objects, so a column added
or renamed in the code is added or renamed here at the next build.
"""
from __future__ import annotations

import importlib

from docutils import nodes
from docutils.parsers.rst import Directive


def _row(cells, *, name_as_code=True):
    row = nodes.row()
    for i, text in enumerate(cells):
        entry = nodes.entry()
        cell = nodes.literal(text=text) if i == 0 and name_as_code else nodes.Text(text)
        entry += nodes.paragraph("", "", cell)
        row += entry
    return row


class ColumnsDirective(Directive):
    """``.. lungzarr-columns:: module.NAME``: a table of the dictionary ``NAME`` of ``module``."""

    required_arguments = 1

    def run(self):
        module_name, _, attr = self.arguments[0].rpartition(".")
        columns = getattr(importlib.import_module(module_name), attr)
        rows = [(name, *value) if isinstance(value, tuple) else (name, value) for name, value in columns.items()]
        return [_table(rows)]


class StagesDirective(Directive):
    """``.. lungzarr-stages::``: the registered stages, in run order."""

    def run(self):
        from lungzarr.pipeline.stages import STAGES

        rows = [(s.name, ", ".join(s.requires) or "-", "GPU workers when there are any" if s.placement == "gpu" else "CPU workers",
                 s.summary) for s in STAGES]
        return [_table(rows, header=("stage", "requires", "runs on", "what it writes"), widths=(12, 14, 14, 60))]


def _table(rows, *, header=None, widths=None):
    """A docutils table of ``rows`` (tuples of str), the first column as code."""
    width = len(rows[0])
    header = header or (("column", "dtype", "meaning") if width == 3 else ("column", "meaning"))
    table = nodes.table()
    group = nodes.tgroup(cols=width)
    table += group
    for w in widths or ((22, 10, 68) if width == 3 else (25, 75)):
        group += nodes.colspec(colwidth=w)
    head = nodes.thead()
    head += _row(header, name_as_code=False)
    group += head
    body = nodes.tbody()
    for row in rows:
        body += _row(row)
    group += body
    return table


def setup(app):
    app.add_directive("lungzarr-columns", ColumnsDirective)
    app.add_directive("lungzarr-stages", StagesDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
