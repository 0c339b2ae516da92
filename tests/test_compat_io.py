"""I/O code written for the scverse ``annbatch`` 0.3 API runs unchanged.

Collections are opened, converted into and edited the way such code does (``DatasetCollection(group=...)``,
``add_adatas(adata_paths=..., zarr_compressor=..., h5ad_compressor=...)``, editing the groups a collection
yields), and loaders are fed the way it does (``to_torch``, ``add_dataset(..., var=...)``,
``dataset_type``). Every result is checked against the source AnnData, rows matched by obs names.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec

import annbatch
from annbatch import CollectionError, DatasetCollection
from annbatch.synthetic import make_adata

N_VARS = 40
BLOSC = (BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"),)
QUIET = {"progress": False}


# -- helpers -----------------------------------------------------------------------------------------------
def _dense(x) -> np.ndarray:
    """A batch's or AnnData's X as a float64 dense array (stored CSR indices may be uint8/uint16)."""
    if sp.issparse(x):
        x = sp.csr_matrix((np.asarray(x.data), np.asarray(x.indices, dtype=np.int64),
                           np.asarray(x.indptr, dtype=np.int64)), shape=x.shape)  # fmt: skip
        return x.toarray()
    if hasattr(x, "numpy"):  # a torch tensor
        return (x.to_dense() if x.layout != _torch().strided else x).numpy()
    return np.asarray(x)


def _torch():
    import torch

    return torch


def _sources(dense: bool) -> list[ad.AnnData]:
    return [
        make_adata(n, N_VARS, seed=30 + i, dense=dense, obs_prefix=f"src{i}_")
        for i, n in enumerate((180, 230))
    ]


def _write_inputs(tmp_path: Path, sources: list[ad.AnnData]) -> list[Path]:
    """The first source as an .h5ad file, the second as a zarr AnnData store."""
    h5ad, zarr_path = tmp_path / "in0.h5ad", tmp_path / "in1.zarr"
    sources[0].write_h5ad(h5ad)
    sources[1].write_zarr(zarr_path)
    return [h5ad, zarr_path]


def _source_rows(sources: list[ad.AnnData]) -> pd.DataFrame:
    """Every source row's X as float64, indexed by obs name."""
    rows = np.concatenate([_dense(s.X).astype(np.float64) for s in sources])
    return pd.DataFrame(rows, index=pd.Index(np.concatenate([s.obs_names for s in sources])))


def _open(path: Path) -> DatasetCollection:
    """A collection opened, or created, from a zarr group, as scverse annbatch code opens it."""
    return DatasetCollection(group=zarr.open_group(path, mode="a"), mode="a")


def _peer_collection(tmp_path: Path, *, dense: bool) -> tuple[DatasetCollection, list[ad.AnnData]]:
    """A collection converted the way scverse annbatch 0.3 code does it."""
    sources = _sources(dense)
    coll = _open(tmp_path / "coll.zarr")
    returned = coll.add_adatas(
        adata_paths=_write_inputs(tmp_path, sources),
        zarr_compressor=BLOSC,
        h5ad_compressor="gzip",
        shuffle=True,
        rng=np.random.default_rng(0),
        dataset_size=150,
        shuffle_chunk_size=20,
        **QUIET,
    )
    assert returned is coll
    return coll, sources


def _epoch(loader: annbatch.Loader, names: pd.Index, expected: pd.DataFrame, dtype) -> None:
    """One epoch covers every row once; each batch's X rows equal ``expected`` rows of their obs names."""
    seen = []
    for batch in loader:
        x = _dense(batch["X"])
        assert x.dtype == dtype
        rows = names[np.asarray(batch["index"])]
        np.testing.assert_array_equal(x, expected.loc[rows].to_numpy())
        seen.append(rows)
    seen_all = np.concatenate(seen)
    assert len(seen_all) == len(names) and set(seen_all) == set(names)


def _blosc_of(arr_meta: dict) -> dict:
    sharding = arr_meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    (blosc,) = [c for c in sharding["configuration"]["codecs"] if c["name"] == "blosc"]
    return blosc["configuration"]


# -- DatasetCollection(group=..., mode=..., is_collection_h5ad=...) ----------------------------------------
@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
def test_peer_conversion_keeps_every_row(tmp_path, dense):
    coll, sources = _peer_collection(tmp_path, dense=dense)
    assert len(coll) >= 3  # 410 rows, at most 150 per dataset
    expected = _source_rows(sources)
    for g in coll:
        part = ad.io.read_elem(g)
        assert part.n_obs <= 150
        np.testing.assert_array_equal(_dense(part.X), expected.loc[part.obs_names].to_numpy())
        x = g["X"] if dense else g["X"]["data"]
        conf = _blosc_of(json.loads((tmp_path / "coll.zarr" / x.path / "zarr.json").read_text()))
        assert (conf["cname"], conf["clevel"], conf["shuffle"]) == ("lz4", 3, "shuffle")
    assert sorted(coll.obs([]).index) == sorted(expected.index)


