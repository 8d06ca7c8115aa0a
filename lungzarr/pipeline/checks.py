"""Run-level checks: what must be right before any patient is read.

A wrong weights file, precision, scheduler address or store path is the same
for every patient: checked once, up front, it stops the run with one message
(:class:`~lungzarr.errors.RunConfigError`, exit code 2 in the CLI) instead of
one failure per patient after the cohort was ingested and segmented.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from lungzarr.errors import LungzarrError, RunConfigError

__all__ = ["check_store", "check_weights", "check_precision", "check_scheduler", "check_engine", "check_run_config"]

_verified: dict = {}


def _is_lungzarr_store(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "lungzarr:version" in (meta.get("attributes") or {})


def _probe_writable(folder: Path, what: str, store: Path) -> None:
    """Create (and remove) a file in ``folder``: the only test a read-only mount or root cannot fool."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".lungzarr-write-check-"):
            pass
    except OSError as exc:
        raise RunConfigError(f"store {str(store)!r} cannot be written: {what} {str(folder)!r} is read-only "
                             f"({exc.strerror or exc}); give this user write permission there, or copy the "
                             f"store to a writable place and pass that path") from None


def check_store(path, *, create: bool = True, write: bool = True) -> Path:
    """Check a store path before a run: a lungzarr store (or a new name), and writable.

    Parameters
    ----------
    path : path
        The cohort store.
    create : bool
        A store that does not exist yet may be created (``ingest``, ``run``);
        without it the store must exist (later stages).
    write : bool
        The run writes to the store: its folder, and the folder of its
        ``STORE.lock`` file, must be writable.

    Returns
    -------
    pathlib.Path, or str for an object store's URL (``s3://bucket/cohort.zarr``)

    Raises
    ------
    RunConfigError
        ``path`` is a file, a non-empty folder that is not a lungzarr store,
        missing (``create=False``) or not writable.
    """
    from lungzarr.io.store import check_store_url, is_store_url

    if is_store_url(path):
        return check_store_url(path, create=create, write=write)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunConfigError(f"store {str(path)!r} is a file, not a lungzarr store (a folder); pass the store's "
                             f"folder, or a new path to create one")
    if path.is_dir() and not _is_lungzarr_store(path):
        if any(path.iterdir()):
            raise RunConfigError(f"store {str(path)!r} is a folder that is not a lungzarr store and is not "
                                 f"empty; pass an existing store, or a new (or empty) folder to create one")
    if not path.exists() and not create:
        raise RunConfigError(f"no lungzarr store at {str(path)!r}; run `lungzarr ingest INPUT {path}` or "
                             f"`lungzarr run` first")
    if write:
        if path.is_dir():
            _probe_writable(path, "its folder", path)
        # The lock file lives beside the store's real path; the store itself may still have to be created there.
        parent = Path(os.path.realpath(path)).parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise RunConfigError(f"store {str(path)!r} cannot be created: {str(parent)!r} is a file")
        _probe_writable(parent, "the folder", path)
    return path


def check_weights(weights=None) -> Path:
    """:func:`lungzarr.model.d8.verify_weights`, once per file version (path, size, mtime) and process.

    Raises
    ------
    RunConfigError
        The file is missing or its sha256 is not the published one.
    """
    from lungzarr.model.d8 import resolve_weights, verify_weights

    path = resolve_weights(weights)
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _verified:
        return _verified[key]
    try:
        verified = verify_weights(path)
    except LungzarrError as exc:
        raise RunConfigError(str(exc)) from None
    if key is not None:
        _verified[key] = verified
    return verified


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`lungzarr.model.d8.PRECISIONS`, else raise RunConfigError."""
    from lungzarr.model.d8 import PRECISIONS

    value = getattr(precision, "value", precision)  # the CLI's enum member
    if value not in PRECISIONS:
        raise RunConfigError(f"precision {value!r} is not one of {', '.join(PRECISIONS)}; pass "
                             f"--precision fp32 (the reference), bf16 or fp16")
    return value


def check_scheduler(scheduler) -> str:
    """Return ``scheduler`` if it reads as ``local``, ``threads`` or a scheduler address, else raise.

    Only the spelling is checked here; :func:`lungzarr.cluster.dask_client`
    checks that the scheduler answers.
    """
    if scheduler in (None, "", "local", "threads"):
        return scheduler or "local"
    text = str(scheduler)
    if "://" in text or (":" in text and text.rsplit(":", 1)[1].isdigit()):
        return text
    raise RunConfigError(f"--scheduler {text!r} is not 'local', 'threads' or a dask scheduler address such as "
                         f"tcp://127.0.0.1:8786")


def check_engine(engine: str = "auto", *, gpu: bool = False) -> str:
    """The concrete engine ``engine`` resolves to, if it is installed and imports; else RunConfigError.

    The cheap part of :func:`lungzarr.model.engines.prepare_engine` (which also
    exports the graph): the CLI calls it before a cluster starts.
    """
    from lungzarr.model.engines import require_engine

    try:
        return require_engine(getattr(engine, "value", engine), gpu=gpu)
    except (ValueError, LungzarrError) as exc:
        raise RunConfigError(str(exc)) from None


def check_run_config(*, store, stages: Iterable[str], weights=None, precision: str = "fp32",
                     scheduler=None, create: bool = True, engine: str | None = None) -> dict:
    """Every run-level check of a run over ``stages``, before any patient.

    Parameters
    ----------
    store : path
    stages : iterable of str
        The stages the run may compute; the weights and precision are
        checked only when one of them runs the model (``Stage.uses_model``).
    weights, precision :
        As for :func:`lungzarr.pipeline.run`.
    scheduler : str, optional
        Its spelling is checked when given.
    create : bool
        See :func:`check_store`.

    Returns
    -------
    dict
        ``store``, and ``weights`` (the verified file) and ``precision`` when checked.

    Raises
    ------
    RunConfigError
    """
    from lungzarr.pipeline.stages import ordered_stages

    out = {}
    if scheduler is not None:
        out["scheduler"] = check_scheduler(scheduler)
    # The command's own options first (an engine, precision or weights mistake whatever the store), then the store.
    if any(stage.uses_model for stage in ordered_stages(stages)):
        out["precision"] = check_precision(precision)
        if engine is not None:
            out["engine"] = check_engine(engine)
        out["weights"] = check_weights(weights)
    out["store"] = check_store(store, create=create)
    return out

