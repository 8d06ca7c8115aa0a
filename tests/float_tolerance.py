"""Float32 tolerances of the d8 network, derived from its arithmetic rather than from one machine's luck.

Two float32 evaluations of d8 on the same windows -- another batch size, another engine (OpenVINO, ONNX
Runtime), another instruction set (oneDNN picks other kernels on AVX2 than on AVX-512), the folded
upsampling -- compute the same real function and differ only in rounding. How much they may differ follows
from the network's arithmetic, voxel by voxel, with the standard probabilistic model of rounding (Higham and
Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019):

* a convolution output is a sum of ``n = kz*ky*kx*c_in + 1`` terms (the bias is one); rounding each partial
  sum with the unit roundoff ``u = 2**-24`` by an independent error, uniform in ``[-u, u]``, the error of the
  sum has a variance of at most ``n * u**2 / 3 * (sum |w x|)**2``;
* the errors the layer's inputs carry pass through it as ``Var = sum w**2 Var_in`` (independent errors);
* a ReLU passes the variance where the pre-activation is above ``-12`` standard deviations and zeroes it
  elsewhere (both evaluations are then 0 exactly); max-pooling passes the largest variance of its window,
  upsampling and concatenation pass theirs unchanged;
* the sigmoid: ``sd_p = p (1 - p) sd_z + 2 u``: engines compute it to an absolute accuracy of about ``u``, not a
  relative one (TensorFlow's flushes p below ~1e-11 to 0, ONNX Runtime's is off by up to 5e-8 at tiny p).

The literal network (``fold_upsampling=False``) is walked: the folded form sums the same products in fewer
terms (``8 c_up + 27 c_skip <= 27 (c_up + c_skip)``; its folded weights carry one rounding more, i.e. one term
more at most), so the literal spread bounds both.

An evaluation is allowed :data:`LAMBDA` = 8 of these standard deviations from the exact function, times its
engine's :data:`ENGINE_SPREAD`; two evaluations may differ by the sum of their allowances (the triangle
inequality). Under a normal tail 8 sd are passed with probability 1e-15 per voxel; measured against a float64
evaluation of the same network (:func:`exact_prob`), ONNX Runtime, and Keras-TF on TensorFlow's own (Eigen)
kernels (``TF_ENABLE_ONEDNN_OPTS=0``), stay within 5.2 sd on the tests' windows, batch sizes 1 and 4 (the model
is a little optimistic: rounding errors are not quite independent), hence 8 rather than the 6 a normal tail
would need. Two engines run kernels of their own whose error is larger than plain summation's, and are allowed
twice as much:

* OpenVINO's CPU plugin: 11.7 sd on the synthetic windows, 9.1 on the LIDC slab's (AVX2);
* Keras-TF with oneDNN, TensorFlow's default on x86: its blocked ``brg_conv_fwd`` kernels reached 10.0 sd on the
  synthetic windows and 10.6 on the LIDC slab's on an AMD EPYC with AVX-512 (``ONEDNN_MAX_CPU_ISA=AVX2`` there:
  the same 10.0), where Eigen's kernels stay at 4.0 on the same windows; the tests passed at 8 sd on an
  AVX2-only EPYC, where oneDNN picks other blockings (2026-12-08).

A wrong window, row or slice moves a probability by 1e-2 or more, a thousand
times the tolerances here (1e-5 to 1e-4).

``tests/test_float_tolerance.py`` checks the model on every run of the suite: every engine installed stays
within its allowance of the float64 evaluation (a tolerance tighter than the measured noise fails there, on
whatever CPU runs the suite), and a window moved by one slice lies far outside it.
"""
from __future__ import annotations

import functools

import numpy as np

from lungzarr.volume import normalize_hu

#: Unit roundoff of float32 (round to nearest).
U = 2.0 ** -24
#: Standard deviations (of :func:`rounding_sd`) an evaluation may be from the exact function.
LAMBDA = 8.0
#: Each engine's allowance in units of LAMBDA standard deviations (module docstring).
ENGINE_SPREAD = {"keras": 2.0, "onnxruntime": 1.0, "openvino": 2.0}
#: Threshold below which lungzarr stores a probability as 0 (lungzarr.model.infer.THRESHOLD).
THRESHOLD = 0.5


def windows_of(hu: np.ndarray) -> np.ndarray:
    """Every 8-slice window ``(n, 8, h, w, 1)`` of an HU volume after the detection crop (as the original)."""
    nz, h, w = hu.shape
    images = normalize_hu(hu[:, h % 4:, w % 4:])
    return np.stack([images[i:i + 8] for i in range(nz - 8)])[..., np.newaxis]


