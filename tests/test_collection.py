"""`annbatch.Collection` and `add_adatas`: round trip, append, groupby, determinism, shuffle quality, errors."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from anndata.utils import make_index_unique

import annbatch
from annbatch import Collection, CollectionError, InputError
from annbatch.synthetic import make_adata, write_h5ad_files

ENCODING = {"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}


# -- helpers -----------------------------------------------------------------------------------------------
def _csr(x) -> sp.csr_matrix:
    """A scipy CSR with int64 index arrays (readers hand back uint16 indices, which scipy dislikes)."""
    return sp.csr_matrix(
        (np.asarray(x.data), np.asarray(x.indices, dtype=np.int64), np.asarray(x.indptr, dtype=np.int64)),
        shape=x.shape,
    )


def _dense(x) -> np.ndarray:
    return _csr(x).toarray() if sp.issparse(x) else np.asarray(x)


def load_collection(coll: Collection) -> ad.AnnData:
    """The whole collection in memory, datasets concatenated in order, each read with plain anndata."""
    parts = [ad.io.read_elem(group) for group in coll]
    assert parts, "collection is empty"
    for p in parts:
        assert p.var_names.equals(parts[0].var_names)
    if sp.issparse(parts[0].X):
        X = sp.vstack([_csr(p.X) for p in parts], format="csr")
    else:
        X = np.concatenate([p.X for p in parts])
    obsm = {k: np.concatenate([p.obsm[k] for p in parts]) for k in parts[0].obsm}
    obs = pd.concat([p.obs for p in parts])
    return ad.AnnData(X=X, obs=obs, var=parts[0].var, obsm=obsm)


def _same_values(actual: pd.Series, expected: pd.Series) -> bool:
    a, e = actual.to_numpy(), expected.to_numpy()
    if isinstance(actual.dtype, pd.CategoricalDtype) or isinstance(expected.dtype, pd.CategoricalDtype):
        a, e = np.asarray(a, dtype=object), np.asarray(e, dtype=object)
    return bool(pd.Series(a).equals(pd.Series(e)))


def assert_rows_match(coll_adata: ad.AnnData, inputs: list[tuple[str, ad.AnnData]]) -> None:
    """Every input row appears exactly once, with identical X (in the collection's var space), obs, obsm."""
    assert coll_adata.obs_names.is_unique
    assert coll_adata.n_obs == sum(a.n_obs for _, a in inputs)
    position = pd.Series(np.arange(coll_adata.n_obs), index=coll_adata.obs_names)
    X = _csr(coll_adata.X) if sp.issparse(coll_adata.X) else coll_adata.X
    for name, adata in inputs:
        rows = position[adata.obs_names].to_numpy()  # KeyError if a row is missing
        assert (coll_adata.obs["src_path"].iloc[rows].astype(str) == name).all()
        cols = coll_adata.var_names.get_indexer(adata.var_names)
        keep = cols >= 0
        got = _dense(X[rows])
        assert np.array_equal(got[:, cols[keep]], _dense(adata.X)[:, keep]), name
        others = np.setdiff1d(np.arange(coll_adata.n_vars), cols[keep])
        assert not got[:, others].any(), f"{name}: genes it lacks must be 0"
        for col in adata.obs.columns:
            assert _same_values(coll_adata.obs[col].iloc[rows], adata.obs[col]), (name, col)
        for key in adata.obsm:
            if key in coll_adata.obsm:
                assert np.array_equal(coll_adata.obsm[key][rows], np.asarray(adata.obsm[key])), (name, key)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` by relative name, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def content(path: Path) -> dict[str, bytes]:
    """Every metadata document byte for byte, and every array's decoded values as bytes.

    Shard files themselves may differ in the order of their inner chunks (encoded in parallel), so
    determinism is judged on what a reader sees.
    """
    out = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("zarr.json"))}
    root = zarr.open_group(path, mode="r")
    for name, arr in root.members(max_depth=None):
        if isinstance(arr, zarr.Array):
            values = arr[...]
            out[f"{name}:values"] = (
                values.tobytes() if values.dtype != object else repr(values.tolist()).encode()
            )
    return out


def assert_nothing_written(path: Path) -> None:
    if not path.exists():
        return
    names = [p.name for p in path.iterdir()]
    assert not [n for n in names if n.startswith("dataset_")], names
    assert ".staging" not in names


def _entropy(labels: np.ndarray, n_values: int) -> float:
    p = np.bincount(labels, minlength=n_values) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _window_entropy(runs: list[np.ndarray], n_values: int, window: int = 256) -> float:
    values = [
        _entropy(r[s : s + window], n_values) for r in runs for s in range(0, len(r) - window + 1, window)
    ]
    return float(np.mean(values))


def _read(paths) -> list[tuple[str, ad.AnnData]]:
    return [(str(p), ad.read_h5ad(p)) for p in paths]


def _codes(frame: pd.DataFrame, col: str) -> np.ndarray:
    return frame[col].cat.codes.to_numpy()


ADD = {"seed": 0, "dataset_size": 300, "shuffle_chunk_size": 50, "progress": False}
# Fewer, larger datasets where several are not the point: each dataset costs a fixed write overhead.
FEW = {**ADD, "dataset_size": 1000}


@pytest.fixture(scope="module")
def dense_h5ad_files(tmp_path_factory) -> list[Path]:
    return write_h5ad_files(
        tmp_path_factory.mktemp("dense_files"), 2, [350, 450], 80, overlap=0.5, seed=3, dense=True
    )


@pytest.fixture(scope="module")
def base_collection(tmp_path_factory, h5ad_files) -> Path:
    """A finished collection of the first two fixture files; copy it before changing it."""
    path = tmp_path_factory.mktemp("base") / "base.zarr"
    Collection(path).add_adatas(h5ad_files[:2], **ADD)
    return path


@pytest.fixture
def base_copy(tmp_path, base_collection) -> Path:
    path = tmp_path / "coll.zarr"
    shutil.copytree(base_collection, path)
    return path


def _mini(n_obs: int, prefix: str, n_vars: int = 6, **obs) -> ad.AnnData:
    """A small sparse AnnData with only the given obs columns (cheap to write)."""
    rng = np.random.default_rng(n_obs + len(prefix))
    return ad.AnnData(
        X=sp.random(n_obs, n_vars, density=0.5, format="csr", dtype=np.float32, random_state=rng),
        obs=pd.DataFrame(obs, index=[f"{prefix}_{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)]),
    )


# -- layout and reading ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_collection(tmp_path_factory, h5ad_files) -> Path:
    """All three fixture files converted with ``ADD``; read-only."""
    path = tmp_path_factory.mktemp("full") / "coll.zarr"
    Collection(path).add_adatas(h5ad_files, **ADD)
    return path


def test_empty_collection(tmp_path, h5ad_files):
    path = tmp_path / "coll.zarr"
    coll = annbatch.DatasetCollection(path)
    assert annbatch.DatasetCollection is Collection
    assert coll.is_empty
    assert len(coll) == 0
    assert list(coll) == []
    assert coll.n_obs == 0 and coll.n_vars == 0
    assert "empty" in repr(coll)
    with pytest.raises(CollectionError, match="empty"):
        coll.obs()
    with pytest.raises(CollectionError, match="empty"):
        coll.var  # noqa: B018
    assert json.loads((path / "zarr.json").read_text())["attributes"] == ENCODING
    returned = coll.add_adatas(h5ad_files[0], **FEW)
    assert returned is coll
    assert coll.n_obs == 400


def test_layout_and_accessors(full_collection, h5ad_files):
    path = full_collection
    coll = Collection(path, mode="r")

    root = json.loads((path / "zarr.json").read_text())
    assert root["zarr_format"] == 3
    assert root["node_type"] == "group"
    assert {k: root["attributes"][k] for k in ENCODING} == ENCODING
    keys = coll.dataset_keys
    assert keys == [f"dataset_{i}" for i in range(len(keys))]
    assert len(keys) >= 5  # 1,650 rows at 300 per dataset
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == sorted(keys)
    assert len(coll) == len(keys)

    groups = list(coll)
    assert all(isinstance(g, zarr.Group) for g in groups)
    assert [g.basename for g in groups] == keys
    sizes = [ad.read_zarr(path / k).n_obs for k in keys]
    assert coll.n_obs == sum(sizes) == 1650
    assert max(sizes) <= 300
    assert coll.n_vars == 360  # 120 shared + 3 × 80 own genes

    var = coll.var
    assert isinstance(var, pd.DataFrame)
    assert len(var) == 360 and var.index.is_unique
    expected_genes = set().union(*(set(ad.read_h5ad(p, backed="r").var_names) for p in h5ad_files))
    assert set(var.index) == expected_genes

    obs = coll.obs()
    assert len(obs) == 1650
    assert {"cell_type", "donor", "n_counts", "is_doublet", "barcode", "src_path"} <= set(obs.columns)
    for col in ("cell_type", "donor", "src_path"):
        assert isinstance(obs[col].dtype, pd.CategoricalDtype), col
    assert list(obs["src_path"].cat.categories) == [str(p) for p in h5ad_files]
    # Obs come in collection order: dataset by dataset.
    per_dataset = pd.concat([ad.io.read_elem(g["obs"]) for g in coll])
    assert obs.index.equals(per_dataset.index)
    sub = coll.obs(columns=["donor"])
    assert list(sub.columns) == ["donor"]
    assert sub.index.equals(obs.index)
    assert coll.obs(columns=[]).shape == (1650, 0)
    with pytest.raises(KeyError, match="nope"):
        coll.obs(columns=["nope"])

    text = repr(coll)
    assert f"{len(keys)} datasets" in text
    assert "1,650 obs" in text and "360 vars" in text
    assert "csr" in text and "float32" in text and "on disk" in text

    # Reopening read-only gives the same view.
    again = Collection(path, mode="r")
    assert again.dataset_keys == keys
    assert again.obs().equals(obs)


def test_many_datasets_sort_numerically(tmp_path):
    tiny = _mini(110, "c")
    coll = Collection(tmp_path / "coll.zarr").add_adatas(
        tiny, seed=0, dataset_size=10, shuffle_chunk_size=2, progress=False
    )
    assert len(coll) == 11
    assert coll.dataset_keys == [f"dataset_{i}" for i in range(11)]
    assert [g.basename for g in coll] == coll.dataset_keys
    assert "rows per dataset: 10, 10" in repr(coll) and "…" in repr(coll)
    obs = coll.obs([])
    assert list(obs.index) == [n for g in coll for n in ad.io.read_elem(g["obs"]).index]
    assert_rows_match(load_collection(coll), [("<AnnData #0>", tiny)])


# -- round trip --------------------------------------------------------------------------------------------
def test_round_trip_sparse_outer_join(full_collection, h5ad_files):
    coll = Collection(full_collection, mode="r")
    full = load_collection(coll)
    assert sp.issparse(full.X)
    assert full.X.dtype == np.float32
    inputs = _read(h5ad_files)
    assert_rows_match(full, inputs)
    assert "X_pca" in full.obsm
    # Union of var names, in first-seen order.
    union = list(dict.fromkeys(g for _, a in inputs for g in a.var_names))
    assert list(full.var_names) == union
    # Each dataset is a mix of files (blocks were dealt at random).
    mixed = [ad.io.read_elem(g["obs"])["src_path"].nunique() for g in coll]
    assert max(mixed) > 1


def test_round_trip_dense(tmp_path, dense_h5ad_files):
    coll = Collection(tmp_path / "coll.zarr").add_adatas(dense_h5ad_files, **{**ADD, "dataset_size": 400})
    full = load_collection(coll)
    assert isinstance(full.X, np.ndarray)
    assert full.X.dtype == np.float32
    assert full.n_vars == 40 + 2 * 40
    assert_rows_match(full, _read(dense_h5ad_files))
    x = next(iter(coll))["X"]
    assert isinstance(x, zarr.Array)
    assert x.shards is not None and x.shards[1:] == x.shape[1:]


def test_round_trip_inner_join(tmp_path, h5ad_files):
    coll = Collection(tmp_path / "coll.zarr").add_adatas(h5ad_files, join="inner", **FEW)
    inputs = _read(h5ad_files)
    shared = [g for g in inputs[0][1].var_names if all(g in a.var_names for _, a in inputs)]
    assert list(coll.var.index) == shared
    assert coll.n_vars == 120
    full = load_collection(coll)
    assert_rows_match(full, inputs)


def test_round_trip_var_subset(tmp_path, h5ad_files):
    inputs = _read(h5ad_files)
    # Some shared genes and some of one file only, in an order of our choosing.
    subset = [*inputs[2][1].var_names[::-7], *inputs[0][1].var_names[:5]]
    subset = list(dict.fromkeys(subset))
    coll = Collection(tmp_path / "coll.zarr").add_adatas(h5ad_files, var_subset=subset, **FEW)
    assert list(coll.var.index) == subset
    assert_rows_match(load_collection(coll), inputs)
    with pytest.raises(InputError, match="not_a_gene"):
        Collection(tmp_path / "bad.zarr").add_adatas(h5ad_files, var_subset=["not_a_gene"], **ADD)
    assert_nothing_written(tmp_path / "bad.zarr")


def test_round_trip_mixed_sources(tmp_path, h5ad_files, zarr_input):
    mem = make_adata(120, 60, seed=4, obs_prefix="mem")
    mem.layers["counts"] = mem.X.copy()
    with pytest.warns(UserWarning, match=r"only some inputs.*layers/counts"):
        coll = Collection(tmp_path / "coll.zarr").add_adatas([h5ad_files[0], zarr_input, mem], **FEW)
    assert all("counts" not in ad.io.read_elem(g).layers for g in coll)
    full = load_collection(coll)
    inputs = [(str(h5ad_files[0]), ad.read_h5ad(h5ad_files[0])), (str(zarr_input), ad.read_zarr(zarr_input)),
              ("<AnnData #2>", mem)]  # fmt: skip
    assert_rows_match(full, inputs)
    assert list(full.obs["src_path"].cat.categories) == [name for name, _ in inputs]


@pytest.mark.parametrize(
    ("fmt", "dense", "subset"),
    [("zarr", False, False), ("h5ad", False, False), ("zarr", True, False), ("zarr", False, True)],
    ids=["zarr-csr", "h5ad-csr", "zarr-dense", "zarr-csr-subset"],
)
def test_round_trip_read_lazy(tmp_path, fmt, dense, subset):
    """AnnData from ``anndata.experimental.read_lazy`` (dask X, obs as a Dataset2D) convert without loading."""
    pytest.importorskip("dask")
    pytest.importorskip("xarray")
    source = make_adata(700, 50, seed=8, dense=dense, obs_prefix="lazy")
    path = tmp_path / f"source.{fmt}"
    if fmt == "zarr":
        with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
            source.write_zarr(path)
    else:
        source.write_h5ad(path)
    lazy = ad.experimental.read_lazy(path)
    if subset:
        keep = np.arange(700) % 3 != 0
        lazy, source = lazy[keep], source[keep].copy()
    del source.obsm["X_pca"]  # read_lazy reads obsm too; compare X and obs
    coll = Collection(tmp_path / "coll.zarr").add_adatas([lazy], **ADD)
    full = load_collection(coll)
    assert isinstance(full.X, np.ndarray) == dense
    assert_rows_match(full, [("<AnnData #0>", source)])


def test_load_adata_and_memory_limit(tmp_path, h5ad_files):
    opened = []

    def load(path: str) -> ad.AnnData:
        opened.append(path)
        return ad.read_h5ad(path, backed="r")

    coll = Collection(tmp_path / "coll.zarr").add_adatas(
        h5ad_files, load_adata=load, seed=0, dataset_size=100_000, shuffle_chunk_size=10,
        memory_limit="250KB", progress=False,
    )  # fmt: skip
    assert opened == [str(p) for p in h5ad_files]
    assert len(coll) > 1  # the memory limit, not dataset_size, bounds the datasets
    assert_rows_match(load_collection(coll), _read(h5ad_files))


def _with_var(genes: list[str], flag: list[bool], prefix: str) -> ad.AnnData:
    adata = make_adata(60, len(genes), seed=len(prefix), var_names=genes, obs_prefix=prefix)
    adata.var = pd.DataFrame({"sym": [g.upper() for g in genes], "flag": flag}, index=genes)
    return adata


def test_var_merge(tmp_path):
    a = _with_var(["g0", "g1", "g2"], [True, False, True], "a")
    b = _with_var(["g1", "g2", "g3"], [True, True, False], "b")  # flag of g1 disagrees
    none = Collection(tmp_path / "none.zarr").add_adatas([a, b], merge=None, **FEW)
    assert list(none.var.index) == ["g0", "g1", "g2", "g3"]
    assert list(none.var.columns) == []
    first = Collection(tmp_path / "first.zarr").add_adatas([a, b], merge="first", **FEW)
    assert list(first.var["sym"]) == ["G0", "G1", "G2", "G3"]
    assert first.var["flag"].astype(str).tolist() == ["True", "False", "True", "False"]
    same = Collection(tmp_path / "same.zarr").add_adatas([a, b], merge="same", **FEW)
    assert list(same.var["sym"]) == ["G0", "G1", "G2", "G3"]
    assert "flag" not in same.var.columns
    with pytest.raises(ValueError, match="merge"):
        Collection(tmp_path / "bad.zarr").add_adatas([a, b], merge="union", **FEW)
    assert_nothing_written(tmp_path / "bad.zarr")


def test_var_merge_keeps_bool_dtype(tmp_path):
    a = _with_var(["g0", "g1"], [True, False], "a")
    b = _with_var(["g1", "g2"], [False, True], "b")
    coll = Collection(tmp_path / "first.zarr").add_adatas([a, b], merge="first", **FEW)
    assert coll.var["flag"].dtype == bool


def test_var_merge_same_three_inputs(tmp_path):
    a = _with_var(["g0", "g1"], [True, False], "a")
    b = _with_var(["g0", "g1"], [True, True], "b")  # flag disagrees with a
    c = _with_var(["g0", "g1"], [True, True], "c")
    coll = Collection(tmp_path / "same.zarr").add_adatas([a, b, c], merge="same", **FEW)
    assert "flag" not in coll.var.columns
    assert list(coll.var["sym"]) == ["G0", "G1"]


def test_var_merge_strategies_of_anndata_concat(tmp_path):
    """`merge` follows anndata.concat: "same" needs a column in every input, "unique" in any, "only" in one."""
    a = _with_var(["g0", "g1", "g2"], [True, False, True], "a")
    b = _with_var(["g1", "g2", "g3"], [True, True, False], "b")  # flag of g1 disagrees
    a.var["only_a"] = [1.0, 2.0, 3.0]  # in one input only
    b.var["only_b"] = ["x", "y", "z"]
    merged = {
        merge: Collection(tmp_path / f"{merge}.zarr").add_adatas([a, b], merge=merge, **FEW).var
        for merge in ("same", "unique", "first", "only")
    }
    assert list(merged["same"].columns) == ["sym"]  # in both inputs, agreeing
    assert sorted(merged["unique"].columns) == ["only_a", "only_b", "sym"]  # agreeing, in any input
    assert sorted(merged["first"].columns) == ["flag", "only_a", "only_b", "sym"]
    assert sorted(merged["only"].columns) == ["only_a", "only_b"]  # in exactly one input
    for var in merged.values():
        assert list(var.index) == ["g0", "g1", "g2", "g3"]
    for merge in ("unique", "first", "only"):
        np.testing.assert_array_equal(merged[merge]["only_a"], [1.0, 2.0, 3.0, np.nan])
        assert merged[merge]["only_b"].tolist()[1:] == ["x", "y", "z"]
        assert pd.isna(merged[merge]["only_b"].iloc[0])
    assert list(merged["unique"]["sym"]) == ["G0", "G1", "G2", "G3"]
    assert merged["first"]["flag"].astype(str).tolist() == ["True", "False", "True", "False"]
    with pytest.raises(ValueError, match="'same', 'unique', 'first' or 'only'"):
        Collection(tmp_path / "bad.zarr").add_adatas([a, b], merge="union", **FEW)
    assert_nothing_written(tmp_path / "bad.zarr")


def test_obs_names_made_unique(tmp_path):
    a = make_adata(200, 30, seed=1)
    b = make_adata(150, 30, seed=2)  # same names cell_0 … cell_149
    coll = Collection(tmp_path / "coll.zarr").add_adatas([a, b], **FEW)
    obs = coll.obs(["src_path", "n_counts"])
    assert obs.index.is_unique and len(obs) == 350
    expected = make_index_unique(pd.Index([*a.obs_names, *b.obs_names]))
    assert set(obs.index) == set(expected)
    from_a = obs[obs["src_path"] == "<AnnData #0>"]
    assert set(from_a.index) == set(a.obs_names)  # first occurrences keep their names
    from_b = obs[obs["src_path"] == "<AnnData #1>"]
    assert set(from_b.index) == set(expected[200:])
    assert from_b.loc[expected[200], "n_counts"] == b.obs["n_counts"].iloc[0]
    # The inputs themselves are not renamed.
    assert list(b.obs_names[:2]) == ["cell_0", "cell_1"]


def test_shuffle_false_keeps_input_order(tmp_path, h5ad_files):
    coll = Collection(tmp_path / "coll.zarr").add_adatas(
        h5ad_files, shuffle=False, dataset_size=900, shuffle_chunk_size=50, progress=False
    )
    names = [n for p in h5ad_files for n in ad.read_h5ad(p, backed="r").obs_names]
    assert list(coll.obs([]).index) == names


# -- append ------------------------------------------------------------------------------------------------
def test_append(tmp_path, h5ad_files):
    path = tmp_path / "coll.zarr"
    coll = Collection(path).add_adatas(h5ad_files[:2], seed=0, dataset_size=300, shuffle_chunk_size=10,
                                       progress=False)  # fmt: skip
    before = load_collection(coll)
    old_keys = coll.dataset_keys
    old_var = coll.var
    old_donors = list(before.obs["donor"].cat.categories)
    assert len(old_keys) == 4

    with pytest.warns(UserWarning, match="not in the collection are dropped"):
        Collection(path).add_adatas(h5ad_files[2], seed=1, dataset_size=300, shuffle_chunk_size=10,
                                    progress=False)  # fmt: skip
    coll = Collection(path)
    after = load_collection(coll)
    assert coll.n_obs == 1650
    assert coll.var.index.equals(old_var.index)  # var subset to the collection's
    assert coll.dataset_keys[: len(old_keys)] == old_keys

    # Old rows unchanged, new rows present with values restricted to the collection's var.
    assert_rows_match(
        after, [(str(p), a) for p, a in zip(h5ad_files, [ad.read_h5ad(p) for p in h5ad_files], strict=True)]
    )
    old = after[before.obs_names]
    assert (_csr(old.X) != _csr(before.X)).nnz == 0
    for col in before.obs.columns:
        assert _same_values(old.obs[col], before.obs[col]), col

    # New rows are spread over every existing dataset (there are 70 blocks of 10 rows).
    new_name = str(h5ad_files[2])
    for key in old_keys:
        src = ad.io.read_elem(coll.group[key]["obs"])["src_path"].astype(str)
        assert (src == new_name).sum() > 0, key

    # Categories: union; existing keep their order, new ones at the end.
    donors = list(after.obs["donor"].cat.categories)
    assert donors[: len(old_donors)] == old_donors
    assert set(donors[len(old_donors) :]) == {f"donor_{i}" for i in range(8, 12)}
    assert list(after.obs["src_path"].cat.categories) == [str(p) for p in h5ad_files]
    # …identically in every dataset, so integer codes mean the same everywhere.
    for col in ("donor", "cell_type", "src_path"):
        cats = {tuple(ad.io.read_elem(g["obs"])[col].cat.categories) for g in coll}
        assert len(cats) == 1, col


def test_append_categories_order_and_unused_kept(tmp_path):
    a = _mini(
        200,
        "a",
        grp=pd.Categorical(np.array(["b", "a"])[np.arange(200) % 2], categories=["b", "a", "unused"]),
    )
    path = tmp_path / "coll.zarr"
    Collection(path).add_adatas(a, seed=0, dataset_size=100, shuffle_chunk_size=10, progress=False)
    b = _mini(200, "b", grp=pd.Categorical(np.array(["c", "a"])[np.arange(200) % 2], categories=["c", "a"]))
    coll = Collection(path).add_adatas(b, seed=1, dataset_size=200, shuffle_chunk_size=10, progress=False)
    assert len(coll) == 2
    for g in coll:  # both datasets were rebuilt with old and new rows
        assert set(ad.io.read_elem(g["obs"])["grp"].astype(str)) == {"a", "b", "c"}
    obs = coll.obs()
    assert isinstance(obs["grp"].dtype, pd.CategoricalDtype)
    assert list(obs["grp"].cat.categories) == ["b", "a", "unused", "c"]
    assert_rows_match(load_collection(coll), [("<AnnData #0>", a), ("<AnnData #1>", b)])


def _append_to_full(tmp_path: Path) -> Collection:
    """600 rows in 2 full datasets of 300, then 600 more rows with new donor categories."""
    path = tmp_path / "coll.zarr"
    a = _mini(600, "a", donor=pd.Categorical(np.array(["d0", "d1"])[np.arange(600) % 2]))
    Collection(path).add_adatas(a, seed=0, dataset_size=300, shuffle_chunk_size=10, progress=False)
    b = _mini(600, "b", donor=pd.Categorical(np.array(["d1", "d2"])[np.arange(600) % 2]))
    coll = Collection(path).add_adatas(b, seed=1, dataset_size=300, shuffle_chunk_size=10, progress=False)
    assert coll.n_obs == 1200
    return coll


def test_append_to_full_datasets_keeps_categories_consistent(tmp_path):
    coll = _append_to_full(tmp_path)
    cats = {tuple(ad.io.read_elem(g["obs"])["donor"].cat.categories) for g in coll}
    assert cats == {("d0", "d1", "d2")}
    assert isinstance(coll.obs()["donor"].dtype, pd.CategoricalDtype)


def test_append_to_full_datasets_spreads_new_rows(tmp_path):
    coll = _append_to_full(tmp_path)
    for key in ("dataset_0", "dataset_1"):
        names = ad.io.read_elem(coll.group[key]["obs"]).index
        assert names.str.startswith("b_").any(), key


def test_append_with_same_columns_no_spurious_obs_warning(tmp_path, h5ad_files):
    path = tmp_path / "coll.zarr"
    Collection(path).add_adatas(h5ad_files[0], **FEW)
    again = ad.read_h5ad(h5ad_files[0])
    again.obs_names = [f"again_{i}" for i in range(again.n_obs)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Collection(path).add_adatas(again, **FEW)
    assert not [w for w in record if "only some inputs" in str(w.message)]


def test_append_obs_names_stay_unique(tmp_path):
    path = tmp_path / "coll.zarr"
    a = make_adata(200, 20, seed=1)
    Collection(path).add_adatas(a, **FEW)
    b = make_adata(100, 20, seed=2)  # cell_0 … cell_99 again
    coll = Collection(path).add_adatas(b, **FEW)
    obs = coll.obs(["n_counts"])
    assert obs.index.is_unique and len(obs) == 300
    assert set(a.obs_names) <= set(obs.index)  # existing rows never change names
    assert obs.loc["cell_0-1", "n_counts"] == b.obs["n_counts"].iloc[0]


def test_append_dense_to_sparse_rejected(base_copy, dense_h5ad_files):
    before = snapshot(base_copy)
    with pytest.raises(InputError, match="csr|dense"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # about var names outside the collection
        Collection(base_copy).add_adatas(dense_h5ad_files[0], **ADD)
    assert snapshot(base_copy) == before


def test_dataset_size_is_an_upper_bound_with_large_blocks(tmp_path):
    """Blocks of shuffle_chunk_size rows larger than a dataset are split between datasets."""
    inputs = [_mini(400, "a"), _mini(550, "b")]
    coll = Collection(tmp_path / "coll.zarr").add_adatas(inputs, seed=0, dataset_size=300, progress=False)
    sizes = [ad.io.read_elem(g["obs"]).shape[0] for g in coll]
    assert max(sizes) <= 300
    assert sum(sizes) == 950
    assert coll.dataset_keys == [f"dataset_{i}" for i in range(len(coll))]
    assert_rows_match(load_collection(coll), [("<AnnData #0>", inputs[0]), ("<AnnData #1>", inputs[1])])


def test_append_after_gap_in_dataset_keys_keeps_rows_once(tmp_path):
    path = tmp_path / "coll.zarr"
    a = _mini(300, "a")
    Collection(path).add_adatas(a, seed=0, dataset_size=100, shuffle_chunk_size=10, progress=False)
    # A collection whose keys have a gap (another writer, or a dataset removed by hand).
    shutil.rmtree(path / "dataset_1")
    coll = Collection(path)
    assert coll.dataset_keys == ["dataset_0", "dataset_2"]
    kept = set(coll.obs([]).index)
    assert len(kept) == 200
    for dataset_size in (1000, 100):  # top up the existing datasets; then add new ones
        d = _mini(100, f"d{dataset_size}")
        before = set(coll.obs([]).index)
        coll = Collection(path).add_adatas(d, seed=0, dataset_size=dataset_size, shuffle_chunk_size=10,
                                           progress=False)  # fmt: skip
        names = coll.obs([]).index
        assert names.is_unique
        assert set(names) == before | set(d.obs_names)
    assert len(coll.obs([])) == 400
    assert kept <= set(coll.obs([]).index)


# -- groupby -----------------------------------------------------------------------------------------------
def _input_positions(obs: pd.DataFrame, h5ad_files) -> np.ndarray:
    """Global position of each collection row in the concatenated inputs."""
    names = [n for p in h5ad_files for n in ad.read_h5ad(p, backed="r").obs_names]
    return pd.Series(np.arange(len(names)), index=names)[obs.index].to_numpy()


@pytest.mark.parametrize("groupby", ["donor", ["donor", "cell_type"]])
def test_groupby_sorts_within_datasets(tmp_path, h5ad_files, groupby):
    coll = Collection(tmp_path / "coll.zarr").add_adatas(
        h5ad_files, groupby=groupby, **{**ADD, "dataset_size": 600}
    )
    assert len(coll) == 3
    cols = [groupby] if isinstance(groupby, str) else groupby
    assert_rows_match(load_collection(coll), _read(h5ad_files))
    n_checked = 0
    for g in coll:
        obs = ad.io.read_elem(g["obs"])
        keys = np.stack([_codes(obs, c) for c in cols], axis=1)
        # Lexicographically non-decreasing.
        assert all(tuple(keys[i]) <= tuple(keys[i + 1]) for i in range(len(keys) - 1))
        pos = _input_positions(obs, h5ad_files)
        _, starts = np.unique(keys, axis=0, return_index=True)
        bounds = [*sorted(starts), len(keys)]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if hi - lo >= 10:
                run = pos[lo:hi]
                assert not np.all(np.diff(run) > 0), "rows within a group keep input order: not shuffled"
                n_checked += 1
    assert n_checked > 5


def test_appends_keep_the_collections_groupby(tmp_path, h5ad_files):
    coll = Collection(tmp_path / "coll.zarr").add_adatas(h5ad_files[:2], groupby="donor", **ADD)
    assert coll.group.attrs["groupby"] == ["donor"]
    coll.add_adatas(h5ad_files[2:], **{**ADD, "seed": 1})  # no groupby: the collection's own is kept
    assert Collection(tmp_path / "coll.zarr", mode="r").group.attrs["groupby"] == ["donor"]
    for g in coll:
        codes = _codes(ad.io.read_elem(g["obs"]), "donor")
        assert np.all(np.diff(codes) >= 0), "appended datasets are sorted by donor too"
    loader = coll.loader(batch_size=8, chunk_size=8, preload_nchunks=2, batch_key="donor",
                         batch_sampler="homogeneous", seed=0)  # fmt: skip
    assert all(len(set(b["batch"].tolist())) == 1 for b in loader)
    before = coll.n_obs
    with pytest.raises(InputError, match=r"groupby=\['donor'\].*groupby=\['cell_type'\]"):
        coll.add_adatas(h5ad_files[:1], groupby="cell_type", **ADD)
    assert coll.n_obs == before, "a refused append changes nothing"
    coll.add_adatas([ad.read_h5ad(h5ad_files[0])], groupby=["donor"], **ADD)  # the same one is fine


# -- determinism -------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_collection(tmp_path, h5ad_files):
    kwargs = {**ADD, "dataset_size": 200}
    a = Collection(tmp_path / "a.zarr").add_adatas(h5ad_files[0], **kwargs)
    b = Collection(tmp_path / "b.zarr").add_adatas(h5ad_files[0], **kwargs)
    c = Collection(tmp_path / "c.zarr").add_adatas(
        h5ad_files[0], **{**kwargs, "seed": None}, rng=np.random.default_rng(0)
    )
    assert len(a) >= 2
    snap = content(tmp_path / "a.zarr")
    assert snap == content(tmp_path / "b.zarr")  # identical metadata and array contents
    assert snap == content(tmp_path / "c.zarr")  # rng=default_rng(0) is seed=0
    for ga, gb in zip(a, b, strict=True):
        assert np.array_equal(ga["X/data"][:], gb["X/data"][:])
        assert np.array_equal(ga["X/indices"][:], gb["X/indices"][:])
        pd.testing.assert_frame_equal(ad.io.read_elem(ga["obs"]), ad.io.read_elem(gb["obs"]))
    assert c.obs().equals(a.obs())

    d = Collection(tmp_path / "d.zarr").add_adatas(h5ad_files[0], **{**kwargs, "seed": 1})
    assert d.n_obs == a.n_obs
    assert not d.obs([]).index.equals(a.obs([]).index)
    assert set(d.obs([]).index) == set(a.obs([]).index)

    with pytest.raises(ValueError, match="seed.*rng"):
        Collection(tmp_path / "e.zarr").add_adatas(h5ad_files, seed=0, rng=np.random.default_rng(0))
    assert_nothing_written(tmp_path / "e.zarr")


def test_same_seed_identical_append(tmp_path, h5ad_files):
    for name in ("a", "b"):
        Collection(tmp_path / name).add_adatas(h5ad_files[:2], **FEW)
        with pytest.warns(UserWarning, match="dropped"):
            Collection(tmp_path / name).add_adatas(h5ad_files[2], **{**FEW, "seed": 5})
    assert Collection(tmp_path / "a").n_obs == 1650
    assert content(tmp_path / "a") == content(tmp_path / "b")


# -- shuffle quality ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sorted_label_files(tmp_path_factory) -> list[Path]:
    """4 files × 3,000 rows whose 30-value label is sorted ascending over the whole sequence."""
    directory = tmp_path_factory.mktemp("sorted")
    rng = np.random.default_rng(0)
    n_files, n_rows, n_labels = 4, 3000, 30
    label = np.arange(n_files * n_rows) * n_labels // (n_files * n_rows)
    paths = []
    for i in range(n_files):
        X = sp.random(n_rows, 8, density=0.3, format="csr", dtype=np.float32, random_state=rng)
        lab = label[i * n_rows : (i + 1) * n_rows]
        obs = pd.DataFrame(
            {
                "label": pd.Categorical(
                    [f"L{v:02d}" for v in lab], categories=[f"L{v:02d}" for v in range(30)]
                )
            },
            index=[f"f{i}_{j}" for j in range(n_rows)],
        )
        adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{k}" for k in range(8)]))
        paths.append(directory / f"sorted_{i}.h5ad")
        adata.write_h5ad(paths[-1])
    return paths


def _label_runs(coll: Collection) -> list[np.ndarray]:
    return [_codes(ad.io.read_elem(g["obs"]), "label") for g in coll]


def test_shuffle_quality(tmp_path, sorted_label_files):
    coll = Collection(tmp_path / "coll.zarr").add_adatas(
        sorted_label_files, seed=0, dataset_size=6000, shuffle_chunk_size=10, progress=False
    )
    assert len(coll) >= 2
    runs = _label_runs(coll)
    all_labels = np.concatenate(runs)
    assert np.array_equal(np.bincount(all_labels), np.full(30, 400))
    perfect = [np.random.default_rng(1).permutation(all_labels)]
    ratio = _window_entropy(runs, 30) / _window_entropy(perfect, 30)
    assert ratio >= 0.99, ratio

    # The statistic does tell shuffled from unshuffled data apart.
    plain = Collection(tmp_path / "plain.zarr").add_adatas(
        sorted_label_files, shuffle=False, dataset_size=6000, shuffle_chunk_size=10, progress=False
    )
    assert _window_entropy(_label_runs(plain), 30) / _window_entropy(perfect, 30) < 0.3


# -- bad input ---------------------------------------------------------------------------------------------
def _adata(n_obs=100, n_vars=20, *, seed=0, prefix="x", **kwargs) -> ad.AnnData:
    return make_adata(n_obs, n_vars, seed=seed, obs_prefix=prefix, **kwargs)


def _csc_h5ad(tmp_path: Path) -> Path:
    adata = _adata()
    adata.X = adata.X.tocsc()
    adata.write_h5ad(tmp_path / "csc.h5ad")
    return tmp_path / "csc.h5ad"


def _text_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.h5ad").write_text("not an AnnData\n")
    return tmp_path / "notes.h5ad"


def _plain_zarr(tmp_path: Path) -> Path:
    group = zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3)
    group.create_array("values", shape=(10,), dtype="f4")
    return tmp_path / "plain.zarr"


def _groupby_mixed(tmp_path: Path) -> list[ad.AnnData]:
    a, b = _adata(seed=1, prefix="a"), _adata(seed=2, prefix="b")
    a.obs["batch"] = pd.Categorical(["x"] * a.n_obs)
    b.obs["batch"] = np.arange(b.n_obs)
    return [a, b]


def _groupby_missing(tmp_path: Path) -> list[ad.AnnData]:
    a, b = _adata(seed=1, prefix="a"), _adata(seed=2, prefix="b")
    a.obs["batch"] = pd.Categorical(["x"] * a.n_obs)
    return [a, b]


def _dup_var(tmp_path: Path) -> ad.AnnData:
    adata = _adata()
    adata.var_names = ["same"] * 2 + [f"g{i}" for i in range(adata.n_vars - 2)]
    return adata


BAD_INPUTS = {
    "missing file": (lambda t: [t / "nope.h5ad"], {}, r"nope\.h5ad.*does not exist"),
    "text file": (lambda t: [_text_file(t)], {}, r"notes\.h5ad.*neither"),
    "zarr without obs/var": (lambda t: [_plain_zarr(t)], {}, r"plain\.zarr.*obs"),
    "CSC on disk": (lambda t: [_csc_h5ad(t)], {}, r"(?s)csc\.h5ad.*CSC.*tocsr"),
    "groupby missing": (_groupby_missing, {"groupby": "batch"}, r"(?s)batch.*<AnnData #1>"),
    "groupby conflicting types": (_groupby_mixed, {"groupby": "batch"}, r"(?s)batch.*conflicting"),
    "zero rows": (lambda t: [_adata(prefix="a"), _adata(0, prefix="b")], {}, r"<AnnData #1>.*no rows"),
    "non-unique var names": (lambda t: [_dup_var(t)], {}, r"(?s)<AnnData #0>.*var_names_make_unique"),
    "sparse and dense": (lambda t: [_adata(prefix="a"), _adata(prefix="b", dense=True)], {}, "sparse.*dense"),
    "valid then missing": (lambda t: [_adata(), t / "gone.zarr"], {}, r"gone\.zarr"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_writes_nothing(tmp_path, case):
    make_inputs, kwargs, pattern = BAD_INPUTS[case]
    inputs = make_inputs(tmp_path)
    path = tmp_path / "coll.zarr"
    with pytest.raises(InputError, match=pattern):
        Collection(path).add_adatas(inputs, **{**ADD, **kwargs})
    assert_nothing_written(path)
    assert Collection(path).n_obs == 0


@pytest.mark.parametrize("case", ["missing file", "CSC on disk", "zero rows", "sparse and dense"])
def test_bad_input_leaves_collection_unchanged(base_copy, tmp_path, case):
    make_inputs, kwargs, pattern = BAD_INPUTS[case]
    inputs = make_inputs(tmp_path)
    before = snapshot(base_copy)
    with pytest.raises(InputError, match=pattern):
        Collection(base_copy).add_adatas(inputs, **{**ADD, **kwargs})
    assert snapshot(base_copy) == before


def test_csc_in_memory_converted_with_warning(tmp_path):
    adata = _adata(300)
    expected = adata.copy()
    adata.X = adata.X.tocsc()
    with pytest.warns(UserWarning, match="CSC"):
        coll = Collection(tmp_path / "coll.zarr").add_adatas(adata, **FEW)
    assert_rows_match(load_collection(coll), [("<AnnData #0>", expected)])
    assert next(iter(coll))["X"].attrs["encoding-type"] == "csr_matrix"


def test_mismatched_dtypes_promoted(tmp_path):
    a = _adata(200, seed=1, prefix="a", dtype=np.float32)
    b = _adata(200, seed=2, prefix="b", dtype=np.float64)
    with pytest.warns(UserWarning, match="promoting to float64"):
        coll = Collection(tmp_path / "coll.zarr").add_adatas([a, b], **FEW)
    for g in coll:
        assert g["X/data"].dtype == np.float64
    assert_rows_match(load_collection(coll), [("<AnnData #0>", a), ("<AnnData #1>", b)])


def test_obs_column_in_some_inputs_filled_with_nan(tmp_path):
    a = _adata(200, seed=1, prefix="a")
    b = _adata(200, seed=2, prefix="b")
    a.obs["score"] = np.linspace(0, 1, a.n_obs)
    a.obs["tissue"] = pd.Categorical(["lung"] * a.n_obs)
    with pytest.warns(UserWarning, match=r"only some inputs.*score|score.*only some"):
        coll = Collection(tmp_path / "coll.zarr").add_adatas([a, b], **FEW)
    obs = coll.obs()
    from_b = obs["src_path"] == "<AnnData #1>"
    assert obs.loc[from_b, "score"].isna().all()
    assert obs.loc[from_b, "tissue"].isna().all()
    assert np.allclose(obs.loc[a.obs_names, "score"], a.obs["score"])
    assert (obs.loc[a.obs_names, "tissue"] == "lung").all()


def test_layers_in_some_inputs_dropped(tmp_path):
    a = _adata(200, seed=1, prefix="a")
    b = _adata(200, seed=2, prefix="b")
    a.layers["counts"] = a.X.copy()
    with pytest.warns(UserWarning, match="layers/counts"):
        coll = Collection(tmp_path / "coll.zarr").add_adatas([a, b], **FEW)
    for g in coll:
        assert "counts" not in ad.io.read_elem(g).layers
    both = [_adata(200, seed=1, prefix="a"), _adata(200, seed=2, prefix="b")]
    for x in both:
        x.layers["counts"] = x.X.copy()
    coll = Collection(tmp_path / "both.zarr").add_adatas(both, **FEW)
    for g in coll:
        back = ad.io.read_elem(g)
        assert (_csr(back.layers["counts"]) != _csr(back.X)).nnz == 0


def test_existing_non_collection_directory_untouched(tmp_path, zarr_input):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    before = snapshot(folder)
    with pytest.raises(CollectionError, match="stuff"):
        Collection(folder)
    assert snapshot(folder) == before

    group_path = tmp_path / "group.zarr"
    zarr.open_group(group_path, mode="w", zarr_format=3).create_array("a", shape=(3,), dtype="i4")
    before = snapshot(group_path)
    with pytest.raises(CollectionError, match="not an annbatch collection"):
        Collection(group_path)
    assert snapshot(group_path) == before

    before = snapshot(zarr_input)  # an AnnData store is not a collection either
    with pytest.raises(CollectionError, match="not an annbatch collection"):
        Collection(zarr_input)
    assert snapshot(zarr_input) == before

    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(CollectionError, match="file"):
        Collection(tmp_path / "file.zarr")


def test_modes(tmp_path, base_copy, h5ad_files):
    with pytest.raises(CollectionError, match="No collection"):
        Collection(tmp_path / "missing.zarr", mode="r")
    assert not (tmp_path / "missing.zarr").exists()
    with pytest.raises(CollectionError, match="No collection"):
        Collection(tmp_path / "missing.zarr", mode="r+")
    with pytest.raises(ValueError, match="mode"):
        Collection(tmp_path / "x.zarr", mode="w")
    with pytest.raises(CollectionError, match="already exists"):
        Collection(base_copy, mode="w-")

    before = snapshot(base_copy)
    ro = Collection(base_copy, mode="r")
    with pytest.raises(CollectionError, match="read-only"):
        ro.add_adatas(h5ad_files[2], **ADD)
    assert snapshot(base_copy) == before

    coll = Collection(tmp_path / "new.zarr", mode="w-").add_adatas(h5ad_files[0], **FEW)
    assert coll.n_obs == 400
    assert Collection(tmp_path / "new.zarr", mode="r+").n_obs == 400


# -- zarr groups as the collection -------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["local", "memory", "local-subgroup", "memory-subgroup"])
def test_collection_from_zarr_group(tmp_path, h5ad_files, store):
    if store.startswith("local"):
        zstore = zarr.storage.LocalStore(tmp_path / "coll.zarr")
    else:
        zstore = zarr.storage.MemoryStore()
    root = zarr.open_group(zstore, mode="a", zarr_format=3)
    group = root.require_group("inner/coll") if store.endswith("subgroup") else root
    coll = Collection(group)
    coll.add_adatas(h5ad_files[0], **{**ADD, "dataset_size": 200})
    assert coll.n_obs == 400
    assert len(coll) == 2
    assert_rows_match(load_collection(coll), _read(h5ad_files[:1]))
    assert dict(group.attrs) == {**ENCODING, "groupby": []}  # the marker, and the grouping appends keep
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns about the .staging folder name, should it exist
        listing = list(group.keys())
    assert sorted(listing) == sorted(coll.dataset_keys)

    # Append through the group, then reopen from a fresh handle on the same store.
    with pytest.warns(UserWarning, match="dropped"):
        Collection(group).add_adatas(h5ad_files[1], **{**ADD, "seed": 1, "dataset_size": 1000})
    reopened = zarr.open_group(zstore, mode="r", path=group.path)
    again = Collection(reopened, mode="r")
    assert again.n_obs == 950
    assert again.obs([]).index.is_unique
    assert_rows_match(load_collection(again), _read(h5ad_files[:2]))
    if store == "local":
        assert Collection(tmp_path / "coll.zarr", mode="r").n_obs == 950
