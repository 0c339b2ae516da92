"""Reusable load buffers.

Touching freshly allocated memory costs a page fault per 4 KiB page, which on virtual machines can cost
as much as decoding the data itself. Load buffers are therefore recycled: an array handed out by
:meth:`BufferPool.empty` returns its memory to the pool when it (and every batch view or zero-copy
torch tensor of it) has been garbage-collected — never earlier, so a batch the user keeps stays valid.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

_ALIGN = 1 << 20  # round block sizes up to 1 MiB so blocks fit loads of slightly different sizes


class BufferPool:
    """A small pool of byte blocks recycled between loads."""

    def __init__(self, max_free: int = 4):
        self._free: list[np.ndarray] = []
        self._max_free = max_free
        self._lock = threading.Lock()

    def __getstate__(self):  # a copy (e.g. in a DataLoader worker) starts with no blocks of its own
        return {"_max_free": self._max_free}

    def __setstate__(self, state):
        self.__init__(state["_max_free"])

    def empty(self, shape: int | tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised array backed by a recycled block."""
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < _ALIGN:  # small arrays: the allocator recycles these well by itself
            return np.empty(shape, dtype=dtype)
        block = self._take(nbytes)
        # numpy points a view's ``base`` at the array that owns the memory, which would be ``block``:
        # batches cut from the load would not keep a plain view of it alive. An array made with
        # ``frombuffer`` does not own its memory, so every view of it keeps *it* alive, and its
        # finalizer runs only once the last batch view (or tensor) is gone.
        owner = np.frombuffer(block.data, dtype=np.uint8, count=nbytes)
        weakref.finalize(owner, self._give, block)
        return owner.view(dtype).reshape(shape)

    def _take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))
        # Headroom, so the block also fits the next loads, whose sizes vary by a few percent.
        return np.empty(-(-int(nbytes * 1.1) // _ALIGN) * _ALIGN, dtype=np.uint8)

    def _give(self, block: np.ndarray) -> None:
        with self._lock:
            self._free.append(block)
            if len(self._free) > self._max_free:  # keep the largest blocks
                self._free.sort(key=lambda b: b.nbytes)
                del self._free[0]
