"""The cohort pipeline: registered stages over every patient, streamed on dask, resumable.

Read it in this order:

``stage``
    What a stage is (:class:`Stage`) and the run's options its prepare reads.
``stages/``
    The registry (:data:`~lungzarr.pipeline.stages.STAGES`, run order) and one
    module per stage: ``ingest``, ``segment``, ``detect``, ``nodules``, ``features``.
``runner``
    The generic streaming runner (no stage knowledge), the progress protocol
    (:class:`ProgressEvent`) and the per-stage summaries.
``cohort``
    The entry points: :func:`run` (any stages; INPUT to tables by default),
    :func:`ingest`, :func:`store_status`; which patient's stage runs, is
    skipped or is blocked.
``remote``
    On a cluster: a patient's stage built and computed from a worker, one future per patient and stage.
``inputs``, ``placement``, ``tables``
    INPUT folders, which workers run which stage, the cohort tables.
``verify``
    Every chunk of the completed stages read back; what ``run --verify`` redoes.
``exports``, ``legacy_import``, ``evaluation``
    Tables out (DSB2017 CSV, nodules), the old npz layout in, scoring against
    reader annotations.
"""
from __future__ import annotations

from lungzarr.pipeline.cohort import ingest, run, stage_decision, store_status
from lungzarr.pipeline.evaluation import evaluate_candidates, evaluate_store
from lungzarr.pipeline.exports import export_dicom_seg, export_dsb2017, export_luna16, export_nifti, export_nodules
from lungzarr.pipeline.inputs import find_patients
from lungzarr.pipeline.legacy_import import import_legacy
from lungzarr.pipeline.runner import EVENTS, Progress, ProgressEvent, StageSummary, stream_stages
from lungzarr.pipeline.stage import Stage, StageOptions
from lungzarr.pipeline.stages import STAGE_NAMES, STAGES, get_stage, ordered_stages
from lungzarr.pipeline.stages._common import TASK_SLICES, task_slices
from lungzarr.pipeline.stages.ingest import ingest_dataset
from lungzarr.pipeline.tables import gather_tables
from lungzarr.pipeline.verify import VerifyReport, verify_store

__all__ = [
    "run", "ingest", "store_status", "stage_decision",
    "evaluate_store", "evaluate_candidates", "export_dsb2017", "export_nodules", "export_luna16", "export_nifti",
    "export_dicom_seg",
    "import_legacy", "find_patients", "gather_tables",
    "Stage", "StageOptions", "STAGES", "STAGE_NAMES", "get_stage", "ordered_stages",
    "StageSummary", "ProgressEvent", "Progress", "EVENTS", "stream_stages",
    "TASK_SLICES", "task_slices", "ingest_dataset", "verify_store", "VerifyReport",
]
