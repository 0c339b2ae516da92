"""Fetch: read the rows of one load from every dataset concurrently, straight into their output places.

A load is a list of global row ranges. They are split at dataset boundaries; the caller (assembly)
says where every row goes — an output row for dense data, an element offset for CSR — and the fetcher
reads and places them:

- arrays in our own sharded layout on a local disk (:mod:`annbatch._shards`): the load's rows become
  element spans, cut into a few tasks for a thread pool; each task is one numba call that reads,
  decodes and places its spans' chunks without the GIL (raw dense rows are read by vectored reads
  directly into place);
- other zarr arrays (object storage, other layouts): all ranges are read at once through zarr's async
  API (decoded in parallel by zarrs), then placed;
- numpy, scipy and h5py data: sliced, then placed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from annbatch._backing import Backing
from annbatch._csr import scatter_chunk
from annbatch._shards import ChunkIndex, RawReads, ShardedReader, SpanReader

Range = tuple[int, int, int]  # (dataset, local start, local stop)


class Fetcher:
    """Reads global row ranges of a set of datasets (all CSR or all dense) into caller-laid-out buffers."""

    def __init__(self, backings: Sequence[Backing]):
        self._backings = list(backings)
        self._offsets = np.cumsum([0] + [b.n_obs for b in self._backings])
        self.kind = self._backings[0].kind
        self._pool: ThreadPoolExecutor | None = None
        self._n_workers = os.cpu_count() or 2
        # Shard files this fetcher opened (one epoch's worth), by role / by raw dense source.
        self._span_readers: dict[str, list[SpanReader | None]] = {}
        self._raw_indexes: dict[int, ChunkIndex] = {}

    def close(self) -> None:
        """Stop the read threads and close shard files."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for readers in self._span_readers.values():
            for reader in {id(r): r for r in readers if r is not None}.values():
                reader.close()
        for index in self._raw_indexes.values():
            index.close()
        self._span_readers, self._raw_indexes = {}, {}

    def submit(self, tasks: Sequence[tuple]) -> list[Future]:
        """Start ``(function, *args)`` tasks on the read threads."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._n_workers, thread_name_prefix="annbatch-read")
        return [self._pool.submit(fn, *args) for fn, *args in tasks]

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

    def _spans_of(self, role: str) -> list[SpanReader | None]:
        """Per dataset, the span reader for its ``role`` array (``None``: not in our sharded layout)."""
        if role not in self._span_readers:
            sources = [getattr(b, role) for b in self._backings]
            by_dtype: dict[np.dtype, list] = {}
            for d, source in enumerate(sources):
                if isinstance(source, ShardedReader):
                    by_dtype.setdefault(source.dtype, [None] * len(sources))[d] = source
            readers: list[SpanReader | None] = [None] * len(sources)
            for group in by_dtype.values():
                reader = SpanReader(group)
                for d, source in enumerate(group):
                    if source is not None:
                        readers[d] = reader
            self._span_readers[role] = readers
        return self._span_readers[role]

    def _raw_index(self, source: ShardedReader) -> ChunkIndex:
        if id(source) not in self._raw_indexes:
            self._raw_indexes[id(source)] = source.open()
        return self._raw_indexes[id(source)]

    def _span_tasks(self, role: str, spans: list[tuple[int, int, int]], lo, hi, dest, out) -> list[tuple]:
        """Tasks reading ``spans`` (``(dataset, first, stop)`` into ``lo``/``hi``/``dest``) of ``role`` arrays."""
        readers = self._spans_of(role)
        groups: dict[int, tuple[SpanReader, list]] = {}
        for span in spans:
            reader = readers[span[0]]
            groups.setdefault(id(reader), (reader, []))[1].append(span)
        tasks = []
        for reader, group in groups.values():
            table = np.array(group, dtype=np.int64)
            # Balance tasks by elements; a few per thread so a slow one does not hold up the load.
            size = hi[table[:, 2] - 1] - lo[table[:, 1]]
            cuts = np.searchsorted(np.cumsum(size), np.linspace(0, size.sum(), 2 * self._n_workers + 1)[1:-1])
            for part in np.split(table, np.unique(cuts)):
                if len(part):
                    tasks.append((reader.read, part, lo, hi, dest, out))
        return tasks

    # -- reading --------------------------------------------------------------------------------------------
    def dense_tasks(self, ranges: Sequence[Range], dest: np.ndarray, out: np.ndarray) -> list[tuple]:
        """Tasks (for :meth:`submit`) placing row ``i`` of the ranges at ``out[dest[i]]`` (skipped if < 0).

        Data that is not in our sharded layout is read and placed right away.
        """
        fallback, raw, spans, pos = [], {}, [], 0
        items = int(np.prod(out.shape[1:], dtype=np.int64))
        for d, lo, hi in ranges:
            source, rows_dest = self._backings[d].array, dest[pos : pos + hi - lo]
            if isinstance(source, ShardedReader) and not source.compressed and source.dtype == out.dtype:
                raw.setdefault(id(source), (source, []))[1].append((lo, hi, rows_dest))
            elif isinstance(source, ShardedReader):
                spans.append((d, pos, pos + hi - lo))
            else:
                fallback.append((source, lo, hi, rows_dest))
            pos += hi - lo
        tasks = []
        if spans:  # every row is a span of ``items`` elements
            rows = np.concatenate([np.arange(lo, hi, dtype=np.int64) for _, lo, hi in ranges])
            lo_e = rows * items
            dest_e = np.where(dest >= 0, dest * items, -1)
            tasks += self._span_tasks("array", spans, lo_e, lo_e + items, dest_e, out.reshape(-1))
        if raw:
            reads = RawReads.concat(
                [source.plan_raw_reads(self._raw_index(source), parts, out) for source, parts in raw.values()]
            )
            tasks += [(part.run,) for part in reads.split(self._n_workers)]
        for *_, rows_dest, part in _read_ranges(fallback, out.dtype):
            valid = rows_dest >= 0
            out[rows_dest[valid]] = part[valid]
        return tasks

    def csr_tasks(
        self, ranges: Sequence[Range], dest: np.ndarray, out_data: np.ndarray, out_indices: np.ndarray
    ) -> list[tuple]:
        """Tasks placing row ``i`` of the ranges at element offset ``dest[i]`` of ``out_data``/``out_indices``.

        Data that is not in our sharded layout is read and placed right away.
        """
        if not ranges:
            return []
        lo = np.concatenate([self._backings[d].indptr[a:b] for d, a, b in ranges])
        hi = np.concatenate([self._backings[d].indptr[a + 1 : b + 1] for d, a, b in ranges])
        spans: dict[str, list] = {"data": [], "indices": []}
        fallback, pos = [], 0
        for d, a, b in ranges:
            backing = self._backings[d]
            row = slice(pos, pos + b - a)
            pos += b - a
            for role, out in (("data", out_data), ("indices", out_indices)):
                source = getattr(backing, role)
                if isinstance(source, ShardedReader):
                    spans[role].append((d, row.start, row.stop))
                else:
                    e0, e1 = int(backing.indptr[a]), int(backing.indptr[b])
                    fallback.append((source, e0, e1, (lo[row], hi[row], dest[row], out)))
        for _, e0, _, (row_lo, row_hi, rows_dest, out), part in _read_ranges(fallback, None):
            scatter_chunk(part, e0, row_lo, row_hi, rows_dest, out)
        tasks = []
        for role, out in (("data", out_data), ("indices", out_indices)):
            if spans[role]:
                tasks += self._span_tasks(role, spans[role], lo, hi, dest, out)
        return tasks


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