def test_peer_keywords_of_add_adatas(tmp_path):
    sources = _sources(dense=True)
    assert sources[0].var_names.equals(sources[1].var_names)
    paths = [tmp_path / "in0.h5ad", tmp_path / "in1.h5ad"]
    for source, path in zip(sources, paths, strict=True):
        source.write_h5ad(path)
    opened = []

    def load_adata(path):
        opened.append(path)
        return ad.read_h5ad(path)

    keep = pd.Index(sources[0].var_names[::2])
    coll = _open(tmp_path / "c.zarr").add_adatas(
        adata_paths=(p for p in paths),  # any iterable
        load_adata=load_adata,
        var_subset=keep,
        n_obs_per_chunk=16,
        shard_size=64,
        dataset_size=150,
        shuffle_chunk_size=20,
        shuffle=True,
        rng=np.random.default_rng(1),
        groupby="donor",
        merge="unique",
        **QUIET,
    )
    assert opened == [str(p) for p in paths]
    assert coll.var.index.equals(keep)
    expected = _source_rows(sources).set_axis(sources[0].var_names, axis=1)[keep]
    donors = pd.concat([s.obs["donor"].astype(str) for s in sources])
    for g in coll:
        part = ad.io.read_elem(g)
        assert part.n_obs <= 150
        assert g["X"].chunks[0] == 16 and g["X"].shards[0] == 64
        np.testing.assert_array_equal(part.X, expected.loc[part.obs_names].to_numpy())
        codes = part.obs["donor"].cat.codes.to_numpy()
        assert np.all(np.diff(codes) >= 0)  # sorted by the groupby column within each dataset
        assert list(part.obs["donor"].astype(str)) == list(donors.loc[part.obs_names])


def test_peer_errors_name_the_peer_parameters(tmp_path):
    coll = _open(tmp_path / "c.zarr")
    with pytest.raises(ValueError, match="`adata_paths` is empty"):
        coll.add_adatas(adata_paths=[], **QUIET)
    with pytest.raises(TypeError, match="`inputs`.*`adata_paths`.*not both"):
        coll.add_adatas([tmp_path / "x.h5ad"], adata_paths=[tmp_path / "x.h5ad"], **QUIET)
    with pytest.raises(ValueError, match="`compressors` or `zarr_compressor`"):
        coll.add_adatas(adata_paths=[tmp_path / "x.h5ad"], zarr_compressor=BLOSC, compressors=None, **QUIET)
    with pytest.raises(TypeError, match="`zarr_compressor` must be zarr bytes-to-bytes codecs.*str"):
        coll.add_adatas(adata_paths=[tmp_path / "x.h5ad"], zarr_compressor=("lz4",), **QUIET)
    with pytest.raises(ValueError, match="`h5ad_compressor` must be 'gzip', 'lzf' or None, got 'zstd'"):
        coll.add_adatas(adata_paths=[tmp_path / "x.h5ad"], h5ad_compressor="zstd", **QUIET)
    assert coll.is_empty and list(coll.group.keys()) == []


def test_h5ad_compressor_has_no_effect(tmp_path):
    sources = _sources(dense=False)
    paths = _write_inputs(tmp_path, sources)
    built = {
        h5ad: _open(tmp_path / f"{h5ad}.zarr").add_adatas(adata_paths=paths, h5ad_compressor=h5ad,
                                                           rng=np.random.default_rng(3), **QUIET)
        for h5ad in ("gzip", "lzf", None)
    }  # fmt: skip
    reference = [ad.io.read_elem(g) for g in built[None]]
    for coll in (built["gzip"], built["lzf"]):
        for g, ref in zip(coll, reference, strict=True):
            part = ad.io.read_elem(g)
            assert part.obs_names.equals(ref.obs_names)
            np.testing.assert_array_equal(_dense(part.X), _dense(ref.X))


def test_collection_location_given_once(tmp_path):
    with pytest.raises(TypeError, match="not both"):
        DatasetCollection(tmp_path / "a.zarr", group=tmp_path / "a.zarr")
    with pytest.raises(TypeError, match="path or zarr group"):
        DatasetCollection()
    by_path = DatasetCollection(group=tmp_path / "b.zarr")  # the peer also takes a path
    assert by_path.is_empty and (tmp_path / "b.zarr" / "zarr.json").exists()


