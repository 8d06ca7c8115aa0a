"""The writer lock: one run writes a store at a time.

On a directory, an OS-level ``flock`` on ``NAME.lock`` beside the store's
resolved path (:class:`_FlockLock`); on an object store, a lock object
created by a conditional write, with a heartbeat (:class:`_ObjectLock`). Each
backend holds its own kind; :class:`_WriterLock` is the store's side: take
the lock, recover what a killed run left staged.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import os
import re
from contextlib import contextmanager
from pathlib import Path

from lungzarr.errors import StoreLockedError
from lungzarr.io.store.layout import _now
from lungzarr.io.store.objectpath import _ObjectPath, _ObjectStat

#: Seconds after its last heartbeat at which an object store's lock object is taken to be left
#: behind by a dead run. The holder rewrites it every ``LOCK_TTL_S / 4`` seconds.
LOCK_TTL_S = 120.0


class _FlockLock:
    """The lock of :class:`~lungzarr.io.store.directory._DirectoryBackend`: ``flock`` on a file beside the store."""

    @property
    def lock_path(self) -> Path:
        real = Path(os.path.realpath(self.path))
        return real.with_name(real.name + ".lock")

    def writer(self) -> str | None:
        """The lock file's holder (``pid N since T``) while that process lives, read without locking; else None."""
        try:
            text = self.lock_path.read_text().strip()
        except OSError:
            return None
        match = re.match(r"pid (\d+) ", text)
        if match is None:
            return None
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            return None  # left by a killed run: the kernel dropped its lock
        except PermissionError:
            pass
        return text

    @contextmanager
    def hold_lock(self, store: "CohortStore"):
        """Hold an OS-level ``flock`` on :attr:`lock_path` (see :meth:`CohortStore.lock`)."""
        lock_path = self.lock_path
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(lock_path, "a+")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip()
                fh.close()
                holder = holder if holder.startswith("pid ") else "another process"
                raise StoreLockedError(
                    f"store {str(self.path)!r} is being written by {holder}; wait for that run to finish "
                    f"(or stop it) and run again — two runs on one store would interleave") from None
            # The previous holder removes the file on release. If it did so after we opened it,
            # we hold a lock on a removed file while a third process could lock a new file of the
            # same name: then we let go and lock the file that is there now.
            if _same_file(fh, lock_path):
                break
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} since {_now()}")
            fh.flush()
            yield
        finally:
            try:
                # Removed while still held: a writer that opened the file meanwhile finds, once it
                # gets the lock, that the name no longer points to its file and tries again.
                try:
                    os.unlink(lock_path)
                except FileNotFoundError:
                    pass
            finally:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                finally:
                    fh.close()


