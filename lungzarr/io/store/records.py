"""Per-patient markers and records: stage markers in a patient group; failures, damage and warnings in
``records/``, one small document per patient.

Why not in the root ``zarr.json``, as lungzarr kept them until issue 29: there they grew with the cohort
(~300 bytes a failure: 1.5 MB with 5,000), every new record rewrote the whole file, and every plain
``xr.open_dataset(STORE, group=...)`` read and parsed it (0.022 s warm without records, 0.059 s with
5,000 failures). Now a record's write and a commit's look at a patient's records are one small file each,
whatever the cohort; reading all of them (``lungzarr status``, :func:`~lungzarr.io.store.read_failures`)
is one read per patient with records. A store written before keeps its records in the root until its next
writer moves them (:meth:`_PatientRecords._move_root_records`); readers read both meanwhile.
"""
from __future__ import annotations

import hashlib

from lungzarr.errors import PatientError
from lungzarr.io.store.layout import (DAMAGE_KEY, FAILURES_KEY, RECORDS_GROUP, STAGES_KEY, WARNINGS_KEY, _ID_PATTERN,
                                      _jsonable, _now)

#: The kinds of record, each a list of records per patient: its attribute in the patient's document (and,
#: in stores of lungzarr before issue 29, in the root ``zarr.json``).
RECORD_KEYS = (FAILURES_KEY, DAMAGE_KEY, WARNINGS_KEY)

#: What identifies a record of each kind: a new record replaces the old ones with the same identity.
_IDENTITY = {FAILURES_KEY: ("patient", "stage"), WARNINGS_KEY: ("patient", "stage"), DAMAGE_KEY: ("patient",)}


def record_document_name(patient) -> str:
    """The name of ``patient``'s document under ``records/``: the id itself where it can name a group, else
    ``__`` and a digest of it (an INPUT entry refused for its name: no id may start with ``__``)."""
    text = "" if patient is None else str(patient)
    if _ID_PATTERN.match(text) and not text.startswith("__") and text.lower() != "zarr.json":
        return text
    return "__" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _identity(kind: str, record: dict) -> tuple:
    return tuple(record.get(k) for k in _IDENTITY[kind])


