from __future__ import annotations

import anndata as ad
import numba
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from annbatch.synthetic import make_adata, write_h5ad_files


def _assert_canonical_csr(X: sp.csr_matrix) -> None:
    assert sp.issparse(X)
    assert X.format == "csr"
    assert X.indices.dtype == np.int32
    assert X.indptr.dtype == np.int32
    assert X.indptr[0] == 0
    assert X.indptr[-1] == X.nnz
    starts_of_rows = np.zeros(X.nnz, dtype=bool)
    starts_of_rows[X.indptr[:-1][np.diff(X.indptr) > 0]] = True
    # Strictly increasing within each row: sorted and no duplicates.
    assert np.all((np.diff(X.indices) > 0) | starts_of_rows[1:])
    assert X.indices.min(initial=0) >= 0
    assert X.indices.max(initial=0) < X.shape[1]
    assert np.all(X.data != 0)


def test_shapes_and_types(sparse_adata: ad.AnnData) -> None:
    adata = sparse_adata
    assert adata.shape == (1_000, 300)
    assert isinstance(adata.X, sp.csr_matrix)
    assert adata.X.dtype == np.float32
    _assert_canonical_csr(adata.X)
    copy = adata.X.copy()
    copy.sum_duplicates()
    assert copy.nnz == adata.X.nnz
    assert adata.obsm["X_pca"].shape == (1_000, 16)
    assert adata.obsm["X_pca"].dtype == np.float32


def test_values_are_positive_integers(sparse_adata: ad.AnnData) -> None:
    data = sparse_adata.X.data
    assert np.all(data >= 1)
    np.testing.assert_array_equal(data, np.round(data))


def test_dense(dense_adata: ad.AnnData, sparse_adata: ad.AnnData) -> None:
    X = dense_adata.X
    assert isinstance(X, np.ndarray)
    assert X.flags.c_contiguous
    assert X.dtype == np.float32
    assert X.shape == (1_000, 300)
    np.testing.assert_array_equal(X, np.round(X))
    assert np.all(X >= 0)
    # Same generator as the sparse path: dense=True only changes the container.
    same_seed = make_adata(1_000, 300, seed=0, dense=True)
    np.testing.assert_array_equal(same_seed.X, sparse_adata.X.toarray())


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint16])
def test_dtype(dtype: type) -> None:
    adata = make_adata(100, 50, dtype=dtype)
    assert adata.X.dtype == dtype
    reference = make_adata(100, 50, dtype=np.float64)
    np.testing.assert_array_equal(adata.X.toarray(), reference.X.toarray())


def test_default_density(sparse_adata: ad.AnnData) -> None:
    density = sparse_adata.X.nnz / np.prod(sparse_adata.shape)
    assert 0.05 <= density <= 0.10


@pytest.mark.parametrize(("n_vars", "nnz_per_row"), [(2_000, 40), (2_000, 300), (500, 200), (100, 3)])
def test_nnz_per_row_honoured(n_vars: int, nnz_per_row: float) -> None:
    adata = make_adata(1_500, n_vars, nnz_per_row=nnz_per_row, seed=5)
    per_row = np.diff(adata.X.indptr)
    assert per_row.mean() == pytest.approx(nnz_per_row, rel=0.1)
    # Rows vary around the mean rather than all having the same count.
    assert per_row.std() > 0.1 * nnz_per_row
    assert per_row.min() >= 1
    _assert_canonical_csr(adata.X)


def test_nnz_capped_at_n_vars() -> None:
    adata = make_adata(300, 40, nnz_per_row=39)
    per_row = np.diff(adata.X.indptr)
    assert per_row.max() == 40
    assert per_row.mean() > 30
    _assert_canonical_csr(adata.X)


def test_deterministic_per_seed() -> None:
    a = make_adata(300, 200, seed=42)
    b = make_adata(300, 200, seed=42)
    c = make_adata(300, 200, seed=43)
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    np.testing.assert_array_equal(a.obsm["X_pca"], b.obsm["X_pca"])
    assert a.X.shape == c.X.shape
    assert (a.X != c.X).nnz > 0
    assert not a.obs["barcode"].equals(c.obs["barcode"])


