"""Consolidated metadata, one listing per patient group; the root ``zarr.json`` (root attributes).

Each patient group's ``zarr.json`` holds zarr 3's inline ``consolidated_metadata``:
the metadata of every array and child group of that patient (the same layout
``zarr.consolidate_metadata(store, path="patients/<id>")`` writes). So a reader
opens a patient with one metadata read, and what that costs does not grow with
the cohort; no document in the store lists the whole cohort (a root listing
at NLST scale, 75,000 patients, would be ~700 MB, read by every open and
rewritten by every run).

A patient's listing is never stale because of lungzarr: every write to the
patient's group (a stage's arrays, a child group, an array's attributes, a
stage marker) first drops it (:meth:`_RootMetadata._changing`, one atomic
replace of the group's ``zarr.json``), and the stage's commit writes it afresh
with the stage marker, in the same atomic replace. A patient whose stage
failed or whose run was killed has none: readers read each node's own
metadata then (slower, never wrong). What lungzarr does not write (an array's
folder removed by hand, files a disk lost) can make it stale: lungzarr's
readers check the nodes it names first (:meth:`_RootMetadata.stale_listing`,
a stat per node) and do not use it then; ``lungzarr verify`` names it and
``--repair`` writes it afresh.

Stores of earlier lungzarr versions kept one listing of the whole cohort in the root
``zarr.json``; the first write to such a store drops it.
"""
from __future__ import annotations

import json

from lungzarr.io.store.layout import CONSOLIDATED_KEY


def _listing(entries: dict) -> dict:
    """zarr's inline consolidated metadata of ``entries`` (``{path relative to the group: zarr.json}``)."""
    for node in entries.values():
        if node.get("node_type") != "array":
            # zarr marks a child group's own (empty) listing: its children are in the parent's.
            node[CONSOLIDATED_KEY] = {"kind": "inline", "must_understand": False, "metadata": {}}
    return {"kind": "inline", "must_understand": False, "metadata": dict(sorted(entries.items()))}


class ListingText:
    """A group's listing as the JSON text of zarr's inline consolidated metadata, with the names of its array
    nodes: what a worker that wrote the group sends the client that commits it
    (:meth:`_RootMetadata._put_listed`), which then neither parses nor serialises the listing (tens of
    kB by the last stages: ~2.5 ms of the client's CPU per patient, ``benchmarks/README.md``)."""

    __slots__ = ("text", "arrays")

    def __init__(self, entries: dict):
        self.text = json.dumps(_listing({rel: dict(node) for rel, node in entries.items()}), separators=(",", ":"))
        self.arrays = frozenset(rel for rel, node in entries.items() if node.get("node_type") == "array")


def listed_nodes(meta: dict) -> dict | None:
    """The listing a group's parsed ``zarr.json`` holds (``{path relative to the group: zarr.json}``);
    None when it holds none."""
    listing = meta.get(CONSOLIDATED_KEY)
    return None if listing is None else dict(listing.get("metadata") or {})


