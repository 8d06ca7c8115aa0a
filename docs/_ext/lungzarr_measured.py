"""Measured figures of the site, checked against ``benchmarks/results/`` when the site is built.

A page writes a measured figure as ``{measured}`0.08 s <object_input.json: inputs.LIDC.copy_then_read.wall_s>```:
the figure as the reader sees it, then the results file and the expression of its value. The build
evaluates the expression on the file and fails (a warning, and the site is built with ``-W``) unless
the figure's number is that value at the figure's own precision: ``0.08`` is the value to 2 decimals,
``4,000`` to the thousand, ``130`` to the ten. A re-measured file that changes a figure stops the
build until the page says the new figure, so no figure can drift from its file.

``{measured-on}`object_input.json``` prints where and when a file was measured: its name, its date
(from the file: ``date`` or ``machine.time``; else the date the file entered the repository, said as
such) and its machine's CPU (``machine.cpu_model`` and the number of CPUs; a file without the model
says so). Every file a page measures from must be named by a ``{measured-on}`` of that page.

Expressions are Python, restricted to names (the file's top-level keys), ``.key`` and ``["key"]`` /
``[index]`` access, numbers, ``+ - * /`` and ``min``, ``max``, ``sum``, ``abs``.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
from functools import lru_cache
from pathlib import Path

from docutils import nodes

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
#: The figure's number: digits with optional thousands commas, an optional decimal part.
NUMBER = re.compile(r"[-−]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[-−]?\d+(?:\.\d+)?")
ROLE = re.compile(r"^(?P<figure>.+?)\s*<(?P<file>[\w.-]+\.json)\s*:\s*(?P<expr>.+)>$", re.S)
FUNCTIONS = {"min": min, "max": max, "sum": sum, "abs": abs}


class MeasuredError(ValueError):
    """A measured figure that its results file does not give."""


@lru_cache(maxsize=None)
def load(name: str):
    path = RESULTS / name
    if not path.is_file():
        raise MeasuredError(f"no results file {name!r} in benchmarks/results/")
    return json.loads(path.read_text(encoding="utf-8"))


class _Keys(dict):
    """A JSON object whose keys read as attributes too (``machine.cpu_model``)."""


def _evaluate(node, data):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, data)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in FUNCTIONS:
            return FUNCTIONS[node.id]
        return _get(data, node.id)
    if isinstance(node, ast.Attribute):
        return _get(_evaluate(node.value, data), node.attr)
    if isinstance(node, ast.Subscript):
        return _get(_evaluate(node.value, data), _evaluate(node.slice, data))
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left, right = _evaluate(node.left, data), _evaluate(node.right, data)
        return {ast.Add: lambda: left + right, ast.Sub: lambda: left - right, ast.Mult: lambda: left * right,
                ast.Div: lambda: left / right}[type(node.op)]()
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, data)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        return FUNCTIONS[node.func.id](*(_evaluate(a, data) for a in node.args))
    if isinstance(node, ast.List):
        return [_evaluate(e, data) for e in node.elts]
    raise MeasuredError(f"{ast.unparse(node)!r} is not allowed in a measured expression")


def _get(value, key):
    try:
        return value[key]
    except (KeyError, IndexError, TypeError):
        raise MeasuredError(f"no {key!r} in {_short(value)}") from None


def _short(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(map(repr, list(value)[:8])) + (", …}" if len(value) > 8 else "}")
    return repr(value)[:80]


def value_of(name: str, expression: str) -> float:
    """The value of ``expression`` on the results file ``name``."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise MeasuredError(f"{expression!r} is not an expression: {error.msg}") from None
    value = _evaluate(tree, load(name))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MeasuredError(f"{expression!r} in {name} is {_short(value)}, not a number")
    return value


def check_figure(figure: str, value: float) -> None:
    """Raise unless the number of ``figure`` is ``value`` rounded to the figure's precision."""
    numbers = NUMBER.findall(figure)
    if len(numbers) != 1:
        raise MeasuredError(f"a measured figure holds one number; {figure!r} holds {len(numbers)}")
    text = numbers[0].replace(",", "").replace("−", "-")
    if "." in text:
        digits = len(text.split(".")[1])
    else:
        digits = -(len(text.lstrip("-")) - len(text.lstrip("-").rstrip("0"))) if text.strip("-0") else 0
    if round(value, digits) != round(float(text), digits):
        shown = f"{value:.{max(digits, 0)}f}" if digits >= 0 else f"{round(value, digits):.0f}"
        raise MeasuredError(f"the page says {figure!r}, the results file gives {value!r} ({shown} at the page's "
                            "precision): write the file's figure")


