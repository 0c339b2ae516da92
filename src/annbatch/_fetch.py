"""Fetch: read the rows of one load from every dataset concurrently, straight into their output places.

A load is a list of global row ranges. They are split at dataset boundaries; the caller (assembly)
says where every row goes — an output row for dense data, an element offset for CSR — and the fetcher
reads and places them:

- arrays in our own sharded layout on a local disk (:mod:`annbatch._shards`): the load's rows become
  element spans, cut into a few tasks for a thread pool; each task is one numba call that reads,
  decodes and places its spans' chunks without the GIL (raw dense rows are read by vectored reads
  directly into place);
- arrays in our layout in object storage (:mod:`annbatch._object_shards`): all ranges of a load are
  fetched at once, neighbouring chunks merged into single requests, then decoded and placed;
- other zarr arrays (other layouts): all ranges are read at once through zarr's async API (decoded
  in parallel by zarrs), then placed;
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
from annbatch._object_shards import ObjectShardReader
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
        starts = np.fromiter((r.start for r in requests), dtype=np.int64, count=len(requests))
        stops = np.fromiter((r.stop for r in requests), dtype=np.int64, count=len(requests))
        n = int(self._offsets[-1])
        bad = (starts < 0) | (stops > n)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise IndexError(f"Requested rows {starts[k]}:{stops[k]} are outside [0, {n}).")
        keep = stops > starts
        starts, stops = starts[keep], stops[keep]
        first = np.searchsorted(self._offsets, starts, side="right") - 1
        last = np.searchsorted(self._offsets, stops - 1, side="right") - 1
        if (first == last).all():  # no request crosses a dataset boundary (the usual case)
            base = self._offsets[first]
            return list(zip(first.tolist(), (starts - base).tolist(), (stops - base).tolist(), strict=True))
        ranges = []
        for d, start, stop in zip(first.tolist(), starts.tolist(), stops.tolist(), strict=True):
            while start < stop:
                end = min(stop, int(self._offsets[d + 1]))
                ranges.append((d, start - int(self._offsets[d]), end - int(self._offsets[d])))
                start, d = end, d + 1
        return ranges

    def global_rows(self, ranges: Sequence[Range]) -> np.ndarray:
        """Global row ids of the rows of ``ranges``, in order."""
        if not ranges:
            return np.empty(0, np.int64)
        d, lo, hi = np.array(ranges, dtype=np.int64).T
        return _concat_aranges(lo + self._offsets[d], hi - lo)

    def row_nnz(self, ranges: Sequence[Range]) -> np.ndarray:
        """Stored values per row of ``ranges`` (CSR), from the in-memory ``indptr``."""
        if not ranges:
            return np.empty(0, np.int64)
        d, lo, hi = np.array(ranges, dtype=np.int64).T
        rows = _concat_aranges(lo, hi - lo)
        owner = np.repeat(d, hi - lo)
        nnz = np.empty(len(rows), dtype=np.int64)
        for k in np.unique(d).tolist():
            here = owner == k
            indptr = self._backings[k].indptr
            nnz[here] = indptr[rows[here] + 1] - indptr[rows[here]]
        return nnz

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

    def _span_tasks(self, role: str, spans: np.ndarray, lo, hi, dest, out) -> list[tuple]:
        """Tasks reading ``spans`` (rows ``(dataset, first, stop)`` into ``lo``/``hi``/``dest``) of ``role`` arrays."""
        readers = self._spans_of(role)
        tasks = []
        n_tasks = 2 * self._n_workers  # a few per thread, so one slow task does not hold up the load
        for reader in {id(readers[d]): readers[d] for d in np.unique(spans[:, 0]).tolist()}.values():
            table = _cut_long_spans(spans[[readers[d] is reader for d in spans[:, 0].tolist()]], n_tasks)
            # Balance tasks by elements.
            size = hi[table[:, 2] - 1] - lo[table[:, 1]]
            cuts = np.searchsorted(np.cumsum(size), np.linspace(0, size.sum(), n_tasks + 1)[1:-1])
            for part in np.split(table, np.unique(cuts)):
                if len(part):
                    tasks.append((reader.read, part, lo, hi, dest, out))
        return tasks

    @staticmethod
    def _table(ranges: Sequence[Range]) -> np.ndarray:
        """Ranges as an ``(n, 4)`` array: dataset, start, stop, and position of the first row in the load."""
        table = np.zeros((len(ranges), 4), dtype=np.int64)
        if len(ranges):
            table[:, :3] = ranges
            np.cumsum(table[:-1, 2] - table[:-1, 1], out=table[1:, 3])
        return table

    # -- reading --------------------------------------------------------------------------------------------
    def dense_tasks(self, ranges: Sequence[Range], dest: np.ndarray, out: np.ndarray) -> list[tuple]:
        """Tasks (for :meth:`submit`) placing row ``i`` of the ranges at ``out[dest[i]]`` (skipped if < 0).

        Data that is not in our sharded layout is read and placed right away.
        """
        table = self._table(ranges)
        tasks, raw, span_parts, fallback = [], [], [], []
        for d in np.unique(table[:, 0]).tolist():
            part, source = table[table[:, 0] == d], self._backings[d].array
            if isinstance(source, ShardedReader) and not source.compressed and source.dtype == out.dtype:
                raw.append(source.plan_raw_reads(self._raw_index(source), part[:, 1:], dest, out))
            elif isinstance(source, ShardedReader):
                span_parts.append(part)
            else:
                fallback += [(source, lo, hi, dest[pos : pos + hi - lo]) for _, lo, hi, pos in part.tolist()]
        if span_parts:  # every row is a span of ``items`` elements
            items = int(np.prod(out.shape[1:], dtype=np.int64))
            lo_e = _concat_aranges(table[:, 1], table[:, 2] - table[:, 1]) * items
            dest_e = np.where(dest >= 0, dest * items, -1)
            parts = np.concatenate(span_parts)
            spans = np.stack([parts[:, 0], parts[:, 3], parts[:, 3] + parts[:, 2] - parts[:, 1]], axis=1)
            tasks += self._span_tasks("array", spans, lo_e, lo_e + items, dest_e, out.reshape(-1))
        if raw:
            tasks += [(part.run,) for part in RawReads.concat(raw).split(self._n_workers)]
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
        table = self._table(ranges)
        d, a, b, pos = table.T
        rows, owner = _concat_aranges(a, b - a), np.repeat(d, b - a)
        lo, hi = np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=np.int64)
        for k in np.unique(d).tolist():  # element runs of the rows, from the in-memory indptr
            here = owner == k
            lo[here] = self._backings[k].indptr[rows[here]]
            hi[here] = self._backings[k].indptr[rows[here] + 1]
        spans = np.stack([d, pos, pos + b - a], axis=1)
        tasks, fallback = [], []
        for role, out in (("data", out_data), ("indices", out_indices)):
            direct = np.array([isinstance(getattr(x, role), ShardedReader) for x in self._backings])[d]
            if direct.any():
                tasks += self._span_tasks(role, spans[direct], lo, hi, dest, out)
            for k, first, stop in spans[~direct].tolist():
                e0, e1 = int(lo[first]), int(hi[stop - 1])
                row = slice(first, stop)
                fallback.append(
                    (getattr(self._backings[k], role), e0, e1, (lo[row], hi[row], dest[row], out))
                )
        for _, e0, _, (row_lo, row_hi, rows_dest, out), part in _read_ranges(fallback, None):
            scatter_chunk(part, e0, row_lo, row_hi, rows_dest, out)
        return tasks


def _cut_long_spans(spans: np.ndarray, n_tasks: int) -> np.ndarray:
    """Spans ``(dataset, first, stop)`` cut at row boundaries so that ``n_tasks`` tasks can share them.

    With fewer spans than tasks (long sequential reads), each span is cut into about equal pieces.
    """
    if len(spans) >= n_tasks:
        return spans
    pieces = -(-n_tasks // len(spans))
    out = []
    for d, first, stop in spans.tolist():
        bounds = np.unique(np.linspace(first, stop, pieces + 1).astype(np.int64))
        out += [(d, a, b) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)]
    return np.array(out, dtype=np.int64)


def _concat_aranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, vectorised."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)


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
    """``source[start:stop]`` of every job, each job with its part appended.

    zarr and object-storage arrays are read concurrently.
    """
    if not jobs:
        return []
    parts: list = [None] * len(jobs)
    zarr_jobs = []
    remote: dict[int, tuple[ObjectShardReader, list[int]]] = {}  # by reader: its jobs
    for i, (source, start, stop, _) in enumerate(jobs):
        if isinstance(source, ObjectShardReader):
            remote.setdefault(id(source), (source, []))[1].append(i)
        elif isinstance(source, zarr.Array):
            zarr_jobs.append((i, source, start, stop))
        else:
            parts[i] = np.asarray(source[start:stop])
    if zarr_jobs or remote:
        readers = [(reader, [(jobs[i][1], jobs[i][2]) for i in ids]) for reader, ids in remote.values()]
        zarr_parts, fetched = sync(_read_async(zarr_jobs, readers))
        for (i, *_), part in zip(zarr_jobs, zarr_parts, strict=True):
            parts[i] = part
        for (reader, ranges), (_, ids), got in zip(readers, remote.values(), fetched, strict=True):
            for i, part in zip(ids, reader.assemble(ranges, got), strict=True):
                parts[i] = part
    return [
        (*job, part if dtype is None else part.astype(dtype, copy=False))
        for job, part in zip(jobs, parts, strict=True)
    ]


async def _read_async(zarr_jobs, readers) -> tuple[list[np.ndarray], list]:
    """Zarr reads and object-storage fetches, all in flight at once."""
    prototype = default_buffer_prototype()

    async def one(source: zarr.Array, start: int, stop: int) -> np.ndarray:
        selection = (slice(start, stop), *(slice(None),) * (source.ndim - 1))
        return np.asarray(await source._async_array.getitem(selection, prototype=prototype))

    zarr_parts = asyncio.gather(*(one(source, start, stop) for _, source, start, stop in zarr_jobs))
    fetched = asyncio.gather(*(reader.fetch(ranges) for reader, ranges in readers))
    return tuple(await asyncio.gather(zarr_parts, fetched))  # type: ignore[return-value]
