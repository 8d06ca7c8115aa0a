"""The documentation cannot go stale: the site builds with warnings as errors, and every example runs.

Every ```` ```python ```` block of README.md and of the site's pages (``docs/**/*.md``) is executed, in
order, one namespace per file, in a fresh folder that holds the demo store as ``demo.zarr``, the
folder where a reader ran ``lungzarr demo``. A block that cannot run in a test (a server, a
cluster) is opened with ```` ```python skip (why) ```` and is only compiled.

The demo store here is the demo's real DICOM cohort through every stage but one: its ``nodule_prob``
is written from the phantom's known nodules (p 0.99 inside each) instead of the UNet, which takes
minutes on CPU; the slow test at the end runs the README's example after the real ``run_demo``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
#: The Markdown files whose examples run: the README and every page of the site.
MARKDOWN = [REPO / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]
#: A fenced block: its info string (language and arguments) and its text.
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
DOCS_TOOLS = ("sphinx", "myst_parser", "numpydoc")


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """The ``python`` blocks of a Markdown file: (line of the block's first code line, code, skip reason).

    The skip reason is None for a block that runs, else the text after ``skip`` (never empty).
    """
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        info = match.group(1).strip()
        words = info.split(maxsplit=1)
        if not words or words[0] != "python":
            continue
        line = text.count("\n", 0, match.start(2)) + 1
        skip = None
        if len(words) == 2:
            argument = words[1].strip()
            if not argument.startswith("skip"):
                raise ValueError(f"{path}:{line - 1}: unknown argument {argument!r} of a python block; "
                                 "only 'skip (why)' is known")
            skip = argument[len("skip"):].strip(" ()")
            if not skip:
                raise ValueError(f"{path}:{line - 1}: a skipped python block must say why: ```python skip (why)")
        blocks.append((line, match.group(2), skip))
    return blocks


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO))


FILES_WITH_EXAMPLES = [p for p in MARKDOWN if any(skip is None for _, _, skip in python_blocks(p))]


# ---------------------------------------------------------------------- the demo store, once per session

@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    """A folder as `lungzarr demo` leaves it, with its first patient: ``input/demo/`` and ``demo.zarr``."""
    from test_report import _write_prob

    from lungzarr.demo import demo_truth, write_demo_cohort
    from lungzarr.pipeline import run

    folder = tmp_path_factory.mktemp("demo")
    write_demo_cohort(folder / "input" / "demo", n_patients=1)      # DEMO-001, with nodules: seconds, not a minute
    store = folder / "demo.zarr"
    run(folder / "input" / "demo", store, stages=["ingest", "segment", "lungs3d"])
    truth = demo_truth()
    for patient in sorted({p.name for p in (folder / "input" / "demo").iterdir()}):
        spheres = [(row, 0.99) for row in truth[truth.patient == patient].to_dict("records")]
        _write_prob(store, patient, spheres)
    run(None, store, stages=["nodules", "features"])
    return folder


def _run_examples(path: Path, workdir: Path) -> int:
    """Execute the python blocks of ``path`` in order, in ``workdir``; return how many ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scope: dict = {"__name__": "__main__"}
    ran = 0
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for line, code, skip in python_blocks(path):
            # Blank lines first, so a traceback names the line of the Markdown file.
            source = "\n" * (line - 1) + code
            compiled = compile(source, str(path), "exec")
            if skip is None:
                exec(compiled, scope)
                ran += 1
    finally:
        os.chdir(cwd)
        plt.close("all")
    return ran


#: What a page's examples leave in their folder: the tutorial's figures and its labels CSV.
WRITES = {"docs/tutorials/analysis.md": ("nodule_sizes_per_lung.png", "DEMO-001_nodules.png", "clinical_labels.csv")}


@pytest.mark.parametrize("path", FILES_WITH_EXAMPLES, ids=_relative)
def test_every_python_example_runs(path, demo_folder, tmp_path):
    """The examples run in a fresh folder beside the demo's store, as a reader would run them."""
    (tmp_path / "demo.zarr").symlink_to(demo_folder / "demo.zarr", target_is_directory=True)
    (tmp_path / "input").symlink_to(demo_folder / "input", target_is_directory=True)
    assert _run_examples(path, tmp_path) > 0
    for name in WRITES.get(_relative(path), ()):
        assert (tmp_path / name).stat().st_size > 0, name


def test_skipped_examples_compile_and_say_why():
    skipped = []
    for path in MARKDOWN:
        for line, code, skip in python_blocks(path):
            if skip is not None:
                compile("\n" * (line - 1) + code, str(path), "exec")
                skipped.append(_relative(path))
    # None: the SLURM recipe, which needs a cluster, is a file that tests/test_slurm.py runs and the page
    # includes (docs/recipes/slurm_dask.py). A new skip should be a conscious choice.
    assert skipped == [], skipped


def test_python_blocks_are_found_however_they_are_fenced():
    """A block the collector does not see would never run: every fence that looks like Python is ```python."""
    for path in MARKDOWN:
        for match in FENCE.finditer(path.read_text(encoding="utf-8")):
            language = (match.group(1).split() or [""])[0].lower()
            assert language not in {"py", "python3", "pycon", "ipython", "py3"}, (path, language)
    assert sum(len(python_blocks(p)) for p in MARKDOWN) >= 6


def test_a_broken_example_fails_with_the_markdown_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n```python\nx = 1\n```\n\ntext\n\n```python\ny = x + undefined_name\n```\n")
    with pytest.raises(NameError) as info:
        _run_examples(page, tmp_path)
    frame = info.traceback[-1]
    assert Path(frame.path) == page and frame.lineno + 1 == 10


# ---------------------------------------------------------------------- the site

def test_site_builds_without_a_warning(tmp_path):
    """The site builds with warnings as errors: a broken link, section or docstring fails the suite."""
    missing = [name for name in DOCS_TOOLS if importlib.util.find_spec(name) is None]
    if missing:
        message = (f"the docs extra is not installed ({', '.join(missing)} missing): "
                   "python3 -m pip install -e '.[docs]'")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(DOCS), str(tmp_path / "html")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    from lungzarr.algorithms.nodules import NODULE_COLUMNS

    for name in ("open_cohort", "read_nodules", "read_patients", "patient_nodules", *NODULE_COLUMNS):
        assert name in api, name
    stages = (tmp_path / "html" / "user-guide" / "stages.html").read_text(encoding="utf-8")
    from lungzarr.pipeline.stages import stage_names

    assert all(f">{name}<" in stages for name in stage_names())


def test_readme_is_a_landing_page_with_its_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci.split("python3 -m venv", 1)[1] in text                 # command 2 is what CI runs
    assert ('python3 -m venv .venv && . .venv/bin/activate && python3 -m pip install -e . && lungzarr demo'
            in text)
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (REPO / link).exists(), link


# ---------------------------------------------------------------------- what the pages promise

def test_patient_nodules_takes_a_path_as_read_nodules(demo_folder):
    import pandas as pd

    import lungzarr

    store = demo_folder / "demo.zarr"
    cohort = lungzarr.read_nodules(store)
    one = lungzarr.patient_nodules(str(store), "DEMO-001")
    assert len(one) > 0 and one.patient.eq("DEMO-001").all()
    expected = cohort[cohort.patient == "DEMO-001"].reset_index(drop=True)
    # The cohort table holds its strings as object, the patient's as pandas strings: the values are equal.
    pd.testing.assert_frame_equal(one.reset_index(drop=True)[expected.columns], expected, check_dtype=False)
    assert lungzarr.patient_nodules(store, "DEMO-001").equals(one)        # a Path as well as a str


def test_run_help_names_every_stage():
    from typer.testing import CliRunner

    from lungzarr.cli import app
    from lungzarr.pipeline.stages import stage_names

    text = " ".join(CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output.split())
    for name in stage_names():
        assert name in text, name


@pytest.mark.slow
def test_readme_example_after_the_real_demo(tmp_path):
    """The README's example in a fresh folder after the real demo (the UNet on CPU: minutes)."""
    from lungzarr.demo import run_demo

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        run_demo(report=False)
    finally:
        os.chdir(cwd)
    assert _run_examples(REPO / "README.md", tmp_path) > 0


# ---------------------------------------------------------------------- figures that cannot drift

#: A figure with a unit of time, memory, size, CPU or a package count (the units the pages measure in).
FIGURE = re.compile(r"(?<![\w.§-])~?\d[\d,]*(?:\.\d+)?(?:[–-]\d[\d,]*(?:\.\d+)?)?\s?"
                    r"(?:ms|s|min|h|GB|GiB|MB|MiB|kB|TB|CPU-s|CPU-seconds|seconds|minutes|hours|packages|"
                    r"distributions|%)(?![\w])")
#: A measured figure: checked against its results file when the site is built (docs/_ext/lungzarr_measured.py).
MEASURED_ROLE = re.compile(r"\{measured\}`[^`]*`")
#: Figures that are no measurement, each with the reason (page, the text around it, why).
NOT_MEASURED = [
    ("README.md", "plan about 2 GB of memory", "a plan rounded up from the measured peak, checked below"),
    ("docs/getting-started.md", "Plan about 2 GB of memory", "the same plan"),
    ("docs/getting-started.md", "`ingest P1 done 2.3 s`", "an example of the output's wording"),
    ("docs/getting-started.md", "after 40.1 s", "an example of the output's wording"),
    ("docs/getting-started.md", "`after 3.0 min", "an example of the output's wording"),
    ("docs/user-guide/bad-input.md", "after 41.2 s: 3 of 10", "an example of the message's wording"),
    ("docs/user-guide/clusters.md", "--memory 64GB", "a SLURM job's request in an example"),
    ("docs/user-guide/clusters.md", "--memory 5GB", "the SLURM jobs' request in tests/test_slurm.py"),
    ("docs/user-guide/clusters.md", "no worker within 5 s", "a timeout of the code"),
    ("docs/user-guide/commands.md", "within 5 s", "a timeout of the code"),
    ("docs/user-guide/object-storage.md", "heartbeat every 30 s", "a constant of the code"),
    ("docs/user-guide/object-storage.md", "120 s (`LOCK_TTL_S`)", "a constant of the code"),
    ("docs/user-guide/object-storage.md", "for 120 s (suspended", "the same constant"),
    ("docs/user-guide/object-storage.md", "chunks of at most 8 MB", "a constant of the code (tablelayout.CHUNK_BYTES)"),
    ("docs/user-guide/object-storage.md", "split reads above 50 MB", "s3fs's default block size"),
    ("docs/user-guide/engines.md", "plan about 2 GB per worker", "the plan of getting-started.md"),
    ("docs/user-guide/engines.md", "specks under 5 % of", "a parameter of the algorithm"),
    ("docs/user-guide/engines.md", "20 % fewer", "arithmetic: multiply-adds of the folded network (algorithms §5)"),
    ("docs/user-guide/engines.md", "the file is 2.3 MB", "the size of models/d8_2x2x2_best_weights.h5, checked below"),
    ("docs/user-guide/exports.md", "nodules: 0.9 GB", "arithmetic: 300 x 512 x 512 voxels x 11 segments x 1 byte"),
    ("docs/user-guide/stages.md", "(70, 86, 91, 95 % of all", "shares of a nodule's voxels kept (validation)"),
    ("docs/user-guide/stages.md", "39 % and 38 % kept", "shares of a nodule's voxels kept (validation)"),
    ("docs/algorithms.md", "by more than 5 % (`SPACING_RTOL`)", "a tolerance of the code"),
    ("docs/algorithms.md", "99.995 %", "agreement of decisions, not a time or a size"),
    ("docs/algorithms.md", "(−20 %", "arithmetic: multiply-adds of the folded network"),
    ("docs/algorithms.md", "4 % fewer", "arithmetic: multiply-adds"),
    ("docs/algorithms.md", "smaller than 5 % of the", "a parameter of the algorithm"),
    ("docs/algorithms.md", "about 0.3 %", "an effect on lvol stated by the specification"),
    ("docs/algorithms.md", "at least 5 % of the largest", "a parameter of the algorithm"),
]


def _unmeasured_figures(path: Path) -> list[tuple[int, str]]:
    """(line, figure) of every figure with a unit outside a ``{measured}`` role and outside NOT_MEASURED."""
    text = path.read_text(encoding="utf-8")
    blanked = MEASURED_ROLE.sub(lambda m: " " * len(m.group()), text)
    for page, context, _ in NOT_MEASURED:
        if page == _relative(path):
            assert context in blanked, f"{page}: NOT_MEASURED names {context!r}, which the page no longer says"
            blanked = blanked.replace(context, " " * len(context))
    return [(text.count("\n", 0, m.start()) + 1, m.group()) for m in FIGURE.finditer(blanked)]


def test_every_figure_comes_from_a_results_file():
    """A time, size or memory figure on a page is a {measured} role (checked at build time) or named above."""
    found = {f"{_relative(p)}:{line}": figure for p in MARKDOWN if p.name != "benchmarks.md"
             for line, figure in _unmeasured_figures(p)}
    assert not found, ("figures without a results file: write them as {measured}`FIGURE <FILE.json: EXPRESSION>` "
                       f"(docs/_ext/lungzarr_measured.py) or remove them: {found}")


def test_the_figures_that_are_no_measurement_hold():
    import json

    whole = json.loads((REPO / "benchmarks/results/stages_whole_cpu.json").read_text())
    peak_gb = whole["rounds"][0]["table"]["end_to_end"]["pipeline_peak_rss_per_worker_mb"] / 1000
    assert peak_gb <= 2.0, "the plan of 2 GB per worker is below the measured peak: raise it in README and docs"
    assert round((REPO / "models/d8_2x2x2_best_weights.h5").stat().st_size / 1e6, 1) == 2.3
    assert round(300 * 512 * 512 * 11 / 1e9, 1) == 0.9


def test_a_measured_figure_must_match_its_file():
    sys.path.insert(0, str(DOCS / "_ext"))
    import lungzarr_measured as measured

    value = measured.value_of("install_size.json", "total_bytes / 1e9")
    measured.check_figure(f"{value:.2f} GB", value)
    with pytest.raises(measured.MeasuredError, match="the results file gives"):
        measured.check_figure(f"{value + 0.01:.2f} GB", value)
    with pytest.raises(measured.MeasuredError, match="no 'nope'"):
        measured.value_of("install_size.json", "per_distribution.nope.bytes")
    assert measured.provenance("install_size.json").startswith("benchmarks/results/install_size.json, measured 20")
    text = "x {measured}`3.07 GB <install_size.json: total_bytes / 1e9>` 12 MB"
    assert FIGURE.findall(MEASURED_ROLE.sub("", text)) == ["12 MB"]
