"""Fetch: read the rows of one load from every dataset concurrently into one buffer.

A load is a list of global row ranges. They are split at dataset boundaries, the output position of
each range is computed up front (for CSR from the in-memory ``indptr``), one buffer is allocated, and
every range is read straight into its slot: zarr ranges all at once through zarr's async API (decoded
in parallel by zarrs), in-memory and h5py ranges by plain slicing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.sync import sync

from annbatch._backing import Backing
from annbatch._csr import RawCSR
from annbatch._shards import ShardedReader, run_tasks


@dataclass
class Loaded:
    """The rows of one load, in load order, with their global row ids."""

    X: np.ndarray | RawCSR
    rows: np.ndarray  # int64 global row id of every loaded row


class Fetcher:
    """Reads global row ranges of a set of datasets (all CSR or all dense, one dtype)."""

    def __init__(self, backings: Sequence[Backing], dtype: np.dtype):
        self._backings = list(backings)
        self._dtype = np.dtype(dtype)
        self._offsets = np.cumsum([0] + [b.n_obs for b in self._backings])
        self.kind = self._backings[0].kind
        self._pool: ThreadPoolExecutor | None = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 2, thread_name_prefix="annbatch-read"
            )
        return self._pool

    def close(self) -> None:
        """Stop the read threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @property
    def n_obs(self) -> int:
        """Total rows over all datasets."""
        return int(self._offsets[-1])

    def split(self, requests) -> list[tuple[int, int, int]]:
        """Global requests (slices or an int array) as ``(dataset, start, stop)`` local ranges."""
        if isinstance(requests, np.ndarray):
            requests = _runs(requests)
        ranges = []
        for req in requests:
            start, stop = req.start, req.stop
            while start < stop:
                d = int(np.searchsorted(self._offsets, start, side="right")) - 1
                end = min(stop, int(self._offsets[d + 1]))
                ranges.append((d, start - int(self._offsets[d]), end - int(self._offsets[d])))
                start = end
        return ranges

    def fetch(self, requests) -> Loaded:
        """Read the rows of ``requests`` into a new buffer."""
        ranges = self.split(requests)
        rows = np.concatenate(
            [np.arange(lo, hi, dtype=np.int64) + self._offsets[d] for d, lo, hi in ranges]
            or [np.empty(0, np.int64)]
        )
        if self.kind == "dense":
            return Loaded(self._fetch_dense(ranges), rows)
        return Loaded(self._fetch_csr(ranges), rows)

    def _fetch_dense(self, ranges) -> np.ndarray:
        first = self._backings[0]
        out = np.empty((sum(hi - lo for _, lo, hi in ranges), *first.shape[1:]), dtype=self._dtype)
        jobs, pos = [], 0
        for d, lo, hi in ranges:
            jobs.append((self._backings[d].array, lo, hi, out[pos : pos + hi - lo]))
            pos += hi - lo
        _read_all(jobs, self._executor())
        return out

    def _fetch_csr(self, ranges) -> RawCSR:
        n_rows = sum(hi - lo for _, lo, hi in ranges)
        indptr = np.empty(n_rows + 1, dtype=np.int64)
        indptr[0] = 0
        pos, row = 0, 0
        spans = []
        for d, lo, hi in ranges:
            ip = self._backings[d].indptr
            a, b = int(ip[lo]), int(ip[hi])
            indptr[row + 1 : row + 1 + hi - lo] = ip[lo + 1 : hi + 1] - a + pos
            spans.append((d, a, b, pos))
            pos += b - a
            row += hi - lo
        data = np.empty(pos, dtype=self._dtype)
        indices = np.empty(pos, dtype=self._backings[0].index_dtype)
        jobs = []
        for d, a, b, p in spans:
            backing = self._backings[d]
            jobs.append((backing.data, a, b, data[p : p + b - a]))
            jobs.append((backing.indices, a, b, indices[p : p + b - a]))
        _read_all(jobs, self._executor())
        return RawCSR(data, indices, indptr, (n_rows, self._backings[0].shape[1]))


def _runs(rows: np.ndarray) -> list[slice]:
    """Consecutive runs of an int array of rows, as slices (order kept)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [rows.size]])
    return [slice(int(rows[s]), int(rows[e - 1]) + 1) for s, e in zip(starts, stops, strict=True)]


def _read_all(jobs: list[tuple[object, int, int, np.ndarray]], pool: Executor | None = None) -> None:
    """Fill every ``out`` with ``source[start:stop]``; zarr and shard sources are read concurrently."""
    zarr_jobs, chunk_tasks = [], []
    for source, start, stop, out in jobs:
        if stop <= start:
            continue
        if isinstance(source, ShardedReader) and out.dtype == source.dtype:
            chunk_tasks += source.tasks(start, stop, out)
        elif isinstance(source, ShardedReader):
            tmp = np.empty(out.shape, dtype=source.dtype)
            run_tasks(source.tasks(start, stop, tmp), pool)
            out[...] = tmp
        elif isinstance(source, zarr.Array):
            zarr_jobs.append((source, start, stop, out))
        elif out.dtype == source.dtype and isinstance(source, np.ndarray):
            out[...] = source[start:stop]
        else:
            out[...] = np.asarray(source[start:stop])  # h5py, or a dtype promotion
    if zarr_jobs:
        sync(_read_zarr(zarr_jobs))
    run_tasks(chunk_tasks, pool)


async def _read_zarr(jobs) -> None:
    prototype = default_buffer_prototype()

    async def one(source: zarr.Array, start: int, stop: int, out: np.ndarray) -> None:
        selection = (slice(start, stop), *(slice(None),) * (out.ndim - 1))
        if out.dtype == source.dtype:
            await source._async_array.get_orthogonal_selection(
                selection, out=NDBuffer.from_numpy_array(out), prototype=prototype
            )
        else:  # promotion across datasets: read in the stored dtype, then cast into place
            out[...] = await source._async_array.getitem(selection, prototype=prototype)

    await asyncio.gather(*(one(*job) for job in jobs))
