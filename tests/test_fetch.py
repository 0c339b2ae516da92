"""Tests of the direct shard reader behind the loader: values read through the numba kernels.

Data is written to real zarr stores with small inner chunks (4 rows, or ~4 rows' worth of CSR
elements) and small shards, so every load crosses chunk, shard and dataset boundaries. The kernels'
paths are covered one by one:

- ``SpanReader`` (pread + c-blosc decode + scatter of element spans): CSR ``data``/``indices``,
  compressed dense arrays and dense arrays whose dtype differs from the output's;
- ``RawReads`` (``preadv`` straight into place): uncompressed dense rows of the output dtype;
- chunks a writer did not store (the fill value), corrupt and truncated shards;
- rows carried between loads (copied on the read threads), over several epochs;
- where :class:`~annbatch.samplers.RandomSampler` puts the short last chunk.

The reference for every check is the source data itself (or the store read back with anndata).
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec

import annbatch
from annbatch._shards import sharded_reader
from annbatch.samplers import RandomSampler
from annbatch.synthetic import make_adata

if TYPE_CHECKING:
    from pathlib import Path

N_VARS = 40
CHUNK_ROWS = 4  # rows per inner chunk
SHARD_ROWS = 20  # rows per shard (dense); CSR shards hold about as many rows' elements
_MISSING = 2**64 - 1  # a shard index entry of a chunk that is not stored
BLOSC = BloscCodec(cname="lz4", shuffle="shuffle")


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def _inner_codecs(arr: zarr.Array) -> list[str]:
    codecs = arr.metadata.to_dict()["codecs"]
    assert codecs[0]["name"] == "sharding_indexed"
    return [c["name"] for c in codecs[0]["configuration"]["codecs"]]


def _direct(arr: zarr.Array, *, compressed: bool) -> None:
    """Assert that the loader reads ``arr`` with its own shard reader (not through zarr)."""
    reader = sharded_reader(arr)
    assert reader is not None, f"{arr} is not read by the direct shard reader"
    assert reader.compressed == compressed


def _shard_files(arr_dir: Path) -> list[Path]:
    return sorted(p for p in (arr_dir / "c").rglob("*") if p.is_file())


def _shard_index(shard: Path, per_shard: int) -> np.ndarray:
    """``(offset, nbytes)`` of every inner chunk of a shard (index at the end, then a crc32c)."""
    n = 16 * per_shard
    return np.frombuffer(shard.read_bytes()[-(n + 4) : -4], dtype="<u8").reshape(-1, 2)


def _per_shard(arr: zarr.Array) -> int:
    return arr.shards[0] // arr.chunks[0]


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _epoch(loader: annbatch.Loader, expected: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
    """Run one epoch; check every row comes exactly once, with the right values. The row order."""
    seen = []
    for b in loader:
        rows = np.asarray(b["index"])
        assert b["X"].shape[0] == len(rows)
        if batch_size is not None:
            assert len(rows) <= batch_size
        assert b["X"].dtype == expected.dtype
        np.testing.assert_array_equal(_dense(b["X"]), expected[rows])
        seen.append(rows)
    order = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(expected)))
    if batch_size is not None:  # all batches full except possibly the last
        sizes = [len(s) for s in seen]
        assert all(s == batch_size for s in sizes[:-1]), sizes
    return order


def _annbatch_threads() -> list[threading.Thread]:
    """Live loader threads: the prefetcher (``annbatch-prefetch``) and read pools (``annbatch-read``)."""
    return [t for t in threading.enumerate() if t.name.startswith("annbatch-") and t.is_alive()]


def _wait_no_threads(timeout: float = 2.0) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout
    while _annbatch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return _annbatch_threads()


def _write(
    path: Path, adata: ad.AnnData, *, compressors="auto", n_obs_per_chunk: int = CHUNK_ROWS
) -> zarr.Group:
    group = zarr.open_group(path, mode="w", zarr_format=3)
    return annbatch.write_sharded(
        group, adata, n_obs_per_chunk=n_obs_per_chunk, shard_size=SHARD_ROWS, compressors=compressors
    )


def _loader(**kw) -> annbatch.Loader:
    kw = {"batch_size": 7, "chunk_size": 5, "preload_nchunks": 3, "shuffle": True, "seed": 0} | kw
    return annbatch.Loader(return_index=True, **kw)


# ---------------------------------------------------------------------------------------------------------
# CSR collections: small chunks, several datasets, compressed and not
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["auto", None], ids=["blosc", "raw"])
def csr_coll(request, tmp_path_factory) -> tuple[annbatch.Collection, np.ndarray]:
    root = tmp_path_factory.mktemp("csr") / "c.zarr"
    inputs = [make_adata(n, N_VARS, seed=30 + n) for n in (150, 113)]
    for a in inputs:  # empty rows: scattered ones, and a run longer than an inner chunk
        keep = np.ones(a.n_obs, dtype=np.float32)
        keep[::7] = 0
        keep[40:60] = 0
        a.X = (sp.diags(keep) @ a.X).tocsr()
        a.X.eliminate_zeros()
    coll = annbatch.Collection(root).add_adatas(
        inputs,
        seed=0,
        dataset_size=90,
        shuffle_chunk_size=10,
        n_obs_per_chunk=CHUNK_ROWS,
        shard_size=24,
        compressors=request.param,
        progress=False,
    )
    assert len(coll) >= 3, "the tests want several datasets"
    compressed = request.param is not None
    for key in coll.dataset_keys:
        data = zarr.open_array(root / key / "X" / "data", mode="r")
        assert _inner_codecs(data) == (["bytes", "blosc"] if compressed else ["bytes"])
        _direct(data, compressed=compressed)
        assert data.chunks[0] < 4 * CHUNK_ROWS, "inner chunks should hold a few rows"
        assert len(_shard_files(root / key / "X" / "data")) >= 2, "the tests want several shards"
        indices = zarr.open_array(root / key / "X" / "indices", mode="r")
        assert sharded_reader(indices) is not None
    adatas = [ad.read_zarr(root / key) for key in coll.dataset_keys]
    expected = np.concatenate([a.X.toarray() for a in adatas])
    assert (expected != 0).sum(axis=1).min() == 0, "the tests want empty rows too"
    return coll, expected


@pytest.mark.parametrize(
    ("batch_size", "chunk_size", "preload_nchunks", "shuffle"),
    [
        (16, 37, 3, True),  # chunks cross inner chunks, shards and datasets
        (3, 1, 5, True),  # single-row chunks: many tiny spans
        (13, 9, 4, False),  # in order: contiguous runs over dataset boundaries
        (64, 400, 1, False),  # one load of every row
    ],
)
def test_csr_collection_values(csr_coll, batch_size, chunk_size, preload_nchunks, shuffle):
    coll, expected = csr_coll
    loader = coll.loader(batch_size, chunk_size, preload_nchunks, shuffle=shuffle, seed=3, return_index=True)
    order = _epoch(loader, expected, batch_size=batch_size)
    if not shuffle:
        np.testing.assert_array_equal(order, np.arange(len(expected)))


def test_csr_collection_to_torch(csr_coll):
    torch = pytest.importorskip("torch")
    coll, expected = csr_coll
    loader = coll.loader(10, 6, 4, seed=1, return_index=True, to="torch")
    rows = []
    for b in loader:
        assert b["X"].layout == torch.sparse_csr
        np.testing.assert_array_equal(b["X"].to_dense().numpy(), expected[np.asarray(b["index"])])
        rows.append(np.asarray(b["index"]))
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(len(expected)))


# ---------------------------------------------------------------------------------------------------------
# dense: raw (preadv) and compressed (blosc spans), 2-d and n-d rows
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_stores(tmp_path_factory) -> list[tuple[zarr.Group, dict[str, np.ndarray]]]:
    """Two AnnData stores (61 and 47 rows) with raw and compressible X and n-d obsm arrays."""
    rng = np.random.default_rng(7)
    stores = []
    for i, n in enumerate((61, 47)):
        arrays = {
            "X": rng.standard_normal((n, 24)).astype(np.float32),  # barely compressible: stored raw
            "layers/counts": rng.poisson(1.0, (n, 24)).astype(np.float32),  # compressible: blosc
            "obsm/raw": rng.standard_normal((n, 4, 3)).astype(np.float32),
            "obsm/counts": rng.poisson(0.5, (n, 4, 3)).astype(np.float32),
        }
        adata = ad.AnnData(
            arrays["X"],
            layers={"counts": arrays["layers/counts"]},
            obsm={"raw": arrays["obsm/raw"], "counts": arrays["obsm/counts"]},
        )
        group = _write(tmp_path_factory.mktemp("dense") / f"d{i}.zarr", adata)
        for key in arrays:
            compressed = "counts" in key
            assert _inner_codecs(group[key]) == (["bytes", "blosc"] if compressed else ["bytes"])
            _direct(group[key], compressed=compressed)
            assert group[key].chunks[0] == CHUNK_ROWS and group[key].shards[0] == SHARD_ROWS
        stores.append((group, arrays))
    return stores


@pytest.mark.parametrize(
    "keys",
    [
        ("X", "X"),  # raw rows: preadv
        ("layers/counts", "layers/counts"),  # compressed rows: blosc spans
        ("X", "layers/counts"),  # one load from both paths
        ("obsm/raw", "obsm/raw"),  # n-d raw rows
        ("obsm/counts", "obsm/counts"),  # n-d compressed rows
        ("obsm/raw", "obsm/counts"),
    ],
)
@pytest.mark.parametrize(("batch_size", "chunk_size", "preload_nchunks"), [(7, 5, 3), (16, 13, 2), (1, 1, 9)])
def test_dense_values(dense_stores, keys, batch_size, chunk_size, preload_nchunks):
    (g0, a0), (g1, a1) = dense_stores
    expected = np.concatenate([a0[keys[0]], a1[keys[1]]])
    loader = _loader(batch_size=batch_size, chunk_size=chunk_size, preload_nchunks=preload_nchunks, seed=5)
    loader.add_datasets([g0[keys[0]], g1[keys[1]]])
    assert loader.n_obs == len(expected)
    _epoch(loader, expected, batch_size=batch_size)


def test_dense_in_order_over_datasets(dense_stores):
    (g0, a0), (g1, a1) = dense_stores
    for key in ("X", "obsm/counts"):
        expected = np.concatenate([a0[key], a1[key]])
        loader = _loader(batch_size=11, chunk_size=len(expected), preload_nchunks=1, shuffle=False)
        order = _epoch(loader.add_datasets([g0[key], g1[key]]), expected, batch_size=11)
        np.testing.assert_array_equal(order, np.arange(len(expected)))


# ---------------------------------------------------------------------------------------------------------
# dtypes: float32 + float64 datasets promoted while placed
# ---------------------------------------------------------------------------------------------------------
def _float64_values(rng: np.random.Generator, shape) -> np.ndarray:
    x = rng.poisson(1.0, shape).astype(np.float64)
    x[x != 0] += 1 / 3  # not exact in float32: going through float32 would change them
    return x


@pytest.mark.parametrize("compressors", [BLOSC, None], ids=["blosc", "raw"])
def test_csr_dtype_promotion(tmp_path, compressors):
    rng = np.random.default_rng(11)
    a = sp.random(53, N_VARS, density=0.1, format="csr", dtype=np.float32, random_state=1)
    b = sp.csr_matrix(_float64_values(rng, (45, N_VARS)) * (rng.random((45, N_VARS)) < 0.1))
    g32 = _write(tmp_path / "a.zarr", ad.AnnData(a), compressors=compressors)
    g64 = _write(tmp_path / "b.zarr", ad.AnnData(b), compressors=compressors)
    for g, dtype in ((g32, np.float32), (g64, np.float64)):
        assert g["X/data"].dtype == dtype
        _direct(g["X/data"], compressed=compressors is not None)
    expected = np.concatenate([a.toarray().astype(np.float64), b.toarray()])
    loader = _loader(batch_size=9, chunk_size=4, preload_nchunks=3)
    with pytest.warns(UserWarning, match="float64"):
        loader.add_datasets([g32["X"], g64["X"]])
    for _ in range(2):
        _epoch(loader, expected, batch_size=9)


@pytest.mark.parametrize("order", ["32-64", "64-32"])
def test_dense_dtype_promotion(tmp_path, order):
    rng = np.random.default_rng(12)
    raw32 = rng.standard_normal((37, 6)).astype(np.float32)  # raw, cast on the way: spans without blosc
    counts32 = rng.poisson(1.0, (29, 6)).astype(np.float32)  # compressed and cast
    raw64 = rng.standard_normal((41, 6)) / 3  # raw, the output dtype: preadv
    counts64 = _float64_values(rng, (33, 6))  # compressed, the output dtype
    arrays = []
    for i, x in enumerate((raw32, counts32, raw64, counts64)):
        g = _write(tmp_path / f"{i}.zarr", ad.AnnData(x), compressors=BLOSC if i % 2 else None)
        _direct(g["X"], compressed=i % 2 == 1)
        assert g["X"].dtype == x.dtype
        arrays.append((g["X"], x))
    if order == "64-32":
        arrays = arrays[2:] + arrays[:2]
    expected = np.concatenate([x.astype(np.float64) for _, x in arrays])
    loader = _loader(batch_size=10, chunk_size=6, preload_nchunks=3)
    with pytest.warns(UserWarning, match="float64"):
        loader.add_datasets([z for z, _ in arrays])
    _epoch(loader, expected, batch_size=10)


# ---------------------------------------------------------------------------------------------------------
# chunks a writer did not store hold the fill value
# ---------------------------------------------------------------------------------------------------------
def _sparse_chunks_array(path: Path, x: np.ndarray, fill: float, compressors) -> zarr.Array:
    z = zarr.create_array(
        path,
        shape=x.shape,
        dtype=x.dtype,
        chunks=(CHUNK_ROWS, *x.shape[1:]),
        shards=(SHARD_ROWS, *x.shape[1:]),
        compressors=compressors,
        fill_value=fill,
        config={"write_empty_chunks": False},
    )
    z[...] = x
    return zarr.open_array(path, mode="r")


# rows that are all fill value: whole inner chunks (4 rows), never a whole shard (20 rows)
_FILL_ROWS = [(8, 16), (20, 24), (36, 40), (44, 56), (96, 100)]


@pytest.mark.parametrize("fill", [0.0, 7.5])
@pytest.mark.parametrize("compressors", [None, BLOSC], ids=["raw", "blosc"])
@pytest.mark.parametrize("row_shape", [(6,), (3, 2)], ids=["2d", "3d"])
def test_missing_chunks_hold_the_fill_value(tmp_path, fill, compressors, row_shape):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((102, *row_shape)).astype(np.float32)
    for a, b in _FILL_ROWS:
        x[a:b] = fill
    z = _sparse_chunks_array(tmp_path / "a.zarr", x, fill, compressors)
    _direct(z, compressed=compressors is not None)
    shards = _shard_files(tmp_path / "a.zarr")
    assert len(shards) == -(-len(x) // SHARD_ROWS), "every shard holds some data"
    index = np.concatenate([_shard_index(s, _per_shard(z)) for s in shards])[: -(-len(x) // CHUNK_ROWS)]
    n_missing = int((index[:, 0] == _MISSING).sum())
    assert n_missing == sum(b - a for a, b in _FILL_ROWS) // CHUNK_ROWS, "the fill chunks are not stored"
    np.testing.assert_array_equal(z[...], x)  # zarr's own reading

    loader = _loader()
    loader.add_dataset(z)
    _epoch(loader, x, batch_size=7)
    # with a float64 dataset besides: the float32 rows are cast on the way (spans, even when raw)
    other = rng.standard_normal((10, *row_shape))
    loader = _loader()
    with pytest.warns(UserWarning, match="float64"):
        loader.add_datasets([z, other])
    _epoch(loader, np.concatenate([x.astype(np.float64), other]), batch_size=7)


@pytest.mark.parametrize("compressors", [None, BLOSC], ids=["raw", "blosc"])
def test_csr_missing_chunks_hold_zeros(tmp_path, compressors):
    """A CSR group whose ``data`` has unstored (all-zero) chunks: explicit zeros come back."""
    m = sp.random(60, N_VARS, density=0.2, format="csr", dtype=np.float32, random_state=2)
    m.data[8:40] = 0  # explicit zeros, stored in the matrix: whole 8-element chunks of data are zero
    group = zarr.open_group(tmp_path / "csr.zarr", mode="w", zarr_format=3)
    group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": list(m.shape)})
    for key, value in (("data", m.data), ("indices", m.indices.astype(np.uint16))):
        arr = group.create_array(key, shape=value.shape, dtype=value.dtype, chunks=(8,), shards=(32,),
                                 compressors=compressors, fill_value=0,
                                 config={"write_empty_chunks": False})  # fmt: skip
        arr[...] = value
        _direct(arr, compressed=compressors is not None)
    group.create_array("indptr", data=m.indptr.astype(np.int64))
    index = np.concatenate([_shard_index(s, 4) for s in _shard_files(tmp_path / "csr.zarr" / "data")])
    assert (index[:, 0] == _MISSING).sum() >= 3
    assert len(_shard_files(tmp_path / "csr.zarr" / "data")) == -(-m.nnz // 32)
    loader = _loader()
    loader.add_dataset(zarr.open_group(tmp_path / "csr.zarr", mode="r"))
    got = {}
    for b in loader:
        x = b["X"]
        for i, row in enumerate(np.asarray(b["index"])):
            got[row] = (x.indices[x.indptr[i] : x.indptr[i + 1]], x.data[x.indptr[i] : x.indptr[i + 1]])
    assert sorted(got) == list(range(m.shape[0]))
    for row, (indices, data) in got.items():  # the stored entries themselves, zeros included
        np.testing.assert_array_equal(indices, m.indices[m.indptr[row] : m.indptr[row + 1]])
        np.testing.assert_array_equal(data, m.data[m.indptr[row] : m.indptr[row + 1]])


@pytest.mark.parametrize("compressors", [None, BLOSC], ids=["raw", "blosc"])
def test_missing_shard_of_a_zarr_array_holds_the_fill_value(tmp_path, compressors):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((100, 6)).astype(np.float32)
    x[40:60] = 0  # all of shard 2
    z = _sparse_chunks_array(tmp_path / "a.zarr", x, 0.0, compressors)
    _direct(z, compressed=compressors is not None)
    assert not (tmp_path / "a.zarr" / "c" / "2").exists()
    np.testing.assert_array_equal(z[...], x)  # zarr: a missing shard holds the fill value
    try:
        _epoch(_loader().add_dataset(z), x, batch_size=7)
    finally:
        assert _wait_no_threads() == []


# ---------------------------------------------------------------------------------------------------------
# damaged shards: clear errors, and the loader's threads stop
# ---------------------------------------------------------------------------------------------------------
def _consume(loader: annbatch.Loader) -> None:
    for _ in loader:
        pass


@pytest.fixture
def csr_store(tmp_path) -> tuple[Path, np.ndarray]:
    """One compressed CSR AnnData store with several shards, and its dense X."""
    adata = make_adata(200, N_VARS, seed=40)
    _write(tmp_path / "s.zarr", adata)
    data = zarr.open_array(tmp_path / "s.zarr" / "X" / "data", mode="r")
    _direct(data, compressed=True)
    assert len(_shard_files(tmp_path / "s.zarr" / "X" / "data")) >= 3
    return tmp_path / "s.zarr", adata.X.toarray()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_garbage_in_a_csr_data_shard(csr_store, prefetch):
    root, expected = csr_store
    data = zarr.open_array(root / "X" / "data", mode="r")
    shard = _shard_files(root / "X" / "data")[1]
    index = _shard_index(shard, _per_shard(data))
    k = len(index) // 2  # a chunk in the middle of the shard: its bytes become garbage
    offset, nbytes = (int(v) for v in index[k])
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * nbytes)
    assert _wait_no_threads() == []
    loader = _loader(batch_size=16, chunk_size=8, preload_nchunks=2, prefetch=prefetch)
    loader.add_dataset(zarr.open_group(root / "X", mode="r"))
    with pytest.raises(OSError, match="rebuild") as info:
        _consume(loader)
    message = str(info.value)
    assert str(shard.relative_to(root)) in message, message
    assert "corrupt" in message
    assert _wait_no_threads() == []


@pytest.mark.parametrize("prefetch", [0, 2])
def test_truncated_csr_shard(csr_store, prefetch):
    root, _ = csr_store
    shard = _shard_files(root / "X" / "data")[1]
    with open(shard, "r+b") as f:  # cut in half: the index at the end is gone
        f.truncate(shard.stat().st_size // 2)
    loader = _loader(batch_size=16, chunk_size=8, preload_nchunks=2, prefetch=prefetch)
    loader.add_dataset(zarr.open_group(root / "X", mode="r"))
    with pytest.raises(OSError, match="corrupt") as info:
        _consume(loader)
    assert str(shard.relative_to(root)) in str(info.value)
    assert _wait_no_threads() == []


def _cut_last_chunk(shard: Path, per_shard: int) -> int:
    """Drop the bytes of the shard's last stored chunk but keep a valid index; the chunk's size."""
    index = _shard_index(shard, per_shard)
    last = int(np.argmax(np.where(index[:, 0] == _MISSING, -1, index[:, 0].astype(np.int64))))
    offset, nbytes = (int(v) for v in index[last])
    content = shard.read_bytes()
    tail = content[-(16 * per_shard + 4) :]  # index and checksum, unchanged
    assert nbytes > len(tail), "the chunk must reach past the end of the shortened file"
    shard.write_bytes(content[:offset] + tail)
    return nbytes


@pytest.mark.parametrize("kind", ["raw", "blosc", "raw-cast"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_shard_missing_a_chunks_bytes(tmp_path, kind, prefetch):
    """A shard cut short with its index kept: the index points past the end of the file."""
    rng = np.random.default_rng(16)
    x = rng.standard_normal((80, 64)).astype(np.float32) if kind != "blosc" else rng.poisson(3, (80, 64))
    x = x.astype(np.float32)
    g = _write(tmp_path / "a.zarr", ad.AnnData(x))
    _direct(g["X"], compressed=kind == "blosc")
    shard = _shard_files(tmp_path / "a.zarr" / "X")[2]
    _cut_last_chunk(shard, _per_shard(g["X"]))
    datasets = [zarr.open_array(tmp_path / "a.zarr" / "X", mode="r")]
    if kind == "raw-cast":  # a float64 dataset besides: the float32 rows are read as spans
        datasets.append(rng.standard_normal((5, 64)))
    loader = _loader(batch_size=16, chunk_size=8, preload_nchunks=2, prefetch=prefetch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loader.add_datasets(datasets)
    with pytest.raises(OSError, match="[Ss]hort read") as info:
        _consume(loader)
    assert str(shard.relative_to(tmp_path)) in str(info.value)  # the message names the shard
    assert "rebuild" in str(info.value)
    assert _wait_no_threads() == []


# ---------------------------------------------------------------------------------------------------------
# carried rows: loads that are not a multiple of the batch size, over several epochs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [0, 2])
def test_carried_rows_csr(csr_coll, prefetch):
    coll, expected = csr_coll
    loader = coll.loader(7, 5, 3, seed=9, return_index=True, prefetch=prefetch)  # 15 rows per load
    orders = [_epoch(loader, expected, batch_size=7) for _ in range(2)]
    assert not np.array_equal(orders[0], orders[1]), "each epoch has its own order"


@pytest.mark.parametrize("key", ["X", "layers/counts", "obsm/raw", "obsm/counts"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_carried_rows_dense(dense_stores, key, prefetch):
    (g0, a0), (g1, a1) = dense_stores
    expected = np.concatenate([a0[key], a1[key]])
    loader = _loader(seed=10, prefetch=prefetch).add_datasets([g0[key], g1[key]])
    orders = [_epoch(loader, expected, batch_size=7) for _ in range(2)]
    assert not np.array_equal(orders[0], orders[1])


def test_carried_rows_with_many_loads_and_workers(csr_coll):
    """Worker shares (set through the sampler) hold every row once together, carried rows included."""
    coll, expected = csr_coll
    seen = []
    for worker in range(3):
        sampler = RandomSampler(7, 5, 3, seed=2)
        sampler.set_worker(worker, 3)
        loader = coll.loader(batch_sampler=sampler, return_index=True)
        for b in loader:
            rows = np.asarray(b["index"])
            np.testing.assert_array_equal(_dense(b["X"]), expected[rows])
            seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(len(expected)))


@pytest.fixture(scope="module")
def big_rows(tmp_path_factory) -> tuple[zarr.Array, np.ndarray]:
    """Rows of 2 KiB: a load of 640 rows (> 1 MiB) comes from the loader's recycled buffer pool."""
    x = np.random.default_rng(17).standard_normal((2600, 512)).astype(np.float32)
    g = _write(tmp_path_factory.mktemp("big") / "b.zarr", ad.AnnData(x), n_obs_per_chunk=16)
    _direct(g["X"], compressed=False)
    assert 640 * x[0].nbytes > 2**20 and len(x) > 3 * 640  # several loads from the pool
    return g["X"], x