class _RootMetadata:
    """Part of :class:`~lungzarr.io.store.CohortStore`: root attributes and each patient's listing."""

    # ------------------------------------------------------------------ root metadata
    # The root attributes are read and replaced as the JSON of the root ``zarr.json``: one parse, no zarr
    # node objects.

    def _root_meta(self) -> dict:
        return json.loads((self.path / "zarr.json").read_text())

    def _put_root_meta(self, meta: dict) -> None:
        """Replace the root ``zarr.json`` atomically: a reader sees the old file or the new one, whole."""
        self._backend.replace_text(self.path / "zarr.json", json.dumps(meta, separators=(",", ":")))

    def _root_attrs(self) -> dict:
        return dict(self._root_meta().get("attributes", {}))

    # ------------------------------------------------------------------ listings
    def _group_meta(self, group: str) -> dict | None:
        """The group's ``zarr.json`` parsed (:meth:`CohortStore._node_meta`); None when it has none."""
        try:
            return self._node_meta(group)
        except FileNotFoundError:
            return None

    def _changing(self, patient: str | None = None) -> None:
        """Before a write to ``patient``'s group (or to the tables: ``None``), drop what it makes stale.

        The patient's listing (its ``zarr.json`` rewritten without it, when
        it has one: a read, and a replace only then), and, once per
        CohortStore object, the whole-cohort listing an older lungzarr kept
        in the root ``zarr.json``.
        """
        if not getattr(self, "_root_listing_checked", False):
            meta = self._root_meta()
            if self._drop_root_listing(meta):
                self._put_root_meta(meta)
        if patient is not None:
            group = self.group_path(patient)
            meta = self._group_meta(group)
            if meta is not None and meta.pop(CONSOLIDATED_KEY, None) is not None:
                self._put_node_meta(group, meta)

    def _drop_root_listing(self, meta: dict) -> bool:
        """Drop the listing of the whole cohort that an older lungzarr kept in the root's ``zarr.json``
        (``meta``, parsed) from it, and note that this object has done so; whether there was one. Stale once
        anything is written: the caller writes ``meta`` back when this says True."""
        self._root_listing_checked = True
        return meta.pop(CONSOLIDATED_KEY, None) is not None

    def listing(self, patient: str) -> dict | None:
        """The patient's consolidated metadata (``{path relative to its group: zarr.json}``); None without."""
        return listed_nodes(self._group_meta(self.group_path(patient)) or {})

    def consolidate_patient(self, patient: str) -> int:
        """Write the listing of a patient's group into its ``zarr.json`` (one atomic replace); the nodes
        listed. (A stage's commit writes it with the marker: :meth:`PendingStage.commit`.)"""
        group = self.group_path(patient)
        entries = self._backend.node_metadata(group)
        meta = entries.pop(".")
        self._put_listed(group, meta, ListingText(entries))
        return len(entries)

    def _put_listed(self, group: str, meta: dict, listing: ListingText) -> None:
        """Replace the group's ``zarr.json`` with ``meta`` and ``listing``, in one atomic replace: the
        listing's text spliced in after ``meta``'s own (the document ``json.dumps`` of both would give), so a
        listing a worker made is neither parsed nor serialised again."""
        meta.pop(CONSOLIDATED_KEY, None)
        head = json.dumps(meta, separators=(",", ":"))[:-1]  # without its closing brace
        comma = "," if len(head) > 1 else ""
        self._backend.replace_text(self.path / group / "zarr.json",
                                   f'{head}{comma}"{CONSOLIDATED_KEY}":{listing.text}}}')

    def stale_listing(self, patient: str, listed: dict | None = None) -> list[str]:
        """Why the patient's listing no longer describes its group; empty when it does (or there is none).

        Stale when a node it names has lost its ``zarr.json`` (an array's
        folder removed by hand, a disk that lost files): zarr would read the
        missing chunks as the fill value. A stat per named node on a
        directory, one listing of the group's prefix on object storage.
        ``listed``: the listing when read already.
        """
        listed = self.listing(patient) if listed is None else listed
        if not listed:
            return []
        group = self.group_path(patient)
        gone = set(listed) - self._backend.present_nodes(group, listed)
        # Name the highest node gone only (a child group, not each of its arrays).
        tops = sorted(rel for rel in gone if not any(a in gone for a in _ancestors(rel)))
        return [f"{group}/{rel}/zarr.json is gone" for rel in tops]

    def consolidate(self, patients=None) -> dict:
        """Write every patient's listing afresh (``verify --repair``; a run writes each patient's own).

        Hold the writer lock with nothing else writing.

        Returns
        -------
        dict
            ``patients`` and ``nodes`` listed, ``seconds`` it took.
        """
        import time

        start = time.perf_counter()
        self._changing()
        done = [self.consolidate_patient(p) for p in (self.patients() if patients is None else patients)]
        return {"patients": len(done), "nodes": sum(done), "seconds": time.perf_counter() - start}


def _ancestors(rel: str) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b"]``."""
    parts = rel.split("/")
    return ["/".join(parts[:k]) for k in range(1, len(parts))]
