"""Tests of the ``adata.annbatch`` accessor: loaders over every kind of AnnData, errors, conversions.

Every loader case runs one epoch with ``return_index=True`` and checks each batch against the source:
the X rows the index names, every row exactly once, and obs key codes at those rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import annbatch
from annbatch.synthetic import make_adata

if TYPE_CHECKING:
    from pathlib import Path

N_OBS, N_VARS = 300, 40
# Small loads, so an epoch has several loads and a carried partial batch.
SMALL = {"batch_size": 32, "chunk_size": 8, "preload_nchunks": 4, "seed": 0, "return_index": True}


@pytest.fixture
def adata() -> ad.AnnData:
    return make_adata(N_OBS, N_VARS, seed=1)


def _numpy(x) -> np.ndarray:
    """A batch's X (or obs array) as dense numpy, whatever type the loader yielded."""
    if sp.issparse(x):
        return x.toarray()
    if hasattr(x, "to_dense"):  # a torch tensor, sparse or dense
        return x.to_dense().numpy()
    return np.asarray(x)


def _codes(obs: pd.DataFrame, key: str) -> np.ndarray:
    values = obs[key]
    if not isinstance(values.dtype, pd.CategoricalDtype):  # strings: coded like categoricals
        values = values.astype("category")
    return values.cat.codes.to_numpy()


def check_epoch(loader, x: np.ndarray, obs: pd.DataFrame | None = None, keys=()) -> list[np.ndarray]:
    """One epoch: every batch's X equals ``x`` at its index, every row once; the index of each batch."""
    indices = []
    for batch in loader:
        rows = np.asarray(batch["index"])
        np.testing.assert_array_equal(_numpy(batch["X"]), x[rows])
        for key in keys:
            np.testing.assert_array_equal(_numpy(batch["obs"][key]), _codes(obs, key)[rows])
        indices.append(rows)
    assert np.array_equal(np.sort(np.concatenate(indices)), np.arange(len(x)))
    return indices


# ---------------------------------------------------------------------------------------------------------
# what the accessor reads
# ---------------------------------------------------------------------------------------------------------
def test_registered_on_anndata(adata):
    assert isinstance(adata.annbatch, annbatch.AnnbatchAccessor)
    assert ad.AnnData.annbatch is annbatch.AnnbatchAccessor


def test_registration_is_skipped_without_the_extension_api(monkeypatch):
    """anndata < 0.12 has no `register_anndata_namespace`: registering then does nothing, and raises nothing."""
    from annbatch import accessor

    monkeypatch.delattr(ad, "register_anndata_namespace")
    accessor._register()


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "csr"])
def test_in_memory_x(dense):
    adata = make_adata(N_OBS, N_VARS, seed=2, dense=dense)
    loader = adata.annbatch.loader(obs_keys=["cell_type", "donor"], **SMALL)
    assert loader.dataset_type is (np.ndarray if dense else sp.csr_matrix)
    assert loader.var.index.equals(adata.var_names)
    x = adata.X if dense else adata.X.toarray()
    check_epoch(loader, x, adata.obs, keys=["cell_type", "donor"])


def test_defaults_read_every_row_once(adata):
    loader = adata.annbatch.loader(return_index=True)
    assert loader.batch_size == 256
    check_epoch(loader, adata.X.toarray())


def test_obs_only_when_asked_for(adata):
    """As from a collection's loader: no obs unless obs_keys or obs_columns name some."""
    assert next(iter(adata.annbatch.loader(seed=0)))["obs"] is None
    batch = next(iter(adata.annbatch.loader(seed=0, obs_columns=["cell_type"], return_index=True)))
    assert list(batch["obs"].columns) == ["cell_type"]
    np.testing.assert_array_equal(batch["obs"]["cell_type"], adata.obs["cell_type"].to_numpy()[batch["index"]])


def test_layer(adata):
    adata.layers["counts"] = sp.csr_matrix(adata.X.toarray() * 2 + 1)
    loader = adata.annbatch.loader(layer="counts", obs_keys=["cell_type"], **SMALL)
    check_epoch(loader, adata.layers["counts"].toarray(), adata.obs, keys=["cell_type"])


