"""Abstract base classes that users may subclass to extend annbatch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    from annbatch.types import LoadRequest

__all__ = ["Sampler"]


class Sampler(ABC):
    """Decides which rows to load and how to cut them into mini-batches.

    A sampler is pure: given the number of rows ``n_obs`` (and its own settings, the epoch and
    the worker), it yields :class:`~annbatch.types.LoadRequest` dictionaries. It does no I/O and
    never touches numpy's or torch's global random state, so the same settings always give the
    same batches.

    The loader drives a sampler like this:

    1. :meth:`validate` once the collection's ``n_obs`` is known (raise :class:`ValueError` with a
       clear message for settings that cannot work with it);
    2. :meth:`set_epoch` before each epoch, and :meth:`set_worker` inside each data-loading worker
       process, so that every worker yields a disjoint part of the epoch;
    3. :meth:`sample` to get the stream of load requests; :meth:`n_iters` to know in advance how
       many mini-batches that stream holds.

    To write a custom sampler, subclass :class:`Sampler` and implement :meth:`sample`,
    :meth:`n_iters` and :attr:`batch_size`; override :meth:`validate` to reject settings early.
    Use ``self._epoch``, ``self._worker_id`` and ``self._num_workers`` (set by the methods above)
    where the sampler should react to them. Keep :meth:`n_iters` equal to the number of splits
    that :meth:`sample` yields: the loader relies on it for ``len()``.

    Examples
    --------
    A sampler that loads fixed row ranges one at a time and yields each range as one mini-batch:

    .. code-block:: python

        import numpy as np

        from annbatch.abc import Sampler


        class RangeSampler(Sampler):
            def __init__(self, ranges: list[tuple[int, int]]):
                self._ranges = ranges

            @property
            def batch_size(self) -> None:
                return None  # batches have varying sizes

            def validate(self, n_obs: int) -> None:
                if any(not 0 <= a < b <= n_obs for a, b in self._ranges):
                    raise ValueError(f"ranges must lie within [0, {n_obs}) and be non-empty")

            def _mine(self) -> list[tuple[int, int]]:
                # each worker takes every num_workers-th range, so workers never overlap
                return self._ranges[self._worker_id :: self._num_workers]

            def sample(self, n_obs: int):
                self.validate(n_obs)
                for a, b in self._mine():
                    yield {"requests": [slice(a, b)], "splits": [np.arange(b - a, dtype=np.int64)]}

            def n_iters(self, n_obs: int) -> int:
                return len(self._mine())
    """

    _epoch: int = 0
    _worker_id: int = 0
    _num_workers: int = 1

    @abstractmethod
    def sample(self, n_obs: int) -> Iterator[LoadRequest]:
        """Yield the load requests of one epoch for the current worker.

        Parameters
        ----------
        n_obs
            Number of rows in the collection; requested rows lie in ``[0, n_obs)``.

        Yields
        ------
        LoadRequest
            Rows to read and the mini-batches to cut from them.
        """

    @abstractmethod
    def n_iters(self, n_obs: int) -> int:
        """Number of mini-batches :meth:`sample` yields for ``n_obs`` rows.

        This is the total number of ``splits`` over all requests, for the current epoch and
        worker settings.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Returns
        -------
        int
            The number of mini-batches.
        """

    @property
    @abstractmethod
    def batch_size(self) -> int | None:
        """Rows per mini-batch, or ``None`` where batches vary in size."""

    @property
    def shuffle(self) -> bool:
        """Whether the order of rows is randomised."""
        return False

    @property
    def epoch(self) -> int:
        """Current epoch, as set by :meth:`set_epoch` (default 0)."""
        return self._epoch

    @property
    def worker_id(self) -> int:
        """Current worker, as set by :meth:`set_worker` (default 0)."""
        return self._worker_id

    @property
    def num_workers(self) -> int:
        """Number of workers, as set by :meth:`set_worker` (default 1)."""
        return self._num_workers

    def validate(self, n_obs: int) -> None:
        """Check that this sampler can be used with ``n_obs`` rows.

        The default accepts everything; subclasses raise :class:`ValueError` with a message that
        names the offending setting and how to fix it.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.
        """
        return

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; samplers that shuffle derive a new order from it.

        Parameters
        ----------
        epoch
            Non-negative epoch number.
        """
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._epoch = int(epoch)

    def set_worker(self, worker_id: int, num_workers: int) -> None:
        """Restrict :meth:`sample` to the part of the epoch that belongs to one worker.

        Parameters
        ----------
        worker_id
            This worker's id, in ``[0, num_workers)``.
        num_workers
            Total number of workers sharing the epoch.
        """
        if int(num_workers) != num_workers or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        if int(worker_id) != worker_id or not 0 <= worker_id < num_workers:
            raise ValueError(f"worker_id must be an integer in [0, {num_workers}), got {worker_id!r}")
        self._worker_id = int(worker_id)
        self._num_workers = int(num_workers)
