"""Assemble: lay a load out in batch order, fill it (via fetch), and cut it into mini-batches.

Rows carried over from the previous load (a partial batch) are copied into the new layout; the new
rows are read straight into their places, so a batch is a contiguous slice of the load buffer and
costs no gather.

Loads are pipelined: :meth:`Assembler.submit` plans a load and starts its reads on the fetcher's
threads, and :meth:`Assembler.collect` waits for it and cuts it into batches. Submitting load ``n + 1``
before collecting load ``n`` keeps the read threads busy while Python plans and hands out batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numba
import numpy as np

from annbatch._backing import Backing
from annbatch._buffers import BufferPool
from annbatch._csr import RawCSR, rows_view, scatter_rows
from annbatch._fetch import Fetcher
from annbatch._layout import LoadLayout
from annbatch.types import LoadRequest


@dataclass
class Batch:
    """One mini-batch: its rows of X and their global row ids."""

    X: np.ndarray | RawCSR
    rows: np.ndarray


@dataclass
class PendingLoad:
    """A submitted load: its buffer and layout, and the reads still filling it."""

    layout: LoadLayout
    x: np.ndarray | RawCSR
    rows: np.ndarray  # global row id of every output row
    reads: list[Future]
    carry_in: tuple | None  # task copying the previous load's tail in; runs once that load is complete
    carry_future: list[Future] = field(default_factory=list)
    next: PendingLoad | None = None  # the load submitted after this one (it copies this one's tail)
    collected: bool = False


class Assembler:
    """Turns load requests into mini-batches, keeping carried rows between loads."""

    def __init__(
        self, fetcher: Fetcher, dtype: np.dtype, n_vars: int, row_shape: tuple[int, ...], buffers: BufferPool
    ):
        self._fetcher = fetcher
        self._dtype = np.dtype(dtype)
        self._n_vars = n_vars
        self._row_shape = row_shape
        # torch wants CSR crow/col indices of one dtype: int32 unless the matrix is enormous.
        self._index_dtype = np.dtype(np.int32 if n_vars < 2**31 else np.int64)
        self._carried: Batch | None = None  # the tail of the last submitted load (filled once it is read)
        self._last: PendingLoad | None = None
        self._buffers = buffers  # shared across epochs: fresh buffers would be page-faulted in again

    def submit(self, request: LoadRequest) -> PendingLoad:
        """Plan a load and start reading it."""
        ranges = self._fetcher.split(request["requests"])
        new_rows = self._fetcher.global_rows(ranges)
        carried = self._carried
        n_c = 0 if carried is None else len(carried.rows)
        layout = LoadLayout.of(request, n_c + len(new_rows))
        loaded_rows = new_rows if carried is None else np.concatenate([carried.rows, new_rows])
        rows = loaded_rows[layout.order]
        if self._fetcher.kind == "csr":
            x, tasks, carry_in = self._plan_csr(ranges, layout, carried, n_c)
        else:
            x, tasks, carry_in = self._plan_dense(ranges, layout, carried, n_c)
        pending = PendingLoad(layout, x, rows, self._fetcher.submit(tasks), carry_in)
        # This load's tail is the next load's carry: a view (it pins this buffer only until then).
        self._carried = (
            Batch(self._cut(x, layout.n_batch_rows, layout.n_out), rows[layout.n_batch_rows :])
            if layout.n_out > layout.n_batch_rows
            else None
        )
        previous, self._last = self._last, pending
        if carry_in is not None:
            if previous is None or previous.collected:
                pending.carry_future = self._fetcher.submit([carry_in])
            else:  # the tail is still being read: collect(previous) starts the copy
                previous.next = pending
        return pending

    def collect(self, pending: PendingLoad) -> list[Batch]:
        """Wait for a submitted load and cut it into its mini-batches (in submission order)."""
        for future in pending.reads + pending.carry_future:
            future.result()
        layout, x = pending.layout, pending.x
        if len(layout.dup_dst):
            self._copy_duplicates(layout, x)
        pending.collected = True
        if pending.next is not None:
            carry_in = pending.next.carry_in
            assert carry_in is not None  # only a load with a carry waits for this one
            pending.next.carry_future = self._fetcher.submit([carry_in])
            pending.next = None
        bounds = layout.bounds
        return [
            Batch(self._cut(x, bounds[b], bounds[b + 1]), pending.rows[bounds[b] : bounds[b + 1]])
            for b in range(len(bounds) - 1)
        ]

    @staticmethod
    def _cut(x: np.ndarray | RawCSR, a: int, b: int) -> np.ndarray | RawCSR:
        return rows_view(x, a, b) if isinstance(x, RawCSR) else x[a:b]

    def _plan_dense(self, ranges, layout: LoadLayout, carried: Batch | None, n_c: int):
        x = self._buffers.empty((layout.n_out, *self._row_shape), self._dtype)
        carry_in = None
        if carried is not None:
            dest = layout.out_pos[:n_c]
            keep = np.flatnonzero(dest >= 0)
            carry_in = (_put_rows, x, dest[keep], carried.X, keep)
        return x, self._fetcher.dense_tasks(ranges, layout.out_pos[n_c:], x), carry_in

    def _plan_csr(self, ranges, layout: LoadLayout, carried: Batch | None, n_c: int):
        nnz = self._fetcher.row_nnz(ranges)
        c = None if carried is None else carried.X
        if c is not None:
            assert isinstance(c, RawCSR)  # a CSR load carries CSR rows
            nnz = np.concatenate([np.diff(c.indptr).astype(np.int64), nnz])
        out_nnz = nnz[layout.order]
        indptr = np.zeros(layout.n_out + 1, dtype=np.int64)
        np.cumsum(out_nnz, out=indptr[1:])
        data = self._buffers.empty(int(indptr[-1]), self._dtype)
        indices = self._buffers.empty(int(indptr[-1]), self._index_dtype)
        dest = np.where(layout.out_pos >= 0, indptr[np.maximum(layout.out_pos, 0)], -1)
        carry_in = None
        if c is not None:
            carry_in = (scatter_rows, c.indptr.astype(np.int64), c.indices, c.data, dest[:n_c], indices, data)
        x = RawCSR(data, indices, indptr, (layout.n_out, self._n_vars))
        return x, self._fetcher.csr_tasks(ranges, dest[n_c:], data, indices), carry_in

    @staticmethod
    def _copy_duplicates(layout: LoadLayout, x: np.ndarray | RawCSR) -> None:
        """Rows that splits repeat were read once: copy them to their further output rows."""
        if not isinstance(x, RawCSR):
            x[layout.dup_dst] = x[layout.dup_src]
            return
        starts, n = x.indptr[:-1], np.diff(x.indptr)
        for s, d, k in zip(starts[layout.dup_src], starts[layout.dup_dst], n[layout.dup_dst], strict=True):
            x.data[d : d + k] = x.data[s : s + k]
            x.indices[d : d + k] = x.indices[s : s + k]


def read_loads(
    backings: Sequence[Backing],
    buffers: BufferPool,
    requests: Iterable[LoadRequest],
    verify: Callable[[BaseException | None], None] | None = None,
) -> Iterator[list[Batch]]:
    """The mini-batches of each requested load, reading load ``n + 1`` while load ``n`` is handed out.

    ``verify`` runs after each load is read and before it is handed out (with the error when a read
    failed, which it may replace by a better one); it raises to stop the stream.
    """
    fetcher = Fetcher(backings)
    first = backings[0]
    dtype = np.result_type(*{b.dtype for b in backings})
    assembler = Assembler(fetcher, dtype, first.shape[1], first.shape[1:], buffers)

    def hand_out(load: PendingLoad) -> list[Batch]:
        try:
            batches = assembler.collect(load)
        except BaseException as err:
            if verify is not None:
                verify(err)
            raise
        if verify is not None:
            verify(None)
        return batches

    requests = iter(requests)
    pending = None
    try:
        while True:
            try:
                submitted = assembler.submit(next(requests))  # read while the previous load is handed out
            except StopIteration:
                break
            except BaseException as err:
                if pending is not None:  # what was read before the failure still reaches the consumer
                    yield hand_out(pending)
                if verify is not None:
                    verify(err)
                raise
            if pending is not None:
                yield hand_out(pending)
            pending = submitted
        if pending is not None:
            yield hand_out(pending)
    finally:
        fetcher.close()


def _put_rows(out: np.ndarray, dest: np.ndarray, source: np.ndarray, keep: np.ndarray) -> None:
    """``out[dest] = source[keep]`` without the temporary fancy indexing allocates (and page-faults in)."""
    _copy_rows(source.reshape(len(source), -1), keep, dest, out.reshape(len(out), -1))


@numba.njit(nogil=True, cache=True)
def _copy_rows(source, keep, dest, out):  # pragma: no cover - numba
    for i in range(len(keep)):
        out[dest[i]] = source[keep[i]]
