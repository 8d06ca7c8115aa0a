"""The exported graphs' runtimes use the threads the process is given ($OMP_NUM_THREADS), with the same results."""
from __future__ import annotations

import numpy as np
import pytest

from lungzarr.model import engines


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), (" 2 ", 2), ("", None), ("0", None),
                                             ("-1", None), ("four", None), (None, None)])
def test_engine_threads_reads_omp_num_threads(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv(engines.THREADS_ENV, raising=False)
    else:
        monkeypatch.setenv(engines.THREADS_ENV, value)
    assert engines.engine_threads() == expected


def test_lungzarr_workers_are_started_single_threaded():
    # What engine_threads() reads on a LocalCluster worker: distributed's own default, which lungzarr keeps.
    from lungzarr.cluster import worker_environ

    assert str(worker_environ().get(engines.THREADS_ENV)) == "1"


@pytest.mark.skipif(not engines.engine_available("openvino"), reason="openvino is not installed")
def test_openvino_single_threaded_gives_the_same_probabilities(monkeypatch):
    rng = np.random.default_rng(1)
    windows = (rng.standard_normal((2, 8, 64, 64, 1)) * 0.3).astype(np.float32)
    probs = {}
    for threads in (None, "1", "2"):
        if threads is None:
            monkeypatch.delenv(engines.THREADS_ENV, raising=False)
        else:
            monkeypatch.setenv(engines.THREADS_ENV, threads)
        engine = engines.OpenVINOEngine()
        assert engine.threads == (None if threads is None else int(threads))
        if threads is not None:
            assert engine.compiled.get_property("INFERENCE_NUM_THREADS") == int(threads)
        probs[threads] = engine.predict(windows, batch_size=2)
    # Bit for bit: each output is computed by one thread whatever the number of threads.
    assert np.array_equal(probs["1"], probs[None])
    assert np.array_equal(probs["2"], probs[None])
