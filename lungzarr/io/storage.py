"""The cohort store: one Zarr v3 store per cohort, one group per patient.

The only module of lungzarr that imports zarr. Layout::

    STORE/
      patients/<id>/          xarray Dataset: hu, hu_2mm, lungs, segmented, nodule_prob
                              (its ``ome`` attribute: NGFF 0.5 multiscales of hu and hu_2mm, see ome_multiscales)
      patients/<id>/nodules/  the nodule table: one 2-D float64 array ``table`` (nodule x column), columns,
                              dtypes and string categories in the group attrs (algorithms.nodules.NODULE_LAYOUT)
      patients/<id>/labels/   NGFF 0.5 label images ``lungs`` and ``nodules`` (``labels/<name>/0``, 2 mm
                              grid; see CohortStore.write_labels)
      tables/patients.<uuid>  cohort-wide patient table (dimension ``patient``)
      tables/nodules.<uuid>   cohort-wide nodule table (dimension ``nodule``); the ``tables``
                              group's attribute ``lungzarr:tables`` names each current group
    STORE.lock                held while a run writes (refuses a second writer); beside the
                              store's resolved path

STORE may also be an object store's URL (``s3://bucket/cohort.zarr``, any fsspec
URL): the same layout as objects, with a staged patient committed by server-side
copies (group metadata last), metadata replaced by single PUTs and the lock an
object created by a conditional write (see :class:`_ObjectBackend`).

Every chunk of every array ends in a CRC-32C and every chunk is written (none
left implicit as the fill value), so :meth:`CohortStore.verify_patient` finds a
changed, undecodable or missing chunk; damage found is kept in the root attribute
``lungzarr:damage``.

A stage of a patient is *complete* only once all its arrays are written: the
stage marker (group attribute ``lungzarr:stages``) is set after the write, so
an interrupted write leaves an incomplete stage, which the next run removes and
redoes (the next run that holds the writer lock: a refused writer touches nothing). Failures are kept in the root attribute ``lungzarr:failures``.

Consolidated metadata (zarr 3's inline ``consolidated_metadata`` in the root
``zarr.json``: every group's and array's metadata in one file) lets a reader
open a big cohort with one read instead of one per group. It is never stale:
the first write of a run to a patient group or a table drops it (one atomic
replace of the root ``zarr.json``), and the end of the run, once every task
has finished, writes it afresh (:meth:`CohortStore.consolidate`, again one
atomic replace). In between, and after a run that was killed, a reader finds
no consolidated metadata and reads every group's own (as slow as without it,
never wrong). Staged groups are left out of it. What lungzarr does not write
(a patient folder removed by hand, files a disk lost) can still make it stale:
:func:`open_cohort` checks it against the groups it names first
(:meth:`CohortStore.stale_consolidated`) and does not use it then.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import os
import re
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lungzarr._version import __version__
from lungzarr.errors import LungzarrError, PatientError, StoreLockedError
from lungzarr.volume import Grid

__all__ = [
    "CohortStore",
    "open_cohort",
    "read_nodules",
    "read_patients",
    "read_failures",
    "read_warnings",
    "grid_from_attrs",
    "read_damage",
]

STAGES_KEY = "lungzarr:stages"
FAILURES_KEY = "lungzarr:failures"
WARNINGS_KEY = "lungzarr:warnings"
DAMAGE_KEY = "lungzarr:damage"
PATIENTS_GROUP = "patients"
TABLES_GROUP = "tables"
STAGING_GROUP = "staging"
TABLE_POINTER_KEY = "lungzarr:tables"
CONSOLIDATED_KEY = "consolidated_metadata"
_TABLE_READ_ATTEMPTS = 20
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_patient_id(patient: str) -> str:
    """Return ``patient`` if it can name a store group, else raise PatientError."""
    if not isinstance(patient, str) or not _ID_PATTERN.match(patient) or patient.startswith("__"):
        raise PatientError(f"patient id {patient!r} cannot name a store group: use letters, digits, '.', '_' "
                           f"and '-' only, starting with a letter or digit (rename the folder)",
                           patient=str(patient))
    if patient.lower() == "zarr.json":  # a group's own metadata file in the store's folder of patients
        raise PatientError(f"patient id {patient!r} is the name of Zarr's metadata file and cannot name a "
                           f"store group: rename the folder (e.g. to the patient's id)", patient=patient)
    return patient


def _jsonable(value):
    """Attrs must be JSON: numpy scalars and tuples become plain Python."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _check_stage_name(stage) -> None:
    # The stage list lives in the pipeline's registry; the store keeps a marker for any named stage.
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"stage must be a non-empty string, got {stage!r}")


def grid_from_attrs(attrs: dict, key: str = "grid_2mm") -> Grid:
    """The :class:`~lungzarr.volume.Grid` a patient group recorded under ``key`` (``grid_2mm``, ``grid_native``)."""
    g = attrs[key]
    return Grid(tuple(g["shape"]), tuple(g["origin_mm"]), tuple(g["step_mm"]))


#: NGFF (OME-Zarr) metadata namespace of a patient group: an NGFF 0.5 reader (``ome_zarr``, napari,
#: vizarr, neuroglancer) opens ``patients/<id>`` as an image without lungzarr.
OME_KEY = "ome"
NGFF_VERSION = "0.5"
#: The NGFF ``labels`` group of a patient group, and its label images in the order ``ome.labels`` lists them:
#: ``lungs`` (stage segment) and ``nodules`` (stage nodules), each ``labels/<name>/0`` on the 2 mm grid.
LABELS_GROUP = "labels"
LABEL_IMAGES = ("lungs", "nodules")
#: Dimension names of the native and the 2 mm arrays (the NGFF axes must carry the arrays' dimension names).
_NATIVE_DIMS = ("z", "y", "x")
_DIMS_2MM = ("z2", "y2", "x2")


def _ngff_axes(names) -> list[dict]:
    return [{"name": n, "type": "space", "unit": "millimeter"} for n in names]


def _ngff_level(path: str, grid: Grid) -> dict:
    """One NGFF dataset: scale ``|step|``, translation the origin (mm of voxel 0's centre)."""
    return {"path": path, "coordinateTransformations": [
        {"type": "scale", "scale": [abs(float(s)) for s in grid.step]},
        {"type": "translation", "translation": [float(o) for o in grid.origin]}]}


def ome_multiscales(attrs: dict, arrays=None) -> dict | None:
    """NGFF 0.5 ``ome`` attributes of a patient group: the native ``hu`` image, then ``hu_2mm``.

    Metadata only: each dataset path names an array xarray wrote in the same
    group (NGFF paths are relative to the image group, so no copy). A reader
    shows the first image, ``hu`` (axes ``z``, ``y``, ``x``, the native grid,
    ``grid_native``); ``hu_2mm`` (axes ``z2``, ``y2``, ``x2``, ``grid_2mm``) is
    the second, the grid of the ``labels`` images. The axes carry xarray's
    dimension names because NGFF 0.5 requires an array's ``dimension_names``
    to match the axes' names. Each image has one level: a downsampled level of
    ``hu`` would be an array with dimensions ``z``, ``y``, ``x`` of another
    size, which xarray's DataTree (``open_cohort``, ``xr.open_datatree``)
    refuses anywhere below the patient group (its children must align with
    its ``y``/``x`` coordinates); ``hu_2mm`` is the quick view.

    Scale is a grid's ``|step|`` and translation its origin (mm, world
    coordinates of voxel 0). NGFF has no direction cosines: a negative step is
    stored as its magnitude (a viewer shows the volume in index order) and the
    direction stays in ``grid_native`` / ``grid_2mm`` / the ``lungzarr`` attrs.

    Parameters
    ----------
    attrs : dict
        The patient group's attributes.
    arrays : collection of str, optional
        The arrays the group holds (an image is listed only when its array is
        there); None assumes every array a recorded grid describes.

    Returns
    -------
    dict or None
        None when the group has neither image.
    """
    images = []
    for name, grid_key, dims in (("hu", "grid_native", _NATIVE_DIMS), ("hu_2mm", "grid_2mm", _DIMS_2MM)):
        if grid_key in attrs and (arrays is None or name in arrays):
            images.append({"name": name, "axes": _ngff_axes(dims),
                           "datasets": [_ngff_level(name, grid_from_attrs(attrs, grid_key))]})
    if not images:
        return None
    return {"version": NGFF_VERSION, "multiscales": images}


