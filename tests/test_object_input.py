"""Beyond one machine (issue 19, items 2 and 3): INPUT on object storage, read by workers elsewhere.

A real S3-compatible server (moto's server mode) runs on loopback, started
by a fixture and stopped after; the shared LIDC and RICORD slabs and a NIfTI
written here are uploaded to it. A ``dask scheduler`` and two ``dask worker``
processes run as separate processes whose working directories, homes and
graph caches differ from the client's; credentials and the endpoint reach
them only through their environment (``AWS_*``), never through a task.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import LIDC_DIR, RICORD_DIR, free_port, shared_path, stop_processes, wait_for_workers
from s3_server import clear_fs_cache, moto_s3

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BUCKET = "cohort"
#: Distinctive values, so a test can tell they appear nowhere in the store.
KEY_ID = "LZTESTKEYID4711"
SECRET = "lz-test-secret-0f9e8d7c6b5a"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with bucket ``cohort``; this process's AWS_* point at it.

    Yields the environment (credentials, endpoint) the workers get.
    """
    import fsspec

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with moto_s3(key_id=KEY_ID, secret=SECRET, log=log) as (_, env):
        fsspec.filesystem("s3").mkdir(BUCKET)
        yield env


def _nifti_volume(path):
    """A small chest phantom as a NIfTI file (HU), for the volume-file input kind."""
    from lungzarr.algorithms.phantom import chest_phantom
    from lungzarr.io.volumes import write_volume
    from lungzarr.volume import Grid

    hu, origin = chest_phantom(shape=(24, 96, 96), spacing=(2.5, 2.0, 2.0), seed=3)
    write_volume(hu, path, grid=Grid(hu.shape, tuple(origin), (2.5, 2.0, 2.0)), orientation="RAS")
    return path


