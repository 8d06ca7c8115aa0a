"""The backend of a store on object storage (S3, or any fsspec URL): commits by server-side copies."""
from __future__ import annotations

from lungzarr.errors import LungzarrError
from lungzarr.io.store.layout import PATIENTS_GROUP
from lungzarr.io.store.lock import _ObjectLock
from lungzarr.io.store.objectpath import _ObjectPath


def _check_url(url: str) -> str:
    """``url`` without a trailing slash; refuse one that carries credentials (they come from the environment)."""
    from urllib.parse import urlsplit

    from lungzarr.io.locations import check_no_credentials

    check_no_credentials(url, what="store")  # the URL is never echoed: it holds a secret
    parts = urlsplit(url)
    if not parts.netloc:
        raise LungzarrError(f"store URL {url!r} names no bucket: use {parts.scheme}://BUCKET/NAME.zarr")
    return url.rstrip("/")


def _request_options(url: str) -> dict:
    """Storage options that spare a request per object read, for the filesystems that need them.

    s3fs reads a whole object (``cat_file``, what zarr's ``FsspecStore.get`` calls for every
    ``zarr.json`` and chunk) with a HEAD for its size first, then the GET, unless
    ``max_concurrency`` is 1: the size only decides whether to split a read above its block
    size (50 MB) into parallel ranged GETs. lungzarr's objects are chunks of a few MB and
    metadata files, so the HEAD was every second request of a run
    (``benchmarks/bench_s3_requests.py``). The option also caps the parallel parts of one
    multipart upload, which only objects above 100 MB use.
    """
    from fsspec.utils import get_protocol

    return {"max_concurrency": 1} if get_protocol(url) in ("s3", "s3a") else {}


class _ObjectBackend(_ObjectLock):
    """A store on object storage (S3, or any fsspec URL): no rename, no flock.

    - A staged patient (``staging/<id>``, complete and marked) is committed by
      removing ``patients/<id>`` (its ``zarr.json`` first, so it vanishes for
      readers at once), copying the staged objects server-side with the group's
      ``zarr.json`` last (until then no reader opens the group: zarr and
      :meth:`CohortStore.patients` only see a group through its ``zarr.json``),
      then removing the staged objects. A run killed anywhere in between leaves
      the marked staged group, which the next writer's recovery swaps in again
      (every step is idempotent).
    - A metadata file (root attributes, table pointer) is replaced by one PUT,
      which S3 makes atomic: readers see the old object or the new one.
    - The writer lock is an object ``NAME.lock`` beside the store, created
      with a conditional write (``If-None-Match: *``) that exactly one of two
      runs wins. It names the holder (pid, host, start) and carries a
      heartbeat the holder rewrites; it is removed on release. A lock left by
      a killed run is taken over when its pid is gone on this host, or
      :data:`LOCK_TTL_S` after its last heartbeat from another host (on S3 by a
      conditional overwrite ``If-Match`` of the object seen, so only one run wins).
    """

    #: Whether a file's existence costs a request (:meth:`CohortStore.patients`): one HEAD each here.
    checks_are_requests = True

    def __init__(self, url, mode: str):
        import fsspec
        from zarr.storage import FsspecStore

        self.url = _check_url(str(url))
        # No listing cache: another process (a worker, a second run) changes what is listed.
        options = self._options = {"use_listings_cache": False, **_request_options(self.url)}
        self.fs, key = fsspec.url_to_fs(self.url, **options)
        self.path = _ObjectPath(self.fs, key)
        self.zarr_store = FsspecStore.from_url(self.url, storage_options=options, read_only=mode == "r")

    def replace_text(self, target: _ObjectPath, text: str) -> None:
        target.write_text(text)  # one PUT: atomic on S3

    def make_folder(self, path) -> None:
        """Nothing: an object store has no folders, only keys."""

    def rmtree(self, path: _ObjectPath, *, ignore_errors: bool = False) -> None:
        """Remove every object below ``path``, its ``zarr.json`` first (the group vanishes for readers at once)."""
        try:
            keys = self.fs.find(path.key)
            head = f"{path.key}/zarr.json"
            if head in keys:
                self.fs.rm_file(head)
                keys.remove(head)
            if keys:
                self.fs.rm(keys)
        except OSError:  # FileNotFoundError included
            if not ignore_errors:
                raise

    def commit_staged(self, staged: _ObjectPath, final: _ObjectPath) -> None:
        self.rmtree(final)
        keys = self.fs.find(staged.key)
        head = f"{staged.key}/zarr.json"
        body = [k for k in keys if k != head]

        def moved(ks):
            return [f"{final.key}{k[len(staged.key):]}" for k in ks]

        if body:
            self.fs.copy(body, moved(body))
        if head in keys:
            self.fs.copy(head, moved([head])[0])  # last: the group appears whole
        self.rmtree(staged)

    def store_at(self, rel: str, *, writable: bool = False):
        """A zarr store whose root is the group ``rel`` (a patient's own), read-only unless ``writable``."""
        from zarr.storage import FsspecStore

        # From the URL, as the store's own: zarr makes the filesystem on its own event loop.
        return FsspecStore.from_url(f"{self.url.rstrip('/')}/{rel}", storage_options=self._options,
                                    read_only=not writable)

    def _keys_below(self, group: str) -> dict:
        """``{path relative to group: key}`` of every ``zarr.json`` below ``group``: one listing of its
        prefix (1,000 keys a request; a patient's chunks are listed too)."""
        top = f"{self.path.key}/{group}"
        return {key[len(top) + 1:-len("/zarr.json")] or ".": key
                for key in self.fs.find(top) if key == f"{top}/zarr.json" or key.endswith("/zarr.json")}

    def node_metadata(self, group: str) -> dict:
        """Like :meth:`_DirectoryBackend.node_metadata`: one listing of the group's prefix, then every
        ``zarr.json`` of its hierarchy read at once."""
        import json

        metas = self._keys_below(group)
        if "." not in metas:
            return {}
        groups, wanted = {"."}, ["."]
        for rel in sorted(metas, key=lambda r: (r.count("/"), r)):
            if rel == ".":
                continue
            parent = rel.rsplit("/", 1)[0] if "/" in rel else "."
            if parent in groups:  # not below an array or a folder that is no zarr node
                wanted.append(rel)
                groups.add(rel)  # provisional: arrays are dropped once read
        texts = self.fs.cat([metas[r] for r in wanted])
        nodes = {}
        for rel in sorted(wanted, key=lambda r: (r.count("/"), r)):
            node = json.loads(texts[metas[rel]])
            parent = rel.rsplit("/", 1)[0] if "/" in rel else "."
            if rel != "." and parent not in groups:
                continue
            if node.get("node_type") == "array":
                groups.discard(rel)
            nodes[rel] = node
        return nodes

    def present_nodes(self, group: str, nodes) -> set:
        """Like :meth:`_DirectoryBackend.present_nodes`, from one listing of the group's prefix, not one
        request per node."""
        return set(nodes) & set(self._keys_below(group))

    def size_bytes(self) -> int:
        return int(sum(self.fs.du(self.path.key, total=False).values()))
