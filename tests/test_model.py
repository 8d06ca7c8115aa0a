"""The d8 network, its legacy Theano weights and the kernel flip (docs/algorithms.md §5)."""
from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from lungzarr.errors import LungzarrError
from lungzarr.model import d8 as d8
from lungzarr.volume import normalize_hu

from conftest import DSB_PATIENT, DSB_WINDOWS, REPO
from float_tolerance import prob_tolerance

WEIGHTS = REPO / "models" / "d8_2x2x2_best_weights.h5"


@pytest.fixture(scope="module")
def trained():
    return d8.get_model()


@pytest.fixture(scope="module")
def unflipped():
    return d8.build_d8(_flip_kernels=False)


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u) for float32 (unit roundoff u = 2**-24)."""
    u = 2.0 ** -24
    return n * u / (1 - n * u)


def _true_convolution(x, kernel, bias):
    """Theano's conv3d with border 'same', by scipy: x (z, y, x, in), kernel (out, in, kz, ky, kx)."""
    out = np.zeros(x.shape[:3] + (kernel.shape[0],), dtype=np.float64)
    for o in range(kernel.shape[0]):
        for i in range(kernel.shape[1]):
            # ndimage.convolve is a true convolution (it mirrors the kernel),
            # centred for odd sizes, with zeros outside: Theano's 'same' border.
            out[..., o] += ndimage.convolve(x[..., i].astype(np.float64),
                                            kernel[o, i].astype(np.float64),
                                            mode="constant", cval=0.0)
        out[..., o] += bias[o]
    return out


# --------------------------------------------------------------------------- file reader
def test_read_theano_weights_layer_order_and_shapes():
    layers = d8.read_theano_weights(WEIGHTS)
    names = [name for name, _, _ in layers]
    assert names == [f"convolution3d_{i}" for i in range(18, 33)]
    shapes = [kernel.shape for _, kernel, _ in layers]
    assert shapes[0] == (20, 1, 3, 3, 3)
    assert shapes[6] == (40, 120, 3, 3, 3)  # [upsampled 80, skip 40]
    assert shapes[8] == (20, 60, 3, 3, 3)   # [upsampled 40, skip 20]
    assert shapes[10] == (40, 20, 3, 1, 1)
    assert shapes[-1] == (1, 40, 1, 1, 1)
    assert all(bias.shape == (kernel.shape[0],) for _, kernel, bias in layers)


def test_to_keras_kernel_transposes_and_flips():
    kernel = np.arange(2 * 3 * 3 * 1 * 2, dtype=np.float32).reshape(2, 1, 3, 3, 2)
    flipped = d8.to_keras_kernel(kernel)
    plain = d8.to_keras_kernel(kernel, flip=False)
    assert flipped.shape == plain.shape == (3, 3, 2, 1, 2)
    assert plain[0, 1, 1, 0, 1] == kernel[1, 0, 0, 1, 1]
    assert flipped[0, 1, 1, 0, 1] == kernel[1, 0, 2, 1, 0]
    with pytest.raises(ValueError, match="5-D"):
        d8.to_keras_kernel(kernel[0])


def test_unflipped_weights_have_no_public_switch():
    public = {name for name in inspect.signature(d8.build_d8).parameters if not name.startswith("_")}
    assert public == {"weights", "precision", "fold_upsampling"}
    assert set(inspect.signature(d8.get_model).parameters) == {"weights", "precision", "fold_upsampling"}


