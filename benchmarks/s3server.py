"""A loopback S3-compatible server (moto in server mode) for the object-store benchmarks.

Started as a separate process on a free loopback port; the environment the storage
libraries read (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``) points at it while the context is open. Its request log (one line
per HTTP request) goes to ``log`` so a benchmark can count requests.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server(log: Path):
    """Yield ``(process, new_bucket)``: the server's Popen and a function that creates a fresh bucket."""
    port = _free_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": f"bench-{uuid.uuid4().hex}",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    with open(log, "w") as fh:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=fh, stderr=subprocess.STDOUT)
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.1)

        def new_bucket() -> str:
            import boto3

            name = f"bench-{uuid.uuid4().hex[:12]}"
            boto3.client("s3").create_bucket(Bucket=name)
            return name

        yield server, new_bucket
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def requests_logged(log: Path) -> int:
    """HTTP requests the server has logged so far."""
    try:
        return sum(1 for line in open(log) if '" ' in line and "HTTP/1.1" in line)
    except FileNotFoundError:
        return 0
