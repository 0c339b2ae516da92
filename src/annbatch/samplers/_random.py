"""Chunked random and sequential samplers."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

from annbatch.samplers._base import _ChunkedSampler
from annbatch.samplers._chunks import Runs, _take_rows

if TYPE_CHECKING:
    from collections.abc import Iterator

    from annbatch.types import LoadRequest

__all__ = ["RandomSampler", "SequentialSampler"]

# spawn-key tags keep the epoch stream and the per-worker streams apart; numpy pads entropy with
# zeros, so plain entropy lists like [seed, epoch] and [seed, epoch, 0] would collide
_EPOCH_STREAM = 1
_WORKER_STREAM = 2


class RandomSampler(_ChunkedSampler):
    """Loads contiguous chunks of rows in random order and shuffles rows within each load.

    The rows in ``mask`` are cut into chunks of ``chunk_size`` contiguous rows (the last may be
    shorter). Each load reads ``preload_nchunks`` chunks, permutes their rows in memory and cuts
    them into mini-batches of ``batch_size``. A load's last partial batch is carried into the next
    load, so all batches have ``batch_size`` rows except possibly the last one of the epoch.

    Chunk order and in-memory permutations come from a base seed combined with the epoch (and
    worker): the same seed gives the same batches, each epoch gets a new order, and neither
    numpy's nor torch's global random state is used.

    With several workers (:meth:`set_worker`) the shared chunk order is dealt out round-robin, so
    workers read disjoint rows that together cover the epoch. How many rows each worker (and
    each rank of a :class:`~annbatch.samplers.DistributedSampler`) gets depends on sizes only,
    never on the seed.

    Parameters
    ----------
    batch_size
        Rows per mini-batch.
    chunk_size
        Contiguous rows per read.
    preload_nchunks
        Chunks per load; ``chunk_size * preload_nchunks`` rows are shuffled together in memory.
    shuffle
        Randomise chunk order and rows within a load. ``False`` yields rows in order.
    mask
        Contiguous range of rows to sample from, e.g. ``slice(0, 1000)``; default all rows.
    replacement
        Draw chunks with replacement; the epoch then holds ``num_samples`` rows.
    num_samples
        Rows per epoch. Defaults to the number of rows in ``mask``. Without replacement it may
        not exceed that number, and only part of the rows is used each epoch when smaller.
    drop_last
        Drop the final partial batch of the epoch (per worker).
    rng
        Generator to draw the base seed from, once, at construction. Mutually exclusive with
        ``seed``.
    seed
        Base seed (non-negative). If neither ``seed`` nor ``rng`` is given, a base seed is drawn
        from OS entropy at construction.
    """

    def __init__(
        self,
        batch_size: int,
        chunk_size: int,
        preload_nchunks: int,
        *,
        shuffle: bool = True,
        mask: slice | None = None,
        replacement: bool = False,
        num_samples: int | None = None,
        drop_last: bool = False,
        rng: np.random.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        self._shuffle = bool(shuffle)
        self._replacement = bool(replacement)
        if self._replacement and not self._shuffle:
            raise ValueError("replacement=True draws chunks at random and needs shuffle=True")
        super().__init__(
            batch_size,
            chunk_size,
            preload_nchunks,
            mask=mask,
            num_samples=num_samples,
            drop_last=drop_last,
            rng=rng,
            seed=seed,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._sizes_repr()}, shuffle={self._shuffle}, mask={self._mask}, "
            f"replacement={self._replacement}, num_samples={self._num_samples}, "
            f"drop_last={self._drop_last}, seed={self._seed})"
        )

    @property
    def shuffle(self) -> bool:
        """Whether chunk order and rows within a load are randomised."""
        return self._shuffle

    @property
    def replacement(self) -> bool:
        """Whether chunks are drawn with replacement."""
        return self._replacement

    def validate(self, n_obs: int) -> None:
        """Check ``mask`` and ``num_samples`` against ``n_obs`` rows.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Raises
        ------
        ValueError
            If there are no rows, the mask reaches past ``n_obs`` or selects nothing, or
            ``num_samples`` exceeds the masked rows without replacement.
        """
        super().validate(n_obs)
        start, stop = self._bounds(n_obs)
        if not self._replacement and self._num_samples is not None and self._num_samples > stop - start:
            raise ValueError(
                f"num_samples ({self._num_samples}) exceeds the {stop - start} rows in mask without "
                "replacement; reduce num_samples or pass replacement=True"
            )

    def _worker_chunks(self, n_obs: int, worker_rng: np.random.Generator) -> Runs:
        """Chunks of the current worker, in reading order, holding exactly its share of the epoch's rows."""
        start, stop = self._bounds(n_obs)
        cs = self._chunk_size
        n_chunks = -(-(stop - start) // cs)
        last_len = (stop - start) - (n_chunks - 1) * cs
        budget = self._worker_budget(n_obs)
        if budget == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        if self._replacement:
            ids = self._draw_with_replacement(n_chunks, last_len, budget, worker_rng)
        else:
            ids = self._chunk_order(n_chunks)[self._worker_id :: self._num_workers]
        lengths = np.where(ids == n_chunks - 1, last_len, cs)
        # keep the chunks needed to fill the budget, shortening the last one
        return _take_rows(start + ids.astype(np.int64) * cs, lengths, budget)

    def _chunk_order(self, n_chunks: int) -> np.ndarray:
        """Order of all chunks for this epoch, identical in every worker."""
        if not self._shuffle:
            return np.arange(n_chunks)
        rng = self._stream_rng(_EPOCH_STREAM)
        order = rng.permutation(n_chunks - 1)
        # The last chunk may be short. It goes to a slot dealt to the worker that the last slot goes
        # to, so each worker's row count stays independent of the seed (see _worker_rows): the very
        # last slot when the epoch reads every chunk, so that all other loads are full and (when
        # chunk_size × preload_nchunks is a multiple of batch_size) no rows are carried and copied
        # between loads; a random one when num_samples uses only the first chunks of the order.
        slot = (n_chunks - 1) // self._num_workers
        if self._num_samples is not None:
            slot = int(rng.integers(0, slot + 1))
        slot = (n_chunks - 1) % self._num_workers + slot * self._num_workers
        return np.insert(order, slot, n_chunks - 1)

    def _draw_with_replacement(
        self, n_chunks: int, last_len: int, budget: int, rng: np.random.Generator
    ) -> np.ndarray:
        drawn: list[np.ndarray] = []
        rows = 0
        while rows < budget:
            ids = rng.integers(0, n_chunks, size=(budget - rows) // self._chunk_size + 1)
            drawn.append(ids)
            rows += int(np.where(ids == n_chunks - 1, last_len, self._chunk_size).sum())
        return np.concatenate(drawn)

    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        """Yield this worker's load requests for the current epoch.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Yields
        ------
        LoadRequest
            ``requests`` is a list of slices (one per run of contiguous chunks); every request
            has at least one split.
        """
        worker_rng = self._stream_rng(_WORKER_STREAM, self._worker_id)
        chunks = self._worker_chunks(n_obs, worker_rng)
        yield from self._load_requests(chunks, worker_rng if self._shuffle else None)

    def _restricted(self, mask: slice, num_samples: int | None) -> RandomSampler:
        """A copy sampling only ``mask``, with the same seed, epoch and worker settings."""
        new = copy.copy(self)
        new._mask = mask
        new._num_samples = num_samples
        return new


class SequentialSampler(RandomSampler):
    """Loads rows in order, in chunks, and yields consecutive mini-batches.

    With several workers, chunks are dealt out round-robin: each worker yields its rows in
    order, and together the workers cover every row once.

    Parameters
    ----------
    batch_size
        Rows per mini-batch.
    chunk_size
        Contiguous rows per read.
    preload_nchunks
        Chunks per load.
    mask
        Contiguous range of rows to read, e.g. ``slice(0, 1000)``; default all rows.
    drop_last
        Drop the final partial batch of the epoch (per worker).
    """

    def __init__(
        self,
        batch_size: int,
        chunk_size: int,
        preload_nchunks: int,
        *,
        mask: slice | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            batch_size, chunk_size, preload_nchunks, shuffle=False, mask=mask, drop_last=drop_last, seed=0
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._sizes_repr()}, mask={self._mask}, drop_last={self._drop_last})"
