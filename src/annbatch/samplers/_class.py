"""Samplers keyed on one label per row: homogeneous mini-batches (:class:`ClassSampler`).

The shared machinery (label encoding, runs of equal labels, chunking, weights, the short-run
check) lives here too and is reused by :class:`~annbatch.samplers.WeightedSampler`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from annbatch.samplers._base import _ChunkedSampler
from annbatch.samplers._chunks import _group_runs, _group_slices
from annbatch.samplers._permute import _Permuter

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from annbatch.types import LoadRequest

__all__ = ["ClassSampler"]

# A label's rows must form runs whose mean length is at least min(chunk_size, rows) / _RUN_DIVISOR.
_RUN_DIVISOR = 4
# spawn-key tags of the random streams (the sampler's own seed space)
_COUNTS_STREAM = 11
_CHUNKS_STREAM = 12
_ORDER_STREAM = 13
_WORKER_STREAM = 14
# how many labels an error message lists before summarising the rest
_MAX_NAMED = 20


def _encode_classes(classes: Any) -> tuple[np.ndarray, pd.Index]:
    """Integer codes (``-1`` for missing) and the categories they index."""
    if isinstance(classes, pd.Categorical):
        cat = classes
    else:
        values = classes.array if isinstance(classes, pd.Series | pd.Index) else np.asarray(classes)
        if getattr(values, "ndim", 1) != 1:
            raise ValueError(f"classes must be one-dimensional (one label per row), got shape {values.shape}")
        cat = values if isinstance(values, pd.Categorical) else pd.Categorical(values)
    codes = np.asarray(cat.codes)
    if len(codes) == 0:
        raise ValueError("classes is empty; it needs one label per row of the collection")
    return codes, pd.Index(cat.categories)


def _name_list(labels: Sequence[object]) -> str:
    shown = ", ".join(repr(x) for x in labels[:_MAX_NAMED])
    if len(labels) > _MAX_NAMED:
        shown += f", ... ({len(labels) - _MAX_NAMED} more)"
    return shown


def _resolve_weights(weights: Any, categories: pd.Index, name: str) -> np.ndarray:
    """Weights as a float array aligned with ``categories``; labels a mapping leaves out get 0."""
    if isinstance(weights, Mapping):
        keys = list(weights)
        idx = categories.get_indexer(pd.Index(keys, dtype=object)) if keys else np.empty(0, dtype=np.int64)
        unknown = [k for k, i in zip(keys, idx, strict=True) if i < 0]
        if unknown:
            raise ValueError(
                f"{name} names labels that are not among the classes: {_name_list(unknown)}; "
                f"known labels: {_name_list(list(categories))}"
            )
        try:
            values = np.array([float(weights[k]) for k in keys], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} values must be numbers: {e}") from None
        out = np.zeros(len(categories), dtype=np.float64)
        out[idx] = values
    else:
        if isinstance(weights, str | bytes):
            raise ValueError(
                f"{name} must be a mapping label -> weight or a sequence of numbers, got {weights!r}"
            )
        try:
            out = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{name} must be a mapping label -> weight or a sequence of numbers: {e}"
            ) from None
        if out.ndim != 1 or len(out) != len(categories):
            raise ValueError(
                f"{name} as a sequence needs one weight per category ({len(categories)}: "
                f"{_name_list(list(categories))}), got shape {out.shape}; or pass a mapping label -> weight"
            )
    bad = [categories[i] for i in np.flatnonzero(~np.isfinite(out) | (out < 0))]
    if bad:
        raise ValueError(f"{name} must be finite and non-negative; offending labels: {_name_list(bad)}")
    if not out.sum() > 0:
        raise ValueError(f"{name} are all zero: at least one label needs a positive weight")
    return out


@dataclass(frozen=True)
class _Chunks:
    """Chunks of the labelled rows in a mask, grouped by label.

    Chunks of category ``c`` are ``start[ptr[c]:ptr[c + 1]]`` / ``length[...]``, in row order.
    """

    start: np.ndarray  # int64 global first row
    length: np.ndarray  # int64, 1 .. chunk_size
    ptr: np.ndarray  # int64, len n_categories + 1
    rows: np.ndarray  # int64 labelled rows per category
    runs: np.ndarray  # int64 maximal runs per category

    def code(self) -> np.ndarray:
        """Category of every chunk."""
        return np.repeat(np.arange(len(self.rows)), np.diff(self.ptr))


def _build_chunks(codes: np.ndarray, start: int, stop: int, chunk_size: int, n_categories: int) -> _Chunks:
    """Find maximal runs of equal labels in ``codes[start:stop]`` and cut them into chunks.

    A run of ``n`` rows becomes ``ceil(n / chunk_size)`` chunks of nearly equal length (they
    differ by at most one row), each at most ``chunk_size`` rows. Missing labels form no chunks.
    """
    c = codes[start:stop]
    change = np.flatnonzero(c[1:] != c[:-1]) + 1
    run_start = np.concatenate([[0], change]).astype(np.int64)
    run_stop = np.concatenate([change, [len(c)]]).astype(np.int64)
    run_code = c[run_start].astype(np.int64)
    keep = run_code >= 0
    run_start, run_stop, run_code = run_start[keep], run_stop[keep], run_code[keep]
    run_len = run_stop - run_start
    rows = np.bincount(run_code, weights=run_len, minlength=n_categories).astype(np.int64)
    runs = np.bincount(run_code, minlength=n_categories).astype(np.int64)
    pieces = -(-run_len // chunk_size)
    run_of = np.repeat(np.arange(len(run_len)), pieces)
    k = np.arange(len(run_of), dtype=np.int64) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    n, m = run_len[run_of], pieces[run_of]
    base = start + run_start[run_of]
    lo = base + n * k // m
    hi = base + n * (k + 1) // m
    code = run_code[run_of]
    order = np.argsort(code, kind="stable")
    ptr = np.concatenate([[0], np.cumsum(np.bincount(code, minlength=n_categories))]).astype(np.int64)
    return _Chunks(start=lo[order], length=(hi - lo)[order], ptr=ptr, rows=rows, runs=runs)


def _cut_stream(
    starts: np.ndarray, lengths: np.ndarray, total: int, load_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a stream of chunks, truncated to ``total`` rows, into loads of ``load_rows`` rows.

    A chunk that straddles a load boundary is split into two contiguous pieces.

    Returns
    -------
    Piece starts, piece stops (global rows) and the load (0, 1, ...) of every piece, in stream order.
    """
    ends = np.cumsum(lengths)
    begins = ends - lengths
    points = np.union1d(
        np.concatenate([[0], ends[ends < total], [total]]), np.arange(load_rows, total, load_rows)
    )
    a, b = points[:-1], points[1:]
    chunk = np.searchsorted(ends, a, side="right")
    piece_start = starts[chunk] + (a - begins[chunk])
    return piece_start, piece_start + (b - a), a // load_rows