def _conv(x, kernel):
    import keras

    return keras.ops.convert_to_numpy(keras.ops.conv(np.asarray(x, np.float32), np.asarray(kernel, np.float32),
                                                     padding="same"))


def rounding_sd(windows: np.ndarray, *, logits: bool = False) -> np.ndarray:
    """Standard deviation of one float32 evaluation's rounding error, per output voxel (the module's model).

    Returns an array shaped like the network's output ``(n, 1, h, w, 1)``: of the probability, or of the
    logit before the sigmoid with ``logits=True``.
    """
    import keras

    from lungzarr.model.d8 import get_model

    model = get_model(fold_upsampling=False)
    x = np.asarray(windows, np.float32)
    values = {id(model.inputs[0]): (x, np.zeros(x.shape, np.float32))}
    for layer in model.layers[1:]:
        inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        xs, vs = zip(*(values[id(t)] for t in inputs))
        kind = type(layer).__name__
        if kind == "Conv3D":
            # float32 is enough for a spread (its own rounding moves it by 1e-7 relative); variances of
            # 1e-20 and less are far above float32's smallest normal number (1e-38).
            kernel, bias = (np.asarray(w, np.float32) for w in layer.get_weights())
            n = int(np.prod(kernel.shape[:4])) + 1
            pre = _conv(xs[0], kernel) + bias
            magnitude = _conv(np.abs(xs[0]), np.abs(kernel)) + np.abs(bias)
            var = _conv(vs[0], kernel * kernel) + np.float32(n * U * U / 3) * magnitude * magnitude
            if layer.activation.__name__ == "relu":
                var = np.where(pre > -12 * np.sqrt(var), var, np.float32(0))
                out = np.maximum(pre, 0)
            elif layer.activation.__name__ == "linear":
                out = pre
            else:
                raise TypeError(f"no rounding rule for activation {layer.activation.__name__!r} of {layer.name!r}")
            values[id(layer.output)] = (out, var)
        elif kind in ("MaxPooling3D", "UpSampling3D"):
            values[id(layer.output)] = (keras.ops.convert_to_numpy(layer(xs[0])),
                                        keras.ops.convert_to_numpy(layer(vs[0])))
        elif kind == "Concatenate":
            values[id(layer.output)] = (keras.ops.convert_to_numpy(layer(list(xs))), np.concatenate(vs, axis=-1))
        elif kind == "Activation" and layer.name == "prob":
            z, var_z = xs[0].astype(np.float64), vs[0].astype(np.float64)
            if logits:
                return np.sqrt(var_z)
            p = 1.0 / (1.0 + np.exp(-z))
            return p * (1.0 - p) * np.sqrt(var_z) + 2 * U
        else:
            raise TypeError(f"no rounding rule for layer {layer.name!r} ({kind})")
    raise RuntimeError("the d8 network has no 'prob' layer")


def prob_tolerance(windows: np.ndarray, engines=("keras", "keras")) -> float:
    """Largest ``|p_a - p_b|`` two float32 evaluations of d8 on ``windows`` may show (module docstring).

    ``engines``: the engines of the two evaluations (:data:`ENGINE_SPREAD`); the same engine twice by default
    (another batch size, chunking, box or form).
    """
    sd_max = _max_rounding_sd(np.ascontiguousarray(windows, np.float32).tobytes(), tuple(windows.shape))
    return float(sum(LAMBDA * ENGINE_SPREAD[e] for e in engines) * sd_max)


@functools.lru_cache(maxsize=8)
def _max_rounding_sd(data: bytes, shape: tuple) -> float:
    return float(rounding_sd(np.frombuffer(data, np.float32).reshape(shape)).max())


def volume_tolerance(hu: np.ndarray, engines=("keras", "keras")) -> float:
    """:func:`prob_tolerance` of every window of an HU volume (the maps :func:`predict_nodule_prob` makes)."""
    return prob_tolerance(windows_of(hu), engines)


def assert_prob_maps_agree(got: np.ndarray, expected: np.ndarray, atol: float) -> None:
    """Two stored probability maps (``p >= 0.5`` kept, else 0) agree to ``atol``.

    Where ``expected`` lies within ``atol`` of the 0.5 threshold the other evaluation may fall on the other
    side of it: there one of the two may be 0 and the other at most ``0.5 + atol``; everywhere else
    ``|got - expected| <= atol``.
    """
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    diff = np.abs(got - expected)
    near = ((got == 0) & (expected < THRESHOLD + atol)) | ((expected == 0) & (got < THRESHOLD + atol))
    bad = (diff > atol) & ~near
    assert not bad.any(), (f"{int(bad.sum())} of {bad.size} probabilities differ by more than the float32 "
                           f"tolerance {atol:.3g}: max {diff[bad].max():.3g} at {np.argwhere(bad)[0].tolist()}")


