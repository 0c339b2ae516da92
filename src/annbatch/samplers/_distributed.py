"""Sharding a sampler across the ranks of a distributed job."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from annbatch.abc import Sampler
from annbatch.samplers._stream import _counts, _deal, _remaining, _self_contained, _truncated

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import numpy as np

    from annbatch.types import LoadRequest

__all__ = ["DistributedSampler"]

_CACHED_EPOCHS = 4  # batch counts kept per sampler (the current epoch and a few neighbours)


def _torch_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "DistributedSampler(dist_info='torch') needs an initialised torch.distributed: call "
            "torch.distributed.init_process_group() first (Lightning does it when the Trainer starts)"
        )
    return int(dist.get_rank()), int(dist.get_world_size())


def _jax_rank_world() -> tuple[int, int]:
    import jax

    return int(jax.process_index()), int(jax.process_count())


_BACKENDS: dict[str, Callable[[], tuple[int, int]]] = {"torch": _torch_rank_world, "jax": _jax_rank_world}


def _detect_rank_world() -> tuple[int, int]:
    """Rank and world size from an initialised torch.distributed, else jax, else a single process."""
    # Look modules up instead of importing them: neither is a dependency, and a job that uses one
    # has imported it already.
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    jax = sys.modules.get("jax")
    if jax is not None:
        return int(jax.process_index()), int(jax.process_count())
    return 0, 1


class DistributedSampler(Sampler):
    """Shares the loads of any sampler among the ranks of a distributed job.

    The wrapped sampler produces one *global* order for the epoch, as it would in a single
    process; its loads are dealt round-robin: load ``i`` goes to rank ``i % world_size``. Rows a
    load carries into the next one are read by the receiving rank itself, so every rank's loads
    stand alone. Each rank therefore reads disjoint rows, together covering the epoch, and the
    order depends on the seed and epoch only, never on the number of ranks. That is what lets a
    loader resume an interrupted epoch on a different number of ranks (see
    :meth:`annbatch.Loader.state_dict`).

    Inside :class:`torch.utils.data.DataLoader` workers, every worker of every rank takes its own
    share (``world_size * num_workers`` shares in all).

    :attr:`mask` and :attr:`rng` are those of the wrapped sampler: reading or setting them here
    reads or sets them there (every rank must set the same).

    Parameters
    ----------
    sampler
        Any :class:`~annbatch.abc.Sampler`: random, sequential, class-homogeneous, weighted or
        your own. It is not modified, except that :meth:`set_epoch` and :meth:`set_worker` are
        forwarded to it; its ``num_samples`` counts rows over all ranks.
    rank
        This process's rank. Missing values come from ``get_rank_world``, else from an
        initialised ``torch.distributed``, else from ``jax`` (if imported), else rank 0 of 1.
    world_size
        Number of ranks; resolved like ``rank``.
    get_rank_world
        Callable returning ``(rank, world_size)``, called when the sampler is used.
    equal_batches
        Truncate so that every rank yields the same number of mini-batches (the smallest over
        ranks and workers), which keeps collective operations in step. Every rank must use the
        same sampler settings, seed included.
    dist_info
        Where rank and world size come from, as in the scverse ``annbatch`` API: ``"torch"`` (an
        initialised ``torch.distributed``; a :class:`RuntimeError` otherwise), ``"jax"``, or a
        callable returning ``(rank, world_size)``. Asked when the sampler is used, not when it is
        made. Not with ``rank``, ``world_size`` or ``get_rank_world``.
    enforce_equal_batches
        The scverse spelling of ``equal_batches``.

    """

    def __init__(
        self,
        sampler: Sampler,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        get_rank_world: Callable[[], tuple[int, int]] | None = None,
        equal_batches: bool | None = None,
        dist_info: Literal["torch", "jax"] | Callable[[], tuple[int, int]] | None = None,
        enforce_equal_batches: bool | None = None,
    ) -> None:
        if not isinstance(sampler, Sampler) or isinstance(sampler, DistributedSampler):
            raise TypeError(
                f"sampler must be an annbatch.abc.Sampler (not itself distributed), got {type(sampler).__name__}"
            )
        if dist_info is not None:
            if rank is not None or world_size is not None or get_rank_world is not None:
                raise ValueError("give dist_info or rank/world_size/get_rank_world, not both")
            if isinstance(dist_info, str):
                if dist_info not in _BACKENDS:
                    raise ValueError(f"dist_info must be 'torch', 'jax' or a callable, got {dist_info!r}")
                get_rank_world = _BACKENDS[dist_info]
            elif callable(dist_info):
                get_rank_world = dist_info
            else:
                raise ValueError(f"dist_info must be 'torch', 'jax' or a callable, got {dist_info!r}")
        if enforce_equal_batches is not None:
            if equal_batches is not None and bool(equal_batches) != bool(enforce_equal_batches):
                raise ValueError("equal_batches and enforce_equal_batches disagree; give one of them")
            equal_batches = enforce_equal_batches
        self._sampler = sampler
        self._rank = rank
        self._world_size = world_size
        self._get_rank_world = get_rank_world
        self._equal_batches = True if equal_batches is None else bool(equal_batches)
        self._history: tuple[tuple[int, int], ...] = ()
        self._count_cache: dict[tuple, list[int]] = {}
        # fail early on explicit values; detected ones are checked when used
        if rank is not None and world_size is not None:
            self._check(rank, world_size)

    @staticmethod
    def _check(rank: int, world_size: int) -> tuple[int, int]:
        if int(world_size) != world_size or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if int(rank) != rank or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        return int(rank), int(world_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._sampler!r}, rank={self._rank}, world_size={self._world_size}, "
            f"equal_batches={self._equal_batches})"
        )

    @property
    def sampler(self) -> Sampler:
        """The wrapped sampler."""
        return self._sampler

    @property
    def equal_batches(self) -> bool:
        """Whether every rank yields the same number of mini-batches."""
        return self._equal_batches

    def rank_world(self) -> tuple[int, int]:
        """Resolve ``(rank, world_size)`` for this process.

        Returns
        -------
        tuple[int, int]
            This process's rank and the number of ranks.
        """
        rank, world = self._rank, self._world_size
        if rank is None or world is None:
            if self._get_rank_world is not None:
                found = self._get_rank_world()
            else:
                found = _detect_rank_world()
            rank = found[0] if rank is None else rank
            world = found[1] if world is None else world
        return self._check(rank, world)

    @property
    def batch_size(self) -> int | None:
        """Rows per mini-batch."""
        return self._sampler.batch_size

    @property
    def replacement(self) -> bool:
        """Whether the wrapped sampler draws with replacement."""
        return bool(getattr(self._sampler, "replacement", False))

    @property
    def mask(self) -> slice:
        """The wrapped sampler's mask (settable)."""
        return self._sampler.mask

    @mask.setter
    def mask(self, value: slice | None) -> None:
        self._sampler.mask = value
        self._count_cache = {}

    @property
    def rng(self) -> np.random.Generator | None:
        """The wrapped sampler's generator (settable)."""
        return self._sampler.rng

    @rng.setter
    def rng(self, value: np.random.Generator | None) -> None:
        self._sampler.rng = value
        self._count_cache = {}

    @property
    def shuffle(self) -> bool:
        """Whether the wrapped sampler shuffles."""
        return self._sampler.shuffle

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch here and on the wrapped sampler.

        Parameters
        ----------
        epoch
            Non-negative epoch number.
        """
        super().set_epoch(epoch)
        self._sampler.set_epoch(epoch)

    def set_worker(self, worker_id: int, num_workers: int) -> None:
        """Set the worker here and on the wrapped sampler.

        Parameters
        ----------
        worker_id
            This worker's id, in ``[0, num_workers)``.
        num_workers
            Total number of workers on this rank.
        """
        super().set_worker(worker_id, num_workers)
        self._sampler.set_worker(worker_id, num_workers)

    def _resumed(self, history: Sequence[tuple[int, int]]) -> DistributedSampler:
        """A copy whose epoch starts after what the ranks of ``history`` consumed of it.

        ``history`` lists ``(world_size, batches per rank)`` of earlier runs of the same epoch, in
        order; each run dealt what the runs before it left.
        """
        new = copy.copy(self)
        new._history = tuple((int(w), int(k)) for w, k in history)
        new._count_cache = {}
        return new

    def _share(self) -> tuple[int, int]:
        """Index and count of shares for this process: ``(rank * num_workers + worker, world * num_workers)``."""
        rank, world = self.rank_world()
        return rank * self._num_workers + self._worker_id, world * self._num_workers

    def _global(self, n_obs: int) -> Iterator[LoadRequest]:
        """The epoch's self-contained loads in the global order, less what earlier runs consumed."""
        inner = copy.copy(self._sampler)
        inner.set_worker(0, 1)
        inner.set_epoch(self._epoch)
        stream = _self_contained(inner.sample(n_obs))
        for world, consumed in self._history:
            stream = _remaining(stream, world, consumed)
        return stream

    def _all_counts(self, n_obs: int) -> list[int]:
        """Batches of every share this epoch (one pass over the epoch's requests, cached).

        The cache is one dict shared by this sampler and its shallow copies (the loader copies its
        sampler for every ``len()`` and iteration), so an epoch is counted once, not once per copy.
        """
        inner_mask = self._sampler.mask  # the wrapped sampler may have been changed since
        key = (
            n_obs,
            self._epoch,
            self._share()[1],
            inner_mask.start,
            inner_mask.stop,
            getattr(self._sampler, "seed", None),
        )
        cache = self._count_cache
        if key not in cache:
            if len(cache) >= _CACHED_EPOCHS:
                cache.clear()
            cache[key] = _counts(self._global(n_obs), key[2])
        return cache[key]

    def validate(self, n_obs: int) -> None:
        """Check the wrapped sampler with ``n_obs`` rows.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.
        """
        self._sampler.validate(n_obs)
        self.rank_world()

    def n_batches(self, n_obs: int) -> int:
        """Number of mini-batches this rank's current worker yields.

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
        counts = self._all_counts(n_obs)
        return min(counts) if self._equal_batches else counts[self._share()[0]]

    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        """Yield this rank's (and worker's) load requests for the current epoch.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Yields
        ------
        LoadRequest
            The loads dealt to this share, cut short where ``equal_batches`` demands.
        """
        n = self.n_batches(n_obs)
        share, n_shares = self._share()
        yield from _truncated(_deal(self._global(n_obs), share, n_shares), n)
