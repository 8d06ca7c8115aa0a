"""Quiet deep-learning start-up: TensorFlow/absl/XLA/gRPC banners hidden, real errors kept.

TensorFlow 2.21 prints about seven lines when it is imported (twice: two of
its libraries carry their own copy of absl), e.g. "Could not find cuda
drivers", "All log messages before absl::InitializeLog() ...", "rebuild
TensorFlow with the appropriate compiler flags", and on a machine with CUDA
libraries but no GPU ``E0000 ... cuda_platform.cc:52] failed call to cuInit``.
None of them is a problem, yet a new user reads them as one; and since absl
took over TensorFlow's logging, ``TF_CPP_MIN_LOG_LEVEL`` no longer silences
them (tensorflow/tensorflow#100442). So lungzarr

- sets the usual verbosity variables (:data:`QUIET_ENV`) where the user has
  not set them (:func:`quiet_environ`, also given to LocalCluster workers), and
- captures file descriptor 2 while the backend starts
  (:func:`quiet_backend_startup`) and writes back every line that is not one
  of the known start-up banners (:data:`STARTUP_NOISE`): an unexpected line,
  a real error, still reaches stderr.

``LUNGZARR_VERBOSE=1`` (``lungzarr -v``) turns both off.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager

__all__ = ["QUIET_ENV", "STARTUP_NOISE", "VERBOSE_ENV", "verbose", "quiet_environ", "apply_quiet_environ",
           "quiet_backend_startup", "is_startup_noise"]

#: Set to 1 (``lungzarr -v``) to see every start-up message of TensorFlow, absl, XLA and gRPC.
VERBOSE_ENV = "LUNGZARR_VERBOSE"

#: Verbosity variables and their quiet values; each is set only where the user has not set it.
#: TensorFlow's level 2 hides INFO and WARNING and keeps ERROR (honoured by the parts of TensorFlow
#: that still log through its own logger, and by older releases); gRPC's ERROR keeps errors.
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "GRPC_VERBOSITY": "ERROR",
}

#: Start-up lines that say nothing wrong (regular expressions, searched in each line).
STARTUP_NOISE = tuple(re.compile(p) for p in (
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers",
    r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags",
    r"port\.cc:\d+\] oneDNN custom operations are on",
    r"Unable to register cu(FFT|DNN|BLAS) factory: .* has already been registered",
    r"computation_placer\.cc:\d+\] computation placer already registered",
    r"TF-TRT Warning: Could not find TensorRT",
    r"cuda_executor\.cc:\d+\] could not open file to read NUMA node",
    r"gpu_device\.cc:\d+\] Cannot dlopen some GPU libraries",
    r"Skipping registering GPU devices",
))

#: Said on a machine without a usable GPU; kept where an NVIDIA device exists (there it is a real problem).
_NO_GPU_NOISE = re.compile(r"failed call to cuInit: .*(UNKNOWN ERROR \(303\)|CUDA_ERROR_NO_DEVICE|no CUDA-capable)")

_LOCK = threading.RLock()


def verbose() -> bool:
    """Whether the user asked for every message (``LUNGZARR_VERBOSE`` set and not 0)."""
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0", "false", "no")


def quiet_environ(environ=None) -> dict:
    """The :data:`QUIET_ENV` entries ``environ`` (default ``os.environ``) does not set; ``{}`` when verbose."""
    environ = os.environ if environ is None else environ
    if verbose() or str(environ.get(VERBOSE_ENV, "")).strip() not in ("", "0", "false", "no"):
        return {}
    return {k: v for k, v in QUIET_ENV.items() if k not in environ}


def apply_quiet_environ() -> None:
    """Put :func:`quiet_environ` into this process's environment (before the backend is imported)."""
    for key, value in quiet_environ().items():
        os.environ[key] = value


def _gpu_present() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def is_startup_noise(line: str, *, gpu_present: bool | None = None) -> bool:
    """Whether ``line`` is one of the known, harmless start-up messages."""
    if any(p.search(line) for p in STARTUP_NOISE):
        return True
    gpu_present = _gpu_present() if gpu_present is None else gpu_present
    return not gpu_present and bool(_NO_GPU_NOISE.search(line))


@contextmanager
def quiet_backend_startup():
    """Capture fd 2 during the block; write back every line but the known start-up banners.

    The C++ libraries write to the file descriptor, not to ``sys.stderr``, so
    the capture is at that level. Other threads' messages written meanwhile
    are delayed to the end of the block, not lost. Verbose, or when fd 2
    cannot be duplicated, the block runs as is.
    """
    if verbose():
        yield
        return
    with _LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):
            saved = None
        if saved is None:
            yield
            return
        with tempfile.TemporaryFile(mode="w+b") as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                try:
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                text = capture.read().decode("utf-8", "replace")
                kept = [line for line in text.splitlines(keepends=True) if not is_startup_noise(line)]
                if kept:
                    try:
                        os.write(2, "".join(kept).encode("utf-8", "replace"))
                    except OSError:
                        pass
