"""Checking a store: every chunk of the completed stages, every patient anything names, the cohort tables
and each patient's consolidated metadata; what ``verify --repair`` and ``run --verify`` redo."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

from lungzarr.errors import LungzarrError
from lungzarr.pipeline.stages import STAGES, stage_names

__all__ = ["VerifyReport", "verify_store", "verify_patients", "redo_damaged", "dependent_stages", "store_findings",
           "stale_listings"]


@dataclass
class VerifyReport:
    """What :func:`verify_store` read and found."""

    patients: list[str] = field(default_factory=list)
    #: Damage of patients: chunks and arrays (see CohortStore.verify_patient), and patients whose group is
    #: gone, or has no metadata or no completed stage (see :func:`store_findings`).
    damage: list[dict] = field(default_factory=list)
    arrays: int = 0
    chunks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: ``patient/array`` names written before lungzarr checksummed every chunk (see CohortStore.verify_patient).
    unchecksummed: list[str] = field(default_factory=list)
    #: The store's own damage (the same fields, ``patient`` None): the cohort tables, stale patient listings.
    store_damage: list[dict] = field(default_factory=list)
    #: Patients whose listing (consolidated metadata) names nodes that are gone (see :func:`stale_listings`).
    stale_listings: list[str] = field(default_factory=list)
    #: What ``repair=True`` did, one line each.
    repaired: list[str] = field(default_factory=list)
    #: The holder of the writer lock while a report-only verification read the store (a run writing it).
    writer: str | None = None

    @property
    def ok(self) -> bool:
        return not self.damage and not self.store_damage

    def damaged_stages(self) -> dict[str, str]:
        """``{patient: the earliest damaged stage}``: what must be redone, with every later stage."""
        order = stage_names()
        first = {}
        for rec in self.damage:
            stage = rec["stage"]
            known = first.get(rec["patient"])
            if known is None or order.index(stage) < order.index(known):
                first[rec["patient"]] = stage
        return dict(sorted(first.items()))


def _owners():
    """Which registered stage writes which arrays and child groups, and which stage creates a patient."""
    owners = {s.name: {"arrays": tuple(s.arrays), "subgroups": tuple(s.subgroups)} for s in STAGES}
    creator = next(s.name for s in STAGES if s.creates_patient)
    return owners, creator


def _verify_task(store_path, patient, owners, creator):
    from lungzarr.io.store import CohortStore

    return CohortStore(store_path, mode="r").verify_patient(patient, owners=owners, creator=creator)


def verify_patients(store, patients, *, client=None, record: bool = True) -> VerifyReport:
    """Verify ``patients`` of ``store``: one dask task per patient; ``record`` (the caller holds the lock)
    replaces each patient's damage records in the store with what was found."""
    import dask
    from dask.base import tokenize

    start = time.perf_counter()
    real = str(store.path.resolve())  # a URL store: the URL
    owners, creator = _owners()
    tasks = []
    for patient in patients:
        # Named from the resolved store, the patient and the stage completions it checks: two stores,
        # two patients or two states of one patient never share a key.
        ids = sorted((k, v.get("id")) for k, v in store.stages(patient).items())
        key = f"verify-{patient}-{tokenize(real, patient, ids)}"
        tasks.append(dask.delayed(_verify_task, pure=False)(real, patient, owners, creator, dask_key_name=key))
    results = (client.gather(client.compute(tasks)) if client is not None and tasks
               else list(dask.compute(*tasks)))
    report = VerifyReport(patients=list(patients))
    if record:
        store.record_damage({result["patient"]: result["damage"] for result in results})
    for result in results:
        report.damage.extend(result["damage"])
        report.arrays += result["arrays"]
        report.chunks += result["chunks"]
        report.bytes += result["bytes"]
        report.unchecksummed.extend(f"{result['patient']}/{name}" for name in result["unchecksummed"])
    report.seconds = time.perf_counter() - start
    return report


def _record(patient, stage, kind, file, reason, array=None) -> dict:
    return {"patient": patient, "stage": stage, "array": array, "chunk": None, "kind": kind, "file": str(file),
            "reason": reason}


def _table_patients(frame) -> set:
    return set() if frame.empty or "patient" not in frame.columns else {str(p) for p in frame["patient"]}


