"""Balanced or weighted sampling over the values of a key, read in chunks.

:class:`WeightedSampler` takes ``weights``; :class:`WeightedClassSampler` is the same sampling with the
scverse ``annbatch`` name and parameter (``class_weights``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from annbatch.samplers._chunks import Runs, _take_rows
from annbatch.samplers._class import _WORKER_STREAM, _Chunks, _LabelledSampler, _resolve_weights

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    import pandas as pd

    from annbatch.types import LoadRequest

__all__ = ["WeightedClassSampler", "WeightedSampler"]


class WeightedSampler(_LabelledSampler):
    """Draws rows with replacement so that each label's share of the rows follows given weights.

    Use it to balance donors, batches or cell types (``weights="balanced"``), or to over- or
    under-sample some of them, while reads stay contiguous and chunked. Mini-batches mix labels.

    The rows in ``mask`` are grouped into maximal runs of equal label, and each run is cut into
    chunks of at most ``chunk_size`` contiguous rows (nearly equal in length). Rows whose label
    is missing (NaN, code ``-1``) are never sampled. Each epoch draws ``num_samples`` rows:
    repeatedly a label ``v`` with probability proportional to ``weight_v / m_v``, then one of its
    chunks with probability proportional to the chunk's length, so that every row of a label is
    equally likely. Here ``m_v = sum(length**2) / sum(length)`` over ``v``'s chunks is the
    expected number of rows such a draw yields, which makes the expected share of rows of
    label ``v`` equal to ``weight_v / sum(weights)``. The last chunk is truncated so that the
    epoch holds exactly ``num_samples`` rows.

    Drawn chunks are grouped into loads of ``preload_nchunks``; each load's rows are permuted
    in memory and cut into mini-batches of ``batch_size``, and a load's partial batch is
    carried into the next load (like :class:`~annbatch.samplers.RandomSampler`), so all
    mini-batches hold ``batch_size`` rows except possibly the last of the epoch.

    :meth:`validate` raises a :class:`ValueError` naming every label (with a positive weight)
    whose rows are too scattered for chunked reading: a label with ``rows`` rows in ``runs``
    maximal runs is rejected when its mean run length ``rows / runs`` is below
    ``min(chunk_size, rows) / 4``. Convert with ``groupby=<key>`` or lower ``chunk_size``.

    With several workers (:meth:`set_worker`) the epoch's rows are shared out as in
    :class:`~annbatch.samplers.RandomSampler` (by sizes only, independent of the seed), and each
    worker draws its share from its own random stream.

    Parameters
    ----------
    classes
        One label per row of the collection: a :class:`pandas.Categorical`, a
        :class:`pandas.Series` or a 1-D array. Non-categorical values are encoded as categories
        in sorted order. Missing values are never sampled.
    batch_size
        Rows per mini-batch.
    chunk_size
        Most contiguous rows per read.
    preload_nchunks
        Chunks per load; about ``chunk_size * preload_nchunks`` rows are shuffled in memory.
    weights
        ``"balanced"`` (every label with rows in the mask gets the same share), a mapping
        label -> weight (labels left out get weight 0 and are never drawn), or a sequence of
        weights aligned with :attr:`categories`.
    num_samples
        Rows per epoch; default the number of labelled rows in the mask.
    mask
        Contiguous range of rows to sample from, e.g. ``slice(0, 1000)``; default all rows.
    drop_last
        Drop the final partial batch of the epoch (per worker).
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

        from annbatch.samplers import WeightedSampler

        donors = pd.Categorical(["a"] * 700 + ["b"] * 200 + ["c"] * 100)
        sampler = WeightedSampler(donors, batch_size=64, chunk_size=32, preload_nchunks=8, seed=0)
        # each donor makes up about a third of the 1,000 rows drawn per epoch
    """

    def __init__(
        self,
        classes: pd.Categorical | pd.Series | np.ndarray,
        batch_size: int,
        chunk_size: int,
        preload_nchunks: int,
        *,
        weights: Mapping[Any, float] | Sequence[float] | Literal["balanced"] = "balanced",
        num_samples: int | None = None,
        mask: slice | None = None,
        drop_last: bool = False,
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
        if isinstance(weights, str):
            if weights != "balanced":
                raise ValueError(
                    f'{self._weights_name()} must be "balanced", a mapping label -> weight or a sequence, '
                    f"got {weights!r}"
                )
            self._given: np.ndarray | None = None
        else:
            self._given = _resolve_weights(weights, self._categories, self._weights_name())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._labels_repr()}, {self._sizes_repr()}, "
            f"weights={'balanced' if self._given is None else 'given'}, num_samples={self._num_samples}, "
            f"mask={self._mask}, drop_last={self._drop_last}, seed={self._seed})"
        )

    @property
    def shuffle(self) -> bool:
        """Always ``True``: rows are drawn at random."""
        return True

    @property
    def replacement(self) -> bool:
        """Always ``True``: chunks are drawn with replacement."""
        return True

    @property
    def weights(self) -> np.ndarray | None:
        """Weights aligned with :attr:`categories` as given; ``None`` for ``"balanced"``."""
        return None if self._given is None else self._given.copy()

    def _weights(self, chunks: _Chunks) -> np.ndarray:
        if self._given is None:
            return (chunks.rows > 0).astype(np.float64)
        return self._given

    def probabilities(self, n_obs: int) -> pd.Series:
        """Expected share of the drawn rows per label, for ``n_obs`` rows.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Returns
        -------
        pandas.Series
            Indexed by :attr:`categories`; sums to 1.
        """
        import pandas as pd

        self.validate(n_obs)
        w = self._weights(self._chunks(n_obs))
        return pd.Series(w / w.sum(), index=self._categories)

    def _draw_chunks(self, chunks: _Chunks, budget: int, rng: np.random.Generator) -> Runs:
        """Chunks drawn with replacement until ``budget`` rows, the last one truncated."""
        length = chunks.length.astype(np.float64)
        code = chunks.code()
        # expected rows of one length-proportional chunk draw, per label
        # float64 (weighted counts), though numpy's stubs type every bincount as intp
        m: np.ndarray = np.bincount(code, weights=length**2, minlength=len(chunks.rows))
        active = self._weights(chunks) > 0
        m[active] /= chunks.rows[active]
        p = np.zeros(len(chunks.rows))
        p[active] = self._weights(chunks)[active] / m[active]
        p /= p.sum()
        per_draw = float((p * m).sum())
        ends = np.cumsum(chunks.length)
        base = np.concatenate([[0], ends])[chunks.ptr[:-1]]  # first row offset of each label's chunks
        drawn: list[np.ndarray] = []
        got = 0
        while got < budget:
            k = int((budget - got) / per_draw * 1.05) + 1
            labels = rng.choice(len(p), size=k, p=p)
            offsets = base[labels] + rng.integers(0, chunks.rows[labels])
            ids = np.searchsorted(ends, offsets, side="right")
            drawn.append(ids)
            got += int(chunks.length[ids].sum())
        ids = np.concatenate(drawn)
        return _take_rows(chunks.start[ids], chunks.length[ids], budget)

    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        """Yield this worker's load requests for the current epoch.

        Parameters
        ----------
        n_obs
            Number of rows in the collection.

        Yields
        ------
        LoadRequest
            ``requests`` is a list of slices (drawn chunks, joined where one continues the
            previous); every request has at least one split; partial batches are carried.
        """
        budget = self._worker_budget(n_obs)
        if budget == 0:
            return
        rng = self._stream_rng(_WORKER_STREAM, self._worker_id)
        yield from self._load_requests(self._draw_chunks(self._chunks(n_obs), budget, rng), rng)


class WeightedClassSampler(WeightedSampler):
    """Mini-batches whose label composition follows ``class_weights``, read in one-label chunks.

    Every read is a chunk of contiguous rows of one label, as :class:`~annbatch.samplers.ClassSampler`
    reads them, but the rows of a whole load (``preload_nchunks`` chunks of possibly different
    labels) are shuffled together before they are cut into mini-batches. So each mini-batch mixes
    labels, and label ``v`` makes up ``class_weights[v] / sum(class_weights)`` of the rows in
    expectation. Chunks are drawn with replacement; see :class:`WeightedSampler` (this is the same
    sampler, under the name and parameter of the scverse ``annbatch`` API) for how.

    Parameters
    ----------
    classes
        One label per row of the collection (:class:`pandas.Categorical`, :class:`pandas.Series`
        or 1-D array); missing values are never sampled.
    batch_size
        Rows per mini-batch.
    chunk_size
        Most contiguous rows per read.
    preload_nchunks
        Chunks per load, shuffled together.
    class_weights
        A mapping label -> weight (labels left out are never drawn) or a sequence aligned with
        the categories; ``None`` (default) gives every label with rows the same share.
    num_samples
        Rows per epoch; default the number of labelled rows in the mask.
    mask
        Contiguous range of rows to sample from; default all rows.
    drop_last
        Drop the final partial batch of the epoch (per worker).
    rng, seed
        Randomness, as for :class:`~annbatch.samplers.RandomSampler`; give at most one.

    Examples
    --------
    .. code-block:: python

        import pandas as pd

        from annbatch.samplers import WeightedClassSampler

        cell_type = pd.Categorical(["T"] * 800 + ["B"] * 200)
        sampler = WeightedClassSampler(
            cell_type, batch_size=64, chunk_size=32, preload_nchunks=8, class_weights={"T": 1, "B": 1}, seed=0
        )
        # each batch holds about as many B cells as T cells
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
        rng: np.random.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            classes, batch_size, chunk_size, preload_nchunks,
            weights="balanced" if class_weights is None else class_weights,
            num_samples=num_samples, mask=mask, drop_last=drop_last, rng=rng, seed=seed,
        )  # fmt: skip

    def __repr__(self) -> str:
        return super().__repr__().replace("weights=", "class_weights=", 1)

    @property
    def class_weights(self) -> np.ndarray | None:
        """Weights aligned with :attr:`categories` as given; ``None`` for equal shares."""
        return self.weights

    def _weights_name(self) -> str:
        return "class_weights"
