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