class _LabelledSampler(_ChunkedSampler):
    """Labels, label validation and chunk bookkeeping of the label-keyed samplers."""

    def __init__(
        self,
        classes: Any,
        batch_size: int,
        chunk_size: int,
        preload_nchunks: int,
        *,
        num_samples: int | None,
        mask: slice | None,
        drop_last: bool,
        rng: np.random.Generator | None,
        seed: int | None,
    ) -> None:
        self._codes, self._categories = _encode_classes(classes)
        super().__init__(
            batch_size,
            chunk_size,
            preload_nchunks,
            mask=mask,
            num_samples=num_samples,
            drop_last=drop_last,
            rng=rng,
            seed=seed,
        )
        self._cache: tuple[tuple[int, int, int], _Chunks] | None = None

    # -- properties -------------------------------------------------------------------------
    @property
    def categories(self) -> pd.Index:
        """The labels; code ``i`` of :attr:`codes` stands for ``categories[i]``."""
        return self._categories

    @property
    def codes(self) -> np.ndarray:
        """Label code of every row; ``-1`` marks a missing label."""
        return self._codes

    # -- helpers -----------------------------------------------------------------------------
    def _labels_repr(self) -> str:
        """The ``<N labels, M categories>`` part of ``repr``."""
        return f"<{len(self._codes)} labels, {len(self._categories)} categories>"

    def _chunks(self, n_obs: int) -> _Chunks:
        start, stop = self._bounds(n_obs)
        if self._cache is None or self._cache[0] != (n_obs, start, stop):  # the mask is settable
            chunks = _build_chunks(self._codes, start, stop, self._chunk_size, len(self._categories))
            self._cache = ((n_obs, start, stop), chunks)
        return self._cache[1]

    def _total(self, n_obs: int) -> int:
        """Rows of the epoch over all workers: ``num_samples``, else every labelled row in the mask."""
        return int(self._chunks(n_obs).rows.sum()) if self._num_samples is None else self._num_samples

    def _weights(self, chunks: _Chunks) -> np.ndarray | None:
        """Per-category weights of the drawn (weighted) mode, or ``None`` for the exactly-once mode."""
        raise NotImplementedError

    def _weights_name(self) -> str:
        return "weights"

    def _active(self, chunks: _Chunks) -> np.ndarray:
        """Categories that can be sampled."""
        weights = self._weights(chunks)
        return chunks.rows > 0 if weights is None else weights > 0

    def _check_n_obs(self, n_obs: int) -> None:
        if len(self._codes) != n_obs:
            raise ValueError(
                f"classes holds {len(self._codes)} labels but the collection has {n_obs} rows; pass one "
                "label per row of the whole collection (e.g. collection.obs(columns=[key])[key])"
            )

    def validate(self, n_obs: int) -> None:
        """Check the labels, ``mask``, weights and run lengths against ``n_obs`` rows.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Raises
        ------
        ValueError
            If ``classes`` does not hold one label per row, the mask lies outside the rows, no
            row in the mask has a label, a label with a positive weight has no row in the mask,
            or the runs of some labels are too short for ``chunk_size`` (the message names them).
        """
        super().validate(n_obs)
        chunks = self._chunks(n_obs)
        if chunks.rows.sum() == 0:
            raise ValueError(f"no row in mask {self._mask} has a label (all are missing); nothing to sample")
        weights = self._weights(chunks)
        if weights is not None:
            empty = [self._categories[i] for i in np.flatnonzero((weights > 0) & (chunks.rows == 0))]
            if empty:
                raise ValueError(
                    f"{self._weights_name()} give a positive weight to labels without rows in mask "
                    f"{self._mask}: {_name_list(empty)}; give them weight 0 or widen the mask"
                )
        active = self._active(chunks)
        rows, runs = chunks.rows, chunks.runs
        short = active & (runs > 0) & (_RUN_DIVISOR * rows < runs * np.minimum(self._chunk_size, rows))
        if short.any():
            named = [
                f"{self._categories[i]!r} (mean run {rows[i] / runs[i]:.1f} rows)"
                for i in np.flatnonzero(short)
            ]
            shown = ", ".join(named[:_MAX_NAMED]) + (
                f", ... ({len(named) - _MAX_NAMED} more)" if len(named) > _MAX_NAMED else ""
            )
            raise ValueError(
                f"the rows of these labels are scattered in runs too short for chunk_size="
                f"{self._chunk_size}: {shown}. Reads stay efficient only when a label's mean run "
                f"length is at least min(chunk_size, its rows) / {_RUN_DIVISOR}. Write the collection "
                "with add_adatas(..., groupby=<key>) so each label's rows are contiguous, or lower chunk_size"
            )


