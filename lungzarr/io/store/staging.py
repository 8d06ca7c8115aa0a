"""Staging and atomic commits: a stage is written, then marked; a new patient group is staged, then swapped in."""
from __future__ import annotations

import uuid
from pathlib import Path

import lungzarr.io.store.encoding as encoding
from lungzarr._version import __version__
from lungzarr.io.store.consolidated import ListingText
from lungzarr.io.store.encoding import _encoded_for_store
from lungzarr.io.store.layout import STAGES_KEY, STAGING_GROUP, _check_stage_name, _jsonable, _now
from lungzarr.io.store.ngff import IMAGE_ARRAYS, OME_KEY, ome_multiscales


class _Staging:
    """Part of :class:`~lungzarr.io.store.CohortStore`: writing a patient's stages, staged and committed."""

    def _recover_staging(self) -> None:
        """Finish the swap of a staged patient that a killed run had completed; drop the rest.

        Called by :meth:`lock` once the lock is held: staged groups belong to
        the run holding the lock, so only the next writer may clean them up.
        """
        staging = self.path / STAGING_GROUP
        for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
            attrs = dict(self._group(f"{STAGING_GROUP}/{folder.name}", mode="r").attrs) \
                if (folder / "zarr.json").exists() else {}
            # The stage that creates a patient marks the staged group just before the swap.
            if attrs.get(STAGES_KEY):
                self._swap_in(folder.name)
            else:
                _remove_while_written(self, folder)

    def _swap_in(self, patient: str) -> None:
        self._changing()
        self._backend.commit_staged(self.path / STAGING_GROUP / patient, self.path / self.group_path(patient))

    # ------------------------------------------------------------------ writes
    def remove_patient(self, patient: str) -> None:
        """Delete a patient's group (used to redo an incomplete ingest)."""
        folder = self.path / self.group_path(patient)
        if folder.exists():
            self._rmtree(folder)

    def prepare_stage(self, patient: str, stage: str, dataset, *, record: dict | None = None,
                      new_group: bool = False, subgroup: str | None = None) -> "PendingStage":
        """Start writing one stage of a patient: metadata now, voxels when computed.

        The stage is unmarked first, so a run killed before :meth:`PendingStage.commit`
        leaves it incomplete and the next run redoes it.

        Parameters
        ----------
        patient, stage : str
        dataset : xarray.Dataset
            The stage's variables; dask-backed ones are written chunk by chunk
            when the returned object's ``delayed`` is computed.
        record : dict, optional
            Provenance of the stage, kept in the stage marker.
        new_group : bool, optional
            The stage creates the patient group (ingest): any previous group is
            removed first, and ``dataset.attrs`` become the group attrs.
        subgroup : str, optional
            Write into a child group (e.g. ``"nodules"``), replacing it.
        """
        _check_stage_name(stage)
        gpath = self.group_path(patient)
        # A new group is staged aside: the patient's current group (and its listing) stays until the swap.
        self._changing(None if new_group else patient)
        if new_group:
            # A new patient group is written aside and swapped in on commit, so an
            # existing group survives a failed or interrupted rewrite.
            gpath = f"{STAGING_GROUP}/{patient}"
            if (self.path / gpath).exists():
                self._rmtree(self.path / gpath)
            attrs = _jsonable(dict(dataset.attrs))
        else:
            attrs = self._unmark_stage(patient, stage)
        # A group removed just before is created with "w-", not "w": "w" has zarr clear each new
        # array's prefix first, five requests per array on object storage for nothing to clear.
        if subgroup is not None:
            target = f"{gpath}/{subgroup}"
            if (self.path / target).exists():
                self._rmtree(self.path / target)
            mode = "w-"
        elif new_group:
            target, mode = gpath, "w-"
        else:
            target, mode = gpath, "a"
            # One listing of the group: the stage's old arrays to remove, and the coordinates already there.
            children = {p.name: p for p in (self.path / gpath).iterdir()}
            for name in dataset.data_vars:
                if name in children and children[name].is_dir():
                    self._rmtree(children[name])
            # Coordinates written by an earlier stage stay as they are.
            dataset = dataset.drop_vars([c for c in dataset.coords if c in children])
            dataset.attrs = {}
        delayed = _encoded_for_store(dataset).to_zarr(self._group_store(target), mode=mode, compute=False,
                                                      **encoding._WRITE)
        # xarray rewrites the group's attributes on every write: put ours back at once.
        self._group(gpath).attrs.put(_jsonable(attrs))
        return PendingStage(self, patient, stage, delayed, record or {}, group_path=gpath,
                            staged=new_group)

    def prepare_task(self, patient: str, stage: str, delayed, *, record: dict | None = None) -> "PendingStage":
        """Like :meth:`prepare_stage` for a stage whose dask task writes its own output.

        ``delayed`` must write through :meth:`write_subgroup` (on whichever
        worker runs it) and return a dict merged into the stage record.
        """
        _check_stage_name(stage)
        self._changing(patient)
        self._unmark_stage(patient, stage)
        return PendingStage(self, patient, stage, delayed, record or {}, group_path=self.group_path(patient))

    def write_subgroup(self, patient: str, name: str, dataset) -> None:
        """Replace the child group ``patients/<id>/<name>`` with ``dataset`` (computed now)."""
        target = f"{self.group_path(patient)}/{name}"
        self._changing(patient)  # on a worker: the run's client dropped it already, so this only reads
        if (self.path / target).exists():
            self._rmtree(self.path / target)
        _encoded_for_store(dataset.copy()).to_zarr(self._group_store(target), mode="w-", **encoding._WRITE)


