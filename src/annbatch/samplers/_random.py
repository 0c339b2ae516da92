"""Chunked random and sequential samplers."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

from annbatch.abc import Sampler
from annbatch.samplers._chunks import _iter_loads, _n_batches, _worker_rows

if TYPE_CHECKING:
    from collections.abc import Iterator

    from annbatch.types import LoadRequest

__all__ = ["RandomSampler", "SequentialSampler"]

# spawn-key tags keep the epoch stream and the per-worker streams apart; numpy pads entropy with
# zeros, so plain entropy lists like [seed, epoch] and [seed, epoch, 0] would collide
_EPOCH_STREAM = 1
_WORKER_STREAM = 2


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_mask(mask: slice | None) -> slice | None:
    if mask is None:
        return None
    if not isinstance(mask, slice):
        raise ValueError(f"mask must be a slice of rows such as slice(0, 1000) or None, got {mask!r}")
    if mask.step not in (None, 1):
        raise ValueError(f"mask must be a contiguous slice without a step, got step={mask.step!r}")
    for bound in (mask.start, mask.stop):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | np.integer)):
            raise ValueError(f"mask bounds must be integers or None, got {mask!r}")
        if bound is not None and bound < 0:
            raise ValueError(f"mask bounds must be non-negative (no negative indexing), got {mask!r}")
    if mask.start is not None and mask.stop is not None and mask.stop <= mask.start:
        raise ValueError(f"mask selects no rows: {mask!r}; use a slice with start < stop")
    return slice(
        None if mask.start is None else int(mask.start), None if mask.stop is None else int(mask.stop)
    )


class RandomSampler(Sampler):
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
        self._batch_size = _check_positive_int("batch_size", batch_size)
        self._chunk_size = _check_positive_int("chunk_size", chunk_size)
        self._preload_nchunks = _check_positive_int("preload_nchunks", preload_nchunks)
        if self._batch_size > self._chunk_size * self._preload_nchunks:
            raise ValueError(
                f"batch_size ({batch_size}) must not exceed chunk_size * preload_nchunks "
                f"({chunk_size} * {preload_nchunks} = {chunk_size * preload_nchunks}), the rows held "
                "per load; increase preload_nchunks or chunk_size, or reduce batch_size"
            )
        self._mask = _check_mask(mask)
        self._shuffle = bool(shuffle)
        self._replacement = bool(replacement)
        if self._replacement and not self._shuffle:
            raise ValueError("replacement=True draws chunks at random and needs shuffle=True")
        self._num_samples = None if num_samples is None else _check_positive_int("num_samples", num_samples)
        self._drop_last = bool(drop_last)
        self._seed = self._base_seed(rng, seed)

    @staticmethod
    def _base_seed(rng: np.random.Generator | None, seed: int | None) -> int:
        if rng is not None and seed is not None:
            raise ValueError("pass either seed or rng, not both")
        if rng is not None:
            if not isinstance(rng, np.random.Generator):
                raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
            return int(rng.integers(0, 2**63))
        if seed is None:
            # fixed now so that copies sent to worker processes share it
            return int(np.random.SeedSequence().entropy)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        return int(seed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch_size={self._batch_size}, chunk_size={self._chunk_size}, "
            f"preload_nchunks={self._preload_nchunks}, shuffle={self._shuffle}, mask={self._mask}, "
            f"replacement={self._replacement}, num_samples={self._num_samples}, "
            f"drop_last={self._drop_last}, seed={self._seed})"
        )

    @property
    def batch_size(self) -> int:
        """Rows per mini-batch."""
        return self._batch_size

    @property
    def shuffle(self) -> bool:
        """Whether chunk order and rows within a load are randomised."""
        return self._shuffle

    @property
    def chunk_size(self) -> int:
        """Contiguous rows per read."""
        return self._chunk_size

    @property
    def preload_nchunks(self) -> int:
        """Chunks per load."""
        return self._preload_nchunks

    @property
    def mask(self) -> slice | None:
        """Range of rows sampled from; ``None`` means every row."""
        return self._mask

    @property
    def replacement(self) -> bool:
        """Whether chunks are drawn with replacement."""
        return self._replacement

    @property
    def num_samples(self) -> int | None:
        """Rows per epoch as given; ``None`` means every row in the mask."""
        return self._num_samples

    @property
    def drop_last(self) -> bool:
        """Whether the final partial batch is dropped."""
        return self._drop_last

    @property
    def seed(self) -> int:
        """Base seed from which every epoch's and worker's randomness is derived."""
        return self._seed

    @property
    def max_load_rows(self) -> int:
        """Upper bound on the loaded rows (carried plus new) of any one request."""
        return self._batch_size - 1 + self._chunk_size * self._preload_nchunks

    def _bounds(self, n_obs: int) -> tuple[int, int]:
        mask = self._mask or slice(None)
        start = 0 if mask.start is None else mask.start
        stop = n_obs if mask.stop is None else mask.stop
        return start, stop

    def _total(self, n_obs: int) -> int:
        start, stop = self._bounds(n_obs)
        return stop - start if self._num_samples is None else self._num_samples

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
        if isinstance(n_obs, bool) or not isinstance(n_obs, int | np.integer) or n_obs < 1:
            raise ValueError(f"n_obs must be a positive integer (the collection has no rows?), got {n_obs!r}")
        start, stop = self._bounds(n_obs)
        if stop > n_obs or start > n_obs:
            raise ValueError(
                f"mask {self._mask} lies outside the {n_obs} rows; use a slice within [0, {n_obs}]"
            )
        if stop <= start:
            raise ValueError(f"mask {self._mask} selects no rows of {n_obs}; use a slice with start < stop")
        if not self._replacement and self._num_samples is not None and self._num_samples > stop - start:
            raise ValueError(
                f"num_samples ({self._num_samples}) exceeds the {stop - start} rows in mask without "
                "replacement; reduce num_samples or pass replacement=True"
            )

    def n_iters(self, n_obs: int) -> int:
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
        self.validate(n_obs)
        rows = _worker_rows(self._total(n_obs), self._chunk_size, self._worker_id, self._num_workers)
        return _n_batches(rows, self._batch_size, self._drop_last)

    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self._seed, spawn_key=(self._epoch, *stream)))

    def _worker_chunks(self, n_obs: int, worker_rng: np.random.Generator) -> list[slice]:
        """Chunks of the current worker, in reading order, holding exactly its share of the epoch's rows."""
        start, stop = self._bounds(n_obs)
        cs = self._chunk_size
        n_chunks = -(-(stop - start) // cs)
        last_len = (stop - start) - (n_chunks - 1) * cs
        budget = _worker_rows(self._total(n_obs), cs, self._worker_id, self._num_workers)
        if budget == 0:
            return []
        if self._replacement:
            ids = self._draw_with_replacement(n_chunks, last_len, budget, worker_rng)
        else:
            ids = self._chunk_order(n_chunks)[self._worker_id :: self._num_workers]
        lengths = np.where(ids == n_chunks - 1, last_len, cs)
        # keep the chunks needed to fill the budget, shortening the last one
        n_used = int(np.searchsorted(np.cumsum(lengths), budget, side="left")) + 1
        starts = start + ids[:n_used].astype(np.int64) * cs
        stops = starts + lengths[:n_used]
        stops[-1] -= int(lengths[:n_used].sum()) - budget
        return [slice(int(a), int(b)) for a, b in zip(starts, stops, strict=True)]

    def _chunk_order(self, n_chunks: int) -> np.ndarray:
        """Order of all chunks for this epoch, identical in every worker."""
        if not self._shuffle:
            return np.arange(n_chunks)
        rng = self._rng(_EPOCH_STREAM)
        order = rng.permutation(n_chunks - 1)
        # The short last chunk goes to a random slot dealt to the worker that the last slot goes
        # to, so each worker's row count stays independent of the seed (see _worker_rows).
        slot = int(rng.integers(0, (n_chunks - 1) // self._num_workers + 1))
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

    def sample(self, n_obs: int) -> Iterator[LoadRequest]:
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
        self.validate(n_obs)
        worker_rng = self._rng(_WORKER_STREAM, self._worker_id)
        chunks = self._worker_chunks(n_obs, worker_rng)
        yield from _iter_loads(
            chunks,
            batch_size=self._batch_size,
            preload_nchunks=self._preload_nchunks,
            drop_last=self._drop_last,
            rng=worker_rng if self._shuffle else None,
        )

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
        return (
            f"{type(self).__name__}(batch_size={self._batch_size}, chunk_size={self._chunk_size}, "
            f"preload_nchunks={self._preload_nchunks}, mask={self._mask}, drop_last={self._drop_last})"
        )