def ome_label_image(attrs: dict, name: str, *, colors=None, properties=None) -> dict:
    """NGFF 0.5 ``ome`` attributes of the label image ``labels/<name>``: one level ``0`` on the 2 mm grid.

    The same axes, scale and translation as ``hu_2mm`` (the label voxels are
    its voxels); ``image-label.source`` points at the patient group, two levels
    up. ``colors`` and ``properties`` are NGFF's lists of dicts with a
    ``label-value`` each.
    """
    image_label = {"source": {"image": "../../"}}
    if colors:
        image_label["colors"] = list(colors)
    if properties:
        image_label["properties"] = list(properties)
    return {"version": NGFF_VERSION,
            "multiscales": [{"name": name, "axes": _ngff_axes(_DIMS_2MM),
                             "datasets": [_ngff_level("0", grid_from_attrs(attrs, "grid_2mm"))]}],
            "image-label": image_label}


def _vlen_strings(dataset):
    """Fixed-width unicode has no Zarr v3 spec yet: store strings as variable-length."""
    for name, var in dataset.variables.items():
        if var.dtype.kind == "U":
            dataset[name] = var.astype(object)
    return dataset


def _voxel_compression(dataset):
    """Blosc-LZ4 with byte shuffle for the voxel arrays.

    Measured on the RICORD slab (int16, 16-slice chunks): writes 6x faster than
    zarr's default zstd and stores 3 % smaller; reads are as fast.
    """
    from zarr.codecs import BloscCodec

    for var in dataset.data_vars.values():
        if var.ndim >= 3 and "compressors" not in var.encoding:
            var.encoding["compressors"] = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    return dataset


#: Every chunk lungzarr writes ends in a CRC-32C of its encoded bytes (zarr v3's ``crc32c`` codec after the
#: compressor), so a damaged chunk raises on read instead of decoding to wrong values. Only
#: ``benchmarks/bench_checksum.py`` turns it off, for its with/without comparison.
CHECKSUM_CHUNKS = True

#: Keyword arguments of every ``to_zarr`` of lungzarr: every chunk is written, even one that holds only the
#: fill value, so a missing chunk file is always damage (zarr would read it back as the fill value).
_WRITE = {"consolidated": False, "zarr_format": 3, "write_empty_chunks": True}


def _checksummed(dataset):
    """Append the crc32c codec to every variable's compressors (coordinates included).

    A variable without compressors in its encoding gets zarr's default
    (zstd) first, so only the 4-byte checksum per chunk is added.
    """
    from zarr.codecs import Crc32cCodec, ZstdCodec

    if not CHECKSUM_CHUNKS:
        return dataset
    for var in dataset.variables.values():
        codecs = tuple(var.encoding.get("compressors") or (ZstdCodec(),))
        if not any(isinstance(c, Crc32cCodec) for c in codecs):
            var.encoding["compressors"] = codecs + (Crc32cCodec(),)
    return dataset


def _encoded_for_store(dataset):
    """Strings variable-length, voxels Blosc-LZ4, every chunk checksummed."""
    return _checksummed(_voxel_compression(_vlen_strings(dataset)))


def _dataset_from_frame(indexed):
    """``xarray.Dataset.from_dataframe(indexed)`` of a table with one flat index: the same Dataset, built at once.

    ``from_dataframe`` adds one column at a time (an alignment and a merge each): 0.2-1.7 CPU-s for the
    two cohort tables' ~80 columns, most of what the end of every run cost; one constructor call takes
    milliseconds. ``tests/test_cpu_stages.py`` checks the two are identical (values, dtypes, order).
    """
    import pandas as pd
    import xarray as xr

    if isinstance(indexed.index, pd.MultiIndex):
        return xr.Dataset.from_dataframe(indexed)
    dim = indexed.index.name
    return xr.Dataset({str(c): ((dim,), np.asarray(indexed[c])) for c in indexed.columns},
                      coords={dim: np.asarray(indexed.index)})


# ---------------------------------------------------------------------- backends
# What differs between a POSIX directory and an object store (S3 or any fsspec URL) is kept
# here: how a staged patient is committed, how a small metadata file is replaced atomically,
# how a group is removed, how the writer lock is held. CohortStore keeps one of these as
# ``_backend`` and its paths (``self.path / ...``) are ``pathlib.Path`` for a directory and
# :class:`_ObjectPath` (the few pathlib methods the store uses, over fsspec) for a URL.

#: Seconds after its last heartbeat at which an object store's lock object is taken to be left
#: behind by a dead run. The holder rewrites it every ``LOCK_TTL_S / 4`` seconds.
LOCK_TTL_S = 120.0
_URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_store_url(path) -> bool:
    """Whether ``path`` names an object store (``s3://bucket/cohort.zarr``, any fsspec URL), not a directory.

    ``file://`` URLs are directories.
    """
    text = str(path)
    return bool(_URL_PATTERN.match(text)) and not text.lower().startswith("file://")


def _check_url(url: str) -> str:
    """``url`` without a trailing slash; refuse one that carries credentials (they come from the environment)."""
    from urllib.parse import urlsplit

    from lungzarr.io.locations import check_no_credentials

    check_no_credentials(url, what="store")  # the URL is never echoed: it holds a secret
    parts = urlsplit(url)
    if not parts.netloc:
        raise LungzarrError(f"store URL {url!r} names no bucket: use {parts.scheme}://BUCKET/NAME.zarr")
    return url.rstrip("/")


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


class _DirectoryBackend:
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

    @property
    def lock_path(self) -> Path:
        real = Path(os.path.realpath(self.path))
        return real.with_name(real.name + ".lock")

    def writer(self) -> str | None:
        """The lock file's holder (``pid N since T``) while that process lives, read without locking; else None."""
        try:
            text = self.lock_path.read_text().strip()
        except OSError:
            return None
        match = re.match(r"pid (\d+) ", text)
        if match is None:
            return None
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            return None  # left by a killed run: the kernel dropped its lock
        except PermissionError:
            pass
        return text

    @contextmanager
    def hold_lock(self, store: "CohortStore"):
        """Hold an OS-level ``flock`` on :attr:`lock_path` (see :meth:`CohortStore.lock`)."""
        lock_path = self.lock_path
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(lock_path, "a+")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip()
                fh.close()
                holder = holder if holder.startswith("pid ") else "another process"
                raise StoreLockedError(
                    f"store {str(self.path)!r} is being written by {holder}; wait for that run to finish "
                    f"(or stop it) and run again — two runs on one store would interleave") from None
            # The previous holder removes the file on release. If it did so after we opened it,
            # we hold a lock on a removed file while a third process could lock a new file of the
            # same name: then we let go and lock the file that is there now.
            if _same_file(fh, lock_path):
                break
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} since {_now()}")
            fh.flush()
            yield
        finally:
            try:
                # Removed while still held: a writer that opened the file meanwhile finds, once it
                # gets the lock, that the name no longer points to its file and tries again.
                try:
                    os.unlink(lock_path)
                except FileNotFoundError:
                    pass
            finally:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                finally:
                    fh.close()


