"""Writing one AnnData as a sharded zarr v3 store, chunked along the obs axis for fast row reads."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec

from ._csr import RawCSR
from ._sizes import rows_for
from ._zarr import zarrs_pipeline

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

__all__ = ["write_sharded", "CompressorsLike"]

CompressorsLike = Literal["auto"] | None | Any | Sequence[Any]
"""``"auto"`` (choose per element by measuring), ``None`` (no compression) or zarr v3 codec(s)."""

# An element must shrink at least this much for compression to pay: decoding lz4 costs roughly what
# reading 30 % more bytes from page cache costs, so barely-compressible data (float embeddings) is
# stored raw. See benchmarks/convert.py.
_MIN_COMPRESSION_RATIO = 1.3
_SAMPLE_BYTES = 4 * 2**20
# Write every chunk, even all-zero ones: a missing chunk in our stores then means damage, not zeros.
_COMPLETE: ArrayConfigParams = {"write_empty_chunks": True}


def _named_layers(adata: ad.AnnData) -> dict[str, Any]:
    """``adata.layers`` without ``X``: anndata 0.13 also lists ``X`` there, under the key ``None``."""
    return {k: v for k, v in adata.layers.items() if k is not None}


def write_sharded(
    group: zarr.Group,
    adata: ad.AnnData,
    *,
    n_obs_per_chunk: int = 32,
    shard_size: str | int = "1GB",
    compressors: CompressorsLike = "auto",
    key: str | None = None,
) -> zarr.Group:
    """Write ``adata`` to ``group`` (or ``group[key]``) as a sharded zarr v3 AnnData store.

    Row-aligned arrays (``X``, ``layers``, ``obsm``) are chunked along the obs axis only, so reading a
    run of rows decodes few chunks, and the chunks are bundled into large shard files. Sparse matrices
    must be CSR: their ``data``/``indices`` are chunked by element count, from the mean number of
    non-zeros per row, and ``indices`` use the smallest integer type that holds ``n_vars``.
    Everything else (``obs``, ``var``, ``uns``, ``obsp``, ``varm``, ``varp``) is written by anndata.
    The store ends with consolidated metadata; :func:`anndata.read_zarr` reads it back unchanged.

    Parameters
    ----------
    group
        A zarr v3 group to write into.
    adata
        The AnnData to write (in memory).
    n_obs_per_chunk
        Rows per inner chunk: the unit of decoding when reading rows. Smaller chunks waste less
        decoding on short random reads but compress a little worse and make more, smaller reads
        on object storage.
    shard_size
        Rows per shard (``int``) or a target shard size in bytes (``"1GB"``, ``"512MB"``).
    compressors
        ``"auto"`` measures each element on a sample and compresses it (blosc lz4 after byte or bit
        shuffling, whichever is smaller) only where that shrinks it enough to be worth decoding; ``None`` disables compression;
        otherwise zarr v3 codec(s) used for every row-aligned array.
    key
        Write into a new subgroup of ``group`` with this name instead of into ``group`` itself.

    Returns
    -------
    The group holding the AnnData.
    """
    if not isinstance(group, zarr.Group):
        raise TypeError(
            "`group` must be a zarr v3 group, e.g. `zarr.open_group(path, mode='w')`, "
            f"got {type(group).__name__}."
        )
    if adata.isbacked:
        raise ValueError("`write_sharded` needs an in-memory AnnData: call `adata.to_memory()` first.")
    target = group.create_group(key, overwrite=True) if key is not None else group
    rows = {"X": adata.X} if adata.X is not None else {}
    rows |= {f"layers/{k}": v for k, v in _named_layers(adata).items()}
    rows |= {f"obsm/{k}": v for k, v in adata.obsm.items()}
    other = {name: dict(getattr(adata, name)) for name in ("uns", "obsp", "varm", "varp")}
    if adata.raw is not None:
        other["raw"] = adata.raw
    return write_anndata(target, obs=adata.obs, var=adata.var, rows=rows, other=other,
                         n_obs_per_chunk=n_obs_per_chunk, shard_size=shard_size, compressors=compressors)  # fmt: skip


def write_anndata(
    target: zarr.Group,
    *,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    rows: Mapping[str, Any],
    other: Mapping[str, Any] | None = None,
    n_obs_per_chunk: int = 32,
    shard_size: str | int = "1GB",
    compressors: CompressorsLike = "auto",
) -> zarr.Group:
    """Write an AnnData given as parts: ``rows`` maps ``"X"``, ``"layers/<k>"``, ``"obsm/<k>"`` to arrays.

    Row-aligned arrays may be dense, scipy CSR or :class:`~annbatch._csr.RawCSR`; ``other`` holds
    ``uns``/``obsp``/``varm``/``varp``/``raw``, written by anndata. See :func:`write_sharded`.
    """
    if isinstance(n_obs_per_chunk, bool) or not isinstance(n_obs_per_chunk, numbers.Integral):
        raise TypeError(f"`n_obs_per_chunk` must be an int (rows per chunk), got {n_obs_per_chunk!r}.")
    if n_obs_per_chunk < 1:
        raise ValueError(f"`n_obs_per_chunk` must be at least 1, got {n_obs_per_chunk}.")
    n_obs_per_chunk = int(n_obs_per_chunk)
    rows_for(shard_size, 1.0, name="shard_size")  # a bad size fails before anything is written
    if isinstance(compressors, str) and compressors != "auto":
        raise ValueError(f"`compressors` must be 'auto', None or zarr codec(s), got {compressors!r}.")
    # Small elements are written by anndata unsharded; row-aligned arrays get our own layout below.
    with zarrs_pipeline(target.store), ad.settings.override(auto_shard_zarr_v3=False, allow_write_nullable_strings=True):
        target.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        ad.io.write_elem(target, "obs", obs)
        ad.io.write_elem(target, "var", var)
        for name, value in (other or {}).items():
            ad.io.write_elem(target, name, value)
        groups = {"": target}
        for mapping in ("layers", "obsm"):
            groups[mapping] = target.create_group(mapping)
            groups[mapping].attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        settings = {"n_obs_per_chunk": n_obs_per_chunk, "shard_size": shard_size, "compressors": compressors}
        for path, value in rows.items():
            mapping, _, name = path.rpartition("/")
            if isinstance(value, np.ndarray | RawCSR) or sp.issparse(value):
                write_row_array(groups[mapping], name, value, **settings, label=_label(path))
            else:  # DataFrames and other exotic obsm values: anndata knows best.
                ad.io.write_elem(groups[mapping], name, value)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(target.store, target.path or None)
    return zarr.open_group(target.store, path=target.path, mode="r+")


def write_row_array(
    group: zarr.Group,
    name: str,
    value: np.ndarray | sp.csr_matrix | sp.csr_array | RawCSR,
    *,
    n_obs_per_chunk: int,
    shard_size: str | int,
    compressors: CompressorsLike,
    label: str | None = None,
) -> None:
    """Write one obs-aligned array (dense ndarray or CSR) chunked and sharded along rows.

    ``label`` is how messages name the array, e.g. ``adata.layers['counts']`` (default: ``name``).
    """
    n_obs = value.shape[0]
    if sp.issparse(value) or isinstance(value, RawCSR):
        assert not isinstance(value, np.ndarray)  # scipy sparse or RawCSR
        if value.format != "csr":
            label = label or name
            raise ValueError(
                f"`{label}` is a {value.format.upper()} matrix; only CSR can be read by rows quickly. "
                f"Convert it first, e.g. `{label} = {label}.tocsr()`."
            )
        _write_csr(group, name, value, n_obs_per_chunk=n_obs_per_chunk, shard_size=shard_size,
                   compressors=compressors)  # fmt: skip
        return
    value = np.ascontiguousarray(value)
    if value.dtype.kind not in "biuf":
        ad.io.write_elem(group, name, value)  # strings/objects: no row-sharding benefit
        return
    row_bytes = max(1, value[:1].nbytes)
    shard_rows = _round_up(
        min(max(n_obs, 1), rows_for(shard_size, row_bytes, name="shard_size")), n_obs_per_chunk
    )
    arr = group.create_array(
        name,
        shape=value.shape,
        dtype=value.dtype,
        chunks=(n_obs_per_chunk, *value.shape[1:]),
        shards=(shard_rows, *value.shape[1:]),
        compressors=_compressors_for(value, compressors),
        attributes={"encoding-type": "array", "encoding-version": "0.2.0"},
        config=_COMPLETE,
    )
    _write_by_shard(arr, value, shard_rows)


def _write_csr(
    group, name, value: sp.csr_matrix | RawCSR, *, n_obs_per_chunk, shard_size, compressors
) -> None:
    n_obs, n_vars = value.shape
    nnz = int(value.indptr[-1] - value.indptr[0])
    mean_nnz = nnz / max(n_obs, 1)
    indices_dtype = min_index_dtype(n_vars)
    chunk_elems = max(1, round(n_obs_per_chunk * mean_nnz))
    row_bytes = mean_nnz * (value.data.itemsize + indices_dtype.itemsize)
    shard_rows = min(max(n_obs, 1), rows_for(shard_size, row_bytes, name="shard_size"))
    shard_elems = _round_up(max(chunk_elems, round(shard_rows * mean_nnz)), chunk_elems)
    sub = group.create_group(name)
    sub.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_obs, n_vars]})
    data = value.data[value.indptr[0] : value.indptr[0] + nnz]
    indices = value.indices[value.indptr[0] : value.indptr[0] + nnz].astype(indices_dtype, copy=False)
    for key, arr_value in (("data", data), ("indices", indices)):
        arr = sub.create_array(
            key,
            shape=(nnz,),
            dtype=arr_value.dtype,
            chunks=(chunk_elems,),
            shards=(shard_elems,),
            compressors=_compressors_for(arr_value, compressors),
            config=_COMPLETE,
        )
        _write_by_shard(arr, arr_value, shard_elems)
    indptr = value.indptr.astype(np.int64, copy=False) - value.indptr[0]
    # indptr is read whole when a loader opens the dataset: plain, unsharded, a few big chunks.
    arr = sub.create_array("indptr", shape=indptr.shape, dtype=np.int64, chunks=(min(len(indptr), 2**20),),
                           compressors=None)  # fmt: skip
    arr[...] = indptr


def _label(path: str) -> str:
    """How a user spells the row-aligned element at ``path`` ("X", "layers/counts", "obsm/X_pca")."""
    mapping, _, name = path.rpartition("/")
    return f"adata.{mapping}[{name!r}]" if mapping else f"adata.{name}"


def _write_by_shard(arr: zarr.Array, value: np.ndarray, shard_len: int) -> None:
    # One shard per call: the encoder then buffers one shard, not the whole array.
    for start in range(0, value.shape[0], shard_len):
        arr[start : start + shard_len] = value[start : start + shard_len]


def min_index_dtype(n_vars: int) -> np.dtype:
    """Smallest unsigned integer dtype that can hold column indices up to ``n_vars - 1``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_vars - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _compressors_for(value: np.ndarray, compressors: CompressorsLike):
    if isinstance(compressors, str) and compressors == "auto":
        return _choose_codec(value)
    return compressors


