"""Integer arithmetic shared by the chunk-based samplers: row budgets, load grouping, splits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from annbatch.samplers._permute import _Permuter

if TYPE_CHECKING:
    from collections.abc import Iterator

    from annbatch.types import LoadRequest


def _worker_rows(total: int, chunk_size: int, worker_id: int, num_workers: int) -> int:
    """Rows of ``total`` that belong to one worker.

    The epoch's ``total`` rows are cut into pieces of ``chunk_size`` (the last may be shorter) and
    piece ``j`` goes to worker ``j % num_workers``. This depends on sizes only, never on the seed,
    so every process can compute every worker's (and rank's) share.
    """
    n_full, rest = divmod(total, chunk_size)
    rows = len(range(worker_id, n_full, num_workers)) * chunk_size
    if rest and n_full % num_workers == worker_id:
        rows += rest
    return rows


def _n_batches(rows: int, batch_size: int, drop_last: bool) -> int:
    """Mini-batches cut from ``rows`` rows when partial batches are carried to the end."""
    n_full, rest = divmod(rows, batch_size)
    return n_full + int(bool(rest) and not drop_last)


Runs = tuple[np.ndarray, np.ndarray]
"""Row ranges as two int64 arrays, ``(starts, stops)``: a worker's chunks in reading order.

Kept as arrays, not as a list of slices: 100M rows are 400K chunks, and as many slice objects cost
tens of MB and, through the garbage collector's passes over them, half a second per epoch. Slices
are made per load, for its request.
"""


def _group_runs(
    starts: np.ndarray, stops: np.ndarray, bounds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Join the row ranges where one continues the previous (fewer, larger reads), within each group.

    The groups (loads) are ``[bounds[g], bounds[g + 1])``; all of them are joined in one pass of
    numpy, not a Python loop per load.

    Returns
    -------
    The joined ranges' starts and stops, and where each group's joined ranges begin (one more
    entry: the end). :func:`_group_slices` makes a group's slices, per load, for the reason given
    at :data:`Runs`.
    """
    n = int(bounds[-1])
    starts, stops = starts[:n], stops[:n]  # ranges past the last group (a dropped load) join nothing
    new = np.ones(n, dtype=bool)
    new[1:] = starts[1:] != stops[:-1]  # a range that continues the previous one joins it
    new[bounds[:-1][bounds[:-1] < n]] = True  # ... unless it begins a group
    first = np.flatnonzero(new)
    last = np.append(first[1:], n) - 1
    return starts[first], stops[last], np.searchsorted(first, bounds).tolist()


def _group_slices(run_starts: np.ndarray, run_stops: np.ndarray, lo: int, hi: int) -> list[slice]:
    """The slices of joined ranges ``lo:hi`` (from :func:`_group_runs`)."""
    return list(map(slice, run_starts[lo:hi].tolist(), run_stops[lo:hi].tolist()))


def _group_chunks(lengths: np.ndarray, preload_nchunks: int, batch_size: int) -> list[tuple[int, int]]:
    """Group consecutive chunks into loads of ``preload_nchunks`` chunks.

    A load that would not complete a single batch (possible with short chunks) takes further
    chunks until it does, so every request but possibly the last yields at least one split.
    """
    bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    n_chunks = len(lengths)
    groups: list[tuple[int, int]] = []
    carried = 0
    i = 0
    while i < n_chunks:
        j = min(i + preload_nchunks, n_chunks)
        if carried + bounds[j] - bounds[i] < batch_size and j < n_chunks:
            # first chunk end that completes a batch, or the last chunk
            j = int(np.searchsorted(bounds, bounds[i] + batch_size - carried, side="left"))
            j = min(j, n_chunks)
        groups.append((i, j))
        carried = int(carried + bounds[j] - bounds[i]) % batch_size
        i = j
    return groups


def _iter_loads(
    chunks: Runs,
    *,
    batch_size: int,
    preload_nchunks: int,
    drop_last: bool,
    rng: np.random.Generator | None,
) -> Iterator[LoadRequest]:
    """Turn one worker's ordered chunks into load requests.

    Parameters
    ----------
    chunks
        Row ranges ``(starts, stops)`` in the order they should be consumed.
    batch_size
        Rows per mini-batch.
    preload_nchunks
        Chunks per load.
    drop_last
        Whether to drop the final partial batch.
    rng
        Permutes each load's rows (carried ones included); ``None`` keeps them in order.

    Yields
    ------
    LoadRequest
        Every request has at least one split.
    """
    starts, stops = chunks
    lengths = stops - starts
    groups = _group_chunks(lengths, preload_nchunks, batch_size)
    if drop_last and groups:
        i, j = groups[-1]
        last_rows = int(lengths[i:j].sum())
        carried_in = (int(lengths.sum()) - last_rows) % batch_size
        if carried_in + last_rows < batch_size:
            # the last load would only feed the dropped partial batch: skip reading it at all
            groups.pop()
    if not groups:
        return
    bounds = np.array([i for i, _ in groups] + [groups[-1][1]], dtype=np.int64)
    run_starts, run_stops, run_ptr = _group_runs(starts, stops, bounds)
    group_rows = np.diff(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])[bounds]).tolist()
    permute = None if rng is None else _Permuter(rng)
    try:
        carried = 0
        for k in range(len(groups)):
            is_last = k == len(groups) - 1
            n_loaded = carried + group_rows[k]
            order = np.arange(n_loaded, dtype=np.int64) if permute is None else permute(n_loaded)
            n_full = n_loaded // batch_size
            splits = [order[b * batch_size : (b + 1) * batch_size] for b in range(n_full)]
            rest = order[n_full * batch_size :]
            requests = _group_slices(run_starts, run_stops, run_ptr[k], run_ptr[k + 1])
            request: LoadRequest = {"requests": requests, "splits": splits}
            if is_last:
                if len(rest) and not drop_last:
                    splits.append(rest)
            elif len(rest):
                request["carry"] = rest
            carried = len(rest)
            yield request
    finally:
        if permute is not None:
            permute.sync()


def _take_rows(starts: np.ndarray, lengths: np.ndarray, budget: int) -> Runs:
    """The first chunks (``starts``, ``lengths``, in order) that hold ``budget`` rows, the last one shortened."""
    n_used = int(np.searchsorted(np.cumsum(lengths), budget, side="left")) + 1
    starts = starts[:n_used].astype(np.int64)
    stops = starts + lengths[:n_used]
    stops[-1] -= int(lengths[:n_used].sum()) - budget
    return starts, stops
