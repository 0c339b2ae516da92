"""Typed structures shared between samplers and the loader."""

from typing import NotRequired, TypedDict

import numpy as np

__all__ = ["LoadRequest"]


class LoadRequest(TypedDict):
    """One load: which rows to read, and how to cut them into mini-batches.

    A :class:`~annbatch.abc.Sampler` yields a stream of these. The loader reads the rows named in
    ``requests`` into one buffer and yields one mini-batch per entry of ``splits``.

    The *loaded rows* of a request are the rows carried over from the previous request of the
    same stream (in the order of that request's ``carry``), followed by the rows of ``requests``
    in request order. Indices in ``splits`` and ``carry`` are positions into the loaded rows.
    Carrying lets every mini-batch hold exactly ``batch_size`` rows even when a load's row count
    is not a multiple of it: the partial batch at the end of one load is completed by the next.

    Attributes
    ----------
    requests
        Rows to read, as global positions in the collection's concatenated rows ``[0, n_obs)``:
        either a list of slices (``step`` is ``None``; each is read contiguously) or a 1-D
        ``int64`` array of rows (sorted or not). Rows are loaded in this order.
    splits
        One ``int64`` index array into the loaded rows per mini-batch, yielded in this order.
    carry
        Optional ``int64`` indices into the loaded rows to keep for the next request (a partial
        batch). Absent means nothing is carried.
    """

    requests: list[slice] | np.ndarray
    splits: list[np.ndarray]
    carry: NotRequired[np.ndarray]
