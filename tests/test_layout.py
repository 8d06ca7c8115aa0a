"""The package's shape: layers that never import upward, one reader per format, no import circle, short modules,
and one stage registry.

The layers, low to high (imports only go down or sideways):

0. helpers: ``_version``, ``errors``, ``volume``
1. readers, store and model: ``io`` (one owner per file-format library: pydicom in ``io.dicom`` and
   ``io.dicom_seg``, highdicom (DICOM SEG) only in ``io.dicom_seg``, zarr only in the store), ``model``
2. per-volume algorithms and evaluation: ``algorithms``, ``evaluate``
3. the pipeline: ``pipeline``
4. what people run: ``cli``, ``cluster``, ``demo``, ``reports`` (and the package's lazy read API)

Rules name modules by their dotted name (``lungzarr.io.dicom``), and a name covers a module file and a package of
that name alike (``io/dicom.py`` or ``io/dicom/``), so a module that grows into a package keeps its rules.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import numpy as np
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lungzarr"

LAYERS = {"_version": 0, "errors": 0, "volume": 0, "io": 1, "model": 1, "algorithms": 2, "evaluate": 2,
          "pipeline": 3, "reports": 4, "cli": 4, "cluster": 4, "demo": 4, "__init__": 4, "__main__": 4}

#: The longest a module of the package may be; a longer one is split along a seam of its jobs.
MAX_LINES = 600


def _dotted(rel: Path) -> str:
    """``cluster/local.py`` -> ``lungzarr.cluster.local``; a package's ``__init__.py`` is the package."""
    parts = rel.with_suffix("").parts
    return ".".join(("lungzarr", *(parts[:-1] if parts[-1] == "__init__" else parts)))


@functools.lru_cache(maxsize=None)
def _sources():
    return tuple((path.relative_to(PACKAGE), path.read_text(encoding="utf-8"))
                 for path in sorted(PACKAGE.rglob("*.py")))


def _modules():
    for rel, text in _sources():
        yield rel, ast.parse(text)


def _owned(module: str, owner: str) -> bool:
    """``module`` is ``owner`` or lies in the package ``owner``."""
    return module == owner or module.startswith(owner + ".")


def _imports(rel, tree):
    """(name imported, line, at module level?) for every import statement, at any depth of the module.

    ``from lungzarr.x import y`` gives ``lungzarr.x.y`` (a module or a name in one); relative imports are
    resolved against the module's package.
    """
    top = {id(node) for node in tree.body}
    package = _dotted(rel).split(".") if rel.name == "__init__.py" else _dotted(rel).split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names = ([f"{module}.{a.name}" for a in node.names] if module.split(".")[0] == "lungzarr"
                     else [module])
            for name in names:
                yield name, node.lineno, id(node) in top


def _layer(parts) -> int:
    return LAYERS[parts[0].removesuffix(".py")]


def test_every_module_has_a_layer():
    assert {rel.parts[0].removesuffix(".py") for rel, _ in _modules()} <= set(LAYERS)


def test_no_import_runs_up_a_layer():
    upward = []
    for rel, tree in _modules():
        mine = _layer(rel.parts)
        for name, line, _ in _imports(rel, tree):
            parts = name.split(".")
            if parts[0] != "lungzarr" or len(parts) < 2 or parts[1] not in LAYERS:
                continue
            if LAYERS[parts[1]] > mine and not (rel.parts == ("__init__.py",)):
                upward.append(f"{rel}:{line} imports {name}")
    assert upward == []


#: The one owner (a module, or a package with all its modules) of each file-format library.
FORMAT_OWNERS = {"pydicom": ("lungzarr.io.dicom", "lungzarr.io.dicom_seg"), "highdicom": ("lungzarr.io.dicom_seg",),
                 "zarr": ("lungzarr.io.store",), "SimpleITK": ("lungzarr.io.volumes",),
                 "nibabel": ("lungzarr.io.volumes",)}


@pytest.mark.parametrize("library", sorted(FORMAT_OWNERS))
def test_one_module_per_file_format(library):
    users = {(_dotted(rel), f"{rel}:{line}") for rel, tree in _modules()
             for name, line, _ in _imports(rel, tree) if name.split(".")[0] == library}
    strays = sorted(where for module, where in users
                    if not any(_owned(module, owner) for owner in FORMAT_OWNERS[library]))
    assert users, f"nothing in lungzarr imports {library}: is FORMAT_OWNERS out of date?"
    assert strays == [], f"{library} is imported outside {FORMAT_OWNERS[library]} at {strays}"


def test_keras_is_imported_lazily_and_only_by_the_model():
    found = [(_dotted(rel), line, top) for rel, tree in _modules() for name, line, top in _imports(rel, tree)
             if name.split(".")[0] in {"keras", "tensorflow", "torch", "jax", "openvino", "onnxruntime"}]
    assert found and all(_owned(module, "lungzarr.model") and not top for module, _, top in found), found


def test_no_module_is_longer_than_the_limit():
    lengths = {str(rel): len(text.splitlines()) for rel, text in _sources()}
    long = sorted(((n, rel) for rel, n in lengths.items() if n > MAX_LINES), reverse=True)
    assert long == [], (f"modules of lungzarr over {MAX_LINES} lines (split each along a seam of its jobs): "
                        + ", ".join(f"lungzarr/{rel} ({n} lines)" for n, rel in long))


