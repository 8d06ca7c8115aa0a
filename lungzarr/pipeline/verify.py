"""Checking a store's completed stages chunk by chunk, and what ``run --verify`` redoes."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

from lungzarr.errors import LungzarrError
from lungzarr.pipeline.stages import STAGES, stage_names

__all__ = ["VerifyReport", "verify_store", "verify_patients", "redo_damaged", "dependent_stages"]


@dataclass
class VerifyReport:
    """What :func:`verify_store` read and found."""

    patients: list[str] = field(default_factory=list)
    damage: list[dict] = field(default_factory=list)
    arrays: int = 0
    chunks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: ``patient/array`` names written before lungzarr checksummed every chunk (see CohortStore.verify_patient).
    unchecksummed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

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
    from lungzarr.io.storage import CohortStore

    return CohortStore(store_path, mode="r").verify_patient(patient, owners=owners, creator=creator)


def verify_patients(store, patients, *, client=None) -> VerifyReport:
    """Verify ``patients`` of ``store`` (the caller holds the lock): one dask task per patient."""
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
    store.record_damage({result["patient"]: result["damage"] for result in results})
    for result in results:
        report.damage.extend(result["damage"])
        report.arrays += result["arrays"]
        report.chunks += result["chunks"]
        report.bytes += result["bytes"]
        report.unchecksummed.extend(f"{result['patient']}/{name}" for name in result["unchecksummed"])
    report.seconds = time.perf_counter() - start
    return report


def verify_store(store_path, *, patients: Iterable[str] | None = None, client=None) -> VerifyReport:
    """Read every chunk of every array of the completed stages; record and return what is damaged.

    A chunk is damaged when its file is missing, its checksum (crc32c, on
    every chunk lungzarr writes) does not match, or it cannot be decoded.
    Each patient's findings replace its earlier ones in the store, so
    ``lungzarr status`` lists what the last verification found;
    ``run(..., verify=True)`` redoes the damaged stages.

    Parameters
    ----------
    store_path : path
    patients : iterable of str, optional
        Only these patients (all of the store by default); an unknown one is an error.
    client : distributed.Client, optional
        One task per patient on the cluster; without one, the current dask scheduler.

    Returns
    -------
    VerifyReport
    """
    from lungzarr.io.storage import CohortStore

    CohortStore(store_path, mode="r")  # a clear error when there is no store
    store = CohortStore(store_path)
    with store.lock():  # recording the findings writes the store
        ids = store.patients()
        if patients is not None:
            missing = [p for p in patients if p not in ids]
            if missing:
                raise LungzarrError(f"--patients {missing!r} are not in store {str(store.path)!r}; "
                                    f"`lungzarr status {store.path}` lists the patients")
            ids = [p for p in ids if p in set(patients)]
        return verify_patients(store, ids, client=client)


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
