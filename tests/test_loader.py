"""Tests of :class:`annbatch.Loader`: coverage, alignment, determinism, output types, samplers, prefetch, errors.

Everything runs on real data: small zarr collections written with :meth:`annbatch.Collection.add_adatas`,
in-memory AnnData / numpy / scipy matrices and backed (h5py) AnnData. The reference for every check is
the source read independently: for a collection, ``anndata.read_zarr`` of every dataset concatenated in
collection order, so global row ``i`` of the loader is row ``i`` of that concatenation.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import annbatch
from annbatch.abc import Sampler
from annbatch.samplers import DistributedSampler, RandomSampler, SequentialSampler
from annbatch.synthetic import make_adata
from annbatch.testing import check_requests

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

try:
    import torch
except ImportError:  # the core is tested without torch too (CI's Python 3.12 leg)
    torch = None
TARGETS = [None, "torch"] if torch is not None else [None]
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")


PROPS = settings(max_examples=30, deadline=None)
OBS_COLUMNS = ["cell_type", "n_counts"]
N_VARS = 60
# Two inputs of different sizes, dealt into datasets of at most 250 rows: 3 datasets, uneven sizes.
INPUT_SIZES = (380, 270)
N_OBS = sum(INPUT_SIZES)


# ---------------------------------------------------------------------------------------------------------
# fixtures and reference data
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """What the loader should yield: global row ``i`` of X (as dense numpy) and of obs."""

    X: np.ndarray
    obs: pd.DataFrame
    sparse: bool
    sizes: tuple[int, ...] = ()

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]


def _inputs(dense: bool) -> list[ad.AnnData]:
    return [
        make_adata(n, N_VARS, seed=10 + i, dense=dense, obs_prefix=f"in{i}")
        for i, n in enumerate(INPUT_SIZES)
    ]


def _build_collection(path: Path, *, dense: bool, compressors="auto") -> annbatch.Collection:
    coll = annbatch.Collection(path).add_adatas(
        _inputs(dense),
        seed=0,
        dataset_size=250,
        shuffle_chunk_size=50,
        compressors=compressors,
        progress=False,
    )
    assert len(coll) >= 3, "the tests want several datasets"
    return coll


def _inner_codecs(arr_path: Path) -> list[str]:
    codecs = zarr.open_array(arr_path, mode="r").metadata.to_dict()["codecs"]
    assert codecs[0]["name"] == "sharding_indexed"
    return [c["name"] for c in codecs[0]["configuration"]["codecs"]]


def _read_source(coll: annbatch.Collection, root: Path) -> Source:
    """The collection read with plain anndata, datasets concatenated in order."""
    adatas = [ad.read_zarr(root / key) for key in coll.dataset_keys]
    sparse = sp.issparse(adatas[0].X)
    X = np.concatenate([a.X.toarray() if sparse else np.asarray(a.X) for a in adatas])
    obs = pd.concat([a.obs for a in adatas])
    return Source(X, obs, sparse, tuple(a.n_obs for a in adatas))


@pytest.fixture(scope="module")
def sparse_coll(tmp_path_factory) -> tuple[annbatch.Collection, Source]:
    root = tmp_path_factory.mktemp("sparse") / "c.zarr"
    coll = _build_collection(root, dense=False)
    assert _inner_codecs(root / "dataset_0" / "X" / "data") == ["bytes", "blosc"]
    return coll, _read_source(coll, root)


@pytest.fixture(scope="module")
def dense_coll(tmp_path_factory) -> tuple[annbatch.Collection, Source]:
    # uncompressed: rows are read by vectored reads straight into place (the compressed dense path
    # is covered by test_compressed_dense_collection)
    root = tmp_path_factory.mktemp("dense") / "c.zarr"
    coll = _build_collection(root, dense=True, compressors=None)
    assert _inner_codecs(root / "dataset_0" / "X") == ["bytes"]
    return coll, _read_source(coll, root)


@pytest.fixture(scope="module", params=["sparse", "dense"])
def coll(request, sparse_coll, dense_coll) -> tuple[annbatch.Collection, Source]:
    return sparse_coll if request.param == "sparse" else dense_coll


def _memory_source(adatas: list[ad.AnnData]) -> Source:
    sparse = sp.issparse(adatas[0].X)
    X = np.concatenate([a.X.toarray() if sparse else np.asarray(a.X) for a in adatas])
    return Source(X, pd.concat([a.obs for a in adatas]), sparse)


@pytest.fixture(scope="module", params=["sparse", "dense"])
def memory_adatas(request) -> list[ad.AnnData]:
    return [make_adata(n, N_VARS, seed=20 + n, dense=request.param == "dense") for n in (170, 95)]


@pytest.fixture(scope="module", params=["sparse", "dense"])
def backed_adata(request, tmp_path_factory) -> Iterator[ad.AnnData]:
    path = tmp_path_factory.mktemp("backed") / "a.h5ad"
    make_adata(230, N_VARS, seed=5, dense=request.param == "dense").write_h5ad(path)
    adata = ad.read_h5ad(path, backed="r")
    yield adata
    adata.file.close()


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def _dense(x) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        return (x.to_dense() if x.layout == torch.sparse_csr else x).numpy()
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _indices(batches: list[dict]) -> np.ndarray:
    return np.concatenate([np.asarray(b["index"]) for b in batches]) if batches else np.empty(0, np.int64)


def _sizes(batches: list[dict]) -> list[int]:
    return [b["X"].shape[0] for b in batches]


def check_epoch(
    loader: annbatch.Loader,
    src: Source,
    *,
    batch_size: int,
    drop_last: bool,
    obs_columns: list[str] | None = OBS_COLUMNS,
) -> list[dict]:
    """Run one epoch and check coverage, batch sizes and the alignment of X, index and obs with the source."""
    batches = list(loader)
    assert len(batches) == len(loader)
    sizes = _sizes(batches)
    assert all(s == batch_size for s in sizes[:-1]), sizes
    if sizes:
        assert 0 < sizes[-1] <= batch_size
        if drop_last:
            assert sizes[-1] == batch_size
    idx = _indices(batches)
    assert idx.dtype.kind == "i"
    assert len(np.unique(idx)) == len(idx), "a row appeared twice in one epoch"
    assert idx.min(initial=0) >= 0 and idx.max(initial=0) < src.n_obs
    if drop_last:
        assert src.n_obs - len(idx) < batch_size
    else:
        np.testing.assert_array_equal(np.sort(idx), np.arange(src.n_obs))
    for b in batches:
        rows = np.asarray(b["index"])
        assert len(rows) == b["X"].shape[0]
        assert sp.issparse(b["X"]) == src.sparse
        if src.sparse:
            assert b["X"].format == "csr"
        assert b["X"].dtype == src.X.dtype
        np.testing.assert_array_equal(_dense(b["X"]), src.X[rows])
        if obs_columns is None:
            continue
        obs = b["obs"]
        assert isinstance(obs, pd.DataFrame) and list(obs.columns) == obs_columns and len(obs) == len(rows)
        for col in obs_columns:
            expected = src.obs[col].to_numpy()[rows]
            got = obs[col].to_numpy()
            if isinstance(src.obs[col].dtype, pd.CategoricalDtype):
                assert isinstance(obs[col].dtype, pd.CategoricalDtype)
                got, expected = got.astype(str), expected.astype(str)
            np.testing.assert_array_equal(got, expected)
    return batches


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    return all(
        np.array_equal(x["index"], y["index"]) and np.array_equal(_dense(x["X"]), _dense(y["X"]))
        for x, y in zip(a, b, strict=True)
    )


@st.composite
def loader_params(draw, max_chunk: int = 64, max_batch: int = 160) -> dict:
    chunk_size = draw(st.integers(1, max_chunk))
    preload_nchunks = draw(st.integers(1, 8))
    # tiny batches make many batches; keep each example quick unless the load itself is tiny
    low = 1 if chunk_size * preload_nchunks <= 8 else min(8, chunk_size * preload_nchunks)
    batch_size = draw(st.integers(low, min(chunk_size * preload_nchunks, max_batch)))
    return {
        "chunk_size": chunk_size,
        "preload_nchunks": preload_nchunks,
        "batch_size": batch_size,
        "drop_last": draw(st.booleans()),
        "shuffle": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32)),
    }


def _prefetch_threads(prefix: str = "annbatch-") -> list[threading.Thread]:
    """Live background threads of loaders: the prefetcher (``annbatch-prefetch``) and read pools."""
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def _wait_no_prefetch_threads(timeout: float = 2.0) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return _prefetch_threads()


# ---------------------------------------------------------------------------------------------------------
# properties: coverage, batch sizes, alignment
# ---------------------------------------------------------------------------------------------------------
@PROPS
@given(p=loader_params())
def test_collection_epoch_properties(coll, p):
    collection, src = coll
    loader = collection.loader(**p, obs_columns=OBS_COLUMNS, return_index=True)
    assert loader.n_obs == src.n_obs == N_OBS and loader.n_var == N_VARS
    check_epoch(loader, src, batch_size=p["batch_size"], drop_last=p["drop_last"])


@settings(PROPS, max_examples=15)  # the same machinery as above, reached through use_collection
@given(p=loader_params())
def test_scverse_spelling_on_collection(sparse_coll, p):
    collection, src = sparse_coll
    loader = annbatch.Loader(**p, return_index=True, obs_columns=OBS_COLUMNS).use_collection(collection)
    check_epoch(loader, src, batch_size=p["batch_size"], drop_last=p["drop_last"])


@PROPS
@given(p=loader_params(max_chunk=32, max_batch=96))
def test_in_memory_adatas_properties(memory_adatas, p):
    src = _memory_source(memory_adatas)
    loader = annbatch.Loader(**p, return_index=True, obs_columns=OBS_COLUMNS).add_adatas(memory_adatas)
    check_epoch(loader, src, batch_size=p["batch_size"], drop_last=p["drop_last"])


@PROPS
@given(p=loader_params(max_chunk=32, max_batch=96))
def test_in_memory_numpy_dataset_properties(p):
    X = np.random.default_rng(0).normal(size=(203, 7)).astype(np.float32)
    loader = annbatch.Loader(**p, return_index=True).add_dataset(X)
    batches = check_epoch(
        loader,
        Source(X, pd.DataFrame(index=range(len(X))), False),
        batch_size=p["batch_size"],
        drop_last=p["drop_last"],
        obs_columns=None,
    )
    assert all(b["obs"] is None and b["var"] is None for b in batches)


@PROPS
@given(p=loader_params(max_chunk=32, max_batch=96))
def test_backed_adata_properties(backed_adata, p):
    src = _memory_source([backed_adata.to_memory()])
    loader = annbatch.Loader(**p, return_index=True, obs_columns=OBS_COLUMNS).add_adata(backed_adata)
    check_epoch(loader, src, batch_size=p["batch_size"], drop_last=p["drop_last"])


def test_adata_obs_defaults_to_all_columns_and_var(memory_adatas):
    adata = memory_adatas[0]
    loader = annbatch.Loader(batch_size=32, chunk_size=16, preload_nchunks=4, return_index=True).add_adata(
        adata
    )
    assert loader.var is adata.var and loader.n_obs == adata.n_obs and loader.n_var == N_VARS
    for b in loader:
        assert list(b["obs"].columns) == list(adata.obs.columns)
        np.testing.assert_array_equal(
            b["obs"]["barcode"].to_numpy(), adata.obs["barcode"].to_numpy()[b["index"]]
        )
        assert b["var"] is adata.var


def test_collection_var_and_no_obs_by_default(sparse_coll):
    collection, src = sparse_coll
    loader = collection.loader(batch_size=50, chunk_size=10, preload_nchunks=5, seed=0)
    pd.testing.assert_frame_equal(loader.var, collection.var)
    batches = list(loader)
    assert all(b["obs"] is None and b["index"] is None for b in batches)
    assert sum(_sizes(batches)) == src.n_obs
    # without the index, the rows are still a permutation of the source: compare row multisets
    got = np.concatenate([_dense(b["X"]) for b in batches])
    np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(src.X, axis=0))


def test_load_adata_path_of_use_collection(sparse_coll):
    collection, src = sparse_coll
    loader = annbatch.Loader(
        batch_size=40,
        chunk_size=8,
        preload_nchunks=5,
        shuffle=True,
        seed=1,
        return_index=True,
        obs_columns=OBS_COLUMNS,
    )
    loader.use_collection(collection, load_adata=ad.io.read_elem)
    check_epoch(loader, src, batch_size=40, drop_last=False)


def test_batches_stay_valid_after_later_loads(sparse_coll):
    """Batches kept by the consumer are not overwritten by later loads (no buffer reuse surprises)."""
    collection, src = sparse_coll
    for to in TARGETS:
        loader = collection.loader(
            batch_size=16, chunk_size=4, preload_nchunks=4, seed=2, return_index=True, to=to
        )
        kept = list(loader)  # every load has been read by now
        for b in kept:
            np.testing.assert_array_equal(_dense(b["X"]), src.X[np.asarray(b["index"])])


def test_fewer_rows_than_a_batch():
    X = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    for drop_last, expected in ((False, [5]), (True, [])):
        loader = annbatch.Loader(
            batch_size=8, chunk_size=4, preload_nchunks=2, shuffle=True, drop_last=drop_last
        )
        loader.add_dataset(X)
        batches = list(loader)
        assert len(loader) == len(batches) and _sizes(batches) == expected


def test_n_dimensional_dense_dataset_with_obs():
    X = np.arange(90 * 3 * 4, dtype=np.float64).reshape(90, 3, 4)
    obs = pd.DataFrame({"label": np.arange(90) % 7, "name": [f"r{i}" for i in range(90)]})
    loader = annbatch.Loader(
        batch_size=8, chunk_size=5, preload_nchunks=3, shuffle=True, seed=0, return_index=True
    )
    loader.add_dataset(X[:40], obs=obs.iloc[:40]).add_dataset(X[40:], obs=obs.iloc[40:])
    batches = check_epoch(
        loader, Source(X, obs, False), batch_size=8, drop_last=False, obs_columns=["label", "name"]
    )
    assert batches[0]["X"].shape[1:] == (3, 4)


def test_collection_obs_of_every_kind(sparse_coll):
    """String, boolean, categorical and numeric obs columns all stay aligned with X."""
    collection, src = sparse_coll
    columns = ["barcode", "is_doublet", "donor", "n_genes"]
    loader = collection.loader(
        batch_size=64, chunk_size=16, preload_nchunks=4, seed=0, return_index=True, obs_columns=columns
    )
    batches = check_epoch(loader, src, batch_size=64, drop_last=False, obs_columns=columns)
    assert batches[0]["obs"]["is_doublet"].dtype == bool


@pytest.mark.parametrize("to", TARGETS)
def test_obs_keys_and_batch_key_are_aligned_codes(coll, to):
    collection, src = coll
    loader = collection.loader(batch_size=40, chunk_size=8, preload_nchunks=5, seed=0, return_index=True, to=to,
                               obs_keys=["cell_type", "n_counts", "is_doublet"], batch_key="donor")  # fmt: skip
    cats = loader.categories
    assert set(cats) == {"cell_type", "donor"}
    for b in loader:
        rows = np.asarray(b["index"])
        obs = {k: np.asarray(v) for k, v in b["obs"].items()}
        if to == "torch":
            assert all(isinstance(v, torch.Tensor) for v in b["obs"].values()) and isinstance(
                b["batch"], torch.Tensor
            )
        assert obs["cell_type"].dtype == np.int64 and np.asarray(b["batch"]).dtype == np.int64
        np.testing.assert_array_equal(
            cats["cell_type"][obs["cell_type"]], src.obs["cell_type"].to_numpy()[rows]
        )
        np.testing.assert_array_equal(
            cats["donor"][np.asarray(b["batch"])], src.obs["donor"].to_numpy()[rows]
        )
        np.testing.assert_array_equal(obs["n_counts"], src.obs["n_counts"].to_numpy()[rows])
        np.testing.assert_array_equal(obs["is_doublet"], src.obs["is_doublet"].to_numpy()[rows])


def test_obs_keys_union_of_categories_in_memory():
    X = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    first = pd.DataFrame({"kind": pd.Categorical(["a", "b", "a", "b", "a"])})
    second = pd.DataFrame({"kind": pd.Categorical(["c", "b", "c", "c", "b"], categories=["c", "b"])})
    loader = annbatch.Loader(batch_size=3, chunk_size=2, preload_nchunks=2, shuffle=True, seed=0, return_index=True,
                             obs_keys=["kind"]).add_datasets([X[:5], X[5:]], obs=[first, second])  # fmt: skip
    labels = np.concatenate([first["kind"].to_numpy(), second["kind"].to_numpy()])
    seen = []
    for b in loader:
        np.testing.assert_array_equal(loader.categories["kind"][b["obs"]["kind"]], labels[b["index"]])
        seen.append(b["index"])
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(10))
    # a plain-string column is coded like a categorical (labels: sorted distinct values)
    names = [f"r{i}" for i in range(10)]
    strings = annbatch.Loader(obs_keys=["name"], batch_size=10).add_dataset(X, obs=pd.DataFrame({"name": names}))
    assert list(strings.categories["name"]) == sorted(names)
    batch = next(iter(strings))
    assert list(strings.categories["name"][batch["obs"]["name"]]) == names
    with pytest.raises(ValueError, match="not both"):
        annbatch.Loader(obs_keys=["kind"], obs_columns=["kind"])


def test_empty_datasets_between_others():
    X = np.arange(17 * 3, dtype=np.float32).reshape(17, 3)
    for data in (X, sp.csr_matrix(X)):
        loader = annbatch.Loader(
            batch_size=4, chunk_size=3, preload_nchunks=2, shuffle=True, seed=0, return_index=True
        )
        loader.add_datasets([data[:0], data[:10], data[:0], data[10:]])
        check_epoch(
            loader,
            Source(X, pd.DataFrame(index=range(17)), sp.issparse(data)),
            batch_size=4,
            drop_last=False,
            obs_columns=None,
        )


@pytest.fixture(scope="module")
def zarr_adata(tmp_path_factory) -> tuple[Path, ad.AnnData]:
    path = tmp_path_factory.mktemp("zarr_adata") / "a.zarr"
    adata = make_adata(150, 30, seed=3)
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        adata.write_zarr(path)
    return path, adata


@pytest.mark.parametrize("how", ["group", "sparse_dataset", "read_zarr"])
def test_plain_zarr_anndata(zarr_adata, how):
    path, adata = zarr_adata
    group = zarr.open_group(path, mode="r")
    loader = annbatch.Loader(
        batch_size=16, chunk_size=4, preload_nchunks=4, shuffle=True, seed=0, return_index=True
    )
    if how == "group":
        loader.add_dataset(group["X"], obs=adata.obs)
    elif how == "sparse_dataset":
        loader.add_dataset(ad.io.sparse_dataset(group["X"]), obs=adata.obs)
    else:  # dense X written by anndata to zarr, read as a zarr array
        dense_path = path.with_name("dense.zarr")
        if not dense_path.exists():
            with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
                ad.AnnData(adata.X.toarray(), obs=adata.obs).write_zarr(dense_path)
        loader.add_dataset(zarr.open_group(dense_path, mode="r")["X"], obs=adata.obs)
    src = Source(adata.X.toarray(), adata.obs, how != "read_zarr")
    check_epoch(loader, src, batch_size=16, drop_last=False, obs_columns=list(adata.obs.columns))


def test_h5py_dense_dataset(tmp_path):
    X = np.random.default_rng(0).normal(size=(45, 4))
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"] = X
    with h5py.File(tmp_path / "d.h5", "r") as f:
        loader = annbatch.Loader(
            batch_size=8, chunk_size=3, preload_nchunks=3, shuffle=True, seed=0, return_index=True
        )
        loader.add_dataset(f["x"])
        check_epoch(
            loader,
            Source(X, pd.DataFrame(index=range(45)), False),
            batch_size=8,
            drop_last=False,
            obs_columns=None,
        )


@pytest.mark.parametrize(
    ("batch_size", "chunk_size", "preload_nchunks", "shuffle"),
    [(7, 3, 5, True), (64, 16, 4, True), (50, 25, 2, False)],
)
def test_compressed_dense_collection(tmp_path_factory, batch_size, chunk_size, preload_nchunks, shuffle):
    root = tmp_path_factory.getbasetemp() / "dense_blosc" / "c.zarr"
    if not root.exists():
        _build_collection(root, dense=True, compressors="auto")
    collection = annbatch.Collection(root, mode="r")
    assert _inner_codecs(root / "dataset_0" / "X") == ["bytes", "blosc"]
    src = _read_source(collection, root)
    loader = collection.loader(
        batch_size,
        chunk_size,
        preload_nchunks,
        shuffle=shuffle,
        seed=0,
        return_index=True,
        obs_columns=OBS_COLUMNS,
    )
    check_epoch(loader, src, batch_size=batch_size, drop_last=False)


# ---------------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------------
def _loader(coll, seed=0, **kw):
    kw = {"batch_size": 24, "chunk_size": 8, "preload_nchunks": 4, "return_index": True, **kw}
    return coll.loader(seed=seed, **kw)


def test_same_seed_same_batches(coll):
    collection, _ = coll
    a, b = list(_loader(collection, seed=7)), list(_loader(collection, seed=7))
    assert _same_batches(a, b)
    assert not _same_batches(a, list(_loader(collection, seed=8)))


def test_epochs_differ_and_rebuilt_loader_replays_them(sparse_coll):
    collection, src = sparse_coll
    loader = _loader(collection, seed=3)
    e0, e1 = list(loader), list(loader)
    assert not _same_batches(e0, e1)
    for epoch in (e0, e1):  # each epoch covers everything once
        np.testing.assert_array_equal(np.sort(_indices(epoch)), np.arange(src.n_obs))
    again = _loader(collection, seed=3)
    assert _same_batches(list(again), e0)
    assert _same_batches(list(again), e1)
    # set_epoch jumps straight to an epoch
    jumped = _loader(collection, seed=3)
    jumped.set_epoch(1)
    assert _same_batches(list(jumped), e1)


def test_rng_argument_is_deterministic(sparse_coll):
    collection, _ = sparse_coll
    a = list(_loader(collection, seed=None, rng=np.random.default_rng(11)))
    b = list(_loader(collection, seed=None, rng=np.random.default_rng(11)))
    assert _same_batches(a, b)


@needs_torch
def test_global_random_state_is_neither_used_nor_changed(sparse_coll):
    collection, _ = sparse_coll
    runs = []
    for global_seed in (0, 1):
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
        runs.append(list(_loader(collection, seed=5, to="torch")))
        np.testing.assert_array_equal(np.random.get_state()[1], state)
        assert torch.equal(torch.get_rng_state(), torch_state)
    assert _same_batches(*runs)


def test_unshuffled_loader_is_in_order(sparse_coll):
    collection, src = sparse_coll
    loader = _loader(collection, shuffle=False)
    np.testing.assert_array_equal(_indices(list(loader)), np.arange(src.n_obs))


# ---------------------------------------------------------------------------------------------------------
# output types
# ---------------------------------------------------------------------------------------------------------
@needs_torch
def test_to_torch_dense(dense_coll):
    collection, src = dense_coll
    loader = _loader(collection, to="torch")
    batches = list(loader)
    assert len(batches) == len(loader)
    for b in batches:
        assert isinstance(b["X"], torch.Tensor) and b["X"].layout == torch.strided
        assert b["X"].dtype == torch.float32 and b["X"].shape == (len(b["index"]), N_VARS)
        np.testing.assert_array_equal(b["X"].numpy(), src.X[np.asarray(b["index"])])


@needs_torch
def test_to_torch_sparse(sparse_coll):
    collection, src = sparse_coll
    loader = _loader(collection, to="torch", drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader)
    for b in batches:
        x = b["X"]
        assert isinstance(x, torch.Tensor) and x.layout == torch.sparse_csr
        assert x.crow_indices().dtype == x.col_indices().dtype
        assert x.shape == (24, N_VARS)
        np.testing.assert_array_equal(x.to_dense().numpy(), src.X[np.asarray(b["index"])])


@needs_torch
def test_to_torch_from_memory_does_not_alias_the_source():
    X = np.arange(60 * 5, dtype=np.float32).reshape(60, 5)
    original = X.copy()
    loader = annbatch.Loader(batch_size=10, chunk_size=10, preload_nchunks=2, return_index=True, to="torch")
    loader.add_dataset(X)
    for b in loader:
        np.testing.assert_array_equal(b["X"].numpy(), original[b["index"]])
        b["X"].mul_(-1)  # a consumer writing into its batch must not change the data
    np.testing.assert_array_equal(X, original)


@needs_torch
def test_to_torch_sparse_batch_without_values():
    empty = sp.csr_matrix((20, 5), dtype=np.float32)
    loader = annbatch.Loader(batch_size=4, chunk_size=4, preload_nchunks=1, to="torch").add_dataset(empty)
    for b in loader:
        assert b["X"].layout == torch.sparse_csr and b["X"].shape == (4, 5)
        assert not b["X"].to_dense().any()


def test_to_numpy_is_default():
    X = np.ones((20, 3), dtype=np.float32)
    batch = next(
        iter(annbatch.Loader(batch_size=5, chunk_size=5, preload_nchunks=1, to="numpy").add_dataset(X))
    )
    assert type(batch["X"]) is np.ndarray


# ---------------------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------------------
def test_sequential_sampler_yields_rows_in_order(coll):
    collection, src = coll
    loader = collection.loader(
        batch_sampler=SequentialSampler(24, 8, 3), return_index=True, obs_columns=OBS_COLUMNS
    )
    assert isinstance(loader.batch_sampler, SequentialSampler)
    batches = check_epoch(loader, src, batch_size=24, drop_last=False)
    np.testing.assert_array_equal(_indices(batches), np.arange(src.n_obs))


class FixedSlices(Sampler):
    """Loads fixed row ranges (or explicit rows) one at a time; each is one batch, reversed."""

    def __init__(self, requests: list[slice | np.ndarray]):
        self._requests = requests

    @property
    def batch_size(self) -> None:
        return None

    def _n_rows(self, req) -> int:
        return req.stop - req.start if isinstance(req, slice) else len(req)

    def sample(self, n_obs: int):
        for req in self._requests[self._worker_id :: self._num_workers]:
            n = self._n_rows(req)
            yield {
                "requests": [req] if isinstance(req, slice) else req,
                "splits": [np.arange(n, dtype=np.int64)[::-1].copy()],
            }

    def n_batches(self, n_obs: int) -> int:
        return len(self._requests[self._worker_id :: self._num_workers])


def test_custom_sampler(coll):
    collection, src = coll
    first = src.sizes[0]
    requests = [
        slice(0, 10),
        slice(first - 3, first + 4),  # crosses a dataset boundary
        slice(N_OBS - 5, N_OBS),
        np.array([N_OBS - 1, 3, 4, 5, first, 2], dtype=np.int64),  # explicit rows, unsorted
    ]
    loader = collection.loader(batch_sampler=FixedSlices(requests), return_index=True, obs_columns=OBS_COLUMNS)
    assert loader.batch_size is None and len(loader) == len(requests)
    batches = list(loader)
    assert len(batches) == len(requests)
    for req, b in zip(requests, batches, strict=True):
        rows = (np.arange(req.start, req.stop) if isinstance(req, slice) else req)[::-1]
        np.testing.assert_array_equal(b["index"], rows)
        np.testing.assert_array_equal(_dense(b["X"]), src.X[rows])
        np.testing.assert_array_equal(b["obs"]["n_counts"].to_numpy(), src.obs["n_counts"].to_numpy()[rows])


@pytest.mark.parametrize("equal_batches", [False, True])
def test_distributed_sampler_ranks(sparse_coll, equal_batches):
    collection, src = sparse_coll
    world = 3
    per_rank = []
    for rank in range(world):
        sampler = DistributedSampler(
            RandomSampler(20, 8, 4, seed=9), rank=rank, world_size=world, equal_batches=equal_batches
        )
        loader = collection.loader(batch_sampler=sampler, return_index=True)
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            np.testing.assert_array_equal(_dense(b["X"]), src.X[b["index"]])
        per_rank.append(batches)
    rows = [_indices(b) for b in per_rank]
    everything = np.concatenate(rows)
    assert len(np.unique(everything)) == len(everything), "ranks overlap"
    if equal_batches:
        assert len({len(b) for b in per_rank}) == 1
        assert len(everything) > src.n_obs - world * (20 + 8 * 4)  # at most about a load per rank
    else:
        np.testing.assert_array_equal(np.sort(everything), np.arange(src.n_obs))


def test_masked_and_replacement_samplers(sparse_coll):
    collection, src = sparse_coll
    loader = collection.loader(
        batch_sampler=RandomSampler(10, 4, 3, mask=slice(100, 333), seed=0), return_index=True
    )
    idx = _indices(list(loader))
    np.testing.assert_array_equal(np.sort(idx), np.arange(100, 333))
    loader = collection.loader(
        batch_sampler=RandomSampler(10, 4, 3, replacement=True, num_samples=75, seed=0), return_index=True
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 8 and sum(_sizes(batches)) == 75
    for b in batches:
        np.testing.assert_array_equal(_dense(b["X"]), src.X[b["index"]])


def test_sampler_mask_out_of_range_is_refused_when_data_is_added(sparse_coll):
    collection, _ = sparse_coll
    with pytest.raises(ValueError, match="mask"):
        collection.loader(batch_sampler=RandomSampler(10, 4, 3, mask=slice(0, N_OBS + 1), seed=0))
    with pytest.raises(ValueError, match="mask"):
        annbatch.Loader(batch_sampler=RandomSampler(2, 2, 1, mask=slice(5, 30))).add_dataset(
            np.zeros((20, 2))
        )


class ExplicitLoads(Sampler):
    """Yields the given load requests as they are."""

    def __init__(self, requests: list[dict]):
        self._requests = requests

    @property
    def batch_size(self) -> None:
        return None

    def sample(self, n_obs: int):
        yield from self._requests

    def n_batches(self, n_obs: int) -> int:
        return sum(len(r["splits"]) for r in self._requests)


def test_custom_requests_with_unused_rows_and_carry(coll):
    """Splits may leave loaded rows unused, and carry rows into the next load."""
    collection, src = coll
    requests = [
        {"requests": [slice(5, 25), slice(300, 310)], "splits": [np.array([29, 0, 7]), np.array([3])],
         "carry": np.array([28, 10, 11])},
        {"requests": np.array([640, 2, 1, 0]), "splits": [np.array([0, 3, 6]), np.array([1, 2, 4, 5])]},
    ]  # fmt: skip
    loader = collection.loader(batch_sampler=ExplicitLoads(requests), return_index=True, obs_columns=OBS_COLUMNS)
    batches = list(loader)
    expected = check_requests(requests, src.n_obs)
    assert len(batches) == len(expected) == len(loader)
    for b, rows in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(b["index"], rows)
        np.testing.assert_array_equal(_dense(b["X"]), src.X[rows])
        np.testing.assert_array_equal(b["obs"]["n_counts"].to_numpy(), src.obs["n_counts"].to_numpy()[rows])


@pytest.mark.parametrize("source", ["collection", "numpy"])
def test_custom_split_may_repeat_a_row(coll, source):
    collection, src = coll
    requests = [{"requests": [slice(0, 4)], "splits": [np.array([0, 1, 1, 2, 3, 3])]}]
    if source == "collection":
        loader = collection.loader(batch_sampler=ExplicitLoads(requests), return_index=True)
    else:
        loader = annbatch.Loader(batch_sampler=ExplicitLoads(requests), return_index=True).add_dataset(src.X)
    (batch,) = list(loader)
    np.testing.assert_array_equal(batch["index"], [0, 1, 1, 2, 3, 3])
    np.testing.assert_array_equal(_dense(batch["X"]), src.X[[0, 1, 1, 2, 3, 3]])


def test_custom_request_out_of_range_raises(sparse_coll):
    collection, _ = sparse_coll
    requests = [{"requests": [slice(N_OBS - 2, N_OBS + 3)], "splits": [np.arange(5)]}]
    with pytest.raises(IndexError):
        list(collection.loader(batch_sampler=ExplicitLoads(requests)))
    assert _wait_no_prefetch_threads() == []


# ---------------------------------------------------------------------------------------------------------
# prefetch
# ---------------------------------------------------------------------------------------------------------
def test_prefetch_depth_does_not_change_batches(coll):
    collection, _ = coll
    runs = [list(_loader(collection, seed=4, prefetch=depth, obs_columns=OBS_COLUMNS)) for depth in (0, 1, 3)]
    assert _same_batches(runs[0], runs[1]) and _same_batches(runs[0], runs[2])
    for a, b in zip(runs[0], runs[2], strict=True):
        pd.testing.assert_frame_equal(a["obs"], b["obs"])


def test_prefetch_zero_runs_no_thread(sparse_coll):
    collection, _ = sparse_coll
    assert _wait_no_prefetch_threads() == []
    it = iter(_loader(collection, prefetch=0))
    next(it)
    try:
        assert _prefetch_threads("annbatch-prefetch") == []
    finally:
        it.close()
    assert _wait_no_prefetch_threads() == []


def test_breaking_early_stops_the_prefetch_thread(sparse_coll):
    collection, _ = sparse_coll
    assert _wait_no_prefetch_threads() == []
    loader = _loader(collection, batch_size=4, chunk_size=2, preload_nchunks=2, prefetch=2)
    for i, _batch in enumerate(loader):
        if i == 0:
            assert len(_prefetch_threads("annbatch-prefetch")) == 1
        if i == 3:
            break
    assert _wait_no_prefetch_threads() == []
    # an iterator dropped half-way stops its thread as well
    it = iter(loader)
    next(it)
    del it
    assert _wait_no_prefetch_threads() == []


def test_consumer_exception_stops_the_prefetch_thread(sparse_coll):
    collection, _ = sparse_coll
    with pytest.raises(ZeroDivisionError):
        for _batch in _loader(collection, batch_size=4, chunk_size=2, preload_nchunks=2):
            1 / 0  # noqa: B018
    assert _wait_no_prefetch_threads() == []


class FailingSampler(Sampler):
    """Yields two good loads, then raises."""

    batch_size = 4

    def sample(self, n_obs: int):
        yield {"requests": [slice(0, 4)], "splits": [np.arange(4)]}
        yield {"requests": [slice(4, 8)], "splits": [np.arange(4)]}
        raise RuntimeError("sampler broke")

    def n_batches(self, n_obs: int) -> int:
        return 3


@pytest.mark.parametrize("prefetch", [0, 2])
def test_exception_in_producer_reaches_consumer(sparse_coll, prefetch):
    collection, _ = sparse_coll
    loader = collection.loader(batch_sampler=FailingSampler(), prefetch=prefetch)
    got = []
    with pytest.raises(RuntimeError, match="sampler broke"):
        for b in loader:
            got.append(b)
    assert len(got) == 2
    assert _wait_no_prefetch_threads() == []


class CountingSampler(Sampler):
    """Sequential loads of ``rows`` rows (one batch each) that counts how many loads were requested."""

    def __init__(self, n_loads: int, rows: int):
        self.n_loads, self.rows = n_loads, rows
        self.log: list[int] = []  # shared with the shallow copy the loader iterates

    @property
    def batch_size(self) -> int:
        return self.rows

    def sample(self, n_obs: int):
        for k in range(self.n_loads):
            self.log.append(k)
            yield {"requests": [slice(k * self.rows, (k + 1) * self.rows)], "splits": [np.arange(self.rows)]}

    def n_batches(self, n_obs: int) -> int:
        return self.n_loads


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_is_bounded(depth):
    """A slow consumer does not let the background thread read more than ``depth`` loads ahead."""
    X = np.arange(200 * 4, dtype=np.float32).reshape(200, 4)
    sampler = CountingSampler(n_loads=20, rows=10)
    loader = annbatch.Loader(batch_sampler=sampler, prefetch=depth, return_index=True).add_dataset(X)
    it = iter(loader)
    for consumed in range(1, 4):
        next(it)
        time.sleep(0.2)  # plenty of time for an unbounded producer to read everything
        # the consumed loads, ``depth`` waiting in the queue, one waiting to be queued and one being read
        assert consumed <= len(sampler.log) <= consumed + depth + 2
    it.close()
    assert _wait_no_prefetch_threads() == []


@pytest.fixture
def coll_copy(sparse_coll, tmp_path) -> tuple[annbatch.Collection, Path]:
    src_root = sparse_coll[0].group.store.root
    root = tmp_path / "copy.zarr"
    shutil.copytree(src_root, root)
    return annbatch.Collection(root, mode="r"), root


def _shards(root: Path, dataset: str) -> list[Path]:
    return sorted(
        p for p in (root / dataset / "X" / "data").rglob("*") if p.is_file() and p.name != "zarr.json"
    )


def test_corrupt_shard_index_raises(coll_copy):
    collection, root = coll_copy
    for shard in _shards(root, "dataset_1"):
        size = shard.stat().st_size
        with open(shard, "r+b") as f:  # the last index entry (16 bytes before the 4-byte checksum)
            f.seek(size - 4 - 16)
            f.write(b"\xff" * 16)
        with pytest.raises((ValueError, RuntimeError), match="checksum"):  # zarr (or zarrs) says so too
            zarr.open_array(shard.parent.parent, mode="r")[...]
    loader = collection.loader(batch_size=N_OBS, chunk_size=N_OBS, preload_nchunks=1, shuffle=False)
    with pytest.raises(Exception):  # noqa: B017
        list(loader)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_loaders_do_not_leak_file_descriptors(sparse_coll):
    collection, _ = sparse_coll
    list(collection.loader(batch_size=50, chunk_size=10, preload_nchunks=5, seed=0))  # warm up imports, pools
    gc.collect()
    before = _open_fds()
    for seed in range(8):
        list(collection.loader(batch_size=50, chunk_size=10, preload_nchunks=5, seed=seed))
    gc.collect()
    assert _open_fds() - before < 5


def test_corrupt_shard_raises_in_consumer_and_stops_thread(coll_copy):
    collection, root = coll_copy
    loader = collection.loader(batch_size=16, chunk_size=8, preload_nchunks=2, seed=0, prefetch=2)
    for shard in _shards(root, "dataset_1"):
        size = shard.stat().st_size
        with open(shard, "r+b") as f:  # garbage in the middle of the shard: blosc cannot decode it
            f.seek(size // 4)
            f.write(b"\xff" * max(16, size // 2))
    with pytest.raises(Exception):  # noqa: B017 - zarr / the codec decide the type
        for _batch in loader:
            pass
    assert _wait_no_prefetch_threads() == []


def test_deleted_shard_raises_in_consumer(coll_copy):
    collection, root = coll_copy
    loader = collection.loader(batch_size=16, chunk_size=8, preload_nchunks=2, seed=0, prefetch=2)
    for shard in _shards(root, "dataset_1"):
        os.remove(shard)
    try:
        with pytest.raises(Exception):  # noqa: B017
            for _batch in loader:
                pass
    finally:
        assert _wait_no_prefetch_threads() == []


# ---------------------------------------------------------------------------------------------------------
# bad input: clear errors at construction / adding, before any I/O
# ---------------------------------------------------------------------------------------------------------
def test_batch_size_larger_than_a_load(sparse_coll):
    collection, _ = sparse_coll
    with pytest.raises(ValueError, match="preload_nchunks"):
        collection.loader(batch_size=65, chunk_size=8, preload_nchunks=8)
    with pytest.raises(ValueError, match="preload_nchunks"):
        annbatch.Loader(batch_size=65, chunk_size=8, preload_nchunks=8)


@pytest.mark.parametrize("name", ["batch_size", "chunk_size", "preload_nchunks"])
@pytest.mark.parametrize("value", [0, -1])
def test_sizes_below_one(name, value):
    kw = {"batch_size": 1, "chunk_size": 1, "preload_nchunks": 1, name: value}
    with pytest.raises(ValueError, match=name):
        annbatch.Loader(**kw)


def test_other_bad_constructor_arguments():
    with pytest.raises(ValueError, match="prefetch"):
        annbatch.Loader(prefetch=-1)
    with pytest.raises(TypeError, match="batch_sampler"):
        annbatch.Loader(batch_sampler=object())
    with pytest.raises(ValueError, match="seed"):
        annbatch.Loader(seed=1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="bogus"):
        annbatch.Loader(to="bogus")


def test_to_bogus_on_collection(sparse_coll):
    with pytest.raises(ValueError, match="bogus"):
        sparse_coll[0].loader(to="bogus")


def test_mixing_sparse_and_dense():
    csr = sp.random(10, 5, density=0.3, format="csr", dtype=np.float32, random_state=0)
    with pytest.raises(ValueError, match="mix"):
        annbatch.Loader().add_dataset(csr).add_dataset(np.zeros((10, 5), np.float32))
    with pytest.raises(ValueError, match="mix"):
        annbatch.Loader().add_datasets([np.zeros((10, 5), np.float32), csr])


def test_different_n_vars():
    with pytest.raises(ValueError, match="variables"):
        annbatch.Loader().add_datasets([np.zeros((10, 5)), np.zeros((10, 6))])
    a, b = make_adata(20, 10, seed=0), make_adata(20, 12, seed=0)
    with pytest.raises(ValueError, match="variables"):
        annbatch.Loader().add_adata(a).add_adata(b)


def _two_var_spaces() -> tuple[ad.AnnData, ad.AnnData]:
    return make_adata(20, 10, seed=0), make_adata(20, 10, seed=1, var_names=[f"other_{i}" for i in range(10)])


def test_different_var_names_in_separate_calls():
    a, b = _two_var_spaces()
    with pytest.raises(ValueError, match="var"):
        annbatch.Loader().add_adata(a).add_adata(b)


def test_different_var_names_in_one_call():
    a, b = _two_var_spaces()
    with pytest.raises(ValueError, match="var"):
        annbatch.Loader().add_adatas([a, b])


def test_obs_length_mismatch():
    with pytest.raises(ValueError, match="obs"):
        annbatch.Loader().add_dataset(np.zeros((10, 3)), obs=pd.DataFrame(index=range(9)))


def test_empty_collection(tmp_path):
    empty = annbatch.Collection(tmp_path / "e.zarr")
    with pytest.raises(ValueError, match="empty"):
        empty.loader()
    with pytest.raises(ValueError, match="empty"):
        annbatch.Loader().use_collection(empty)


def test_loader_without_data():
    loader = annbatch.Loader(batch_size=2, chunk_size=2, preload_nchunks=1)
    assert loader.n_obs == 0 and loader.n_var == 0
    with pytest.raises(ValueError, match="no data"):
        iter(loader).__next__()
    with pytest.raises(ValueError, match="no data"):
        len(loader)


def test_second_collection_is_refused(sparse_coll):
    collection, _ = sparse_coll
    loader = collection.loader(batch_size=8, chunk_size=8, preload_nchunks=1)
    with pytest.raises(ValueError, match="already"):
        loader.use_collection(collection)


def test_missing_obs_column_at_construction(sparse_coll, memory_adatas):
    collection, _ = sparse_coll
    with pytest.raises(KeyError, match="nope"):
        collection.loader(batch_size=8, chunk_size=8, preload_nchunks=1, obs_columns=["nope"])
    with pytest.raises(KeyError, match="nope"):
        annbatch.Loader(obs_columns=["cell_type", "nope"]).add_adatas(memory_adatas)
    with pytest.raises(KeyError, match="nope"):
        annbatch.Loader(obs_columns=["nope"]).add_dataset(
            np.zeros((3, 2)), obs=pd.DataFrame({"a": [1, 2, 3]})
        )


def test_obs_columns_without_obs():
    with pytest.raises(ValueError, match="obs"):
        annbatch.Loader(obs_columns=["a"]).add_dataset(np.zeros((3, 2)))


def test_csc_matrix_is_refused(tmp_path):
    csc = sp.random(10, 5, density=0.3, format="csc", dtype=np.float32, random_state=0)
    with pytest.raises(ValueError, match="CSC"):
        annbatch.Loader().add_dataset(csc)
    adata = ad.AnnData(csc)
    with pytest.raises(ValueError, match="CSC"):
        annbatch.Loader().add_adata(adata)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    backed = ad.read_h5ad(tmp_path / "csc.h5ad", backed="r")
    try:
        with pytest.raises(ValueError, match="CSC"):
            annbatch.Loader().add_adata(backed)
    finally:
        backed.file.close()


def test_unsupported_type_is_refused():
    with pytest.raises(ValueError, match="list"):
        annbatch.Loader().add_dataset([[1.0, 2.0]])


# ---------------------------------------------------------------------------------------------------------
# dtype promotion
# ---------------------------------------------------------------------------------------------------------
def _promotion_sources(kind: str, tmp_path: Path) -> tuple[list, np.ndarray]:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, size=(37, 6)).astype(np.float32)
    b = rng.integers(0, 5, size=(41, 6)).astype(np.float64)
    b[:, 0] = 1 / 3  # not exact in float32: a float32 result would differ
    expected = np.concatenate([a.astype(np.float64), b])
    if kind == "csr":
        return [sp.csr_matrix(a), sp.csr_matrix(b)], expected
    if kind == "collection":  # float32 CSR read by the direct shard reader, promoted while placed
        coll = annbatch.Collection(tmp_path / "p.zarr").add_adatas(
            [ad.AnnData(sp.csr_matrix(a))], shuffle=False, progress=False
        )
        group = zarr.open_group(tmp_path / "p.zarr" / coll.dataset_keys[0] / "X", mode="r")
        return [group, sp.csr_matrix(b)], expected
    if kind == "zarr":
        z = zarr.create_array(tmp_path / "a.zarr", shape=a.shape, chunks=(8, 6), dtype=a.dtype)
        z[...] = a
        return [zarr.open_array(tmp_path / "a.zarr", mode="r"), b], expected
    return [a, b], expected


@pytest.mark.parametrize("kind", ["numpy", "csr", "zarr", "collection"])
def test_dtype_promotion(kind, tmp_path):
    datasets, expected = _promotion_sources(kind, tmp_path)
    loader = annbatch.Loader(
        batch_size=10, chunk_size=5, preload_nchunks=3, shuffle=True, seed=0, return_index=True
    )
    with pytest.warns(UserWarning, match="float64"):
        loader.add_datasets(datasets)
    batches = list(loader)
    assert all(b["X"].dtype == np.float64 for b in batches)
    idx = _indices(batches)
    np.testing.assert_array_equal(np.sort(idx), np.arange(len(expected)))
    for b in batches:
        np.testing.assert_array_equal(_dense(b["X"]), expected[b["index"]])


def test_same_dtype_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        annbatch.Loader().add_datasets([np.zeros((3, 2), np.float32), np.ones((4, 2), np.float32)])
