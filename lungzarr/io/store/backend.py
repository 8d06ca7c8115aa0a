"""The backend seam: a store's path or URL picks the backend that does what differs between the two.

What differs between a POSIX directory and an object store (S3 or any fsspec URL) is kept
in the backends: how a staged patient is committed, how a small metadata file is replaced
atomically, how a group is removed (:class:`_DirectoryBackend` in ``directory.py``,
:class:`_ObjectBackend` in ``objects.py``), how the writer lock is held (``lock.py``).
CohortStore keeps one of these as ``_backend`` and its paths (``self.path / ...``) are
``pathlib.Path`` for a directory and :class:`_ObjectPath` (the few pathlib methods the store
uses, over fsspec, ``objectpath.py``) for a URL.
"""
from __future__ import annotations

import re
import uuid

from lungzarr.errors import LungzarrError
from lungzarr.io.store.directory import _DirectoryBackend
from lungzarr.io.store.objects import _ObjectBackend

_URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_store_url(path) -> bool:
    """Whether ``path`` names an object store (``s3://bucket/cohort.zarr``, any fsspec URL), not a directory.

    ``file://`` URLs are directories.
    """
    text = str(path)
    return bool(_URL_PATTERN.match(text)) and not text.lower().startswith("file://")


def check_store_url(url, *, create: bool = True, write: bool = True) -> str:
    """The URL half of :func:`lungzarr.pipeline.checks.check_store`: a lungzarr store (or a new, empty prefix), writable.

    ``write`` probes with one small object written and removed under the
    store's prefix (the only test of credentials and permissions that cannot
    be fooled), which also finds a missing bucket or an unreachable endpoint.

    Raises
    ------
    RunConfigError
    """
    import json

    from lungzarr.errors import RunConfigError
    from lungzarr.io.locations import describe_error

    try:
        backend = _ObjectBackend(url, "a")
    except LungzarrError as exc:
        raise RunConfigError(str(exc)) from None
    except (ImportError, ValueError) as exc:
        raise RunConfigError(f"store URL {str(url)!r} cannot be opened ({type(exc).__name__}: {exc}); install "
                             f"the fsspec filesystem of its scheme (s3fs for s3://)") from None
    url, root = backend.url, backend.path
    try:
        try:
            meta = json.loads((root / "zarr.json").read_text())
        except FileNotFoundError:
            meta = None
        if meta is None and next(iter(root.iterdir()), None) is not None:
            raise RunConfigError(f"store {url!r} is a prefix that is not a lungzarr store and is not empty; pass an "
                                 f"existing store, or a new (or empty) prefix to create one")
        if meta is not None and "lungzarr:version" not in (meta.get("attributes") or {}):
            raise RunConfigError(f"store {url!r} is a Zarr store that lungzarr did not create; pass an existing "
                                 f"lungzarr store, or a new (or empty) prefix to create one")
        if meta is None and not create:
            raise RunConfigError(f"no lungzarr store at {url!r}; run `lungzarr ingest INPUT {url}` or "
                                 f"`lungzarr run` first")
        if write:
            probe = root.with_name(f".lungzarr-write-check-{uuid.uuid4().hex}")
            probe.write_text("")
            backend.fs.rm_file(probe.key)
    except RunConfigError:
        raise
    except Exception as exc:  # OSError, ValueError; botocore's own (an endpoint that does not answer)
        # The storage library's own words (they name the bucket or endpoint; describe_error blanks secrets).
        raise RunConfigError(f"store {url!r} cannot be {'written' if write else 'read'}: "
                             f"{describe_error(exc)}; check the bucket, the endpoint (AWS_ENDPOINT_URL) and "
                             f"the credentials the storage library reads from the environment") from None
    return url


def _backend(path, mode: str):
    if is_store_url(path):
        return _ObjectBackend(path, mode)
    text = str(path)
    return _DirectoryBackend(text[len("file://"):] if text.lower().startswith("file://") else path, mode)
