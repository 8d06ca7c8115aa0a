"""Where INPUT files live: a local path, or an object-storage URL (``s3://bucket/cohort/``, any fsspec URL).

INPUT may be a prefix of patient folders on object storage. The client only
lists it (:func:`as_location`, :meth:`ObjectPath.iterdir`); the workers read
the objects themselves, by URL, with fsspec (``s3fs`` for ``s3://``, ``gcsfs``,
``adlfs``, ...), so no file passes through the client and nothing is copied
to local disk: pydicom parses the bytes of a DICOM object, nibabel reads a
NIfTI object through a file object (range reads). Only SimpleITK
(MetaImage ``.mhd``/``.mha``) needs a local path: :func:`local_copies` copies
those objects into a temporary folder that is removed when the read is done.

Credentials and endpoints come from the environment or the libraries' own
configuration (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``~/.aws/config``, ...), read by each worker process
itself; lungzarr takes none as an option and passes none to a task: a URL
that carries them (``s3://KEY:SECRET@bucket/...``) is refused without being
echoed (:func:`check_no_credentials`). :func:`blank_secrets` removes their
values (and any URL's credentials) from a text before it goes into a message,
a failure or a warning record; :func:`describe_error` does so for an exception.

A URL is kept as a plain string everywhere (``pathlib.Path`` would turn
``s3://b/k`` into ``s3:/b/k``); :class:`ObjectPath` gives it the few
``pathlib`` methods that scanning INPUT uses.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lungzarr.volume import is_url as _is_url

__all__ = ["is_url", "as_location", "ObjectPath", "filesystem", "list_files", "read_objects", "open_object",
           "local_copies", "describe_error", "blank_secrets", "check_no_credentials", "parent_of", "SECRET_ENV"]

#: Environment variables whose values never go into a message (credentials and endpoints).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
              "AZURE_STORAGE_CONNECTION_STRING", "GOOGLE_APPLICATION_CREDENTIALS", "FSSPEC_S3_ENDPOINT_URL")
#: Objects fetched at once by :func:`read_objects` (concurrent requests on an async filesystem such as s3fs).
READ_BATCH = 32


def is_url(value) -> bool:
    """True for ``scheme://...`` other than ``file://`` (a local path, read as one)."""
    return isinstance(value, (str, ObjectPath)) and _is_url(str(value))


def filesystem(url: str):
    """``(fs, path)``: the fsspec filesystem of ``url`` (cached by fsspec, one per process) and its path."""
    import fsspec.core

    return fsspec.core.url_to_fs(str(url))


def _join(fs, path: str) -> str:
    """The URL of ``path`` on ``fs`` (the scheme the user wrote, e.g. ``s3://``)."""
    return fs.unstrip_protocol(path)


#: The credentials part of a URL: ``USER@`` or ``USER:SECRET@`` right after ``scheme://`` (an unescaped '/'
#: is allowed after the ':', since AWS secrets hold them; ``s3://bucket/a@b`` is no credential).
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)"
                              r"(?P<userinfo>[^\s'\"/@]+|[^\s'\"/@:]*:[^\s'\"@]*)@")


def blank_secrets(text: str) -> str:
    """``text`` with every URL's credentials (``s3://KEY:SECRET@b`` -> ``s3://***@b``) and every
    credential/endpoint value of the environment (:data:`SECRET_ENV`) blanked.

    Examples
    --------
    >>> blank_secrets("cannot list 's3://AKIAKEY:abc/def+g@bucket/cohort/'")
    "cannot list 's3://***@bucket/cohort/'"
    """
    text = _URL_CREDENTIALS.sub(r"\g<scheme>***@", str(text))
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, f"<${name}>")
    return text


def check_no_credentials(url: str, *, what: str) -> str:
    """Refuse a URL that carries credentials, without echoing it; return it unchanged otherwise.

    Parameters
    ----------
    url : str
    what : str
        What the URL is, for the message (``"INPUT"``, ``"store"``).

    Raises
    ------
    RunConfigError
        Credentials come from the environment the storage library reads, never from a URL: a URL is
        echoed in messages and recorded in the store.
    """
    from urllib.parse import urlsplit

    from lungzarr.errors import RunConfigError

    parts = urlsplit(str(url))
    if parts.username is not None or parts.password is not None or _URL_CREDENTIALS.match(str(url)):
        scheme = parts.scheme or "s3"
        raise RunConfigError(f"{'an' if what[:1].lower() in 'aeiou' else 'a'} {what} URL must not carry "
                             f"credentials ({scheme}://USER:SECRET@...): give them through the environment the "
                             f"storage library reads (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                             f"AWS_ENDPOINT_URL, AWS_PROFILE)")
    return url


