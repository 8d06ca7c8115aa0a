"""The cohort entry points: :func:`run` (any stages, every patient), :func:`ingest` and :func:`store_status`."""
from __future__ import annotations

import dataclasses
import uuid
from typing import Iterable

from lungzarr.errors import LungzarrError, PatientError
from lungzarr.model.geometry import CROPS, DEFAULT_CROP
from lungzarr.pipeline.checks import check_run_config
from lungzarr.pipeline.forget_groups import TASK_KEY_PREFIX
from lungzarr.pipeline.inputs import record_input, scan_input
from lungzarr.pipeline.placement import compute_options, cpu_task_workers
from lungzarr.pipeline.remote import RemoteStage
from lungzarr.pipeline.runner import Progress, StageSummary, stream_stages
from lungzarr.pipeline.sources import FINGERPRINT_KEY, input_changed, input_fingerprint
from lungzarr.pipeline.stage import StageOptions
from lungzarr.pipeline.stages import ordered_stages, stage_names
from lungzarr.pipeline.tables import gather_tables
from lungzarr.pipeline.verify import redo_damaged, stale_listings, verify_patients

__all__ = ["run", "ingest", "store_status", "stage_decision"]


def run(input_dir, store_path, *, stages: Iterable[str] | None = None, labels=None, weights=None,
        chunk_slices: int = 16, batch_size: int = 4, precision: str = "fp32",
        patients: Iterable[str] | None = None, overwrite: bool = False, client=None, gpu: bool = False,
        infer_batch: int | None = None, progress: Progress | None = None, strict: bool = False,
        verify: bool = False, engine: str = "auto", crop: str = DEFAULT_CROP,
        fold_upsampling: bool = True) -> list[StageSummary]:
    """Run pipeline stages for every patient of a cohort; by default all of them, INPUT to tables.

    Patients stream through the stages (:func:`~lungzarr.pipeline.runner.stream_stages`):
    on a cluster, one patient's UNet overlaps the next patients' CPU stages.
    A patient's stage already complete (and computed from the current
    completion of the stages it requires) is skipped; the cohort tables are
    rebuilt at the end.

    Parameters
    ----------
    input_dir : path or None
        The INPUT folder (one entry per patient). Needed when ``stages``
        include one that creates patients (``ingest``); without it, the
        patients are those already in the store, and ``input_dir`` must be None.
    store_path : path
    stages : iterable of str, optional
        Names from the registry (:data:`lungzarr.pipeline.stages.STAGE_NAMES`);
        run in registry order. Default: every stage.
    labels : path, optional
        A labels CSV (``id,cancer``) for the DSB2017 ``cancer`` column.
    weights : path, optional
        d8 weights; default the file in the repository's models/ (sha256 checked). With a
        ``client`` the bytes are shipped to every worker (:mod:`lungzarr.model.shipping`).
    chunk_slices, batch_size : int
        Slices per chunk; patients in flight per stage (bounds each worker's memory).
    precision : {"fp32", "bf16", "fp16"}
    patients : iterable of str, optional
        Only these patients (an unknown one is an error).
    overwrite : bool
        Redo the selected stages of the selected patients.
    client : distributed.Client, optional
    gpu : bool
        Annotate the GPU stages to run only on workers with a ``GPU`` resource,
        and keep the other stages on the CPU-only workers when there are any.
    infer_batch : int or None
        8-slice windows per UNet call; None: :data:`lungzarr.model.infer.INFER_BATCH`
        (2 on CPU workers, 8 on GPU workers).
    progress : Progress, optional
        Called with every :class:`~lungzarr.pipeline.runner.ProgressEvent`.
    strict : bool
        Every damaged DICOM file is an error (by default a damaged slice at
        either end of the stack is dropped with a warning, and an unreadable
        stray file skipped).
    verify : bool
        First verify the run's patients already in the store
        (:func:`~lungzarr.pipeline.verify.verify_store`) and redo each damaged
        stage with every later one (damage in ingest's arrays: the patient
        again from its INPUT entry).
    engine : {"auto", "keras", "openvino", "onnxruntime"}
        What runs the UNet (:mod:`lungzarr.model.engines`): ``auto`` is, with
        ``gpu`` False and fp32, the faster of Keras and OpenVINO among those
        exact on this machine (:func:`lungzarr.pipeline.engine_choice.choose_engine`:
        a calibration of a few seconds, once per machine and version set,
        cached beside the exported graphs); Keras with ``gpu``. When the
        ``detect`` stage runs, the engine is chosen and checked (and its graph
        exported to the cache) before any patient.
    crop : {"lungs", "fixed"}
        What the UNet predicts: ``lungs`` (by default,
        :data:`lungzarr.model.geometry.DEFAULT_CROP`, as ``lungzarr run``),
        one y/x box per patient around its lung mask and the slices whose
        window holds lung (:func:`lungzarr.algorithms.crop.lung_box`): the
        same probabilities inside the lungs for less work, 0 outside the box
        (docs/algorithms.md §5); or ``fixed``, the whole detection crop (the
        original's): pass ``crop="fixed"`` for patients whose DSB2017 table
        (:func:`~lungzarr.pipeline.exports.export_dsb2017`) you want.
    fold_upsampling : bool
        The d8 network's form (:func:`lungzarr.model.d8.build_d8`): each
        upsampling folded into the convolution after it (default: 20 % fewer
        multiply-adds, the same function to float32 rounding), or False for the
        original's literal layers.

    Returns
    -------
    list of StageSummary, one per stage run
    """
    from lungzarr.io.legacy import read_legacy_labels
    from lungzarr.io.store import CohortStore

    if crop not in CROPS:
        raise LungzarrError(f"crop must be one of {list(CROPS)!r}, got {crop!r}")
    chosen = ordered_stages(stages)
    if not chosen:
        raise LungzarrError(f"no stage to run: choose among {list(stage_names())!r}")
    creates = [s.name for s in chosen if s.creates_patient]
    if creates and input_dir is None:
        raise LungzarrError(f"stage {creates[0]!r} reads the patients from INPUT: pass the INPUT folder")
    if not creates and input_dir is not None:
        raise LungzarrError(f"stages {[s.name for s in chosen]!r} work on the patients already in the store; "
                            f"INPUT is only read by {[s.name for s in ordered_stages() if s.creates_patient]!r}")
    # Run-level mistakes stop here, once, before any patient is read.
    scan = scan_input(input_dir, patients=patients, store=store_path) if creates else None
    check_run_config(store=store_path, stages=[s.name for s in chosen], weights=weights, precision=precision,
                     create=bool(creates))
    if any(s.uses_model for s in chosen):
        from lungzarr.model.engines import prepare_engine
        from lungzarr.pipeline.engine_choice import choose_engine

        # auto: the fastest exact engine of this machine (calibrated once per machine and version set).
        engine, _ = choose_engine(engine, weights=weights, precision=precision, gpu=gpu,
                                  fold_upsampling=fold_upsampling)
        # A missing or broken engine stops the run here, once, instead of failing every patient.
        engine = prepare_engine(engine, weights=weights, precision=precision, gpu=gpu,
                                fold_upsampling=fold_upsampling)
        if client is not None:
            from lungzarr.model.shipping import ship_weights

            # Workers elsewhere do not see the client's files: each gets the verified bytes once, and the
            # graphs name them by sha256 (no client path opened per patient or on a worker).
            weights = ship_weights(client, weights)
    options = StageOptions(chunk_slices=chunk_slices, weights=weights, precision=precision,
                           infer_batch=infer_batch, gpu=gpu, strict=strict, engine=engine, crop=crop,
                           fold_upsampling=bool(fold_upsampling),
                           labels=read_legacy_labels(labels) if labels is not None else None)
    store = CohortStore(store_path)
    with store.lock():
        if creates:
            items, bad = _check_ids(store, scan.patients, stage=creates[0])
            bad = record_input(store, scan, stage=creates[0]) + bad
        else:
            items, bad = [(p, None) for p in _stored_patients(store, store_path, patients)], []
        if verify:
            present = [p for p, _ in items if store.has_patient(p)]
            redo_damaged(store, verify_patients(store, present, client=client))
            # Changed outside lungzarr: listed afresh now (a patient whose stages rerun is listed at its commits).
            store.consolidate(list(stale_listings(store, present)))
        summaries = _stream(store, items, chosen, options, overwrite=overwrite, batch_size=batch_size,
                            client=client, progress=progress, sources=dict(items) if creates else None)
        _finish(store, client, gpu=gpu)
    summaries[0].failed = bad + summaries[0].failed
    if scan is not None:
        summaries[0].ignored = [entry.as_record() for entry in scan.ignored]
    return summaries


