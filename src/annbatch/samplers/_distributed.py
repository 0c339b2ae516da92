"""Sharding a sampler across the ranks of a distributed job."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from annbatch.abc import Sampler
from annbatch.samplers._random import RandomSampler

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import numpy as np

    from annbatch.types import LoadRequest

__all__ = ["DistributedSampler"]


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
    """Gives each rank of a distributed job its own contiguous shard of a sampler's rows.

    Rank ``r`` of ``W`` samples rows ``[start + r * n // W, start + (r + 1) * n // W)`` of the
    wrapped sampler's ``n`` masked rows, with all of the wrapped sampler's other settings (seed,
    shuffling, chunking, workers). A ``num_samples`` of the wrapped sampler counts rows over all
    ranks and is shared out in proportion to shard sizes.

    Parameters
    ----------
    sampler
        The sampler to shard. It is not modified, except that :meth:`set_epoch` and
        :meth:`set_worker` are forwarded to it.
    rank
        This process's rank. Missing values come from ``get_rank_world``, else from an
        initialised ``torch.distributed``, else from ``jax`` (if imported), else rank 0 of 1.
    world_size
        Number of ranks; resolved like ``rank``.
    get_rank_world
        Callable returning ``(rank, world_size)``, called when the sampler is used.
    equal_batches
        Truncate so that every rank yields the same number of mini-batches (the smallest over
        ranks, per worker), which keeps collective operations in step. Every rank must use the
        same ``batch_size``, ``chunk_size``, ``drop_last`` and worker count; the seed may differ.
    """

    def __init__(
        self,
        sampler: RandomSampler,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        get_rank_world: Callable[[], tuple[int, int]] | None = None,
        equal_batches: bool = True,
    ) -> None:
        if not isinstance(sampler, RandomSampler):
            raise TypeError(
                f"sampler must be a RandomSampler or SequentialSampler, got {type(sampler).__name__}"
            )
        self._sampler = sampler
        self._rank = rank
        self._world_size = world_size
        self._get_rank_world = get_rank_world
        self._equal_batches = bool(equal_batches)
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
    def sampler(self) -> RandomSampler:
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
    def batch_size(self) -> int:
        """Rows per mini-batch."""
        return self._sampler.batch_size

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

    def _shard(self, n_obs: int, rank: int, world: int) -> RandomSampler:
        start, stop = self._sampler._bounds(n_obs)
        n = stop - start
        lo, hi = rank * n // world, (rank + 1) * n // world
        total = self._sampler._num_samples
        if total is not None:
            # proportional to shard size, so a rank never needs more rows than its shard holds
            total = total * hi // n - total * lo // n
        return self._sampler._restricted(slice(start + lo, start + hi), total)

    def validate(self, n_obs: int) -> None:
        """Check the wrapped sampler and that every rank gets at least one row.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.
        """
        self._sampler.validate(n_obs)
        _, world = self.rank_world()
        start, stop = self._sampler._bounds(n_obs)
        if stop - start < world:
            raise ValueError(
                f"the sampler's {stop - start} rows cannot be shared among world_size={world} ranks; "
                "use fewer ranks or more rows"
            )

    def _count(self, n_obs: int, rank: int, world: int) -> int:
        own = self._shard(n_obs, rank, world).n_iters(n_obs)
        if not self._equal_batches:
            return own
        return min(own, *(self._shard(n_obs, r, world).n_iters(n_obs) for r in range(world)))

    def n_iters(self, n_obs: int) -> int:
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
        rank, world = self.rank_world()
        return self._count(n_obs, rank, world)

    def sample(self, n_obs: int) -> Iterator[LoadRequest]:
        """Yield this rank's (and worker's) load requests for the current epoch.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Yields
        ------
        LoadRequest
            Requests of the rank's shard, cut short where ``equal_batches`` demands.
        """
        self.validate(n_obs)
        rank, world = self.rank_world()
        remaining = self._count(n_obs, rank, world)
        for request in self._shard(n_obs, rank, world).sample(n_obs):
            if remaining <= 0:
                return
            if len(request["splits"]) >= remaining:
                splits: list[np.ndarray] = request["splits"][:remaining]
                # the last request: nothing to carry
                yield {"requests": request["requests"], "splits": splits}
                return
            remaining -= len(request["splits"])
            yield request
