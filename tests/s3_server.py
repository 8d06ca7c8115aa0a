"""A real S3-compatible server on loopback (moto in server mode) for the tests and the object-store benchmarks.

Started as a separate process on a free port (with ``record``, this file run as a script:
moto's server app behind a WSGI layer that writes one JSON line per request it
receives, so a benchmark counts requests on the server's side); while the context is open this
process's environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``; no ``AWS_PROFILE`` or
``AWS_SESSION_TOKEN``) points at it — the only way lungzarr and its storage
libraries learn credentials and endpoint. Not a test module.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager

from conftest import free_port, stop_processes

#: Variables that must not leak in from the machine's own AWS configuration while the server is used.
_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN")


def clear_fs_cache() -> None:
    """fsspec keeps one S3FileSystem per process: drop it so the next one reads the current environment."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def moto_s3(*, key_id: str, secret: str, log=None, record=None, timeout: float = 60):
    """Run a moto S3 server on loopback and point ``AWS_*`` at it.

    Parameters
    ----------
    key_id, secret : str
        The credentials to put in the environment (distinctive values let a
        test check that they appear nowhere).
    log : path-like, optional
        File for the server's output (its request log, one line per request);
        discarded when None.
    record : path-like, optional
        File the server appends one JSON line to per request it receives
        (:func:`serve_recording`); None: plain ``moto.server``.
    timeout : float
        Seconds to wait for the server to accept connections.

    Yields
    ------
    server : subprocess.Popen
    env : dict
        The ``AWS_*`` variables set (what worker processes need).
    """
    import socket

    port = free_port()
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    try:
        cmd = ([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)] if record is None
               else [sys.executable, __file__, "--port", str(port), "--record", str(record)])
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log is not None:
            out.close()
    env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in (*env, *_UNSET)}
    os.environ.update(env)
    for k in _UNSET:
        os.environ.pop(k, None)
    clear_fs_cache()
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    tail = open(log, errors="replace").read()[-2000:] if log is not None else ""
                    raise RuntimeError(f"the moto S3 server did not start {tail}") from None
                time.sleep(0.1)
        yield server, env
    finally:
        stop_processes(server)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        clear_fs_cache()


def serve_recording(port: int, record) -> None:
    """Serve moto's S3 on ``127.0.0.1:port`` as ``python -m moto.server`` does, recording every request.

    Each request the server receives appends one JSON line to ``record`` before its response is sent
    (so a client that got its answer finds its line written): ``method``, ``path`` (``/bucket/key``,
    URL-decoded), ``query``, ``copy`` (a server-side copy: ``x-amz-copy-source`` present), ``status``,
    and for a batch delete (``POST ?delete``) ``keys``: the keys it names.
    """
    import io
    import json
    import re
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()
    out = open(record, "a", buffering=1)

    def recording(environ, start_response):
        entry = {"method": environ["REQUEST_METHOD"], "path": environ.get("PATH_INFO", ""),
                 "query": environ.get("QUERY_STRING", ""), "copy": "HTTP_X_AMZ_COPY_SOURCE" in environ}
        if entry["method"] == "POST" and re.search(r"(^|&)delete(=|&|$)", entry["query"]):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(body)  # moto reads it again
            entry["keys"] = re.findall(r"<Key>([^<]*)</Key>", body.decode(errors="replace"))

        def start(status, headers, exc_info=None):
            entry["status"] = int(status.split()[0])
            with lock:
                out.write(json.dumps(entry) + "\n")
            return start_response(status, headers, exc_info)

        return app(environ, start)

    run_simple("127.0.0.1", port, recording, threaded=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=serve_recording.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", required=True)
    args = parser.parse_args()
    serve_recording(args.port, args.record)
