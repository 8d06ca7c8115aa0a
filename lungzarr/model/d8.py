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

Two forms of the one network (``fold_upsampling``): the literal layer sequence
of the original (nearest-neighbour ``UpSampling3D``, ``Concatenate``,
``Conv3D``), and the default, in which each upsampling is folded into the
convolution that follows it (:func:`fold_upsampling_kernel`): the same
function with 20 % fewer multiply-adds, the same weights and layer names.

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
    "fold_upsampling_kernel",
    "multiply_adds",
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


# --------------------------------------------------------------------------- folded upsampling
#: ``_FOLD_TAPS[p]`` maps a 3-tap kernel axis onto the 2 taps that output phase ``p``
#: (even ``p = 0``, odd ``p = 1``) of a nearest-neighbour upsampling by 2 reads.
_FOLD_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],
                       [[1, 1, 0], [0, 0, 1]]], dtype=np.float32)


def fold_upsampling_kernel(kernel, *, xp=np):
    """The eight 2 x 2 x 2 kernels that apply a 3 x 3 x 3 kernel to a 2x nearest-neighbour upsampling.

    With ``u = upsample2(x)`` (each voxel repeated twice along z, y and x) and
    a cross-correlation ``k`` of size 3 with a zero border of 1 ("same"), the
    output at ``2a + p`` along an axis reads ``u[2a + p - 1 .. 2a + p + 1]``,
    which are ``x[a - 1], x[a], x[a]`` for the even phase ``p = 0`` and
    ``x[a], x[a], x[a + 1]`` for the odd one: a 2-tap kernel on ``x`` itself,
    ``(k0, k1 + k2)`` over ``x[a - 1 .. a]`` or ``(k0 + k1, k2)`` over
    ``x[a .. a + 1]``. The zero border of ``u`` is the upsampled zero border of
    ``x``, so the identity holds at the edges too. Over three axes: 8 phases of
    8 taps instead of 27 taps on 8 times the voxels, 27/8 = 3.4x fewer
    multiply-adds for the upsampled inputs. It is exact in real arithmetic; in
    float32 only the order of the additions changes.

    Parameters
    ----------
    kernel : array, shape (3, 3, 3, in, out)
        A Keras ``Conv3D`` kernel (cross-correlation), applied to the upsampled input.
    xp : module, optional
        ``numpy`` (default) or ``keras.ops``, for use inside a model.

    Returns
    -------
    array, shape (2, 2, 2, in, 8 * out)
        Phase ``(pz, py, px)`` in output channels ``g * out .. (g + 1) * out``,
        ``g = 4 pz + 2 py + px``. Applied by a valid cross-correlation to ``x``
        padded with one zero on every side, phase ``p`` of an axis is the
        result's positions ``p .. p + n - 1`` (see ``_d8_network``).
    """
    if tuple(kernel.shape[:3]) != (3, 3, 3):
        raise ValueError(f"kernel must be (3, 3, 3, in, out), got shape {tuple(kernel.shape)!r}")
    taps = _FOLD_TAPS if xp is np else xp.convert_to_tensor(_FOLD_TAPS, dtype=kernel.dtype)
    return xp.concatenate([xp.einsum("az,by,cx,zyxio->abcio", taps[pz], taps[py], taps[px], kernel)
                           for pz in (0, 1) for py in (0, 1) for px in (0, 1)], axis=-1)


_FOLDED_LAYER = None


def _folded_upsample_conv3d():
    """The ``FoldedUpsampleConv3D`` layer class (defined on first use: Keras loads lazily)."""
    global _FOLDED_LAYER
    if _FOLDED_LAYER is not None:
        return _FOLDED_LAYER
    import keras
    from keras import ops

    class FoldedUpsampleConv3D(keras.layers.Layer):
        """``relu(Conv3D_same(concat[upsample2(low), skip]))`` without the upsampled tensor.

        Its weights are those of that ``Conv3D``: ``kernel (3, 3, 3, up + skip, filters)``
        and ``bias``; the upsampled part of the kernel is folded (:func:`fold_upsampling_kernel`)
        at each call, so loading, counting and exporting the weights is unchanged.
        """

        def __init__(self, filters, *, up_channels, skip_channels, **kwargs):
            super().__init__(**kwargs)
            self.filters, self.up_channels, self.skip_channels = int(filters), int(up_channels), int(skip_channels)
            self.kernel = self.add_weight(shape=(3, 3, 3, self.up_channels + self.skip_channels, self.filters),
                                          initializer="glorot_uniform", name="kernel")
            self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")

        def call(self, low, skip):
            kernel = ops.cast(self.kernel, self.compute_dtype)
            folded = fold_upsampling_kernel(kernel[:, :, :, :self.up_channels], xp=ops)
            q = ops.conv(ops.pad(low, [[0, 0], [1, 1], [1, 1], [1, 1], [0, 0]]), folded, padding="valid")
            shape = ops.shape(low)
            n, nz, ny, nx, c = shape[0], shape[1], shape[2], shape[3], self.filters
            phases = [q[:, pz:pz + nz, py:py + ny, px:px + nx, g * c:(g + 1) * c]
                      for g, (pz, py, px) in enumerate((pz, py, px) for pz in (0, 1) for py in (0, 1) for px in (0, 1))]
            # (n, z, y, x, pz, py, px, c) -> (n, z, pz, y, py, x, px, c): phase p of voxel a is output 2a + p.
            up = ops.reshape(ops.stack(phases, axis=4), (n, nz, ny, nx, 2, 2, 2, c))
            up = ops.reshape(ops.transpose(up, (0, 1, 4, 2, 5, 3, 6, 7)), (n, 2 * nz, 2 * ny, 2 * nx, c))
            skipped = ops.conv(skip, kernel[:, :, :, self.up_channels:], padding="same")
            return ops.relu(up + skipped + ops.cast(self.bias, self.compute_dtype))

        def compute_output_shape(self, low_shape, skip_shape):
            return tuple(skip_shape[:-1]) + (self.filters,)

    _FOLDED_LAYER = FoldedUpsampleConv3D
    return _FOLDED_LAYER