def ingest(input_dir, store_path, *, chunk_slices: int = 16, overwrite: bool = False,
           patients: Iterable[str] | None = None, batch_size: int = 4, client=None,
           progress: Progress | None = None, strict: bool = False) -> StageSummary:
    """Only the ``ingest`` stage: ``run(input_dir, store_path, stages=["ingest"])``, its one summary."""
    (summary,) = run(input_dir, store_path, stages=["ingest"], chunk_slices=chunk_slices, overwrite=overwrite,
                     patients=patients, batch_size=batch_size, client=client, progress=progress, strict=strict)
    return summary


def store_status(store_path) -> dict:
    """Per-stage counts, failures, warnings, damage found by :func:`~lungzarr.pipeline.verify.verify_store`,
    and size of a cohort store."""
    from lungzarr.io.store import CohortStore

    store = CohortStore(store_path, mode="r")
    patients = store.patients()
    failures = store.failures()
    damage = store.damage()
    done = [store.stages(p) for p in patients]
    stages = {stage: {"complete": sum(stage in d for d in done),
                      "failed": sum(1 for f in failures if f.get("stage") == stage),
                      "damaged": len({d.get("patient") for d in damage if d.get("stage") == stage})}
              for stage in stage_names()}
    return {"n_patients": len(patients), "stages": stages, "failures": failures,
            "warnings": store.warnings(), "damage": damage, "size_mb": store.size_bytes() / 1e6}


