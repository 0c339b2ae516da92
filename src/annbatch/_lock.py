"""One writer at a time: an exclusive write lock on a collection, taken by writers and never by readers.

The lock lives next to the collection's ``zarr.json`` as ``.lock`` (a key readers skip, like ``.staging``)
and holds JSON naming its holder: host, pid, when it was taken and, on object storage, a heartbeat.

- **Local disk**: ``fcntl.flock`` on ``.lock``. The kernel drops the lock when its process dies (also
  on SIGKILL), so a killed writer never blocks the next one, and no two processes can both get it. On a
  network file system the lock is as good as the mount's lock support (NFS with ``nolock`` only excludes
  processes of one host). The holder deletes the file when done, so the file exists only while a write
  runs or after a killed one.
- **Object storage** (:class:`zarr.storage.ObjectStore`): the lock object is created with a conditional
  put (``mode="create"``), so exactly one writer creates it. The holder refreshes its heartbeat every
  ``stale_after / 5`` seconds, each time as a conditional update of the version it wrote last. A lock is
  stale when its holder ran on this host and its pid is gone, or when its heartbeat is older than
  ``stale_after`` (hosts' clocks must agree to well within that). A stale lock is taken over with a
  conditional update of exactly the version seen stale, so of several writers taking over the same
  stale lock one wins and the others see a fresh lock.
- Other stores (memory, fsspec): no lock; such collections are meant for one process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path

import zarr
from zarr.storage import LocalStore, ObjectStore, WrapperStore

LOCK = ".lock"
STALE_AFTER = 300.0
"""Seconds without a heartbeat after which an object-storage lock of another host is taken over."""

_POLL = 0.2  # seconds between attempts while waiting for the lock


class LockHeld(Exception):
    """The lock is held by another writer, described by ``holder`` (host, pid, since; may be empty)."""

    def __init__(self, holder: dict, where: str, *, waited: float):
        self.holder = holder
        self.where = where
        self.waited = waited
        super().__init__(describe(holder))


def describe(holder: dict) -> str:
    """``host …, pid …, since …`` for a holder, as far as known."""
    if not holder:
        return "an unknown writer (its lock holds no readable owner yet)"
    parts = [f"host {holder.get('host', '?')!r}", f"pid {holder.get('pid', '?')}"]
    if "since" in holder:
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


class WriteLock:
    """The write lock of one collection group.

    Parameters
    ----------
    group
        The collection's root group.
    stale_after
        Object storage only: seconds without a heartbeat after which a lock is considered abandoned.
    """

    def __init__(self, group: zarr.Group, *, stale_after: float = STALE_AFTER):
        store = group.store
        while isinstance(store, WrapperStore):
            store = store._store
        if isinstance(store, LocalStore):
            self._backend: _Backend = _FileLock(Path(store.root) / group.path / LOCK)
        elif isinstance(store, ObjectStore):
            prefix = f"{group.path}/" if group.path else ""
            self._backend = _ObjectLock(store.store, prefix + LOCK, stale_after=stale_after)
        else:
            self._backend = _Backend()
        self._held = False

    def try_acquire(self) -> bool:
        """Take the lock if it is free (or stale); never waits."""
        self._held = self._backend.try_acquire()
        return self._held

    def acquire(self, timeout: float = 0.0) -> None:
        """Take the lock, waiting up to ``timeout`` seconds; raise :class:`LockHeld` after that."""
        start = time.monotonic()
        while not self.try_acquire():
            waited = time.monotonic() - start
            if waited >= timeout:
                raise LockHeld(self._backend.holder(), self._backend.where, waited=waited)
            time.sleep(min(_POLL, max(timeout - waited, 0.0)))

    def release(self) -> None:
        """Give the lock back (a no-op when not held)."""
        if self._held:
            self._held = False
            self._backend.release()

    def __enter__(self) -> WriteLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _owner() -> dict:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "heartbeat": now,
        "token": uuid.uuid4().hex,
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _parse(payload: bytes) -> dict:
    try:
        holder = json.loads(payload)
    except ValueError:  # written but not yet complete, or not ours
        return {}
    return holder if isinstance(holder, dict) else {}


class _Backend:
    """No lock (stores only one process uses, such as a MemoryStore)."""

    where = "(no lock)"

    def try_acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def holder(self) -> dict:
        return {}


class _FileLock(_Backend):
    def __init__(self, path: Path):
        self._path = path
        self.where = str(path)
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        import fcntl

        while True:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                warnings.warn(
                    f"The file system of {str(self._path.parent)!r} does not support file locks ({err}); "
                    "writing without excluding other writers. Do not append from two processes at once.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return True
            # The previous holder deletes the file before unlocking it: if we locked a file that is no
            # longer the one at the path, a newcomer may lock the new file too. Start over then.
            try:
                same = os.stat(self._path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            # Whatever the file holds was written by a holder that is gone (killed): its flock went
            # with it. Replace it with ourselves.
            payload = json.dumps(_owner()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, payload, 0)
            self._fd = fd
            return True

    def release(self) -> None:
        if self._fd is None:
            return
        # Delete while still locked (see try_acquire), then unlock by closing.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        os.close(self._fd)
        self._fd = None

    def holder(self) -> dict:
        try:
            return _parse(self._path.read_bytes())
        except FileNotFoundError:
            return {}


class _ObjectLock(_Backend):
    def __init__(self, store, key: str, *, stale_after: float):
        self._store = store
        self._key = key
        self.where = key
        self._stale_after = stale_after
        self._mine: dict | None = None
        self._e_tag: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._last_seen: dict = {}
        self.lost = False

    def try_acquire(self) -> bool:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        mine = _owner()
        payload = json.dumps(mine).encode()
        try:
            result = obstore.put(self._store, self._key, payload, mode="create")
        except AlreadyExistsError:
            try:
                current = obstore.get(self._store, self._key)
            except FileNotFoundError:
                return False  # released just now: the next attempt may get it
            holder = _parse(bytes(current.bytes()))
            self._last_seen = holder
            if not self._is_stale(holder):
                return False
            try:  # only the version we saw stale: of several writers taking it over, one wins
                result = obstore.put(self._store, self._key, payload, mode={"e_tag": current.meta["e_tag"]})
            except (PreconditionError, FileNotFoundError):
                return False
        self._mine, self._e_tag, self.lost = mine, result["e_tag"], False
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="annbatch-lock-heartbeat", daemon=True)
        self._beat.start()
        return True

    def _is_stale(self, holder: dict) -> bool:
        if not holder:
            return False  # unreadable: a writer between creating and filling it is not stale
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return True
        return time.time() - float(holder.get("heartbeat", 0)) > self._stale_after

    def _heartbeat(self) -> None:
        import obstore

        while not self._stop.wait(self._stale_after / 5):
            assert self._mine is not None  # set before the heartbeat starts, cleared after it stops
            self._mine["heartbeat"] = time.time()
            try:
                result = obstore.put(
                    self._store, self._key, json.dumps(self._mine).encode(), mode={"e_tag": self._e_tag}
                )
            except Exception:  # noqa: BLE001 - taken over (precondition) or a network error: retry once
                if not self._still_mine():
                    self.lost = True
                    warnings.warn(
                        f"The write lock {self._key!r} was taken over by another writer (this process's "
                        f"heartbeat stopped for over {self._stale_after:.0f} s?).",
                        RuntimeWarning,
                        stacklevel=1,
                    )
                    return
                continue
            self._e_tag = result["e_tag"]

    def _still_mine(self) -> bool:
        import obstore

        try:
            current = obstore.get(self._store, self._key)
        except Exception:  # noqa: BLE001
            return True  # cannot tell (network): keep trying
        assert self._mine is not None  # asked only while the lock is held
        ours = _parse(bytes(current.bytes())).get("token") == self._mine["token"]
        if ours:
            self._e_tag = current.meta["e_tag"]
        return ours

    def release(self) -> None:
        import obstore

        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self._mine is not None and not self.lost and self._still_mine():
            # S3 offers no conditional delete through obstore; the check above leaves a window of one
            # request in which a lock taken over from us (we were stale) could be deleted.
            with contextlib.suppress(FileNotFoundError):
                obstore.delete(self._store, self._key)
        self._mine = None

    def holder(self) -> dict:
        import obstore

        try:
            return _parse(bytes(obstore.get(self._store, self._key).bytes()))
        except FileNotFoundError:
            return self._last_seen