# --------------------------------------------------------------------------- framework-free proof of the flip
@pytest.mark.parametrize("layer_index, layer_name, in_shape", [
    (0, "down1_conv1", (8, 12, 16, 1)),    # the first layer, 3x3x3
    (10, "zconv1a", (4, 6, 5, 20)),        # a z-only (3,1,1) layer
])
def test_layer_equals_numpy_true_convolution(trained, layer_index, layer_name, in_shape):
    import keras

    name, kernel, bias = d8.read_theano_weights(WEIGHTS)[layer_index]
    rng = np.random.default_rng(layer_index)
    x = rng.normal(0.3, 0.5, in_shape).astype(np.float32)
    layer = trained.get_layer(layer_name)
    got = keras.ops.convert_to_numpy(layer(x[np.newaxis]))[0]
    pre_relu = _true_convolution(x, kernel, bias)
    expected = np.maximum(pre_relu, 0)
    # The test must be able to fail: a good share of outputs on both sides of the ReLU.
    assert 0.1 < (pre_relu > 0).mean() < 0.9
    # float32 against float64: a sum of n products in float32 is within gamma_n * sum |w x| of the exact
    # sum (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), whatever the order or the kernel.
    n = int(np.prod(kernel.shape[1:])) + 1
    bound = _gamma(n) * (_true_convolution(np.abs(x), np.abs(kernel), np.abs(bias)))
    assert np.all(np.abs(got - expected) <= bound)

    # Without the flip the same layer computes something else.
    plain = _true_convolution(x, kernel[:, :, ::-1, ::-1, ::-1], bias)
    assert np.abs(np.maximum(plain, 0) - expected).max() > 1e-2


# --------------------------------------------------------------------------- the folded upsampling
def _upsample2(x):
    return x.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 1), (4, 6, 2)])
def test_folded_kernel_is_the_upsampled_convolution_in_numpy(shape):
    # Framework-free: a 3x3x3 'same' cross-correlation (scipy, zero border) of the 2x nearest-neighbour
    # upsampling equals the eight folded 2x2x2 kernels applied to the small volume, in float64.
    rng = np.random.default_rng(sum(shape))
    cin, cout = 3, 2
    x = rng.normal(size=shape + (cin,))
    kernel = rng.normal(size=(3, 3, 3, cin, cout))
    expected = np.zeros(tuple(2 * n for n in shape) + (cout,))
    for o in range(cout):
        for i in range(cin):
            expected[..., o] += ndimage.correlate(_upsample2(x[..., i]), kernel[..., i, o], mode="constant")
    folded = d8.fold_upsampling_kernel(kernel)
    assert folded.shape == (2, 2, 2, cin, 8 * cout)
    padded = np.pad(x, [(1, 1)] * 3 + [(0, 0)])
    got = np.zeros_like(expected)
    for pz in (0, 1):
        for py in (0, 1):
            for px in (0, 1):
                g = 4 * pz + 2 * py + px
                k = folded[..., g * cout:(g + 1) * cout]
                for a in range(shape[0]):
                    for b in range(shape[1]):
                        for c in range(shape[2]):
                            patch = padded[a + pz:a + pz + 2, b + py:b + py + 2, c + px:c + px + 2]
                            got[2 * a + pz, 2 * b + py, 2 * c + px] = np.einsum("zyxi,zyxio->o", patch, k)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # The identity needs the right taps: the other phase's kernels give something else.
    assert np.abs(d8.fold_upsampling_kernel(kernel[::-1])[..., :cout] - folded[..., :cout]).max() > 1e-3
    with pytest.raises(ValueError, match="3, 3, 3"):
        d8.fold_upsampling_kernel(kernel[:2])