# ---------------------------------------------------------------------- decisions

def stage_decision(done: dict, stage, *, overwrite: bool, source: dict | None = None) -> str:
    """``"blocked"``, ``"run"`` or ``"skip"`` for one patient's stage, from its completed stages ``done``.

    Blocked when a stage it requires is not complete; run when it is not
    complete, was computed from an older completion of a stage it requires,
    or ``overwrite``, or (a stage that creates the patient) when ``source``,
    the INPUT entry's :func:`~lungzarr.pipeline.sources.input_fingerprint`
    now, differs from the one its marker recorded; else skip.
    """
    if any(r not in done for r in stage.requires):
        return "blocked"
    if overwrite or stage.name not in done:
        return "run"
    if _recorded_dependencies(done[stage.name], stage) != _dependencies(done, stage):
        return "run"
    if stage.creates_patient and input_changed(done[stage.name], source) is not None:
        return "run"
    return "skip"


def _dependencies(done: dict, stage) -> dict:
    """``{required stage: id of its completion}``: what a stage is computed from."""
    return {r: done[r].get("id") for r in stage.requires}


def _recorded_dependencies(record: dict, stage) -> dict:
    recorded = record.get("depends_on")
    if isinstance(recorded, str) and len(stage.requires) == 1:  # stores written before the registry
        return {stage.requires[0]: recorded}
    return recorded if isinstance(recorded, dict) else {}


