"""Checks for sampler authors: does a sampler keep the contract the loader relies on?

:func:`check_sampler` runs a sampler's epoch without any data, the way the loader drives it, and
raises an :class:`AssertionError` naming the first broken rule. Call it from your tests::

    from annbatch.testing import check_sampler


    def test_my_sampler():
        check_sampler(MySampler(...), n_obs=10_000, num_workers=2, covers="mask")
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NoReturn

import numpy as np

from annbatch.abc import Sampler
from annbatch.samplers._stream import _request_rows

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annbatch.types import LoadRequest

__all__ = ["SamplerCheck", "check_requests", "check_sampler"]


@dataclass(frozen=True)
class SamplerCheck:
    """What :func:`check_sampler` saw of one epoch.

    Attributes
    ----------
    batches
        Per worker, its mini-batches as arrays of global rows, in the order they are yielded.
    requests
        Per worker, the load requests :meth:`~annbatch.abc.Sampler.sample` yielded.
    """

    batches: list[list[np.ndarray]]
    requests: list[list[LoadRequest]]

    @property
    def rows(self) -> np.ndarray:
        """Every row of the epoch, worker after worker, batch after batch."""
        flat = [b for worker in self.batches for b in worker]
        return np.concatenate(flat) if flat else np.empty(0, dtype=np.int64)


def _fail(message: str) -> NoReturn:
    # not `assert`: the checks must hold under `python -O` too
    raise AssertionError(message)


_KEYS = frozenset({"requests", "splits", "carry"})


def _checked_rows(request: LoadRequest, n_obs: int | None, where: str) -> np.ndarray:
    """The global rows ``request["requests"]`` reads, in order, after checking their form."""
    if not isinstance(request, dict) or "requests" not in request:
        _fail(f"{where} must be a dict with a 'requests' key, got {request!r:.80}")
    if unknown := set(request) - _KEYS:
        _fail(f"{where} has unknown keys {sorted(unknown)}; a load request has 'requests', 'splits', 'carry'")
    upper = np.iinfo(np.int64).max if n_obs is None else n_obs
    rows = request["requests"]
    if isinstance(rows, np.ndarray):
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            _fail(
                f"{where}: 'requests' as an array must be 1-D integers, got {rows.dtype} with shape {rows.shape}"
            )
        if len(rows) and (rows.min() < 0 or rows.max() >= upper):
            _fail(f"{where}: 'requests' names rows outside [0, {n_obs})")
        return _request_rows(rows)
    if not isinstance(rows, list | tuple):
        _fail(f"{where}: 'requests' must be a list of slices or an integer array, got {type(rows).__name__}")
    for s in rows:
        if not isinstance(s, slice) or s.step not in (None, 1) or s.start is None or s.stop is None:
            _fail(f"{where}: every entry of 'requests' must be a slice(start, stop) without step, got {s!r}")
        if not 0 <= s.start < s.stop <= upper:
            _fail(f"{where}: {s!r} is empty or lies outside [0, {n_obs})")
    return _request_rows(list(rows))


def _index_array(part: object, n_loaded: int, what: str) -> np.ndarray:
    if not isinstance(part, np.ndarray) or part.ndim != 1 or part.dtype.kind not in "iu":
        _fail(f"{what} must be a 1-D integer numpy array, got {part!r:.80}")
    if len(part) and (part.min() < 0 or part.max() >= n_loaded):
        _fail(f"{what} indexes outside the {n_loaded} loaded rows")
    return part


def check_requests(
    requests: Sequence[LoadRequest],
    n_obs: int | None = None,
    *,
    batch_size: int | None = None,
    use_every_loaded_row: bool = False,
    label: str = "requests",
) -> list[np.ndarray]:
    """Check one stream of load requests (as ``sample`` yields them) and resolve its mini-batches.

    The per-request rules of :func:`check_sampler`, for a stream you made yourself.

    Parameters
    ----------
    requests
        The load requests of one epoch of one worker, in order.
    n_obs
        Number of rows; ``None`` checks only that rows are non-negative.
    batch_size
        Most rows per mini-batch; ``None`` for no limit.
    use_every_loaded_row
        Require every request but the last to use all rows it loads.
    label
        How messages name the stream.

    Returns
    -------
    list[numpy.ndarray]
        The mini-batches as arrays of global rows, in order.
    """
    requests = list(requests)
    batches: list[np.ndarray] = []
    carried = np.empty(0, dtype=np.int64)
    for k, request in enumerate(requests):
        where = f"{label}, request {k}"
        loaded = np.concatenate([carried, _checked_rows(request, n_obs, where)])
        splits = request.get("splits")
        if not isinstance(splits, list | tuple) or not splits:
            _fail(f"{where}: 'splits' must be a non-empty list of index arrays (one per mini-batch)")
        parts = [_index_array(s, len(loaded), f"{where}: split {j}") for j, s in enumerate(splits)]
        for j, part in enumerate(parts):
            if not len(part):
                _fail(f"{where}: split {j} is empty; every mini-batch needs rows")
            if batch_size is not None and len(part) > batch_size:
                _fail(f"{where}: split {j} has {len(part)} rows, more than batch_size={batch_size}")
        carry = request.get("carry")
        if carry is not None:
            if k == len(requests) - 1 and len(carry):
                _fail(f"{where}: the last request of the epoch carries rows, which no request reads")
            parts.append(_index_array(carry, len(loaded), f"{where}: carry"))
        used = np.concatenate(parts)
        if len(np.unique(used)) != len(used):
            _fail(f"{where}: a loaded row is used twice (in two splits, or in a split and the carry)")
        if use_every_loaded_row and k < len(requests) - 1 and len(used) != len(loaded):
            _fail(f"{where}: {len(loaded) - len(used)} loaded rows are read but never used")
        batches.extend(loaded[s] for s in splits)
        carried = loaded[carry] if carry is not None else np.empty(0, dtype=np.int64)
    return batches


def _same_requests(a: Sequence[LoadRequest], b: Sequence[LoadRequest]) -> bool:
    def key(r: LoadRequest) -> tuple:
        rows = r["requests"]
        reads = (
            tuple(rows.tolist()) if isinstance(rows, np.ndarray) else tuple((s.start, s.stop) for s in rows)
        )
        carry = r.get("carry")
        return (
            reads,
            tuple(tuple(s.tolist()) for s in r["splits"]),
            None if carry is None else tuple(carry.tolist()),
        )

    return len(a) == len(b) and all(key(x) == key(y) for x, y in zip(a, b, strict=True))


def check_sampler(
    sampler: Sampler,
    n_obs: int,
    *,
    epoch: int = 0,
    num_workers: int = 1,
    replacement: bool | None = None,
    covers: np.ndarray | Sequence[int] | Literal["mask"] | None = None,
    use_every_loaded_row: bool = False,
) -> SamplerCheck:
    """Run one epoch of ``sampler`` over ``n_obs`` rows as the loader does, and check the contract.

    Every worker runs on its own deep copy, as in torch ``DataLoader`` worker processes:
    ``set_epoch(epoch)``, ``set_worker(w, num_workers)``, ``n_batches(n_obs)``, then
    ``sample(n_obs)``. The sampler itself is not changed. Checked:

    - every request reads rows in ``[0, n_obs)`` (slices without step, or a 1-D integer array);
    - every split indexes the request's loaded rows (rows carried in, then the rows read), is
      non-empty and holds at most ``batch_size`` rows; no loaded row goes to two splits (or to a
      split and the carry); the last request carries nothing;
    - ``n_batches`` equals the number of splits yielded, for every worker;
    - without replacement, no row comes twice in the epoch, over all workers;
    - with ``covers``, the epoch's rows (over all workers) are exactly those rows;
    - determinism: a second copy with the same state yields the same requests and splits.

    Parameters
    ----------
    sampler
        Any :class:`~annbatch.abc.Sampler`.
    n_obs
        Number of rows of the collection the sampler is used on.
    epoch
        The epoch to run.
    num_workers
        Number of data-loading workers to split the epoch among.
    replacement
        Whether rows may repeat; default the sampler's ``replacement`` attribute where it has
        one, else ``False``.
    covers
        Rows the epoch must cover exactly (any order): an array of rows, ``"mask"`` for every
        row of ``sampler.mask``, or ``None`` not to check coverage.
    use_every_loaded_row
        Also require every request but the last to use all rows it loads (no wasted reads).

    Returns
    -------
    SamplerCheck
        The epoch's requests and mini-batches (as global rows), for further checks of your own.

    Raises
    ------
    AssertionError
        Naming the worker, the request and the rule it breaks.
    """
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be an annbatch.abc.Sampler, got {type(sampler).__name__}")
    if replacement is None:
        replacement = bool(getattr(sampler, "replacement", False))
    name = type(sampler).__name__
    batches: list[list[np.ndarray]] = []
    requests: list[list[LoadRequest]] = []
    for w in range(num_workers):
        label = f"{name} (epoch {epoch}, worker {w} of {num_workers})"
        runs = []
        for _ in range(2):  # two copies with the same state must agree
            s = copy.deepcopy(sampler)
            s.set_epoch(epoch)
            s.set_worker(w, num_workers)
            n = s.n_batches(n_obs)
            runs.append((n, list(s.sample(n_obs))))
        (n, mine), (_, again) = runs
        if not _same_requests(mine, again):
            _fail(
                f"{label}: two copies with the same state yielded different requests; draw randomness "
                "from self.rng or from a seed and self.epoch, never from numpy's global state"
            )
        resolved = check_requests(
            mine, n_obs, batch_size=sampler.batch_size, use_every_loaded_row=use_every_loaded_row, label=label
        )
        if n != len(resolved):
            _fail(
                f"{label}: n_batches({n_obs}) returned {n} but sample() yielded {len(resolved)} mini-batches"
            )
        batches.append(resolved)
        requests.append(mine)
    check = SamplerCheck(batches=batches, requests=requests)
    rows = check.rows
    if not replacement and len(np.unique(rows)) != len(rows):
        values, counts = np.unique(rows, return_counts=True)
        _fail(f"{name}: without replacement, rows came twice in the epoch, e.g. row {values[counts > 1][0]}")
    if covers is not None:
        if isinstance(covers, str):
            if covers != "mask":
                raise ValueError(f"covers must be rows, 'mask' or None, got {covers!r}")
            mask = sampler.mask
            covers = np.arange(*mask.indices(n_obs)[:2], dtype=np.int64)
        expected = np.unique(np.asarray(covers, dtype=np.int64))
        got = np.unique(rows)
        if not np.array_equal(got, expected):
            missing = np.setdiff1d(expected, got)
            extra = np.setdiff1d(got, expected)
            _fail(
                f"{name}: the epoch covers {len(got)} distinct rows, expected {len(expected)}"
                f" ({len(missing)} missing, e.g. {missing[:3].tolist()}; {len(extra)} unexpected, "
                f"e.g. {extra[:3].tolist()})"
            )
    return check