def _choose_codec(value: np.ndarray) -> BloscCodec | None:
    """The codec for one array: lz4 after byte or bit shuffling, measured on a sample of ``value``.

    ``None`` when neither shrinks it by at least the threshold (dense float embeddings, say), since
    decoding then costs more than the bytes it saves.
    """
    flat = value.reshape(-1)
    if flat.nbytes == 0:
        return None
    n = max(1, _SAMPLE_BYTES // flat.itemsize)
    start = max(0, (flat.size - n) // 2)
    sample = np.ascontiguousarray(flat[start : start + n])
    ratios = {
        shuffle: sample.nbytes / len(Blosc(cname="lz4", clevel=5, shuffle=code).encode(sample))
        for shuffle, code in (("shuffle", Blosc.SHUFFLE), ("bitshuffle", Blosc.BITSHUFFLE))
    }
    # Bit shuffling decodes slower: take it only when it clearly compresses better.
    best: Literal["shuffle", "bitshuffle"] = (
        "bitshuffle" if ratios["bitshuffle"] > 1.15 * ratios["shuffle"] else "shuffle"
    )
    if ratios[best] < _MIN_COMPRESSION_RATIO:
        return None
    return BloscCodec(cname="lz4", clevel=5, shuffle=best, typesize=value.dtype.itemsize)


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)