def _stream(store, items, stages, options, *, overwrite, batch_size, client, progress, sources=None):
    by_name = {s.name: s for s in stages}

    # The patients' stage markers as this run last read or wrote them. Only this run writes them (it holds
    # the lock), so each patient's are read once, then known from its commits; a stage that did not commit
    # (it failed, or its prepare had unmarked it) has them read again.
    known, prepared = {}, {}
    # The INPUT entry's fingerprint, taken once per patient before its files are read (a file changed
    # while it is ingested is then seen by the next run), and why its ingest is redone, if it changed.
    fingerprints, changed = {}, {}
    # On a cluster a patient's stage is built and computed from a worker (lungzarr.pipeline.remote).
    remote = client is not None

    def fingerprint(patient):
        if patient not in fingerprints:
            fingerprints[patient] = input_fingerprint(sources[patient])
        return fingerprints[patient]

    def markers(patient):
        last = prepared.pop(patient, None)
        if last is not None and getattr(last, "committed", None) is not None:
            known[patient] = last.committed
        if patient not in known:
            known[patient] = store.stages(patient)
        return known[patient]

    def decide(patient, name):
        done = markers(patient)
        stage = by_name[name]
        source = fingerprint(patient) if stage.creates_patient and sources is not None else None
        decision = stage_decision(done, stage, overwrite=overwrite, source=source)
        if decision == "run" and source is not None and name in done and not overwrite:
            why = input_changed(done[name], source)
            if why is not None:
                changed[patient] = why
        return decision

    def record_warnings(patient, name, warned):
        # Replacing the stage's last ones; with the note of why the patient is ingested again: `lungzarr
        # status` shows it.
        note = [{"file": str(sources[patient]),
                 "reason": f"{changed[patient]}: ingested again, with every stage computed from it"}] \
            if sources is not None and patient in changed and by_name[name].creates_patient else []
        store.record_warnings(patient, name, list(warned) + note)

    def prepare(name, patient, payload):
        stage = by_name[name]
        done = markers(patient)
        del known[patient]  # the stage changes them: read again unless its commit tells them
        record = {}
        if stage.requires:
            record["depends_on"] = _dependencies(done, stage)
        if stage.creates_patient and sources is not None:
            record[FINGERPRINT_KEY] = fingerprint(patient)
        if remote:
            # An older store's listing of the whole cohort, dropped before any worker writes (once per
            # CohortStore: later calls only check a flag).
            store._changing()
            pending = RemoteStage(store, patient, stage, payload, options, record=record,
                                  on_warnings=lambda warned: record_warnings(patient, name, warned))
        else:
            try:
                pending = stage.prepare(store, patient, payload, options)
            except PatientError as exc:
                if stage.records_warnings and getattr(exc, "warnings", None) is not None:
                    record_warnings(patient, name, exc.warnings)
                raise
            pending.record.update(record)
            if stage.records_warnings:
                record_warnings(patient, name, pending.warnings)
        prepared[patient] = pending
        return pending

    placement = compute_options(client, stages, gpu=options.gpu)
    options = dataclasses.replace(options, cpu_workers=cpu_task_workers(client, gpu=options.gpu))
    first = stages[0]
    prefetch = None
    if client is not None and first.prefetch is not None:
        def prefetch(patient, payload):
            return first.prefetch(client, patient, payload, options.strict, placement.get(first.name))
    def leave(patient):
        # Through every stage: nothing of it is needed again. Kept, the last stage's pending object of each
        # patient (its graph, or on a cluster its stage's payload) grew the client by ~50 kB per tiny patient
        # (benchmarks/results/cohort_scale_ingest_10000.json).
        for kept in (prepared, known, fingerprints):
            kept.pop(patient, None)

    summaries = stream_stages(store, items, [s.name for s in stages], prepare, decide=decide,
                              batch_size=batch_size, client=client, progress=progress, compute_options=placement,
                              prefetch=prefetch, requires={s.name: s.requires for s in stages}, on_leave=leave)
    for summary in summaries:
        if by_name[summary.stage].creates_patient:
            summary.redone = [{"patient": p, "reason": changed[p]} for p in summary.done if p in changed]
    return summaries


def _finish_task(store_path: str) -> None:
    """On a worker: the cohort tables (nothing else writes any more)."""
    from lungzarr.io.store import CohortStore

    gather_tables(CohortStore(store_path, mode="r+"))


def _finish(store, client, *, gpu: bool) -> None:
    """The end of a run, under its lock: the cohort tables.

    They read every patient's group (about 40 ms of CPU per patient): on a
    cluster one task does it on a CPU worker, so the client's own work stays
    a few small reads and writes per patient.
    """
    if client is None:
        gather_tables(store)
        return
    workers = list(cpu_task_workers(client, gpu=gpu))
    client.submit(_finish_task, str(store.path), pure=False, key=f"{TASK_KEY_PREFIX}finish-{uuid.uuid4().hex}",
                  **({"workers": workers, "allow_other_workers": False} if workers else {})).result()


def _stored_patients(store, store_path, patients) -> list[str]:
    ids = store.patients()
    if patients is None:
        return ids
    missing = [p for p in patients if p not in ids]
    if missing:
        raise LungzarrError(f"--patients {missing!r} are not in store {str(store_path)!r}; ingest them first")
    return [p for p in ids if p in set(patients)]


def _check_ids(store, items, *, stage):
    """Patients whose id can name a store group, and failure records for the others."""
    good, bad = [], []
    for pid, folder in items:
        try:
            store.group_path(pid)
            good.append((pid, folder))
        except PatientError as exc:
            exc.file = str(folder)
            exc.stage = exc.stage or stage
            store.record_failure(exc, stage=stage)
            bad.append(exc.as_record())
    return good, bad
