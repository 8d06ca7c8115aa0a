"""The backend of a store in a POSIX directory: commits by rename, atomic replace by ``os.replace``."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from lungzarr.io.store.lock import _FlockLock


class _DirectoryBackend(_FlockLock):
    """A store in a POSIX directory: a staged patient is committed by one rename, the lock is ``flock``."""

    #: Whether a file's existence costs a request (:meth:`CohortStore.patients`): a stat here.
    checks_are_requests = False

    def __init__(self, path, mode: str):
        self.path = Path(path)
        self.zarr_store = self.path  # zarr and xarray open a local path themselves

    def replace_text(self, target: Path, text: str) -> None:
        """Replace ``target`` atomically: a reader sees the old file or the new one, whole."""
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not leave half a file behind
            raise

    def make_folder(self, path: Path) -> None:
        """``path`` and its parents as folders, for a node written by its ``zarr.json`` alone."""
        path.mkdir(parents=True, exist_ok=True)

    def rmtree(self, path: Path, *, ignore_errors: bool = False) -> None:
        shutil.rmtree(path, ignore_errors=ignore_errors)

    def commit_staged(self, staged: Path, final: Path) -> None:
        if final.exists():
            shutil.rmtree(final)
        os.rename(staged, final)

    def store_at(self, rel: str, *, writable: bool = False):
        """What zarr and xarray open as a store whose root is the group ``rel`` (a patient's own)."""
        return self.path / rel

    def node_metadata(self, group: str) -> dict:
        """``{path relative to group: zarr.json}`` of the group ``group`` (as ``"."``) and every group and
        array below it; ``{}`` when it is no group. Chunks are not listed (nothing below an array)."""
        import json

        entries = {}
        top = os.path.join(self.path, group)
        for dirpath, dirnames, filenames in os.walk(top):
            rel = os.path.relpath(dirpath, top).replace(os.sep, "/")
            if "zarr.json" not in filenames:
                dirnames[:] = []  # not a zarr node: nothing below belongs to the hierarchy
                continue
            with open(os.path.join(dirpath, "zarr.json")) as fh:
                node = json.load(fh)
            if node.get("node_type") == "array":
                dirnames[:] = []  # chunks
            entries[rel] = node
            dirnames.sort()
        return entries

    def present_nodes(self, group: str, nodes) -> set:
        """Which of ``nodes`` (paths relative to the group ``group``) still have their ``zarr.json``: a stat
        each."""
        return {rel for rel in nodes if os.path.isfile(os.path.join(self.path, group, rel, "zarr.json"))}

    def size_bytes(self) -> int:
        """The bytes of every file under the store (``lungzarr status``): one ``scandir`` per folder and a
        stat per file, ~4x faster than ``Path.rglob`` (a store of 10,000 tiny patients has 180,000 files)."""
        total, folders = 0, [str(self.path)]
        while folders:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    elif entry.is_file():
                        total += entry.stat().st_size
        return total