def test_folded_layer_equals_the_literal_layers():
    import keras

    rng = np.random.default_rng(7)
    low = rng.normal(0.2, 1.0, (2, 2, 5, 3, 6)).astype(np.float32)
    skip = rng.normal(0.2, 1.0, (2, 4, 10, 6, 4)).astype(np.float32)
    kernel = rng.normal(0, 0.3, (3, 3, 3, 10, 5)).astype(np.float32)
    bias = rng.normal(0, 0.3, (5,)).astype(np.float32)
    folded = d8._folded_upsample_conv3d()(5, up_channels=6, skip_channels=4)
    folded.set_weights([kernel, bias])
    conv = keras.layers.Conv3D(5, 3, padding="same", activation="relu")
    conv.build((None, 4, 10, 6, 10))
    conv.set_weights([kernel, bias])
    merged = np.concatenate([_upsample2(low.transpose(1, 2, 3, 4, 0)).transpose(4, 0, 1, 2, 3), skip], axis=-1)
    expected = keras.ops.convert_to_numpy(conv(merged))
    got = keras.ops.convert_to_numpy(folded(low, skip))
    assert 0.2 < (expected > 0).mean() < 0.8
    # Two float32 sums of the same products (the folded kernel's taps are themselves sums of up to 8
    # float32 weights: 7 more roundings at most): each within gamma_n * sum |w x| of the exact value.
    magnitude = keras.ops.convert_to_numpy(keras.ops.conv(np.abs(merged), np.abs(kernel), padding="same"))
    magnitude = magnitude + np.abs(bias)
    bound = (_gamma(27 * 10 + 1) + _gamma(27 * 10 + 8)) * magnitude
    assert np.all(np.abs(got - expected) <= bound)


def test_multiply_adds_are_the_spec_cost_and_the_fold_saves_a_fifth(trained):
    literal = d8.get_model(fold_upsampling=False)
    per_window = d8.multiply_adds(literal, 168, 168)
    assert per_window == 754_360 * 168 * 168
    # docs/algorithms.md §5: 6.05 TFLOP for a typical patient, 142 windows of 168 x 168.
    assert round(2 * 142 * per_window / 1e12, 2) == 6.05
    folded = d8.multiply_adds(trained, 168, 168)
    assert 0.78 < folded / per_window < 0.81


@pytest.mark.requires_shared
def test_folded_and_literal_networks_make_the_same_decisions(dsb_dir, trained):
    literal = d8.build_d8(fold_upsampling=False)
    assert [layer.name for layer in d8._conv_layers(literal)] == [layer.name for layer in d8._conv_layers(trained)]
    assert literal.count_params() == trained.count_params()
    images, _ = _dsb_windows(dsb_dir)
    # Windows through the patient's candidates (p >= 0.5 voxels on both sides of the threshold); the windows
    # test_engines compares too, so their float32 spread (tests/float_tolerance.py) is computed once.
    x = np.stack([images[i:i + 8] for i in DSB_WINDOWS])[..., np.newaxis]
    a = literal.predict(x, batch_size=4, verbose=0)
    b = trained.predict(x, batch_size=4, verbose=0)
    dp = float(np.abs(a - b).max())
    print(f"\nfolded vs literal d8, DSB2017 windows {DSB_WINDOWS}: max |dp| {dp:.2e}, "
          f"p >= 0.5 voxels {int((a >= 0.5).sum())}")
    tolerance = prob_tolerance(x)  # float32 rounding of another summation order (tests/float_tolerance.py)
    assert (a >= 0.5).sum() > 50
    assert np.array_equal((a >= 0.5)[np.abs(a - 0.5) > tolerance], (b >= 0.5)[np.abs(a - 0.5) > tolerance])
    assert 0 < dp <= tolerance  # another summation order, not another function


def test_architecture_shapes(trained):
    assert trained.count_params() == sum(k.size + b.size for _, k, b in d8.read_theano_weights(WEIGHTS))
    x = np.zeros((2, 8, 12, 20, 1), dtype=np.float32)
    y = trained.predict(x, verbose=0)
    assert y.shape == (2, 1, 12, 20, 1)
    assert y.dtype == np.float32
    assert np.all((y >= 0) & (y <= 1))


def test_get_model_is_built_once_per_process(trained):
    assert d8.get_model() is trained
    assert d8.get_model(WEIGHTS, "fp32") is trained
    with pytest.raises(ValueError, match="precision"):
        d8.get_model(precision="fp8")


# --------------------------------------------------------------------------- weights registry
def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere.h5"
    with pytest.raises(LungzarrError) as err:
        d8.build_d8(weights=missing)
    message = str(err.value)
    assert str(missing) in message
    assert d8.WEIGHTS_SHA256 in message
    assert d8.WEIGHTS_ENV in message


