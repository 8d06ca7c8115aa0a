"""The DSB2017 "d8" nodule identifier in Keras 3, and its legacy weights.

The network is the 3-D UNet of ``unet_model_xd3_2_6l_grid(nb_filter=20, dim=8)``
in astoc/kaggle_dsb2017 (``code/Andre/py/lungs_var3_d8g_222f.py``, MIT,
Andre Stochniol), rebuilt channels-last with ``keras.layers`` only, so the same
code runs on the TensorFlow, PyTorch and JAX backends (``KERAS_BACKEND``).
Input: 8 consecutive normalised 2 mm slices ``(8, H, W, 1)`` with H and W
multiples of 4; output: one probability map ``(1, H, W, 1)`` for the slice
in the middle of the window (docs/algorithms.md §5).

The trained weights are a Keras-1 HDF5 file saved under Theano. Theano's
``conv3d`` is a true convolution, so every kernel is flipped along its three
spatial axes when loaded into Keras 3, which cross-correlates.

Keras is imported inside the functions that need it, so importing this module
stays cheap.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from lungzarr.errors import LungzarrError
from lungzarr.model.geometry import WINDOW
from lungzarr.model.quiet import apply_quiet_environ, quiet_backend_startup

__all__ = [
    "DEFAULT_WEIGHTS",
    "WEIGHTS_SHA256",
    "WEIGHTS_ENV",
    "PRECISIONS",
    "WINDOW",
    "resolve_weights",
    "verify_weights",
    "read_theano_weights",
    "to_keras_kernel",
    "build_d8",
    "get_model",
    "model_lock",
]

#: The trained d8 weights shipped with the repository (``models/`` beside the package).
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "d8_2x2x2_best_weights.h5"
#: sha256 of ``d8_2x2x2_best_weights.h5`` as published in astoc/kaggle_dsb2017.
WEIGHTS_SHA256 = "e43d6e5920eb5f5b85612a63c603f34ae0f5a9d1130bad8e7ca1b15e763e262e"
#: Environment variable naming another copy of the weights file.
WEIGHTS_ENV = "LUNGZARR_WEIGHTS"
#: ``--precision`` names and the Keras dtype policy each one uses.
PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}

_FIX_WEIGHTS = (
    f"Restore the file from the lungzarr repository (models/d8_2x2x2_best_weights.h5) or from "
    f"astoc/kaggle_dsb2017 (code/Andre/nodule_identifiers/), then pass its path as weights=... "
    f"or set {WEIGHTS_ENV}."
)


# --------------------------------------------------------------------------- weights file
def resolve_weights(weights=None) -> Path:
    """The weights file to use: ``weights``, else ``$LUNGZARR_WEIGHTS``, else the default.

    Parameters
    ----------
    weights : str or path-like, optional
        Explicit path of a ``d8_2x2x2_best_weights.h5`` file.

    Returns
    -------
    path : pathlib.Path
        Absolute path (not yet checked; see :func:`verify_weights`).
    """
    if weights is None:
        weights = os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS
    return Path(weights).expanduser().resolve()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(weights=None) -> Path:
    """Resolve the weights file and check it is the published d8 file.

    Parameters
    ----------
    weights : str or path-like, optional
        See :func:`resolve_weights`.

    Returns
    -------
    path : pathlib.Path
        The verified file.

    Raises
    ------
    LungzarrError
        When the file is missing or its sha256 is not :data:`WEIGHTS_SHA256`;
        the message names the path, the expected hash and the fix.
    """
    path = resolve_weights(weights)
    if not path.is_file():
        raise LungzarrError(
            f"d8 weights file {str(path)!r} does not exist (expected sha256 {WEIGHTS_SHA256}). "
            + _FIX_WEIGHTS)
    actual = _sha256(path)
    if actual != WEIGHTS_SHA256:
        raise LungzarrError(
            f"d8 weights file {str(path)!r} has sha256 {actual}, expected {WEIGHTS_SHA256}: "
            f"it is damaged or a different file. " + _FIX_WEIGHTS)
    return path


def read_theano_weights(path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Read the convolution weights of a Keras-1 / Theano HDF5 weights file.

    Parameters
    ----------
    path : str or path-like
        The ``.h5`` file (Keras 1 ``save_weights`` layout).

    Returns
    -------
    layers : list of (str, ndarray, ndarray)
        ``(layer name, kernel, bias)`` for every layer that has weights, in the
        order of the file's root attribute ``layer_names``. Kernels are as
        stored: float32 ``(out, in, kz, ky, kx)``, for a true convolution.
    """
    import h5py

    path = Path(path)
    layers = []
    with h5py.File(path, "r") as f:
        if "layer_names" not in f.attrs:
            raise LungzarrError(
                f"{str(path)!r} has no root attribute 'layer_names': it is not a Keras-1 weights "
                f"file. " + _FIX_WEIGHTS)
        for raw_name in f.attrs["layer_names"]:
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            group = f[name]
            weight_names = [w.decode() if isinstance(w, bytes) else str(w)
                            for w in group.attrs.get("weight_names", [])]
            if not weight_names:
                continue
            if len(weight_names) != 2:
                raise LungzarrError(
                    f"layer {name!r} of {str(path)!r} has weights {weight_names!r}; expected a "
                    f"kernel and a bias. " + _FIX_WEIGHTS)
            kernel = np.asarray(group[weight_names[0]], dtype=np.float32)
            bias = np.asarray(group[weight_names[1]], dtype=np.float32)
            if kernel.ndim != 5 or bias.shape != (kernel.shape[0],):
                raise LungzarrError(
                    f"layer {name!r} of {str(path)!r} has kernel {kernel.shape!r} and bias "
                    f"{bias.shape!r}; expected (out, in, kz, ky, kx) and (out,). " + _FIX_WEIGHTS)
            layers.append((name, kernel, bias))
    return layers