def _import_graph():
    """{module: {module it imports: "file:line" of the first such import}} over lungzarr's own modules.

    Module-level and function-level imports alike; ``from lungzarr.x import name`` is an import of the module
    ``lungzarr.x.name`` where that is a module, else of ``lungzarr.x`` (a package's ``__init__`` that hands a
    name on is the package). The packages above a module, whose ``__init__`` Python runs first, are not
    counted as imported by it.
    """
    modules = {_dotted(rel): (rel, tree) for rel, tree in _modules()}
    graph = {}
    for module, (rel, tree) in modules.items():
        edges = graph.setdefault(module, {})
        for name, line, _ in _imports(rel, tree):
            parts = name.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            target = ".".join(parts)
            if target and target != module:
                edges.setdefault(target, f"lungzarr/{rel}:{line}")
    return graph


def _circles(graph):
    """Each strongly connected group of two or more modules, as one loop through all of it (Tarjan, then BFS)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    loops = []
    for group in sorted(groups, key=min):
        start = min(group)
        came_from, todo = {start: None}, [start]
        while todo:  # the shortest way round from start back to start, inside the group
            v = todo.pop(0)
            nxt = [w for w in sorted(graph[v]) if w in group]
            if start in nxt:
                path = [v]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                path = path[::-1] + [start]
                break
            for w in nxt:
                if w not in came_from:
                    came_from[w] = v
                    todo.append(w)
        steps = " -> ".join(f"{b} ({graph[a][b]})" for a, b in zip(path, path[1:]))
        loops.append(f"{start} -> {steps}" + (f"; the circle holds {sorted(group)}" if len(group) > len(path) - 1
                                               else ""))
    return loops


def test_circles_are_found():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1"}, "c": {"a": "c.py:1", "d": "c.py:2"}, "d": {}}
    assert _circles(graph) == ["a -> b (a.py:1) -> c (b.py:1) -> a (c.py:1)"]
    assert _circles({"a": {"b": "a.py:1"}, "b": {}}) == []


def test_no_import_circle():
    loops = _circles(_import_graph())
    assert loops == [], "import circles among lungzarr's modules (move what both need below both):\n" + "\n".join(
        loops)


# ---------------------------------------------------------------------- the stage registry

def test_registry_is_the_one_stage_list():
    from lungzarr.pipeline import stages

    assert stages.stage_names() == ("ingest", "segment", "lungs3d", "detect", "nodules", "features")
    assert [s.requires for s in stages.STAGES] == [(), ("ingest",), ("ingest",), ("segment",), ("detect",),
                                                   ("nodules",)]
    assert [s.placement for s in stages.STAGES] == ["cpu", "cpu", "cpu", "gpu", "cpu", "cpu"]
    with pytest.raises(RuntimeError, match="requires"):
        stages.check_registry(stages.STAGES[::-1])
    from lungzarr.errors import LungzarrError

    with pytest.raises(LungzarrError, match="unknown stage 'segmnet'; the stages are"):
        stages.get_stage("segmnet")


def _lung_voxels_task(store_path, patient):
    from lungzarr.io.store import CohortStore

    return {"lung_voxels": int(CohortStore(store_path).open_patient(patient).lungs.sum().values)}


def _prepare_lung_voxels(store, patient, _, options):
    import dask

    return store.prepare_task(patient, "lung_voxels",
                              dask.delayed(_lung_voxels_task, pure=False)(str(store.path), patient))


def test_a_new_stage_is_one_stage_object(monkeypatch, tmp_path):
    """Adding a stage = one Stage in the registry: run, resume, status and the patient table pick it up."""
    import dask

    from lungzarr.io.store import CohortStore, read_patients
    from lungzarr.pipeline import Stage, run, stages, store_status

    from dicom_phantoms import make_patient

    toy = Stage(name="lung_voxels", requires=("segment",), prepare=_prepare_lung_voxels,
                summary="count the legacy mask's voxels")
    monkeypatch.setattr(stages, "STAGES", stages.STAGES[:2] + (toy,))
    make_patient(tmp_path / "in" / "P1", n_slices=24, size=64)
    store = tmp_path / "s.zarr"
    with dask.config.set(scheduler="threads"):
        summaries = run(tmp_path / "in", store)
        assert [(s.stage, s.done) for s in summaries] == [("ingest", ["P1"]), ("segment", ["P1"]),
                                                          ("lung_voxels", ["P1"])]
        record = CohortStore(store, mode="r").stages("P1")["lung_voxels"]
        lungs = CohortStore(store, mode="r").open_patient("P1").lungs.values
        assert record["lung_voxels"] == int(np.count_nonzero(lungs)) > 0
        assert record["depends_on"] == {"segment": CohortStore(store, mode="r").stages("P1")["segment"]["id"]}
        assert store_status(store)["stages"]["lung_voxels"] == {"complete": 1, "failed": 0, "damaged": 0}
        assert bool(read_patients(store).stage_lung_voxels.iloc[0])
        again = run(tmp_path / "in", store)
        assert [s.skipped for s in again] == [["P1"]] * 3
        # Redoing the stage it requires redoes it too.
        redo = run(None, store, stages=["segment", "lung_voxels"], overwrite=False)
        assert [s.skipped for s in redo] == [["P1"], ["P1"]]
        redo = run(None, store, stages=["segment"], overwrite=True)
        after = run(None, store, stages=["lung_voxels"])
        assert after[0].done == ["P1"]