class ClassSampler(_LabelledSampler):
    """Yields mini-batches whose rows all share one label (e.g. one donor or one cell type).

    The rows in ``mask`` are grouped into maximal runs of equal label; each run is cut into
    chunks of at most ``chunk_size`` contiguous rows (nearly equal in length), so every read is
    a contiguous range of a single label. Rows whose label is missing (NaN, code ``-1``) are
    never sampled. This is efficient on collections written with
    ``add_adatas(..., groupby=<key>)``, where each label's rows form a few long runs.

    **Loads.** Each label's chunks are put in random order and concatenated into a stream of
    rows, which is cut into loads of ``batch_size * (chunk_size * preload_nchunks // batch_size)``
    rows (the largest multiple of ``batch_size`` not above ``chunk_size * preload_nchunks``); a
    chunk that straddles two loads is read as two contiguous pieces. A load's rows are permuted
    in memory and cut into mini-batches of ``batch_size``. Loads of all labels are then
    interleaved in random order (from the seed and epoch).

    **Partial batches.** Every load but the last of each label holds a multiple of
    ``batch_size`` rows, so nothing is ever carried between loads (no ``carry`` in the
    requests): all mini-batches hold ``batch_size`` rows, except that a label's last mini-batch
    of the epoch holds the remainder of its rows. That short batch sits wherever the label's
    last load falls in the interleaved order; ``drop_last=True`` drops it (its rows are not
    read at all).

    **Epoch size.** Without ``class_weights`` and ``num_samples``, every labelled row in the
    mask is yielded exactly once per epoch. With either, labels are drawn with replacement: the
    epoch's ``ceil(num_samples / batch_size)`` mini-batches (``num_samples`` defaults to the
    number of labelled rows in the mask) are given labels by a multinomial draw with
    probabilities proportional to ``class_weights`` (default: each label's share of the rows),
    and each label's rows are drawn as chunks, with replacement, picked with probability
    proportional to their length (so every row of a label is equally likely), the last one
    truncated. The epoch then holds exactly ``num_samples`` rows (``drop_last``: the largest
    multiple of ``batch_size`` not above it), and only one mini-batch may be short.

    **Short runs.** :meth:`validate` raises a :class:`ValueError` naming every label (that can
    be sampled) whose rows are too scattered for chunked reading: a label with ``rows`` rows in
    ``runs`` maximal runs is rejected when its mean run length ``rows / runs`` is below
    ``min(chunk_size, rows) / 4``. Convert with ``groupby=<key>`` or lower ``chunk_size``.

    **Workers.** With :meth:`set_worker`, the epoch's interleaved loads are dealt out
    round-robin, so workers read disjoint rows (without weights) that together make the epoch.

    Parameters
    ----------
    classes
        One label per row of the collection: a :class:`pandas.Categorical`, a
        :class:`pandas.Series` or a 1-D array. Non-categorical values are encoded as
        categories in sorted order. Missing values are never sampled.
    batch_size
        Rows per mini-batch.
    chunk_size
        Most contiguous rows per read.
    preload_nchunks
        Chunks per load; about ``chunk_size * preload_nchunks`` rows are shuffled in memory.
    class_weights
        Relative probability of each label, as a mapping label -> weight (labels left out get
        weight 0 and are never drawn) or a sequence aligned with :attr:`categories`. Enables
        drawing with replacement.
    num_samples
        Rows per epoch; enables drawing with replacement.
    mask
        Contiguous range of rows to sample from, e.g. ``slice(0, 1000)``; default all rows.
    drop_last
        Drop short mini-batches (see above).
    shuffle
        Randomise chunk order, load order and rows within loads. ``False`` (only without
        ``class_weights`` and ``num_samples``) yields labels in category order, rows in order.
    rng
        Generator to draw the base seed from, once, at construction. Mutually exclusive with
        ``seed``.
    seed
        Base seed (non-negative). If neither ``seed`` nor ``rng`` is given, a base seed is drawn
        from OS entropy at construction.

    Examples
    --------
    .. code-block:: python

        import pandas as pd

        from annbatch.samplers import ClassSampler

        donors = pd.Categorical(["a"] * 600 + ["b"] * 400)
        sampler = ClassSampler(donors, batch_size=64, chunk_size=128, preload_nchunks=4, seed=0)
        for request in sampler.sample(len(donors)):
            ...  # every split holds rows of one donor
    """

    def __init__(
        self,
        classes: pd.Categorical | pd.Series | np.ndarray,
        batch_size: int,
        chunk_size: int,
        preload_nchunks: int,
        *,
        class_weights: Mapping[Any, float] | Sequence[float] | None = None,
        num_samples: int | None = None,
        mask: slice | None = None,
        drop_last: bool = False,
        shuffle: bool = True,
        rng: np.random.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            classes,
            batch_size,
            chunk_size,
            preload_nchunks,
            num_samples=num_samples,
            mask=mask,
            drop_last=drop_last,
            rng=rng,
            seed=seed,
        )
        self._class_weights = (
            None
            if class_weights is None
            else _resolve_weights(class_weights, self._categories, "class_weights")
        )
        self._shuffle = bool(shuffle)
        if not self._shuffle and self.replacement:
            raise ValueError("class_weights and num_samples draw labels at random and need shuffle=True")
        self._load_rows = self._batch_size * (self._chunk_size * self._preload_nchunks // self._batch_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._labels_repr()}, {self._sizes_repr()}, "
            f"weighted={self._class_weights is not None}, "
            f"num_samples={self._num_samples}, mask={self._mask}, drop_last={self._drop_last}, "
            f"shuffle={self._shuffle}, seed={self._seed})"
        )

    @property
    def shuffle(self) -> bool:
        """Whether chunk order, load order and rows within a load are randomised."""
        return self._shuffle

    @property
    def class_weights(self) -> np.ndarray | None:
        """Weights aligned with :attr:`categories` as given (``None``: not given)."""
        return None if self._class_weights is None else self._class_weights.copy()

    @property
    def replacement(self) -> bool:
        """Whether labels and chunks are drawn with replacement (weights or ``num_samples`` given)."""
        return self._class_weights is not None or self._num_samples is not None

    @property
    def max_load_rows(self) -> int:
        """Upper bound on the rows of any one request (nothing is carried)."""
        return self._load_rows

    def _weights_name(self) -> str:
        return "class_weights"

    def _weights(self, chunks: _Chunks) -> np.ndarray | None:
        if self._class_weights is not None:
            return self._class_weights
        if self._num_samples is not None:
            return chunks.rows.astype(np.float64)
        return None

    def _class_rows(self, n_obs: int) -> np.ndarray:
        """Rows each label contributes to this epoch (all workers)."""
        bs = self._batch_size
        chunks = self._chunks(n_obs)
        weights = self._weights(chunks)
        if weights is None:
            return chunks.rows // bs * bs if self._drop_last else chunks.rows.copy()
        total = self._total(n_obs)
        n_batches = total // bs if self._drop_last else -(-total // bs)
        rng = self._stream_rng(_COUNTS_STREAM)
        counts = rng.multinomial(n_batches, weights / weights.sum()).astype(np.int64)
        rows = counts * bs
        short = total - (n_batches - 1) * bs
        if not self._drop_last and short < bs:
            # one of the drawn batches, picked uniformly, is the short one
            rows[rng.choice(len(counts), p=counts / n_batches)] -= bs - short
        return rows

    def _plan(self, n_obs: int) -> tuple[_Chunks, np.ndarray, np.ndarray, np.ndarray]:
        """Chunks, rows per label, rows per load (loads grouped by label) and the epoch's load order."""
        self.validate(n_obs)
        chunks = self._chunks(n_obs)
        class_rows = self._class_rows(n_obs)
        n_loads = -(-class_rows // self._load_rows)
        load_class = np.repeat(np.arange(len(class_rows)), n_loads)
        k = np.arange(len(load_class), dtype=np.int64) - np.repeat(np.cumsum(n_loads) - n_loads, n_loads)
        load_size = np.minimum(self._load_rows, class_rows[load_class] - k * self._load_rows)
        order = (
            self._stream_rng(_ORDER_STREAM).permutation(len(load_size))
            if self._shuffle
            else np.arange(len(load_size))
        )
        return chunks, class_rows, load_size, order

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
        _, _, load_size, order = self._plan(n_obs)
        mine = order[self._worker_id :: self._num_workers]
        return int((-(-load_size[mine] // self._batch_size)).sum())

    def _streams(self, chunks: _Chunks, class_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pieces (starts, stops) of all loads, in load order as in :meth:`_plan`, with piece offsets per load."""
        rng = self._stream_rng(_CHUNKS_STREAM)
        starts, stops, loads = [], [], []
        n_loads_before = 0
        for c in np.flatnonzero(class_rows > 0):
            lo, hi = int(chunks.ptr[c]), int(chunks.ptr[c + 1])
            lengths = chunks.length[lo:hi]
            if self.replacement:
                ids = self._draw(lengths, int(chunks.rows[c]), int(class_rows[c]), rng)
            else:
                ids = rng.permutation(hi - lo) if self._shuffle else np.arange(hi - lo)
            s, e, load = _cut_stream(
                chunks.start[lo:hi][ids], lengths[ids], int(class_rows[c]), self._load_rows
            )
            starts.append(s)
            stops.append(e)
            loads.append(load + n_loads_before)
            n_loads_before += int(load[-1]) + 1
        piece_load = np.concatenate(loads)
        ptr = np.searchsorted(piece_load, np.arange(n_loads_before + 1), side="left")
        return np.stack([np.concatenate(starts), np.concatenate(stops)]), ptr

    @staticmethod
    def _draw(lengths: np.ndarray, rows: int, need: int, rng: np.random.Generator) -> np.ndarray:
        """Chunk ids drawn with replacement, with probability proportional to length, until ``need`` rows."""
        ends = np.cumsum(lengths)
        mean = float((lengths.astype(np.float64) ** 2).sum() / rows)  # expected length of a drawn chunk
        drawn: list[np.ndarray] = []
        got = 0
        while got < need:
            ids = np.searchsorted(
                ends, rng.integers(0, rows, size=int((need - got) / mean) + 1), side="right"
            )
            drawn.append(ids)
            got += int(lengths[ids].sum())
        return np.concatenate(drawn)

    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        """Yield this worker's load requests for the current epoch.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Yields
        ------
        LoadRequest
            ``requests`` is a list of slices, each within one run of a single label and sorted
            by row; every split holds rows of that one label. Nothing is carried.
        """
        chunks, class_rows, load_size, order = self._plan(n_obs)
        if len(order) == 0:  # drop_last dropped every row
            return
        pieces, ptr = self._streams(chunks, class_rows)
        # each load's pieces sorted by row (stable, as a per-load argsort would) and joined, at once
        piece_load = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
        by_row = np.lexsort((pieces[0], piece_load))
        run_starts, run_stops, run_ptr = _group_runs(pieces[0, by_row], pieces[1, by_row], ptr)
        mine = order[self._worker_id :: self._num_workers].tolist()
        load_rows = load_size.tolist()
        permute = _Permuter(self._stream_rng(_WORKER_STREAM, self._worker_id)) if self._shuffle else None
        bs = self._batch_size
        try:
            for load in mine:
                n = load_rows[load]
                rows = np.arange(n, dtype=np.int64) if permute is None else permute(n)
                splits = [rows[i : i + bs] for i in range(0, n, bs)]
                requests = _group_slices(run_starts, run_stops, run_ptr[load], run_ptr[load + 1])
                yield {"requests": requests, "splits": splits}
        finally:
            if permute is not None:
                permute.sync()
