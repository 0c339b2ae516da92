"""scvi-tools' SCVI trained on a collection through SCVIDataModule, with donor as the batch covariate."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("scvi")
import scvi
import torch

import annbatch
from annbatch.scvi import SCVIDataModule
from annbatch.synthetic import make_adata

N_OBS, N_VARS = 1_200, 300
SMALL = {"batch_size": 128, "chunk_size": 16, "preload_nchunks": 16}
TRAIN = {"accelerator": "cpu", "enable_progress_bar": False, "enable_checkpointing": False}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # scvi-tools' own: a model built from a registry, and Lightning guessing batch sizes it logs
        warnings.filterwarnings("ignore", message=".*(batch_size|ambiguous collection|num_workers).*")
        yield


@pytest.fixture(scope="module")
def coll_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scvi")
    adata = make_adata(N_OBS, N_VARS, n_cell_types=3, n_donors=3, seed=1)
    adata.obs["n_counts_log"] = np.log1p(adata.obs["n_counts"])
    inputs = [adata[: N_OBS // 2].copy(), adata[N_OBS // 2 :].copy()]  # two files, one experiment
    coll = annbatch.Collection(root / "cells.zarr")
    coll.add_adatas(inputs, seed=0, progress=False)
    return root / "cells.zarr"


@pytest.fixture
def collection(coll_path) -> annbatch.Collection:
    return annbatch.Collection(coll_path, mode="r")


def _all_rows(collection) -> dict:
    """Every row in row order, from the plain unshuffled loader."""
    loader = collection.loader(batch_size=collection.n_obs, chunk_size=collection.n_obs, preload_nchunks=1,
                               shuffle=False, return_index=True)  # fmt: skip
    (batch,) = list(loader)
    np.testing.assert_array_equal(batch["index"], np.arange(collection.n_obs))
    return batch


def _train(dm: SCVIDataModule, epochs: int = 2, **model_kw) -> scvi.model.SCVI:
    model = scvi.model.SCVI(registry=dm.registry, n_latent=4, n_hidden=16, **model_kw)
    model.train(datamodule=dm, max_epochs=epochs, check_val_every_n_epoch=1, **TRAIN)
    return model


def _dense(x) -> np.ndarray:
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


def test_scvi_trains_with_donor_as_batch(collection):
    dm = SCVIDataModule(collection, batch_key="donor", labels_key="cell_type", **SMALL)
    model = _train(dm, epochs=3)
    donors = collection.obs(columns=["donor"])["donor"]
    assert dm.n_batch == model.module.n_batch == donors.nunique() == 3
    assert model.summary_stats.n_vars == N_VARS and model.summary_stats.n_labels == 3
    history = model.history
    train = history["elbo_train"].iloc[:, 0].to_numpy(dtype=float)
    val = history["elbo_validation"].iloc[:, 0].to_numpy(dtype=float)
    assert len(train) == len(val) == 3 and np.isfinite(train).all() and np.isfinite(val).all()
    assert train[-1] < train[0]  # it learns
    assert model.is_trained
    np.testing.assert_array_equal(np.sort(model.train_indices), dm.train_rows)
    assert len(model.train_indices) + len(model.validation_indices) == collection.n_obs


def test_inference_batches_are_the_collection_rows_in_order(collection):
    """What the model sees: X dense float, donor codes as scVI's batch, in collection row order."""
    dm = SCVIDataModule(collection, batch_key="donor", labels_key="cell_type",
                        categorical_covariate_keys=["cell_type"], continuous_covariate_keys=["n_counts_log"],
                        **SMALL)  # fmt: skip
    batches = list(dm.inference_dataloader(batch_size=100))
    assert len(batches) == -(-collection.n_obs // 100)
    x = torch.cat([b["X"] for b in batches])
    assert x.layout == torch.strided and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), _dense(_all_rows(collection)["X"]))
    obs = collection.obs(columns=["donor", "cell_type", "n_counts_log"])
    batch = torch.cat([b["batch"] for b in batches])
    assert batch.shape == (collection.n_obs, 1)
    np.testing.assert_array_equal(batch[:, 0].numpy(), obs["donor"].cat.codes.to_numpy())
    assert list(dm.batch_labels) == list(obs["donor"].cat.categories)
    labels = torch.cat([b["labels"] for b in batches])[:, 0].numpy()
    np.testing.assert_array_equal(labels, obs["cell_type"].cat.codes.to_numpy())
    cats = torch.cat([b["extra_categorical_covs"] for b in batches])
    np.testing.assert_array_equal(cats[:, 0].numpy(), labels)
    conts = torch.cat([b["extra_continuous_covs"] for b in batches])
    np.testing.assert_allclose(conts[:, 0].numpy(), obs["n_counts_log"].to_numpy(), rtol=1e-6)


def test_inference_rows_and_x_match_the_collection(collection):
    dm = SCVIDataModule(collection, **SMALL)
    rows = np.array([3, 4, 5, 600, 601, 1_199])
    (batch,) = list(dm.inference_dataloader(rows))
    expected = next(iter(collection.loader(batch_sampler=annbatch.samplers.SubsetSampler(
        rows, len(rows), 16, 1, shuffle=False), return_index=True)))  # fmt: skip
    np.testing.assert_array_equal(expected["index"], rows)
    np.testing.assert_allclose(batch["X"].numpy(), _dense(expected["X"]))
    assert torch.equal(
        batch["batch"], torch.zeros((len(rows), 1), dtype=torch.int64)
    )  # no batch_key: one batch


