"""Settings, validation and properties shared by the chunk-reading samplers (:class:`_ChunkedSampler`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from annbatch.abc import Sampler
from annbatch.samplers._chunks import Runs, _iter_loads, _n_batches, _worker_rows

if TYPE_CHECKING:
    from collections.abc import Iterator

    from annbatch.types import LoadRequest


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


class _ChunkedSampler(Sampler):
    """Common settings of the samplers that read rows in chunks and cut loads into mini-batches.

    Owns ``batch_size``, ``chunk_size``, ``preload_nchunks``, ``mask``, ``num_samples``,
    ``drop_last`` and the base ``seed``: their validation at construction, their read-only
    properties, the mask checks of :meth:`validate`, the per-epoch random streams, and the
    epoch's rows shared out among workers. Its :meth:`n_batches` and :meth:`max_load_rows` are
    those of samplers whose loads carry a partial batch into the next one; samplers that work
    otherwise override them. The public subclasses document the parameters.
    """

    def __init__(
        self,
        batch_size: int,
        chunk_size: int,
        preload_nchunks: int,
        *,
        mask: slice | None,
        num_samples: int | None,
        drop_last: bool,
        rng: np.random.Generator | None,
        seed: int | None,
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
        self._num_samples = None if num_samples is None else _check_positive_int("num_samples", num_samples)
        self._drop_last = bool(drop_last)
        self._seed = self._base_seed(rng, seed)
        self._rng = rng

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
            entropy = np.random.SeedSequence().entropy
            assert isinstance(entropy, int)  # drawn fresh: one int
            return entropy
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        return int(seed)

    def _sizes_repr(self) -> str:
        """The ``batch_size=..., chunk_size=..., preload_nchunks=...`` part of ``repr``."""
        return (
            f"batch_size={self._batch_size}, chunk_size={self._chunk_size}, "
            f"preload_nchunks={self._preload_nchunks}"
        )

    @property
    def batch_size(self) -> int:
        """Rows per mini-batch."""
        return self._batch_size

    @property
    def chunk_size(self) -> int:
        """Most contiguous rows per chunk, the unit in which rows are read."""
        return self._chunk_size

    @property
    def preload_nchunks(self) -> int:
        """Chunks (of up to ``chunk_size`` rows) per load."""
        return self._preload_nchunks

    @property
    def mask(self) -> slice:
        """Contiguous range of rows sampled from; ``slice(0, None)`` is every row.

        Settable, e.g. ``sampler.mask = slice(0, 1000)`` (``None`` for every row); the next
        epoch samples the new range.
        """
        return slice(0, None) if self._mask is None else self._mask

    @mask.setter
    def mask(self, value: slice | None) -> None:
        mask = _check_mask(value)
        whole = mask is not None and mask.start in (None, 0) and mask.stop is None
        self._mask = None if whole else mask

    @property
    def rng(self) -> np.random.Generator | None:
        """The generator the base seed was drawn from, or ``None`` where the sampler was given a seed.

        Setting a generator draws a new base seed from it (so the sampler's batches then follow that
        generator, reproducibly); setting ``None`` draws one from OS entropy.
        """
        return self._rng

    @rng.setter
    def rng(self, value: np.random.Generator | None) -> None:
        self._seed = self._base_seed(value, None)
        self._rng = value

    @property
    def num_samples(self) -> int | None:
        """Rows per epoch as given; ``None`` means the default.

        The default is every row in the mask (every labelled row, for samplers keyed on labels).
        """
        return self._num_samples

    @property
    def drop_last(self) -> bool:
        """Whether partial batches are dropped (see the sampler's ``drop_last`` parameter for which)."""
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
        """Rows of the epoch over all workers: ``num_samples``, else every row in the mask."""
        start, stop = self._bounds(n_obs)
        return stop - start if self._num_samples is None else self._num_samples

    def _worker_budget(self, n_obs: int) -> int:
        """Rows of the epoch that belong to the current worker (by sizes only, see :func:`_worker_rows`)."""
        return _worker_rows(self._total(n_obs), self._chunk_size, self._worker_id, self._num_workers)

    def _stream_rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self._seed, spawn_key=(self._epoch, *stream)))

    def _load_requests(self, chunks: Runs, rng: np.random.Generator | None) -> Iterator[LoadRequest]:
        """Load requests of the current worker's ordered ``chunks``, partial batches carried."""
        return _iter_loads(
            chunks,
            batch_size=self._batch_size,
            preload_nchunks=self._preload_nchunks,
            drop_last=self._drop_last,
            rng=rng,
        )

    def _check_n_obs(self, n_obs: int) -> None:
        """Further checks of ``n_obs`` alone, made by :meth:`validate` before the mask's (default: none)."""

    def validate(self, n_obs: int) -> None:
        """Check ``n_obs`` and that ``mask`` selects rows within it.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Raises
        ------
        ValueError
            If there are no rows, or the mask reaches past ``n_obs`` or selects nothing.
        """
        if isinstance(n_obs, bool) or not isinstance(n_obs, int | np.integer) or n_obs < 1:
            raise ValueError(f"n_obs must be a positive integer (the collection has no rows?), got {n_obs!r}")
        self._check_n_obs(n_obs)
        start, stop = self._bounds(n_obs)
        if stop > n_obs or start > n_obs:
            raise ValueError(
                f"mask {self._mask} lies outside the {n_obs} rows; use a slice within [0, {n_obs}]"
            )
        if stop <= start:
            raise ValueError(f"mask {self._mask} selects no rows of {n_obs}; use a slice with start < stop")

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
        self.validate(n_obs)
        return _n_batches(self._worker_budget(n_obs), self._batch_size, self._drop_last)
