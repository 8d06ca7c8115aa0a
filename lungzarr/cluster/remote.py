"""Reaching an existing dask scheduler (``tcp://``, ``tls://``): a Client, or one clear RunConfigError."""
from __future__ import annotations

import os
import socket

from lungzarr.errors import RunConfigError

#: Seconds to wait for an existing scheduler to answer (and to have a worker) before giving up.
CONNECT_TIMEOUT_S = 5.0


def _unreachable(scheduler, why) -> RunConfigError:
    return RunConfigError(f"cannot reach the dask scheduler at {scheduler!r} ({why}); start it with `dask "
                          f"scheduler` and at least one `dask worker {scheduler}`, or omit --scheduler to use a "
                          f"local cluster")


def _identity(address: str, timeout: float, connection_args: dict | None = None) -> dict:
    """Ask ``address`` who it is over dask's protocol, within ``timeout`` seconds in all.

    Runs its own event loop in a daemon thread, so it also works where a loop
    is running (a notebook) and a peer that never answers cannot hold the run.
    ``connection_args`` (``Security.get_connection_args("client")``) carry the
    TLS context a ``tls://`` address needs.
    """
    import asyncio
    import threading

    from distributed.comm import connect

    async def ask():
        comm = await connect(address, timeout=timeout, **(connection_args or {}))
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    box = {}

    def target():
        try:
            box["reply"] = asyncio.run(asyncio.wait_for(ask(), timeout))
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="lungzarr-scheduler-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["reply"]


#: The settings a ``tls://`` scheduler needs on the client side, as dask's config keys and environment variables.
_TLS_SETTINGS = ("distributed.comm.tls.ca-file, distributed.comm.tls.client.cert and "
                 "distributed.comm.tls.client.key in dask's config (or the environment variables "
                 "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
                 "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY)")


def _client_security(scheduler: str):
    """The ``distributed.Security`` dask's config gives a client of ``scheduler``, and its connection args.

    The same one ``distributed.Client`` would pick (a configured
    ``distributed.client.security-loader`` first, else ``distributed.comm.tls.*``),
    so the probe and the Client use one set of credentials.
    """
    from distributed.security import Security

    security = None
    try:
        from distributed.client import _maybe_call_security_loader  # private; absent in some versions
    except ImportError:
        _maybe_call_security_loader = None
    try:
        if _maybe_call_security_loader is not None:
            security = _maybe_call_security_loader(scheduler)
        security = security or Security()
        return security, security.get_connection_args("client")
    except (OSError, ValueError) as exc:  # a configured file that is missing or not a certificate/key
        import dask

        named = {key: dask.config.get(f"distributed.comm.tls.{key}", None)
                 for key in ("ca-file", "client.cert", "client.key")}
        missing = [f"distributed.comm.tls.{key} = {path!r}" for key, path in named.items()
                   if path and not os.path.isfile(path)]
        what = f"no such file: {', '.join(missing)}" if missing else (getattr(exc, "strerror", None) or str(exc))
        raise RunConfigError(f"cannot load the TLS files dask's config names for the client of {scheduler!r} "
                             f"({what}); check {_TLS_SETTINGS}") from None


def _connect(scheduler: str, timeout: float):
    """A Client of the scheduler at ``scheduler``, or RunConfigError within about ``timeout`` seconds.

    A ``tls://`` scheduler is reached with the client certificate dask's
    config names (:data:`_TLS_SETTINGS`); without one, or with one the
    scheduler does not accept, the error says which settings to fix.
    """
    import dask
    from distributed import Client
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port
    from distributed.comm.core import FatalCommClosedError

    try:
        protocol, location = parse_address(scheduler)
    except ValueError as exc:
        raise _unreachable(scheduler, exc) from None
    if protocol in ("tcp", "tls"):
        # A refused or unresolvable address answers at once; distributed would retry it until its timeout.
        try:
            host, port = parse_host_port(location)
            socket.create_connection((host, port), timeout=timeout).close()
        except (OSError, ValueError, TypeError) as exc:
            raise _unreachable(scheduler, getattr(exc, "strerror", None) or exc) from None
    security, connection_args = _client_security(scheduler)
    if protocol == "tls" and connection_args.get("ssl_context") is None:
        raise RunConfigError(f"the dask scheduler at {scheduler!r} speaks TLS, and this client has no TLS "
                             f"certificate; set {_TLS_SETTINGS} to the CA file and the client certificate and "
                             f"key that the scheduler's CA signed")
    try:
        reply = _identity(scheduler, timeout, connection_args)
    except FatalCommClosedError as exc:  # the TLS handshake failed: distributed does not retry it
        if protocol != "tls":
            raise _unreachable(scheduler, exc) from None
        raise _tls_refused(scheduler, exc) from None
    except (OSError, TimeoutError) as exc:
        if protocol == "tls" and not isinstance(exc, TimeoutError):
            # TLS 1.3 checks the client's certificate after the handshake: a refused one reads as a closed comm.
            raise _tls_refused(scheduler, exc) from None
        if protocol == "tcp" and "reset by peer" in str(exc):
            # It took the connection and dropped it at the first message: a TLS scheduler does that.
            raise RunConfigError(f"the dask scheduler at {scheduler!r} took the connection and reset it; if it was "
                                 f"started with --tls-ca-file/--tls-cert/--tls-key, pass "
                                 f"tls://{location} and set {_TLS_SETTINGS}") from None
        raise _unreachable(scheduler, str(exc) or f"no answer within {timeout:g} s") from None
    except Exception as exc:  # something listens there, but does not speak dask's protocol
        raise RunConfigError(f"{scheduler!r} answers, but not as a dask scheduler ({type(exc).__name__}); pass "
                             f"the address `dask scheduler` printed (its port, 8786 by default, not the "
                             f"dashboard's)") from None
    kind = reply.get("type") if isinstance(reply, dict) else None
    if kind != "Scheduler":
        raise RunConfigError(f"{scheduler!r} is a dask {kind or 'peer'}, not the scheduler; pass the address "
                             f"`dask scheduler` printed")
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": f"{timeout}s"}):
            client = Client(scheduler, timeout=f"{timeout}s", security=security)
    except (OSError, TimeoutError) as exc:
        raise _unreachable(scheduler, exc) from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError):
        client.close()
        raise RunConfigError(f"the dask scheduler at {scheduler!r} has no worker (waited {timeout:g} s); start "
                             f"one with `dask worker {scheduler}`") from None
    return client


def _tls_refused(scheduler: str, exc: BaseException) -> RunConfigError:
    import re

    cause = exc.__cause__ or exc.__context__
    found = re.search(r"\[SSL: (\w+)\]", str(exc))
    detail = (getattr(cause, "reason", None) or (found and found.group(1)) or str(exc) or type(exc).__name__)
    return RunConfigError(f"the TLS handshake with the dask scheduler at {scheduler!r} failed ({detail}); check "
                          f"that {_TLS_SETTINGS} name the CA that signed the scheduler's certificate and a client "
                          f"certificate and key that CA signed")