def test_obsm(adata):
    loader = adata.annbatch.loader(obsm="X_pca", obs_keys=["donor"], **SMALL)
    assert loader.n_var == adata.obsm["X_pca"].shape[1]
    assert loader.var is None  # obsm columns are no genes
    check_epoch(loader, adata.obsm["X_pca"], adata.obs, keys=["donor"])


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "csr"])
def test_backed_h5ad(tmp_path, dense):
    source = make_adata(N_OBS, N_VARS, seed=3, dense=dense)
    source.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    try:
        loader = backed.annbatch.loader(obs_keys=["cell_type"], **SMALL)
        check_epoch(loader, source.X if dense else source.X.toarray(), source.obs, keys=["cell_type"])
    finally:
        backed.file.close()


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "csr"])
def test_lazily_read_zarr(tmp_path, dense):
    """An AnnData whose X stays on disk: a zarr array or ``anndata.io.sparse_dataset``."""
    source = make_adata(N_OBS, N_VARS, seed=4, dense=dense)
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        source.write_zarr(tmp_path / "a.zarr")
    group = zarr.open_group(tmp_path / "a.zarr", mode="r")
    x = group["X"] if dense else ad.io.sparse_dataset(group["X"])
    lazy = ad.AnnData(X=x, obs=ad.io.read_elem(group["obs"]), var=ad.io.read_elem(group["var"]))
    loader = lazy.annbatch.loader(obs_keys=["cell_type"], **SMALL)
    assert loader.dataset_type is zarr.Array if dense else issubclass(loader.dataset_type, ad.abc.CSRDataset)
    check_epoch(loader, source.X if dense else source.X.toarray(), source.obs, keys=["cell_type"])


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "csr"])
def test_view_yields_the_views_rows(dense):
    adata = make_adata(N_OBS, N_VARS, seed=5, dense=dense)
    view = adata[adata.obs.cell_type == adata.obs.cell_type.cat.categories[0]]
    assert view.is_view and 0 < view.n_obs < adata.n_obs
    loader = view.annbatch.loader(obs_keys=["cell_type"], **SMALL)
    assert loader.n_obs == view.n_obs
    full = adata.X if dense else adata.X.toarray()
    # By obs name: row i of the loader is the view's row i, i.e. the source row of that name.
    source_rows = adata.obs_names.get_indexer(view.obs_names)
    check_epoch(loader, full[source_rows], view.obs, keys=["cell_type"])


def test_no_state_is_kept_between_calls(adata):
    """A loader made after a change sees the change; a view's loader never sees the other rows."""
    first = adata.annbatch.loader(**SMALL)
    adata.X = sp.csr_matrix(adata.X.toarray() + 5)
    second = adata.annbatch.loader(**SMALL)
    assert second is not first
    check_epoch(second, adata.X.toarray())
    subset = adata[:100]
    assert subset.annbatch.loader(**SMALL).n_obs == 100
    assert adata.annbatch.loader(**SMALL).n_obs == N_OBS


def test_string_obs_column_is_coded_as_categories(adata):
    adata.obs["sample"] = adata.obs["donor"].astype(str).to_numpy(dtype=object)
    assert not isinstance(adata.obs["sample"].dtype, pd.CategoricalDtype)
    loader = adata.annbatch.loader(obs_keys=["sample"], **SMALL)
    assert list(loader.categories["sample"]) == sorted(adata.obs["sample"].unique())
    check_epoch(loader, adata.X.toarray(), adata.obs, keys=["sample"])


def test_to_torch(adata):
    torch = pytest.importorskip("torch")
    loader = adata.annbatch.loader(obs_keys=["cell_type"], to="torch", **SMALL)
    batch = next(iter(loader))
    assert isinstance(batch["X"], torch.Tensor)
    assert isinstance(batch["obs"]["cell_type"], torch.Tensor)
    check_epoch(loader, adata.X.toarray(), adata.obs, keys=["cell_type"])


def test_homogeneous_batches_by_batch_key():
    unsorted = make_adata(N_OBS, N_VARS, seed=6)
    adata = unsorted[np.argsort(unsorted.obs["cell_type"].cat.codes.to_numpy(), kind="stable")].copy()
    loader = adata.annbatch.loader(batch_key="cell_type", batch_sampler="homogeneous", **SMALL)
    codes = _codes(adata.obs, "cell_type")
    for indices in check_epoch(loader, adata.X.toarray()):
        assert len(np.unique(codes[indices])) == 1
    for batch in loader:
        np.testing.assert_array_equal(batch["batch"], codes[batch["index"]])


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------
def test_csc_x_says_how_to_convert(adata):
    adata.X = adata.X.tocsc()
    with pytest.raises(ValueError, match=r"`adata\.X` is a CSC matrix.*`adata\.X = adata\.X\.tocsr\(\)`"):
        adata.annbatch.loader()
    adata.layers["counts"] = adata.X
    fix = r"`adata\.layers\['counts'\] = adata\.layers\['counts'\]\.tocsr\(\)`"
    with pytest.raises(ValueError, match=r"`adata\.layers\['counts'\]` is a CSC matrix.*" + fix):
        adata.annbatch.loader(layer="counts")


def test_coo_says_how_to_convert():
    """anndata >= 0.12 keeps COO out of AnnData itself; the loader's own message for it names `.tocsr()`."""
    coo = sp.coo_matrix(np.eye(4, dtype=np.float32))
    try:
        adata = ad.AnnData(coo)
    except ValueError:
        with pytest.raises(ValueError, match=r"COO matrix.*\.tocsr\(\)"):
            annbatch.Loader().add_dataset(coo)
    else:  # older anndata holds it
        with pytest.raises(ValueError, match=r"`adata\.X` is a COO matrix.*adata\.X\.tocsr\(\)"):
            adata.annbatch.loader()