@lru_cache(maxsize=None)
def provenance(name: str) -> str:
    """``benchmarks/results/NAME, measured DATE on CPU``, from the file (and git for an undated file)."""
    data = load(name)
    machine = _first(data, "machine")
    date = data.get("date") if isinstance(data, dict) else None
    date = date or (machine.get("time") if isinstance(machine, dict) else None) or _first(data, "date")
    if date:
        when = f"measured {str(date)[:10]}"
    else:
        added = _added_to_repository(RESULTS / name)
        when = (f"committed {added} (the file records no date)" if added
                else "the file records no date")
    if isinstance(machine, dict):
        count = machine.get("cpu_count") or machine.get("cpus")
        model = machine.get("cpu_model")
        cpus = f"{count} CPUs" if count else "CPUs not recorded"
        cpu = f"{cpus}, {model}" if model else f"{cpus}, model not recorded"
        if not (count or model) and machine.get("platform"):
            cpu = machine["platform"]            # a size, not a speed: the platform is what it depends on
    elif isinstance(machine, str):
        cpu = machine
    elif _first(data, "device"):
        cpu = f"{_first(data, 'device')} (its CPU not recorded)"
    else:
        cpu = "machine not recorded"
    return f"benchmarks/results/{name}, {when} on {cpu}"


def _first(data, key):
    """The value of the first ``key`` in ``data``, depth first (a file may hold several runs' machines)."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = _first(value, key)
            if found is not None:
                return found
    return None


def _added_to_repository(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "log", "--diff-filter=A", "--follow", "--format=%as", "--", path.name],
                             cwd=path.parent, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    dates = out.stdout.split()
    return dates[-1] if out.returncode == 0 and dates else None


def _record(env, key, docname, name):
    getattr(env, key, None) or setattr(env, key, {})
    getattr(env, key).setdefault(docname, set()).add(name)


def measured_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    env = inliner.document.settings.env
    match = ROLE.match(text.strip())
    if not match:
        message = f"{{measured}} takes 'FIGURE <FILE.json: EXPRESSION>', not {text!r}"
        return [nodes.Text(text)], [inliner.reporter.warning(message, line=lineno)]
    figure, file = match["figure"], match["file"]
    try:
        check_figure(figure, value_of(file, match["expr"]))
    except MeasuredError as error:
        return [nodes.Text(figure)], [inliner.reporter.warning(f"{{measured}} {figure!r}: {error}", line=lineno)]
    _record(env, "lungzarr_measured_used", env.docname, file)
    return [nodes.abbreviation(figure, figure, explanation=f"{file}: {match['expr'].strip()}")], []


def measured_on_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    env = inliner.document.settings.env
    file = text.strip()
    try:
        line = provenance(file)
    except MeasuredError as error:
        return [nodes.Text(file)], [inliner.reporter.warning(f"{{measured-on}}: {error}", line=lineno)]
    _record(env, "lungzarr_measured_cited", env.docname, file)
    return [nodes.emphasis(line, line)], []


def _check_cited(app, env):
    from sphinx.util import logging

    used, cited = getattr(env, "lungzarr_measured_used", {}), getattr(env, "lungzarr_measured_cited", {})
    for docname, files in sorted(used.items()):
        for file in sorted(files - cited.get(docname, set())):
            logging.getLogger(__name__).warning(
                f"{docname}: figures from {file} but no {{measured-on}}`{file}` on the page says when and on "
                "which CPU it was measured", location=docname)


def _purge(app, env, docname):
    for key in ("lungzarr_measured_used", "lungzarr_measured_cited"):
        getattr(env, key, {}).pop(docname, None)


def _merge(app, env, docnames, other):
    for key in ("lungzarr_measured_used", "lungzarr_measured_cited"):
        for docname in docnames:
            if docname in getattr(other, key, {}):
                getattr(env, key, None) or setattr(env, key, {})
                getattr(env, key)[docname] = set(getattr(other, key)[docname])


def setup(app):
    app.add_role("measured", measured_role)
    app.add_role("measured-on", measured_on_role)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-check-consistency", _check_cited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
