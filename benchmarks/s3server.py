"""A loopback S3-compatible server (moto in server mode) for the object-store benchmarks.

The server is the tests' (``tests/s3_server.py``: a separate process on a free
loopback port, ``AWS_*`` pointing at it while the context is open); here its
request log (one line per HTTP request) goes to ``log`` so a benchmark can
count requests, and ``new_bucket`` gives each measurement a fresh bucket.
"""
from __future__ import annotations

import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from s3_server import moto_s3  # noqa: E402  (tests/ on the path first)


@contextmanager
def moto_server(log: Path):
    """Yield ``(process, new_bucket)``: the server's Popen and a function that creates a fresh bucket."""
    with moto_s3(key_id="bench", secret=f"bench-{uuid.uuid4().hex}", log=log) as (server, _):
        def new_bucket() -> str:
            import boto3

            name = f"bench-{uuid.uuid4().hex[:12]}"
            boto3.client("s3").create_bucket(Bucket=name)
            return name

        yield server, new_bucket


def requests_logged(log: Path) -> int:
    """HTTP requests the server has logged so far."""
    try:
        return sum(1 for line in open(log) if '" ' in line and "HTTP/1.1" in line)
    except FileNotFoundError:
        return 0
