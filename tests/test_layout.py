"""The package's shape: layers that never import upward, one reader per format, and one stage registry.

The layers, low to high (imports only go down or sideways):

0. helpers: ``_version``, ``errors``, ``volume``
1. readers, store and model: ``io/`` (one module or package per file-format library: pydicom in the
   ``io/dicom/`` package and ``io/dicom_seg.py``, highdicom (DICOM SEG) only in ``io/dicom_seg.py``), ``model/``
2. per-volume algorithms and evaluation: ``algorithms/``, ``evaluate/``
3. the pipeline: ``pipeline/``
4. what people run: ``cli``, ``cluster``, ``demo``, ``reports/`` (and the package's lazy read API)
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lungzarr"

LAYERS = {"_version": 0, "errors": 0, "volume": 0, "io": 1, "model": 1, "algorithms": 2, "evaluate": 2,
          "pipeline": 3, "reports": 4, "cli": 4, "cluster": 4, "demo": 4, "__init__": 4, "__main__": 4}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE), ast.parse(path.read_text(encoding="utf-8"))


def _imports(tree):
    """(module imported, line, at module level?) for every import statement."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "lungzarr" else [node.module]
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
        for name, line, _ in _imports(tree):
            parts = name.split(".")
            if parts[0] != "lungzarr" or len(parts) < 2 or parts[1] not in LAYERS:
                continue
            if LAYERS[parts[1]] > mine and not (rel.parts == ("__init__.py",)):
                upward.append(f"{rel}:{line} imports {name}")
    assert upward == []


@pytest.mark.parametrize("library, allowed", [("pydicom", {"io/dicom/discover.py", "io/dicom/headers.py",
                                                           "io/dicom/decode.py", "io/dicom/pixel_checks.py",
                                                           "io/dicom/write.py", "io/dicom_seg.py"}),
                                              ("highdicom", {"io/dicom_seg.py"}),
                                              ("zarr", {"io/store/cohort.py", "io/store/encoding.py",
                                                        "io/store/objects.py"}),
                                              ("SimpleITK", {"io/volumes/metaimage.py", "io/volumes/series.py",
                                                             "io/volumes/write.py"}),
                                              ("nibabel", {"io/volumes/nifti.py", "io/volumes/write.py"})])
def test_one_module_per_file_format(library, allowed):
    users = {str(rel) for rel, tree in _modules()
             for name, _, _ in _imports(tree) if name.split(".")[0] == library}
    assert users == allowed


def test_keras_is_imported_lazily_and_only_by_the_model():
    found = [(str(rel), line, top) for rel, tree in _modules() for name, line, top in _imports(tree)
             if name.split(".")[0] in {"keras", "tensorflow", "torch", "jax", "openvino", "onnxruntime"}]
    assert found and all(rel.startswith("model/") and not top for rel, _, top in found), found


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