def test_damaged_weights_file_is_a_clear_error(tmp_path):
    damaged = tmp_path / "d8.h5"
    data = bytearray(WEIGHTS.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(LungzarrError) as err:
        d8.verify_weights(damaged)
    message = str(err.value)
    assert str(damaged) in message and d8.WEIGHTS_SHA256 in message and "damaged" in message


def test_weights_resolution_order(tmp_path, monkeypatch):
    copy = tmp_path / "copy.h5"
    shutil.copyfile(WEIGHTS, copy)
    monkeypatch.delenv(d8.WEIGHTS_ENV, raising=False)
    assert d8.resolve_weights() == d8.DEFAULT_WEIGHTS
    assert d8.verify_weights() == WEIGHTS.resolve()
    monkeypatch.setenv(d8.WEIGHTS_ENV, str(copy))
    assert d8.verify_weights() == copy.resolve()
    assert d8.resolve_weights(WEIGHTS) == WEIGHTS.resolve()
    monkeypatch.setenv(d8.WEIGHTS_ENV, str(tmp_path / "gone.h5"))
    with pytest.raises(LungzarrError, match="gone.h5"):
        d8.verify_weights()


# --------------------------------------------------------------------------- the refactor's maps
def _dsb_windows(dsb_dir):
    segmented = np.load(dsb_dir / "input" / "stage1_segmented_2x2x2" / f"{DSB_PATIENT}.npz")["arr_0"]
    mpred = np.load(dsb_dir / "input" / "stage1_2x2x2_mpred3_8" / f"{DSB_PATIENT}.npz")["arr_0"]
    box = pd.read_csv(dsb_dir / "input" / "stage1_2x2x2_mpred3_8" / f"{DSB_PATIENT}.csv", index_col=0)
    by_min, by_max = int(box.loc[DSB_PATIENT, "by_min"]), int(box.loc[DSB_PATIENT, "by_max"])
    bx_min, bx_max = int(box.loc[DSB_PATIENT, "bx_min"]), int(box.loc[DSB_PATIENT, "bx_max"])
    # The crop box is the detection crop of §5 (first H mod 4 rows, W mod 4 columns).
    assert (by_min, bx_min) == (segmented.shape[1] % 4, segmented.shape[2] % 4)
    images = normalize_hu(segmented[:, by_min:by_max, bx_min:bx_max])
    assert mpred.shape == (images.shape[0] - 8, 1, 1) + images.shape[1:]
    return images, mpred[:, 0, 0]


def _compare_to_refactor(model, images, reference, windows):
    """Agreement of the p > 0.5 decisions with the refactor's maps on ``windows``."""
    x = np.stack([images[i:i + 8] for i in windows])[..., np.newaxis]
    prob = model.predict(x, batch_size=4, verbose=0)[:, 0, :, :, 0]
    ours, ref = prob > 0.5, reference[windows] > 0.5
    both = ours & ref
    return {
        "agreement": float((ours == ref).mean()),
        "mismatches": int((ours != ref).sum()),
        "ours": int(ours.sum()), "refactor": int(ref.sum()),
        # share of our p > 0.5 voxels that the refactor has too
        "precision": float(both.sum() / max(1, ours.sum())),
        "largest_difference_where_both": float(np.abs(prob - reference[windows])[both].max())
        if both.any() else 0.0,
        "largest_difference": float(np.abs(np.where(prob < 0.5, 0, prob) - reference[windows]).max()),
    }


def _report(label, stats):
    return (f"{label}: agreement of p>0.5 {stats['agreement']:.5%} ({stats['mismatches']} voxels "
            f"differ), p>0.5 voxels ours {stats['ours']} / refactor {stats['refactor']}, "
            f"precision {stats['precision']:.3f}, largest |dp| where both >0.5 "
            f"{stats['largest_difference_where_both']:.4f}, largest |dp| {stats['largest_difference']:.4f}")


@pytest.mark.requires_shared
def test_unflipped_kernels_reproduce_refactor_maps_at_its_nodule(dsb_dir, unflipped, trained, capsys):
    images, reference = _dsb_windows(dsb_dir)
    # Four windows through the middle of the refactor's one candidate (137-148 here).
    windows = np.unique(np.nonzero(reference > 0.5)[0])[2:10:2]
    assert windows.size >= 3
    plain = _compare_to_refactor(unflipped, images, reference, windows)
    flipped = _compare_to_refactor(trained, images, reference, windows)
    with capsys.disabled():
        print(f"\nmpred, windows {windows.tolist()}: " + _report("un-flipped", plain)
              + "; " + _report("flipped", flipped))
    # The stand-in input lacks the tissue outside the lungs, which lowers the
    # probabilities around this juxtapleural candidate (fewer voxels > 0.5), but
    # with the refactor's un-flipped kernels every voxel we mark is one it marked.
    assert plain["agreement"] >= 0.998
    assert plain["precision"] >= 0.95
    assert plain["ours"] >= 0.3 * plain["refactor"]
    # The true (flipped) network draws a different candidate.
    assert flipped["precision"] < 0.9


@pytest.mark.slow
@pytest.mark.requires_shared
def test_unflipped_kernels_reproduce_refactor_maps_full_volume(dsb_dir, unflipped, trained, capsys):
    images, reference = _dsb_windows(dsb_dir)
    windows = np.arange(reference.shape[0])
    plain = _compare_to_refactor(unflipped, images, reference, windows)
    flipped = _compare_to_refactor(trained, images, reference, windows)
    with capsys.disabled():
        print("\nmpred, full volume: " + _report("un-flipped", plain) + "; " + _report("flipped", flipped))
    # docs/algorithms.md §5: 99.995 % of the p > 0.5 decisions agree on the stand-in.
    assert plain["agreement"] >= 0.99994
    assert plain["precision"] >= 0.8


# --------------------------------------------------------------------------- other Keras backends
_BACKEND_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    from lungzarr.model.d8 import build_d8
    assert keras.backend.backend() == sys.argv[1], keras.backend.backend()
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], np.asarray(build_d8().predict(x, verbose=0)))
""")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_same_model_on_another_backend(backend, trained, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"KERAS_BACKEND={backend} not tested: {backend} is not installed in this "
                    f"environment (it is optional; the GPU machines have it)")
    rng = np.random.default_rng(5)
    x = normalize_hu(rng.integers(-1100, 300, (2, 8, 16, 12, 1)))
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, KERAS_BACKEND=backend)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _BACKEND_SCRIPT, backend, str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(tmp_path / "y.npy")
    expected = trained.predict(x, verbose=0)
    # Another backend's kernels: another summation order (tests/float_tolerance.py).
    np.testing.assert_allclose(got, expected, atol=prob_tolerance(x), rtol=0)


def test_a_shipped_copy_whose_worker_has_gone_is_forgotten_not_opened(tmp_path, monkeypatch):
    """An in-process worker (a closed LocalCluster(processes=False)) leaves its copy's path in this process:
    once its folder is removed, tasks use the client's verified file (plain or ShippedWeights.source)."""
    from lungzarr.model import shipping
    from lungzarr.model.d8 import WEIGHTS_SHA256, verify_weights

    real = str(verify_weights(None))
    monkeypatch.setitem(shipping._SHIPPED, WEIGHTS_SHA256, tmp_path / "gone" / "d8.h5")
    assert shipping.task_weights(real) == real
    assert shipping.task_weights(shipping.ShippedWeights(WEIGHTS_SHA256, real)) == real
    assert WEIGHTS_SHA256 not in shipping._SHIPPED
    present = tmp_path / "d8.h5"
    present.write_bytes(b"")
    shipping._SHIPPED[WEIGHTS_SHA256] = present
    assert shipping.task_weights(shipping.ShippedWeights(WEIGHTS_SHA256, real)) == str(present)
