"""The few pathlib methods the store uses, over fsspec: a key (or prefix) of an object store as a path."""
from __future__ import annotations


class _ObjectStat:
    """What ``Path.stat()`` gives that the store uses, for an object (``st_etag`` too)."""

    def __init__(self, info: dict):
        self.st_size = int(info.get("size") or 0)
        modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
        self.st_mtime_ns = int(modified.timestamp() * 1e9) if hasattr(modified, "timestamp") else 0
        self.st_etag = info.get("ETag") or info.get("etag")


class _ObjectPath:
    """A key (or prefix) of an object store with the pathlib methods :class:`CohortStore` uses.

    "Folders" are prefixes: one exists while an object lies below it. ``str()``
    is the URL (``s3://bucket/key``), never a local path, and carries no
    credentials (they stay in the filesystem object, read from the environment).
    """

    def __init__(self, fs, key: str, *, kind: str | None = None):
        self.fs, self.key, self._kind = fs, key.rstrip("/"), kind

    def __truediv__(self, name) -> "_ObjectPath":
        return _ObjectPath(self.fs, f"{self.key}/{name}")

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.key)

    def __repr__(self) -> str:
        return f"_ObjectPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, _ObjectPath) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __lt__(self, other) -> bool:
        return self.key < other.key

    def __dask_tokenize__(self):
        return ("lungzarr-object-path", str(self))

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "_ObjectPath":
        return _ObjectPath(self.fs, self.key.rsplit("/", 1)[0])

    def with_name(self, name: str) -> "_ObjectPath":
        return self.parent / name

    def resolve(self) -> "_ObjectPath":
        return self

    def exists(self) -> bool:
        return self.fs.exists(self.key)

    def is_dir(self) -> bool:
        return self._kind == "directory" if self._kind else self.fs.isdir(self.key)

    def is_file(self) -> bool:
        return self._kind == "file" if self._kind else self.fs.isfile(self.key)

    def iterdir(self):
        try:
            entries = self.fs.ls(self.key, detail=True)
        except FileNotFoundError:
            return iter(())
        return iter([_ObjectPath(self.fs, e["name"], kind=e.get("type")) for e in entries
                     if e["name"].rstrip("/") != self.key])

    def read_text(self) -> str:
        return self.fs.cat_file(self.key).decode()

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def write_text(self, text: str) -> None:
        self.fs.pipe_file(self.key, text.encode())

    def stat(self) -> _ObjectStat:
        return _ObjectStat(self.fs.info(self.key))