class _PatientRecords:
    """Part of :class:`~lungzarr.io.store.CohortStore`: the stage markers of a patient and the cohort's records."""

    # ------------------------------------------------------------------ stage markers
    def stages(self, patient: str) -> dict:
        """Completed stages of ``patient``: ``{stage: record}``."""
        return dict(self.patient_attrs(patient).get(STAGES_KEY, {}))

    def is_complete(self, patient: str, stage: str) -> bool:
        return stage in self.stages(patient)

    def _unmark_stage(self, patient: str, stage: str) -> dict:
        """Drop ``stage``'s completion marker on disk before redoing it; return the group attrs."""
        group = self._patient_group(patient, mode="r+")
        if group is None:
            raise PatientError(f"patient {patient!r} is not in the store; ingest it first", patient=patient,
                               stage=stage)
        attrs = dict(group.attrs)
        stages = dict(attrs.get(STAGES_KEY, {}))
        if stage in stages:
            stages.pop(stage)
            attrs[STAGES_KEY] = stages
            group.attrs.put(attrs)
        return attrs

    def unmark_stages(self, patient: str, stages) -> list[str]:
        """Drop the completion markers of ``stages`` (one write); the ones that were set, in order."""
        attrs = self.patient_attrs(patient)
        marked = dict(attrs.get(STAGES_KEY, {}))
        dropped = [s for s in stages if s in marked]
        if dropped:
            self._changing(patient)
            attrs[STAGES_KEY] = {k: v for k, v in marked.items() if k not in dropped}
            self._group(self.group_path(patient)).attrs.put(_jsonable(attrs))
        return dropped

    # ------------------------------------------------------------------ one patient's document
    def _record_path(self, patient) -> str:
        return f"{RECORDS_GROUP}/{record_document_name(patient)}"

    def _patient_records(self, patient) -> dict:
        """``{kind: records}`` of ``patient`` (its document's attributes); {} without any: one read."""
        try:
            meta = self._node_meta(self._record_path(patient))
        except FileNotFoundError:
            return {}
        return {k: list(v) for k, v in meta.get("attributes", {}).items() if k in RECORD_KEYS}

    def _put_patient_records(self, patient, records: dict) -> None:
        """Replace ``patient``'s document with ``records`` (``{kind: records}``), atomically; remove it when
        it holds none, so that the documents present are those of the patients with records."""
        records = {k: v for k, v in records.items() if v}
        path = self._record_path(patient)
        if not records:
            self._rmtree(self.path / path, ignore_errors=True)
            return
        self._put_group(path, _jsonable(records))

    def _update_patient_records(self, patient, kind: str, keep, new=()) -> None:
        """Keep the records of ``kind`` of ``patient`` for which ``keep(record)`` holds, add ``new``; one
        read, and one write only when something changed."""
        self._ready_to_record()
        records = self._patient_records(patient)
        old = records.get(kind, [])
        kept = [r for r in old if keep(r)]
        new = [_jsonable(r) for r in new]
        if new or len(kept) != len(old):
            records[kind] = kept + new
            self._put_patient_records(patient, records)

    def _ready_to_record(self) -> None:
        """Before this object's first record write: the ``records`` group, and an older store's records moved
        out of the root (once per CohortStore object; only a writer writes records)."""
        if getattr(self, "_records_ready", False):
            return
        if self._group_meta(RECORDS_GROUP) is None:
            self._put_group(RECORDS_GROUP, {})
        self._records_ready = True
        self._move_root_records()

    def _move_root_records(self) -> int:
        """Move the records a store of lungzarr before issue 29 kept in its root ``zarr.json`` into each
        patient's document; the patients moved. The same rewrite of the root drops an older store's
        listing of the whole cohort (:meth:`_RootMetadata._changing`'s, once per object).

        Each patient's document first (a record already in it is newer and wins), then the root without
        them, in one replace: a run killed in between moves them again, to the same end.
        """
        meta = self._root_meta()
        listed = self._drop_root_listing(meta)
        attrs = meta.get("attributes", {})
        legacy = {k: attrs[k] for k in RECORD_KEYS if k in attrs}
        if not legacy:
            if listed:
                self._put_root_meta(meta)
            return 0
        by_patient = {}
        for kind, records in legacy.items():
            for r in records:
                by_patient.setdefault(r.get("patient"), {}).setdefault(kind, []).append(r)
        for patient, moved in by_patient.items():
            records = self._patient_records(patient)
            for kind, old in moved.items():
                have = {_identity(kind, r) for r in records.get(kind, [])}
                records[kind] = records.get(kind, []) + [r for r in old if _identity(kind, r) not in have]
            self._put_patient_records(patient, records)
        meta["attributes"] = {k: v for k, v in attrs.items() if k not in RECORD_KEYS}
        self._put_root_meta(meta)
        return len(by_patient)

    def _all_records(self, kind: str) -> list[dict]:
        """Every record of ``kind``, oldest first: each patient's document (one listing and one read each),
        and what an older store still keeps in its root."""
        for attempt in range(3):
            try:
                docs = self._backend.node_metadata(RECORDS_GROUP)
                break
            except FileNotFoundError:  # a run removed a document between the listing and its read: again
                if attempt == 2:
                    raise
        docs.pop(".", None)
        found = [r for _, doc in sorted(docs.items()) for r in doc.get("attributes", {}).get(kind, [])]
        if not getattr(self, "_records_ready", False):  # a writer moved them at its first record write
            have = {_identity(kind, r) for r in found}
            found += [r for r in self._root_attrs().get(kind, []) if _identity(kind, r) not in have]
        return sorted(found, key=lambda r: str(r.get("time") or ""))

    # ------------------------------------------------------------------ failures
    def failures(self) -> list[dict]:
        """Every failure record (patient, stage, file, reason, time), oldest first."""
        return self._all_records(FAILURES_KEY)

    def record_failure(self, error: PatientError, *, stage: str | None = None) -> None:
        """Keep one failure record per (patient, stage): the latest."""
        rec = error.as_record()
        rec["stage"] = rec.get("stage") or stage
        rec["time"] = _now()
        key = _identity(FAILURES_KEY, rec)
        self._update_patient_records(rec["patient"], FAILURES_KEY, lambda f: _identity(FAILURES_KEY, f) != key,
                                     [rec])

    def clear_failure(self, patient: str, stage: str) -> None:
        self._update_patient_records(patient, FAILURES_KEY, lambda f: f.get("stage") != stage)

    def damage(self) -> list[dict]:
        """Every damaged chunk or array the last verification of each patient found."""
        return self._all_records(DAMAGE_KEY)

    def record_damage(self, found: dict) -> None:
        """Replace the damage records of each patient of ``found`` (``{patient: records}``).

        ``records`` as :meth:`verify_patient` returns them; an empty list says
        the patient was verified and found whole (a read of its document, no write
        where it had none).
        """
        now = _now()
        for patient, records in found.items():
            new = [{**r, "patient": patient, "time": now} for r in records]
            self._update_patient_records(patient, DAMAGE_KEY, lambda d: False, new)

    def _clear_committed(self, patient: str, stage: str, *, whole_patient: bool) -> None:
        """After a commit: drop the stage's failure and its damage (every damage of a new patient group).

        One read of the patient's document (a missing file for nearly every patient), a write only when it
        held one of them.
        """
        self._ready_to_record()  # once per object: an older store's records are each patient's first
        records = self._patient_records(patient)
        if not records.get(FAILURES_KEY) and not records.get(DAMAGE_KEY):
            return
        failures, damage = records.get(FAILURES_KEY, []), records.get(DAMAGE_KEY, [])
        records[FAILURES_KEY] = [f for f in failures if f.get("stage") != stage]
        records[DAMAGE_KEY] = [d for d in damage if not (whole_patient or d.get("stage") == stage)]
        if len(records[FAILURES_KEY]) != len(failures) or len(records[DAMAGE_KEY]) != len(damage):
            self._put_patient_records(patient, records)

    # ------------------------------------------------------------------ warnings
    def warnings(self) -> list[dict]:
        """Every recorded warning: patient, stage, file, reason, time."""
        return self._all_records(WARNINGS_KEY)

    def record_warnings(self, patient: str, stage: str, records) -> None:
        """Replace the warnings of (``patient``, ``stage``) with ``records``.

        Each record is a dict with ``file`` (or None) and ``reason``: something
        a user should know that did not stop the patient (another patient's
        files skipped, a damaged edge slice dropped, an INPUT entry not used).
        Recording an empty list clears them, so a re-run leaves only what is
        still true.
        """
        now = _now()
        new = [{"patient": patient, "stage": stage, "file": None if r.get("file") is None else str(r["file"]),
                "reason": str(r["reason"]), "time": now} for r in records]
        self._update_patient_records(patient, WARNINGS_KEY, lambda w: w.get("stage") != stage, new)
