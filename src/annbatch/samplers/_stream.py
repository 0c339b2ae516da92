"""Operations on a stream of load requests: self-contained loads, skipping batches, dealing loads to ranks.

These are pure integer work on :class:`~annbatch.types.LoadRequest` streams, whatever sampler made
them. They are what resumption and distributed sharding are built from:

- :func:`_self_contained` turns rows carried between loads into explicit rows of the receiving
  load, so that any load can be read on its own (skipped loads, loads dealt to other ranks);
- :func:`_skip_batches` drops the first mini-batches of a stream without reading them;
- :func:`_dealt` gives load ``i`` of one global stream to rank ``i % world`` (a last round of
  fewer loads than ranks batch by batch);
- :func:`_remaining` is what a global stream still holds after ``world`` ranks each consumed
  their first ``k`` mini-batches of it, in the global order, so that it can be dealt anew to a
  different number of ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from annbatch.types import LoadRequest


def _request_rows(requests: list[slice] | np.ndarray) -> np.ndarray:
    """Global rows of a request's ``requests``, in loading order."""
    if isinstance(requests, np.ndarray):
        return requests.astype(np.int64, copy=False)
    if not requests:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(s.start, s.stop, dtype=np.int64) for s in requests])


class _CarryTracker:
    """Follows which global rows are carried from one load of a stream into the next."""

    def __init__(self) -> None:
        self.rows = np.empty(0, dtype=np.int64)  # global rows carried into the next request

    def explicit(self, request: LoadRequest) -> LoadRequest:
        """``request`` with the rows carried into it named in ``requests`` (positions unchanged)."""
        if not len(self.rows):
            return request
        rows = np.concatenate([self.rows, _request_rows(request["requests"])])
        out: LoadRequest = {"requests": rows, "splits": request["splits"]}
        if "carry" in request:
            out["carry"] = request["carry"]
        return out

    def advance(self, request: LoadRequest) -> None:
        """Record the rows ``request`` carries on (call once per request, in stream order)."""
        carry = request.get("carry")
        if carry is None or not len(carry):
            self.rows = np.empty(0, dtype=np.int64)
            return
        # only the carried positions are resolved, not the whole load
        n_in = len(self.rows)
        carry = np.asarray(carry, dtype=np.int64)
        out = np.empty(len(carry), dtype=np.int64)
        inner = carry < n_in
        out[inner] = self.rows[carry[inner]]
        pos = carry[~inner] - n_in
        requests = request["requests"]
        if isinstance(requests, np.ndarray):
            out[~inner] = requests[pos]
        else:
            starts = np.fromiter((s.start for s in requests), dtype=np.int64, count=len(requests))
            lengths = np.fromiter((s.stop - s.start for s in requests), dtype=np.int64, count=len(requests))
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            which = np.searchsorted(offsets, pos, side="right") - 1
            out[~inner] = starts[which] + pos - offsets[which]
        self.rows = out


def _self_contained(stream: Iterable[LoadRequest]) -> Iterator[LoadRequest]:
    """Each request with the rows carried into it made explicit, and without ``carry``.

    The loaded rows of every yielded request are exactly those of the original (carried rows
    first), so ``splits`` stay valid, and each request can be read without the ones before it.
    """
    tracker = _CarryTracker()
    for request in stream:
        out = tracker.explicit(request)
        tracker.advance(request)
        yield {"requests": out["requests"], "splits": out["splits"]}


def _skip_batches(stream: Iterable[LoadRequest], n: int) -> Iterator[LoadRequest]:
    """The stream without its first ``n`` mini-batches; skipped loads are never read.

    The first request yielded names the rows carried into it explicitly; the rest pass through.
    """
    tracker = _CarryTracker()
    it = iter(stream)
    for request in it:
        k = len(request["splits"])
        if n >= k:
            n -= k
            tracker.advance(request)
            continue
        out = tracker.explicit(request)
        if n:
            out = {**out, "splits": out["splits"][n:]}
        yield out
        break
    yield from it


def _gather(parts: list[tuple[LoadRequest, np.ndarray]]) -> LoadRequest:
    """One load of just the rows of some mini-batches, each given as (its load, its split)."""
    rows = [_request_rows(load["requests"])[split] for load, split in parts]
    ends = np.cumsum([len(r) for r in rows])
    splits = [np.arange(e - len(r), e, dtype=np.int64) for r, e in zip(rows, ends, strict=True)]
    return {"requests": np.concatenate(rows), "splits": splits}


def _dealt(stream: Iterable[LoadRequest], world: int) -> Iterator[tuple[int, LoadRequest]]:
    """``(rank, load)`` of a self-contained global stream dealt to ``world`` ranks, in a fixed order.

    Load ``i`` goes to rank ``i % world``. The last round, when it has fewer loads than ranks, is dealt
    batch by batch instead (each rank reading only its batches' rows), so that a short epoch still
    gives every rank a share.
    """
    round_: list[LoadRequest] = []
    for request in stream:
        round_.append(request)
        if len(round_) == world:
            yield from enumerate(round_)
            round_ = []
    if not round_:
        return
    parts: list[list[tuple[LoadRequest, np.ndarray]]] = [[] for _ in range(world)]
    batches = ((load, split) for load in round_ for split in load["splits"])
    for j, part in enumerate(batches):
        parts[j % world].append(part)
    for rank, mine in enumerate(parts):
        if mine:
            yield rank, _gather(mine)


def _deal(stream: Iterable[LoadRequest], rank: int, world: int) -> Iterator[LoadRequest]:
    """Rank ``rank``'s loads of a self-contained global stream (see :func:`_dealt`)."""
    for r, request in _dealt(stream, world):
        if r == rank:
            yield request


def _counts(stream: Iterable[LoadRequest], world: int) -> list[int]:
    """Mini-batches each of ``world`` ranks gets when ``stream`` is dealt."""
    counts = [0] * world
    for r, request in _dealt(stream, world):
        counts[r] += len(request["splits"])
    return counts


def _truncated(stream: Iterable[LoadRequest], n: int) -> Iterator[LoadRequest]:
    """The first ``n`` mini-batches of ``stream``."""
    if n <= 0:
        return
    for request in stream:
        if len(request["splits"]) >= n:
            yield {"requests": request["requests"], "splits": request["splits"][:n]}
            return
        n -= len(request["splits"])
        yield request


def _remaining(stream: Iterable[LoadRequest], world: int, consumed: int) -> Iterator[LoadRequest]:
    """What a self-contained global stream still holds after each of ``world`` ranks consumed ``consumed`` batches.

    The stream is dealt as :func:`_dealt` does; rank ``r`` has consumed the first ``consumed``
    mini-batches of its loads. The rest is yielded in the dealing order (partly consumed loads keep
    their unconsumed splits), ready to be dealt to another number of ranks.
    """
    used = [0] * world
    for r, request in _dealt(stream, world):
        k = len(request["splits"])
        take = min(k, consumed - used[r])
        used[r] += take
        if take == k:
            continue
        yield {"requests": request["requests"], "splits": request["splits"][take:]}