def to_keras_kernel(kernel, *, flip: bool = True) -> np.ndarray:
    """Turn a Theano conv3d kernel into a Keras 3 ``Conv3D`` kernel.

    Parameters
    ----------
    kernel : ndarray, shape (out, in, kz, ky, kx)
        Kernel as stored by Keras 1 under Theano (a true convolution).
    flip : bool, optional
        Reverse the three spatial axes, so that Keras' cross-correlation
        computes Theano's convolution. Only the legacy-reproduction tests turn
        this off.

    Returns
    -------
    ndarray, shape (kz, ky, kx, in, out)
    """
    kernel = np.asarray(kernel)
    if kernel.ndim != 5:
        raise ValueError(f"kernel must be 5-D (out, in, kz, ky, kx), got shape {kernel.shape!r}")
    if flip:
        kernel = kernel[:, :, ::-1, ::-1, ::-1]
    return np.ascontiguousarray(kernel.transpose(2, 3, 4, 1, 0))


# --------------------------------------------------------------------------- network
def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)!r}, got {precision!r}")
    return PRECISIONS[precision]


def _d8_network(precision: str = "fp32"):
    """The untrained d8 network (layers named after their role, not the file)."""
    import keras
    from keras import layers

    policy = keras.DTypePolicy(_check_precision(precision))

    def conv(x, filters, kernel, name, activation="relu"):
        return layers.Conv3D(filters, kernel, padding="same", activation=activation,
                             dtype=policy, name=name)(x)

    def pool(x, size, name):
        return layers.MaxPooling3D(pool_size=size, dtype=policy, name=name)(x)

    inputs = keras.Input((WINDOW, None, None, 1), name="window")
    c1 = conv(inputs, 20, 3, "down1_conv1")
    c1 = conv(c1, 20, 3, "down1_conv2")
    c2 = conv(pool(c1, 2, "down1_pool"), 40, 3, "down2_conv1")
    c2 = conv(c2, 40, 3, "down2_conv2")
    c4 = conv(pool(c2, 2, "down2_pool"), 80, 3, "bottom_conv1")
    c4 = conv(c4, 80, 3, "bottom_conv2")
    # Concatenation order [upsampled, skip], as the original's merge (§5).
    u6 = layers.Concatenate(axis=-1, dtype=policy, name="up1_concat")(
        [layers.UpSampling3D(2, dtype=policy, name="up1_upsample")(c4), c2])
    c6 = conv(u6, 40, 3, "up1_conv1")
    c6 = conv(c6, 40, 3, "up1_conv2")
    u7 = layers.Concatenate(axis=-1, dtype=policy, name="up2_concat")(
        [layers.UpSampling3D(2, dtype=policy, name="up2_upsample")(c6), c1])
    c7 = conv(u7, 20, 3, "up2_conv1")
    c7 = conv(c7, 20, 3, "up2_conv2")
    # Collapse the 8 slices to 1 with three (2,1,1) pools and z-only convolutions.
    z = pool(c7, (2, 1, 1), "zpool1")
    z = conv(z, 40, (3, 1, 1), "zconv1a")
    z = conv(z, 40, (3, 1, 1), "zconv1b")
    z = pool(z, (2, 1, 1), "zpool2")
    z = conv(z, 40, (3, 1, 1), "zconv2a")
    z = conv(z, 40, (3, 1, 1), "zconv2b")
    z = pool(z, (2, 1, 1), "zpool3")
    logits = conv(z, 1, 1, "head_conv", activation=None)
    # The sigmoid runs in float32 even under a mixed policy: decisions at p = 0.5
    # should not depend on a 16-bit rounding of the probability.
    prob = layers.Activation("sigmoid", dtype="float32", name="prob")(logits)
    return keras.Model(inputs, prob, name="d8")


