"""Convert: numpy / CSR batches to the array library the model wants (torch, jax), zero-copy where possible.

Inside a :class:`torch.utils.data.DataLoader` worker, scipy CSR batches are sent to the main process
like torch tensors: through shared memory rather than pickled through the worker's pipe (see
:class:`_WorkerCSR`).
"""

from __future__ import annotations

import sys
import warnings
from multiprocessing.reduction import ForkingPickler
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


def target_from_to_torch(to_torch: bool, to: Target) -> Target:
    """``to`` for the deprecated ``to_torch``, warning, and refusing a ``to`` that contradicts it."""
    if not isinstance(to_torch, bool):
        raise TypeError(f"`to_torch` must be True or False, got {to_torch!r}; better, pass `to=`.")
    replacement: Target = "torch" if to_torch else None
    if (to_torch and to not in (None, "torch")) or (not to_torch and to == "torch"):
        raise ValueError(f"`to_torch={to_torch}` contradicts `to={to!r}`: give `to` only.")
    warnings.warn(
        f"`to_torch` is deprecated; pass `to={replacement!r}` instead.", FutureWarning, stacklevel=3
    )
    return to if to is not None else replacement


def _scipy_csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape, cls=sp.csr_matrix):
    # A batch is a slice of its load's buffer; scipy's constructor copies arrays that are small views
    # of a larger base ("pruning"), so the arrays are attached after building an empty matrix.
    matrix = cls(tuple(shape), dtype=data.dtype)
    matrix.data, matrix.indices, matrix.indptr = data, indices, indptr
    return matrix


def _in_torch_worker() -> bool:
    """Whether this runs in a ``torch.utils.data.DataLoader`` worker process."""
    data = sys.modules.get("torch.utils.data")
    return data is not None and data.get_worker_info() is not None


class _WorkerCSR(sp.csr_matrix):
    """A scipy CSR batch made in a DataLoader worker (otherwise a plain ``csr_matrix``).

    A worker sends its batches through a ``multiprocessing`` queue, which pickles them with
    ``ForkingPickler``. A plain ``csr_matrix`` would be pickled into the worker's pipe and unpickled
    from it: three copies of the batch and a pass through the pipe, several times the cost of the
    load itself. For this class ``ForkingPickler`` instead copies the three arrays once into one new
    block of shared memory and sends only its handle, as torch does for tensors (one block, so one
    file descriptor per batch); the main process gets a plain ``csr_matrix`` viewing the block.
    Plain ``pickle`` gives a plain ``csr_matrix`` too, with the arrays pickled as usual.
    """

    def __reduce__(self):
        return _scipy_csr, (self.data, self.indices, self.indptr, self.shape)


_ALIGN = 64  # every array of a shared block starts at a multiple of this: any dtype can be viewed there


def _new_shared_bytes(torch, n: int):
    """A uint8 tensor of ``n`` bytes in new shared memory (what torch's collate allocates in workers)."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:  # pragma: no cover - private API; share_memory_ also copies the empty tensor
        return torch.empty(n, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(n))


def _reduce_worker_csr(matrix: _WorkerCSR):
    import torch

    arrays = (matrix.indptr, matrix.indices, matrix.data)
    starts = np.cumsum([0] + [-(-a.nbytes // _ALIGN) * _ALIGN for a in arrays]).tolist()
    block = _new_shared_bytes(torch, max(starts[-1], 1))
    memory = block.numpy()
    layout = []
    for a, start in zip(arrays, starts[:-1], strict=True):
        memory[start : start + a.nbytes].view(a.dtype)[...] = a
        layout.append((start, a.nbytes, a.dtype.str))
    return _csr_from_block, (block, layout, matrix.shape)


def _csr_from_block(block, layout: list[tuple[int, int, str]], shape) -> sp.csr_matrix:
    """The receiving side of :func:`_reduce_worker_csr`: a plain csr_matrix viewing the shared block."""
    memory = block.numpy()  # the views keep ``block``, and so the shared mapping, alive
    indptr, indices, data = (memory[start : start + n].view(dtype) for start, n, dtype in layout)
    return _scipy_csr(data, indices, indptr, shape)


ForkingPickler.register(_WorkerCSR, _reduce_worker_csr)


def convert(value: np.ndarray | RawCSR, to: Target) -> Any:
    """One array or CSR batch in the target library's type."""
    if to in (None, "numpy"):
        if isinstance(value, RawCSR):
            cls = _WorkerCSR if _in_torch_worker() else sp.csr_matrix
            return _scipy_csr(value.data, value.indices, value.indptr, value.shape, cls=cls)
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