def exact_prob(windows: np.ndarray) -> np.ndarray:
    """d8's probabilities computed in float64 (the literal network, the trained weights): the function every
    float32 evaluation approximates, to about 1e-15. For measuring an engine's own rounding."""
    import keras

    from lungzarr.model.d8 import get_model

    def conv64(x, kernel):
        return keras.ops.convert_to_numpy(keras.ops.conv(x, kernel, padding="same"))

    model = get_model(fold_upsampling=False)
    values = {id(model.inputs[0]): np.asarray(windows, np.float64)}
    for layer in model.layers[1:]:
        inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        xs = [values[id(t)] for t in inputs]
        kind = type(layer).__name__
        if kind == "Conv3D":
            kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
            out = conv64(xs[0], kernel) + bias
            if layer.activation.__name__ == "relu":
                out = np.maximum(out, 0)
        elif kind == "MaxPooling3D":
            (a, b, c), x = layer.pool_size, xs[0]  # 'valid' pooling, strides = pool size (d8's)
            n, z, y, w, ch = x.shape
            x = x[:, :z // a * a, :y // b * b, :w // c * c]
            out = x.reshape(n, z // a, a, y // b, b, w // c, c, ch).max(axis=(2, 4, 6))
        elif kind == "UpSampling3D":
            out = xs[0]
            for axis, k in zip((1, 2, 3), layer.size):
                out = np.repeat(out, k, axis=axis)
        elif kind == "Concatenate":
            out = np.concatenate(xs, axis=-1)
        elif kind == "Activation" and layer.name == "prob":
            return 1.0 / (1.0 + np.exp(-xs[0]))
        else:
            raise TypeError(f"no float64 rule for layer {layer.name!r} ({kind})")
        values[id(layer.output)] = out
    raise RuntimeError("the d8 network has no 'prob' layer")


def map_tolerance(hu: np.ndarray, maps, engines=("keras", "keras")) -> float:
    """:func:`prob_tolerance` for stored maps of ``hu`` (``predict_nodule_prob``'s), computed where it matters.

    Where every map stores 0 the maps agree exactly; elsewhere the spread of a voxel depends only on the
    inputs within the network's reach (:data:`lungzarr.model.geometry.LUNG_BOX_MARGIN`, measured by
    test_lung_box), so the windows are cut to the box around the maps' nonzero voxels that
    :func:`lungzarr.model.geometry.box_around` makes, and the spread there is the spread of the whole
    volume's windows at those voxels, for a fraction of the work.
    """
    from lungzarr.model.geometry import box_around, detection_crop

    nonzero = np.zeros(hu.shape, bool)
    for m in maps:
        nonzero |= np.asarray(m) > 0
    if not nonzero.any():
        return float(sum(LAMBDA * ENGINE_SPREAD[e] for e in engines) * 2 * U)
    where = np.nonzero(nonzero)
    bbox = [int(a.min()) for a in where] + [int(a.max()) + 1 for a in where]
    box = box_around(bbox, hu.shape)
    rows, cols = detection_crop(hu.shape)
    z0, z1 = bbox[0], bbox[3]  # the slices predicted: window s - 4 predicts slice s
    windows = windows_of(hu)[z0 - 4:z1 - 4, :, box["y"][0] - rows:box["y"][1] - rows,
                             box["x"][0] - cols:box["x"][1] - cols]
    return prob_tolerance(windows, engines)


def assert_nodule_tables_agree(a, b, maps, atol: float) -> None:
    """Nodule tables found on two maps that agree to ``atol`` (:func:`assert_prob_maps_agree`) agree.

    Probability columns (``prob_*``) to ``atol``; every other column comes from the voxels at p >= 0.5 and the
    HU, so it is equal -- unless a voxel of ``maps`` lies within ``atol`` of the threshold, where the two
    evaluations may decide it differently: then only the number of nodules is compared.
    """
    assert list(a.columns) == list(b.columns)
    flips = any(((np.asarray(m) > 0) & (np.asarray(m) <= THRESHOLD + atol)).any() for m in maps)
    if flips:
        assert len(a) == len(b), (len(a), len(b))
        return
    assert len(a) == len(b), (len(a), len(b))
    for col in a.columns:
        if col.startswith("prob_"):
            np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=0, atol=atol,
                                       err_msg=col)
        else:
            assert a[col].equals(b[col]), col
