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
    """Copy row ``i`` of a CSR block to offset ``dest[i]`` of the output ``indices``/``data``."""
    for i in range(len(dest)):
        lo, hi = indptr[i], indptr[i + 1]
        d = dest[i]
        for j in range(hi - lo):
            out_indices[d + j] = indices[lo + j]
            out_data[d + j] = data[lo + j]


@numba.njit(cache=True, nogil=True)
def _gather_rows(indptr, indices, data, rows, out_indptr, out_indices, out_data):  # pragma: no cover
    pos = 0
    out_indptr[0] = 0
    for i in range(len(rows)):
        lo, hi = indptr[rows[i]], indptr[rows[i] + 1]
        for j in range(hi - lo):
            out_indices[pos + j] = indices[lo + j]
            out_data[pos + j] = data[lo + j]
        pos += hi - lo
        out_indptr[i + 1] = pos


def gather_rows(matrix: RawCSR, rows: np.ndarray) -> RawCSR:
    """Rows ``rows`` of ``matrix`` as a new CSR with int32 ``indptr``/``indices`` (scipy and torch ready)."""
    nnz = int((matrix.indptr[rows + 1] - matrix.indptr[rows]).sum())
    # torch wants crow and col indices of one dtype; int32 unless the batch is enormous.
    index_dtype = np.int32 if max(nnz, matrix.shape[1]) < 2**31 else np.int64
    out_indptr = np.empty(len(rows) + 1, dtype=index_dtype)
    out_indices = np.empty(nnz, dtype=index_dtype)
    out_data = np.empty(nnz, dtype=matrix.data.dtype)
    _gather_rows(matrix.indptr, matrix.indices, matrix.data, rows, out_indptr, out_indices, out_data)
    return RawCSR(out_data, out_indices, out_indptr, (len(rows), matrix.shape[1]))


def vstack(parts: list[RawCSR]) -> RawCSR:
    """Stack CSR blocks with equal column counts (used to join carried rows with new ones)."""
    if len(parts) == 1:
        return parts[0]
    data = np.concatenate([p.data for p in parts])
    indices = np.concatenate([p.indices for p in parts])
    offsets = np.cumsum([0] + [p.nnz for p in parts[:-1]])
    indptr = np.concatenate(
        [parts[0].indptr[:1]] + [p.indptr[1:] + o for p, o in zip(parts, offsets, strict=True)]
    )
    return RawCSR(
        data,
        indices,
        indptr.astype(parts[0].indptr.dtype),
        (sum(p.shape[0] for p in parts), parts[0].shape[1]),
    )
