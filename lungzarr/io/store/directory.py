"""The backend of a store in a POSIX directory: commits by rename, atomic replace by ``os.replace``."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from lungzarr.io.store.layout import PATIENTS_GROUP
from lungzarr.io.store.lock import _FlockLock


class _DirectoryBackend(_FlockLock):
    """A store in a POSIX directory: a staged patient is committed by one rename, the lock is ``flock``."""

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

    def rmtree(self, path: Path, *, ignore_errors: bool = False) -> None:
        shutil.rmtree(path, ignore_errors=ignore_errors)

    def commit_staged(self, staged: Path, final: Path) -> None:
        if final.exists():
            shutil.rmtree(final)
        os.rename(staged, final)

    def node_metadata(self, skip: str) -> dict:
        """``{relative path: zarr.json}`` of every group and array below the root (not below ``skip``)."""
        import json

        entries = {}
        root = str(self.path)
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            if rel == skip:
                dirnames[:] = []  # a staged patient is not in the cohort until its swap
            if rel == "." or "zarr.json" not in filenames:
                if rel != ".":
                    dirnames[:] = []  # not a zarr node: nothing below belongs to the hierarchy
                continue
            with open(os.path.join(dirpath, "zarr.json")) as fh:
                node = json.load(fh)
            if node.get("node_type") == "array":
                dirnames[:] = []  # chunks
            entries[rel] = node
            dirnames.sort()
        return entries

    def present_nodes(self, nodes) -> tuple[set, set]:
        """Which of ``nodes`` (paths relative to the root) still have their ``zarr.json`` (a stat each), and
        the patient groups on disk."""
        present = {rel for rel in nodes if os.path.isfile(os.path.join(self.path, rel, "zarr.json"))}
        folder = self.path / PATIENTS_GROUP
        groups = {p.name for p in folder.iterdir() if (p / "zarr.json").is_file()} if folder.is_dir() else set()
        return present, groups

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