def test_large_loads_consumed_as_they_come(big_rows):
    z, x = big_rows
    loader = _loader(batch_size=100, chunk_size=64, preload_nchunks=10, prefetch=0).add_dataset(z)
    for _ in range(2):
        _epoch(loader, x, batch_size=100)


def test_kept_batches_of_large_loads_stay_valid(big_rows):
    z, x = big_rows
    loader = _loader(batch_size=100, chunk_size=64, preload_nchunks=10, prefetch=0).add_dataset(z)
    batches = list(loader)  # keep every batch of the epoch, then check them
    rows = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(x)))
    bad = [i for i, b in enumerate(batches) if not np.array_equal(b["X"], x[b["index"]])]
    assert bad == []


def test_large_loads_with_prefetch_and_a_slow_consumer(big_rows):
    """Batches checked as they arrive, each after a short "training step", loads read ahead."""
    z, x = big_rows
    loader = _loader(batch_size=100, chunk_size=64, preload_nchunks=10, prefetch=2).add_dataset(z)
    bad = []
    for i, b in enumerate(loader):
        time.sleep(0.01)
        if not np.array_equal(b["X"], x[b["index"]]):
            bad.append(i)
    assert bad == []


# ---------------------------------------------------------------------------------------------------------
# RandomSampler: where the short last chunk goes
# ---------------------------------------------------------------------------------------------------------
def _read_chunks(sampler: RandomSampler, n_obs: int) -> list[tuple[int, int, int]]:
    """``(chunk id, rows, load)`` of every chunk one worker reads, in reading order."""
    cs = sampler.chunk_size
    chunks = []
    for load, request in enumerate(sampler.sample(n_obs)):
        for s in request["requests"]:  # a request slice is a run of whole chunks (the last may be short)
            assert s.start % cs == 0
            for a in range(s.start, s.stop, cs):
                chunks.append((a // cs, min(a + cs, s.stop) - a, load))
    return chunks


@pytest.mark.parametrize("num_workers", [1, 2, 3])
@pytest.mark.parametrize(("n_obs", "chunk_size"), [(103, 10), (97, 8), (61, 5), (45, 4)])
def test_short_last_chunk_is_read_last(num_workers, n_obs, chunk_size):
    n_chunks = -(-n_obs // chunk_size)
    last = n_chunks - 1
    assert n_obs % chunk_size, "the last chunk must be short"
    for seed in range(6):
        for epoch in (0, 1):
            per_worker = []
            for worker in range(num_workers):
                sampler = RandomSampler(4, chunk_size, 3, seed=seed)
                sampler.set_worker(worker, num_workers)
                sampler.set_epoch(epoch)
                per_worker.append(_read_chunks(sampler, n_obs))
            ids = np.array([c for chunks in per_worker for c, _, _ in chunks])
            np.testing.assert_array_equal(np.sort(ids), np.arange(n_chunks))  # every chunk once
            owners = [w for w, chunks in enumerate(per_worker) if last in [c for c, _, _ in chunks]]
            assert owners == [last % num_workers]
            chunks = per_worker[owners[0]]
            assert chunks[-1][:2] == (last, n_obs - last * chunk_size)  # read last, with its short length
            assert all(n == chunk_size for _, n, _ in chunks[:-1])
            # every load but the owner's last holds preload_nchunks full chunks
            loads = [ld for _, _, ld in chunks]
            assert all(loads.count(ld) == 3 for ld in set(loads) - {loads[-1]})


def test_short_last_chunk_goes_last_in_the_loader():
    """With chunk_size × preload_nchunks a multiple of batch_size, only the epoch's last batch is short."""
    x = np.arange(103 * 3, dtype=np.float32).reshape(103, 3)
    for seed in range(4):
        loader = _loader(batch_size=5, chunk_size=10, preload_nchunks=2, seed=seed).add_dataset(x)
        batches = list(loader)
        assert [len(b["index"]) for b in batches] == [5] * 20 + [3]
        # the short chunk is a load of its own, the epoch's last: no rows were carried before it
        np.testing.assert_array_equal(np.sort(batches[-1]["index"]), [100, 101, 102])


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_short_last_chunk_slot_varies_with_num_samples(num_workers):
    n_obs, chunk_size = 103, 10
    last = n_obs // chunk_size
    positions = set()
    owners = set()
    for seed in range(40):
        per_worker = []
        for worker in range(num_workers):
            sampler = RandomSampler(4, chunk_size, 3, seed=seed, num_samples=n_obs)
            sampler.set_worker(worker, num_workers)
            per_worker.append(_read_chunks(sampler, n_obs))
        ids = [c for chunks in per_worker for c, _, _ in chunks]
        assert sorted(ids) == list(range(last + 1))
        for w, chunks in enumerate(per_worker):
            where = [i for i, (c, _, _) in enumerate(chunks) if c == last]
            if where:
                owners.add(w)
                positions.add(where[0])
                # each worker's row count depends on sizes only, whatever slot the short chunk takes
                assert sum(n for _, n, _ in chunks) == len(range(w, last, num_workers)) * chunk_size + 3
            else:
                assert sum(n for _, n, _ in chunks) == len(range(w, last, num_workers)) * chunk_size
    assert owners == {last % num_workers}
    assert len(positions) >= 3, positions
    # and with fewer samples than rows, the short chunk is read in some epochs and not in others
    included = []
    for seed in range(40):
        sampler = RandomSampler(4, chunk_size, 3, seed=seed, num_samples=50)
        included.append(last in [c for c, _, _ in _read_chunks(sampler, n_obs)])
    assert any(included) and not all(included)


# ---------------------------------------------------------------------------------------------------------
# concurrent iterations of one loader each own their shard files
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterations_do_not_close_each_others_files(csr_coll, big_rows, prefetch):
    coll, expected = csr_coll
    z, x = big_rows
    for loader, values in (
        (coll.loader(7, 5, 3, seed=1, return_index=True, prefetch=prefetch), expected),
        (_loader(batch_size=100, chunk_size=64, preload_nchunks=10, prefetch=prefetch).add_dataset(z), x),
    ):
        first = iter(loader)
        head = [next(first) for _ in range(2)]
        _epoch(loader, values)  # a whole second iteration runs and closes its files in between
        rest = list(first)
        rows = np.concatenate([np.asarray(b["index"]) for b in head + rest])
        assert sorted(rows.tolist()) == list(range(len(values)))
        for b in head + rest:
            got = b["X"].toarray() if hasattr(b["X"], "toarray") else np.asarray(b["X"])
            np.testing.assert_array_equal(got, values[np.asarray(b["index"])])
