"""What a patient's INPUT entry was when it was ingested: its files' sizes and modification times.

Ingest records a fingerprint of the entry (:func:`input_fingerprint`) in its
stage marker; a later run takes it again before deciding whether the patient's
ingest is done already (:func:`input_changed`). A file added, removed, resized
or touched (rewritten) changes it, so the patient is ingested again and every
stage computed from it is redone. It costs a listing and a stat per file (on
object storage one listing per 1,000 objects, with each object's ETag); no
file is opened.

Which files: every file below a DICOM folder, as the DICOM reader finds them
(hidden files, whose names start with ``'.'``, are not read and not counted);
a volume file, and for a ``.mhd`` the data file(s) it names.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
from pathlib import Path

from lungzarr.io.locations import as_location, filesystem, is_url, list_files
from lungzarr.io.volumes import metaimage_data_files, volume_stem

__all__ = ["input_fingerprint", "input_changed", "FINGERPRINT_KEY"]

#: Key of the fingerprint in the ingest stage's marker (absent in stores written before it: never "changed").
FINGERPRINT_KEY = "input_files"


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.timezone.utc).isoformat(timespec="seconds")


def _object_stamp(info: dict) -> tuple[str, int | None]:
    """(what identifies the object's content, its modification time in ns) from a listing entry."""
    modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    ns = int(modified.timestamp() * 1e9) if hasattr(modified, "timestamp") else None
    etag = info.get("ETag") or info.get("etag")
    return (str(etag) if etag else str(ns)), ns


def _files(entry) -> list[tuple[str, int, str, int | None]]:
    """``(name relative to the entry's folder, size, stamp, mtime ns)`` of every file the entry is read from."""
    where = as_location(entry)
    if is_url(where):
        if volume_stem(where.name) is not None and not where.is_dir():
            urls = [str(where)] + [str(d) for d in metaimage_data_files(where)]
            fs, _ = filesystem(urls[0])
            infos = {u: fs.info(filesystem(u)[1]) for u in urls}
            base = str(where.parent)
        else:
            infos = list_files(str(where))
            base = str(where)
        out = []
        for url, info in infos.items():
            name = url[len(base):].lstrip("/")
            if name.rsplit("/", 1)[-1].startswith("."):
                continue
            stamp, ns = _object_stamp(info)
            out.append((name, int(info.get("size") or 0), stamp, ns))
        return sorted(out)
    where = Path(where)
    if volume_stem(where.name) is not None and not where.is_dir():
        paths, base = [where] + [Path(d) for d in metaimage_data_files(where)], where.parent
    else:
        paths, base = [p for p in where.rglob("*") if not p.name.startswith(".") and p.is_file()], where
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((os.path.relpath(p, base), st.st_size, str(st.st_mtime_ns), st.st_mtime_ns))
    return sorted(out)


def input_fingerprint(entry) -> dict | None:
    """The fingerprint of a patient's INPUT entry (a DICOM folder or a volume file; a path or a URL).

    Returns
    -------
    dict or None
        ``files`` (count), ``bytes`` (their sizes added up), ``sha256`` (of
        every file's relative name, size and modification time, or ETag on
        object storage), ``newest`` (the most recently modified file and when:
        ``{"file", "modified"}``); None when the entry cannot be listed (the
        ingest then fails with the reader's own message).
    """
    try:
        files = _files(entry)
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256()
    for name, size, stamp, _ in files:
        digest.update(f"{name}\0{size}\0{stamp}\n".encode())
    dated = [f for f in files if f[3] is not None]
    newest = max(dated, key=lambda f: (f[3], f[0])) if dated else None
    return {"files": len(files), "bytes": int(sum(f[1] for f in files)), "sha256": digest.hexdigest(),
            "newest": None if newest is None else {"file": newest[0], "modified": _iso(newest[3])}}


def input_changed(record: dict, now: dict | None) -> str | None:
    """Why a patient's INPUT entry is not what its ingest read (one phrase), or None when it is the same.

    ``record`` is the ingest stage's marker; a marker without a fingerprint
    (a store written before lungzarr took them, or an import of the old
    layout) and an entry that cannot be listed now are never "changed".
    """
    then = record.get(FINGERPRINT_KEY)
    if not isinstance(then, dict) or now is None or then.get("sha256") == now.get("sha256"):
        return None
    said = (f"its INPUT files changed since it was ingested ({record.get('completed', 'earlier')}): "
            f"{then.get('files')} file(s) of {then.get('bytes')} bytes then, {now['files']} of {now['bytes']} now")
    newest = now.get("newest")
    if newest and newest != then.get("newest"):
        said += f"; newest file now {newest['file']!r}, modified {newest['modified']}"
    return said
