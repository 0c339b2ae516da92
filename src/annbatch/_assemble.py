"""Assemble: lay a load out in batch order, fill it (via fetch), and cut it into mini-batches.

Rows carried over from the previous load (a partial batch) are copied into the new layout; the new
rows are read straight into their places, so a batch is a contiguous slice of the load buffer and
costs no gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


class Assembler:
    """Turns load requests into mini-batches, keeping carried rows between loads."""

    def __init__(self, fetcher: Fetcher, dtype: np.dtype, n_vars: int, row_shape: tuple[int, ...]):
        self._fetcher = fetcher
        self._dtype = np.dtype(dtype)
        self._n_vars = n_vars
        self._row_shape = row_shape
        # torch wants CSR crow/col indices of one dtype: int32 unless the matrix is enormous.
        self._index_dtype = np.dtype(np.int32 if n_vars < 2**31 else np.int64)
        self._carried: Batch | None = None
        self._buffers = BufferPool()

    def batches(self, request: LoadRequest) -> list[Batch]:
        """Read one load and return its mini-batches."""
        ranges = self._fetcher.split(request["requests"])
        new_rows = self._fetcher.global_rows(ranges)
        carried = self._carried
        n_c = 0 if carried is None else len(carried.rows)
        layout = LoadLayout.of(request, n_c + len(new_rows))
        loaded_rows = new_rows if carried is None else np.concatenate([carried.rows, new_rows])
        rows = loaded_rows[layout.order]
        if self._fetcher.kind == "csr":
            x = self._fill_csr(ranges, layout, carried, n_c)
            cut = lambda a, b: rows_view(x, a, b)  # noqa: E731
        else:
            x = self._fill_dense(ranges, layout, carried, n_c)
            cut = lambda a, b: x[a:b]  # noqa: E731
        bounds = layout.bounds
        out = [
            Batch(cut(bounds[b], bounds[b + 1]), rows[bounds[b] : bounds[b + 1]])
            for b in range(len(bounds) - 1)
        ]
        if layout.n_out > layout.n_batch_rows:  # copy: the small carry must not pin the whole load buffer
            tail = cut(layout.n_batch_rows, layout.n_out)
            tail_x = tail.copy() if isinstance(tail, np.ndarray) else _copy_csr(tail)
            self._carried = Batch(tail_x, rows[layout.n_batch_rows :].copy())
        else:
            self._carried = None
        return out

    def _fill_dense(self, ranges, layout: LoadLayout, carried: Batch | None, n_c: int) -> np.ndarray:
        x = self._buffers.empty((layout.n_out, *self._row_shape), self._dtype)
        if carried is not None:
            dest = layout.out_pos[:n_c]
            keep = dest >= 0
            x[dest[keep]] = carried.X[keep]
        self._fetcher.read_dense(ranges, layout.out_pos[n_c:], x)
        x[layout.dup_dst] = x[layout.dup_src]
        return x

    def _fill_csr(self, ranges, layout: LoadLayout, carried: Batch | None, n_c: int) -> RawCSR:
        nnz = self._fetcher.row_nnz(ranges)
        if carried is not None:
            nnz = np.concatenate([np.diff(carried.X.indptr).astype(np.int64), nnz])
        valid = layout.out_pos >= 0
        out_nnz = nnz[layout.order]
        indptr = np.zeros(layout.n_out + 1, dtype=np.int64)
        np.cumsum(out_nnz, out=indptr[1:])
        data = self._buffers.empty(int(indptr[-1]), self._dtype)
        indices = self._buffers.empty(int(indptr[-1]), self._index_dtype)
        dest = np.where(valid, indptr[np.maximum(layout.out_pos, 0)], -1)
        if carried is not None:
            c = carried.X
            scatter_rows(c.indptr.astype(np.int64), c.indices, c.data, dest[:n_c], indices, data)
        self._fetcher.read_csr(ranges, dest[n_c:], data, indices)
        if len(layout.dup_dst):
            src = indptr[layout.dup_src]
            for s, d, n in zip(src, indptr[layout.dup_dst], out_nnz[layout.dup_dst], strict=True):
                data[d : d + n] = data[s : s + n]
                indices[d : d + n] = indices[s : s + n]
        return RawCSR(data, indices, indptr, (layout.n_out, self._n_vars))


def _copy_csr(m: RawCSR) -> RawCSR:
    return RawCSR(m.data.copy(), m.indices.copy(), m.indptr.copy(), m.shape)