# --------------------------------------------------------------------------- network
def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)!r}, got {precision!r}")
    return PRECISIONS[precision]


def _d8_network(precision: str = "fp32", *, fold_upsampling: bool = True):
    """The untrained d8 network (layers named after their role, not the file).

    ``fold_upsampling``: each nearest-neighbour upsampling, its concatenation and
    the convolution after them are one ``FoldedUpsampleConv3D`` (same weights,
    same name as that convolution); else the literal layers of the original.
    """
    import keras
    from keras import layers

    policy = keras.DTypePolicy(_check_precision(precision))

    def conv(x, filters, kernel, name, activation="relu"):
        return layers.Conv3D(filters, kernel, padding="same", activation=activation,
                             dtype=policy, name=name)(x)

    def pool(x, size, name):
        return layers.MaxPooling3D(pool_size=size, dtype=policy, name=name)(x)

    def up_conv(low, skip, filters, name, up_name, concat_name):
        # Concatenation order [upsampled, skip], as the original's merge (§5).
        if fold_upsampling:
            return _folded_upsample_conv3d()(filters, up_channels=low.shape[-1], skip_channels=skip.shape[-1],
                                             dtype=policy, name=name)(low, skip)
        merged = layers.Concatenate(axis=-1, dtype=policy, name=concat_name)(
            [layers.UpSampling3D(2, dtype=policy, name=up_name)(low), skip])
        return conv(merged, filters, 3, name)

    inputs = keras.Input((WINDOW, None, None, 1), name="window")
    c1 = conv(inputs, 20, 3, "down1_conv1")
    c1 = conv(c1, 20, 3, "down1_conv2")
    c2 = conv(pool(c1, 2, "down1_pool"), 40, 3, "down2_conv1")
    c2 = conv(c2, 40, 3, "down2_conv2")
    c4 = conv(pool(c2, 2, "down2_pool"), 80, 3, "bottom_conv1")
    c4 = conv(c4, 80, 3, "bottom_conv2")
    c6 = up_conv(c4, c2, 40, "up1_conv1", "up1_upsample", "up1_concat")
    c6 = conv(c6, 40, 3, "up1_conv2")
    c7 = up_conv(c6, c1, 20, "up2_conv1", "up2_upsample", "up2_concat")
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
    """The layers that hold a convolution kernel, in the order of the weights file."""
    return [layer for layer in model.layers if getattr(layer, "kernel", None) is not None]


def build_d8(*, weights=None, precision: str = "fp32", fold_upsampling: bool = True, _flip_kernels: bool = True):
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
    fold_upsampling : bool, optional
        Fold each 2x nearest-neighbour upsampling into the convolution after it
        (:func:`fold_upsampling_kernel`; default): the same function and
        weights with 20 % fewer multiply-adds; probabilities equal to float32
        rounding (max |dp| 2e-5 on the real windows of ``benchmarks engines``,
        the same p >= 0.5 voxels). False builds the original's literal layers.

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
        model = _d8_network(precision, fold_upsampling=fold_upsampling)
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


def multiply_adds(model, height: int, width: int) -> int:
    """Multiply-adds of ``model``'s convolutions for one 8-slice window of ``height`` x ``width``.

    Counted from the layers themselves (each kernel's shape and the shape of
    what it computes, from one call on zeros): a ``Conv3D`` costs its output
    voxels x kernel volume x in x out channels; a folded upsampling
    convolution its folded 2 x 2 x 2 kernels on the padded small grid
    (``n + 1`` positions per axis) plus the 3 x 3 x 3 one on the skip input.
    The literal network at 168 x 168 gives 142 windows x 2 x this = the
    6.05 TFLOP per typical patient of docs/algorithms.md §5.
    """
    import keras

    layers = _conv_layers(model)
    probe = keras.Model(model.inputs[0], [layer.output for layer in layers])
    outputs = probe(np.zeros((1, WINDOW, int(height), int(width), 1), np.float32))
    total = 0
    for layer, out in zip(layers, outputs):
        out = tuple(int(n) for n in out.shape[1:4])
        kz, ky, kx, cin, cout = (int(n) for n in layer.kernel.shape)
        if isinstance(layer, keras.layers.Conv3D):
            total += int(np.prod(out)) * kz * ky * kx * cin * cout
        else:  # FoldedUpsampleConv3D
            small = [n // 2 + 1 for n in out]
            total += int(np.prod(small)) * 8 * layer.up_channels * 8 * cout
            total += int(np.prod(out)) * 27 * layer.skip_channels * cout
    return total


_MODELS: dict = {}
_MODELS_LOCK = threading.Lock()


def get_model(weights=None, precision: str = "fp32", fold_upsampling: bool = True):
    """The d8 model for ``(weights, precision, fold_upsampling)``, built once per process.

    Dask workers call this inside their tasks, so each worker process builds
    the network and reads (and verifies) the weights once, whatever the number
    of chunks or patients it predicts.

    Parameters
    ----------
    weights, precision, fold_upsampling
        See :func:`build_d8`.

    Returns
    -------
    model : keras.Model
        Shared by every caller in the process; use :func:`model_lock` around
        ``predict`` when several threads may call it.
    """
    _check_precision(precision)
    key = (str(resolve_weights(weights)), precision, bool(fold_upsampling))
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = build_d8(weights=key[0], precision=precision, fold_upsampling=key[2])
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