def test_is_collection_h5ad_is_refused(tmp_path):
    with pytest.raises(CollectionError, match=r"`is_collection_h5ad=True`.*add_adatas"):
        DatasetCollection(group=tmp_path / "h5.zarr", mode="a", is_collection_h5ad=True)
    assert not (tmp_path / "h5.zarr").exists()
    coll = DatasetCollection(group=tmp_path / "z.zarr", is_collection_h5ad=False)
    assert coll.is_empty


# -- editing datasets in place ---------------------------------------------------------------------------
@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
@pytest.mark.parametrize("new_dtype", ["float64", "int32"])
def test_edit_dtype_in_place_then_load(tmp_path, dense, new_dtype):
    coll, sources = _peer_collection(tmp_path, dense=dense)
    expected = _source_rows(sources)
    edited = coll.dataset_keys[0]
    reopened = _open(tmp_path / "coll.zarr")
    for g in reopened:
        if g.basename == edited:
            x = ad.io.read_elem(g["X"]).astype(new_dtype)
            if new_dtype == "float64":  # values float32 cannot hold: a float32 round trip would change them
                (x.data if sp.issparse(x) else x)[...] /= 3
            ad.io.write_elem(g, "X", x)
            names = ad.io.read_elem(g["obs"]).index
            if new_dtype == "float64":
                expected.loc[names] /= 3
    assert ad.io.read_elem(next(iter(reopened))["X"]).dtype == new_dtype
    others = {ad.io.read_elem(g["X"]).dtype for g in reopened if g.basename != edited}
    assert others == {np.dtype(np.float32)}

    loader = annbatch.Loader(batch_size=32, chunk_size=8, preload_nchunks=4, shuffle=True, seed=0,
                             return_index=True)  # fmt: skip
    with pytest.warns(UserWarning, match="promoting to float64"):
        loader.use_collection(
            DatasetCollection(group=zarr.open_group(tmp_path / "coll.zarr", mode="r"), mode="r")
        )
    _epoch(loader, loader_names(loader, tmp_path), expected, np.float64)


def loader_names(loader: annbatch.Loader, tmp_path: Path) -> pd.Index:
    """Obs names by global row number of a loader over the collection at ``tmp_path / 'coll.zarr'``."""
    names = DatasetCollection(tmp_path / "coll.zarr", mode="r").obs([]).index
    assert len(names) == loader.n_obs
    return names


def test_edit_an_obs_column_in_place(tmp_path):
    coll, sources = _peer_collection(tmp_path, dense=False)
    for g in coll:
        obs = ad.io.read_elem(g["obs"])
        obs["n_counts"] = obs["n_counts"] * 2
        ad.io.write_elem(g, "obs", obs)
    counts = pd.concat([s.obs["n_counts"] for s in sources])
    coll_obs = DatasetCollection(tmp_path / "coll.zarr", mode="r").obs(["n_counts"])
    np.testing.assert_array_equal(coll_obs["n_counts"], counts.loc[coll_obs.index] * 2)
    loader = coll.loader(batch_size=20, chunk_size=10, preload_nchunks=2, seed=0, return_index=True,
                         obs_keys=["n_counts"])  # fmt: skip
    for batch in loader:
        rows = coll_obs.index[batch["index"]]
        np.testing.assert_array_equal(batch["obs"]["n_counts"], counts.loc[rows].to_numpy() * 2)


def test_edited_dataset_may_leave_zero_chunks_out(tmp_path):
    """anndata does not store chunks of zeros: in an edited dataset that is not damage."""
    coll, sources = _peer_collection(tmp_path, dense=True)
    expected = _source_rows(sources)
    g = next(iter(coll))  # only the first dataset is opened for editing
    names = ad.io.read_elem(g["obs"]).index
    ad.io.write_elem(g, "X", np.zeros((len(names), N_VARS), dtype=np.float32))
    stored = [p for p in (tmp_path / "coll.zarr" / g.path / "X").rglob("*") if p.is_file()]
    assert [p.name for p in stored] == ["zarr.json"]  # no chunk stored
    expected.loc[names] = 0.0
    loader = coll.loader(batch_size=40, chunk_size=10, preload_nchunks=4, seed=0, return_index=True)
    _epoch(loader, loader_names(loader, tmp_path), expected, np.float32)

    # A dataset annbatch wrote and nobody opened for editing still reports a missing shard as damage.
    untouched = tmp_path / "coll.zarr" / coll.dataset_keys[1] / "X" / "c"
    next(p for p in sorted(untouched.rglob("*")) if p.is_file()).unlink()
    with pytest.raises((OSError, ValueError), match="(?i)damaged|missing"):
        list(coll.loader(batch_size=40, chunk_size=10, preload_nchunks=4, seed=0))


