"""Beyond one machine (issue 19): a TLS scheduler lets in only clients with a certificate its CA signed,
and no task key or dashboard label carries a DICOM header value.

The certificates are made here (a throw-away CA, one certificate for 127.0.0.1
used by scheduler, worker and client) with the ``cryptography`` package; the
scheduler and the worker are real ``dask scheduler`` / ``dask worker``
processes on loopback.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, stop_processes, wait_for_workers
from dicom_phantoms import edit_header, make_patient

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def make_tls_files(folder) -> dict:
    """A self-signed CA and a certificate + key for 127.0.0.1 it signed, as PEM files in ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lungzarr test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


def _tls_env(files) -> dict:
    """The client side of TLS through dask's config, as environment variables."""
    return {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(files["ca"]),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(files["cert"]),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(files["key"])}



def _plain_env() -> dict:
    """This process's environment without any dask TLS setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DASK_DISTRIBUTED__COMM__TLS")}


def _flat(text: str) -> str:
    return "".join(text.split())


@pytest.fixture
def tls_cluster(tmp_path):
    """A TLS ``dask scheduler`` and one ``dask worker`` on loopback; yields (address, files)."""
    files = make_tls_files(tmp_path / "tls")
    dask_bin = shutil.which("dask") or str(Path(PY).with_name("dask"))
    tls_args = ["--tls-ca-file", str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])]
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    env = {**_plain_env(), "DASK_DISTRIBUTED__WORKER__DAEMON": "False", "PYTHONPATH": str(REPO)}
    scheduler = subprocess.Popen([dask_bin, "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port",
                                  str(port), "--dashboard-address", "127.0.0.1:0", *tls_args],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    worker = subprocess.Popen([dask_bin, "worker", address, "--nworkers", "1", "--nthreads", "1", "--host",
                               "127.0.0.1", "--dashboard-address", "127.0.0.1:0", *tls_args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    try:
        from distributed.security import Security

        security = Security(tls_ca_file=str(files["ca"]), tls_client_cert=str(files["cert"]),
                            tls_client_key=str(files["key"]), require_encryption=True)
        wait_for_workers(address, 1, timeout=60, security=security)
        yield address, files
    finally:
        stop_processes(worker, scheduler)


def _ingest(root, store, address, env):
    return subprocess.run([PY, "-m", "lungzarr.cli", "ingest", str(root), str(store), "--scheduler", address],
                          capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(REPO), "COLUMNS": "300"}, cwd=REPO)


@pytest.mark.slow  # ~40 s: two dask processes and four CLI runs
def test_tls_scheduler_runs_a_client_with_the_certificate_and_refuses_one_without(tls_cluster, tmp_path):
    from lungzarr.io.store import CohortStore

    address, files = tls_cluster
    root = tmp_path / "input"
    make_patient(root / "P1", seed=1)

    # Without TLS settings: one sentence naming the settings, exit 2, nothing written.
    refused = tmp_path / "refused.zarr"
    r = _ingest(root, refused, address, _plain_env())
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert _flat(f"error: the dask scheduler at '{address}' speaks TLS, and this client has no TLS certificate; "
                 f"set distributed.comm.tls.ca-file") in _flat(r.stderr), r.stderr
    assert "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT" in _flat(r.stderr)
    assert len(r.stderr.strip().splitlines()) <= 3, r.stderr
    assert not refused.exists()

    # A certificate another CA signed: the handshake fails, said in one sentence.
    other = make_tls_files(tmp_path / "other")
    r = _ingest(root, refused, address, {**_plain_env(), **_tls_env(other)})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert _flat(f"error: the TLS handshake with the dask scheduler at '{address}' failed") in _flat(r.stderr)
    assert not refused.exists()

    # The plain tcp:// address of a TLS scheduler: told to use tls://.
    r = _ingest(root, refused, address.replace("tls://", "tcp://"), _plain_env())
    assert r.returncode == 2, r.stderr
    assert _flat(f"pass {address}") in _flat(r.stderr), r.stderr

    # With the certificate, through dask's config in the environment: the run completes on the TLS worker.
    store = tmp_path / "tls.zarr"
    r = _ingest(root, store, address, {**_plain_env(), **_tls_env(files)})
    assert r.returncode == 0, r.stderr
    assert f"dask scheduler {address}: 1 worker(s)" in r.stderr.replace("\n", " ")
    assert CohortStore(store, mode="r").is_complete("P1", "ingest")


def test_tls_client_settings_in_process(tmp_path):
    """The same checks, fast: an in-process TLS scheduler, the client's certificate from dask's config."""
    import dask
    from distributed import LocalCluster
    from distributed.security import Security

    from lungzarr.cluster import dask_client
    from lungzarr.errors import RunConfigError

    files = make_tls_files(tmp_path / "tls")
    security = Security(tls_ca_file=str(files["ca"]), tls_scheduler_cert=str(files["cert"]),
                        tls_scheduler_key=str(files["key"]), tls_worker_cert=str(files["cert"]),
                        tls_worker_key=str(files["key"]), tls_client_cert=str(files["cert"]),
                        tls_client_key=str(files["key"]), require_encryption=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", host="127.0.0.1",
                      security=security, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        with dask.config.set({"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None,
                              "distributed.comm.tls.client.key": None}):
            with pytest.raises(RunConfigError, match="speaks TLS, and this client has no TLS certificate; set "
                                                     "distributed.comm.tls.ca-file"):
                with dask_client(address, echo=lambda s: None, connect_timeout=2.0):
                    pass
        with dask.config.set({"distributed.comm.tls.ca-file": str(files["ca"]),
                              "distributed.comm.tls.client.cert": str(files["cert"]),
                              "distributed.comm.tls.client.key": str(files["key"])}):
            with dask_client(address, echo=lambda s: None, connect_timeout=5.0) as client:
                assert client.submit(sum, [1, 2], pure=False).result() == 3


def test_missing_tls_file_is_named(tmp_path):
    import dask

    from lungzarr.cluster import dask_client
    from lungzarr.errors import RunConfigError

    files = make_tls_files(tmp_path / "tls")
    missing = tmp_path / "tls" / "not-there.pem"
    # Something must listen so the check gets past the TCP probe.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"tls://127.0.0.1:{listener.getsockname()[1]}"
        with dask.config.set({"distributed.comm.tls.ca-file": str(missing),
                              "distributed.comm.tls.client.cert": str(files["cert"]),
                              "distributed.comm.tls.client.key": str(files["key"])}):
            with pytest.raises(RunConfigError, match="no such file: distributed.comm.tls.ca-file = .*not-there.pem"):
                with dask_client(address, echo=lambda s: None, connect_timeout=2.0):
                    pass


def test_task_keys_carry_no_dicom_header_values(tmp_path):
    """A patient whose header PatientID/PatientName differ from its folder: only the folder name reaches a key."""
    from distributed import LocalCluster, get_task_stream

    from lungzarr.cluster import dask_client
    from lungzarr.io.store import CohortStore
    from lungzarr.pipeline import run

    root = tmp_path / "input"
    header_id, header_name = "HDRID7734", "Doe^Jane"
    for path in make_patient(root / "FOLDER-A", seed=3):
        edit_header(path, PatientID=header_id, PatientName=header_name)
    store = tmp_path / "keys.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            dask_client(cluster.scheduler_address, echo=lambda s: None) as client:
        with get_task_stream(client) as stream:
            run(root, store, stages=["ingest", "segment"], client=client)
        keys = [str(t["key"]) for t in stream.data]
        # The scheduler's task prefixes are what the dashboard shows as labels.
        prefixes = list(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    assert CohortStore(store, mode="r").is_complete("FOLDER-A", "segment")
    assert len(keys) > 10, keys
    for text in keys + prefixes:
        for value in (header_id, "Doe", "Jane"):
            assert value not in text, (value, text)