def test_latent_representation_of_the_collection(collection):
    dm = SCVIDataModule(collection, batch_key="donor", **SMALL)
    model = _train(dm, epochs=8)
    latent = model.get_latent_representation(dataloader=dm.inference_dataloader())
    assert latent.shape == (collection.n_obs, 4) and np.isfinite(latent).all()
    rows = np.arange(0, collection.n_obs, 7)
    some = model.get_latent_representation(dataloader=dm.inference_dataloader(rows, batch_size=50))
    np.testing.assert_allclose(some, latent[rows], rtol=1e-5, atol=1e-6)  # row order, whatever the batching
    expression = model.get_normalized_expression(dataloader=dm.inference_dataloader(rows), return_numpy=True)
    assert expression.shape == (len(rows), N_VARS)
    np.testing.assert_allclose(expression.sum(axis=1), 1.0, rtol=1e-4)  # scVI's expression shares per cell
    # the latent space carries the cell types of the synthetic programs: a cell's nearest neighbours
    # mostly share its type, well above what always guessing the commonest type gets
    cell_type = collection.obs(columns=["cell_type"])["cell_type"].cat.codes.to_numpy()
    distances = ((latent[:, None, :] - latent[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    neighbours = np.argsort(distances, axis=1)[:, :5]
    predicted = np.array([np.bincount(cell_type[n], minlength=3).argmax() for n in neighbours])
    assert (predicted == cell_type).mean() > np.bincount(cell_type).max() / len(cell_type) + 0.08


def test_covariates_size_the_model(collection):
    dm = SCVIDataModule(collection, batch_key="donor", categorical_covariate_keys=["cell_type"],
                        continuous_covariate_keys="n_counts_log", **SMALL)  # fmt: skip
    assert dm.n_cats_per_cov == [3] and dm.n_continuous_cov == 1
    model = _train(dm, epochs=1)
    assert model.summary_stats.n_extra_categorical_covs == 1
    assert model.summary_stats.n_extra_continuous_covs == 1
    assert np.isfinite(model.history["elbo_train"].to_numpy(dtype=float)).all()


def test_homogeneous_batches_train(tmp_path):
    coll = annbatch.Collection(tmp_path / "by_donor.zarr")
    coll.add_adatas([make_adata(600, 40, n_donors=3, seed=2)], groupby="donor", progress=False)
    dm = SCVIDataModule(coll, batch_key="donor", batch_sampler="homogeneous", **SMALL)
    batches = [dm.on_before_batch_transfer(b, 0)["batch"] for b in dm.train_dataloader()]
    assert batches and all(len(np.unique(b.numpy())) == 1 for b in batches)
    _train(dm, epochs=1)


def test_save_and_load(collection, tmp_path):
    dm = SCVIDataModule(collection, batch_key="donor", **SMALL)
    model = _train(dm, epochs=1)
    latent = model.get_latent_representation(dataloader=dm.inference_dataloader())
    model.save(tmp_path / "model", datamodule=dm)
    # the registry is saved with the model: loading needs no AnnData and no datamodule
    loaded = scvi.model.SCVI.load(tmp_path / "model")
    again = loaded.get_latent_representation(dataloader=dm.inference_dataloader())
    np.testing.assert_allclose(again, latent, rtol=1e-5, atol=1e-6)


def test_a_collection_path_works(coll_path):
    dm = SCVIDataModule(coll_path, **SMALL)
    assert dm.n_obs == N_OBS and dm.n_vars == N_VARS


def test_numeric_batch_key_is_refused(collection):
    with pytest.raises(TypeError, match=r"`batch_key='n_genes'`.*numeric.*categorical"):
        SCVIDataModule(collection, batch_key="n_genes", **SMALL)
    with pytest.raises(TypeError, match=r"continuous_covariate_keys"):
        SCVIDataModule(collection, categorical_covariate_keys=["n_counts_log"], **SMALL)


def test_string_continuous_covariate_is_refused(collection):
    with pytest.raises(TypeError, match=r"`continuous_covariate_keys`.*'donor'.*categorical_covariate_keys"):
        SCVIDataModule(collection, continuous_covariate_keys=["donor"], **SMALL)


def test_unknown_column_lists_the_columns(collection):
    with pytest.raises(KeyError, match=r"labels.*no such obs column.*cell_type"):
        SCVIDataModule(collection, labels_key="labels", **SMALL)


def test_missing_batch_values_say_what_to_do(tmp_path):
    adata = make_adata(200, 20, seed=5)
    donor = adata.obs["donor"].astype(object)
    donor.iloc[:7] = np.nan
    adata.obs["donor"] = pd.Categorical(donor)
    coll = annbatch.Collection(tmp_path / "c.zarr")
    coll.add_adatas([adata], progress=False)
    with pytest.raises(ValueError, match=r"`batch_key='donor'`: 7 cells have no value.*'unknown'"):
        SCVIDataModule(coll, batch_key="donor", **SMALL)
