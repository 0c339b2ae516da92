"""Convert: numpy / CSR batches to the array library the model wants (torch, jax), zero-copy where possible."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from annbatch._csr import RawCSR

Target = Literal["numpy", "torch", "jax"] | None


def check_target(to: Target) -> Target:
    """Validate ``to`` early, with an install hint when the library is missing."""
    if to not in (None, "numpy", "torch", "jax"):
        raise ValueError(f"`to` must be None/'numpy', 'torch' or 'jax', got {to!r}.")
    for name in ("torch", "jax"):
        if to == name:
            try:
                __import__(name)
            except ImportError as err:
                extra = " (`pip install 'annbatch[torch]'`)" if name == "torch" else ""
                raise ImportError(f"`to={name!r}` needs {name} installed{extra}.") from err
    return to


def _scipy_csr(value: RawCSR) -> sp.csr_matrix:
    # A batch is a slice of its load's buffer; scipy's constructor copies arrays that are small views
    # of a larger base ("pruning"), so the arrays are attached after building an empty matrix.
    matrix = sp.csr_matrix(value.shape, dtype=value.data.dtype)
    matrix.data, matrix.indices, matrix.indptr = value.data, value.indices, value.indptr
    return matrix


def convert(value: np.ndarray | RawCSR, to: Target) -> Any:
    """One array or CSR batch in the target library's type."""
    if to in (None, "numpy"):
        if isinstance(value, RawCSR):
            return _scipy_csr(value)
        return value
    if to == "torch":
        import torch

        if isinstance(value, RawCSR):
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                # The gather kernel builds valid CSR; checking invariants would cost a pass over the batch.
                return torch.sparse_csr_tensor(
                    torch.from_numpy(value.indptr), torch.from_numpy(value.indices), torch.from_numpy(value.data),
                    size=value.shape, check_invariants=False,
                )  # fmt: skip
        return torch.from_numpy(value)
    import jax.numpy as jnp
    from jax.experimental import sparse as jsparse

    if isinstance(value, RawCSR):
        return jsparse.BCSR((jnp.asarray(value.data), jnp.asarray(value.indices), jnp.asarray(value.indptr)),
                            shape=value.shape)  # fmt: skip
    return jnp.asarray(value)
