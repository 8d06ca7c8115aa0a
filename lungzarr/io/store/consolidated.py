"""The root ``zarr.json``: the root attributes, and the consolidated metadata kept inline in it."""
from __future__ import annotations

from lungzarr.io.store.layout import CONSOLIDATED_KEY, PATIENTS_GROUP, STAGING_GROUP, _jsonable


class _RootMetadata:
    """Part of :class:`~lungzarr.io.store.CohortStore`: its root attributes and consolidated metadata."""

    # ------------------------------------------------------------------ root metadata
    # The root attributes (failures, warnings, damage) are read and replaced as the JSON of
    # the root ``zarr.json``: one parse, no zarr node objects for the consolidated metadata
    # beside them, which is kept as it is (root attributes are not part of it).

    def _root_meta(self) -> dict:
        import json

        return json.loads((self.path / "zarr.json").read_text())

    def _put_root_meta(self, meta: dict) -> None:
        """Replace the root ``zarr.json`` atomically: a reader sees the old file or the new one, whole."""
        import json

        self._backend.replace_text(self.path / "zarr.json", json.dumps(meta, separators=(",", ":")))

    def _root_attrs(self) -> dict:
        return dict(self._root_meta().get("attributes", {}))

    def _update_root_attrs(self, update: dict) -> None:
        meta = self._root_meta()
        meta["attributes"] = {**meta.get("attributes", {}), **_jsonable(update)}
        self._put_root_meta(meta)

    # ------------------------------------------------------------------ consolidated metadata
    def is_consolidated(self) -> bool:
        """Whether the root holds consolidated metadata (a current one: see the module's notes)."""
        return self._root_meta().get(CONSOLIDATED_KEY) is not None

    def _changing(self) -> dict:
        """Drop the consolidated metadata before a change to a patient group or a table.

        Dropped, not updated: rewriting a listing of the whole cohort at every
        stage of every patient would cost O(cohort) per write; the writer
        writes it once at the end of its run (:meth:`lock`). Once dropped, this
        reads only the (then small) root ``zarr.json``. Returns the root
        metadata as it is now.
        """
        meta = self._root_meta()
        if meta.pop(CONSOLIDATED_KEY, None) is not None:
            self._put_root_meta(meta)
        return meta

    def consolidate(self) -> dict:
        """Write the consolidated metadata of every group and array (staged groups left out), atomically.

        The same layout as ``zarr.consolidate_metadata`` (inline, in the root
        ``zarr.json``), read from each node's own ``zarr.json``; the new root
        file replaces the old one in one ``os.replace``, so a reader never sees
        half of it. Call it only while holding the writer lock with nothing
        else writing (:meth:`lock` does, at the end of a run).

        Returns
        -------
        dict
            ``nodes`` (groups and arrays listed) and ``seconds`` it took.
        """
        import time

        start = time.perf_counter()
        entries = self._backend.node_metadata(STAGING_GROUP)
        for node in entries.values():
            if node.get("node_type") != "array":
                node[CONSOLIDATED_KEY] = {"kind": "inline", "must_understand": False, "metadata": {}}
        meta = self._root_meta()
        meta[CONSOLIDATED_KEY] = {"kind": "inline", "must_understand": False,
                                  "metadata": dict(sorted(entries.items()))}
        self._put_root_meta(meta)
        return {"nodes": len(entries), "seconds": time.perf_counter() - start}

    def drop_consolidated(self) -> None:
        """Drop the consolidated metadata (the writer lock's release writes it afresh); hold the lock."""
        self._changing()

    def consolidated_patients(self) -> list[str]:
        """The patients the consolidated metadata names (none without it)."""
        listed = (self._root_meta().get(CONSOLIDATED_KEY) or {}).get("metadata") or {}
        return sorted(rel.split("/")[1] for rel in listed if rel.startswith(PATIENTS_GROUP + "/")
                      and rel.count("/") == 1)

    def stale_consolidated(self, meta: dict | None = None) -> list[str]:
        """Why the consolidated metadata no longer describes the store; empty when it does (or there is none).

        Stale when a node it names (a patient group, an array, a child group)
        has lost its ``zarr.json`` (removed by hand, a disk that lost files) or
        a patient group on disk is not named in it (copied in by hand). Costs
        a stat per named node on a directory, one listing of the store on
        object storage; no voxel is read. ``meta``: the root metadata when
        read already. A run never leaves it stale (it drops
        it at its first write and writes it afresh at its end); this catches
        what happened to the store outside lungzarr.
        """
        listed = ((meta or self._root_meta()).get(CONSOLIDATED_KEY) or {}).get("metadata") or {}
        if not listed:
            return []
        present, groups = self._backend.present_nodes(listed)
        gone = set(listed) - present
        # Name the highest node gone only (a patient group, not each of its arrays).
        tops = sorted(rel for rel in gone if not any(g in gone for g in _ancestors(rel)))
        named = {rel.split("/")[1] for rel in listed if rel.startswith(PATIENTS_GROUP + "/") and rel.count("/") == 1}
        return ([f"{rel}/zarr.json is gone" for rel in tops]
                + [f"{PATIENTS_GROUP}/{p} is not listed in it" for p in sorted(groups - named)])


def _ancestors(rel: str) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b"]``."""
    parts = rel.split("/")
    return ["/".join(parts[:k]) for k in range(1, len(parts))]
