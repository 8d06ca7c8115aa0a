"""Per-patient markers and records: stage markers in a patient group; failures, damage and warnings at the root."""
from __future__ import annotations

from lungzarr.errors import PatientError
from lungzarr.io.store.layout import DAMAGE_KEY, FAILURES_KEY, STAGES_KEY, WARNINGS_KEY, _jsonable, _now

#: The root attributes that hold one list of records per patient and stage.
RECORD_KEYS = (FAILURES_KEY, DAMAGE_KEY, WARNINGS_KEY)


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

    # ------------------------------------------------------------------ failures
    def failures(self) -> list[dict]:
        return list(self._root_attrs().get(FAILURES_KEY, []))

    def record_failure(self, error: PatientError, *, stage: str | None = None) -> None:
        """Keep one failure record per (patient, stage): the latest."""
        rec = error.as_record()
        rec["stage"] = rec.get("stage") or stage
        rec["time"] = _now()
        kept = [f for f in self._root_attrs().get(FAILURES_KEY, [])
                if (f.get("patient"), f.get("stage")) != (rec["patient"], rec["stage"])]
        kept.append(_jsonable(rec))
        self._update_root_attrs({FAILURES_KEY: kept})

    def clear_failure(self, patient: str, stage: str) -> None:
        old = self._root_attrs().get(FAILURES_KEY, [])
        kept = [f for f in old if (f.get("patient"), f.get("stage")) != (patient, stage)]
        if len(kept) != len(old):
            self._update_root_attrs({FAILURES_KEY: kept})

    def damage(self) -> list[dict]:
        """Every damaged chunk or array the last verification of each patient found."""
        return list(self._root_attrs().get(DAMAGE_KEY, []))

    def record_damage(self, found: dict) -> None:
        """Replace the damage records of each patient of ``found`` (``{patient: records}``) in one write.

        ``records`` as :meth:`verify_patient` returns them; an empty list says
        the patient was verified and found whole.
        """
        now = _now()
        old = list(self._root_attrs().get(DAMAGE_KEY, []))
        kept = [d for d in old if d.get("patient") not in found]
        new = [_jsonable({**r, "patient": patient, "time": now}) for patient, records in found.items()
               for r in records]
        if new or len(kept) != len(old):
            self._update_root_attrs({DAMAGE_KEY: kept + new})

    def _recorded_patients(self) -> dict | None:
        """``{root attribute: patients with a record under it}`` for failures, damage and warnings, or None
        where that is not known cheaply (an object store).

        The records are in the root ``zarr.json``, which grows with them (~300 bytes a failure), while every
        patient's commit asks whether it has one to drop. So the answer is kept with the file's signature
        (:meth:`_DirectoryBackend.file_signature`, one stat) and the file parsed again only when it changed:
        with 5,000 failures (a 1.5 MB root) a commit's look took 14 ms.
        """
        signature = self._backend.file_signature(self.path / "zarr.json")  # before the read: never newer
        if signature is None:
            return None
        cached = getattr(self, "_recorded_index", None)
        if cached is None or cached[0] != signature:
            attrs = self._root_attrs()
            cached = self._recorded_index = (signature, {
                k: frozenset(r.get("patient") for r in attrs.get(k, [])) for k in RECORD_KEYS})
        return cached[1]

    def _clear_committed(self, patient: str, stage: str, *, whole_patient: bool) -> None:
        """After a commit: drop the stage's failure and its damage (every damage of a new patient group)."""
        recorded = self._recorded_patients()
        if recorded is not None and patient not in recorded[FAILURES_KEY] | recorded[DAMAGE_KEY]:
            return  # nothing of this patient's to drop: the root is neither parsed nor written
        attrs = self._root_attrs()
        update = {}
        failures = attrs.get(FAILURES_KEY, [])
        kept = [f for f in failures if (f.get("patient"), f.get("stage")) != (patient, stage)]
        if len(kept) != len(failures):
            update[FAILURES_KEY] = kept
        damage = attrs.get(DAMAGE_KEY, [])
        kept = [d for d in damage if d.get("patient") != patient or not (whole_patient or d.get("stage") == stage)]
        if len(kept) != len(damage):
            update[DAMAGE_KEY] = kept
        if update:
            self._update_root_attrs(update)

    # ------------------------------------------------------------------ warnings
    def warnings(self) -> list[dict]:
        """Every recorded warning: patient, stage, file, reason, time."""
        return list(self._root_attrs().get(WARNINGS_KEY, []))

    def record_warnings(self, patient: str, stage: str, records) -> None:
        """Replace the warnings of (``patient``, ``stage``) with ``records``.

        Each record is a dict with ``file`` (or None) and ``reason``: something
        a user should know that did not stop the patient (another patient's
        files skipped, a damaged edge slice dropped, an INPUT entry not used).
        Recording an empty list clears them, so a re-run leaves only what is
        still true.
        """
        records = list(records)
        if not records:
            recorded = self._recorded_patients()
            if recorded is not None and patient not in recorded[WARNINGS_KEY]:
                return  # no warning to clear: the root is neither parsed nor written
        now = _now()
        new = [_jsonable({"patient": patient, "stage": stage, "file": None if r.get("file") is None
                          else str(r["file"]), "reason": str(r["reason"]), "time": now}) for r in records]
        old = list(self._root_attrs().get(WARNINGS_KEY, []))
        kept = [w for w in old if (w.get("patient"), w.get("stage")) != (patient, stage)]
        if new or len(kept) != len(old):
            self._update_root_attrs({WARNINGS_KEY: kept + new})
