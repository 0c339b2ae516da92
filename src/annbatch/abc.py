"""Abstract base classes that users may subclass to extend annbatch."""

from __future__ import annotations

import warnings
from abc import ABCMeta, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterator

    from annbatch.types import LoadRequest

__all__ = ["Sampler"]

# Randomness of the splits that Sampler.sample makes for requests without them, when the sampler
# has no rng: fixed, so that those splits too depend on the epoch and worker only.
_SPLITS_SEED = 0x616E6E62


def _defines(cls: type, name: str) -> bool:
    """Whether a class below :class:`Sampler` in ``cls``'s MRO defines ``name``."""
    return any(
        name in klass.__dict__ for klass in cls.__mro__ if klass.__dict__.get("_is_sampler_base") is None
    )


class _SamplerMeta(ABCMeta):
    """Accepts both ways of writing a sampler (see :class:`Sampler`).

    A class that implements :meth:`Sampler.sample` itself (the older, complete way) need not
    implement ``_sample``, ``validate`` or ``shuffle``; one that implements the deprecated
    ``n_iters`` need not implement ``n_batches``. Everything else stays abstract as declared.
    """

    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any):
        cls = super().__new__(mcls, name, bases, namespace, **kwargs)
        if namespace.get("_is_sampler_base"):
            return cls
        abstract = set(cls.__abstractmethods__)
        if _defines(cls, "sample"):
            abstract -= {"_sample", "validate", "shuffle"}
        if _defines(cls, "n_iters"):
            abstract.discard("n_batches")
            if not _defines(cls, "n_batches"):
                warnings.warn(
                    f"{name} defines n_iters(n_obs), which is deprecated: rename it n_batches(n_obs). "
                    "It still works for now.",
                    FutureWarning,
                    stacklevel=2,
                )
        cls.__abstractmethods__ = frozenset(abstract)
        return cls


