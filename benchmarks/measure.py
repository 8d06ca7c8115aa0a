"""Measuring helpers: resident memory and CPU time of processes, the machine's description."""
from __future__ import annotations

import os
import platform
import threading
import time
from contextlib import contextmanager

MB = 1e6


def machine() -> dict:
    """CPU count and model, memory, load average and versions (written with every result)."""
    import dask
    import numpy as np
    import psutil
    import scipy

    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import tensorflow as tf  # noqa: F401  only the version string
        tf_version = tf.__version__
    except Exception:  # pragma: no cover - TF is optional for the description
        tf_version = None
    return {"cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": model, "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__, "dask": dask.__version__,
            "tensorflow": tf_version, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


class Sampler:
    """Poll the resident memory of some processes every ``interval`` s; peaks per phase.

    ``pids`` maps a name ("main", "worker-0", ...) to a process id. Peaks are
    kept per phase (:meth:`phase`) and overall.
    """

    def __init__(self, pids: dict, interval: float = 0.05):
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval = interval
        self.current = None
        self.peaks: dict = {}  # phase -> {name: bytes}
        self.overall = {name: 0 for name in self.procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        for name, proc in self.procs.items():
            try:
                rss = proc.memory_info().rss
            except Exception:
                continue
            self.overall[name] = max(self.overall[name], rss)
            if self.current is not None:
                phase = self.peaks.setdefault(self.current, {})
                phase[name] = max(phase.get(name, 0), rss)

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def cpu_seconds(self, names=None) -> float:
        """User + system CPU seconds of the watched processes (all, or ``names``) so far, threads included."""
        total = 0.0
        for name, proc in self.procs.items():
            if names is not None and name not in names:
                continue
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except Exception:
                pass
        return total

    @contextmanager
    def phase(self, name):
        self._sample()
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self._sample()
            self.current = previous

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def peaks_mb(self, phase=None) -> dict:
        src = self.overall if phase is None else self.peaks.get(phase, {})
        return {name: round(v / MB, 1) for name, v in src.items()}
