"""Stores by URL: the same cohort store on an S3-compatible object store.

A real S3 server (``moto`` in server mode) listens on a free loopback port, started by the
module's fixture as a separate process and stopped after. Credentials and the endpoint reach
lungzarr only through the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``), and the secret must appear nowhere: not in the
CLI's output, not in any object of the store.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import lungzarr
from lungzarr.errors import LungzarrError, StoreLockedError
from lungzarr.io.store import STAGING_GROUP, CohortStore

from conftest import assert_same_patients
from s3_server import moto_s3

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
SECRET = f"lungzarr-test-secret-{uuid.uuid4().hex}"
KEY_ID = f"LZTESTKEY{uuid.uuid4().hex[:10].upper()}"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on loopback (a separate process) and the environment that points at it."""
    with moto_s3(key_id=KEY_ID, secret=SECRET):
        yield {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture
def bucket(s3_env):
    import boto3

    name = f"lz-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    """Three small phantom patients as DICOM."""
    from lungzarr.algorithms.phantom import PhantomNodule, chest_phantom
    from lungzarr.io.dicom import write_series

    folder = tmp_path_factory.mktemp("small") / "input"
    for pid, seed in (("SMALL-1", 1), ("SMALL-2", 2), ("SMALL-3", 3)):
        hu, origin = chest_phantom(shape=(24, 96, 96), spacing=(2.5, 2.0, 2.0), seed=seed,
                                   nodules=(PhantomNodule(-30.0, -5.0, -35.0, 12.0),))
        write_series(hu, folder / pid, spacing=(2.5, 2.0, 2.0), origin=origin, patient_id=pid)
    return folder


def _cli(env, *args, timeout=600):
    return subprocess.run([PY, "-m", "lungzarr.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _objects(bucket):
    """Every object of the bucket: {key: bytes}."""
    import boto3

    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _assert_no_secret(*texts, bucket=None):
    for text in texts:
        assert SECRET not in text and KEY_ID not in text
    if bucket is not None:
        for key, body in _objects(bucket).items():
            assert SECRET.encode() not in body and KEY_ID.encode() not in body, key


def _assert_same(a, b):
    """Same patients (arrays, stage markers, attrs) and the same cohort tables."""
    assert_same_patients(a, b)
    for name in ("patients", "nodules"):
        ta, tb = CohortStore(a, mode="r").read_table(name), CohortStore(b, mode="r").read_table(name)
        assert list(ta.columns) == list(tb.columns), name
        assert ta.equals(tb), name


# ---------------------------------------------------------------------- tests


@pytest.mark.slow  # 22-97 s on the shared 2-core VM (a LocalCluster, two runs)
def test_ingest_and_segment_on_a_local_cluster_to_s3_match_a_directory(small_input, bucket, tmp_path):
    from distributed import Client, LocalCluster

    from lungzarr.pipeline import run

    url = f"s3://{bucket}/cohort.zarr"
    directory = tmp_path / "cohort.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        for store in (directory, url):
            summaries = run(small_input, store, stages=["ingest", "segment"], client=client)
            assert [sorted(s.done) for s in summaries] == [["SMALL-1", "SMALL-2", "SMALL-3"]] * 2, \
                [s.failed for s in summaries]
    _assert_same(directory, url)
    store = CohortStore(url, mode="r")
    assert all(store.listing(p) and not store.stale_listing(p) for p in store.patients())
    assert not CohortStore(url).lock_path.exists()  # released
    tree = lungzarr.open_cohort(url)
    assert sorted(tree["patients"].children) == ["SMALL-1", "SMALL-2", "SMALL-3"]
    assert tree["patients/SMALL-1"].to_dataset().lungs.any()
    _assert_no_secret(bucket=bucket)


def _visible_patients_are_whole(url, reference):
    """Every patient a reader sees has its ingest marker and the reference's voxels; their ids."""
    store = CohortStore(url, mode="r")
    before = set(store.patients())
    tree = lungzarr.open_cohort(url)
    seen = sorted(tree["patients"].children)
    # The run goes on meanwhile: a patient committed during the open may or may not be in the tree.
    assert before <= set(seen) <= set(store.patients())
    for pid in seen:
        assert store.is_complete(pid, "ingest"), f"{pid} is visible without its ingest marker"
        np.testing.assert_array_equal(store.open_patient(pid).hu_2mm.values, reference[pid], err_msg=pid)
    return seen


@pytest.mark.slow  # 40-75 s on the shared 2-core VM: CLI processes over the loopback S3 server
def test_ingest_killed_with_sigkill_on_s3_resumes_to_identical_store(small_input, s3_env, bucket, tmp_path):
    reference = tmp_path / "reference.zarr"
    r = _cli(s3_env, "ingest", small_input, reference, "--scheduler", "threads", "--batch-size", "1")
    assert r.returncode == 0, r.stderr
    ref = CohortStore(reference, mode="r")
    ref_hu = {p: ref.open_patient(p).hu_2mm.values for p in ref.patients()}

    url = f"s3://{bucket}/killed.zarr"
    proc = subprocess.Popen([PY, "-m", "lungzarr.cli", "ingest", str(small_input), url, "--scheduler", "threads",
                             "--batch-size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=s3_env)
    # A reader all along: whatever patient it sees is whole. Kill once the first one is committed.
    seen = []
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            seen = _visible_patients_are_whole(url, ref_hu)
        except LungzarrError:
            seen = []  # the store is being created
        if seen:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the kill point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after = _visible_patients_are_whole(url, ref_hu)
    assert 1 <= len(after) < 3, "the kill should land mid-run"
    assert CohortStore(url, mode="r").lock_path.exists()  # the killed run's lock object is left

    # Same host, its pid gone: the lock is taken over at once.
    r = _cli(s3_env, "ingest", small_input, url, "--scheduler", "threads", "--batch-size", "1")
    assert r.returncode == 0, r.stderr
    _assert_same(reference, url)
    store = CohortStore(url, mode="r")
    assert store.patients() == ["SMALL-1", "SMALL-2", "SMALL-3"]
    assert not [p for p in (store.path / STAGING_GROUP).iterdir() if p.is_dir()]
    assert not store.lock_path.exists()
    _assert_no_secret(r.stdout, r.stderr, bucket=bucket)


def test_a_patient_caught_mid_commit_is_invisible_and_swapped_in_by_the_next_writer(bucket):
    """The state a kill between the staged copy and its group metadata leaves, made on purpose."""
    import xarray as xr

    url = f"s3://{bucket}/mid.zarr"
    store = CohortStore(url)
    rng = np.random.default_rng(0)
    ds = xr.Dataset({"hu": (("z", "y", "x"), rng.integers(-1000, 400, (8, 8, 8)).astype(np.int16))},
                    coords={"z": np.arange(8) * 2.5, "y": np.arange(8) * 0.7, "x": np.arange(8) * 0.7},
                    attrs={"patient": "SMALL-2"}).chunk({"z": 4})
    with store.lock():
        pending = store.prepare_stage("SMALL-2", "ingest", ds, new_group=True)
        pending.compute(scheduler="sync")
        pending.commit()
    store = CohortStore(url)
    before = store.open_patient("SMALL-2").load()
    fs, final = store._backend.fs, (store.path / store.group_path("SMALL-2")).key
    staged = (store.path / STAGING_GROUP / "SMALL-2").key
    # A marked staged group, and in patients/ every object of it but the group's zarr.json.
    fs.copy(fs.find(final), [staged + k[len(final):] for k in fs.find(final)])
    fs.rm_file(final + "/zarr.json")
    store._changing()
    reader = CohortStore(url, mode="r")
    assert reader.patients() == []
    assert not lungzarr.open_cohort(url)["patients"].children
    with CohortStore(url).lock():  # the next writer finishes the swap
        pass
    assert reader.patients() == ["SMALL-2"] and reader.is_complete("SMALL-2", "ingest")
    after = reader.open_patient("SMALL-2").load()
    for name in before.variables:
        np.testing.assert_array_equal(before[name].values, after[name].values, err_msg=name)
    assert not fs.find(staged)
    assert "hu" in reader.listing("SMALL-2")  # the staged group was listed at its commit


@pytest.mark.slow  # 40-75 s on the shared 2-core VM: CLI processes over the loopback S3 server
def test_a_second_run_on_an_s3_store_is_refused_naming_the_holder(small_input, s3_env, bucket):
    url = f"s3://{bucket}/locked.zarr"
    CohortStore(url)
    holder = subprocess.Popen([PY, "-c", (
        "import time\n"
        "from lungzarr.io.store import CohortStore\n"
        f"with CohortStore({url!r}).lock():\n"
        "    print('locked', flush=True); time.sleep(120)\n")], stdout=subprocess.PIPE, text=True, env=s3_env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = _cli(s3_env, "ingest", small_input, url, "--scheduler", "threads")
        assert r.returncode == 2, r.stderr
        said = " ".join(r.stderr.split())
        assert f"is being written by pid {holder.pid} on host {socket.gethostname()!r}" in said
        assert "wait for that run" in said and f"{url}.lock" in said
        _assert_no_secret(r.stdout, r.stderr)
        # The store API refuses the same way.
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            with CohortStore(url).lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    # Its run is gone from this host: the next run takes the lock over.
    r = _cli(s3_env, "ingest", small_input, url, "--scheduler", "threads", "--patients", "SMALL-3")
    assert r.returncode == 0, r.stderr
    assert CohortStore(url, mode="r").patients() == ["SMALL-3"]


def test_two_writers_racing_for_the_lock_object_one_wins(bucket):
    """The conditional create (If-None-Match: *) lets exactly one of two takers hold the lock."""
    url = f"s3://{bucket}/race.zarr"
    CohortStore(url)
    a, b = CohortStore(url), CohortStore(url)
    with a.lock():
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            with b.lock():
                pass
    with b.lock():  # released by a
        pass


def test_a_lock_left_on_another_host_is_taken_over_only_after_its_heartbeat_expires(bucket, monkeypatch):
    import json

    from lungzarr.io.store import lock as storage

    url = f"s3://{bucket}/stale.zarr"
    store = CohortStore(url)
    lock = store.lock_path
    now = storage._now()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": now, "heartbeat": now}))
    with pytest.raises(StoreLockedError, match="pid 1 on host 'elsewhere'"):
        with store.lock():
            pass
    assert json.loads(lock.read_text())["host"] == "elsewhere"  # a refused writer touches nothing
    monkeypatch.setattr(storage, "LOCK_TTL_S", 0.5)
    time.sleep(1.0)
    with store.lock():
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert not lock.exists()


@pytest.mark.slow  # 40-75 s on the shared 2-core VM: CLI processes over the loopback S3 server
def test_status_verify_and_export_on_s3_and_damage_found(small_input, s3_env, bucket, tmp_path):
    import boto3

    url = f"s3://{bucket}/verify.zarr"
    r = _cli(s3_env, "ingest", small_input, url, "--scheduler", "threads", "--patients", "SMALL-1")
    assert r.returncode == 0, r.stderr
    r = _cli(s3_env, "status", url)
    assert r.returncode == 0, r.stderr
    assert "1 patient(s)" in r.stdout
    r = _cli(s3_env, "verify", url, "--scheduler", "threads")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no damage" in r.stdout + r.stderr
    # One byte of one chunk object changed: its checksum fails.
    s3 = boto3.client("s3")
    key = "verify.zarr/patients/SMALL-1/hu_2mm/c/1/0/0"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    r = _cli(s3_env, "verify", url, "--scheduler", "threads")
    assert r.returncode == 1, r.stdout + r.stderr
    said = " ".join((r.stdout + r.stderr).split())
    assert "1 patient(s) damaged" in said and "hu_2mm" in said
    r = _cli(s3_env, "export", url, tmp_path / "out.csv")
    _assert_no_secret(r.stdout, r.stderr, bucket=bucket)


def test_bad_store_urls_are_refused_up_front_without_echoing_a_secret(small_input, s3_env, bucket):
    r = _cli(s3_env, "ingest", small_input, f"s3://{KEY_ID}:{SECRET}@{bucket}/c.zarr", "--scheduler", "threads")
    assert r.returncode == 2
    assert "must not carry credentials" in r.stderr
    _assert_no_secret(r.stdout, r.stderr)
    r = _cli(s3_env, "ingest", small_input, "s3://lz-no-such-bucket-here/c.zarr", "--scheduler", "threads")
    assert r.returncode == 2
    assert "lz-no-such-bucket-here" in r.stderr
    _assert_no_secret(r.stdout, r.stderr)
    r = _cli(s3_env, "status", f"s3://{bucket}/absent.zarr")
    assert r.returncode != 0 and "no lungzarr store at" in r.stderr


@pytest.mark.slow  # the whole pipeline (UNet included) twice on the LIDC slab
@pytest.mark.requires_shared
def test_whole_run_on_the_lidc_slab_to_s3_on_a_local_cluster_matches_a_directory(lidc_dir, bucket, tmp_path):
    from distributed import Client, LocalCluster

    from lungzarr.pipeline import run

    root = tmp_path / "input"
    root.mkdir()
    (root / lidc_dir.name).symlink_to(lidc_dir, target_is_directory=True)
    url = f"s3://{bucket}/lidc.zarr"
    directory = tmp_path / "lidc.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        for store in (directory, url):
            summaries = run(root, store, client=client)
            assert all(s.done == [lidc_dir.name] for s in summaries), [(s.stage, s.failed) for s in summaries]
    _assert_same(directory, url)
    nodules = lungzarr.read_nodules(url)
    assert len(nodules) and nodules.equals(lungzarr.read_nodules(directory))
    tree = lungzarr.open_cohort(url)
    assert list(tree["patients"].children) == [lidc_dir.name]
    assert "nodule_prob" in CohortStore(url, mode="r").listing(lidc_dir.name)
    _assert_no_secret(bucket=bucket)


@pytest.mark.parametrize("point", ["before-switch", "after-switch", "after-pointer", "after-open", "after-load"])
def test_a_reader_of_an_s3_store_sees_the_old_or_the_new_table_never_a_torn_one(s3_env, bucket, monkeypatch,
                                                                               point):
    """The interleavings of tests/test_integrity.py (driven by hooks, not by the clock) on an S3 store."""
    from test_integrity import _read_version, _Steps, _versioned_frame

    url = f"s3://{bucket}/t-{point}.zarr"
    steps = _Steps(monkeypatch)
    store = CohortStore(url)
    store.write_table("nodules", _versioned_frame(1), dim="nodule")
    if point.startswith(("before", "after-switch")):  # the writer's steps: a reader reads there
        steps.at[point] = lambda: _read_version(url)
        store.write_table("nodules", _versioned_frame(2), dim="nodule")
        assert steps.ran == [(point, (1 if point == "before-switch" else 2, True))]
    else:  # the reader's steps: the writer replaces the table there
        steps.at[point] = lambda: store.write_table("nodules", _versioned_frame(2), dim="nodule")
        assert _read_version(url) == (2, True) and [p for p, _ in steps.ran] == [point]
    assert _read_version(url) == (2, True)
    groups = [p.name for p in (store.path / "tables").iterdir() if p.is_dir()]
    assert len(groups) == 1 and groups[0].startswith("nodules.")


def test_a_cohort_table_on_s3_costs_the_same_few_requests_whatever_its_columns(tmp_path):
    """Counted by the server (it records every request it receives): writing a table of 38 columns costs
    what one of 4 costs (its columns packed into the same two arrays), and reading it back a handful."""
    import json

    import boto3
    from test_integrity import _versioned_frame

    record = tmp_path / "requests.jsonl"
    with moto_s3(key_id=KEY_ID, secret=SECRET, record=record):
        boto3.client("s3").create_bucket(Bucket="lz-count")
        store = CohortStore("s3://lz-count/t.zarr")

        def requests(action) -> list[dict]:
            before = len(record.read_text().splitlines())
            action()
            return [json.loads(line) for line in record.read_text().splitlines()[before:]]

        frame = _versioned_frame(1)
        store.write_table("nodules", frame[frame.columns[:4]], dim="nodule")   # an old group to replace, as in a run
        narrow = requests(lambda: store.write_table("nodules", frame[frame.columns[:4]], dim="nodule"))
        wide = requests(lambda: store.write_table("nodules", frame, dim="nodule"))
        read = requests(lambda: store.read_table("nodules"))
    assert len(wide) == len(narrow) < 40, (len(wide), len(narrow))
    # The pointer twice (before and after), the group, and each of the two arrays' metadata and chunk.
    assert [(r["method"], r["path"].rsplit("/", 2)[-2:]) for r in read if r["method"] != "GET"] == []
    assert len(read) == 7, [r["path"] for r in read]


def test_reading_a_cohort_on_s3_costs_the_same_requests_whatever_its_patients(tmp_path):
    """Counted by the server: open_patients and read_patients list the patients with one LIST, not a
    request per patient (a HEAD of each group's zarr.json made them 1,005 requests at 1,000 patients); a
    folder caught mid-commit (its zarr.json not yet copied) is listed, and its open refused by name."""
    import json

    import boto3
    import pandas as pd
    import xarray as xr

    record = tmp_path / "requests.jsonl"
    with moto_s3(key_id=KEY_ID, secret=SECRET, record=record):
        boto3.client("s3").create_bucket(Bucket="lz-read")
        url = "s3://lz-read/c.zarr"
        store = CohortStore(url)

        def add(pid):
            ds = xr.Dataset({"hu": (("z", "y", "x"), np.zeros((4, 4, 4), np.int16))},
                            coords={"z": np.arange(4) * 2.5, "y": np.arange(4.0), "x": np.arange(4.0)},
                            attrs={"patient": pid}).chunk({"z": 2})
            with store.lock():
                pending = store.prepare_stage(pid, "ingest", ds, new_group=True)
                pending.compute(scheduler="sync")
                pending.commit()
                ids = store.patients()
                store.write_table("patients", pd.DataFrame({"patient": ids, "x": np.arange(len(ids))}),
                                  dim="patient")

        def requests(action) -> int:
            before = len(record.read_text().splitlines())
            action()
            return len(record.read_text().splitlines()) - before

        def reads():
            return (requests(lambda: len(lungzarr.open_patients(url))),
                    requests(lambda: lungzarr.read_patients(url)))

        for pid in ("P1", "P2"):
            add(pid)
        two = reads()
        for pid in ("P3", "P4", "P5", "P6"):
            add(pid)
        six = reads()
        assert six == two, (two, six)
        assert list(lungzarr.open_patients(url)) == ["P1", "P2", "P3", "P4", "P5", "P6"]
        # P6 caught between the staged copy and its group's zarr.json: listed, its rows kept, its open refused.
        fs = store._backend.fs
        fs.rm_file((store.path / store.group_path("P6")).key + "/zarr.json")
        trees = lungzarr.open_patients(url)
        assert "P6" in trees and len(lungzarr.read_patients(url)) == 6
        with pytest.raises(LungzarrError, match=r"patient 'P6' is not in store"):
            trees["P6"]
        assert CohortStore(url, mode="r").patients() == ["P1", "P2", "P3", "P4", "P5"]
