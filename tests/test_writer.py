"""`annbatch.write_sharded`: round trip through plain anndata, sharded layout, dtypes, codecs, errors."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec

import annbatch
from annbatch.synthetic import make_adata

if TYPE_CHECKING:
    from pathlib import Path


def _assert_values_equal(a, b) -> None:
    """Dense or sparse arrays with the same kind, dtype, shape and values."""
    assert sp.issparse(a) == sp.issparse(b)
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    if sp.issparse(a):
        assert a.format == b.format == "csr"
        assert np.array_equal(a.indptr, b.indptr)
        assert np.array_equal(a.indices, b.indices)
        assert np.array_equal(a.data, b.data)
    else:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def assert_adata_equal(a: ad.AnnData, b: ad.AnnData, exact: bool = True) -> None:
    """Same obs, var, X, layers, obsm and uns keys (dtypes included)."""
    pd.testing.assert_frame_equal(a.obs, b.obs, check_exact=exact)
    pd.testing.assert_frame_equal(a.var, b.var, check_exact=exact)
    _assert_values_equal(a.X, b.X)
    assert set(a.layers) == set(b.layers)
    for k in a.layers:
        _assert_values_equal(a.layers[k], b.layers[k])
    assert set(a.obsm) == set(b.obsm)
    for k in a.obsm:
        _assert_values_equal(a.obsm[k], b.obsm[k])
    assert set(a.uns) == set(b.uns)


def _write(path: Path, adata: ad.AnnData, **kwargs) -> zarr.Group:
    group = zarr.open_group(path, mode="w", zarr_format=3)
    return annbatch.write_sharded(group, adata, **kwargs)


def _enrich(adata: ad.AnnData) -> ad.AnnData:
    """Add layers and obs columns of every common kind, so the round trip covers them."""
    rng = np.random.default_rng(5)
    adata.layers["counts"] = adata.X.copy()
    adata.layers["dense"] = rng.random(adata.shape).astype(np.float64)
    adata.obsm["int_emb"] = rng.integers(0, 100, size=(adata.n_obs, 3)).astype(np.int32)
    adata.obs["str_col"] = [f"s{i % 7}" for i in range(adata.n_obs)]
    adata.obs["int_col"] = np.arange(adata.n_obs, dtype=np.int32)
    adata.obs["float_col"] = rng.normal(size=adata.n_obs)
    adata.obs["bool_col"] = np.arange(adata.n_obs) % 3 == 0
    adata.obs["ordered"] = pd.Categorical(
        np.array(["lo", "mid", "hi"])[np.arange(adata.n_obs) % 3],
        categories=["lo", "mid", "hi"],
        ordered=True,
    )
    adata.var["score"] = rng.random(adata.n_vars)
    return adata


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_round_trip_with_plain_anndata(tmp_path, sparse_adata, dense_adata, kind):
    adata = _enrich(sparse_adata if kind == "sparse" else dense_adata)
    expected = adata.copy()
    returned = _write(tmp_path / "out.zarr", adata, n_obs_per_chunk=32, shard_size=256)
    assert isinstance(returned, zarr.Group)

    back = ad.read_zarr(tmp_path / "out.zarr")
    assert_adata_equal(back, expected, exact=True)
    # Dtypes and kinds survive exactly, not just the values.
    assert back.X.dtype == expected.X.dtype
    assert sp.issparse(back.X) == (kind == "sparse")
    assert isinstance(back.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert back.obs["ordered"].cat.ordered
    assert back.obs["bool_col"].dtype == bool
    assert back.obs["int_col"].dtype == np.int32
    assert list(back.obs["str_col"]) == list(expected.obs["str_col"])
    assert back.obs_names.equals(expected.obs_names)
    assert back.var_names.equals(expected.var_names)
    # The input was not modified by writing.
    assert_adata_equal(adata, expected, exact=True)


def test_sparse_arrays_sharded_along_obs_only(tmp_path, sparse_adata):
    _write(tmp_path / "out.zarr", sparse_adata, n_obs_per_chunk=64, shard_size=256)
    root = zarr.open_group(tmp_path / "out.zarr", mode="r")
    data, indices, indptr = root["X/data"], root["X/indices"], root["X/indptr"]
    nnz = sparse_adata.X.nnz
    assert data.shape == indices.shape == (nnz,)
    mean_nnz = nnz / sparse_adata.n_obs
    # Inner chunks hold about n_obs_per_chunk rows' worth of values; shards a whole number of chunks.
    assert data.chunks == indices.chunks
    assert data.shards == indices.shards
    assert data.chunks[0] == round(64 * mean_nnz)
    assert data.shards[0] % data.chunks[0] == 0
    assert data.shards[0] >= round(256 * mean_nnz)
    assert data.shards[0] < nnz  # several shards
    assert indptr.shape == (sparse_adata.n_obs + 1,)
    assert np.array_equal(indptr[:], sparse_adata.X.indptr)
    # Smallest unsigned index dtype: 300 vars do not fit uint8.
    assert indices.dtype == np.uint16
    assert data.dtype == np.float32


@pytest.mark.parametrize(
    ("n_vars", "dtype"), [(200, np.uint8), (256, np.uint8), (257, np.uint16), (70_000, np.uint32)]
)
def test_smallest_index_dtype(tmp_path, n_vars, dtype):
    X = sp.random(50, n_vars, density=0.01, format="lil", dtype=np.float32, random_state=0)
    X[0, n_vars - 1] = 1.0  # the largest column index is present
    X = X.tocsr()
    adata = ad.AnnData(X=X)
    _write(tmp_path / "out.zarr", adata)
    assert zarr.open_group(tmp_path / "out.zarr", mode="r")["X/indices"].dtype == dtype
    back = ad.read_zarr(tmp_path / "out.zarr")
    assert (back.X != X).nnz == 0
    assert back.X[0, n_vars - 1] == 1.0


def test_dense_arrays_sharded_along_obs_only(tmp_path, dense_adata):
    _write(tmp_path / "out.zarr", dense_adata, n_obs_per_chunk=50, shard_size=200)
    root = zarr.open_group(tmp_path / "out.zarr", mode="r")
    x = root["X"]
    assert x.shape == (1000, 300)
    assert x.chunks == (50, 300)
    assert x.shards == (200, 300)
    pca = root["obsm/X_pca"]
    assert pca.chunks == (50, 16)
    assert pca.shards == (200, 16)


def test_shard_size_as_byte_string(tmp_path, dense_adata, sparse_adata):
    row_bytes = dense_adata.n_vars * 4
    _write(tmp_path / "dense.zarr", dense_adata, n_obs_per_chunk=16, shard_size="100KB")
    x = zarr.open_group(tmp_path / "dense.zarr", mode="r")["X"]
    assert x.chunks == (16, 300)
    assert x.shards[1:] == (300,)
    assert x.shards[0] % 16 == 0
    # About 100 kB per shard: at most one inner chunk above the target.
    assert 100_000 - 16 * row_bytes < x.shards[0] * row_bytes <= 100_000 + 16 * row_bytes

    _write(tmp_path / "dense_1mb.zarr", dense_adata, n_obs_per_chunk=16, shard_size="1MB")
    x = zarr.open_group(tmp_path / "dense_1mb.zarr", mode="r")["X"]
    assert x.shards[0] > 500  # 1 MB holds ~833 rows of 1,200 bytes
    assert x.shards[0] <= 1_000_000 // row_bytes + 16

    _write(tmp_path / "sparse.zarr", sparse_adata, n_obs_per_chunk=16, shard_size="20KB")
    root = zarr.open_group(tmp_path / "sparse.zarr", mode="r")
    data, indices = root["X/data"], root["X/indices"]
    shard_bytes = data.shards[0] * (data.dtype.itemsize + indices.dtype.itemsize)
    chunk_bytes = data.chunks[0] * (data.dtype.itemsize + indices.dtype.itemsize)
    assert data.shards[0] % data.chunks[0] == 0
    assert 20_000 - chunk_bytes <= shard_bytes <= 20_000 + chunk_bytes
    assert_adata_equal(ad.read_zarr(tmp_path / "sparse.zarr"), sparse_adata, exact=True)


def test_bad_shard_size_and_chunk(tmp_path, dense_adata):
    with pytest.raises(ValueError, match="shard_size"):
        _write(tmp_path / "a.zarr", dense_adata, shard_size="lots")
    with pytest.raises(ValueError, match="n_obs_per_chunk"):
        _write(tmp_path / "b.zarr", dense_adata, n_obs_per_chunk=0)


def test_compressors(tmp_path, sparse_adata):
    rng = np.random.default_rng(0)
    # Counts compress well; standard-normal float64 noise barely does.
    sparse_adata.obsm["noise"] = rng.normal(size=(sparse_adata.n_obs, 32))
    _write(tmp_path / "auto.zarr", sparse_adata, compressors="auto")
    auto = zarr.open_group(tmp_path / "auto.zarr", mode="r")
    assert len(auto["X/data"].compressors) == 1
    assert isinstance(auto["X/data"].compressors[0], BloscCodec)
    assert auto["obsm/noise"].compressors == ()

    _write(tmp_path / "none.zarr", sparse_adata, compressors=None)
    raw = zarr.open_group(tmp_path / "none.zarr", mode="r")
    for key in ("X/data", "X/indices", "obsm/X_pca", "obsm/noise"):
        assert raw[key].compressors == (), key
    assert auto["X/data"].nbytes_stored() < raw["X/data"].nbytes_stored()

    codec = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
    _write(tmp_path / "zstd.zarr", sparse_adata, compressors=codec)
    zstd = zarr.open_group(tmp_path / "zstd.zarr", mode="r")
    for key in ("X/data", "obsm/noise"):
        cname = zstd[key].compressors[0].cname
        assert str(getattr(cname, "value", cname)) == "zstd"  # an enum in older zarr, a string in newer

    for name in ("auto", "none", "zstd"):
        back = ad.read_zarr(tmp_path / f"{name}.zarr")
        assert_adata_equal(back, sparse_adata, exact=True)


@pytest.mark.parametrize("where", ["X", "layer"])
def test_csc_raises_clear_error(tmp_path, sparse_adata, where):
    if where == "X":
        sparse_adata.X = sparse_adata.X.tocsc()
    else:
        sparse_adata.layers["counts"] = sparse_adata.X.tocsc()
    with pytest.raises(ValueError, match=r"CSC.*tocsr"):
        _write(tmp_path / "out.zarr", sparse_adata)


def test_consolidated_metadata(tmp_path, sparse_adata):
    _write(tmp_path / "out.zarr", sparse_adata)
    meta = json.loads((tmp_path / "out.zarr" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    assert meta["attributes"]["encoding-type"] == "anndata"
    consolidated = meta["consolidated_metadata"]["metadata"]
    for key in ("X", "X/data", "X/indices", "X/indptr", "obs", "var", "obsm/X_pca"):
        assert key in consolidated, key
    group = zarr.open_consolidated(tmp_path / "out.zarr", zarr_format=3)
    assert group["X/data"].shape == (sparse_adata.X.nnz,)


def test_write_into_subgroup_by_key(tmp_path, sparse_adata, dense_adata):
    root = zarr.open_group(tmp_path / "multi.zarr", mode="w", zarr_format=3)
    a = annbatch.write_sharded(root, sparse_adata, key="a")
    b = annbatch.write_sharded(root, dense_adata, key="b")
    assert a.path == "a"
    assert b.path == "b"
    assert_adata_equal(ad.read_zarr(tmp_path / "multi.zarr" / "a"), sparse_adata, exact=True)
    assert_adata_equal(ad.read_zarr(tmp_path / "multi.zarr" / "b"), dense_adata, exact=True)
    # Writing again under the same key replaces the old content.
    annbatch.write_sharded(root, dense_adata[:10].copy(), key="a")
    assert ad.read_zarr(tmp_path / "multi.zarr" / "a").shape == (10, 300)


def test_backed_input_rejected(tmp_path, sparse_adata):
    sparse_adata.write_h5ad(tmp_path / "in.h5ad")
    backed = ad.read_h5ad(tmp_path / "in.h5ad", backed="r")
    try:
        with pytest.raises(ValueError, match="to_memory"):
            _write(tmp_path / "out.zarr", backed)
    finally:
        backed.file.close()


def test_memory_store(sparse_adata):
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    annbatch.write_sharded(group, sparse_adata, shard_size=300)
    assert_adata_equal(ad.io.read_elem(group), sparse_adata, exact=True)


def test_zero_rows(tmp_path):
    for dense in (False, True):
        adata = make_adata(0, 50, dense=dense, seed=0)
        _write(tmp_path / f"empty_{dense}.zarr", adata)
        back = ad.read_zarr(tmp_path / f"empty_{dense}.zarr")
        assert back.shape == (0, 50)