def describe_error(exc: BaseException) -> str:
    """``"TypeName: text"`` of an exception, with secrets blanked (:func:`blank_secrets`)."""
    return blank_secrets(f"{type(exc).__name__}: {exc}")


def parent_of(location: str) -> str:
    """The folder (prefix) of a file path or URL, as a string comparable with ``str(INPUT)``."""
    location = str(location)
    if is_url(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(location))


@dataclass(frozen=True, order=True)
class ObjectPath:
    """An object or prefix ("folder") on object storage, with the ``pathlib`` methods INPUT scanning uses.

    ``kind`` (``"file"`` or ``"directory"``) and ``info`` come from the listing
    that found it, so ``is_dir``/``is_file`` cost no request.
    """

    url: str
    kind: str | None = field(default=None, compare=False)
    info: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "url", str(self.url).rstrip("/") if str(self.url).count("/") > 2
                           else str(self.url))

    def __str__(self) -> str:
        return self.url

    def __truediv__(self, name) -> "ObjectPath":
        return ObjectPath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.url.rsplit("/", 1)[0], kind="directory")

    def _kind(self) -> str | None:
        if self.kind is not None:
            return self.kind
        fs, path = filesystem(self.url)
        try:
            return fs.info(path).get("type")
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        return self._kind() is not None

    def is_dir(self) -> bool:
        return self._kind() == "directory"

    def is_file(self) -> bool:
        return self._kind() == "file"

    def is_symlink(self) -> bool:
        return False  # object storage has no links

    def iterdir(self):
        """The objects and prefixes right below this prefix (a fresh listing, not fsspec's cache)."""
        fs, path = filesystem(self.url)
        fs.invalidate_cache(path)
        for entry in fs.ls(path, detail=True):
            name = entry["name"].rstrip("/")
            if name == path.rstrip("/"):
                continue  # a "folder marker" object some tools write for the prefix itself
            yield ObjectPath(_join(fs, name), kind=entry.get("type"), info=entry)

    def read_text(self, encoding: str = "utf-8") -> str:
        fs, path = filesystem(self.url)
        return fs.cat_file(path).decode(encoding)


def as_location(value):
    """An :class:`ObjectPath` for a URL, else a :class:`pathlib.Path` (``file://`` URLs included)."""
    if isinstance(value, ObjectPath):
        return value
    if is_url(value):
        return ObjectPath(str(value))
    text = str(value)
    if text.lower().startswith("file://"):
        text = text[len("file://"):]
    return Path(text)


def list_files(folder: str) -> dict[str, dict]:
    """Every object below the prefix ``folder`` (recursively): ``{url: listing info}``, sorted by URL.

    One listing request per 1,000 objects; the info (size, ETag, LastModified)
    is what :func:`lungzarr.volume.files_token` needs, so no object is asked
    for its metadata again.
    """
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)
    found = fs.find(path, detail=True)
    return {_join(fs, name): info for name, info in sorted(found.items())
            if info.get("type", "file") == "file" and name.rstrip("/") != path.rstrip("/")}


def read_objects(urls, *, batch: int = READ_BATCH):
    """Yield ``(url, bytes or the exception)`` for each URL, in order, ``batch`` objects fetched at once.

    s3fs (and the other async filesystems) fetch a batch concurrently; a
    failure is returned for its own URL, so one bad object is one file's error.
    """
    urls = [str(u) for u in urls]
    for start in range(0, len(urls), batch):
        part = urls[start:start + batch]
        fs, _ = filesystem(part[0])
        paths = [filesystem(u)[1] for u in part]
        got = fs.cat(paths, on_error="return")
        for url, path in zip(part, paths):
            yield url, got.get(path, FileNotFoundError(url))


def open_object(url: str, **kwargs):
    """A seekable binary file object on the object ``url`` (reads fetch byte ranges)."""
    fs, path = filesystem(url)
    return fs.open(path, "rb", **kwargs)


@contextmanager
def local_copies(urls, *, prefix: str = "lungzarr-input-"):
    """Copy objects into a new temporary folder; yield their local paths; remove the folder afterwards.

    For readers that need a path (SimpleITK). The copies keep the objects'
    names, so a ``.mhd`` still finds its ``.raw`` beside it. The folder is
    the worker's temporary folder (``TMPDIR``), removed on exit even when the
    read fails.
    """
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        out = []
        for url in urls:
            fs, path = filesystem(url)
            target = folder / str(url).rstrip("/").rsplit("/", 1)[-1]
            fs.get_file(path, str(target))
            out.append(target)
        yield out
    finally:
        shutil.rmtree(folder, ignore_errors=True)
