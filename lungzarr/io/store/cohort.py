"""The cohort store's one public class, :class:`CohortStore`: a patient group per patient, composed of its parts.

Each part is a mixin in its own module (one job each, see :mod:`lungzarr.io.store`); this module
holds what they all stand on: opening the store through its backend, and naming its groups.
"""
from __future__ import annotations

from lungzarr._version import __version__
from lungzarr.errors import LungzarrError
from lungzarr.io.store.arrays import _PatientArrays
from lungzarr.io.store.backend import _backend
from lungzarr.io.store.consolidated import _RootMetadata
from lungzarr.io.store.integrity import _Integrity
from lungzarr.io.store.layout import PATIENTS_GROUP, STAGING_GROUP, TABLES_GROUP, _now, check_patient_id
from lungzarr.io.store.lock import _WriterLock
from lungzarr.io.store.ngff import _LabelImages
from lungzarr.io.store.records import _PatientRecords
from lungzarr.io.store.staging import _Staging
from lungzarr.io.store.tables import _CohortTables


class CohortStore(_Staging, _PatientRecords, _RootMetadata, _PatientArrays, _LabelImages, _CohortTables,
                  _Integrity, _WriterLock):
    """A cohort's Zarr v3 store.

    Parameters
    ----------
    path : path or str
        The store directory (created on first write), or an object store's
        URL (``s3://bucket/cohort.zarr``, any fsspec URL; credentials and
        endpoint from the storage library's environment, never from here).
    mode : {"a", "r", "r+"}
        ``"r"`` refuses to create the store when it does not exist. ``"r+"``
        writes a store a run has made, without looking first (a task on a
        worker: the run's client made it): ``"a"`` opens the root and looks
        for its three groups, five requests on object storage for each task.
    """

    def __init__(self, path, *, mode: str = "a"):
        import zarr

        if mode not in ("a", "r", "r+"):
            raise ValueError(f"mode must be 'a', 'r' or 'r+', got {mode!r}")
        self._backend = _backend(path, "r" if mode == "r" else "a")
        self.path = self._backend.path
        self._zstore = self._backend.zarr_store
        self._rmtree = self._backend.rmtree
        self.mode = mode
        if mode == "r" and not (self.path / "zarr.json").exists():
            raise LungzarrError(f"no lungzarr store at {str(self.path)!r}; run `lungzarr ingest INPUT "
                                f"{self.path}` or `lungzarr run` first")
        self._zarr = zarr
        # A task's store: its run's client dropped an older store's whole-cohort listing before any task
        # (consolidated._RootMetadata._changing), so the task does not read the root to look for it.
        self._root_listing_checked = mode == "r+"
        if mode == "a":
            root = zarr.open_group(self._zstore, mode="a", zarr_format=3, use_consolidated=False)
            if "lungzarr:version" not in root.attrs:
                root.attrs.update({"lungzarr:version": __version__, "lungzarr:created": _now()})
            for name in (PATIENTS_GROUP, TABLES_GROUP, STAGING_GROUP):
                if not (self.path / name / "zarr.json").exists():
                    root.create_group(name)

    # ------------------------------------------------------------------ groups
    def _root(self, mode=None):
        return self._zarr.open_group(self._zstore, mode=mode or ("r" if self.mode == "r" else "a"), zarr_format=3,
                                     use_consolidated=False)

    def _group(self, path: str, mode=None):
        # Without the group's listing: a write through it would put a stale one back (zarr rewrites
        # the metadata it read), and a read must see the nodes themselves.
        return self._zarr.open_group(self._zstore, path=path, mode=mode or ("r" if self.mode == "r" else "r+"),
                                     zarr_format=3, use_consolidated=False)

    def _group_store(self, path: str):
        """A writable zarr store whose root is the group at ``path``, for xarray's ``to_zarr`` of a patient's
        group or child group: zarr checks, before each array it creates, that every group above it exists (a
        read of each ``zarr.json`` up to the store's root: on object storage ~2 requests per array); rooted at
        the group, there is none above it to check."""
        return self._backend.store_at(path, writable=True)

    @staticmethod
    def group_path(patient: str) -> str:
        return f"{PATIENTS_GROUP}/{check_patient_id(patient)}"

    def _patient_group(self, patient: str, mode=None):
        """The patient's zarr group, or None without it: one read of its ``zarr.json``.

        Not ``has_patient`` first: on object storage that is one more request for what the read tells.
        """
        try:
            return self._group(self.group_path(patient), mode=mode)
        except self._zarr.errors.GroupNotFoundError:
            return None

    def patients(self, *, checked: bool = True) -> list[str]:
        """Identifiers of the patients with a group in the store, sorted.

        ``checked=False``, for readers of a whole cohort (:func:`open_patients`, the cohort tables' readers):
        on object storage, the folders one listing of ``patients/`` names (1,000 a request), without the
        request per folder that finds its ``zarr.json`` (1,005 requests and 11 s at 1,000 patients on a
        loopback S3 server, ``benchmarks/results/open_patient_s3.json``; hours at 75,000 on a real one). A
        folder whose ``zarr.json`` is missing (a patient's commit under way, a group damaged by hand) then
        counts; opening it is refused, as for any id not in the store. On a directory the check is a stat
        and is always made.
        """
        check = checked or not self._backend.checks_are_requests
        return sorted(p.name for p in self._listed_folders() if not check or (p / "zarr.json").exists())

    def patient_folders(self) -> list[str]:
        """Folders under ``patients/`` that are no group (no ``zarr.json``): what is left of a lost group."""
        return sorted(p.name for p in self._listed_folders() if not (p / "zarr.json").exists())

    def _listed_folders(self) -> list:
        """The folders one listing of ``patients/`` names ([] without it)."""
        folder = self.path / PATIENTS_GROUP
        if not folder.is_dir():
            return []
        # is_dir: the listing says it (no request), and it skips the group's own zarr.json.
        return [p for p in folder.iterdir() if p.is_dir()]

    def has_patient(self, patient: str) -> bool:
        return (self.path / self.group_path(patient) / "zarr.json").exists()

    def patient_attrs(self, patient: str) -> dict:
        """The patient group's attributes; {} without the group (one read: no existence check first)."""
        return dict((self._group_meta(self.group_path(patient)) or {}).get("attributes", {}))

    # ------------------------------------------------------------------ a node's zarr.json
    # A group's attributes are read and replaced as the JSON of its ``zarr.json``: one read and one parse
    # (or one atomic replace), no zarr node objects, which cost the run's client ~10 ms per stage commit.

    def _node_meta(self, path: str) -> dict:
        """The ``zarr.json`` of the node at ``path`` (below the root), parsed."""
        import json

        return json.loads((self.path / path / "zarr.json").read_text())

    def _put_node_meta(self, path: str, meta: dict) -> None:
        """Replace the ``zarr.json`` of the node at ``path`` atomically (a reader sees the old or the new)."""
        import json

        self._backend.replace_text(self.path / path / "zarr.json", json.dumps(meta, separators=(",", ":")))

    def _put_group(self, path: str, attributes: dict) -> None:
        """Write (or replace) the group at ``path`` with ``attributes``, without zarr: its folder, then its
        ``zarr.json`` (one atomic replace)."""
        self._backend.make_folder(self.path / path)
        self._put_node_meta(path, {"zarr_format": 3, "node_type": "group", "attributes": attributes})

    # ------------------------------------------------------------------ misc
    def size_bytes(self) -> int:
        return self._backend.size_bytes()