def test_read_only_collection_yields_read_only_groups(tmp_path):
    coll, sources = _peer_collection(tmp_path, dense=False)
    before = {k: (tmp_path / "coll.zarr" / k / "zarr.json").read_bytes() for k in coll.dataset_keys}
    for opened in (DatasetCollection(tmp_path / "coll.zarr", mode="r"),
                   DatasetCollection(group=zarr.open_group(tmp_path / "coll.zarr", mode="r"), mode="r")):  # fmt: skip
        groups = list(opened)
        assert [g.basename for g in groups] == coll.dataset_keys
        for g in groups:
            assert g.read_only
            with pytest.raises(ValueError, match="read-only"):
                g.attrs["edited"] = True
            with pytest.raises(ValueError):
                ad.io.write_elem(g, "X", ad.io.read_elem(g["X"]).astype("float64"))
    after = {k: (tmp_path / "coll.zarr" / k / "zarr.json").read_bytes() for k in coll.dataset_keys}
    assert after == before  # nothing changed, consolidated metadata included
    expected = _source_rows(sources)
    for g in DatasetCollection(tmp_path / "coll.zarr", mode="r"):
        part = ad.io.read_elem(g)
        assert part.X.dtype == np.float32
        np.testing.assert_array_equal(_dense(part.X), expected.loc[part.obs_names].to_numpy())


def test_writable_groups_and_anndata_reads_after_an_edit(tmp_path):
    coll, sources = _peer_collection(tmp_path, dense=True)
    g = next(iter(coll))
    assert not g.read_only
    ad.io.write_elem(g, "X", ad.io.read_elem(g["X"]).astype("float64") + 0.5)
    # Plain anndata sees the edit too: no stale consolidated metadata describes the old X.
    part = ad.read_zarr(tmp_path / "coll.zarr" / g.path)
    assert part.X.dtype == np.float64
    np.testing.assert_array_equal(part.X, _source_rows(sources).loc[part.obs_names].to_numpy() + 0.5)


def test_editing_holds_the_write_lock(tmp_path):
    """While writable groups are handed out, no other writer may rewrite the datasets, and vice versa."""
    from annbatch._lock import WriteLock
    from annbatch.errors import CollectionLockedError

    coll, _ = _peer_collection(tmp_path, dense=True)
    other = WriteLock(zarr.open_group(tmp_path / "coll.zarr", mode="r"))
    groups = iter(coll)
    next(groups)
    assert not other.try_acquire(), "an append waits while datasets are being edited"
    groups.close()
    assert other.try_acquire(), "the lock is released when the loop ends"
    with pytest.raises(CollectionLockedError, match="being written by another process"):
        next(iter(coll))
    other.release()
    assert [g.path for g in DatasetCollection(tmp_path / "coll.zarr", mode="r")] == [g.path for g in coll]


# -- Loader: to_torch, add_dataset(s)(var=...), dataset_type -----------------------------------------------
def test_to_torch_is_the_deprecated_to(tmp_path):
    torch = pytest.importorskip("torch")
    x = np.arange(60 * 5, dtype=np.float32).reshape(60, 5)
    with pytest.warns(FutureWarning, match="`to_torch` is deprecated; pass `to='torch'`"):
        loader = annbatch.Loader(batch_size=16, chunk_size=8, preload_nchunks=2, to_torch=True,
                                 return_index=True)  # fmt: skip
    loader.add_dataset(x)
    for batch in loader:
        assert isinstance(batch["X"], torch.Tensor)
        np.testing.assert_array_equal(batch["X"].numpy(), x[np.asarray(batch["index"])])
    with pytest.warns(FutureWarning, match="pass `to=None`"):
        loader = annbatch.Loader(batch_size=16, to_torch=False, return_index=True).add_dataset(x)
    for batch in loader:
        assert isinstance(batch["X"], np.ndarray)
        np.testing.assert_array_equal(batch["X"], x[batch["index"]])
    with pytest.warns(FutureWarning):
        annbatch.Loader(to_torch=True, to="torch")  # agreeing: fine
    for to_torch, to in ((True, "numpy"), (True, "jax"), (False, "torch")):
        with pytest.raises(ValueError, match=f"`to_torch={to_torch}` contradicts `to='{to}'`"):
            annbatch.Loader(to_torch=to_torch, to=to)
    with pytest.raises(TypeError, match="`to_torch` must be True or False"):
        annbatch.Loader(to_torch="yes")


