"""Allocation: where every loaded row goes in a load's output buffer.

A load's rows are written straight into *batch order*: the buffer holds batch 0, batch 1, …, then
the carried rows, one after the other, so each mini-batch is a contiguous slice of it (no gather
pass after reading) and the read itself does the in-memory shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from annbatch.types import LoadRequest


@dataclass
class LoadLayout:
    """Positions of a load's rows in the output buffer.

    Attributes
    ----------
    out_pos
        For every loaded row (carried rows first, then the request's rows), its (first) output row,
        or -1 when no split or carry uses it. A row that splits repeat is read once and copied to
        its other output rows (``dup_src`` → ``dup_dst``) after the read.
    bounds
        Output row boundaries: batch ``b`` is rows ``bounds[b]:bounds[b + 1]``; the carried rows are
        ``bounds[-1]:n_out``.
    n_out
        Output rows.
    """

    out_pos: np.ndarray
    bounds: np.ndarray
    n_out: int
    dup_src: np.ndarray  # output rows whose loaded row a split repeats …
    dup_dst: np.ndarray  # … and the further output rows that get a copy of them
    order: np.ndarray  # loaded row of every output row

    @classmethod
    def of(cls, request: LoadRequest, n_loaded: int) -> LoadLayout:
        """The layout for ``request`` whose loaded rows number ``n_loaded``."""
        splits = [np.asarray(s, dtype=np.int64) for s in request["splits"]]
        carry = request.get("carry")
        parts = [*splits, np.asarray(carry, dtype=np.int64)] if carry is not None and len(carry) else splits
        order = np.concatenate(parts) if parts else np.empty(0, np.int64)
        out_pos = np.full(n_loaded, -1, dtype=np.int64)
        out_pos[order[::-1]] = np.arange(len(order), dtype=np.int64)[::-1]  # first occurrence wins
        dup_dst = np.flatnonzero(out_pos[order] != np.arange(len(order)))
        bounds = np.concatenate([[0], np.cumsum([len(s) for s in splits], dtype=np.int64)])
        return cls(out_pos, bounds, len(order), out_pos[order[dup_dst]], dup_dst, order)

    @property
    def n_batch_rows(self) -> int:
        """Output rows that belong to batches (the rest is carried)."""
        return int(self.bounds[-1])
