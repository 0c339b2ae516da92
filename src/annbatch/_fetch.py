"""Fetch: read the rows of one load from every dataset concurrently, straight into their output places.

A load is a list of global row ranges. They are split at dataset boundaries; the caller (assembly)
says where every row goes — an output row for dense data, an element offset for CSR — and the fetcher
reads and places them:

- arrays in our own sharded layout on a local disk (:mod:`annbatch._shards`): every inner chunk is a
  task on a thread pool that decodes the chunk into a per-thread scratch buffer and copies its rows
  to their destinations while the chunk is still in cache (raw dense rows are read by one vectored
  read directly into place);
- other zarr arrays (object storage, other layouts): all ranges are read at once through zarr's async
  API (decoded in parallel by zarrs), then placed;
- numpy, scipy and h5py data: sliced, then placed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from annbatch._backing import Backing
from annbatch._csr import scatter_chunk
from annbatch._shards import ShardedReader, run_raw_reads

Range = tuple[int, int, int]  # (dataset, local start, local stop)


class Fetcher:
    """Reads global row ranges of a set of datasets (all CSR or all dense) into caller-laid-out buffers."""

    def __init__(self, backings: Sequence[Backing]):
        self._backings = list(backings)
        self._offsets = np.cumsum([0] + [b.n_obs for b in self._backings])
        self.kind = self._backings[0].kind
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the read threads and close shard files."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for backing in self._backings:
            for source in (backing.array, backing.data, backing.indices):
                if isinstance(source, ShardedReader):
                    source.close()

    def _run(self, tasks: list) -> None:
        if len(tasks) < 2:
            for fn, *args in tasks:
                fn(*args)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 2, thread_name_prefix="annbatch-read"
            )
        for future in [self._pool.submit(fn, *args) for fn, *args in tasks]:
            future.result()

    # -- planning -------------------------------------------------------------------------------------------
    def split(self, requests) -> list[Range]:
        """Global requests (slices or an int array) as ``(dataset, start, stop)`` local ranges."""
        if isinstance(requests, np.ndarray):
            requests = _runs(requests)
        ranges = []
        for req in requests:
            start, stop = req.start, req.stop
            if start < 0 or stop > self._offsets[-1]:
                raise IndexError(f"Requested rows {start}:{stop} are outside [0, {int(self._offsets[-1])}).")
            while start < stop:
                d = int(np.searchsorted(self._offsets, start, side="right")) - 1
                end = min(stop, int(self._offsets[d + 1]))
                ranges.append((d, start - int(self._offsets[d]), end - int(self._offsets[d])))
                start = end
        return ranges

    def global_rows(self, ranges: Sequence[Range]) -> np.ndarray:
        """Global row ids of the rows of ``ranges``, in order."""
        parts = [np.arange(lo, hi, dtype=np.int64) + self._offsets[d] for d, lo, hi in ranges]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def row_nnz(self, ranges: Sequence[Range]) -> np.ndarray:
        """Stored values per row of ``ranges`` (CSR), from the in-memory ``indptr``."""
        parts = [np.diff(self._backings[d].indptr[lo : hi + 1]) for d, lo, hi in ranges]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    # -- reading --------------------------------------------------------------------------------------------
    def read_dense(self, ranges: Sequence[Range], dest: np.ndarray, out: np.ndarray) -> None:
        """Row ``i`` of the ranges (in order) goes to ``out[dest[i]]`` (skipped when ``dest[i] < 0``)."""
        tasks, fallback, raw, pos = [], [], {}, 0
        for d, lo, hi in ranges:
            source, rows_dest = self._backings[d].array, dest[pos : pos + hi - lo]
            pos += hi - lo
            if isinstance(source, ShardedReader) and not source.compressed and source.dtype == out.dtype:
                raw.setdefault(id(source), (source, []))[1].append((lo, hi, rows_dest))
            elif isinstance(source, ShardedReader):
                tasks.append((_place_dense_chunks, source, lo, hi, rows_dest, out))
            else:
                fallback.append((source, lo, hi, rows_dest))
        calls = [call for source, parts in raw.values() for call in source.plan_raw_reads(parts, out)]
        n_workers = os.cpu_count() or 2
        tasks += [(run_raw_reads, calls[i::n_workers]) for i in range(min(n_workers, len(calls)))]
        for *_, rows_dest, part in _read_ranges(fallback, out.dtype):
            valid = rows_dest >= 0
            out[rows_dest[valid]] = part[valid]
        self._run(tasks)

    def read_csr(
        self, ranges: Sequence[Range], dest: np.ndarray, out_data: np.ndarray, out_indices: np.ndarray
    ) -> None:
        """Row ``i`` of the ranges (in order) goes to element offset ``dest[i]`` of ``out_data``/``out_indices``."""
        tasks, fallback, pos = [], [], 0
        for d, lo, hi in ranges:
            backing = self._backings[d]
            ip = backing.indptr
            row_lo, row_hi = ip[lo:hi], ip[lo + 1 : hi + 1]
            rows_dest = dest[pos : pos + hi - lo]
            pos += hi - lo
            a, b = int(ip[lo]), int(ip[hi])
            for source, out in ((backing.data, out_data), (backing.indices, out_indices)):
                if isinstance(source, ShardedReader):  # one task per range: fewer hand-offs than per chunk
                    tasks.append(
                        (_place_csr_chunks, source, source.chunk_range(a, b), row_lo, row_hi, rows_dest, out)
                    )
                else:
                    fallback.append((source, a, b, (row_lo, row_hi, rows_dest, out)))
        for _, a, _, (row_lo, row_hi, rows_dest, out), part in _read_ranges(fallback, None):
            scatter_chunk(part, a, row_lo, row_hi, rows_dest, out)
        self._run(tasks)


def _place_dense_chunks(
    source: ShardedReader, lo: int, hi: int, rows_dest: np.ndarray, out: np.ndarray
) -> None:
    for k in source.chunk_range(lo, hi):
        c0 = k * source.chunk_len
        a, b = max(lo, c0), min(hi, c0 + source.chunk_len)
        dest = rows_dest[a - lo : b - lo]
        valid = dest >= 0
        out[dest[valid]] = source.decode(k)[a - c0 : b - c0][valid]


def _place_csr_chunks(source: ShardedReader, chunks: range, row_lo, row_hi, rows_dest, out) -> None:
    for k in chunks:
        scatter_chunk(source.decode(k), k * source.chunk_len, row_lo, row_hi, rows_dest, out)


def _runs(rows: np.ndarray) -> list[slice]:
    """Consecutive runs of an int array of rows, as slices (order kept)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [rows.size]])
    return [slice(int(rows[s]), int(rows[e - 1]) + 1) for s, e in zip(starts, stops, strict=True)]


def _read_ranges(jobs: list[tuple], dtype: np.dtype | None) -> list[tuple]:
    """``source[start:stop]`` of every job, zarr arrays read concurrently; each job gets its part appended."""
    if not jobs:
        return []
    parts: list = [None] * len(jobs)
    zarr_jobs = []
    for i, (source, start, stop, _) in enumerate(jobs):
        if isinstance(source, zarr.Array):
            zarr_jobs.append((i, source, start, stop))
        else:
            parts[i] = np.asarray(source[start:stop])
    if zarr_jobs:
        for i, part in zip([j[0] for j in zarr_jobs], sync(_read_zarr(zarr_jobs)), strict=True):
            parts[i] = part
    return [
        (*job, part if dtype is None else part.astype(dtype, copy=False))
        for job, part in zip(jobs, parts, strict=True)
    ]


async def _read_zarr(jobs) -> list[np.ndarray]:
    prototype = default_buffer_prototype()

    async def one(source: zarr.Array, start: int, stop: int) -> np.ndarray:
        selection = (slice(start, stop), *(slice(None),) * (source.ndim - 1))
        return np.asarray(await source._async_array.getitem(selection, prototype=prototype))

    return await asyncio.gather(*(one(source, start, stop) for _, source, start, stop in jobs))
