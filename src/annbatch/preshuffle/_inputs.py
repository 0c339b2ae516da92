"""Opening AnnData inputs (h5ad, zarr, in-memory or backed AnnData) for reading rows lazily."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from annbatch._backing import is_dask_array
from annbatch._csr import RawCSR
from annbatch._zarr import zarrs_pipeline
from annbatch.errors import InputError
from annbatch.writer import _named_layers

InputLike: TypeAlias = str | Path | ad.AnnData
LoadAdata = Callable[[str], ad.AnnData]


@dataclass
class RowElement:
    """One obs-aligned array of an input (X, a layer or an obsm entry), read by row ranges.

    ``source`` is a dense array-like (numpy, h5py, zarr, dask) or, for CSR, a :class:`_CsrSource`.
    """

    kind: Literal["csr", "dense"]
    dtype: np.dtype
    shape: tuple[int, ...]
    _source: Any = field(repr=False)

    def read(self, start: int, stop: int) -> np.ndarray | RawCSR:
        """Rows ``start:stop`` in memory: a :class:`RawCSR` or a dense array."""
        if self.kind == "csr":
            return self._source.read(start, stop)
        part = self._source[start:stop]
        if hasattr(part, "compute"):  # dask arrays from lazily read AnnData
            part = part.compute()
        return np.asarray(part)

    @property
    def reads_open_file(self) -> bool:
        """Whether the rows come from an open HDF5 file (a backed AnnData), which cannot be pickled."""
        arrays = [self._source, getattr(self._source, "data", None), getattr(self._source, "indices", None)]
        return any(isinstance(a, h5py.Dataset) for a in arrays)

    def row_nnz(self, start: int, stop: int) -> np.ndarray:
        """Stored values per row of a CSR element, for rows ``start:stop``."""
        return np.diff(self._source.indptr[start : stop + 1])

    def nnz(self) -> int:
        """Stored values of a CSR element."""
        return int(self._source.indptr[-1] - self._source.indptr[0])


class _CsrSource:
    """CSR arrays on disk or in memory; ``indptr`` is loaded once, rows are read as contiguous slices.

    Reading the three arrays directly (rather than through anndata's backed sparse dataset) avoids
    per-call overhead and keeps the stored index dtype.
    """

    def __init__(self, data, indices, indptr):
        self.data, self.indices = data, indices
        self.indptr = np.asarray(indptr[...], dtype=np.int64)

    def read(self, start: int, stop: int) -> RawCSR:
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return RawCSR(np.asarray(self.data[lo:hi]), np.asarray(self.indices[lo:hi]),
                      self.indptr[start : stop + 1] - lo, (stop - start, 0))  # fmt: skip


class _DaskCsrSource:
    """A lazily read CSR matrix (a dask array of scipy CSR blocks, as from ``anndata.experimental.read_lazy``).

    dask hides the stored ``indptr``, so the row sizes are computed once, block by block (a pass over
    the matrix); rows are then read as contiguous slices.
    """

    def __init__(self, array):
        self._array = array
        row_nnz = array.map_blocks(
            lambda block: np.diff(block.indptr).astype(np.int64), drop_axis=1, dtype=np.int64
        ).compute()
        self.indptr = np.concatenate([[0], np.cumsum(row_nnz)]).astype(np.int64)

    def read(self, start: int, stop: int) -> RawCSR:
        block = sp.csr_matrix(self._array[start:stop].compute())
        return RawCSR(block.data, block.indices, block.indptr.astype(np.int64), (stop - start, 0))


@dataclass(frozen=True)
class InputOrigin:
    """Where an input was opened from, so that another process (an executor's worker) can open it again.

    A path (with the ``load_adata`` that opened it, if any), or a zarr group, which pickles with its store.
    """

    path: str | None = None
    load_adata: LoadAdata | None = None
    group: zarr.Group | None = None

    def open(self, name: str) -> InputAnnData:
        """Open the input again (close it after use)."""
        if self.group is not None:
            with zarrs_pipeline(self.group.store):
                return from_store(self.group, name=name, origin=self)
        assert self.path is not None, "an origin is a path or a group"
        return open_input(self.path, load_adata=self.load_adata)


@dataclass
class InputAnnData:
    """An input opened for conversion: obs and var in memory, row-aligned arrays on disk."""

    name: str
    obs: pd.DataFrame
    var: pd.DataFrame
    elements: dict[str, RowElement]
    _handle: Any = field(default=None, repr=False)
    origin: InputOrigin | None = None  # None: an AnnData object, whose arrays travel to workers themselves

    @property
    def n_obs(self) -> int:
        """Number of rows."""
        return len(self.obs)

    def close(self) -> None:
        """Close the underlying file, if this input opened one."""
        if isinstance(self._handle, h5py.File):
            self._handle.close()


def open_input(item: InputLike, *, load_adata: LoadAdata | None = None, index: int = 0) -> InputAnnData:
    """Open one input for conversion without loading its arrays."""
    if isinstance(item, ad.AnnData):
        return _from_anndata(item, name=f"<AnnData #{index}>")
    if not isinstance(item, str | os.PathLike):
        raise InputError(
            f"`inputs` must be paths to .h5ad files or .zarr stores, or AnnData objects; got "
            f"{type(item).__name__} {item!r}."
        )
    path = Path(item)
    if not path.exists():
        raise InputError(f"Input {str(path)!r} does not exist. Check the path.")
    origin = InputOrigin(path=str(path), load_adata=load_adata)
    if load_adata is not None:
        opened = _from_anndata(load_adata(str(path)), name=str(path))
        opened.origin = origin
        return opened
    if path.is_file() and h5py.is_hdf5(path):
        try:
            handle = h5py.File(path, "r")
        except OSError as err:  # truncated or damaged: h5py's message says which
            raise InputError(f"Input {str(path)!r} cannot be read as HDF5 ({err}); it may be damaged or "
                             "incompletely copied. Write it again.") from None  # fmt: skip
        try:
            return from_store(handle, name=str(path), handle=handle, origin=origin)
        except BaseException:
            handle.close()
            raise
    if path.is_dir() and ((path / "zarr.json").exists() or (path / ".zgroup").exists()):
        with zarrs_pipeline():
            group = zarr.open_group(path, mode="r")
            return from_store(group, name=str(path), origin=origin)
    raise InputError(
        f"Input {str(path)!r} is neither an .h5ad file nor a zarr AnnData store. "
        "Pass paths written by `AnnData.write_h5ad` / `AnnData.write_zarr`, or AnnData objects."
    )


def from_store(root, *, name: str, handle=None, origin: InputOrigin | None = None) -> InputAnnData:
    """Open an AnnData store (an h5py file or zarr group) for conversion."""
    missing = [k for k in ("obs", "var", "X") if k not in root]
    if missing:
        raise InputError(
            f"Input {name!r} is not an AnnData store with an X matrix: it has no {', '.join(missing)}. "
            "Only AnnData files can be added to a collection."
        )
    obs = ad.io.read_elem(root["obs"])
    var = ad.io.read_elem(root["var"])
    elements = {"X": _element_on_disk(root["X"], name=name, key="X")}
    for mapping in ("layers", "obsm"):
        if mapping not in root:
            continue
        for key in root[mapping].keys():
            elem = root[mapping][key]
            if _encoding(elem) == "dataframe":
                warnings.warn(f"{name!r}: skipping {mapping}/{key!r}, a DataFrame; only arrays are converted.",
                              stacklevel=4)  # fmt: skip
                continue
            elements[f"{mapping}/{key}"] = _element_on_disk(elem, name=name, key=f"{mapping}/{key}")
    return InputAnnData(name=name, obs=obs, var=var, elements=elements, _handle=handle, origin=origin)


def _encoding(elem) -> str:
    enc = elem.attrs.get("encoding-type", "")
    if not enc and isinstance(elem, h5py.Dataset | zarr.Array):
        return "array"
    return enc.decode() if isinstance(elem, bytes) else str(enc)


def _element_on_disk(elem, *, name: str, key: str) -> RowElement:
    encoding = _encoding(elem)
    if encoding == "csr_matrix":
        shape = tuple(int(x) for x in elem.attrs["shape"])
        source = _CsrSource(elem["data"], elem["indices"], elem["indptr"])
        return RowElement("csr", np.dtype(elem["data"].dtype), shape, source)
    if encoding in ("csc_matrix", "coo_matrix"):
        raise InputError(
            f"{key} of {name!r} is stored as {encoding.split('_')[0].upper()}, which cannot be read by rows "
            "efficiently. Convert it and save again, e.g. `adata = anndata.read_h5ad(path); "
            "adata.X = adata.X.tocsr(); adata.write_h5ad(path)`, or pass the in-memory AnnData instead."
        )
    if encoding == "array":
        return RowElement("dense", np.dtype(elem.dtype), tuple(elem.shape), elem)
    raise InputError(
        f"{key} of {name!r} has unsupported encoding {encoding!r}; expected an array or CSR matrix."
    )


def _from_anndata(adata: ad.AnnData, *, name: str) -> InputAnnData:
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"`load_adata` must return an AnnData, got {type(adata).__name__} for {name!r}.")
    if adata.X is None:
        raise InputError(f"Input {name!r} has no X matrix; only AnnData objects with X can be added.")
    elements = {"X": _element_in_memory(adata.X, name=name, key="X")}
    for key, value in _named_layers(adata).items():
        elements[f"layers/{key}"] = _element_in_memory(value, name=name, key=f"layers/{key}")
    for key, value in adata.obsm.items():
        if isinstance(value, pd.DataFrame):
            warnings.warn(
                f"{name!r}: skipping obsm/{key!r}, a DataFrame; only arrays are converted.", stacklevel=4
            )
            continue
        elements[f"obsm/{key}"] = _element_in_memory(value, name=name, key=f"obsm/{key}")
    return InputAnnData(name=name, obs=_frame(adata.obs), var=_frame(adata.var), elements=elements)


def _frame(table: Any) -> pd.DataFrame:
    """The obs or var of an input as a pandas DataFrame (lazily read AnnData hold them as a Dataset2D)."""
    if isinstance(table, pd.DataFrame):
        return table.copy()
    return table.to_memory()


def _element_in_memory(value, *, name: str, key: str) -> RowElement:
    if sp.issparse(value):
        if value.format != "csr":
            warnings.warn(f"{key} of {name!r} is {value.format.upper()}; converting it to CSR in memory.",
                          stacklevel=5)  # fmt: skip
            value = sp.csr_matrix(value)
        source = _CsrSource(value.data, value.indices, value.indptr)
        return RowElement("csr", np.dtype(value.dtype), tuple(value.shape), source)
    if isinstance(value, ad.abc.CSRDataset):
        group = value.group
        source = _CsrSource(group["data"], group["indices"], group["indptr"])
        return RowElement("csr", np.dtype(value.dtype), tuple(value.shape), source)
    if isinstance(value, ad.abc.CSCDataset):
        raise InputError(
            f"{key} of backed {name!r} is CSC; load it into memory (`adata.to_memory()`) instead."
        )
    if is_dask_array(value) and sp.issparse(getattr(value, "_meta", None)):
        if value._meta.format != "csr":
            raise InputError(
                f"{key} of lazily read {name!r} is {value._meta.format.upper()}, which cannot be read by rows; "
                "load it (`adata.to_memory()`) or convert the file to CSR first."
            )
        return RowElement("csr", np.dtype(value.dtype), tuple(value.shape), _DaskCsrSource(value))
    if isinstance(value, np.matrix):
        value = np.asarray(value)
    if hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__getitem__"):
        return RowElement("dense", np.dtype(value.dtype), tuple(value.shape), value)
    raise InputError(f"{key} of {name!r} has unsupported type {type(value).__name__}.")