def _remove_while_written(store, folder, *, attempts: int = 25, pause_s: float = 0.2) -> bool:
    """Remove ``folder``, retried while late tasks of a stopped run still write chunks into it (a folder
    ``rmtree`` is emptying is then "not empty"); its ``zarr.json`` first, so what is left is no group.
    Returns whether it is gone; one still written after ``attempts`` is left to the next writer's recovery."""
    import errno
    import time

    for _ in range(attempts):
        try:
            if isinstance(folder, Path):  # the object store's rmtree removes zarr.json first itself
                (folder / "zarr.json").unlink(missing_ok=True)
            if folder.exists():
                store._rmtree(folder)
            return True
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT, errno.EEXIST, errno.EBUSY):
                raise
            time.sleep(pause_s)
    return False


class PendingStage:
    """A stage whose metadata is written; ``delayed`` writes the voxels, ``commit`` marks it complete.

    Attributes
    ----------
    warnings : list of dict
        What the stage recorded for the user (``file``, ``reason``), shown in
        the run's own output when the patient's stage is done.
    future : distributed.Future or None
        The computation of ``delayed`` on a cluster, once submitted.
    """

    #: Attempts and pause (s) of :meth:`discard` while late tasks still write into the staged group.
    DISCARD_ATTEMPTS, DISCARD_PAUSE_S = 5, 0.2

    def __init__(self, store: "CohortStore", patient: str, stage: str, delayed, record: dict, *,
                 group_path: str, staged: bool = False):
        self.store, self.patient, self.stage = store, patient, stage
        self.delayed = delayed
        self.record = record
        self.group_path = group_path
        self.staged = staged
        self.warnings: list[dict] = []
        self.future = None
        #: The patient's stage markers as :meth:`commit` wrote them (None before): what a caller that
        #: decides the next stage needs not read again.
        self.committed: dict | None = None

    def compute(self, **kwargs):
        return self.delayed.compute(**kwargs)

    def add_record(self, result) -> None:
        """Merge what the computed task returned (a dict) into the stage record."""
        if isinstance(result, dict):
            self.record.update(result)

    def then(self, func, *args) -> "PendingStage":
        """Run ``func(*args)`` as one more task after the voxels are written.

        It runs on a worker, in the same computation, and the dict it returns
        is merged into the stage record (for figures that need the written
        arrays, such as the crop box, without a second round trip).
        """
        import dask

        def after_write(_, *a):
            return func(*a)

        self.delayed = dask.delayed(after_write, pure=False)(self.delayed, *args)
        return self

    def commit(self, *, listing: dict | None = None) -> None:
        """Mark the stage complete (call only after ``delayed`` has been computed).

        The marker, the ``ome`` attributes and the group's listing (its
        consolidated metadata: every node it now has) are written in one
        atomic replace of the group's ``zarr.json``, read and written as JSON
        (no zarr objects: the run's client commits every patient's stages).

        Parameters
        ----------
        listing : ListingText, optional
            The group's listing as the worker that wrote its nodes made it
            (:class:`~lungzarr.io.store.consolidated.ListingText`), so the
            client reads only the group's own ``zarr.json`` and splices the
            listing in as text; read here when not given.
        """
        if listing is None:
            entries = self.store._backend.node_metadata(self.group_path)
            meta, listing = entries.pop("."), ListingText(entries)
        else:
            meta = self.store._node_meta(self.group_path)
        attrs = dict(meta.get("attributes", {}))
        stages = dict(attrs.get(STAGES_KEY, {}))
        stages[self.stage] = _jsonable({"completed": _now(), "id": uuid.uuid4().hex,
                                        "lungzarr_version": __version__, **self.record})
        attrs[STAGES_KEY] = stages
        ome = ome_multiscales(attrs, arrays={name for name in IMAGE_ARRAYS if name in listing.arrays})
        if ome is not None:
            attrs[OME_KEY] = _jsonable(ome)
        # The rest was read from JSON: only what is new here is made JSON (the client commits every stage).
        meta["attributes"] = attrs
        self.store._put_listed(self.group_path, meta, listing)
        if self.staged:
            self.store._swap_in(self.patient)
        self.store._clear_committed(self.patient, self.stage, whole_patient=self.staged)
        self.committed = stages

    def discard(self) -> None:
        """Drop what a failed write left (staged groups only; stage arrays are redone next run).

        When one task of a patient's computation fails, its sibling tasks may
        still be running on other workers and writing chunks into the staged
        group (a folder ``rmtree`` is emptying then is "not empty"). So the
        group's ``zarr.json`` goes first: what is left is no longer a group
        (no reader, nor the next run's recovery, takes it for a patient).
        Then the folder is removed, retried a few times; what a late task
        writes after that is removed by the next writer's recovery
        (:meth:`CohortStore.lock`), which runs once this run's workers are gone.
        """
        if not self.staged:
            return
        # Late tasks still writing: a headless folder is left to the next writer's recovery.
        _remove_while_written(self.store, self.store.path / self.group_path, attempts=self.DISCARD_ATTEMPTS,
                              pause_s=self.DISCARD_PAUSE_S)
