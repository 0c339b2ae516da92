"""Assemble: cut loaded rows into mini-batches by the sampler's splits, carrying partial batches over."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from annbatch._csr import RawCSR, gather_rows, vstack
from annbatch._fetch import Loaded
from annbatch.types import LoadRequest


def take(parts: Sequence[Loaded], positions: np.ndarray) -> Loaded:
    """Rows at ``positions`` of the concatenation of ``parts``, without concatenating the parts.

    Only the first batch after a carry touches two parts; every other batch is one gather.
    """
    pieces_x, pieces_rows = [], []
    start = 0
    for part in parts:
        n = len(part.rows)
        mine = (
            positions[(positions >= start) & (positions < start + n)] - start if len(parts) > 1 else positions
        )
        if len(mine):
            pieces_x.append(_gather(part.X, mine))
            pieces_rows.append(part.rows[mine])
        start += n
    if not pieces_x:
        empty = parts[-1]
        return Loaded(_gather(empty.X, np.empty(0, np.int64)), np.empty(0, np.int64))
    if len(pieces_x) == 1:
        return Loaded(pieces_x[0], pieces_rows[0])
    x = vstack(pieces_x) if isinstance(pieces_x[0], RawCSR) else np.concatenate(pieces_x)
    return Loaded(x, np.concatenate(pieces_rows))


def _gather(x: np.ndarray | RawCSR, rows: np.ndarray) -> np.ndarray | RawCSR:
    if isinstance(x, RawCSR):
        return gather_rows(x, rows)
    return np.take(x, rows, axis=0)


class Assembler:
    """Turns each fetched load into its mini-batches, keeping the carried rows between loads."""

    def __init__(self):
        self._carried: Loaded | None = None

    def batches(self, fetched: Loaded, request: LoadRequest) -> list[Loaded]:
        """The mini-batches of one load (X rows and their global row ids)."""
        parts = [self._carried, fetched] if self._carried is not None else [fetched]
        out = [take(parts, np.asarray(split, dtype=np.int64)) for split in request["splits"]]
        carry = request.get("carry")
        self._carried = (
            take(parts, np.asarray(carry, dtype=np.int64)) if carry is not None and len(carry) else None
        )
        return out
