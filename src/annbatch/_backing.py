"""Backing data a loader reads from: one row-aligned matrix per dataset, CSR or dense.

A backing knows its shape and dtype and can read a contiguous run of rows into a caller's buffer.
Sources: zarr arrays (a collection's datasets or any zarr AnnData), in-memory numpy / scipy CSR, and
backed (h5py) AnnData. Reads from zarr go through zarr's async API so all ranges of a load are decoded
concurrently (by zarrs' Rust threads when the zarrs pipeline is active).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from zarr.core.sync import sync

from annbatch._object_shards import ObjectShardReader, object_shard_reader
from annbatch._shards import ShardedReader, sharded_reader
from annbatch._zarr import child_array, list_attr, zarrs_pipeline
from annbatch.errors import BackingError


@dataclass
class Backing:
    """One dataset's matrix: ``kind`` CSR (``data``/``indices``/``indptr``) or dense (``array``)."""

    kind: Literal["csr", "dense"]
    shape: tuple[int, ...]
    dtype: np.dtype
    array: Any = None  # dense: numpy, zarr.Array, ShardedReader, ObjectShardReader or h5py.Dataset
    data: Any = None  # csr: values
    indices: Any = None  # csr: column indices (any integer dtype)
    indptr: np.ndarray | None = None  # csr: row pointers, always in memory (int64)
    origin: type | None = None  # the type of the data it reads (what Loader.dataset_type reports)

    @property
    def n_obs(self) -> int:
        """Number of rows."""
        return self.shape[0]

    @property
    def index_dtype(self) -> np.dtype:
        """Dtype of the stored column indices (CSR only)."""
        return np.dtype(self.indices.dtype)


def backing_from_zarr(elem: zarr.Array | zarr.Group, *, name: str, complete: bool = False) -> Backing:
    """A backing for an AnnData element stored in zarr (``X`` or a layer): CSR group or dense array.

    ``complete``: the element belongs to an annbatch collection, whose writer stores every shard, so
    a missing shard file is an error rather than fill values.
    """
    with zarrs_pipeline(elem.store):  # arrays pick their codec pipeline when opened
        if isinstance(elem, zarr.Array):
            return Backing("dense", tuple(elem.shape), np.dtype(elem.dtype), array=_fastest(elem, complete),
                           origin=zarr.Array)  # fmt: skip
        encoding = elem.attrs.get("encoding-type")
        if encoding != "csr_matrix":
            raise BackingError(
                f"{name} is stored as {encoding!r}; the loader reads CSR or dense arrays. "
                "Convert it with `annbatch.Collection(...).add_adatas` (which writes CSR)."
            )
        shape = tuple(int(x) for x in list_attr(elem, "shape"))
        data = _fastest(child_array(elem, "data"), complete)
        indices = _fastest(child_array(elem, "indices"), complete)
        indptr = np.asarray(child_array(elem, "indptr")[...], dtype=np.int64)
        return Backing("csr", shape, np.dtype(data.dtype), data=data, indices=indices, indptr=indptr,
                       origin=type(ad.io.sparse_dataset(elem)))  # fmt: skip


def _fastest(arr: zarr.Array, complete: bool) -> zarr.Array | ShardedReader | ObjectShardReader:
    """Our direct shard reader (local disk or object storage) where the layout allows.

    Else the array, reopened under zarrs.
    """
    reader = sharded_reader(arr, complete=complete)
    if reader is not None:
        return reader
    if complete:  # zarr would read a missing shard as fill values: in a collection it is damage
        _check_all_shards_stored(arr)
    remote = object_shard_reader(arr, complete=complete, name=f"{arr.store} {arr.path}")
    if remote is not None:
        return remote
    # An array opened before the zarrs pipeline was set keeps zarr-python's pipeline: open it again.
    return zarr.open_array(arr.store, path=arr.path, mode="r")