def _same_file(fh, path: Path) -> bool:
    """Whether the open file ``fh`` is the file ``path`` names now."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fh.fileno())
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


class _ObjectLock:
    """The lock of :class:`~lungzarr.io.store.objects._ObjectBackend`: an object created by a conditional write."""

    @property
    def lock_path(self) -> _ObjectPath:
        return self.path.with_name(self.path.name + ".lock")

    def _holder(self) -> dict:
        import socket

        now = _now()
        return {"pid": os.getpid(), "host": socket.gethostname(), "since": now, "heartbeat": now}

    def _put_lock(self, body: dict, *, if_match: str | None = None) -> str | None:
        """Write the lock object: create it only if absent, or overwrite the version ``if_match``. Its ETag."""
        import json

        data = json.dumps(body).encode()
        lock = self.lock_path
        if if_match is None:
            self.fs.pipe_file(lock.key, data, mode="create")  # FileExistsError when another run holds it
        elif hasattr(self.fs, "call_s3"):
            bucket, key, _ = self.fs.split_path(lock.key)
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=if_match)
            except OSError:
                raise FileExistsError(str(lock)) from None  # changed meanwhile: another run has it
        else:
            # No conditional overwrite known for this filesystem: remove, then create only if absent.
            self.fs.rm_file(lock.key)
            self.fs.pipe_file(lock.key, data, mode="create")
        try:
            return _ObjectStat(self.fs.info(lock.key)).st_etag
        except FileNotFoundError:
            return None

    def _read_lock(self):
        import json

        lock = self.lock_path
        try:
            etag = _ObjectStat(self.fs.info(lock.key)).st_etag
            body = json.loads(self.fs.cat_file(lock.key))
        except FileNotFoundError:
            return None, None
        except ValueError:
            body = {}
        return (body if isinstance(body, dict) else {}), etag

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        import socket

        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # its run is gone from this machine (killed)
            except PermissionError:
                pass
        try:
            beat = _dt.datetime.fromisoformat(holder["heartbeat"])
        except (KeyError, TypeError, ValueError):
            return False
        return (_dt.datetime.now(_dt.timezone.utc) - beat).total_seconds() > LOCK_TTL_S

    def writer(self) -> str | None:
        """The lock object's holder while its heartbeat is fresh, read without taking it; else None."""
        holder, _ = self._read_lock()
        if not holder or self._is_stale(holder):
            return None
        return f"pid {holder.get('pid')} on host {holder.get('host')!r} since {holder.get('since')}"

    @contextmanager
    def hold_lock(self, store: "CohortStore"):
        import threading

        me = self._holder()
        try:
            etag = self._put_lock(me)
        except FileExistsError:
            holder, seen = self._read_lock()
            if holder is not None and self._is_stale(holder):
                try:
                    etag = self._put_lock(me, if_match=seen)
                except FileExistsError:
                    holder, seen = self._read_lock()
                    raise self._refusal(holder) from None
            elif holder is None:  # released meanwhile: one more try
                try:
                    etag = self._put_lock(me)
                except FileExistsError:
                    raise self._refusal(self._read_lock()[0]) from None
            else:
                raise self._refusal(holder) from None
        state = {"etag": etag}
        stop = threading.Event()

        def heartbeat():
            # Keeps the lock from looking abandoned to a run on another host.
            while not stop.wait(LOCK_TTL_S / 4):
                try:
                    state["etag"] = self._put_lock({**me, "heartbeat": _now()}, if_match=state["etag"])
                except (FileExistsError, OSError):
                    return  # taken over (this run was presumed dead) or unreachable: nothing to refresh

        beat = threading.Thread(target=heartbeat, name="lungzarr-lock-heartbeat", daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            holder, seen = self._read_lock()
            if holder is not None and seen == state["etag"]:  # still ours: a run that took over keeps its lock
                try:
                    self.fs.rm_file(self.lock_path.key)
                except FileNotFoundError:
                    pass

    def _refusal(self, holder) -> StoreLockedError:
        holder = holder or {}
        who = (f"pid {holder.get('pid')} on host {holder.get('host')!r} since {holder.get('since')} "
               f"(last heartbeat {holder.get('heartbeat')})") if holder.get("pid") else "another run"
        return StoreLockedError(
            f"store {self.url!r} is being written by {who}; wait for that run to finish (or stop it) and run "
            f"again — two runs on one store would interleave. A run that was killed leaves its lock object "
            f"{str(self.lock_path)!r}: it is taken over {LOCK_TTL_S:.0f} s after its last heartbeat (at once "
            f"on the same host), or remove that object once you are sure the run is gone")


class _WriterLock:
    """Part of :class:`~lungzarr.io.store.CohortStore`: its writer lock, held through its backend."""

    @property
    def lock_path(self):
        """``NAME.lock`` beside the store's resolved path (symlinks and ``..`` followed).

        Every spelling of one store (a symlink to it, a relative or an absolute
        path, ``a/../store``) names the same lock file, so two runs can never
        write one store at once through two names. For an object store, the
        lock object ``URL.lock`` beside the store's prefix.
        """
        return self._backend.lock_path

    def writer(self) -> str | None:
        """Who holds the writer lock now (a run writing the store), found without taking it or writing
        anything; None when nobody does."""
        return self._backend.writer()

    @contextmanager
    def lock(self):
        """Hold the store's writer lock (:attr:`lock_path`); refuse when another process holds it.

        On a directory, an OS-level ``flock``: released by the kernel when the
        process dies, so a killed run never leaves a stale lock behind. The
        lock file names the holder ("pid N since ...") while it is held and is
        removed on release, so after a run no ``NAME.lock`` is left beside the
        store (a killed run's file stays, empty of meaning: the kernel dropped
        its lock). On an object store, a lock object created by a conditional
        write (see :class:`_ObjectBackend`), naming pid, host and start.
        """
        with self._backend.hold_lock(self):
            # Only the lock holder may touch staged groups: finish or drop what a
            # killed run left there.
            if self.mode == "a":
                self._recover_staging()
            yield self