def store_findings(store) -> tuple[dict, list[dict]]:
    """What the store knows of itself that does not hold: ``({patient: damage records}, store records)``.

    Every patient that the cohort tables or a
    folder under ``patients/`` name must have its group metadata
    (``zarr.json``, which holds its stage markers) and at least one completed
    stage; a stage's arrays are checked by CohortStore.verify_patient. For
    the store: the tables group is there, each cohort table's pointer
    resolves and the table reads, every row's patient has a group and every
    patient with a completed stage has its row (with the stages it has).
    Reads metadata and the (small) tables only; writes nothing.
    """
    from lungzarr.io.store import PATIENTS_GROUP, TABLES_GROUP
    from lungzarr.pipeline.tables import COHORT_TABLES

    _, creator = _owners()
    where = str(store.path)
    groups = store.patients()
    marked = {p: store.stages(p) for p in groups}
    tables, table_damage = {}, []

    def store_record(kind, array, file, reason):
        table_damage.append(_record(None, None, kind, file, reason, array=array))

    tables_fix = f"`lungzarr verify --repair {where}` rebuilds the tables from the patient groups (a run does at its end)"
    if not store.has_tables():
        if groups:
            store_record("missing", TABLES_GROUP, store.path / TABLES_GROUP,
                         f"the cohort tables are gone ({TABLES_GROUP}/zarr.json is missing); {tables_fix}")
    else:
        for name in COHORT_TABLES:
            try:
                tables[name] = store.read_table(name)
            except LungzarrError as exc:
                store_record("unreadable", f"{TABLES_GROUP}/{name}", store.path / TABLES_GROUP, str(exc))
    known = {}  # patient -> what names it
    for name, frame in tables.items():
        for p in _table_patients(frame):
            known.setdefault(p, []).append(f"the {name} table")
    folders = store.patient_folders()
    for p in folders:
        known.setdefault(p, []).append(f"the folder {PATIENTS_GROUP}/{p}")

    found = {}
    fix = f"`lungzarr run INPUT {where}` ingests it again"
    for p in sorted(set(known) - set(groups)):
        folder = store.path / PATIENTS_GROUP / p
        if p in folders:
            reason = (f"the group metadata of patient {p!r} ({PATIENTS_GROUP}/{p}/zarr.json, which holds its stage "
                      f"markers) is gone, only its arrays are left; {fix}")
            found[p] = [_record(p, creator, "missing", folder / "zarr.json", reason)]
        else:
            reason = f"the group of patient {p!r} is gone from the store (named by {', '.join(known[p])}); {fix}"
            found[p] = [_record(p, creator, "missing", folder, reason)]
    for p in groups:
        if not marked[p]:
            reason = (f"the group of patient {p!r} has no completed stage (no stage marker: none completed, or "
                      f"unmarked by `lungzarr verify --repair`); {fix} (or remove the folder)")
            found[p] = [_record(p, creator, "unrecorded", store.path / PATIENTS_GROUP / p, reason)]

    for name, frame in tables.items():
        rows = _table_patients(frame)
        gone = sorted(rows - set(groups))
        if gone:
            store_record("stale", f"{TABLES_GROUP}/{name}", store.path / TABLES_GROUP,
                         f"the {name} table has rows of {len(gone)} patient(s) whose group is gone "
                         f"({', '.join(map(repr, gone[:5]))}{' ...' if len(gone) > 5 else ''}); {tables_fix}")
    frame = tables.get("patients")
    if frame is not None:
        rows = {str(r["patient"]): r for r in frame.to_dict("records")} if not frame.empty else {}
        lacking = sorted(p for p in groups if marked[p] and p not in rows)
        differ = sorted(p for p in groups if p in rows and any(
            bool(rows[p].get(f"stage_{s}", s in marked[p])) != (s in marked[p]) for s in stage_names()))
        for problem, ids in (("lacks", lacking), ("has other completed stages than the markers of", differ)):
            if ids:
                store_record("stale", f"{TABLES_GROUP}/patients", store.path / TABLES_GROUP,
                             f"the patients table {problem} {len(ids)} patient(s) "
                             f"({', '.join(map(repr, ids[:5]))}{' ...' if len(ids) > 5 else ''}); {tables_fix}")
    return found, table_damage


def stale_listings(store, patients) -> dict[str, dict]:
    """``{patient: store damage record}`` of the ``patients`` whose listing (consolidated metadata) names a
    node that is gone: readers do not use it (they read each node's own), ``--repair`` writes it afresh."""
    from lungzarr.io.store import PATIENTS_GROUP

    found = {}
    for p in patients:
        stale = store.stale_listing(p)
        if stale:
            more = f" and {len(stale) - 5} more" if len(stale) > 5 else ""
            found[p] = _record(None, None, "stale", store.path / PATIENTS_GROUP / p / "zarr.json",
                               f"the consolidated metadata of patient {p!r} is stale ({'; '.join(stale[:5])}{more}): "
                               f"readers do not use it; `lungzarr verify --repair {store.path}` writes it afresh",
                               array=f"{PATIENTS_GROUP}/{p} consolidated metadata")
    return found


