"""What the benchmark commands share: child processes, the synthetic cohort, results files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
#: The pipeline's stages that the synthetic-cohort benchmarks time, in order (``--stages`` takes a prefix).
STAGES = ("ingest", "segment", "detect", "nodules", "features")


def warm_model(engine: str = "keras", fold_upsampling: bool = True):
    """Load ``engine`` (Keras: import TensorFlow, build the d8 model) and run one tiny predict, before timing."""
    import numpy as np

    from lungzarr.model.engines import get_engine, resolve_engine

    t0 = time.perf_counter()
    get_engine(resolve_engine(engine), fold_upsampling=fold_upsampling).predict(np.zeros((1, 8, 32, 32, 1), np.float32))
    return time.perf_counter() - t0


def preimport():
    """Import what the stages use before any timing (one-off costs are not per-patient costs)."""
    import pandas  # noqa: F401
    import pydicom  # noqa: F401
    import xarray  # noqa: F401

    import lungzarr.algorithms.crop  # noqa: F401
    import lungzarr.algorithms.features  # noqa: F401
    import lungzarr.algorithms.nodules  # noqa: F401
    import lungzarr.algorithms.resample  # noqa: F401
    import lungzarr.algorithms.segment  # noqa: F401
    import lungzarr.io.dicom  # noqa: F401
    import lungzarr.io.store  # noqa: F401


def spawn(kind: str, args: dict, *, env_extra: dict | None = None) -> dict:
    """Run one variant in a fresh Python process; its JSON result."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TF_CPP_MIN_LOG_LEVEL": "2", **(env_extra or {})}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "_child", kind, json.dumps(args)],
                          capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - t0
    return result


def make_cohort(work: Path, n: int, *, small: bool, prefix: str = "SYN"):
    from benchmarks.cohort import cohort_specs, write_cohort

    specs = cohort_specs(n, small=small, prefix=prefix)
    t0 = time.perf_counter()
    sizes = write_cohort(specs, work / "input")
    print(f"cohort: {n} patient(s), {sum(sizes.values()) / 1e6:.0f} MB of DICOM, written in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return specs, sizes


def remove_unless_kept(work) -> None:
    """Remove a benchmark's temporary folder, or keep it (and say where) when ``LZ_KEEP`` is set."""
    if os.environ.get("LZ_KEEP"):
        print("kept", work)
    else:
        shutil.rmtree(work, ignore_errors=True)


def rounded(x, n=3):
    return None if x is None else round(float(x), n)


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def add_cohort_options(p, workers=2):
    """The options of a command that runs the pipeline on a synthetic cohort."""
    p.add_argument("--small", action="store_true", help="256 x 256 x 60 slices of 2.5 mm (quick)")
    p.add_argument("--workers", type=int, default=workers)
    p.add_argument("--batch-size", type=int, default=4, help="patients in flight (pipeline batch_size)")
    p.add_argument("--chunk-slices", type=int, default=16)
    p.add_argument("--workdir", default=None, help="where the temporary cohort goes")
    p.add_argument("--name", default=None, help="results/<name>.json")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                   help="a prefix of the stages (e.g. ingest segment: no UNet, say so)")
