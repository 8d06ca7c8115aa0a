"""INPUT on object storage: reading by URL vs a local folder vs copying the objects to disk first.

Starts a moto S3 server on loopback (``python -m moto.server``, stopped at the
end), uploads the shared LIDC-IDRI-0001 and RICORD slabs and RICORD's ``hu``
written as ``.nii``, ``.nii.gz`` and ``.mhd`` + ``.raw``, then times, in this
one process with dask's synchronous scheduler (best of ``--rounds``), for each:
the header read (``read_series`` / ``read_volume``) and the decode
(``to_hu().compute()``) from the local folder, from ``s3://`` (what the
workers do), and "copy to a temporary folder, then read locally". Every
variant's ``hu`` is checked equal to the local one. Results:
``benchmarks/results/object_input.json``.

Usage::

    python benchmarks/bench_object_input.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "object_input.json"
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("LUNGZARR_SHARED", REPO.parent / "shared")) / "fixtures"
SOURCES = {"LIDC": SHARED / "lidc" / "LIDC-IDRI-0001", "RICORD": SHARED / "ricord" / "RICORD-1A-chest"}


def _timed(f, rounds):
    best = None
    for _ in range(rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        out = f()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu)
    return {"wall_s": round(best[0], 3), "cpu_s": round(best[1], 3)}, out


def _server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"})
    return proc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    server = _server()
    try:
        import dask
        import fsspec

        from lungzarr.io import dicom, volumes
        from lungzarr.volume import Grid

        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        results = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                               "python": platform.python_version()}, "rounds": args.rounds, "inputs": {}}
        work = Path(tempfile.mkdtemp(prefix="lungzarr-bench-"))
        with dask.config.set(scheduler="synchronous"):
            for name, src in SOURCES.items():
                fs.put(str(src) + "/", f"bench/{name}/", recursive=True)
                url = f"s3://bench/{name}"
                hl, sl = _timed(lambda: dicom.read_series(src, patient=name), args.rounds)
                hr, sr = _timed(lambda: dicom.read_series(url, patient=name), args.rounds)
                dl, a = _timed(lambda: sl.to_hu().compute(), args.rounds)
                dr, b = _timed(lambda: sr.to_hu().compute(), args.rounds)

                def copy_then_read():
                    d = tempfile.mkdtemp(dir=work)
                    try:
                        fs.get(f"bench/{name}/", d + "/", recursive=True)
                        return dicom.read_series(d, patient=name).to_hu().compute()
                    finally:
                        shutil.rmtree(d)
                cr, c = _timed(copy_then_read, args.rounds)
                assert np.array_equal(a, b) and np.array_equal(a, c)
                results["inputs"][name] = {"slices": len(sl.paths), "bytes": sum(p.stat().st_size for p in
                                                                                 src.iterdir()),
                                           "local": {"headers": hl, "decode": dl}, "s3": {"headers": hr, "decode": dr},
                                           "copy_then_read": cr}
                print(name, json.dumps(results["inputs"][name]), flush=True)
            grid = Grid(a.shape, (0.0, 0.0, 0.0), (1.0, 0.7, 0.7))
            local_dir = work / "vol"
            for fn in ("R.nii", "R.nii.gz", "R.mhd"):
                volumes.write_volume(a, local_dir / fn, grid=grid)
            fs.put(str(local_dir) + "/", "bench/vol/", recursive=True)
            for fn in ("R.nii", "R.nii.gz", "R.mhd"):
                url = f"s3://bench/vol/{fn}"
                tl, x = _timed(lambda: volumes.read_volume(local_dir / fn).to_hu().compute(), args.rounds)
                tr, y = _timed(lambda: volumes.read_volume(url).to_hu().compute(), args.rounds)
                files = [url] + ([url[:-4] + ".raw"] if fn.endswith(".mhd") else [])

                def copy_then_read():
                    d = Path(tempfile.mkdtemp(dir=work))
                    try:
                        for f in files:
                            fs.get(f.removeprefix("s3://"), str(d / f.rsplit("/", 1)[1]))
                        return volumes.read_volume(d / fn).to_hu().compute()
                    finally:
                        shutil.rmtree(d)
                tc, z = _timed(copy_then_read, args.rounds)
                assert np.array_equal(x, y) and np.array_equal(x, z) and np.array_equal(x, a)
                results["inputs"][fn] = {"shape": list(a.shape), "bytes": sum(fs.info(f)["size"] for f in files),
                                         "local": tl, "s3": tr, "copy_then_read": tc}
                print(fn, json.dumps(results["inputs"][fn]), flush=True)
        shutil.rmtree(work, ignore_errors=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {RESULTS}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