def _check_all_shards_stored(arr: zarr.Array) -> None:
    """Raise when a (sharded) array of a collection lacks a shard or chunk object; one listing."""
    grid = arr.shards or arr.chunks
    expected = math.prod(-(-n // c) for n, c in zip(arr.shape, grid, strict=True))

    async def count() -> int:
        return len([k async for k in arr.store.list_prefix(f"{arr.path}/c/")])

    found = sync(count())
    if found < expected:
        raise BackingError(
            f"{arr.store} {arr.path!r} has {found} of its {expected} shard objects; the collection is "
            "damaged. Rebuild it from its inputs."
        )


def backing_from_memory(value: Any, *, name: str, expr: str | None = None) -> Backing:
    """A backing for an in-memory or backed matrix: numpy, scipy CSR, h5py dataset, backed CSR.

    ``name`` describes the matrix in messages; ``expr``, where given, is an assignable expression for
    it (``"adata.X"``), with which messages spell out the conversion to make.
    """
    backing = _backing_from_memory(value, name=name, expr=expr)
    if not isinstance(value, zarr.Array | zarr.Group):  # zarr: the type the loader reads it as
        backing.origin = type(value)
    return backing


def _backing_from_memory(value: Any, *, name: str, expr: str | None) -> Backing:
    if sp.issparse(value):
        if value.format != "csr":
            fix = (
                f"convert it with `{expr} = {expr}.tocsr()`"
                if expr
                else "pass CSR (`.tocsr()`) or dense data"
            )
            raise BackingError(
                f"{name} is a {value.format.upper()} matrix, which cannot be read by rows; {fix}."
            )
        return Backing("csr", tuple(value.shape), np.dtype(value.dtype), data=value.data, indices=value.indices,
                       indptr=np.asarray(value.indptr, dtype=np.int64))  # fmt: skip
    if isinstance(value, ad.abc.CSRDataset):
        group = value.group
        if isinstance(group, h5py.Group):
            return Backing("csr", tuple(value.shape), np.dtype(value.dtype), data=group["data"],
                           indices=group["indices"], indptr=np.asarray(group["indptr"][...], dtype=np.int64))  # fmt: skip
        return backing_from_zarr(group, name=name)
    if isinstance(value, ad.abc.CSCDataset):
        raise BackingError(
            f"{name} is a backed CSC matrix, which cannot be read by rows; convert it to CSR (load it "
            "with `adata = adata.to_memory()`, then `.tocsr()` it) or convert the file into a collection."
        )
    if isinstance(value, zarr.Array | zarr.Group):
        return backing_from_zarr(value, name=name)
    if isinstance(value, np.ndarray | h5py.Dataset):
        if isinstance(value, np.ndarray) and type(value) is not np.ndarray:
            value = value.view(np.ndarray)  # e.g. an AnnData view's ArrayView: plain rows, no copy
        return Backing("dense", tuple(value.shape), np.dtype(value.dtype), array=value)
    if is_dask_array(value):
        owner = expr.partition(".")[0] if expr else "adata"
        raise BackingError(
            f"{name} is a dask array (as `anndata.experimental.read_lazy` gives), which the loader does not "
            f"read. If it fits in memory, load it: `{owner} = {owner}.to_memory()`. If not, convert it into "
            f"a collection without loading it, `{owner}.annbatch.to_collection('cells.zarr')` (the same as "
            f"`annbatch.Collection('cells.zarr').add_adatas([{owner}])`), and load from that."
        )
    if isinstance(value, pd.DataFrame):
        fix = f"`{expr} = {expr}.to_numpy()`" if expr else "`.to_numpy()`"
        raise BackingError(f"{name} is a pandas DataFrame; pass its values as an array: {fix}.")
    raise BackingError(
        f"{name} has type {type(value).__name__}; the loader reads numpy arrays, scipy CSR matrices, "
        "zarr arrays/groups and backed AnnData."
    )


def is_dask_array(value: Any) -> bool:
    """Whether ``value`` is a dask array (also anndata's view of one); dask need not be installed."""
    dask_array = sys.modules.get("dask.array")  # not imported yet: nothing can be a dask array
    return dask_array is not None and isinstance(value, dask_array.Array)


def check_compatible(backings: list[Backing]) -> None:
    """One loader reads one kind (CSR or dense) of one width; mixed dtypes are promoted (with a warning)."""
    if len({b.kind for b in backings}) > 1:
        raise BackingError(
            "Cannot mix sparse (CSR) and dense datasets in one loader; convert them to one kind."
        )
    widths = {b.shape[1:] for b in backings}
    if len(widths) > 1:
        raise BackingError(
            f"Datasets have different numbers of variables {sorted(widths)}; align their var first."
        )
    dtypes = {b.dtype for b in backings}
    if len(dtypes) > 1:
        warnings.warn(f"Datasets have different dtypes {sorted(map(str, dtypes))}; promoting to "
                      f"{np.result_type(*dtypes)}.", stacklevel=4)  # fmt: skip


def backings_from_adatas(
    adatas: Sequence[ad.AnnData], *, layer: str | None = None, obsm: str | None = None
) -> list[Backing]:
    """The ``X`` (or ``layers[layer]``, or ``obsm[obsm]``) of in-memory or backed AnnData objects.

    The AnnData objects must share one var space (unless ``obsm`` is read, which has its own columns).
    """
    if layer is not None and obsm is not None:
        raise ValueError(f"Give `layer` or `obsm`, not both (got layer={layer!r}, obsm={obsm!r}).")
    for i, adata in enumerate(adatas[1:], start=1):
        if obsm is None and not adata.var_names.equals(adatas[0].var_names):
            raise BackingError(
                f"AnnData #{i} has different var names than AnnData #0; subset them to one var space "
                "(e.g. `adata[:, shared_genes]`) before adding."
            )
    one = len(adatas) == 1
    backings = []
    for i, adata in enumerate(adatas):
        var = "adata" if one else f"adatas[{i}]"
        which = "the AnnData" if one else f"AnnData #{i}"
        if obsm is not None:
            if obsm not in adata.obsm:
                raise KeyError(
                    f"`obsm={obsm!r}`: {which} has no such obsm entry; its obsm keys: {list(adata.obsm)}."
                )
            x, expr = adata.obsm[obsm], f"{var}.obsm[{obsm!r}]"
        elif layer is not None:
            layers = [k for k in adata.layers if k is not None]  # anndata 0.13 also lists X, as None
            if layer not in layers:
                raise KeyError(f"`layer={layer!r}`: {which} has no such layer; its layers: {layers}.")
            x, expr = adata.layers[layer], f"{var}.layers[{layer!r}]"
        else:
            x, expr = adata.X, f"{var}.X"
            if x is None:
                raise BackingError(f"{which} has no X; pass `layer=` or `obsm=`, or add X.")
        backings.append(backing_from_memory(x, name=f"`{expr}`", expr=expr))
    return backings


def shared_var(
    var: pd.DataFrame | Sequence[pd.DataFrame] | None, backings: Sequence[Backing], *, first: int
) -> pd.DataFrame | None:
    """The one var DataFrame of the added datasets, given once or one per dataset, checked against them.

    ``first``: the number of the first of these datasets in the loader, for messages.
    """
    if var is None:
        return None
    frames = [var] * len(backings) if isinstance(var, pd.DataFrame) else list(var)
    if len(frames) != len(backings):
        raise ValueError(
            f"Got {len(backings)} datasets but {len(frames)} `var` frames; give one for all or one each."
        )
    for i, (frame, backing) in enumerate(zip(frames, backings, strict=True)):
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(
                f"`var` must be a pandas DataFrame (or one per dataset), got {type(frame).__name__}."
            )
        n_vars = backing.shape[1] if len(backing.shape) > 1 else 1
        if len(frame) != n_vars:
            raise ValueError(
                f"`var` has {len(frame)} rows but dataset #{first + i} has {n_vars} columns; "
                "give one row per column."
            )
        if not frame.index.equals(frames[0].index):
            raise ValueError(
                f"`var` of dataset #{first + i} has other var names than that of dataset #{first}; "
                "give one var space."
            )
    return frames[0] if frames else None