def verify_store(store_path, *, patients: Iterable[str] | None = None, client=None,
                 repair: bool = False) -> VerifyReport:
    """Check a store: every chunk of every array of the completed stages, and what the store knows of itself.

    A chunk is damaged when its file is missing, its checksum (crc32c, on
    every chunk lungzarr writes) does not match, or it cannot be decoded. A
    patient is damaged when its group is gone while the tables still name
    it, when its group lost its metadata, or when it has no completed stage
    (:func:`store_findings`). The store is damaged when its cohort tables do
    not match the patient groups, or a patient's listing (consolidated
    metadata) names a node that is gone (:func:`stale_listings`).

    Without ``repair`` nothing is written (no lock taken, no record kept):
    a read-only store can be verified. With ``repair``, under the writer
    lock: each patient's findings replace its earlier ones in the store (so
    ``lungzarr status`` lists them; verifying the whole store also drops the
    records of patients nothing names any more), each damaged stage is
    unmarked with every stage computed from it (the next run redoes them),
    the cohort tables are rebuilt from the patient groups and stale
    listings are written afresh. ``run(..., verify=True)`` does
    the recording and unmarking, then redoes the stages.

    Parameters
    ----------
    store_path : path
    patients : iterable of str, optional
        Only these patients (all of the store by default; the tables are
        checked only then); an unknown one is an error.
    client : distributed.Client, optional
        One task per patient on the cluster; without one, the current dask scheduler.
    repair : bool
        Record, unmark and rebuild as above (needs write access and the lock).

    Returns
    -------
    VerifyReport
    """
    from lungzarr.io.store import CohortStore

    store = CohortStore(store_path, mode="r")  # a clear error when there is no store
    if not repair:
        writer = store.writer()
        report = _verify(store, patients, client, record=False)
        report.writer = writer or store.writer()
        return report
    store = CohortStore(store_path)
    with store.lock():
        report = _verify(store, patients, client, record=True)
        report.repaired = _repair(store, report)
        return report


def _verify(store, patients, client, *, record: bool) -> VerifyReport:
    start = time.perf_counter()
    found, table_damage = store_findings(store)
    ids = store.patients()
    if patients is not None:
        wanted = list(patients)
        missing = [p for p in wanted if p not in ids and p not in found]
        if missing:
            raise LungzarrError(f"--patients {missing!r} are not in store {str(store.path)!r}; "
                                f"`lungzarr status {store.path}` lists the patients")
        ids = [p for p in ids if p in set(wanted)]
        found = {p: recs for p, recs in found.items() if p in set(wanted)}
    report = verify_patients(store, ids, client=client, record=False)
    lost = sorted(set(found) - set(ids))
    report.patients = sorted(set(ids) | set(lost))
    for p in sorted(found):
        report.damage.extend(found[p])
    if patients is None:
        report.store_damage = table_damage
    listings = stale_listings(store, ids)
    report.stale_listings = sorted(listings)
    report.store_damage += [listings[p] for p in report.stale_listings]
    if record:
        by_patient = {p: [] for p in report.patients}
        if patients is None:  # the whole store: records of patients nothing names any more go too
            by_patient.update({d.get("patient"): [] for d in store.damage()})
        for rec in report.damage:
            by_patient.setdefault(rec["patient"], []).append(rec)
        store.record_damage(by_patient)
    report.seconds = time.perf_counter() - start
    return report


def _repair(store, report: VerifyReport) -> list[str]:
    """Unmark the damaged stages, rebuild the tables, write stale listings afresh; one line per thing done."""
    from lungzarr.pipeline.tables import gather_tables

    done = []
    for patient, stages in redo_damaged(store, report).items():
        if stages:
            done.append(f"{patient}: stage(s) {', '.join(stages)} unmarked; the next `lungzarr run` redoes them")
    fresh = [p for p in report.stale_listings if store.has_patient(p)]
    if fresh:
        store.consolidate(fresh)
        done.append(f"consolidated metadata of {len(fresh)} patient(s) written afresh ({', '.join(fresh[:5])}"
                    f"{' ...' if len(fresh) > 5 else ''})")
    counts = gather_tables(store)
    if counts["written"]:
        done.append(f"cohort table(s) {', '.join(counts['written'])} rebuilt from the patient groups "
                    f"({counts['patients']} patient(s), {counts['nodules']} nodule row(s))")
    return done


def dependent_stages(stage: str) -> list[str]:
    """``stage`` and every registered stage that needs it, directly or not, in run order."""
    needed = {stage}
    for s in STAGES:  # run order: a stage's requirements come before it
        if needed & set(s.requires):
            needed.add(s.name)
    return [name for name in stage_names() if name in needed]


def redo_damaged(store, report: VerifyReport) -> dict[str, list[str]]:
    """Unmark each damaged patient's earliest damaged stage and every stage computed from it, so the run
    redoes them (a stage that does not need the damaged one, such as ``lungs3d`` for ``segment``, is kept)."""
    return {patient: store.unmark_stages(patient, dependent_stages(stage))
            for patient, stage in report.damaged_stages().items()}
