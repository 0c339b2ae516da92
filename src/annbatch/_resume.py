"""Where a loader stands in its epochs, and how an interrupted epoch resumes (:class:`Progress`).

An epoch's order is a pure function of the sampler's settings, seed and epoch, so a position in it
is a handful of integers: the epoch, and for each run of that epoch so far (a run ends when the job
is interrupted) its number of ranks and the mini-batches each rank had yielded. Resuming on the same
number of ranks skips what this rank yielded and continues batch for batch. Resuming on another
number of ranks deals what the earlier runs left, in the global order, to the new ranks (see
:class:`~annbatch.samplers.DistributedSampler`): no row comes twice in the epoch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from annbatch.samplers import DistributedSampler
from annbatch.samplers._stream import _skip_batches

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from annbatch.abc import Sampler
    from annbatch.types import LoadRequest

_VERSION = 1


def _world(sampler: Sampler) -> int:
    return sampler.rank_world()[1] if isinstance(sampler, DistributedSampler) else 1


class Progress:
    """Counts the mini-batches a loader hands to its consumer, per epoch, and resumes from a count.

    The count is of batches *yielded to the consumer*, never of loads read ahead in the
    background, so a state taken between two batches names exactly what the consumer has seen.
    Counts are per rank: in a distributed job every rank yields the same number of batches
    (``equal_batches``), so one rank's state describes all of them.
    """

    def __init__(self) -> None:
        self.next_epoch = 0  # the epoch the next iteration starts (or resumes)
        self._resume: list[tuple[int, int]] = []  # earlier runs of next_epoch, from a loaded state
        self._epoch: int | None = None  # the epoch being iterated; None between epochs
        self._earlier: list[tuple[int, int]] = []  # runs of it that the current run continues from
        self._world = 1
        self._length = 0
        self.batches = 0  # yielded in the current run's deal, batches skipped on resuming included

    def _plan(self, sampler: Sampler) -> tuple[Sampler, int, list[tuple[int, int]]]:
        """For the next epoch: the sampler to draw from, the batches of it to skip, and the earlier runs."""
        history = list(self._resume)
        skip = 0
        if history and history[-1][0] == _world(sampler):
            # the same number of ranks as the last run: continue its deal batch for batch
            *history, (_, skip) = history
        if history:
            if not isinstance(sampler, DistributedSampler):
                sampler = DistributedSampler(sampler, rank=0, world_size=1, equal_batches=False)
                sampler.set_epoch(self.next_epoch)
            sampler = sampler._resumed(history)
        return sampler, skip, history

    def length(self, sampler: Sampler, n_obs: int) -> int:
        """Mini-batches of the epoch in progress, else of the next one, as its consumer counts them.

        A resumed epoch counts the batches of its earlier runs too, so a consumer that restored its
        own batch count (as Lightning does) ends the epoch where the loader does.
        """
        if self._epoch is not None:
            return self._length
        sampler, _, history = self._plan(sampler)
        return sum(k for _, k in history) + sampler.n_batches(n_obs)

    def begin(self, sampler: Sampler, n_obs: int) -> Iterator[LoadRequest]:
        """Start (or resume) the next epoch on ``sampler`` (epoch and worker set); its load requests."""
        plan, skip, history = self._plan(sampler)
        self._length = sum(k for _, k in history) + plan.n_batches(n_obs)
        self._epoch, self.next_epoch, self._resume = self.next_epoch, self.next_epoch + 1, []
        self._world, self._earlier, self.batches = _world(sampler), history, skip
        requests = plan.sample(n_obs)
        return _skip_batches(requests, skip) if skip else requests

    def yielded(self) -> None:
        """Count one mini-batch handed to the consumer."""
        self.batches += 1

    def end(self) -> None:
        """The epoch ran to its end."""
        self._epoch = None

    def state_dict(self) -> dict[str, Any]:
        """The position as plain integers (JSON-able), see :meth:`annbatch.Loader.state_dict`."""
        if self._epoch is None:
            epoch, runs = self.next_epoch, self._resume
        else:
            epoch, runs = self._epoch, [*self._earlier, (self._world, self.batches)]
        return {"version": _VERSION, "epoch": epoch, "runs": [[w, k] for w, k in runs]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from a :meth:`state_dict` at the next iteration."""
        try:
            version, epoch = state["version"], int(state["epoch"])
            runs = [(int(w), int(k)) for w, k in state["runs"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"Not an annbatch loader state (expected 'version', 'epoch' and 'runs'): {err!r}."
            ) from None
        if version != _VERSION:
            raise ValueError(
                f"Loader state version {version!r} is not supported (this annbatch reads {_VERSION})."
            )
        if epoch < 0 or any(w < 1 or k < 0 for w, k in runs):
            raise ValueError(f"Invalid loader state (negative epoch, ranks or batches): {dict(state)!r}.")
        self.next_epoch, self._resume, self._epoch = epoch, runs, None