def _strict_fp32() -> None:
    """Turn off TF32 in the active backend, so that "fp32" means float32 arithmetic.

    TensorFlow, PyTorch (cuDNN convolutions) and JAX all run float32
    convolutions in TF32 on recent NVIDIA GPUs by default; that moved d8
    probabilities by up to 0.02 on an H100. This is a process-wide setting,
    like the model cache; 16-bit precisions are unaffected.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif backend == "torch":
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    elif backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")


def _conv_layers(model):
    import keras

    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv3D)]


def build_d8(*, weights=None, precision: str = "fp32", _flip_kernels: bool = True):
    """Build the d8 network and load the trained weights.

    Parameters
    ----------
    weights : str or path-like, optional
        Weights file; default ``$LUNGZARR_WEIGHTS`` or :data:`DEFAULT_WEIGHTS`.
        Its sha256 must be :data:`WEIGHTS_SHA256`.
    precision : {"fp32", "bf16", "fp16"}, optional
        Compute precision, through a Keras mixed-precision dtype policy
        (variables stay float32; the output is float32). The 16-bit ones are
        meant for GPUs. "fp32" also turns TF32 off in the backend (see
        ``_strict_fp32``): the default, until a benchmark shows that a lower
        precision keeps the decisions.

    Returns
    -------
    model : keras.Model
        Input ``(batch, 8, H, W, 1)`` float32 with H, W multiples of 4;
        output ``(batch, 1, H, W, 1)`` float32 probabilities.
    """
    # _flip_kernels=False reproduces the tjvananne refactor's lost flip; it exists
    # only for the tests that check the loader against that refactor's maps.
    path = verify_weights(weights)
    # The backend's start-up banners are not the user's problem (lungzarr.model.quiet); `lungzarr -v` shows them.
    apply_quiet_environ()
    with quiet_backend_startup():
        if precision == "fp32":
            _strict_fp32()
        model = _d8_network(precision)
    file_layers = read_theano_weights(path)
    model_layers = _conv_layers(model)
    if len(file_layers) != len(model_layers):
        raise LungzarrError(
            f"{str(path)!r} holds {len(file_layers)} convolution layers, the d8 network has "
            f"{len(model_layers)}. " + _FIX_WEIGHTS)
    for layer, (name, kernel, bias) in zip(model_layers, file_layers):
        keras_kernel = to_keras_kernel(kernel, flip=_flip_kernels)
        expected = tuple(layer.kernel.shape)
        if keras_kernel.shape != expected:
            raise LungzarrError(
                f"layer {name!r} of {str(path)!r} has kernel {kernel.shape!r}, which does not "
                f"fit d8 layer {layer.name!r} {expected!r}. " + _FIX_WEIGHTS)
        layer.set_weights([keras_kernel, bias])
    return model


_MODELS: dict = {}
_MODELS_LOCK = threading.Lock()


def get_model(weights=None, precision: str = "fp32"):
    """The d8 model for ``(weights, precision)``, built once per process.

    Dask workers call this inside their tasks, so each worker process builds
    the network and reads (and verifies) the weights once, whatever the number
    of chunks or patients it predicts.

    Parameters
    ----------
    weights, precision
        See :func:`build_d8`.

    Returns
    -------
    model : keras.Model
        Shared by every caller in the process; use :func:`model_lock` around
        ``predict`` when several threads may call it.
    """
    _check_precision(precision)
    key = (str(resolve_weights(weights)), precision)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = build_d8(weights=key[0], precision=precision)
            _MODELS[key] = model
    return model


_PREDICT_LOCKS: dict = {}


def model_lock(model) -> threading.Lock:
    """A lock that serialises ``predict`` calls on one shared model.

    Keras builds its predict function lazily on first use, which is not
    thread-safe; and a framework already spreads one call over every core, so
    two threads predicting at once gain nothing.
    """
    with _MODELS_LOCK:
        return _PREDICT_LOCKS.setdefault(id(model), threading.Lock())
