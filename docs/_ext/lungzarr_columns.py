"""A ``lungzarr-columns`` directive: the table of a column dictionary of lungzarr, read at build time.

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
        width = len(rows[0])
        header = ("column", "dtype", "meaning") if width == 3 else ("column", "meaning")
        table = nodes.table()
        group = nodes.tgroup(cols=width)
        table += group
        for w in ((22, 10, 68) if width == 3 else (25, 75)):
            group += nodes.colspec(colwidth=w)
        head = nodes.thead()
        head += _row(header, name_as_code=False)
        group += head
        body = nodes.tbody()
        for row in rows:
            body += _row(row)
        group += body
        return [table]


def setup(app):
    app.add_directive("lungzarr-columns", ColumnsDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