@pytest.mark.parametrize("kind", ["numpy", "csr"])
def test_add_dataset_with_var(kind):
    rng = np.random.default_rng(5)
    x = rng.poisson(1.0, (70, 6)).astype(np.float32)
    obs = pd.DataFrame({"label": rng.integers(0, 3, 70)}, index=[f"c{i}" for i in range(70)])
    var = pd.DataFrame({"symbol": list("ABCDEF")}, index=[f"g{i}" for i in range(6)])
    data = sp.csr_matrix(x) if kind == "csr" else x
    loader = annbatch.Loader(batch_size=16, chunk_size=8, preload_nchunks=2, shuffle=True, seed=0,
                             return_index=True).add_dataset(data, obs=obs, var=var)  # fmt: skip
    assert loader.var is var
    n = 0
    for batch in loader:
        assert batch["var"] is var
        idx = np.asarray(batch["index"])
        np.testing.assert_array_equal(_dense(batch["X"]), x[idx])
        np.testing.assert_array_equal(batch["obs"]["label"].to_numpy(), obs["label"].to_numpy()[idx])
        n += len(idx)
    assert n == 70

    with pytest.raises(ValueError, match="`var` has 5 rows but dataset #0 has 6 columns"):
        annbatch.Loader().add_dataset(data, var=var.iloc[:5])
    with pytest.raises(ValueError, match="var names differ"):
        loader.add_dataset(data, var=var.set_axis([f"h{i}" for i in range(6)]))
    assert loader.n_obs == 70  # the refused dataset was not added
    loader.add_dataset(data)  # no var: the loader's stays
    assert loader.var is var and loader.n_obs == 140


def test_add_datasets_with_one_var_or_one_each():
    x = [np.full((10, 3), i, dtype=np.float32) for i in range(3)]
    var = pd.DataFrame(index=["a", "b", "c"])
    shared = annbatch.Loader(batch_size=30).add_datasets(x, var=var)
    each = annbatch.Loader(batch_size=30).add_datasets(x, var=[var.copy() for _ in x])
    for loader in (shared, each):
        assert loader.var.index.equals(var.index)
        (batch,) = list(loader)
        assert batch["var"].index.equals(var.index)
        np.testing.assert_array_equal(batch["X"], np.concatenate(x))
    with pytest.raises(ValueError, match="3 datasets but 2 `var` frames"):
        annbatch.Loader().add_datasets(x, var=[var, var])
    with pytest.raises(ValueError, match="`var` of dataset #1 has other var names"):
        annbatch.Loader().add_datasets(x, var=[var, var.set_axis(["a", "b", "z"]), var])
    with pytest.raises(TypeError, match="`var` must be a pandas DataFrame"):
        annbatch.Loader().add_datasets(x, var=[var, ["a", "b", "c"], var])


def test_dataset_type(tmp_path):
    (tmp_path / "s").mkdir(), (tmp_path / "d").mkdir()
    sparse, _ = _peer_collection(tmp_path / "s", dense=False)
    dense, _ = _peer_collection(tmp_path / "d", dense=True)
    sparse_type = sparse.loader(batch_size=8).dataset_type
    assert issubclass(sparse_type, ad.abc.CSRDataset)
    assert dense.loader(batch_size=8).dataset_type is zarr.Array
    x = np.ones((4, 3), dtype=np.float32)
    assert annbatch.Loader().add_dataset(x).dataset_type is np.ndarray
    assert annbatch.Loader().add_dataset(sp.csr_array(x)).dataset_type is sp.csr_array
    assert (
        annbatch.Loader().add_dataset(sp.csr_matrix(x)).add_dataset(sp.csr_array(x)).dataset_type
        is sp.csr_matrix
    )
    group = zarr.open_group(tmp_path / "csr.zarr", mode="w")
    ad.io.write_elem(group, "X", sp.csr_matrix(x))
    assert annbatch.Loader().add_dataset(group["X"]).dataset_type is sparse_type
    assert annbatch.Loader().add_dataset(ad.io.sparse_dataset(group["X"])).dataset_type is sparse_type
    with pytest.raises(ValueError, match="no data"):
        _ = annbatch.Loader().dataset_type


def test_peer_io_spellings_are_not_deprecated(tmp_path):
    """Only `to_torch` is deprecated: the scverse names of collection parameters stay without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        coll, sources = _peer_collection(tmp_path, dense=False)
        loader = annbatch.Loader(batch_size=64, chunk_size=16, preload_nchunks=4, return_index=True)
        _epoch(loader.use_collection(coll), loader_names(loader, tmp_path), _source_rows(sources), np.float32)