def test_dask_x_says_how_to_load_it(adata):
    da = pytest.importorskip("dask.array")
    adata.X = da.from_array(adata.X.toarray(), chunks=(100, N_VARS))
    with pytest.raises(ValueError, match=r"`adata\.X` is a dask array.*`adata = adata\.to_memory\(\)`"):
        adata.annbatch.loader()


def test_read_lazy_says_how_to_load_it(tmp_path, adata):
    pytest.importorskip("dask")
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        adata.write_zarr(tmp_path / "a.zarr")
    lazy = ad.experimental.read_lazy(tmp_path / "a.zarr")
    with pytest.raises(ValueError, match=r"dask array.*read_lazy.*to_memory\(\).*Collection"):
        lazy.annbatch.loader()
    check_epoch(lazy.to_memory().annbatch.loader(**SMALL), adata.X.toarray())  # the fixes it names work
    coll = lazy.annbatch.to_collection(tmp_path / "cells.zarr", seed=0, progress=False)
    loader = coll.loader(batch_size=64, chunk_size=16, preload_nchunks=8, shuffle=False, return_index=True)
    x = sp.vstack([b["X"] for b in loader]).toarray()
    order = coll.obs()["src_path"].index  # the collection's rows are the input's, preshuffled
    np.testing.assert_array_equal(x, adata[order].X.toarray())


def test_unknown_layer_and_obsm_list_what_there_is(adata):
    adata.layers["counts"] = adata.X.copy()
    with pytest.raises(
        KeyError, match=r"`layer='raw'`: the AnnData has no such layer; its layers: \['counts'\]"
    ):
        adata.annbatch.loader(layer="raw")
    with pytest.raises(KeyError, match=r"`obsm='X_umap'`: .* no such obsm entry; its obsm keys: \['X_pca'\]"):
        adata.annbatch.loader(obsm="X_umap")
    with pytest.raises(ValueError, match="Give `layer` or `obsm`, not both"):
        adata.annbatch.loader(layer="counts", obsm="X_pca")


def test_obsm_dataframe_says_how_to_convert(adata):
    adata.obsm["meta"] = pd.DataFrame({"a": np.arange(N_OBS, dtype=float)}, index=adata.obs_names)
    with pytest.raises(ValueError, match=r"pandas DataFrame.*`adata\.obsm\['meta'\] = .*\.to_numpy\(\)`"):
        adata.annbatch.loader(obsm="meta")


# ---------------------------------------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------------------------------------
def _collection_rows(coll: annbatch.Collection) -> ad.AnnData:
    return ad.concat([ad.read_zarr(group.store_path) for group in coll])


def test_to_collection_round_trip(tmp_path, adata):
    coll = adata.annbatch.to_collection(tmp_path / "cells.zarr", seed=0, progress=False)
    assert isinstance(coll, annbatch.Collection)
    assert coll.n_obs == N_OBS
    back = _collection_rows(coll)
    assert sorted(back.obs_names) == sorted(adata.obs_names)
    # by obs name: every row's values and labels are the source's
    order = adata.obs_names.get_indexer(back.obs_names)
    np.testing.assert_array_equal(back.X.toarray(), adata.X.toarray()[order])
    assert list(back.obs["cell_type"]) == list(adata.obs["cell_type"].iloc[order])
    # and its loader reads them
    loader = coll.loader(return_index=True, seed=0)
    check_epoch(loader, back.X.toarray())


def test_to_collection_of_a_view(tmp_path, adata):
    view = adata[adata.obs.donor == "donor_0"]
    coll = view.annbatch.to_collection(tmp_path / "cells.zarr", seed=0, progress=False)
    assert sorted(_collection_rows(coll).obs_names) == sorted(view.obs_names)


def test_write_sharded(tmp_path: Path, adata):
    group = adata.annbatch.write_sharded(tmp_path / "a.zarr", n_obs_per_chunk=16)
    assert isinstance(group, zarr.Group)
    back = ad.read_zarr(tmp_path / "a.zarr")
    np.testing.assert_array_equal(back.X.toarray(), adata.X.toarray())
    np.testing.assert_array_equal(back.obsm["X_pca"], adata.obsm["X_pca"])
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    # into an open group, under a key
    root = zarr.open_group(tmp_path / "b.zarr", mode="w", zarr_format=3)
    adata.annbatch.write_sharded(root, key="one")
    np.testing.assert_array_equal(ad.read_zarr(tmp_path / "b.zarr" / "one").X.toarray(), adata.X.toarray())


def test_write_sharded_refuses_an_existing_path_and_backed_data(tmp_path, adata):
    adata.annbatch.write_sharded(tmp_path / "a.zarr")
    with pytest.raises(FileExistsError, match="already exists"):
        adata.annbatch.write_sharded(tmp_path / "a.zarr")
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    try:
        with pytest.raises(ValueError, match=r"in-memory AnnData.*to_memory\(\)"):
            backed.annbatch.write_sharded(tmp_path / "b.zarr")
        assert not (tmp_path / "b.zarr").exists()
    finally:
        backed.file.close()
