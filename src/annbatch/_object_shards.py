"""A reader for the sharded arrays annbatch writes, in object storage (S3, GCS, Azure) via obstore.

zarr-python reads a run of rows of a sharded array with one request for the shard's index and one
per inner chunk, for every call. Against object storage each request costs a round trip (10–50 ms)
and the server's per-request work, so a load of a few hundred runs becomes thousands of requests.
For our layout (:class:`~annbatch._shards.ShardLayout`) this reader instead

- reads each shard's index once (one suffix request, checksum verified) and keeps it;
- asks, per shard and load, for all the inner chunks the load needs in one
  :func:`obstore.get_ranges_async` call, which merges neighbouring byte ranges into single requests
  and runs up to ten of them at a time; all shards of a load are fetched concurrently;
- decodes the chunks (blosc, or raw little-endian bytes) after the network wait, outside the event
  loop.

Waiting happens in obstore's async client, which does not hold the GIL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import obstore
import zarr
from numcodecs import blosc
from zarr.core.sync import sync
from zarr.storage import ObjectStore

from annbatch._shards import NOT_STORED, ShardLayout, missing_index, shard_layout

Job = tuple[int, int]  # rows start:stop of one read
# Stored bytes (obstore ``Bytes``) by inner chunk; chunks absent from it hold the fill value.
Fetched = dict[int, object]


class ObjectShardReader:
    """One array of our layout in object storage; :meth:`read` reads many row ranges at once.

    Shard indexes are fetched on first use and kept for the reader's life (a loader's): collections are
    never rewritten in place (appends add datasets; a rewrite makes new objects under a new loader).
    """

    def __init__(self, store, key: str, layout: ShardLayout, *, complete: bool, name: str):
        self._store = store  # an obstore store
        self._key = key  # the array's key in the store
        self._layout = layout
        self._complete = complete
        self._name = name  # for messages: the URL and array path, without credentials
        self._indexes: dict[int, np.ndarray] = {}
        self.shape, self.dtype = layout.shape, layout.dtype
        self.ndim = len(layout.shape)

    def __repr__(self) -> str:
        return f"ObjectShardReader({self._name}, shape={self.shape}, dtype={self.dtype})"

    def read(self, jobs: Sequence[Job]) -> list[np.ndarray]:
        """``array[start:stop]`` for every ``(start, stop)`` of ``jobs``, with one round of requests."""
        return self.assemble(jobs, sync(self.fetch(jobs)))

    async def fetch(self, jobs: Sequence[Job]) -> Fetched:
        """The stored bytes of every inner chunk ``jobs`` touch (no decoding: that is :meth:`assemble`)."""
        layout = self._layout
        chunks = np.unique(
            np.concatenate([_chunks_of(layout, a, b) for a, b in jobs] or [np.empty(0, np.int64)])
        )
        shards = chunks // layout.per_shard
        indexes = await self._load_indexes(np.unique(shards).tolist())
        got: Fetched = {}

        async def one_shard(s: int, ks: np.ndarray) -> None:
            index = indexes[s][ks - s * layout.per_shard]
            stored = index[:, 0] != NOT_STORED
            if not stored.any():
                return
            ks, index = ks[stored], index[stored].astype(np.int64)
            parts = await obstore.get_ranges_async(
                self._store, self._shard_key(s), starts=index[:, 0].tolist(), lengths=index[:, 1].tolist()
            )
            got.update(zip(ks.tolist(), parts, strict=True))

        groups = np.split(chunks, np.flatnonzero(np.diff(shards)) + 1) if len(chunks) else []
        await asyncio.gather(*(one_shard(int(g[0] // layout.per_shard), g) for g in groups))
        return got

    def assemble(self, jobs: Sequence[Job], fetched: Fetched) -> list[np.ndarray]:
        """Decode the fetched chunks and cut ``array[start:stop]`` of every job out of them."""
        layout = self._layout
        n, items = layout.chunk_items, layout.row_items
        decoded = {k: self._decode(k, raw) for k, raw in fetched.items()}
        out = []
        for start, stop in jobs:
            e0, e1 = start * items, stop * items
            part = np.empty(e1 - e0, dtype=layout.dtype)
            for k in _chunks_of(layout, start, stop).tolist():
                c0 = k * n
                a, b = max(e0, c0), min(e1, c0 + n, layout.n_items)
                if k in decoded:
                    part[a - e0 : b - e0] = decoded[k][a - c0 : b - c0]
                else:
                    part[a - e0 : b - e0] = layout.fill_value
            out.append(part.reshape(stop - start, *layout.shape[1:]))
        return out

    def _decode(self, k: int, raw) -> np.ndarray:
        layout = self._layout
        n_items = min(layout.chunk_items, layout.n_items - k * layout.chunk_items)
        try:
            if layout.compressed:
                values = np.frombuffer(blosc.decompress(raw), dtype=layout.dtype)
            else:
                values = np.frombuffer(raw, dtype=layout.dtype)
        except (RuntimeError, ValueError) as err:
            raise OSError(
                f"Chunk {k} of {self._name} is corrupt ({err}); rebuild the collection from its inputs."
            ) from err
        if len(values) < n_items:
            raise OSError(
                f"Chunk {k} of {self._name} holds {len(values)} values, not {n_items}; the collection is "
                "damaged. Rebuild it from its inputs."
            )
        return values

    def _shard_key(self, s: int) -> str:
        return f"{self._key}/{self._layout.shard_key(s)}"

    async def _load_indexes(self, shards: list[int]) -> dict[int, np.ndarray]:
        known = {s: self._indexes[s] for s in shards if s in self._indexes}
        todo = [s for s in shards if s not in known]
        read = dict(zip(todo, await asyncio.gather(*(self._read_index(s) for s in todo)), strict=True))
        self._indexes.update(read)  # concurrent readers may both fetch a shard's index once: harmless
        return known | read

    async def _read_index(self, s: int) -> np.ndarray:
        where = f"{self._name}/{self._layout.shard_key(s)}"
        try:
            result = await obstore.get_async(
                self._store, self._shard_key(s), options={"range": {"suffix": self._layout.index_nbytes}}
            )
            raw = await result.bytes_async()
        except FileNotFoundError:
            if self._complete:  # our writer stores every shard: a missing one is damage, not zeros
                raise FileNotFoundError(
                    f"Shard {where} is missing; the collection is damaged. Rebuild it from its inputs."
                ) from None
            return missing_index(self._layout)
        return self._layout.parse_index(memoryview(raw), where)


def _chunks_of(layout: ShardLayout, start: int, stop: int) -> np.ndarray:
    """Inner chunks holding rows ``start:stop``."""
    if stop <= start:
        return np.empty(0, np.int64)
    n, items = layout.chunk_items, layout.row_items
    return np.arange(start * items // n, (stop * items - 1) // n + 1, dtype=np.int64)


def object_shard_reader(arr: zarr.Array, *, complete: bool, name: str) -> ObjectShardReader | None:
    """An :class:`ObjectShardReader` for ``arr`` when it is in object storage in our layout, else ``None``."""
    if not isinstance(arr.store, ObjectStore):
        return None
    layout = shard_layout(arr)
    if layout is None:
        return None
    return ObjectShardReader(arr.store.store, arr.path, layout, complete=complete, name=name)