def test_independent_of_thread_count() -> None:
    reference = make_adata(500, 300, seed=9)
    n_threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        single = make_adata(500, 300, seed=9)
    finally:
        numba.set_num_threads(n_threads)
    assert (reference.X != single.X).nnz == 0


def test_obs_columns(sparse_adata: ad.AnnData) -> None:
    obs = sparse_adata.obs
    assert obs.index.is_unique
    assert obs.index[0] == "cell_0"
    assert obs.index[-1] == "cell_999"
    assert isinstance(obs["cell_type"].dtype, pd.CategoricalDtype)
    assert len(obs["cell_type"].cat.categories) == 8
    assert "T cell" in obs["cell_type"].cat.categories
    assert isinstance(obs["donor"].dtype, pd.CategoricalDtype)
    assert list(obs["donor"].cat.categories) == [f"donor_{d}" for d in range(4)]
    assert obs["n_counts"].dtype == np.float64
    assert obs["n_genes"].dtype == np.int64
    assert obs["is_doublet"].dtype == bool
    assert not isinstance(obs["barcode"].dtype, pd.CategoricalDtype)
    assert all(isinstance(b, str) for b in obs["barcode"])
    assert obs["barcode"].is_unique
    X = sparse_adata.X
    np.testing.assert_array_equal(obs["n_counts"], np.asarray(X.sum(axis=1), dtype=np.float64).ravel())
    np.testing.assert_array_equal(obs["n_genes"], np.diff(X.indptr))
    assert 0.005 < obs["is_doublet"].mean() < 0.07


def test_cell_type_frequencies_unequal() -> None:
    counts = make_adata(4_000, 100, seed=3).obs["cell_type"].value_counts()
    assert counts.max() > 2 * counts.min()


def test_many_cell_types_get_names() -> None:
    categories = make_adata(200, 100, n_cell_types=30).obs["cell_type"].cat.categories
    assert len(categories) == 30
    assert categories.is_unique


def test_var_columns(sparse_adata: ad.AnnData) -> None:
    var = sparse_adata.var
    assert list(var.index[:2]) == ["gene_0", "gene_1"]
    assert all(isinstance(s, str) for s in var["gene_symbol"])
    assert var["highly_variable"].dtype == bool
    assert 0 < var["highly_variable"].sum() < len(var)


def test_custom_var_names_and_prefix() -> None:
    names = [f"ENSG{j:05d}" for j in range(50)]
    adata = make_adata(20, 50, var_names=names, obs_prefix="bc")
    assert list(adata.var_names) == names
    assert adata.obs_names[3] == "bc_3"
    with pytest.raises(ValueError, match="var_names"):
        make_adata(20, 50, var_names=names[:10])


def test_cell_type_programs_visible() -> None:
    adata = make_adata(3_000, 400, seed=11)
    X = adata.X.toarray() / adata.obs["n_counts"].to_numpy()[:, None]
    cell_type = adata.obs["cell_type"]
    markers = adata.uns["cell_type_markers"]
    assert set(markers) == set(cell_type.cat.categories)
    for name, genes in markers.items():
        in_type = (cell_type == name).to_numpy()
        if in_type.sum() < 20:
            continue
        cols = adata.var_names.get_indexer(genes)
        assert X[np.ix_(in_type, cols)].mean() > 2 * X[np.ix_(~in_type, cols)].mean(), name


def test_donor_effects_visible() -> None:
    adata = make_adata(3_000, 200, n_cell_types=1, n_donors=2, seed=4)
    X = adata.X.toarray() / adata.obs["n_counts"].to_numpy()[:, None]
    donor = (adata.obs["donor"] == "donor_0").to_numpy()
    log_fc = np.log(X[donor].mean(axis=0) + 1e-4) - np.log(X[~donor].mean(axis=0) + 1e-4)
    expressed = X.mean(axis=0) > 1e-3
    # Multiplicative per-gene noise shows up as a spread of fold changes between donors.
    assert log_fc[expressed].std() > 0.2


def test_library_sizes_lognormal() -> None:
    n_counts = make_adata(4_000, 500, seed=8).obs["n_counts"].to_numpy()
    assert stats.skew(n_counts) > 0.5
    assert abs(stats.skew(np.log(n_counts))) < 0.3


