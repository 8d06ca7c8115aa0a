"""Shared test helpers.

Real-data fixtures live in ``../shared/fixtures`` beside the checkout (or in
``$LUNGZARR_SHARED``). They are never copied into the repository. Where the
folder is absent the tests that need it are skipped with the reason — except
under ``CI=true``, where a missing fixture is a failure, so real-data tests
cannot vanish silently.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUNGZARR_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
LIDC_DIR = FIXTURES / "lidc" / "LIDC-IDRI-0001"
LIDC_XML = FIXTURES / "lidc" / "LIDC-IDRI-0001.xml"
RICORD_DIR = FIXTURES / "ricord" / "RICORD-1A-chest"
DSB_DIR = FIXTURES / "dsb2017"
DSB_PATIENT = "0acbebb8d463b4b9ca88cf38431aac69"
#: DSB2017 windows (first slice) through the candidates the flipped network marks (p >= 0.5 in Keras).
DSB_WINDOWS = (113, 139, 140, 141)
SHARED_WEIGHTS = SHARED / "models" / "d8_2x2x2_best_weights.h5"


def free_port() -> int:
    """A free TCP port on loopback (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_workers(address: str, n: int, *, timeout: float = 90, security=None) -> None:
    """Wait until the scheduler a test started at ``address`` has ``n`` workers (it may not listen yet)."""
    import time

    from distributed import Client

    deadline = time.time() + timeout
    while True:
        try:
            with Client(address, security=security, timeout="10s") as client:
                client.wait_for_workers(n, timeout=timeout)
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def stop_processes(*procs, timeout: float = 30) -> None:
    """Terminate processes a test started (a scheduler, its workers), then kill any that outlive ``timeout``."""
    import subprocess

    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def _patients_snapshot(location, ignore_attrs):
    """Per patient of a store: its arrays (nodules and dsb2017 subgroups as ``child:name``), stage markers
    without times, ids and dependencies, and its attrs without ``ignore_attrs``."""
    from lungzarr.io.store import CohortStore

    store = CohortStore(location, mode="r")
    snap = {}
    for pid in store.patients():
        ds = store.open_patient(pid).load()
        for child in ("nodules", "dsb2017"):
            if store.has_subgroup(pid, child):
                sub = store.open_patient(pid, subgroup=child).load()
                ds = ds.assign({f"{child}:{k}": v for k, v in sub.variables.items()})
        stages = {k: {kk: vv for kk, vv in v.items() if kk not in ("completed", "id", "depends_on")}
                  for k, v in store.stages(pid).items()}
        attrs = {k: v for k, v in store.patient_attrs(pid).items() if k not in ignore_attrs}
        snap[pid] = (ds, stages, attrs)
    return snap


def assert_same_patients(a, b, *, ignore_attrs=("lungzarr:stages",)) -> None:
    """Stores ``a`` and ``b`` hold the same patients with equal arrays, stage markers and attrs (see above)."""
    import numpy as np

    sa, sb = _patients_snapshot(a, ignore_attrs), _patients_snapshot(b, ignore_attrs)
    assert sorted(sa) == sorted(sb)
    for pid in sa:
        ds_a, st_a, at_a = sa[pid]
        ds_b, st_b, at_b = sb[pid]
        assert st_a == st_b, pid
        assert at_a == at_b, pid
        assert set(ds_a.variables) == set(ds_b.variables), pid
        for name in ds_a.variables:
            np.testing.assert_array_equal(ds_a[name].values, ds_b[name].values, err_msg=f"{pid}/{name}")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def shared_path(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise skip (or fail under CI=true)."""
    path = Path(path)
    if not path.exists():
        msg = (f"real-data fixture {str(path)!r} is missing: put the project's "
               f"shared folder beside the checkout or set LUNGZARR_SHARED")
        if in_ci():
            pytest.fail(msg + " (CI=true: a missing fixture is a failure)")
        pytest.skip(msg)
    return path


@pytest.fixture
def lidc_dir() -> Path:
    return shared_path(LIDC_DIR)


@pytest.fixture
def ricord_dir() -> Path:
    return shared_path(RICORD_DIR)


@pytest.fixture
def dsb_dir() -> Path:
    return shared_path(DSB_DIR)


@pytest.fixture
def lidc_xml() -> Path:
    return shared_path(LIDC_XML)


@pytest.fixture
def cpu_gpu_cluster():
    """An in-process cluster of one plain worker and one with a ``GPU`` resource.

    Yields ``(client, names)`` with ``names`` mapping worker address to "cpu" or "gpu".
    """
    import logging

    distributed = pytest.importorskip("distributed")
    spec = {"cpu": {"cls": distributed.Worker, "options": {"nthreads": 1}},
            "gpu": {"cls": distributed.Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
    scheduler = {"cls": distributed.Scheduler, "options": {"dashboard_address": None}}
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with distributed.SpecCluster(workers=spec, scheduler=scheduler) as cluster, \
            distributed.Client(cluster) as client:
        names = {address: info["name"] for address, info in client.scheduler_info()["workers"].items()}
        yield client, names


@pytest.fixture(scope="session", autouse=True)
def _private_engine_cache(tmp_path_factory):
    """Exported inference graphs go to a cache of this test session (workers inherit the variable),
    so the suite neither reads nor leaves graphs in the user's ~/.cache/lungzarr."""
    if os.environ.get("LUNGZARR_CACHE"):
        yield
        return
    os.environ["LUNGZARR_CACHE"] = str(tmp_path_factory.mktemp("lungzarr-cache"))
    try:
        yield
    finally:
        os.environ.pop("LUNGZARR_CACHE", None)
