"""Tests of obs columns as arrays (``obs_keys``), batch keys and key-aware sampling (issue 4).

Everything runs on real zarr collections written with :meth:`annbatch.Collection.add_adatas` on
``tmp_path``. Two independent references are used for every check:

- the collection read back with ``anndata.read_zarr`` (every dataset, concatenated in
  ``collection.dataset_keys`` order), so global row ``i`` of a loader is row ``i`` of that
  concatenation;
- the original in-memory inputs, matched by obs name, so labels and X rows are checked against
  what the user converted (not only against what was written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import annbatch
from annbatch.samplers import ClassSampler
from annbatch.synthetic import make_adata

if TYPE_CHECKING:
    from pathlib import Path

try:
    import torch
except ImportError:  # the core is tested without torch too (CI's Python 3.12 leg)
    torch = None
TARGETS = [None, "torch"] if torch is not None else [None]


N_VARS = 24
# Two inputs of different sizes dealt into datasets of at most 250 rows: 3 datasets of uneven sizes.
INPUT_SIZES = (420, 300)
N_OBS = sum(INPUT_SIZES)
KEYS = ["cell_type", "donor", "n_counts", "n_genes", "is_doublet"]
CATEGORICAL = ["cell_type", "donor"]


# ---------------------------------------------------------------------------------------------------------
# fixtures and reference data
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Ref:
    """A collection, what it holds (read independently) and what it was made from."""

    coll: annbatch.Collection
    X: np.ndarray  # collection rows, dense, from anndata.read_zarr of every dataset
    obs: pd.DataFrame  # collection obs, from anndata.read_zarr of every dataset
    src_X: np.ndarray  # the inputs' rows (dense), in the collection's row order (matched by obs name)
    src_obs: pd.DataFrame  # the inputs' obs, in the collection's row order


def _dense(x) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.to_dense() if x.layout != torch.strided else x
        return x.numpy()
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _read_back(coll: annbatch.Collection) -> tuple[np.ndarray, pd.DataFrame, list[ad.AnnData]]:
    root = coll.group.store.root
    parts = [ad.read_zarr(root / key) for key in coll.dataset_keys]
    X = np.concatenate([_dense(a.X) for a in parts])
    obs = pd.concat([a.obs for a in parts])
    return X, obs, parts


def _ref(coll: annbatch.Collection, inputs: list[ad.AnnData]) -> Ref:
    X, obs, _ = _read_back(coll)
    src = ad.concat(inputs)
    src_X = _dense(src.X)
    pos = src.obs_names.get_indexer(obs.index)
    assert (pos >= 0).all(), "every collection row comes from an input"
    return Ref(coll, X, obs, src_X[pos], src.obs.iloc[pos])


def _inputs(dense: bool) -> list[ad.AnnData]:
    return [
        make_adata(n, N_VARS, seed=20 + i, dense=dense, n_donors=3, n_cell_types=5, obs_prefix=f"in{i}")
        for i, n in enumerate(INPUT_SIZES)
    ]


def _convert(path: Path, inputs, *, groupby: str | None = "donor", seed: int = 0, dataset_size: int = 250):
    return annbatch.Collection(path).add_adatas(
        inputs, seed=seed, dataset_size=dataset_size, shuffle_chunk_size=10, groupby=groupby, progress=False
    )


@pytest.fixture(scope="module")
def sparse_ref(tmp_path_factory: pytest.TempPathFactory) -> Ref:
    """Sparse collection written with ``groupby="donor"`` (long runs of one donor per dataset)."""
    inputs = _inputs(dense=False)
    return _ref(_convert(tmp_path_factory.mktemp("sparse") / "c.zarr", inputs), inputs)


@pytest.fixture(scope="module")
def dense_ref(tmp_path_factory: pytest.TempPathFactory) -> Ref:
    """Dense collection written *without* groupby (donors scattered)."""
    inputs = _inputs(dense=True)
    return _ref(_convert(tmp_path_factory.mktemp("dense") / "c.zarr", inputs, groupby=None), inputs)


@pytest.fixture(params=["sparse", "dense"])
def ref(request, sparse_ref, dense_ref) -> Ref:
    return sparse_ref if request.param == "sparse" else dense_ref


@pytest.fixture(scope="module")
def imbalanced_ref(tmp_path_factory: pytest.TempPathFactory) -> Ref:
    """1,000 rows with donors 70 / 20 / 10 %, written with ``groupby="donor"``."""
    rng = np.random.default_rng(3)
    adata = make_adata(1_000, N_VARS, seed=30, obs_prefix="imb")
    labels = np.repeat(["d_big", "d_mid", "d_small"], [700, 200, 100])
    adata.obs["donor"] = pd.Categorical(rng.permutation(labels), categories=["d_big", "d_mid", "d_small"])
    coll = _convert(tmp_path_factory.mktemp("imbalanced") / "c.zarr", [adata], dataset_size=400)
    return _ref(coll, [adata])


def _check_alignment(ref: Ref, batch: dict, categories: dict[str, pd.Index], keys: list[str]) -> None:
    """Labels, numeric values and X rows of ``batch`` against both references."""
    rows = np.asarray(batch["index"])
    coll_obs = ref.coll.obs(columns=[k for k in keys if k in CATEGORICAL])
    for key in keys:
        values = np.asarray(batch["obs"][key])
        if key in CATEGORICAL:
            assert values.dtype == np.int64, key
            labels = categories[key][values]
            np.testing.assert_array_equal(labels, coll_obs[key].iloc[rows].to_numpy())
            np.testing.assert_array_equal(labels, ref.obs[key].iloc[rows].to_numpy())
            np.testing.assert_array_equal(labels, ref.src_obs[key].iloc[rows].to_numpy().astype(object))
        else:
            assert values.dtype == ref.src_obs[key].dtype, key
            np.testing.assert_array_equal(values, ref.obs[key].to_numpy()[rows])
            np.testing.assert_array_equal(values, ref.src_obs[key].to_numpy()[rows])
    np.testing.assert_array_equal(_dense(batch["X"]), ref.X[rows])
    np.testing.assert_array_equal(_dense(batch["X"]), ref.src_X[rows])


# ---------------------------------------------------------------------------------------------------------
# codes and labels aligned with X rows
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("to", TARGETS)
def test_codes_and_values_aligned_with_rows_and_source(ref: Ref, to):
    loader = ref.coll.loader(batch_size=48, chunk_size=16, preload_nchunks=4, seed=0, return_index=True,
                             obs_keys=KEYS, batch_key="donor", to=to)  # fmt: skip
    categories = loader.categories
    assert set(categories) == set(CATEGORICAL)
    for key in CATEGORICAL:
        assert isinstance(categories[key], pd.Index)
        # the collection's stored categories, in their stored order
        assert list(categories[key]) == list(ref.obs[key].cat.categories)
    seen = []
    for batch in list(loader):
        assert set(batch["obs"]) == set(KEYS)
        if to == "torch":
            expected = {"cell_type": torch.int64, "donor": torch.int64, "n_counts": torch.float64,
                        "n_genes": torch.int64, "is_doublet": torch.bool}  # fmt: skip
            assert {k: v.dtype for k, v in batch["obs"].items()} == expected
            assert isinstance(batch["batch"], torch.Tensor) and batch["batch"].dtype == torch.int64
            assert isinstance(batch["X"], torch.Tensor)
        else:
            assert batch["obs"]["is_doublet"].dtype == bool
            assert batch["obs"]["n_counts"].dtype == np.float64
            assert batch["obs"]["n_genes"].dtype == np.int64
            assert isinstance(batch["batch"], np.ndarray) and batch["batch"].dtype == np.int64
        for key in KEYS:
            assert len(batch["obs"][key]) == batch["X"].shape[0]
        # batch_key codes are the donor codes
        np.testing.assert_array_equal(np.asarray(batch["batch"]), np.asarray(batch["obs"]["donor"]))
        _check_alignment(ref, batch, categories, KEYS)
        seen.append(np.asarray(batch["index"]))
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(N_OBS))


def test_batch_key_alone_and_no_obs(sparse_ref: Ref):
    """``batch_key`` without ``obs_keys`` yields codes under "batch"; without either, no obs at all."""
    loader = sparse_ref.coll.loader(batch_size=64, chunk_size=16, preload_nchunks=4, seed=1, return_index=True,
                                    batch_key="cell_type")  # fmt: skip
    assert list(loader.categories) == ["cell_type"]
    for batch in loader:
        labels = loader.categories["cell_type"][batch["batch"]]
        np.testing.assert_array_equal(labels, sparse_ref.obs["cell_type"].to_numpy()[batch["index"]])
        assert batch["obs"] is None
    plain = next(iter(sparse_ref.coll.loader(batch_size=64, chunk_size=16, preload_nchunks=4, seed=1)))
    assert plain["obs"] is None and "batch" not in plain


def test_nan_in_categorical_key_is_code_minus_one(tmp_path: Path):
    adata = make_adata(400, N_VARS, seed=40, n_donors=3, obs_prefix="nan")
    adata = adata.copy()
    rng = np.random.default_rng(0)
    missing_type = rng.random(adata.n_obs) < 0.15
    missing_donor = rng.random(adata.n_obs) < 0.1
    adata.obs.loc[missing_type, "cell_type"] = np.nan
    adata.obs.loc[missing_donor, "donor"] = np.nan
    assert adata.obs["cell_type"].isna().sum() == missing_type.sum() > 0
    ref = _ref(_convert(tmp_path / "c.zarr", [adata], dataset_size=150), [adata])
    loader = ref.coll.loader(batch_size=32, chunk_size=8, preload_nchunks=4, seed=0, return_index=True,
                             obs_keys=["cell_type", "n_counts"], batch_key="donor")  # fmt: skip
    assert not loader.categories["cell_type"].isna().any()  # NaN is not a category
    seen = []
    for batch in loader:
        rows = batch["index"]
        codes, donors = batch["obs"]["cell_type"], batch["batch"]
        src_missing = ref.src_obs["cell_type"].isna().to_numpy()[rows]
        np.testing.assert_array_equal(codes == -1, src_missing)
        np.testing.assert_array_equal(donors == -1, ref.src_obs["donor"].isna().to_numpy()[rows])
        assert codes.min() >= -1 and donors.min() >= -1
        ok = codes >= 0
        np.testing.assert_array_equal(
            loader.categories["cell_type"][codes[ok]], ref.src_obs["cell_type"].to_numpy()[rows][ok]
        )
        seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(adata.n_obs))

    # key-aware samplers never yield rows whose key is missing; homogeneous still covers every labelled row
    labelled = np.flatnonzero(ref.obs["donor"].notna().to_numpy())
    homogeneous = ref.coll.loader(batch_size=16, chunk_size=8, preload_nchunks=4, seed=0, return_index=True,
                                  batch_key="donor", batch_sampler="homogeneous")  # fmt: skip
    rows = np.concatenate([b["index"] for b in homogeneous])
    np.testing.assert_array_equal(np.sort(rows), labelled)
    balanced = ref.coll.loader(batch_size=16, chunk_size=8, preload_nchunks=4, seed=0, return_index=True,
                               batch_key="donor", batch_sampler="balanced", num_samples=600)  # fmt: skip
    batches = list(balanced)
    assert all((np.asarray(b["batch"]) >= 0).all() for b in batches)
    assert sum(len(b["index"]) for b in batches) == 600


# ---------------------------------------------------------------------------------------------------------
# category stability: across appends, loaders and rebuilds
# ---------------------------------------------------------------------------------------------------------
def _codes_by_name(loader, obs_names: pd.Index, key: str) -> pd.Series:
    codes = np.full(len(obs_names), -2, dtype=np.int64)
    for batch in loader:
        codes[batch["index"]] = np.asarray(batch["obs"][key])
    assert (codes > -2).all()
    return pd.Series(codes, index=obs_names)


def test_categories_stable_across_append(tmp_path: Path):
    first = make_adata(500, N_VARS, seed=50, n_donors=3, n_cell_types=4, obs_prefix="a")
    coll = _convert(tmp_path / "c.zarr", [first])
    kw = {"batch_size": 50, "chunk_size": 10, "preload_nchunks": 5, "seed": 0, "return_index": True,
          "obs_keys": CATEGORICAL, "batch_key": "donor"}  # fmt: skip
    old_loader = coll.loader(**kw)
    old = {k: list(v) for k, v in old_loader.categories.items()}
    assert old["donor"] == list(first.obs["donor"].cat.categories)
    _, old_obs, _ = _read_back(coll)
    old_codes = {k: _codes_by_name(old_loader, old_obs.index, k) for k in CATEGORICAL}

    # The appended input lists new categories *first* and reuses some old ones in another order.
    second = make_adata(300, N_VARS, seed=51, obs_prefix="b")
    rng = np.random.default_rng(1)
    second.obs["cell_type"] = pd.Categorical(
        rng.choice(["Platelet", old["cell_type"][2], old["cell_type"][0]], second.n_obs),
        categories=["Platelet", old["cell_type"][2], old["cell_type"][0]],
    )
    second.obs["donor"] = pd.Categorical(
        rng.choice(["donor_new", "donor_1"], second.n_obs), categories=["donor_new", "donor_1"]
    )
    coll.add_adatas(
        [second], seed=1, dataset_size=250, shuffle_chunk_size=10, groupby="donor", progress=False
    )

    new_loader = annbatch.Collection(tmp_path / "c.zarr").loader(**kw)
    new = {k: list(v) for k, v in new_loader.categories.items()}
    assert new["cell_type"] == old["cell_type"] + ["Platelet"]
    assert new["donor"] == old["donor"] + ["donor_new"]

    # every dataset stores identical categories
    X, obs, parts = _read_back(coll)
    for part in parts:
        for key in CATEGORICAL:
            assert list(part.obs[key].cat.categories) == new[key]

    # old rows keep their codes (and so their meaning); new rows are labelled as in their input
    new_codes = {k: _codes_by_name(new_loader, obs.index, k) for k in CATEGORICAL}
    src = pd.concat([first.obs, second.obs])
    for key in CATEGORICAL:
        pd.testing.assert_series_equal(new_codes[key].loc[old_obs.index], old_codes[key], check_names=False)
        labels = pd.Index(new[key])[new_codes[key].to_numpy()]
        np.testing.assert_array_equal(labels, src[key].loc[obs.index].to_numpy().astype(object))
    full = ad.concat([first, second])
    np.testing.assert_array_equal(X, _dense(full[obs.index].X))


def test_categories_stable_across_loaders_and_rebuilds(tmp_path: Path):
    def inputs():
        a = make_adata(200, N_VARS, seed=60, obs_prefix="p")
        b = make_adata(150, N_VARS, seed=61, obs_prefix="q")
        a.obs["kind"] = pd.Categorical(np.resize(["x", "y"], a.n_obs), categories=["x", "y"])
        b.obs["kind"] = pd.Categorical(np.resize(["z", "y", "x"], b.n_obs), categories=["z", "y", "x"])
        return [a, b]

    first = _convert(tmp_path / "one.zarr", inputs(), dataset_size=120)
    second = _convert(tmp_path / "two.zarr", inputs(), dataset_size=120)
    keys = ["kind", *CATEGORICAL]
    loaders = [
        first.loader(batch_size=32, chunk_size=8, preload_nchunks=4, seed=0, obs_keys=keys),
        first.loader(
            batch_size=16, chunk_size=4, preload_nchunks=4, seed=7, obs_keys=keys, batch_key="donor"
        ),
        second.loader(batch_size=32, chunk_size=8, preload_nchunks=4, seed=3, obs_keys=keys),
    ]
    cats = [{k: list(v) for k, v in loader.categories.items()} for loader in loaders]
    assert cats[0] == cats[1] == cats[2]
    # documented order: union of the inputs' categories, first seen first
    assert cats[0]["kind"] == ["x", "y", "z"]
    # and the same rows in the same places, so codes mean the same row-for-row
    pd.testing.assert_frame_equal(first.obs(keys), second.obs(keys))


def test_in_memory_loader_categories_are_union_first_seen():
    a = make_adata(120, N_VARS, seed=70, n_cell_types=3, obs_prefix="m0")
    b = make_adata(80, N_VARS, seed=71, n_cell_types=3, obs_prefix="m1")
    a_types = list(a.obs["cell_type"].cat.categories)
    b.obs["cell_type"] = pd.Categorical(
        np.resize(["Platelet", a_types[1]], b.n_obs), categories=["Platelet", a_types[1]]
    )
    loader = annbatch.Loader(batch_size=16, chunk_size=8, preload_nchunks=2, shuffle=True, seed=0,
                             return_index=True, obs_keys=["cell_type"], batch_key="donor").add_adatas([a, b])  # fmt: skip
    assert list(loader.categories["cell_type"]) == [*a_types, "Platelet"]
    labels = np.concatenate([a.obs["cell_type"].to_numpy(), b.obs["cell_type"].to_numpy()])
    donors = np.concatenate([a.obs["donor"].to_numpy(), b.obs["donor"].to_numpy()])
    X = np.concatenate([_dense(a.X), _dense(b.X)])
    seen = []
    for batch in loader:
        rows = batch["index"]
        np.testing.assert_array_equal(loader.categories["cell_type"][batch["obs"]["cell_type"]], labels[rows])
        np.testing.assert_array_equal(loader.categories["donor"][batch["batch"]], donors[rows])
        np.testing.assert_array_equal(_dense(batch["X"]), X[rows])
        seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(200))


# ---------------------------------------------------------------------------------------------------------
# homogeneous sampling: every mini-batch from one batch-key value
# ---------------------------------------------------------------------------------------------------------
def _single_valued(ref: Ref, batch: dict, key: str = "donor") -> str:
    rows = np.asarray(batch["index"])
    labels = ref.obs[key].to_numpy()[rows]
    assert len(set(labels)) == 1, f"batch mixes {key} values {set(labels)}"
    codes = np.unique(np.asarray(batch["batch"]))
    assert len(codes) == 1
    return labels[0]


def test_homogeneous_batches_single_valued_every_row_once(sparse_ref: Ref):
    loader = sparse_ref.coll.loader(batch_size=24, chunk_size=16, preload_nchunks=4, seed=0, return_index=True,
                                    obs_keys=["cell_type", "n_counts"], batch_key="donor",
                                    batch_sampler="homogeneous")  # fmt: skip
    assert type(loader.batch_sampler).__name__ == "ClassSampler"
    for _epoch_no in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        for batch in batches:
            label = _single_valued(sparse_ref, batch)
            assert loader.categories["donor"][int(np.asarray(batch["batch"])[0])] == label
            _check_alignment(sparse_ref, batch, loader.categories, ["cell_type", "n_counts"])
        rows = np.concatenate([b["index"] for b in batches])
        np.testing.assert_array_equal(np.sort(rows), np.arange(N_OBS))
        # only each donor's last batch may be short
        short = [_single_valued(sparse_ref, b) for b in batches if len(b["index"]) < 24]
        assert len(short) == len(set(short))


@settings(max_examples=12, deadline=None)
@given(
    batch_size=st.integers(1, 40),
    chunk_size=st.integers(4, 32),
    preload_nchunks=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    drop_last=st.booleans(),
)
def test_homogeneous_property(sparse_ref: Ref, batch_size, chunk_size, preload_nchunks, seed, drop_last):
    if batch_size > chunk_size * preload_nchunks:
        batch_size = chunk_size * preload_nchunks
    loader = sparse_ref.coll.loader(batch_size=batch_size, chunk_size=chunk_size, preload_nchunks=preload_nchunks,
                                    seed=seed, return_index=True, batch_key="donor", batch_sampler="homogeneous",
                                    drop_last=drop_last, prefetch=0)  # fmt: skip
    batches = list(loader)
    rows = np.concatenate([b["index"] for b in batches]) if batches else np.empty(0, dtype=np.int64)
    assert len(np.unique(rows)) == len(rows)  # no row twice
    for batch in batches:
        _single_valued(sparse_ref, batch)
        if drop_last:
            assert len(batch["index"]) == batch_size
    if not drop_last:
        np.testing.assert_array_equal(np.sort(rows), np.arange(N_OBS))
    else:  # every donor loses fewer than batch_size rows
        sizes = sparse_ref.obs["donor"].value_counts()
        assert len(rows) == int((sizes // batch_size * batch_size).sum())
    again = [b["index"] for b in sparse_ref.coll.loader(
        batch_size=batch_size, chunk_size=chunk_size, preload_nchunks=preload_nchunks, seed=seed,
        return_index=True, batch_key="donor", batch_sampler="homogeneous", drop_last=drop_last)]  # fmt: skip
    assert len(again) == len(batches)
    for a, b in zip(again, batches, strict=True):
        np.testing.assert_array_equal(a, b["index"])


def test_homogeneous_class_weights_follow_weights(sparse_ref: Ref):
    weights = {"donor_0": 1.0, "donor_1": 2.0, "donor_2": 5.0}
    bs = 8
    loader = sparse_ref.coll.loader(batch_size=bs, chunk_size=16, preload_nchunks=2, seed=0, return_index=True,
                                    batch_key="donor", batch_sampler="homogeneous", class_weights=weights,
                                    num_samples=bs * 500)  # fmt: skip
    labels = []
    total = 0
    for batch in loader:
        labels.append(_single_valued(sparse_ref, batch))
        total += len(batch["index"])
        np.testing.assert_array_equal(_dense(batch["X"]), sparse_ref.X[batch["index"]])
    assert total == bs * 500  # num_samples honoured
    assert len(labels) == 500
    counts = pd.Series(labels).value_counts().reindex(list(weights), fill_value=0)
    p = np.array(list(weights.values()))
    p /= p.sum()
    assert stats.chisquare(counts.to_numpy(), p * len(labels)).pvalue > 1e-3

    # a label left out of the mapping gets weight 0 and is never drawn
    partial = sparse_ref.coll.loader(batch_size=bs, chunk_size=16, preload_nchunks=2, seed=1, return_index=True,
                                     batch_key="donor", batch_sampler="homogeneous",
                                     class_weights={"donor_0": 1.0, "donor_2": 1.0})  # fmt: skip
    assert {_single_valued(sparse_ref, b) for b in partial} == {"donor_0", "donor_2"}


def test_homogeneous_via_compatible_loader_and_in_memory(sparse_ref: Ref):
    loader = annbatch.Loader(batch_size=20, chunk_size=10, preload_nchunks=4, seed=0, return_index=True,
                             obs_keys=["donor"], batch_key="donor",
                             batch_sampler="homogeneous").use_collection(sparse_ref.coll)  # fmt: skip
    rows = np.concatenate([(_single_valued(sparse_ref, b), b["index"])[1] for b in loader])
    np.testing.assert_array_equal(np.sort(rows), np.arange(N_OBS))

    # in memory: rows sorted by donor (long runs) across two AnnData objects
    parts = [
        make_adata(n, N_VARS, seed=80 + i, n_donors=3, obs_prefix=f"h{i}") for i, n in enumerate((150, 90))
    ]
    parts = [p[np.argsort(p.obs["donor"].cat.codes.to_numpy(), kind="stable")].copy() for p in parts]
    mem = annbatch.Loader(batch_size=10, chunk_size=10, preload_nchunks=2, seed=0, return_index=True,
                          batch_key="donor", batch_sampler="homogeneous").add_adatas(parts)  # fmt: skip
    donors = np.concatenate([p.obs["donor"].to_numpy() for p in parts])
    rows = []
    for batch in mem:
        assert len(set(donors[batch["index"]])) == 1
        np.testing.assert_array_equal(mem.categories["donor"][batch["batch"]], donors[batch["index"]])
        rows.append(batch["index"])
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(240))


# ---------------------------------------------------------------------------------------------------------
# balanced / weighted sampling
# ---------------------------------------------------------------------------------------------------------
def _row_shares(ref: Ref, loader) -> tuple[pd.Series, int]:
    counts: dict[str, int] = {}
    total = 0
    for batch in loader:
        rows = np.asarray(batch["index"])
        labels = loader.categories["donor"][np.asarray(batch["batch"])]
        np.testing.assert_array_equal(labels, ref.obs["donor"].to_numpy()[rows])
        np.testing.assert_array_equal(_dense(batch["X"]), ref.X[rows])
        for label, n in zip(*np.unique(labels, return_counts=True), strict=True):
            counts[label] = counts.get(label, 0) + int(n)
        total += len(rows)
    return pd.Series(counts, dtype=np.float64) / total, total


def _assert_shares(shares: pd.Series, expected: dict[str, float], n_rows: int, chunk_size: int) -> None:
    # Rows are drawn in chunks of at most chunk_size rows of one label: at least n_rows / chunk_size draws.
    n_draws = n_rows / chunk_size
    for label, p in expected.items():
        got = float(shares.get(label, 0.0))
        if p == 0:
            assert got == 0, label
        else:
            bound = 5 * np.sqrt(p * (1 - p) / n_draws)
            assert abs(got - p) < bound, (label, got, p, bound)


def test_balanced_uniform_on_imbalanced_collection(imbalanced_ref: Ref):
    assert imbalanced_ref.obs["donor"].value_counts(normalize=True)["d_big"] == pytest.approx(0.7)
    chunk, n = 10, 24_000
    loader = imbalanced_ref.coll.loader(batch_size=200, chunk_size=chunk, preload_nchunks=20, seed=0,
                                        return_index=True, batch_key="donor", batch_sampler="balanced",
                                        num_samples=n)  # fmt: skip
    assert type(loader.batch_sampler).__name__ == "WeightedClassSampler"
    assert len(loader) == n // 200
    shares, total = _row_shares(imbalanced_ref, loader)
    assert total == n  # num_samples honoured
    _assert_shares(shares, {"d_big": 1 / 3, "d_mid": 1 / 3, "d_small": 1 / 3}, n, chunk)


def test_balanced_with_user_weights_and_num_samples(imbalanced_ref: Ref):
    chunk, n = 10, 20_001
    weights = {"d_big": 1.0, "d_mid": 0.0, "d_small": 3.0}
    loader = imbalanced_ref.coll.loader(batch_size=250, chunk_size=chunk, preload_nchunks=25, seed=5,
                                        return_index=True, batch_key="donor", batch_sampler="balanced",
                                        class_weights=weights, num_samples=n)  # fmt: skip
    shares, total = _row_shares(imbalanced_ref, loader)
    assert total == n
    _assert_shares(shares, {"d_big": 0.25, "d_mid": 0.0, "d_small": 0.75}, n, chunk)
    # all batches full except the last
    batches_sizes = [len(b["index"]) for b in loader]
    assert batches_sizes[:-1] == [250] * (len(batches_sizes) - 1) and sum(batches_sizes) == n
    # default num_samples: one epoch's worth of rows
    default = imbalanced_ref.coll.loader(batch_size=100, chunk_size=chunk, preload_nchunks=10, seed=0,
                                         return_index=True, batch_key="donor", batch_sampler="balanced")  # fmt: skip
    assert sum(len(b["index"]) for b in default) == 1_000


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------
def test_string_columns_are_encoded_when_the_loader_is_built(sparse_ref: Ref):
    # plain-string obs columns need no re-conversion: they are coded like categoricals
    loader = sparse_ref.coll.loader(batch_size=8, chunk_size=8, preload_nchunks=2, seed=0, return_index=True,
                                    obs_keys=["cell_type", "barcode"], batch_key="barcode")  # fmt: skip
    barcodes = sparse_ref.coll.obs(["barcode"])["barcode"].astype(str).to_numpy()
    labels = loader.categories["barcode"]
    assert list(labels) == sorted(set(barcodes))
    for batch in loader:
        np.testing.assert_array_equal(np.asarray(labels)[batch["obs"]["barcode"]], barcodes[batch["index"]])
        np.testing.assert_array_equal(batch["batch"], batch["obs"]["barcode"])


def test_unknown_keys_raise_keyerror(sparse_ref: Ref):
    with pytest.raises(KeyError, match="no_such_column"):
        sparse_ref.coll.loader(batch_size=8, chunk_size=8, preload_nchunks=2, obs_keys=["no_such_column"])
    with pytest.raises(KeyError, match="no_such_key"):
        sparse_ref.coll.loader(batch_size=8, chunk_size=8, preload_nchunks=2, batch_key="no_such_key")


def test_argument_errors(sparse_ref: Ref):
    coll = sparse_ref.coll
    for sampler in ("homogeneous", "balanced"):
        with pytest.raises(ValueError, match="batch_key"):
            coll.loader(batch_size=8, chunk_size=8, preload_nchunks=2, batch_sampler=sampler)
    with pytest.raises(ValueError, match="not both"):
        coll.loader(batch_size=8, chunk_size=8, preload_nchunks=2, obs_columns=["donor"], obs_keys=["donor"])
    with pytest.raises(ValueError, match="not both"):
        annbatch.Loader(obs_columns=["cell_type"], obs_keys=["n_counts"])
    with pytest.raises(ValueError, match="homogeneous"):
        coll.loader(
            batch_size=8, chunk_size=8, preload_nchunks=2, batch_key="donor", class_weights={"donor_0": 1}
        )
    with pytest.raises(ValueError, match="homogeneous|balanced"):
        coll.loader(batch_size=8, chunk_size=8, preload_nchunks=2, batch_sampler="stratified", batch_key="donor")
    with pytest.raises(TypeError, match="categorical"):
        coll.loader(batch_size=8, chunk_size=8, preload_nchunks=2, batch_key="n_genes", batch_sampler="homogeneous")


@pytest.mark.parametrize("sampler", ["homogeneous", "balanced"])
def test_class_weights_with_unknown_label(sparse_ref: Ref, sampler):
    with pytest.raises(ValueError, match="donor_404") as err:
        sparse_ref.coll.loader(batch_size=8, chunk_size=8, preload_nchunks=2, batch_key="donor", batch_sampler=sampler,
                               class_weights={"donor_0": 1.0, "donor_404": 2.0})  # fmt: skip
    assert "donor_0" in str(err.value)  # the known labels are listed too


@pytest.mark.parametrize("sampler", ["homogeneous", "balanced"])
def test_key_sampler_on_collection_without_groupby(dense_ref: Ref, sampler):
    runs = (dense_ref.obs["donor"].to_numpy()[1:] != dense_ref.obs["donor"].to_numpy()[:-1]).sum() + 1
    assert runs > N_OBS / 4  # the donors really are scattered
    with pytest.raises(ValueError, match="groupby") as err:
        loader = dense_ref.coll.loader(batch_size=32, chunk_size=32, preload_nchunks=2, seed=0,
                                       batch_key="donor", batch_sampler=sampler)  # fmt: skip
        next(iter(loader))
    for label in ("donor_0", "donor_1", "donor_2"):
        assert label in str(err.value)


def test_explicit_class_sampler_on_scattered_collection_fails_when_added(dense_ref: Ref):
    """The class spelling (``annbatch.samplers.ClassSampler`` on a Categorical) is checked when data is added."""
    donors = dense_ref.coll.obs(["donor"])["donor"].array
    assert isinstance(donors, pd.Categorical)
    with pytest.raises(ValueError, match=r"donor_0.*groupby"):
        annbatch.Loader(batch_sampler=ClassSampler(donors, 32, 32, 2, seed=0)).use_collection(dense_ref.coll)


def test_key_sampler_error_raised_when_loader_is_built(dense_ref: Ref):
    """Scattered runs are reported by ``collection.loader(...)`` itself, before any iteration."""
    with pytest.raises(ValueError, match="groupby"):
        dense_ref.coll.loader(batch_size=32, chunk_size=32, preload_nchunks=2, seed=0, batch_key="donor",
                              batch_sampler="homogeneous")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# the compatible DataFrame output
# ---------------------------------------------------------------------------------------------------------
def test_dataframe_obs_of_compatible_api(ref: Ref):
    loader = annbatch.Loader(batch_size=50, chunk_size=10, preload_nchunks=5, shuffle=True, seed=0,
                             return_index=True, obs_columns=["cell_type", "n_counts"]).use_collection(ref.coll)  # fmt: skip
    categories = ref.coll.obs(["cell_type"])["cell_type"].cat.categories
    seen = []
    for batch in loader:
        obs = batch["obs"]
        assert isinstance(obs, pd.DataFrame) and list(obs.columns) == ["cell_type", "n_counts"]
        assert isinstance(obs["cell_type"].dtype, pd.CategoricalDtype)
        assert list(obs["cell_type"].cat.categories) == list(categories)
        assert obs["n_counts"].dtype == np.float64
        rows = batch["index"]
        np.testing.assert_array_equal(obs["cell_type"].to_numpy(), ref.obs["cell_type"].to_numpy()[rows])
        np.testing.assert_array_equal(obs["n_counts"].to_numpy(), ref.src_obs["n_counts"].to_numpy()[rows])
        np.testing.assert_array_equal(_dense(batch["X"]), ref.X[rows])
        seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(N_OBS))
    assert loader.categories == {}  # no obs_keys: no code tables


def test_dataframe_obs_with_batch_key_and_homogeneous_sampler(sparse_ref: Ref):
    """``obs_columns`` (DataFrame) combines with ``batch_key`` codes and the key-aware samplers."""
    loader = annbatch.Loader(batch_size=20, chunk_size=10, preload_nchunks=4, seed=0, return_index=True,
                             obs_columns=["donor"], batch_key="donor",
                             batch_sampler="homogeneous").use_collection(sparse_ref.coll)  # fmt: skip
    rows = []
    for batch in loader:
        label = _single_valued(sparse_ref, batch)
        assert isinstance(batch["obs"], pd.DataFrame)
        assert (batch["obs"]["donor"] == label).all()
        assert loader.categories["donor"][int(batch["batch"][0])] == label
        rows.append(batch["index"])
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(N_OBS))


def test_appended_input_without_a_categorical_column_gets_code_minus_one(tmp_path: Path):
    first = make_adata(200, N_VARS, seed=90, obs_prefix="a")
    second = make_adata(100, N_VARS, seed=91, obs_prefix="b")
    del second.obs["cell_type"]
    coll = _convert(tmp_path / "c.zarr", [first], dataset_size=120)
    before = list(
        coll.loader(batch_size=8, chunk_size=8, preload_nchunks=1, obs_keys=["cell_type"]).categories[
            "cell_type"
        ]
    )
    with pytest.warns(UserWarning, match="cell_type"):
        coll.add_adatas([second], seed=1, dataset_size=120, shuffle_chunk_size=10, progress=False)
    loader = coll.loader(batch_size=32, chunk_size=8, preload_nchunks=4, seed=0, return_index=True,
                         obs_keys=["cell_type"])  # fmt: skip
    assert list(loader.categories["cell_type"]) == before
    names = coll.obs([]).index
    codes = _codes_by_name(loader, names, "cell_type")
    assert (codes[names.str.startswith("b_")] == -1).all()
    labels = pd.Index(before)[codes[names.str.startswith("a_")].to_numpy()]
    np.testing.assert_array_equal(
        labels, first.obs["cell_type"].loc[names[names.str.startswith("a_")]].astype(object)
    )


@pytest.mark.parametrize("kind", ["homogeneous", "balanced"])
def test_key_sampler_with_data_added_in_two_calls(kind):
    parts = [
        make_adata(n, N_VARS, seed=100 + i, n_donors=3, obs_prefix=f"s{i}") for i, n in enumerate((150, 90))
    ]
    parts = [p[np.argsort(p.obs["donor"].cat.codes.to_numpy(), kind="stable")].copy() for p in parts]
    loader = annbatch.Loader(batch_size=10, chunk_size=10, preload_nchunks=2, seed=0, return_index=True,
                             batch_key="donor", batch_sampler=kind)  # fmt: skip
    loader.add_adata(parts[0])
    loader.add_adata(parts[1])  # the default sampler accepts data added in several calls; so should these
    donors = np.concatenate([p.obs["donor"].to_numpy() for p in parts])
    rows = [b["index"] for b in loader]
    if kind == "homogeneous":
        assert all(len(set(donors[r])) == 1 for r in rows)
        np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(240))
    else:
        assert sum(len(r) for r in rows) == 240


def test_nullable_boolean_with_missing_values(tmp_path: Path):
    adata = make_adata(120, N_VARS, seed=110, obs_prefix="nb")
    flag = pd.array(np.arange(adata.n_obs) % 2 == 0, dtype="boolean")
    flag[::9] = pd.NA
    adata.obs["flag"] = flag
    coll = _convert(tmp_path / "c.zarr", [adata], groupby=None, dataset_size=60)
    try:
        loader = coll.loader(batch_size=16, chunk_size=8, preload_nchunks=2, seed=0, obs_keys=["flag"])
    except (TypeError, ValueError) as err:  # a clear error when the loader is built is fine too
        assert "flag" in str(err)
        return
    values = next(iter(loader))["obs"]["flag"]
    assert values.dtype != object, f"flag yielded as {values.dtype}"


# ---------------------------------------------------------------------------------------------------------
# what the loader holds per row (issue 10): compact codes, shared with the key sampler, no obs names
# ---------------------------------------------------------------------------------------------------------
def test_codes_held_in_the_smallest_dtype_and_yielded_as_int64(sparse_ref: Ref):
    loader = sparse_ref.coll.loader(batch_size=48, chunk_size=16, preload_nchunks=4, seed=0,
                                    obs_keys=KEYS, batch_key="donor")  # fmt: skip
    held = loader._batch_obs._codes
    assert held is not None
    for key in CATEGORICAL:  # a handful of categories: one byte a row, not eight
        assert held.arrays[key].dtype == np.int8, key
    assert held.arrays["n_counts"].dtype == np.float64  # numeric columns keep their dtype
    batch = next(iter(loader))
    for key in CATEGORICAL:
        assert batch["obs"][key].dtype == np.int64, key
    assert batch["batch"].dtype == np.int64


@pytest.mark.parametrize(("n_categories", "dtype"), [(2, np.int8), (126, np.int8), (127, np.int16),
                                                     (1000, np.int16), (40_000, np.int32)])  # fmt: skip
def test_codes_dtype_follows_pandas(n_categories: int, dtype):
    from annbatch._obs import ObsTable, codes_dtype

    assert codes_dtype(n_categories) == dtype
    codes = np.arange(300) % n_categories
    codes[0] = -1
    categories = [f"c{i}" for i in range(n_categories)]
    obs = pd.DataFrame({"k": pd.Categorical.from_codes(codes, categories=categories)})
    table = ObsTable(obs, ["k"])
    assert table.arrays["k"].dtype == dtype
    # pandas keeps codes in the same dtype, so rebuilding a Categorical (as the key samplers do) copies nothing
    rebuilt = pd.Categorical.from_codes(table.arrays["k"], categories=table.categories["k"])
    assert np.shares_memory(np.asarray(rebuilt.codes), table.arrays["k"])
    np.testing.assert_array_equal(table.take(np.arange(300))["k"], codes)
    assert table.take(np.arange(3))["k"].dtype == np.int64


@pytest.mark.parametrize("batch_sampler", ["homogeneous", "balanced"])
def test_key_sampler_shares_the_codes(imbalanced_ref: Ref, batch_sampler: str):
    loader = imbalanced_ref.coll.loader(batch_size=32, chunk_size=16, preload_nchunks=4, seed=0,
                                        batch_sampler=batch_sampler, batch_key="donor")  # fmt: skip
    assert np.shares_memory(loader.batch_sampler.codes, loader._batch_obs.codes("donor"))


def test_loader_does_not_read_obs_names(sparse_ref: Ref, monkeypatch: pytest.MonkeyPatch):
    """Obs names (one string per row, most of obs' size) are never yielded, so the loader leaves them on disk."""
    coll = annbatch.Collection(sparse_ref.coll.group.store.root, mode="r")
    expected = coll.obs(columns=["cell_type", "n_counts"])

    def refuse(*args, **kwargs):
        raise AssertionError("the loader read the obs names")

    monkeypatch.setattr(ad.io, "read_elem", _refusing_index(ad.io.read_elem, refuse))
    with pytest.raises(AssertionError, match="obs names"):  # the patch sees what `obs()` reads
        coll.obs(columns=["cell_type"])
    loader = coll.loader(batch_size=48, chunk_size=16, preload_nchunks=4, seed=0, return_index=True,
                         obs_columns=["cell_type", "n_counts"])  # fmt: skip
    frames = coll._obs_columns(["cell_type", "n_counts"])
    assert isinstance(frames.index, pd.RangeIndex)
    pd.testing.assert_frame_equal(frames, expected.reset_index(drop=True))
    for batch in loader:
        want = expected.iloc[batch["index"]].reset_index(drop=True)
        pd.testing.assert_frame_equal(batch["obs"], want)


def _refusing_index(read_elem, refuse):
    """``read_elem`` that fails on an obs index array (``obs/_index``)."""

    def read(elem, *args, **kwargs):
        if str(getattr(elem, "path", "")).endswith("obs/_index"):
            refuse()
        return read_elem(elem, *args, **kwargs)

    return read
