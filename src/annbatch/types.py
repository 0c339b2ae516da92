"""Typed structures shared between samplers, the loader and the training layer."""

from typing import TYPE_CHECKING, Any, Generic, NotRequired, TypeAlias, TypedDict, TypeVar, Union

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

if TYPE_CHECKING:
    import torch

__all__ = [
    "BackingArray_T",
    "Batch",
    "InputInMemoryArray_T",
    "LoadRequest",
    "LoaderOutput",
    "OutputInMemoryArray_T",
]

#: On-disk arrays a loader reads rows from: dense zarr arrays and anndata's sparse datasets.
BackingArray_T: TypeAlias = zarr.Array | ad.abc.CSRDataset
#: In-memory matrices a loader reads rows from.
InputInMemoryArray_T: TypeAlias = np.ndarray | sp.csr_matrix | sp.csr_array
#: What a mini-batch's ``X`` is: numpy/scipy with ``to=None``, torch tensors with ``to="torch"``.
OutputInMemoryArray_T: TypeAlias = Union[np.ndarray, sp.csr_matrix, "torch.Tensor"]

X_T = TypeVar("X_T")


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
        A sampler's ``_sample`` may leave it out: :meth:`Sampler.sample <annbatch.abc.Sampler.sample>`
        then cuts the loaded rows into mini-batches of ``batch_size`` (see there).
    carry
        Optional ``int64`` indices into the loaded rows to keep for the next request (a partial
        batch). Absent means nothing is carried.
    """

    requests: list[slice] | np.ndarray
    splits: NotRequired[list[np.ndarray]]
    carry: NotRequired[np.ndarray]


class Batch(TypedDict, Generic[X_T]):
    """One mini-batch, as every :class:`~annbatch.Loader` yields it.

    Generic in the type of ``X``: ``Batch[np.ndarray]``, ``Batch[torch.Tensor]``. Also available
    under its scverse ``annbatch`` name, :data:`LoaderOutput`.

    This is the contract that ``training_step`` methods and configs rely on: its keys change only
    with a deprecation. Arrays are numpy/scipy with ``to=None`` or ``"numpy"``, torch tensors with
    ``to="torch"`` and jax arrays with ``to="jax"``.

    Attributes
    ----------
    X
        The rows, shape ``(n, n_vars)`` (or ``(n, ...)`` for n-d elements such as ``obsm``):
        scipy CSR or a dense numpy array; with ``to="torch"`` a sparse CSR or strided tensor.
    obs
        With ``obs_keys``: a dict column → array aligned with the rows (categoricals as int64
        codes, labels in :attr:`Loader.categories <annbatch.Loader.categories>`, ``-1`` missing;
        numeric and boolean columns in their dtype). With ``obs_columns``: a pandas DataFrame.
        Otherwise ``None``.
    var
        The var DataFrame (the same object in every batch), or ``None`` where unknown.
    index
        With ``return_index=True``: the rows' global positions in the collection as an int64
        numpy array; otherwise ``None``.
    batch
        Present only with ``batch_key``: that column's int64 codes (a tensor with ``to="torch"``).
    """

    X: X_T
    obs: dict[str, Any] | pd.DataFrame | None
    var: pd.DataFrame | None
    index: np.ndarray | None
    batch: NotRequired[Any]


#: The scverse ``annbatch`` name of :class:`Batch` (its keys ``X``, ``obs`` and ``index`` are the same).
LoaderOutput = Batch
