"""Staging writes so a collection only ever shows complete datasets.

Datasets are written under ``.staging/`` (a key readers skip: only ``dataset_*`` keys are datasets) and
moved into place when complete. Replacing datasets (appending) first records the planned moves in
``.staging/journal.json``; the journal is the commit point. On open, an interrupted commit is finished
and staging left by an interrupted write is removed, so a kill at any moment leaves either the previous
or the new collection. On a local file system moves are renames; on other stores (object storage) the
keys are copied, the dataset's own ``zarr.json`` last, then the staging keys are deleted. Before the
first move, the versions of the datasets about to be replaced are raised, so loaders reading them stop
(:class:`annbatch._datasets.Snapshot`) instead of reading a dataset mid-move.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import obstore
import zarr
from zarr.core.sync import sync
from zarr.storage import LocalStore, ObjectStore

from annbatch._datasets import record_rewrite
from annbatch.errors import CommitError

STAGING = ".staging"
_JOURNAL = f"{STAGING}/journal.json"
_OLD = f"{STAGING}/_replaced"
# Objects copied at once when moving a dataset on object storage (server-side copies: each costs a
# request, no memory here).
_COPY_CONCURRENCY = 16


class Staging:
    """The staging area of one collection group."""

    def __init__(self, group: zarr.Group):
        self._group = group
        self._store = group.store
        self._prefix = f"{group.path}/" if group.path else ""
        store = self._store
        self._root = Path(store.root) / group.path if isinstance(store, LocalStore) else None

    @property
    def store(self):
        """The collection's zarr store."""
        return self._store

    def path(self, name: str) -> str:
        """The path in :attr:`store` of the staged group ``name`` (opening it with ``mode="w"`` empties it)."""
        return self._prefix + f"{STAGING}/{name}"

    def new_group(self, name: str) -> zarr.Group:
        """A fresh, empty group ``.staging/<name>`` to write a dataset into."""
        self._remove(f"{STAGING}/{name}")
        return zarr.open_group(self._store, path=self.path(name), mode="w")

    def commit(self, names: list[str]) -> None:
        """Move the staged groups ``names`` into place, replacing groups of the same name.

        If moving fails after the journal is written (a network error on object storage), the
        staged and replaced datasets stay in staging and the commit is finished the next time the
        collection is opened for writing.
        """
        self._write_journal(names)
        try:
            self._apply_journal(names)
        except Exception as err:
            raise CommitError(
                f"Moving the new datasets into place failed ({err}). Nothing is lost: open the collection "
                "for writing (mode='a' or 'r+') to finish the commit from its journal."
            ) from err

    def recover(self) -> None:
        """Finish an interrupted commit, then drop whatever else is left in staging."""
        names = self._read_journal()
        if names is not None:
            self._apply_journal(names)
        self._remove(STAGING)
        if self._root is not None:  # zarr's temporary files from a write that was killed midway
            for leftover in self._root.glob("zarr.*.partial"):
                leftover.unlink(missing_ok=True)

    def discard(self) -> None:
        """Drop everything staged (after a failed or cancelled write)."""
        self._remove(STAGING)

    # -- journal -----------------------------------------------------------------------------------------
    def _write_journal(self, names: list[str]) -> None:
        payload = json.dumps({"commit": names}).encode()
        if self._root is not None:
            tmp = self._root / f"{_JOURNAL}.tmp"
            tmp.write_bytes(payload)
            tmp.replace(self._root / _JOURNAL)  # atomic: the journal exists whole or not at all
        else:
            sync(self._store.set(self._prefix + _JOURNAL, _buffer(payload)))

    def _read_journal(self) -> list[str] | None:
        if self._root is not None:
            path = self._root / _JOURNAL
            return json.loads(path.read_bytes())["commit"] if path.exists() else None
        buf = sync(self._store.get(self._prefix + _JOURNAL, prototype=_prototype()))
        return None if buf is None else json.loads(buf.to_bytes())["commit"]

    def _apply_journal(self, names: list[str]) -> None:
        # already moved by an earlier, interrupted commit when no longer staged
        pending = [name for name in names if self._exists(f"{STAGING}/{name}")]
        # Before anything moves: a loader reading these datasets learns that they change (Snapshot).
        record_rewrite(self._group, pending)
        for name in pending:
            staged = f"{STAGING}/{name}"
            if self._exists(name):
                self._move(name, f"{_OLD}/{name}")
            self._move(staged, name)
        self._remove(STAGING)

    # -- store operations ------------------------------------------------------------------------------------
    def _exists(self, key: str) -> bool:
        if self._root is not None:
            return (self._root / key).exists()
        return sync(self._store.exists(self._prefix + f"{key}/zarr.json"))

    def _move(self, src: str, dst: str) -> None:
        if self._root is not None:
            (self._root / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self._root / dst, ignore_errors=True)
            (self._root / src).rename(self._root / dst)
            return
        sync(self._copy_prefix(self._prefix + src, self._prefix + dst))
        # The source's zarr.json first: from then on recovery sees it as moved, never as a complete
        # dataset to copy again over the finished copy.
        sync(self._store.delete(self._prefix + f"{src}/zarr.json"))
        sync(self._store.delete_dir(self._prefix + src))

    async def _copy_prefix(self, src: str, dst: str) -> None:
        await self._store.delete_dir(dst)
        keys = [k async for k in self._store.list_prefix(f"{src}/")]
        own = f"{src}/zarr.json"
        limit = asyncio.Semaphore(_COPY_CONCURRENCY)

        async def copy(key: str) -> None:
            async with limit:
                await self._copy_object(key, dst + key[len(src) :])

        # Objects are copied many at once (object storage answers each request after a round trip);
        # the group's own zarr.json last: until then the destination is not a complete node.
        await asyncio.gather(*(copy(k) for k in keys if k != own))
        if own in keys:
            await copy(own)

    async def _copy_object(self, src: str, dst: str) -> None:
        if isinstance(self._store, ObjectStore):  # the service copies it: no bytes through this process
            await obstore.copy_async(self._store.store, src, dst)
            return
        buf = await self._store.get(src, prototype=_prototype())
        assert buf is not None, f"{src} vanished while being copied"  # the writer holds the lock
        await self._store.set(dst, buf)

    def _remove(self, key: str) -> None:
        if self._root is not None:
            shutil.rmtree(self._root / key, ignore_errors=True)
        else:
            sync(self._store.delete_dir(self._prefix + key))


def _prototype():
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype()


def _buffer(payload: bytes):
    return _prototype().buffer.from_bytes(payload)
