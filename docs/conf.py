"""Sphinx configuration of lungzarr's documentation site.

Built with warnings as errors by ``tests/test_docs.py`` (``sphinx-build -W -b html docs OUT``); the
pages are MyST Markdown, the API reference is generated from the numpydoc docstrings, and the column
tables from the dictionaries the code uses (:data:`lungzarr.algorithms.nodules.NODULE_COLUMNS`,
:data:`lungzarr.pipeline.tables.PATIENT_COLUMNS`), so none of them can drift from the code.
Every ``python`` block of these pages is executed by ``tests/test_docs.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))          # the checkout's lungzarr, not another installed copy

from lungzarr._version import __version__  # noqa: E402

project = "lungzarr"
author = "lungzarr developers"
copyright = "lungzarr developers, MIT licence"
version = release = __version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "numpydoc", "lungzarr_columns", "lungzarr_measured"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# docs/README.md is the folder's index for readers of the repository on GitHub, not a page.
exclude_patterns = ["README.md", "_build"]

# Headings get anchors down to level 3, so pages link to sections as `page.md#section`.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# The docstrings are numpydoc; no autosummary pages are generated (one page, api.md, holds them all).
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
autodoc_typehints = "none"
autodoc_default_options = {"members": False}
# Docstrings cite lungzarr's own names in single backticks; keep them as code, not as broken references.
default_role = "literal"

html_theme = "alabaster"
html_title = f"lungzarr {version}"
html_theme_options = {"description": "Chest-CT cohorts to a Zarr store; lung nodules at cohort scale",
                      "fixed_sidebar": True, "page_width": "1100px", "sidebar_width": "230px"}
html_static_path: list[str] = []
