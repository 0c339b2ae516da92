"""Sampling a subset of rows given row by row, such as one split of a train/validation split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from annbatch.samplers._base import _ChunkedSampler
from annbatch.samplers._chunks import Runs, _n_batches
from annbatch.samplers._class import _build_chunks

if TYPE_CHECKING:
    from collections.abc import Iterator

    from annbatch.types import LoadRequest

__all__ = ["SubsetSampler"]

_ORDER_STREAM = 21
_WORKER_STREAM = 22


class SubsetSampler(_ChunkedSampler):
    """Loads the rows of a subset, in chunks of contiguous selected rows, shuffled like :class:`RandomSampler`.

    The selected rows are grouped into maximal runs of consecutive rows and each run is cut into
    chunks of at most ``chunk_size`` rows. Chunks are read in random order, ``preload_nchunks`` per
    load, and rows are permuted within each load. Reads stay contiguous wherever the subset is: a
    subset of whole donors on a collection converted with ``groupby="donor"`` reads as fast as
    :class:`RandomSampler`; a scattered subset reads many short runs. Setting :attr:`mask`
    restricts the subset further to the rows in that range.

    Parameters
    ----------
    rows
        The subset: a boolean mask over all rows, or the selected row numbers.
    batch_size
        Rows per mini-batch.
    chunk_size
        Most contiguous rows per read.
    preload_nchunks
        Chunks per load.
    shuffle
        Randomise chunk order and rows within a load; ``False`` reads the subset in row order.
    drop_last
        Drop the final partial batch of the epoch (per worker).
    rng, seed
        Randomness, as for :class:`RandomSampler`; give at most one.
    """

    def __init__(
        self,
        rows: np.ndarray,
        batch_size: int,
        chunk_size: int,
        preload_nchunks: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        rng: np.random.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        rows = np.asarray(rows)
        self._n_rows: int | None  # the length of a mask (checked against the collection), else None
        if rows.dtype == bool:
            self._selected, self._n_rows = np.flatnonzero(rows), len(rows)
        elif rows.ndim == 1 and (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
            self._selected, self._n_rows = np.unique(rows).astype(np.int64), None
        else:
            raise ValueError(f"rows must be a boolean mask or integer row numbers, got dtype {rows.dtype}")
        if not len(self._selected):
            raise ValueError("rows selects no rows; select at least one")
        if self._selected[0] < 0:
            raise ValueError(f"rows must be non-negative row numbers, got {self._selected[0]}")
        self._shuffle = bool(shuffle)
        self._chunks: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        super().__init__(
            batch_size, chunk_size, preload_nchunks, mask=None, num_samples=None, drop_last=drop_last,
            rng=rng, seed=seed,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self._selected)} rows, {self._sizes_repr()}, shuffle={self._shuffle}, "
            f"drop_last={self._drop_last}, seed={self._seed})"
        )

    @property
    def shuffle(self) -> bool:
        """Whether chunk order and rows within a load are randomised."""
        return self._shuffle

    @property
    def rows(self) -> np.ndarray:
        """The selected rows, sorted."""
        return self._selected

    def _check_n_obs(self, n_obs: int) -> None:
        if self._n_rows is not None and self._n_rows != n_obs:
            raise ValueError(f"rows is a mask of {self._n_rows} rows but the collection has {n_obs}")
        if self._selected[-1] >= n_obs:
            raise ValueError(f"rows names row {self._selected[-1]} but the collection has {n_obs} rows")

    def _worker_chunks(self, n_obs: int) -> Runs:
        """Chunks of the current worker in reading order: the epoch's chunk order dealt round-robin."""
        self.validate(n_obs)
        bounds = self._bounds(n_obs)
        if self._chunks is None or self._chunks[0] != bounds:  # the same every epoch: found once per mask
            selected = self._selected[(self._selected >= bounds[0]) & (self._selected < bounds[1])]
            if not len(selected):
                raise ValueError(f"mask {self.mask} holds none of the selected rows; widen the mask")
            codes = np.full(int(selected[-1]) + 1, -1, dtype=np.int8)
            codes[selected] = 0
            chunks = _build_chunks(codes, 0, len(codes), self._chunk_size, 1)
            self._chunks = (bounds, chunks.start, chunks.length)
        _, all_starts, all_lengths = self._chunks
        order = np.arange(len(all_starts))
        if self._shuffle:
            order = self._stream_rng(_ORDER_STREAM).permutation(order)
        order = order[self._worker_id :: self._num_workers]
        starts = all_starts[order]
        return starts, starts + all_lengths[order]

    def n_batches(self, n_obs: int) -> int:
        """Number of mini-batches :meth:`sample` yields for the current epoch and worker.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Returns
        -------
        int
            The number of mini-batches.
        """
        starts, stops = self._worker_chunks(n_obs)
        rows = int((stops - starts).sum())
        return _n_batches(rows, self._batch_size, self._drop_last)

    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        """Yield this worker's load requests for the current epoch.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Yields
        ------
        LoadRequest
            Requests reading runs of selected rows.
        """
        chunks = self._worker_chunks(n_obs)
        rng = self._stream_rng(_WORKER_STREAM, self._worker_id) if self._shuffle else None
        yield from self._load_requests(chunks, rng)