class _ObjectBackend:
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

    def __init__(self, url, mode: str):
        import fsspec
        from zarr.storage import FsspecStore

        self.url = _check_url(str(url))
        # No listing cache: another process (a worker, a second run) changes what is listed.
        options = {"use_listings_cache": False}
        self.fs, key = fsspec.url_to_fs(self.url, **options)
        self.path = _ObjectPath(self.fs, key)
        self.zarr_store = FsspecStore.from_url(self.url, storage_options=options, read_only=mode == "r")

    def replace_text(self, target: _ObjectPath, text: str) -> None:
        target.write_text(text)  # one PUT: atomic on S3

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

    def node_metadata(self, skip: str) -> dict:
        """Like :meth:`_DirectoryBackend.node_metadata`: one listing, then every ``zarr.json`` read at once."""
        import json

        root = self.path.key
        metas = {}
        for key in self.fs.find(root):
            if key.endswith("/zarr.json"):
                rel = key[len(root) + 1:-len("/zarr.json")] or "."
                metas[rel] = key
        nodes = {}
        groups = {"."}
        wanted = []
        for rel in sorted(metas, key=lambda r: (r.count("/"), r)):
            if rel == ".":
                continue
            parent = rel.rsplit("/", 1)[0] if "/" in rel else "."
            if parent not in groups or parent == skip:
                continue  # below an array, a staged group or something that is not a zarr node
            wanted.append(rel)
            groups.add(rel)  # provisional: arrays are dropped from ``groups`` once read
        texts = self.fs.cat([metas[r] for r in wanted]) if wanted else {}
        for rel in wanted:
            node = json.loads(texts[metas[rel]])
            if node.get("node_type") == "array":
                groups.discard(rel)
            parent = rel.rsplit("/", 1)[0] if "/" in rel else "."
            if parent in groups:
                nodes[rel] = node
        return nodes

    def present_nodes(self, nodes) -> tuple[set, set]:
        """Like :meth:`_DirectoryBackend.present_nodes`, from one listing of the store (1,000 keys a
        request), not one request per node."""
        root = self.path.key
        found = {key[len(root) + 1:-len("/zarr.json")] for key in self.fs.find(root) if key.endswith("/zarr.json")}
        groups = {rel.split("/")[1] for rel in found if rel.startswith(PATIENTS_GROUP + "/") and rel.count("/") == 1}
        return set(nodes) & found, groups

    def size_bytes(self) -> int:
        return int(sum(self.fs.du(self.path.key, total=False).values()))

    @property
    def lock_path(self) -> _ObjectPath:
        return self.path.with_name(self.path.name + ".lock")

    def _holder(self) -> dict:
        import socket

        now = _now()
        return {"pid": os.getpid(), "host": socket.gethostname(), "since": now, "heartbeat": now}

    def _put_lock(self, body: dict, *, if_match: str | None = None) -> str | None:
        """Write the lock object: create it only if absent, or overwrite the version ``if_match``. Its ETag."""
        import json

        data = json.dumps(body).encode()
        lock = self.lock_path
        if if_match is None:
            self.fs.pipe_file(lock.key, data, mode="create")  # FileExistsError when another run holds it
        elif hasattr(self.fs, "call_s3"):
            bucket, key, _ = self.fs.split_path(lock.key)
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=if_match)
            except OSError:
                raise FileExistsError(str(lock)) from None  # changed meanwhile: another run has it
        else:
            # No conditional overwrite known for this filesystem: remove, then create only if absent.
            self.fs.rm_file(lock.key)
            self.fs.pipe_file(lock.key, data, mode="create")
        try:
            return _ObjectStat(self.fs.info(lock.key)).st_etag
        except FileNotFoundError:
            return None

    def _read_lock(self):
        import json

        lock = self.lock_path
        try:
            etag = _ObjectStat(self.fs.info(lock.key)).st_etag
            body = json.loads(self.fs.cat_file(lock.key))
        except FileNotFoundError:
            return None, None
        except ValueError:
            body = {}
        return (body if isinstance(body, dict) else {}), etag

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        import socket

        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # its run is gone from this machine (killed)
            except PermissionError:
                pass
        try:
            beat = _dt.datetime.fromisoformat(holder["heartbeat"])
        except (KeyError, TypeError, ValueError):
            return False
        return (_dt.datetime.now(_dt.timezone.utc) - beat).total_seconds() > LOCK_TTL_S

    def writer(self) -> str | None:
        """The lock object's holder while its heartbeat is fresh, read without taking it; else None."""
        holder, _ = self._read_lock()
        if not holder or self._is_stale(holder):
            return None
        return f"pid {holder.get('pid')} on host {holder.get('host')!r} since {holder.get('since')}"

    @contextmanager
    def hold_lock(self, store: "CohortStore"):
        import threading

        me = self._holder()
        try:
            etag = self._put_lock(me)
        except FileExistsError:
            holder, seen = self._read_lock()
            if holder is not None and self._is_stale(holder):
                try:
                    etag = self._put_lock(me, if_match=seen)
                except FileExistsError:
                    holder, seen = self._read_lock()
                    raise self._refusal(holder) from None
            elif holder is None:  # released meanwhile: one more try
                try:
                    etag = self._put_lock(me)
                except FileExistsError:
                    raise self._refusal(self._read_lock()[0]) from None
            else:
                raise self._refusal(holder) from None
        state = {"etag": etag}
        stop = threading.Event()

        def heartbeat():
            # Keeps the lock from looking abandoned to a run on another host.
            while not stop.wait(LOCK_TTL_S / 4):
                try:
                    state["etag"] = self._put_lock({**me, "heartbeat": _now()}, if_match=state["etag"])
                except (FileExistsError, OSError):
                    return  # taken over (this run was presumed dead) or unreachable: nothing to refresh

        beat = threading.Thread(target=heartbeat, name="lungzarr-lock-heartbeat", daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            holder, seen = self._read_lock()
            if holder is not None and seen == state["etag"]:  # still ours: a run that took over keeps its lock
                try:
                    self.fs.rm_file(self.lock_path.key)
                except FileNotFoundError:
                    pass

    def _refusal(self, holder) -> StoreLockedError:
        holder = holder or {}
        who = (f"pid {holder.get('pid')} on host {holder.get('host')!r} since {holder.get('since')} "
               f"(last heartbeat {holder.get('heartbeat')})") if holder.get("pid") else "another run"
        return StoreLockedError(
            f"store {self.url!r} is being written by {who}; wait for that run to finish (or stop it) and run "
            f"again — two runs on one store would interleave. A run that was killed leaves its lock object "
            f"{str(self.lock_path)!r}: it is taken over {LOCK_TTL_S:.0f} s after its last heartbeat (at once "
            f"on the same host), or remove that object once you are sure the run is gone")


def _backend(path, mode: str):
    if is_store_url(path):
        return _ObjectBackend(path, mode)
    text = str(path)
    return _DirectoryBackend(text[len("file://"):] if text.lower().startswith("file://") else path, mode)


class CohortStore:
    """A cohort's Zarr v3 store.

    Parameters
    ----------
    path : path or str
        The store directory (created on first write), or an object store's
        URL (``s3://bucket/cohort.zarr``, any fsspec URL; credentials and
        endpoint from the storage library's environment, never from here).
    mode : {"a", "r"}
        ``"r"`` refuses to create the store when it does not exist.
    """

    def __init__(self, path, *, mode: str = "a"):
        import zarr

        if mode not in ("a", "r"):
            raise ValueError(f"mode must be 'a' or 'r', got {mode!r}")
        self._backend = _backend(path, mode)
        self.path = self._backend.path
        self._zstore = self._backend.zarr_store
        self._rmtree = self._backend.rmtree
        self.mode = mode
        if mode == "r" and not (self.path / "zarr.json").exists():
            raise LungzarrError(f"no lungzarr store at {str(self.path)!r}; run `lungzarr ingest INPUT "
                                f"{self.path}` or `lungzarr run` first")
        self._zarr = zarr
        if mode == "a":
            root = zarr.open_group(self._zstore, mode="a", zarr_format=3, use_consolidated=False)
            if "lungzarr:version" not in root.attrs:
                root.attrs.update({"lungzarr:version": __version__, "lungzarr:created": _now()})
            for name in (PATIENTS_GROUP, TABLES_GROUP, STAGING_GROUP):
                if not (self.path / name / "zarr.json").exists():
                    root.create_group(name)

    def _recover_staging(self) -> None:
        """Finish the swap of a staged patient that a killed run had completed; drop the rest.

        Called by :meth:`lock` once the lock is held: staged groups belong to
        the run holding the lock, so only the next writer may clean them up.
        """
        staging = self.path / STAGING_GROUP
        for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
            attrs = dict(self._group(f"{STAGING_GROUP}/{folder.name}", mode="r").attrs) \
                if (folder / "zarr.json").exists() else {}
            # The stage that creates a patient marks the staged group just before the swap.
            if attrs.get(STAGES_KEY):
                self._swap_in(folder.name)
            else:
                self._rmtree(folder)

    def _swap_in(self, patient: str) -> None:
        self._changing()
        self._backend.commit_staged(self.path / STAGING_GROUP / patient, self.path / self.group_path(patient))

    # ------------------------------------------------------------------ groups
    def _root(self, mode=None):
        return self._zarr.open_group(self._zstore, mode=mode or ("r" if self.mode == "r" else "a"), zarr_format=3,
                                     use_consolidated=False)

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

    def _changing(self) -> None:
        """Drop the consolidated metadata before a change to a patient group or a table.

        Dropped, not updated: rewriting a listing of the whole cohort at every
        stage of every patient would cost O(cohort) per write; the writer
        writes it once at the end of its run (:meth:`lock`). Once dropped, this
        reads only the (then small) root ``zarr.json``.
        """
        meta = self._root_meta()
        if meta.pop(CONSOLIDATED_KEY, None) is not None:
            self._put_root_meta(meta)

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

    def _group(self, path: str, mode=None):
        return self._zarr.open_group(self._zstore, path=path, mode=mode or ("r" if self.mode == "r" else "r+"),
                                     zarr_format=3)

    @staticmethod
    def group_path(patient: str) -> str:
        return f"{PATIENTS_GROUP}/{check_patient_id(patient)}"

    def patients(self) -> list[str]:
        """Identifiers of the patients with a group in the store, sorted."""
        folder = self.path / PATIENTS_GROUP
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").exists())

    def patient_folders(self) -> list[str]:
        """Folders under ``patients/`` that are no group (no ``zarr.json``): what is left of a lost group."""
        folder = self.path / PATIENTS_GROUP
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not (p / "zarr.json").exists())

    def has_patient(self, patient: str) -> bool:
        return (self.path / self.group_path(patient) / "zarr.json").exists()

    def patient_attrs(self, patient: str) -> dict:
        if not self.has_patient(patient):
            return {}
        return dict(self._group(self.group_path(patient), mode="r").attrs)

    def stages(self, patient: str) -> dict:
        """Completed stages of ``patient``: ``{stage: record}``."""
        return dict(self.patient_attrs(patient).get(STAGES_KEY, {}))

    def is_complete(self, patient: str, stage: str) -> bool:
        return stage in self.stages(patient)

    # ------------------------------------------------------------------ writes
    def remove_patient(self, patient: str) -> None:
        """Delete a patient's group (used to redo an incomplete ingest)."""
        folder = self.path / self.group_path(patient)
        if folder.exists():
            self._changing()
            self._rmtree(folder)

    def _remove_arrays(self, group_path: str, names) -> None:
        folder = self.path / group_path
        for name in names:
            target = folder / name
            if target.is_dir():
                self._rmtree(target)

    def prepare_stage(self, patient: str, stage: str, dataset, *, record: dict | None = None,
                      new_group: bool = False, subgroup: str | None = None) -> "PendingStage":
        """Start writing one stage of a patient: metadata now, voxels when computed.

        The stage is unmarked first, so a run killed before :meth:`PendingStage.commit`
        leaves it incomplete and the next run redoes it.

        Parameters
        ----------
        patient, stage : str
        dataset : xarray.Dataset
            The stage's variables; dask-backed ones are written chunk by chunk
            when the returned object's ``delayed`` is computed.
        record : dict, optional
            Provenance of the stage, kept in the stage marker.
        new_group : bool, optional
            The stage creates the patient group (ingest): any previous group is
            removed first, and ``dataset.attrs`` become the group attrs.
        subgroup : str, optional
            Write into a child group (e.g. ``"nodules"``), replacing it.
        """
        _check_stage_name(stage)
        gpath = self.group_path(patient)
        self._changing()
        if new_group:
            # A new patient group is written aside and swapped in on commit, so an
            # existing group survives a failed or interrupted rewrite.
            gpath = f"{STAGING_GROUP}/{patient}"
            if (self.path / gpath).exists():
                self._rmtree(self.path / gpath)
            attrs = _jsonable(dict(dataset.attrs))
        else:
            attrs = self._unmark_stage(patient, stage)
        if subgroup is not None:
            target = f"{gpath}/{subgroup}"
            if (self.path / target).exists():
                self._rmtree(self.path / target)
            mode = "w"
        elif new_group:
            target, mode = gpath, "w"
        else:
            target, mode = gpath, "a"
            self._remove_arrays(target, list(dataset.data_vars))
            # Coordinates written by an earlier stage stay as they are.
            existing = {p.name for p in (self.path / gpath).iterdir()}
            dataset = dataset.drop_vars([c for c in dataset.coords if c in existing])
            dataset.attrs = {}
        delayed = _encoded_for_store(dataset).to_zarr(self._zstore, group=target, mode=mode, compute=False, **_WRITE)
        # xarray rewrites the group's attributes on every write: put ours back at once.
        self._group(gpath).attrs.put(_jsonable(attrs))
        return PendingStage(self, patient, stage, delayed, record or {}, group_path=gpath,
                            staged=new_group)

    def prepare_task(self, patient: str, stage: str, delayed, *, record: dict | None = None) -> "PendingStage":
        """Like :meth:`prepare_stage` for a stage whose dask task writes its own output.

        ``delayed`` must write through :meth:`write_subgroup` (on whichever
        worker runs it) and return a dict merged into the stage record.
        """
        _check_stage_name(stage)
        self._changing()
        self._unmark_stage(patient, stage)
        return PendingStage(self, patient, stage, delayed, record or {}, group_path=self.group_path(patient))

    def _unmark_stage(self, patient: str, stage: str) -> dict:
        """Drop ``stage``'s completion marker on disk before redoing it; return the group attrs."""
        if not self.has_patient(patient):
            raise PatientError(f"patient {patient!r} is not in the store; ingest it first", patient=patient,
                               stage=stage)
        attrs = self.patient_attrs(patient)
        stages = dict(attrs.get(STAGES_KEY, {}))
        if stage in stages:
            stages.pop(stage)
            attrs[STAGES_KEY] = stages
            self._group(self.group_path(patient)).attrs.put(attrs)
        return attrs

    def unmark_stages(self, patient: str, stages) -> list[str]:
        """Drop the completion markers of ``stages`` (one write); the ones that were set, in order."""
        attrs = self.patient_attrs(patient)
        marked = dict(attrs.get(STAGES_KEY, {}))
        dropped = [s for s in stages if s in marked]
        if dropped:
            self._changing()
            attrs[STAGES_KEY] = {k: v for k, v in marked.items() if k not in dropped}
            self._group(self.group_path(patient)).attrs.put(_jsonable(attrs))
        return dropped

    def write_subgroup(self, patient: str, name: str, dataset) -> None:
        """Replace the child group ``patients/<id>/<name>`` with ``dataset`` (computed now)."""
        target = f"{self.group_path(patient)}/{name}"
        self._changing()  # on a worker: the run's client dropped it already, so this only reads
        if (self.path / target).exists():
            self._rmtree(self.path / target)
        _encoded_for_store(dataset.copy()).to_zarr(self._zstore, group=target, mode="w", **_WRITE)

    def write_labels(self, patient: str, name: str, labels, *, colors=None, properties=None,
                     chunk_slices: int = 16) -> None:
        """Replace the NGFF label image ``patients/<id>/labels/<name>`` with ``labels`` (computed now).

        ``labels`` is an integer array on the patient's 2 mm grid; it is
        written as the label image's only level ``0`` (dimensions ``z2``,
        ``y2``, ``x2``, chunks of ``chunk_slices`` slices, checksummed like
        every chunk of the store) with :func:`ome_label_image` metadata, and
        the ``labels`` group's ``ome.labels`` lists the label images then
        present. Call it from the task of the stage that owns the label image
        (before its commit), so the image is complete exactly when the stage
        is. NGFF puts a label image's arrays inside its own group (a dataset
        path cannot point outside it), so this is a copy of the stage's array.
        """
        import xarray as xr

        if name not in LABEL_IMAGES:
            raise ValueError(f"name must be one of {LABEL_IMAGES!r}, got {name!r}")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.ndim != 3:
            raise ValueError(f"labels must be a 3-D integer array, got dtype {labels.dtype!r} and shape "
                             f"{labels.shape!r}")
        attrs = self.patient_attrs(patient)
        grid = grid_from_attrs(attrs)
        if tuple(labels.shape) != tuple(grid.shape):
            raise ValueError(f"labels shape {labels.shape!r} must be the 2 mm grid's {tuple(grid.shape)!r}")
        group = f"{self.group_path(patient)}/{LABELS_GROUP}"
        target = f"{group}/{name}"
        self._changing()  # on a worker: the run's client dropped it already, so this only reads
        if (self.path / target).exists():
            self._rmtree(self.path / target)
        ds = xr.Dataset({"0": (_DIMS_2MM, labels)})
        ds["0"].encoding["chunks"] = (min(int(chunk_slices), labels.shape[0]),) + tuple(labels.shape[1:])
        _encoded_for_store(ds).to_zarr(self._zstore, group=target, mode="w", **_WRITE)
        self._group(target).attrs.put(_jsonable({OME_KEY: ome_label_image(attrs, name, colors=colors,
                                                                           properties=properties)}))
        present = [n for n in LABEL_IMAGES if (self.path / group / n / "zarr.json").is_file()]
        self._group(group).attrs.put({OME_KEY: {"version": NGFF_VERSION, "labels": present}})

    def update_array_attrs(self, patient: str, name: str, attrs: dict) -> None:
        """Merge ``attrs`` into the attributes of the patient's array ``name`` (its metadata file only).

        For figures known only once a stage's voxels are computed (detect's
        lung box): called by the task that follows the write, on a worker.
        """
        self._changing()
        array = self._zarr.open_array(self._zstore, path=f"{self.group_path(patient)}/{name}", mode="r+",
                                      zarr_format=3)
        array.attrs.update(_jsonable(dict(attrs)))

    # ------------------------------------------------------------------ reads
    def open_patient(self, patient: str, *, subgroup: str | None = None):
        """A patient's Dataset, lazily (dask arrays, nothing loaded)."""
        import xarray as xr

        if not self.has_patient(patient):
            raise LungzarrError(f"patient {patient!r} is not in store {str(self.path)!r}; "
                                f"`lungzarr status {self.path}` lists the patients")
        group = self.group_path(patient) + (f"/{subgroup}" if subgroup else "")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            return xr.open_dataset(self._zstore, group=group, engine="zarr", consolidated=False, chunks={},
                                   zarr_format=3)

    def load_patient(self, patient: str, names, *, subgroup: str | None = None):
        """Arrays of a patient (or of its child group ``subgroup``), read whole, as an in-memory Dataset.

        For a worker task that needs whole arrays (nodules, features, the
        lungs3d measures, the crop box): one open of the group with zarr and
        one read per array, where :meth:`open_patient` has xarray read every
        coordinate and every variable's metadata and builds a dask graph per
        array. The values, dtypes and variable attributes are those of
        ``open_patient(patient)[name].values``: lungzarr's arrays carry no CF
        encoding but xarray's NaN ``_FillValue`` of float arrays (a no-op
        mask); an array with any other encoding is read through xarray. The
        Dataset's attrs are the group's; it has no coordinates. Names the
        group does not hold are left out (test ``name in ds``).

        Raises
        ------
        LungzarrError
            The patient is not in the store.
        """
        import xarray as xr

        if not self.has_patient(patient):
            raise LungzarrError(f"patient {patient!r} is not in store {str(self.path)!r}; "
                                f"`lungzarr status {self.path}` lists the patients")
        path = self.group_path(patient) + (f"/{subgroup}" if subgroup else "")
        group = self._zarr.open_group(self._zstore, path=path, mode="r", zarr_format=3, use_consolidated=False)
        present = set(group.array_keys())
        data_vars, encoded = {}, []
        for name in names:
            if name not in present:
                continue
            array = group[name]
            attrs = dict(array.attrs)
            fill = attrs.pop("_FillValue", None)
            plain = not (set(attrs) & {"scale_factor", "add_offset", "_Unsigned", "dtype", "calendar"}) and (
                fill is None or (array.dtype.kind == "f" and np.isnan(array.fill_value)))
            if not plain:
                encoded.append(name)
                continue
            dims = tuple(array.metadata.dimension_names or (f"dim_{i}" for i in range(array.ndim)))
            data_vars[name] = xr.Variable(dims, array[...], attrs=attrs)
        ds = xr.Dataset(data_vars, attrs=dict(group.attrs))
        if encoded:  # not written by lungzarr: let xarray decode it
            full = self.open_patient(patient, subgroup=subgroup)
            for name in encoded:
                ds[name] = full[name].variable.load()
        return ds

    def lazy_array(self, patient: str, name: str):
        """One stored array of a patient as a dask array in its stored chunks (nothing loaded).

        For a stage that needs one input array to build its graph (segment's and
        detect's ``hu_2mm``): :meth:`open_patient` has xarray read every
        coordinate and every variable's metadata in the client first. The
        values and dtype are those of ``open_patient(patient)[name].data``
        (lungzarr's arrays carry no CF encoding). The dask name is derived from
        the resolved store path, the patient, the array and its metadata file's
        modification time and size, so a rewritten array never shares a key
        with the old one.

        Raises
        ------
        LungzarrError
            The patient, or its array ``name``, is not in the store.
        """
        import dask.array as da
        from dask.base import tokenize

        if not self.has_patient(patient):
            raise LungzarrError(f"patient {patient!r} is not in store {str(self.path)!r}; "
                                f"`lungzarr status {self.path}` lists the patients")
        path = f"{self.group_path(patient)}/{name}"
        meta = self.path / path / "zarr.json"
        try:
            stat = meta.stat()
        except FileNotFoundError:
            raise LungzarrError(f"patient {patient!r} has no array {name!r} in store {str(self.path)!r}; "
                                f"run the stage that writes it first") from None
        array = self._zarr.open_array(self._zstore, path=path, mode="r", zarr_format=3)
        # The stage commits' ids too: unique per write, where an object's mtime has 1 s resolution and
        # its ETag is that of metadata a rewrite of the same shape leaves unchanged.
        commits = sorted((stage, record.get("id")) for stage, record in self.stages(patient).items())
        token = tokenize(str(self.path.resolve()), patient, name, stat.st_mtime_ns, stat.st_size,
                         getattr(stat, "st_etag", None), commits)
        return da.from_zarr(array, name=f"open-{name}-{token}")

    def has_subgroup(self, patient: str, subgroup: str) -> bool:
        return (self.path / self.group_path(patient) / subgroup / "zarr.json").exists()

    # ------------------------------------------------------------------ tables
    # A cohort table is replaced atomically. Each write goes to a fresh group
    # ``tables/<name>.<uuid>``; the ``tables`` group's attribute ``lungzarr:tables``
    # ({name: group}) says which group is current and is switched by one
    # ``os.replace`` of ``tables/zarr.json``; the old group is removed after the
    # switch. A reader reads the pointer, loads that group whole, and reads the
    # pointer again: unchanged means the group was current for the whole read (a
    # group is removed only after the pointer moved away from it), so the reader
    # saw one complete table; changed means it may have read a group being
    # removed (zarr reads a vanished chunk as the fill value), so it reads the new
    # one. Group names are never reused, so "unchanged" cannot be a new table of
    # the same name. Stores written before this layout have ``tables/<name>``
    # itself, read when the pointer does not name the table.

    def _tables_meta_path(self) -> Path:
        return self.path / TABLES_GROUP / "zarr.json"

    def _table_pointer(self) -> dict:
        import json

        try:
            meta = json.loads(self._tables_meta_path().read_text())
        except FileNotFoundError:
            return {}
        return dict(meta.get("attributes", {}).get(TABLE_POINTER_KEY, {}))

    def _switch_table(self, name: str, group: str) -> None:
        """Point ``name`` at ``group`` with one atomic replace of the tables group's metadata."""
        import json

        meta_path = self._tables_meta_path()
        meta = json.loads(meta_path.read_text())
        attributes = dict(meta.get("attributes", {}))
        attributes[TABLE_POINTER_KEY] = {**attributes.get(TABLE_POINTER_KEY, {}), name: group}
        meta["attributes"] = attributes
        self._backend.replace_text(meta_path, json.dumps(meta, indent=2))

    def write_table(self, name: str, frame, *, dim: str, attrs: dict | None = None) -> None:
        """Store a pandas DataFrame as the cohort table ``name`` (dimension ``dim``), replacing it atomically.

        A concurrent :meth:`read_table` sees the old table or the new one, whole.
        ``attrs`` are kept with the table (:meth:`table_attrs`), written in the same switch.
        """
        frame = frame.reset_index(drop=True)
        columns = [str(c) for c in frame.columns]
        # A column named like the dimension (the patient id) becomes its coordinate.
        indexed = frame.set_index(dim) if dim in frame.columns else frame.rename_axis(dim)
        ds = _dataset_from_frame(indexed)
        for col in frame.columns:
            if frame[col].dtype == object or str(frame[col].dtype).startswith(("string", "str")):
                ds[col] = ds[col].astype(object)
        if dim in frame.columns:
            ds = ds.assign_coords({dim: ds[dim].astype(object)})
        ds.attrs = {**_jsonable(attrs or {}), "lungzarr:written": _now(), "lungzarr_version": __version__,
                    "columns": columns}
        group = f"{name}.{uuid.uuid4().hex}"
        self._changing()
        try:
            # The new group is written whole before the pointer moves to it: a write that fails (a full
            # disk) leaves the previous table current and readable.
            _checksummed(ds).to_zarr(self._zstore, group=f"{TABLES_GROUP}/{group}", mode="w", **_WRITE)
            self._switch_table(name, group)
        except OSError as exc:
            self._rmtree(self.path / TABLES_GROUP / group, ignore_errors=True)
            kept = "the previous table is kept" if self._table_pointer().get(name) else "it has none yet"
            full = exc.errno == errno.ENOSPC
            cause = "no space left on the device" if full else f"{type(exc).__name__}: {exc}"
            raise LungzarrError(f"the {name} table of store {str(self.path)!r} could not be written ({cause}); "
                                f"{kept}: {'free space' if full else 'fix that'} and run the command again (or "
                                f"`lungzarr verify --repair {self.path}`, which writes only the tables)") from None
        # Only now is the old group unreachable for a new reader; remove it, an old-layout
        # tables/<name>, and any group a killed writer left before its switch.
        for folder in (self.path / TABLES_GROUP).iterdir():
            if folder.is_dir() and folder.name != group and (
                    folder.name == name or (folder.name.startswith(name + ".")
                                            and folder.name[len(name) + 1:].isalnum())):
                self._rmtree(folder, ignore_errors=True)

    def has_tables(self) -> bool:
        """Whether the store has its ``tables`` group (every store lungzarr creates has one)."""
        return self._tables_meta_path().exists()

    def _table_dataset(self, name: str):
        """The current Dataset of table ``name``, loaded whole and checked to be current throughout; or None.

        Raises
        ------
        LungzarrError
            The table the pointer names cannot be read (gone, damaged).
        """
        import xarray as xr

        for _ in range(_TABLE_READ_ATTEMPTS):
            group = self._table_pointer().get(name)
            if group is None:
                if not (self.path / TABLES_GROUP / name / "zarr.json").exists():
                    return None
                group = name  # a store written before the pointer
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", category=UserWarning)
                    ds = xr.open_dataset(self._zstore, group=f"{TABLES_GROUP}/{group}", engine="zarr",
                                         consolidated=False, zarr_format=3).load()
            except (FileNotFoundError, KeyError, ValueError, self._zarr.errors.BaseZarrError) as exc:
                if self._table_pointer().get(name, name) == group:
                    # The current table itself cannot be read: damage, not a race.
                    raise LungzarrError(f"the {name} table of store {str(self.path)!r} ({TABLES_GROUP}/{group}) "
                                        f"cannot be read ({type(exc).__name__}: {exc}); `lungzarr verify --repair "
                                        f"{self.path}` writes it again from the patient groups") from None
                continue  # replaced (and removed) while we opened it: read the new one
            if self._table_pointer().get(name, name) == group:
                return ds
        raise LungzarrError(f"table {name!r} of {str(self.path)!r} was replaced {_TABLE_READ_ATTEMPTS} times "
                            f"while being read; read it again once the run writing the store has finished")

    def table_attrs(self, name: str) -> dict:
        """The attributes the current table ``name`` was written with (one metadata read); {} without it."""
        import json

        group = self._table_pointer().get(name)
        if group is None:
            return {}
        try:
            meta = json.loads((self.path / TABLES_GROUP / group / "zarr.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}  # replaced meanwhile (or damaged): the caller writes the table again
        return dict(meta.get("attributes", {}))

    def read_table(self, name: str):
        """The cohort table ``name`` as a pandas DataFrame: the old or the new one, never torn.

        Empty on a store that has no patient yet (a run writes its tables at its end).

        Raises
        ------
        LungzarrError
            The store has patients but not this table (its ``tables`` group
            removed, or the runs so far stopped before their end), or the
            table cannot be read: one sentence naming the store and the fix.
        """
        import pandas as pd

        if not self.has_tables():
            raise LungzarrError(f"store {str(self.path)!r} has no cohort tables (its {TABLES_GROUP}/ group is "
                                f"gone); `lungzarr verify --repair {self.path}` rebuilds them from the patient groups")
        ds = self._table_dataset(name)
        if ds is None:
            if self.patients():
                raise LungzarrError(f"store {str(self.path)!r} has patients but no {name} table (a run writes it "
                                    f"at its end; did the last one stop before?); `lungzarr verify --repair "
                                    f"{self.path}` writes it from the patient groups")
            return pd.DataFrame()
        columns = ds.attrs.get("columns")
        frame = ds.to_dataframe()
        frame = frame.reset_index(drop=not (columns and frame.index.name in columns))
        frame = frame[[c for c in ds.attrs.get("columns", frame.columns) if c in frame.columns]]
        for col in frame.columns:
            if frame[col].dtype == object or str(frame[col].dtype).startswith("str"):
                frame[col] = frame[col].astype(object)
        return frame

    def table_names(self) -> list[str]:
        """Names of the cohort tables in the store."""
        names = set(self._table_pointer())
        folder = self.path / TABLES_GROUP
        if folder.is_dir():
            names.update(p.name for p in folder.iterdir() if "." not in p.name and (p / "zarr.json").exists())
        return sorted(names)

    # ------------------------------------------------------------------ failures
    def failures(self) -> list[dict]:
        return list(self._root_attrs().get(FAILURES_KEY, []))

    def record_failure(self, error: PatientError, *, stage: str | None = None) -> None:
        """Keep one failure record per (patient, stage): the latest."""
        rec = error.as_record()
        rec["stage"] = rec.get("stage") or stage
        rec["time"] = _now()
        kept = [f for f in self._root_attrs().get(FAILURES_KEY, [])
                if (f.get("patient"), f.get("stage")) != (rec["patient"], rec["stage"])]
        kept.append(_jsonable(rec))
        self._update_root_attrs({FAILURES_KEY: kept})

    def clear_failure(self, patient: str, stage: str) -> None:
        old = self._root_attrs().get(FAILURES_KEY, [])
        kept = [f for f in old if (f.get("patient"), f.get("stage")) != (patient, stage)]
        if len(kept) != len(old):
            self._update_root_attrs({FAILURES_KEY: kept})

    # ------------------------------------------------------------------ integrity
    @staticmethod
    def array_stage(name: str, owners: dict, creator: str) -> str:
        """The stage that writes the array ``name`` of a patient group (``"nodules/prob_max"`` for a child's).

        ``owners`` maps a stage to ``{"arrays": (...), "subgroups": (...)}`` (the
        pipeline's stage registry says what each writes); every other array of
        the group (coordinates, a legacy import's) belongs to ``creator``, the
        stage that created the group.
        """
        head = name.split("/", 1)[0]
        for stage, owned in owners.items():
            # A child group may be nested (``labels/lungs``): it owns every array below it.
            if (any(name == g or name.startswith(g + "/") for g in owned.get("subgroups", ()))
                    or head in owned.get("arrays", ())):
                return stage
        return creator

    def verify_patient(self, patient: str, *, owners: dict, creator: str) -> dict:
        """Read every chunk of every array of ``patient``'s completed stages.

        ``owners`` and ``creator`` say which stage wrote which array (see
        :meth:`array_stage`).

        A chunk is damaged when its file is missing (every chunk is written,
        so none may be absent), when its checksum does not match its bytes, or
        when it cannot be decoded; a stage's array or child group that is not
        there at all is damaged too. Arrays of stages not marked complete are
        not read (they are redone anyway).

        Returns
        -------
        dict
            ``patient``, ``arrays``, ``chunks`` and ``bytes`` read, and
            ``damage``: one record per damaged chunk or array with
            ``patient``, ``stage`` (the one that wrote it), ``array``,
            ``chunk``, ``kind`` ("missing", "checksum" or "undecodable"),
            ``file`` and ``reason``; ``unchecksummed``: arrays written before
            lungzarr checksummed every chunk (read, but a chunk file missing
            there may be the fill value, so it is not counted as damage).
        """
        import itertools
        import json

        stages = self.stages(patient)
        folder = self.path / self.group_path(patient)
        report = {"patient": patient, "arrays": 0, "chunks": 0, "bytes": 0, "damage": [], "unchecksummed": []}

        def damaged(stage, array, kind, file, reason, chunk=None):
            report["damage"].append({"patient": patient, "stage": stage, "array": array, "chunk": chunk,
                                     "kind": kind, "file": str(file),
                                     "reason": f"{reason}; `lungzarr run --verify` redoes the {stage} stage"})

        for stage, record in stages.items():
            legacy = record.get("source") == "import-legacy"  # wrote what the old layout had, under ingest
            owned = owners.get(stage, {})
            # An import wrote only what the old layout had (no NGFF labels either).
            expected = [] if legacy else list(owned.get("subgroups", ())) + list(owned.get("arrays", ()))
            for name in expected:
                if not (folder / name / "zarr.json").is_file():
                    damaged(stage, name, "missing", folder / name, f"{name!r} is missing from the store")

        arrays = []  # (name relative to the patient group, folder)
        subgroups = {g for o in owners.values() for g in o.get("subgroups", ())}

        def collect(parent, prefix):
            """The arrays of ``parent`` (the patient group, or a group on the way to a stage's child group)."""
            for entry in sorted(p for p in parent.iterdir() if p.is_dir()):
                name = f"{prefix}{entry.name}"
                try:
                    node = json.loads((entry / "zarr.json").read_text()).get("node_type")
                except FileNotFoundError:
                    continue  # not a zarr node (nothing lungzarr writes)
                except (ValueError, UnicodeDecodeError) as exc:
                    stage = self.array_stage(name, owners, creator)
                    if stage in stages:
                        damaged(stage, name, "undecodable", entry / "zarr.json",
                                f"the metadata of {name!r} cannot be read ({exc})")
                    continue
                if node == "array" and not prefix:
                    arrays.append((name, entry))
                elif node == "group" and name in subgroups:
                    arrays.extend((f"{name}/{child.name}", child)
                                  for child in sorted(entry.iterdir()) if (child / "zarr.json").is_file())
                elif node == "group" and any(g.startswith(name + "/") for g in subgroups):
                    collect(entry, name + "/")  # e.g. ``labels``, which holds ``labels/lungs``

        collect(folder, "")

        for name, array_dir in arrays:
            stage = self.array_stage(name, owners, creator)
            if stage not in stages:
                continue
            try:
                array = self._zarr.open_array(self._zstore, path=str(array_dir)[len(str(self.path)) + 1:],
                                              mode="r", zarr_format=3)
            except Exception as exc:  # metadata that parses but does not describe an array
                damaged(stage, name, "undecodable", array_dir / "zarr.json",
                        f"{name!r} cannot be opened ({type(exc).__name__}: {exc})")
                continue
            report["arrays"] += 1
            # Arrays written before lungzarr checksummed its chunks also left chunks of only the fill
            # value unwritten: there a missing file is not damage, and a changed chunk may go unseen.
            checksummed = any(getattr(c, "to_dict", lambda: {})().get("name") == "crc32c"
                              for c in array.metadata.codecs)
            if not checksummed:
                report["unchecksummed"].append(name)
            for coords in itertools.product(*(range(n) for n in array.cdata_shape)):
                key = array.metadata.encode_chunk_key(coords)
                file = array_dir / key
                if not file.is_file():
                    if checksummed:
                        damaged(stage, name, "missing", file, f"chunk {key} of {name!r} is missing", chunk=key)
                    continue
                report["chunks"] += 1
                report["bytes"] += file.stat().st_size
                try:
                    array.get_block_selection(coords)
                except ValueError as exc:
                    if "checksum" not in str(exc):
                        damaged(stage, name, "undecodable", file,
                                f"chunk {key} of {name!r} cannot be decoded ({exc})", chunk=key)
                    else:
                        damaged(stage, name, "checksum", file, f"chunk {key} of {name!r} fails its checksum "
                                f"(its bytes changed after it was written)", chunk=key)
                except Exception as exc:
                    damaged(stage, name, "undecodable", file,
                            f"chunk {key} of {name!r} cannot be decoded ({type(exc).__name__}: {exc})", chunk=key)
        return report

    def damage(self) -> list[dict]:
        """Every damaged chunk or array the last verification of each patient found."""
        return list(self._root_attrs().get(DAMAGE_KEY, []))

    def record_damage(self, found: dict) -> None:
        """Replace the damage records of each patient of ``found`` (``{patient: records}``) in one write.

        ``records`` as :meth:`verify_patient` returns them; an empty list says
        the patient was verified and found whole.
        """
        now = _now()
        old = list(self._root_attrs().get(DAMAGE_KEY, []))
        kept = [d for d in old if d.get("patient") not in found]
        new = [_jsonable({**r, "patient": patient, "time": now}) for patient, records in found.items()
               for r in records]
        if new or len(kept) != len(old):
            self._update_root_attrs({DAMAGE_KEY: kept + new})

    def _clear_committed(self, patient: str, stage: str, *, whole_patient: bool) -> None:
        """After a commit: drop the stage's failure and its damage (every damage of a new patient group)."""
        attrs = self._root_attrs()
        update = {}
        failures = attrs.get(FAILURES_KEY, [])
        kept = [f for f in failures if (f.get("patient"), f.get("stage")) != (patient, stage)]
        if len(kept) != len(failures):
            update[FAILURES_KEY] = kept
        damage = attrs.get(DAMAGE_KEY, [])
        kept = [d for d in damage if d.get("patient") != patient or not (whole_patient or d.get("stage") == stage)]
        if len(kept) != len(damage):
            update[DAMAGE_KEY] = kept
        if update:
            self._update_root_attrs(update)

    # ------------------------------------------------------------------ warnings
    def warnings(self) -> list[dict]:
        """Every recorded warning: patient, stage, file, reason, time."""
        return list(self._root_attrs().get(WARNINGS_KEY, []))

    def record_warnings(self, patient: str, stage: str, records) -> None:
        """Replace the warnings of (``patient``, ``stage``) with ``records``.

        Each record is a dict with ``file`` (or None) and ``reason``: something
        a user should know that did not stop the patient (another patient's
        files skipped, a damaged edge slice dropped, an INPUT entry not used).
        Recording an empty list clears them, so a re-run leaves only what is
        still true.
        """
        now = _now()
        new = [_jsonable({"patient": patient, "stage": stage, "file": None if r.get("file") is None
                          else str(r["file"]), "reason": str(r["reason"]), "time": now}) for r in records]
        old = list(self._root_attrs().get(WARNINGS_KEY, []))
        kept = [w for w in old if (w.get("patient"), w.get("stage")) != (patient, stage)]
        if new or len(kept) != len(old):
            self._update_root_attrs({WARNINGS_KEY: kept + new})

    # ------------------------------------------------------------------ misc
    def size_bytes(self) -> int:
        return self._backend.size_bytes()

    @property
    def lock_path(self):
        """``NAME.lock`` beside the store's resolved path (symlinks and ``..`` followed).

        Every spelling of one store (a symlink to it, a relative or an absolute
        path, ``a/../store``) names the same lock file, so two runs can never
        write one store at once through two names. For an object store, the
        lock object ``URL.lock`` beside the store's prefix.
        """
        return self._backend.lock_path

    def writer(self) -> str | None:
        """Who holds the writer lock now (a run writing the store), found without taking it or writing
        anything; None when nobody does."""
        return self._backend.writer()

    @contextmanager
    def lock(self):
        """Hold the store's writer lock (:attr:`lock_path`); refuse when another process holds it.

        On a directory, an OS-level ``flock``: released by the kernel when the
        process dies, so a killed run never leaves a stale lock behind. The
        lock file names the holder ("pid N since ...") while it is held and is
        removed on release, so after a run no ``NAME.lock`` is left beside the
        store (a killed run's file stays, empty of meaning: the kernel dropped
        its lock). On an object store, a lock object created by a conditional
        write (see :class:`_ObjectBackend`), naming pid, host and start.
        """
        with self._backend.hold_lock(self):
            # Only the lock holder may touch staged groups: finish or drop what a
            # killed run left there.
            if self.mode == "a":
                self._recover_staging()
            yield self
            # Every task of the run has finished (an exception skips this: tasks may still be
            # writing, and a store without consolidated metadata is read correctly, only slower).
            if self.mode == "a" and not self.is_consolidated():
                try:
                    self.consolidate()
                except PermissionError:
                    pass  # a read-only store a run had nothing to write to: readers list its groups instead


def _ancestors(rel: str) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b"]``."""
    parts = rel.split("/")
    return ["/".join(parts[:k]) for k in range(1, len(parts))]


def _same_file(fh, path: Path) -> bool:
    """Whether the open file ``fh`` is the file ``path`` names now."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fh.fileno())
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


class PendingStage:
    """A stage whose metadata is written; ``delayed`` writes the voxels, ``commit`` marks it complete.

    Attributes
    ----------
    warnings : list of dict
        What the stage recorded for the user (``file``, ``reason``), shown in
        the run's own output when the patient's stage is done.
    future : distributed.Future or None
        The computation of ``delayed`` on a cluster, once submitted.
    """

    #: Attempts and pause (s) of :meth:`discard` while late tasks still write into the staged group.
    DISCARD_ATTEMPTS, DISCARD_PAUSE_S = 5, 0.2

    def __init__(self, store: CohortStore, patient: str, stage: str, delayed, record: dict, *,
                 group_path: str, staged: bool = False):
        self.store, self.patient, self.stage = store, patient, stage
        self.delayed = delayed
        self.record = record
        self.group_path = group_path
        self.staged = staged
        self.warnings: list[dict] = []
        self.future = None

    def compute(self, **kwargs):
        return self.delayed.compute(**kwargs)

    def add_record(self, result) -> None:
        """Merge what the computed task returned (a dict) into the stage record."""
        if isinstance(result, dict):
            self.record.update(result)

    def then(self, func, *args) -> "PendingStage":
        """Run ``func(*args)`` as one more task after the voxels are written.

        It runs on a worker, in the same computation, and the dict it returns
        is merged into the stage record (for figures that need the written
        arrays, such as the crop box, without a second round trip).
        """
        import dask

        def after_write(_, *a):
            return func(*a)

        self.delayed = dask.delayed(after_write, pure=False)(self.delayed, *args)
        return self

    def commit(self) -> None:
        """Mark the stage complete (call only after ``delayed`` has been computed)."""
        self.store._changing()
        group = self.store._group(self.group_path)
        attrs = dict(group.attrs)
        stages = dict(attrs.get(STAGES_KEY, {}))
        stages[self.stage] = _jsonable({"completed": _now(), "id": uuid.uuid4().hex,
                                        "lungzarr_version": __version__, **self.record})
        attrs[STAGES_KEY] = stages
        ome = ome_multiscales(attrs, arrays=set(group.array_keys()))
        if ome is not None:
            attrs[OME_KEY] = ome
        group.attrs.put(_jsonable(attrs))
        if self.staged:
            self.store._swap_in(self.patient)
        self.store._clear_committed(self.patient, self.stage, whole_patient=self.staged)

    def discard(self) -> None:
        """Drop what a failed write left (staged groups only; stage arrays are redone next run).

        When one task of a patient's computation fails, its sibling tasks may
        still be running on other workers and writing chunks into the staged
        group (a folder ``rmtree`` is emptying then is "not empty"). So the
        group's ``zarr.json`` goes first: what is left is no longer a group
        (no reader, nor the next run's recovery, takes it for a patient).
        Then the folder is removed, retried a few times; what a late task
        writes after that is removed by the next writer's recovery
        (:meth:`CohortStore.lock`), which runs once this run's workers are gone.
        """
        import errno
        import time

        if not self.staged:
            return
        folder = self.store.path / self.group_path
        for attempt in range(self.DISCARD_ATTEMPTS):
            try:
                if isinstance(folder, Path):  # the object store's rmtree removes zarr.json first itself
                    (folder / "zarr.json").unlink(missing_ok=True)
                if folder.exists():
                    self.store._rmtree(folder)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT, errno.EEXIST, errno.EBUSY):
                    raise
                time.sleep(self.DISCARD_PAUSE_S)
        # Late tasks still writing: the headless folder is left to the next writer's recovery.


# ---------------------------------------------------------------------- read API

def open_cohort(path):
    """The whole cohort as a lazy :class:`xarray.DataTree` (no voxel is loaded).

    With the store's consolidated metadata (written at the end of each run)
    every group's metadata comes from one file; without it (a run in
    progress, a killed one, a store of an older lungzarr) each group's own is
    read, the same tree, only slower.

    The consolidated metadata is checked against the groups it names first
    (:meth:`CohortStore.stale_consolidated`: a stat per node, no voxel read).
    When the store changed outside lungzarr (a patient's folder or an array
    removed, a group copied in), it is not used: the tree is read from each
    group's own metadata, so a patient whose group is gone is not listed and
    no array is served whose chunks are gone (zarr would read them as zeros),
    and a warning says so. Reading never writes the store (a reader may have
    no write access, and a run may hold it): ``lungzarr verify --repair``
    writes the consolidated metadata afresh.

    The cohort tables (``tables/<name>``) leave out the rows of patients
    whose group is gone, with a warning, as :func:`read_nodules` does.

    Examples
    --------
    >>> tree = lungzarr.open_cohort("cohort.zarr")            # doctest: +SKIP
    >>> ds = tree["patients/LIDC-IDRI-0001"].to_dataset()     # doctest: +SKIP
    >>> ds.hu_2mm.sel(z2=-116, method="nearest").plot()       # doctest: +SKIP
    """
    import xarray as xr

    store = CohortStore(path, mode="r")
    options = {"engine": "zarr", "chunks": {}, "zarr_format": 3}
    tree = None
    meta = store._root_meta()
    consolidated = meta.get(CONSOLIDATED_KEY) is not None
    stale = store.stale_consolidated(meta) if consolidated else []
    if stale:
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        warnings.warn(f"the consolidated metadata of store {str(store.path)!r} is stale ({'; '.join(stale[:3])}"
                      f"{more}): not used, every group's own metadata is read instead; `lungzarr verify "
                      f"{store.path}` lists what the store lost, `lungzarr verify --repair {store.path}` "
                      f"writes the consolidated metadata afresh", UserWarning, stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        if consolidated and not stale:
            try:
                tree = xr.open_datatree(store._zstore, consolidated=True, **options)
            except (ValueError, KeyError, FileNotFoundError):
                tree = None  # dropped by a run that started meanwhile: read each group's own
        if tree is None:
            options["consolidated"] = False
            root = xr.open_dataset(store._zstore, **options)
            children = {name: xr.open_datatree(store._zstore, group=name, **options)
                        for name in (PATIENTS_GROUP, STAGING_GROUP) if (store.path / name / "zarr.json").exists()}
    # The cohort tables as ``tables/<name>``, each read whole through its pointer (small; never a
    # torn or removed table group: see CohortStore.write_table).
    stored = set(store.patients())
    tables = {}
    for name in store.table_names():
        ds = store._table_dataset(name)
        if ds is not None and "patient" in ds.variables:
            kept = _rows_of_stored_patients(store, ds["patient"].values, name, stored, missing="drop",
                                            stacklevel=2)
            if not kept.all():
                ds = ds.isel({ds["patient"].dims[0]: kept})
        tables[name] = xr.DataTree(dataset=ds)
    tables = xr.DataTree(children=tables)
    if tree is None:
        return xr.DataTree(dataset=root, children={**children, TABLES_GROUP: tables})
    # Swap only the tables node: building a new tree would copy (and re-align) every patient's node.
    if TABLES_GROUP in tree.children:
        del tree[TABLES_GROUP]
    tree[TABLES_GROUP] = tables
    return tree


#: What the readers do with table rows of patients whose group is gone from the store.
MISSING_ROWS = ("drop", "raise")


def _rows_of_stored_patients(store, patients, table: str, stored: set, *, missing: str, stacklevel: int):
    """A boolean mask of the rows (``patients``: each row's patient id) whose patient has a group in the
    store; warn about (``missing="drop"``) or refuse (``"raise"``) the others."""
    if missing not in MISSING_ROWS:
        raise ValueError(f"missing must be one of {MISSING_ROWS!r}, got {missing!r}")
    ids = np.asarray(patients, dtype=object).astype(str)
    keep = np.isin(ids, np.array(sorted(stored), dtype=object).astype(str)) if len(ids) else np.ones(0, bool)
    if keep.all():
        return keep
    gone = sorted({str(p) for p in ids[~keep]})
    listed = ", ".join(repr(p) for p in gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
    said = (f"the {table} table of store {str(store.path)!r} has {int((~keep).sum())} row(s) of {len(gone)} "
            f"patient(s) whose group is gone from the store ({listed})")
    fix = (f"`lungzarr verify {store.path}` lists what the store lost; `lungzarr run INPUT {store.path}` ingests "
           f"them again, or `lungzarr verify --repair {store.path}` rebuilds the tables without them")
    if missing == "raise":
        raise LungzarrError(f"{said}; {fix}")
    warnings.warn(f"{said}: those rows are left out; {fix}", UserWarning, stacklevel=stacklevel + 1)
    return keep


def _read_cohort_table(path, name: str, missing: str):
    store = CohortStore(path, mode="r")
    frame = store.read_table(name)
    if frame.empty or "patient" not in frame.columns:
        return frame
    keep = _rows_of_stored_patients(store, frame["patient"].to_numpy(), name, set(store.patients()),
                                    missing=missing, stacklevel=3)
    return frame if keep.all() else frame[keep].reset_index(drop=True)


_READER_NOTES = """
    A row whose patient's group is gone from the store (removed by hand, lost
    with a disk) describes data the store no longer holds: no figure of it
    can be traced back to its voxels, and the next rebuild of the tables
    (the end of a run, ``lungzarr verify --repair``) leaves it out. So it is
    left out here too, with a warning naming the patients (``missing="drop"``,
    the default: the rest of the cohort stays readable), or refused with
    ``missing="raise"`` (for a script that must stop rather than publish a
    cohort that shrank). A row is never kept with a flag: a flag is a
    column a count or a mean ignores.

    Parameters
    ----------
    path : path or str
        The store.
    missing : {"drop", "raise"}
        What to do with the rows of patients whose group is gone.

    Raises
    ------
    LungzarrError
        The store has patients but no cohort tables (its ``tables`` group
        removed, or no run got to its end), the table cannot be read, or
        ``missing="raise"`` and rows of lost patients were found. A store
        with no patient yet gives an empty DataFrame.
"""


def read_nodules(path, *, missing: str = "drop"):
    return _read_cohort_table(path, "nodules", missing)


def read_patients(path, *, missing: str = "drop"):
    return _read_cohort_table(path, "patients", missing)


read_nodules.__doc__ = "The cohort's nodule table (one row per candidate nodule) as a DataFrame.\n" + _READER_NOTES
read_patients.__doc__ = "The cohort's patient table (lung measures, stage states) as a DataFrame.\n" + _READER_NOTES


def read_failures(path):
    """Every recorded failure: patient, stage, file, reason, time."""
    import pandas as pd

    return pd.DataFrame(CohortStore(path, mode="r").failures(),
                        columns=["patient", "stage", "file", "reason", "time"])


def read_warnings(path):
    """Every recorded warning (nothing stopped, but a user should know): patient, stage, file, reason, time."""
    import pandas as pd

    return pd.DataFrame(CohortStore(path, mode="r").warnings(),
                        columns=["patient", "stage", "file", "reason", "time"])


def read_damage(path):
    """Every damaged chunk or array found by ``lungzarr verify``: patient, stage, array, chunk, kind, file, reason, time."""
    import pandas as pd

    return pd.DataFrame(CohortStore(path, mode="r").damage(),
                        columns=["patient", "stage", "array", "chunk", "kind", "file", "reason", "time"])