def test_gene_means_heavy_tailed(sparse_adata: ad.AnnData) -> None:
    means = np.sort(np.asarray(sparse_adata.X.mean(axis=0)).ravel())[::-1]
    top = means[: len(means) // 100 + 1].sum()
    # A few genes carry a large share of all counts.
    assert top / means.sum() > 0.05
    assert means[0] > 20 * np.median(means)


def test_embedding_separates_cell_types(sparse_adata: ad.AnnData) -> None:
    pca = sparse_adata.obsm["X_pca"]
    codes = sparse_adata.obs["cell_type"].cat.codes.to_numpy()
    a, b = np.bincount(codes).argsort()[-2:]
    gap = np.linalg.norm(pca[codes == a].mean(axis=0) - pca[codes == b].mean(axis=0))
    assert gap > 2 * pca[codes == a].std(axis=0).mean()


def test_empty_and_tiny() -> None:
    empty = make_adata(0, 10)
    assert empty.shape == (0, 10)
    assert empty.X.nnz == 0
    tiny = make_adata(5, 1)
    assert tiny.X.nnz == 5


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="n_vars"):
        make_adata(10, 0)
    with pytest.raises(ValueError, match="nnz_per_row"):
        make_adata(10, 10, nnz_per_row=0)


def test_write_h5ad_files_overlap(tmp_path) -> None:
    paths = write_h5ad_files(tmp_path / "out", 3, 150, 100, overlap=0.4, seed=1, n_donors=2)
    assert [p.name for p in paths] == ["synthetic_000.h5ad", "synthetic_001.h5ad", "synthetic_002.h5ad"]
    adatas = [ad.read_h5ad(p) for p in paths]
    var_sets = [set(a.var_names) for a in adatas]
    assert all(a.shape == (150, 100) for a in adatas)
    assert len(set.intersection(*var_sets)) == 40
    assert len(var_sets[0] & var_sets[1]) == 40
    assert len(set.union(*var_sets)) == 40 + 3 * 60
    for a in adatas:
        positions = [int(name.removeprefix("gene_")) for name in a.var_names]
        assert positions == sorted(positions)
        _assert_canonical_csr(a.X)
    # A gene keeps its symbol across files.
    shared = sorted(set.intersection(*var_sets))
    symbols = [a.var.loc[shared, "gene_symbol"].tolist() for a in adatas]
    assert symbols[0] == symbols[1] == symbols[2]
    donors = [set(a.obs["donor"].cat.categories) for a in adatas]
    assert donors[0] == {"donor_0", "donor_1"}
    assert not donors[0] & donors[1]
    obs_names = np.concatenate([a.obs_names for a in adatas])
    assert len(set(obs_names)) == len(obs_names)
    assert (adatas[0].X != adatas[1].X).nnz > 0


def test_write_h5ad_files_full_overlap(tmp_path) -> None:
    paths = write_h5ad_files(tmp_path, 2, [30, 50], 60, seed=2)
    adatas = [ad.read_h5ad(p) for p in paths]
    assert [a.n_obs for a in adatas] == [30, 50]
    assert list(adatas[0].var_names) == list(adatas[1].var_names) == [f"gene_{j}" for j in range(60)]
    with pytest.raises(TypeError, match="var_names"):
        write_h5ad_files(tmp_path, 1, 10, 10, var_names=["a"] * 10)


def test_write_h5ad_roundtrip(tmp_path) -> None:
    (path,) = write_h5ad_files(tmp_path, 1, 200, 80, seed=3)
    adata = ad.read_h5ad(path)
    assert isinstance(adata.X, sp.csr_matrix)
    assert adata.obs["barcode"].is_unique
    assert not isinstance(adata.obs["barcode"].dtype, pd.CategoricalDtype)
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)
    np.testing.assert_array_equal(adata.obs["n_counts"], np.asarray(adata.X.sum(axis=1)).ravel())


def test_fixtures(h5ad_files, zarr_input, rng) -> None:
    assert len(h5ad_files) == 3
    adatas = [ad.read_h5ad(p) for p in h5ad_files]
    assert [a.n_obs for a in adatas] == [400, 550, 700]
    assert set(adatas[0].var_names) != set(adatas[1].var_names)
    z = ad.read_zarr(zarr_input)
    assert z.shape == (600, 250)
    assert isinstance(rng, np.random.Generator)