class Sampler(metaclass=_SamplerMeta):
    """Decides which rows to load and how to cut them into mini-batches.

    A sampler is pure: given the number of rows ``n_obs`` (and its own settings, the epoch and
    the worker), it yields :class:`~annbatch.types.LoadRequest` dictionaries. It does no I/O, so
    it can be written and tested without any data (:func:`annbatch.testing.check_sampler`).

    The loader drives a sampler like this:

    1. :meth:`set_epoch` before each epoch, and :meth:`set_worker` inside each data-loading worker
       process (read them as :attr:`epoch`, :attr:`worker_id` and :attr:`num_workers`);
    2. :meth:`n_batches` to know how many mini-batches the epoch holds (the loader's ``len()``);
    3. :meth:`sample`, which calls :meth:`validate` and then iterates :meth:`_sample`.

    **To write a sampler**, subclass :class:`Sampler` and implement

    - :meth:`_sample` ``(n_obs)``: yield the load requests of one epoch. A request without
      ``"splits"`` is cut by :meth:`sample` into mini-batches of :attr:`batch_size` rows, in
      random order when :attr:`shuffle` is true;
    - :meth:`n_batches` ``(n_obs)``: the number of mini-batches those requests hold;
    - :meth:`validate` ``(n_obs)``: raise :class:`ValueError`, naming the setting and the fix, for
      settings that cannot work with ``n_obs`` rows (``return`` if there is nothing to check);
    - the properties :attr:`batch_size` (``None`` where batches vary in size) and :attr:`shuffle`.

    :attr:`mask` (a contiguous range of rows) and :attr:`rng` (a :class:`numpy.random.Generator`)
    are settable properties; the default ones only store the value, so a sampler that should
    honour them reads ``self.mask`` and draws from ``self.rng``. This is the interface of
    ``annbatch.abc.Sampler`` in the scverse ``annbatch`` 0.3 package, so samplers written for it
    work here unchanged.

    Samplers written for earlier versions of this package, which implement :meth:`sample` itself
    (validating on their own) and ``n_iters`` instead of :meth:`n_batches`, keep working:
    ``n_iters`` is a deprecated alias (a :class:`FutureWarning` says to rename it).

    Keep :meth:`n_batches` equal to the number of splits that :meth:`sample` yields, draw
    randomness from :attr:`rng` or from a seed combined with :attr:`epoch` (never from numpy's
    global state), so that every copy of the sampler in every worker process draws the same
    epoch, and split the epoch among workers by :attr:`worker_id` where the sampler is used with
    several torch ``DataLoader`` workers (otherwise each worker yields the whole epoch).

    Examples
    --------
    A sampler that loads fixed row ranges and lets :meth:`sample` cut them into shuffled
    mini-batches:

    .. code-block:: python

        import numpy as np

        from annbatch.abc import Sampler


        class RangeSampler(Sampler):
            def __init__(self, ranges: list[tuple[int, int]], batch_size: int, seed: int = 0):
                self._ranges = ranges
                self._batch_size = batch_size
                self.rng = np.random.default_rng(seed)

            @property
            def batch_size(self) -> int:
                return self._batch_size

            @property
            def shuffle(self) -> bool:
                return True

            def validate(self, n_obs: int) -> None:
                if any(not 0 <= a < b <= n_obs for a, b in self._ranges):
                    raise ValueError(f"ranges must lie within [0, {n_obs}) and be non-empty")

            def _mine(self) -> list[tuple[int, int]]:
                # each worker takes every num_workers-th range, so workers never overlap
                return self._ranges[self.worker_id :: self.num_workers]

            def _sample(self, n_obs: int):
                for a, b in self._mine():
                    yield {"requests": [slice(a, b)]}  # no "splits": sample() cuts them

            def n_batches(self, n_obs: int) -> int:
                return sum(-(-(b - a) // self._batch_size) for a, b in self._mine())
    """

    _is_sampler_base = True
    _epoch: int = 0
    _worker_id: int = 0
    _num_workers: int = 1
    _mask: slice | None = slice(0, None)
    _rng: np.random.Generator | None = None

    # -- what a sampler implements ---------------------------------------------------------------
    @abstractmethod
    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        """Yield the load requests of one epoch for the current worker (called by :meth:`sample`).

        Parameters
        ----------
        n_obs
            Number of rows in the collection; requested rows lie in ``[0, n_obs)``.

        Yields
        ------
        LoadRequest
            Rows to read, and optionally the mini-batches to cut from them.
        """
        raise NotImplementedError

    @abstractmethod
    def n_batches(self, n_obs: int) -> int:
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
        # reached only by classes that implement the deprecated n_iters instead (see _SamplerMeta)
        return self.n_iters(n_obs)

    @abstractmethod
    def validate(self, n_obs: int) -> None:
        """Check that this sampler can be used with ``n_obs`` rows; :meth:`sample` calls it first.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Raises
        ------
        ValueError
            With a message that names the offending setting and how to fix it.
        """
        return

    @property
    @abstractmethod
    def batch_size(self) -> int | None:
        """Rows per mini-batch, or ``None`` where batches vary in size."""

    @property
    @abstractmethod
    def shuffle(self) -> bool:
        """Whether the order of rows is randomised (also of the splits :meth:`sample` makes)."""
        return False

    # -- what the base class provides ------------------------------------------------------------
    def sample(self, n_obs: int) -> Iterator[LoadRequest]:
        """Validate, then yield the load requests of one epoch for the current worker.

        Requests from :meth:`_sample` without ``"splits"`` get them here: their loaded rows cut
        into mini-batches of :attr:`batch_size` (the last one shorter), after a permutation drawn
        from :attr:`rng` when :attr:`shuffle` is true (without an ``rng``, from a fixed seed and
        the epoch and worker).

        Parameters
        ----------
        n_obs
            Number of rows in the collection; requested rows lie in ``[0, n_obs)``.

        Yields
        ------
        LoadRequest
            Rows to read and the mini-batches to cut from them.
        """
        self.validate(n_obs)
        rng: np.random.Generator | None = None
        for request in self._sample(n_obs):
            if request.get("splits") is None:
                if rng is None:
                    rng = self._splits_rng()
                request = {**request, "splits": self._make_splits(request, rng)}
            yield request

    def _splits_rng(self) -> np.random.Generator:
        if isinstance(self.rng, np.random.Generator):
            return self.rng
        return np.random.default_rng((_SPLITS_SEED, self._epoch, self._worker_id))

    def _make_splits(self, request: LoadRequest, rng: np.random.Generator) -> list[np.ndarray]:
        batch_size = self.batch_size
        if batch_size is None:
            raise ValueError(
                f"{type(self).__name__} yielded a load request without 'splits' but its batch_size is "
                "None; give every request 'splits' or make batch_size an integer"
            )
        if "carry" in request:
            raise ValueError(
                f"{type(self).__name__} yielded a load request with 'carry' but without 'splits'; a request "
                "that carries rows into the next must say which rows form its mini-batches"
            )
        rows = request["requests"]
        n = len(rows) if isinstance(rows, np.ndarray) else sum(s.stop - s.start for s in rows)
        order = rng.permutation(n) if self.shuffle else np.arange(n, dtype=np.int64)
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]

    def n_iters(self, n_obs: int) -> int:
        """Deprecated alias of :meth:`n_batches`.

        .. deprecated:: 0.2
            Use :meth:`n_batches`.
        """
        warnings.warn("Sampler.n_iters is deprecated; use n_batches.", FutureWarning, stacklevel=2)
        return self.n_batches(n_obs)

    @property
    def mask(self) -> slice:
        """Contiguous range of rows the sampler draws from; ``slice(0, None)`` is every row."""
        return slice(0, None) if self._mask is None else self._mask

    @mask.setter
    def mask(self, value: slice | None) -> None:
        self._mask = value

    @property
    def rng(self) -> np.random.Generator | None:
        """The random generator the sampler draws from, or ``None`` where it has none."""
        return self._rng

    @rng.setter
    def rng(self, value: np.random.Generator | None) -> None:
        self._rng = value

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