@pytest.fixture(scope="module")
def cohort(s3, tmp_path_factory):
    """The same cohort as a local folder and under two prefixes of the bucket.

    ``s3://cohort/a/`` and ``s3://cohort/b/`` hold identical copies (LIDC,
    RICORD, VOL.nii.gz): two patients named alike whose series are equal.
    """
    import fsspec

    lidc_dir, ricord_dir = shared_path(LIDC_DIR), shared_path(RICORD_DIR)
    local = tmp_path_factory.mktemp("local") / "input"
    local.mkdir()
    shutil.copytree(lidc_dir, local / "LIDC")
    shutil.copytree(ricord_dir, local / "RICORD")
    _nifti_volume(local / "VOL.nii.gz")
    fs = fsspec.filesystem("s3")
    for prefix in ("a", "b"):
        fs.put(str(local) + "/", f"{BUCKET}/{prefix}/", recursive=True)
    return {"local": local, "a": f"s3://{BUCKET}/a/", "b": f"s3://{BUCKET}/b/"}


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """A ``dask scheduler`` and two ``dask worker`` processes, each worker in its own folder.

    Each worker's cwd, HOME, LUNGZARR_CACHE and local directory are its own
    folder (none is the client's cwd, none holds ``models/``); the AWS_*
    credentials come from their environment. Yields (address, worker folders).
    """
    root = tmp_path_factory.mktemp("cluster")
    dask_bin = shutil.which("dask") or str(Path(PY).with_name("dask"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LUNGZARR_"))}
    # tests/ too: the workers unpickle this module's small helpers (client.run) by reference.
    base.update({"DASK_DISTRIBUTED__WORKER__DAEMON": "False",
                 "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])})
    procs = [subprocess.Popen([dask_bin, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=base, cwd=root)]
    folders = []
    for k in range(2):
        folder = root / f"worker{k}"
        (folder / "home").mkdir(parents=True)
        env = {**base, **s3, "HOME": str(folder / "home"), "LUNGZARR_CACHE": str(folder / "cache"),
               "TMPDIR": str(folder / "tmp")}
        (folder / "tmp").mkdir()
        procs.append(subprocess.Popen([dask_bin, "worker", address, "--nworkers", "1", "--nthreads", "1",
                                       "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
                                       "--local-directory", str(folder / "local"), "--name", f"w{k}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=folder))
        folders.append(folder)
    try:
        wait_for_workers(address, 2, timeout=90)
        yield address, folders
    finally:
        stop_processes(*procs[1:], procs[0])


def _store_texts(path) -> str:
    """Every zarr.json (attrs) and every table of a store, as one text."""
    from lungzarr.io.store import CohortStore

    parts = [p.read_text() for p in Path(path).rglob("zarr.json")]
    store = CohortStore(path, mode="r")
    parts.append(json.dumps([store.failures(), store.warnings()], default=str))
    return "\n".join(parts)


# ---------------------------------------------------------------------- item 2: INPUT by URL

def test_scan_of_a_prefix_lists_folders_volume_files_and_what_is_not_used(s3):
    import fsspec

    from lungzarr.pipeline.inputs import scan_input

    fs = fsspec.filesystem("s3")
    fs.pipe(f"{BUCKET}/scan/P1/0001.dcm", (REPO / "README.md").read_bytes())
    fs.pipe(f"{BUCKET}/scan/P2.zip", b"PK")
    fs.pipe(f"{BUCKET}/scan/notes.txt", b"x")
    fs.pipe(f"{BUCKET}/scan/.cache/x", b"x")
    fs.pipe(f"{BUCKET}/scan/V.nii.gz", b"x")
    scan = scan_input(f"s3://{BUCKET}/scan/")
    assert [(pid, str(p)) for pid, p in scan.patients] == [("P1", f"s3://{BUCKET}/scan/P1"),
                                                           ("V", f"s3://{BUCKET}/scan/V.nii.gz")]
    assert [(e.patient, e.file) for e in scan.archives] == [("P2", f"s3://{BUCKET}/scan/P2.zip")]
    assert "unzip it into s3://cohort/scan/P2/" in scan.archives[0].reason
    assert {e.name for e in scan.ignored} == {".cache", "notes.txt"}
    from lungzarr.errors import LungzarrError

    with pytest.raises(LungzarrError, match=r"INPUT folder 's3://cohort/nothing' does not exist"):
        scan_input(f"s3://{BUCKET}/nothing/")


def test_decode_task_names_derive_from_the_object_urls_and_versions(s3, cohort, tmp_path):
    """Equal series in two prefixes (same patient id, same headers) never share a task key; a rewritten
    object (new ETag/LastModified) gives new keys; and none equals the local folder's."""
    import fsspec

    from lungzarr.pipeline.stages.ingest import _read_series_and_files_task, ingest_dataset

    store = tmp_path / "s.zarr"

    def names(where, patient):
        series, files = _read_series_and_files_task(where, patient)
        ds = ingest_dataset(series, store=store, files=files)
        return series, ds["hu"].data.name

    sa, ka = names(cohort["a"] + "LIDC", "LIDC")
    sb, kb = names(cohort["b"] + "LIDC", "LIDC")
    sl, kl = names(str(cohort["local"] / "LIDC"), "LIDC")
    assert sa.headers[0].series_uid == sb.headers[0].series_uid
    assert len({ka, kb, kl}) == 3
    va, kva = names(cohort["a"] + "VOL.nii.gz", "VOL")
    vb, kvb = names(cohort["b"] + "VOL.nii.gz", "VOL")
    assert kva != kvb
    # Rewrite one slice of prefix b with the same bytes: the same URL and size, a new LastModified.
    fs = fsspec.filesystem("s3")
    first = sb.paths[0].removeprefix("s3://")
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    fs.pipe(first, fs.cat(first))
    _, kb2 = names(cohort["b"] + "LIDC", "LIDC")
    assert kb2 != kb


@pytest.mark.slow  # ~55 s on 2 cores: two dask worker processes ingest and segment LIDC, RICORD and a NIfTI twice
def test_ingest_from_s3_on_workers_elsewhere_equals_the_local_run_bit_for_bit(s3, cohort, cluster, tmp_path):
    from typer.testing import CliRunner

    from lungzarr.cli import app
    from lungzarr.io.store import CohortStore
    from lungzarr.pipeline import run

    address, _ = cluster
    local_store, s3_store = tmp_path / "local.zarr", tmp_path / "s3.zarr"
    from distributed import Client

    with Client(address, timeout="30s") as client:
        t0 = time.perf_counter()
        local = run(cohort["local"], local_store, stages=["ingest"], client=client)
        t_local = time.perf_counter() - t0
        local += run(None, local_store, stages=["segment"], client=client)
    # The s3:// INPUT through the CLI (a str argument: pathlib would turn s3://b/k into s3:/b/k).
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, ["ingest", cohort["a"], str(s3_store), "--scheduler", address],
                           env={"COLUMNS": "300"})
    t_s3 = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    with Client(address, timeout="30s") as client:
        (seg,) = run(None, s3_store, stages=["segment"], client=client)
    assert [s.failed for s in local] == [[], []] and seg.failed == []
    a, b = CohortStore(local_store, mode="r"), CohortStore(s3_store, mode="r")
    assert a.patients() == b.patients() == ["LIDC", "RICORD", "VOL"]
    for pid in a.patients():
        da_, db_ = a.open_patient(pid), b.open_patient(pid)
        for name in ("hu", "hu_2mm", "lungs"):
            x, y = da_[name].values, db_[name].values
            assert x.dtype == y.dtype and np.array_equal(x, y), (pid, name)
        attrs = b.patient_attrs(pid)
        where = attrs.get("source_folder") or attrs.get("source_file")
        assert where.startswith(cohort["a"]), attrs
    # Credentials and the endpoint reach the workers through their environment only: nowhere in the store.
    text = _store_texts(s3_store)
    for secret in (KEY_ID, SECRET, s3["AWS_ENDPOINT_URL"], s3["AWS_ENDPOINT_URL"].split("//")[1]):
        assert secret not in text and secret not in r.output
    print(f"\ningest of 3 patients on 2 workers: local INPUT {t_local:.1f} s (run), s3:// INPUT {t_s3:.1f} s "
          f"(CLI, its client start included)")


def test_metaimage_objects_are_read_from_temporary_copies_that_are_removed(s3, tmp_path, monkeypatch):
    """SimpleITK reads paths only: a .mhd + .raw or .mha object is copied into a temporary folder for the read,
    and the folder is gone afterwards; hu equals the local file's; a missing .raw is named by its URL."""
    import tempfile

    import dask
    import fsspec

    from lungzarr.errors import PatientError
    from lungzarr.io.volumes import read_volume

    nii = _nifti_volume(tmp_path / "src" / "V.nii.gz")
    hu = read_volume(nii).to_hu().compute(scheduler="synchronous")
    grid = read_volume(nii).grid
    from lungzarr.io.volumes import write_volume

    write_volume(hu, tmp_path / "mi" / "M.mhd", grid=grid)
    write_volume(hu, tmp_path / "mi" / "A.mha", grid=grid)
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "mi") + "/", f"{BUCKET}/mi/", recursive=True)
    fs.pipe(f"{BUCKET}/mi/N.mhd", (tmp_path / "mi" / "M.mhd").read_bytes().replace(b"M.raw", b"N.raw"))
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with dask.config.set(scheduler="synchronous"):
        for name in ("M.mhd", "A.mha"):
            series = read_volume(f"s3://{BUCKET}/mi/{name}")
            assert series.files[0] == f"s3://{BUCKET}/mi/{name}"
            assert np.array_equal(series.to_hu(chunk_slices=8).compute(), hu), name
    assert list(temp.iterdir()) == []
    with pytest.raises(PatientError, match=r"names the data file 'N.raw', which is not in 's3://cohort/mi'") as info:
        read_volume(f"s3://{BUCKET}/mi/N.mhd")
    assert info.value.file == f"s3://{BUCKET}/mi/N.mhd"


def test_bad_objects_get_the_same_per_file_errors_as_local_files_naming_the_url(s3, cohort, tmp_path):
    """A truncated slice inside the series, a folder of no DICOM, a damaged NIfTI: each patient fails with the
    local reason, the URL named; the cohort goes on (no cluster: the reading code is the same)."""
    import fsspec

    from lungzarr.pipeline import ingest

    bad = tmp_path / "bad"
    shutil.copytree(cohort["local"] / "LIDC", bad / "CUT")
    slices = sorted((bad / "CUT").iterdir())
    data = slices[8].read_bytes()
    slices[8].write_bytes(data[: len(data) // 2])
    (bad / "TEXT").mkdir()
    (bad / "TEXT" / "a.dcm").write_bytes(b"not dicom at all" * 20)
    (bad / "BROKEN.nii.gz").write_bytes((cohort["local"] / "VOL.nii.gz").read_bytes()[:300])
    shutil.copytree(cohort["local"] / "LIDC", bad / "GOOD")
    fs = fsspec.filesystem("s3")
    fs.put(str(bad) + "/", f"{BUCKET}/bad/", recursive=True)
    url = f"s3://{BUCKET}/bad/"

    local = ingest(bad, tmp_path / "l.zarr")
    remote = ingest(url, tmp_path / "r.zarr")
    assert local.done == remote.done == ["GOOD"]
    from lungzarr.io.store import CohortStore

    hu = [CohortStore(tmp_path / f"{k}.zarr", mode="r").open_patient("GOOD")["hu"].values for k in "lr"]
    assert np.array_equal(*hu)

    def by_patient(summary, root):
        return {f["patient"]: (f["reason"].replace(str(root), "ROOT"),
                               str(f["file"]).replace(str(root), "ROOT")) for f in summary.failed}

    lf, rf = by_patient(local, bad), by_patient(remote, url.rstrip("/"))
    assert sorted(rf) == ["BROKEN", "CUT", "TEXT"]
    assert rf == lf, (rf, lf)
    assert rf["CUT"][1] == f"ROOT/CUT/{slices[8].name}"  # the object's URL is the file named
    text = _store_texts(tmp_path / "r.zarr")
    assert url.rstrip("/") in text
    for secret in (KEY_ID, SECRET, s3["AWS_ENDPOINT_URL"]):
        assert secret not in text


def test_an_unreachable_object_store_is_one_run_level_error_without_the_secrets(s3, monkeypatch, tmp_path):
    from lungzarr.errors import LungzarrError
    from lungzarr.pipeline import ingest

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    clear_fs_cache()
    try:
        with pytest.raises(LungzarrError) as info:
            ingest(f"s3://{BUCKET}/a/", tmp_path / "x.zarr")
    finally:
        monkeypatch.undo()
        clear_fs_cache()
    message = str(info.value)
    assert "cannot list INPUT 's3://cohort/a' (EndpointConnectionError" in message, message
    assert "<$AWS_ENDPOINT_URL>" in message  # the endpoint's value is blanked, its variable named
    assert "127.0.0.1" not in message and SECRET not in message and KEY_ID not in message
    assert not (tmp_path / "x.zarr").exists()


# ---------------------------------------------------------------------- item 3: weights on workers elsewhere

def _tamper_shipped():
    from lungzarr.model.shipping import shipped_weights

    path = shipped_weights()
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    return str(path)


def _worker_view():
    from lungzarr.model.engines import cache_dir
    from lungzarr.model.shipping import shipped_weights

    path = shipped_weights()
    return {"cwd": os.getcwd(), "shipped": None if path is None else str(path),
            "cache": [str(p) for p in cache_dir().glob("d8-*")] if cache_dir().is_dir() else []}


@pytest.mark.slow  # ~60-90 s on 2 cores: the UNet on two cold workers (TensorFlow import, graph export)
def test_detect_on_workers_elsewhere_uses_the_shipped_weights_and_refuses_a_tampered_copy(
        s3, cluster, tmp_path, monkeypatch):
    from distributed import Client

    from lungzarr.io.store import CohortStore
    from lungzarr.model.d8 import DEFAULT_WEIGHTS, WEIGHTS_SHA256
    from lungzarr.pipeline import run

    address, folders = cluster
    monkeypatch.setenv("LUNGZARR_CACHE", str(tmp_path / "client-cache"))
    # The client's weights: a temporary copy, deleted once shipped (no worker can open the client's path).
    weights = tmp_path / "client-weights" / "d8.h5"
    weights.parent.mkdir()
    shutil.copy(DEFAULT_WEIGHTS, weights)
    store = tmp_path / "d.zarr"
    root = tmp_path / "in"
    _nifti_volume(root / "PH.nii.gz")
    with Client(address, timeout="30s") as client:
        run(root, store, stages=["ingest", "segment"], client=client)

        tampered = []

        def tamper_at_begin(event):
            if event.event == "begin" and event.stage == "detect":
                tampered.extend(client.run(_tamper_shipped).values())

        (first,) = run(None, store, stages=["detect"], client=client, weights=weights, engine="openvino",
                       progress=tamper_at_begin)
        assert len(tampered) == 2 and first.done == []
        (failure,) = first.failed
        assert "sha256" in failure["reason"] and WEIGHTS_SHA256 in failure["reason"], failure
        assert any(failure["reason"].count(str(f / "local")) for f in folders), failure

        def delete_at_begin(event):
            if event.event == "begin" and event.stage == "detect":
                weights.unlink()

        (second,) = run(None, store, stages=["detect"], client=client, weights=weights, engine="openvino",
                        progress=delete_at_begin)
        assert not weights.exists()
        assert second.done == ["PH"], second.failed
        views = list(client.run(_worker_view).values())
    # Each worker got its own copy in its own local directory (the re-registration repaired the tampered ones)
    # and exported its graph into its own cache; the client's cache holds only the client's own export.
    for folder, view in zip(sorted(folders), sorted(views, key=lambda v: v["cwd"])):
        assert view["cwd"] == str(folder) and view["shipped"].startswith(str(folder / "local"))
    assert any(view["cache"] for view in views)
    assert all(p.startswith(str(f / "cache")) for f, v in zip(sorted(folders), sorted(views, key=lambda v: v["cwd"]))
               for p in v["cache"])
    prob = CohortStore(store, mode="r").open_patient("PH")["nodule_prob"].values
    assert np.isfinite(prob).all()


# ---------------------------------------------------------------------- items 1-3 together


@pytest.mark.slow  # ~5-10 min on 2 cores: the whole pipeline (the UNet on LIDC and RICORD) twice on two workers
def test_whole_run_from_s3_to_s3_on_workers_elsewhere_gives_the_local_runs_tables(s3, cohort, cluster, tmp_path):
    """INPUT and STORE both on the loopback S3 server, a scheduler and two `dask worker` processes whose
    cwd, HOME and caches are their own: the whole `lungzarr run` (weights shipped to the workers), then
    `open_cohort` / `read_nodules` / `read_patients` from the S3 URL equal the same run from a local folder
    to a local directory store."""
    import pandas.testing as pdt
    from typer.testing import CliRunner

    import lungzarr
    from lungzarr.cli import app

    address, _ = cluster
    s3_store = f"s3://{BUCKET}/whole-run.zarr"
    local_store = tmp_path / "local.zarr"
    runner = CliRunner()
    t0 = time.perf_counter()
    r = runner.invoke(app, ["run", cohort["a"], s3_store, "--scheduler", address], env={"COLUMNS": "300"})
    t_s3 = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    t0 = time.perf_counter()
    r_local = runner.invoke(app, ["run", str(cohort["local"]), str(local_store), "--scheduler", address],
                            env={"COLUMNS": "300"})
    t_local = time.perf_counter() - t0
    assert r_local.exit_code == 0, r_local.output
    for secret in (KEY_ID, SECRET, s3["AWS_ENDPOINT_URL"]):
        assert secret not in r.output

    where = ["source_folder", "source_file", "dicom_file", "files_token"]  # where the input was: differs by design
    nodules_s3, nodules_local = lungzarr.read_nodules(s3_store), lungzarr.read_nodules(local_store)
    assert len(nodules_local) > 0 and set(nodules_local.patient) >= {"LIDC", "RICORD"}
    pdt.assert_frame_equal(nodules_s3.reset_index(drop=True), nodules_local.reset_index(drop=True),
                           check_exact=True)
    patients_s3, patients_local = lungzarr.read_patients(s3_store), lungzarr.read_patients(local_store)
    keep = [c for c in patients_local.columns if c not in where]
    pdt.assert_frame_equal(patients_s3[keep].reset_index(drop=True), patients_local[keep].reset_index(drop=True),
                           check_exact=True)
    tree_s3, tree_local = lungzarr.open_cohort(s3_store), lungzarr.open_cohort(local_store)
    for pid in ("LIDC", "RICORD", "VOL"):
        a, b = tree_s3[f"patients/{pid}"].to_dataset(), tree_local[f"patients/{pid}"].to_dataset()
        for name in ("hu", "hu_2mm", "lungs", "segmented", "nodule_prob"):
            assert np.array_equal(a[name].values, b[name].values), (pid, name)
    lidc = nodules_s3[(nodules_s3.patient == "LIDC") & np.isclose(nodules_s3.threshold, 0.5)]
    assert np.linalg.norm(lidc[["z_mm", "y_mm", "x_mm"]].to_numpy() - [-115.80, 86.39, 56.40], axis=1).min() < 3
    print(f"\nwhole run of 3 patients on 2 workers: s3:// -> s3:// {t_s3:.0f} s, local -> local {t_local:.0f} s")
