"""CSR matrices as raw arrays, and the numba kernels that move their rows.

scipy upcasts CSR indices to int32/int64 on construction; on disk and in buffers we keep the small
unsigned index dtypes (uint16 for up to 65,536 genes), so rows travel as :class:`RawCSR` until a
consumer needs a scipy or torch matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp


@dataclass
class RawCSR:
    """A CSR matrix as its three arrays, with ``indices`` in any integer dtype."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]

    format = "csr"

    @classmethod
    def from_scipy(cls, matrix: sp.csr_matrix | sp.csr_array) -> RawCSR:
        """Wrap a scipy CSR matrix's arrays (no copy)."""
        return cls(matrix.data, matrix.indices, matrix.indptr, tuple(matrix.shape))

    @property
    def nnz(self) -> int:
        """Number of stored values."""
        return int(self.indptr[-1] - self.indptr[0])

    def to_scipy(self) -> sp.csr_matrix:
        """As a scipy CSR matrix (indices become int32/int64)."""
        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=self.shape)


@numba.njit(cache=True, nogil=True)
def scatter_rows(indptr, indices, data, dest, out_indices, out_data):  # pragma: no cover - numba
    """Copy row ``i`` of a CSR block to offset ``dest[i]`` of the output ``indices``/``data`` (skip if < 0)."""
    for i in range(len(dest)):
        lo, hi = indptr[i], indptr[i + 1]
        d = dest[i]
        if d < 0:
            continue
        for j in range(hi - lo):
            out_indices[d + j] = indices[lo + j]
            out_data[d + j] = data[lo + j]


@numba.njit(cache=True, nogil=True)
def scatter_chunk(chunk, c0, row_lo, row_hi, dest, out):  # pragma: no cover - numba
    """Copy the parts of rows that fall in one decoded chunk to their places in ``out``.

    ``chunk`` holds elements ``c0:c0 + len(chunk)`` of a CSR ``data`` or ``indices`` array; row ``i``
    spans elements ``row_lo[i]:row_hi[i]`` (sorted, non-overlapping) and goes to ``out[dest[i]:]``
    (``dest[i] < 0``: unused). Values are cast to ``out``'s dtype on the way.
    """
    c1 = c0 + len(chunk)
    i = np.searchsorted(row_hi, c0, side="right")
    while i < len(row_lo) and row_lo[i] < c1:
        if dest[i] >= 0:
            a = max(row_lo[i], c0)
            b = min(row_hi[i], c1)
            d = dest[i] + (a - row_lo[i])
            for j in range(b - a):
                out[d + j] = chunk[a - c0 + j]
        i += 1


def rows_view(matrix: RawCSR, start: int, stop: int) -> RawCSR:
    """Rows ``start:stop`` as a CSR sharing ``data``/``indices`` (``indptr`` rebased, int32 when it fits)."""
    lo, hi = int(matrix.indptr[start]), int(matrix.indptr[stop])
    dtype = np.int32 if hi - lo < 2**31 and matrix.indices.dtype == np.int32 else np.int64
    indptr = (matrix.indptr[start : stop + 1] - lo).astype(dtype)
    return RawCSR(matrix.data[lo:hi], matrix.indices[lo:hi], indptr, (stop - start, matrix.shape[1]))
