"""The d8 weights on workers that do not share the client's filesystem: shipped once to each worker.

Workers on a cloud or an HPC queue see neither the client's ``models/``
folder nor its home directory, so a task must not open the path the client
resolved. The client reads the weights once (2.3 MB, sha256-checked by
:func:`lungzarr.model.d8.verify_weights`) and registers a
:class:`WeightsPlugin` holding the bytes (:func:`ship_weights`; the pipeline
does this before the first patient of a run that runs the UNet). The
scheduler keeps the plugin and gives it to every worker, also to those that
join later (an autoscaled cluster); each worker writes the bytes into its own
local directory (``dask worker --local-directory``, removed with the worker)
and checks their sha256 before recording the copy. A task then opens this
worker's copy (:func:`task_weights`), and the model is built from it only
after :func:`~lungzarr.model.d8.verify_weights` has checked its sha256 again
(once per worker process, :func:`~lungzarr.model.d8.get_model`), so a copy
damaged or changed on the worker is refused, never run.

Why shipping and not a URL (``--weights s3://...``) read by each worker: the
weights are one small file whose hash lungzarr knows, so shipping needs no
bucket, no credentials on the workers for it and no network access from them
to anything but the scheduler (an HPC compute node often has none); a URL
would add a second place to keep the file and its permissions right. The
scheduler holds the 2.3 MB once per registration (a run registers it once).

Compiled inference graphs (OpenVINO IR, ONNX; :mod:`lungzarr.model.engines`)
are not shipped: a graph is specific to the worker's engine and versions, so
each worker exports it from its verified copy on first use into its own cache
(``$LUNGZARR_CACHE`` or the user cache folder *of the worker's machine*) and
compiles it once per process; the workers of one machine share that cache
(folders are renamed into place atomically).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from lungzarr.errors import LungzarrError
from lungzarr.model.d8 import WEIGHTS_SHA256, _sha256, verify_weights

__all__ = ["PLUGIN_NAME", "ShippedWeights", "WeightsPlugin", "ship_weights", "task_weights", "shipped_weights"]

#: The worker plugin's name (one registration per client; a new one replaces it).
PLUGIN_NAME = "lungzarr-d8-weights"
#: Folder in each worker's local directory that holds the shipped copy.
FOLDER = "lungzarr-weights"

#: sha256 -> this process's verified shipped copy (set on a worker by WeightsPlugin.setup).
_SHIPPED: dict[str, Path] = {}


@dataclass(frozen=True)
class ShippedWeights:
    """What a task is given instead of a path: the weights shipped to every worker, by their sha256.

    Graphs built with it touch no file in the client (the run verified and
    shipped the weights once); on a worker :func:`task_weights` turns it into
    the worker's own copy.

    Attributes
    ----------
    sha256 : str
    source : str
        The client's file that was shipped (used only where no copy was shipped:
        the client's own process).
    requested : str or None
        What the user passed (None: the default file), for the stage records.
    """

    sha256: str
    source: str
    requested: str | None = None


class WeightsPlugin(WorkerPlugin):
    """Writes the d8 weights into each worker's local directory and checks their sha256 there.

    Parameters
    ----------
    data : bytes
        The weights file's bytes.
    sha256 : str
        Their sha256 (the published :data:`~lungzarr.model.d8.WEIGHTS_SHA256`).
    """

    name = PLUGIN_NAME
    idempotent = False  # a new registration (a repaired or another copy) runs setup again

    def __init__(self, data: bytes, sha256: str = WEIGHTS_SHA256):
        self.data = bytes(data)
        self.sha256 = str(sha256)

    def setup(self, worker):
        folder = Path(worker.local_directory) / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"d8-{self.sha256}.h5"
        if not (path.is_file() and _sha256(path) == self.sha256):
            # Written under a temporary name and renamed: a task never opens a half-written copy.
            fd, temp = tempfile.mkstemp(prefix=".d8-", suffix=".h5", dir=folder)
            with os.fdopen(fd, "wb") as f:
                f.write(self.data)
            os.replace(temp, path)
        actual = _sha256(path)
        if actual != self.sha256:
            raise LungzarrError(f"the d8 weights shipped to worker {worker.address} have sha256 {actual}, "
                                f"expected {self.sha256}: the transfer or the worker's disk damaged them")
        _SHIPPED[self.sha256] = path
        self._path = path

    def teardown(self, worker):
        # In-process workers share this module with the client: forget this worker's copy with it.
        if _SHIPPED.get(self.sha256) == getattr(self, "_path", None):
            _SHIPPED.pop(self.sha256, None)


def ship_weights(client, weights=None) -> ShippedWeights:
    """Verify the client's weights file and ship its bytes to every worker of ``client`` (and later ones).

    Parameters
    ----------
    client : distributed.Client
    weights : str or path-like, optional
        See :func:`lungzarr.model.d8.resolve_weights`.

    Returns
    -------
    ShippedWeights
        What to pass as ``weights`` to the graphs (no client path is opened by them).

    Raises
    ------
    LungzarrError
        The file is missing or not the published one; a worker could not
        write or verify its copy.
    """
    path = verify_weights(weights)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != WEIGHTS_SHA256:
        raise LungzarrError(f"d8 weights file {str(path)!r} changed while it was read; run again")
    client.register_plugin(WeightsPlugin(data, WEIGHTS_SHA256), name=PLUGIN_NAME)
    return ShippedWeights(WEIGHTS_SHA256, str(path), None if weights is None else str(weights))


def shipped_weights() -> Path | None:
    """This process's shipped copy of the d8 weights (on a worker after :func:`ship_weights`), else None."""
    return _SHIPPED.get(WEIGHTS_SHA256)


def task_weights(weights) -> str:
    """The weights file a task opens in this process: the copy shipped to this worker, else the client's file.

    ``weights`` is a :class:`ShippedWeights` or the path the client verified
    (the right file where the task runs in the client's process or on its
    machine without shipping: ``client=None``, the threaded scheduler). Either
    way the model is built only after its sha256 is checked
    (:func:`lungzarr.model.d8.build_d8`).
    """
    if not isinstance(weights, ShippedWeights) and Path(weights).is_file():
        return str(weights)  # a graph built without shipping (no client): the path the caller verified
    shipped = _SHIPPED.get(WEIGHTS_SHA256)
    if shipped is not None and shipped.is_file():
        return str(shipped)
    # A copy of a worker that has gone (an in-process worker of a closed cluster, its folder removed)
    # is forgotten, never opened.
    _SHIPPED.pop(WEIGHTS_SHA256, None)
    weights = weights.source if isinstance(weights, ShippedWeights) else weights
    if not Path(weights).is_file():
        raise LungzarrError(f"the d8 weights were not shipped to this worker and {str(weights)!r} is not on its "
                            f"filesystem; run through lungzarr.pipeline.run (which ships them) or call "
                            f"lungzarr.model.shipping.ship_weights(client) first")
    return str(weights)
