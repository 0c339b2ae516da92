"""Reference models (annbatch.models) trained with a real lightning.Trainer on real annbatch loaders."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

import annbatch  # noqa: E402
from annbatch.models import MLP, VAE, Classifier  # noqa: E402
from annbatch.models._common import _densify, _normalize_log1p  # noqa: E402
from annbatch.models._vae import _nb_log_likelihood  # noqa: E402
from annbatch.synthetic import make_adata  # noqa: E402

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*Sparse CSR tensor support is in beta.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated.*"),
    pytest.mark.filterwarnings("ignore:.*but have no `val_dataloader`.*"),
]

N_VARS = 500
NNZ = 150  # dense enough that cell types are separable (a linear model reaches ~0.93 on held-out cells)
N_TYPES = 6
N_DONORS = 3
BATCH = 128


# -- data -----------------------------------------------------------------------------------------------------
def _collections(root: Path, name: str, *, dense: bool, n_obs: int, n_val: int, missing: float = 0.0):
    """A train and a validation collection cut from one synthetic AnnData (so they share gene programs)."""
    adata = make_adata(
        n_obs + n_val, N_VARS, nnz_per_row=NNZ, n_cell_types=N_TYPES, n_donors=N_DONORS, dense=dense, seed=0
    )
    if missing:
        labels = adata.obs["cell_type"].copy()
        labels[np.random.default_rng(1).random(adata.n_obs) < missing] = np.nan
        adata.obs["cell_type"] = labels
        adata.obs["unlabelled"] = pd.Categorical([np.nan] * adata.n_obs, categories=labels.cat.categories)
    train = annbatch.Collection(root / f"{name}_train.zarr").add_adatas([adata[:n_obs].copy()], seed=0)
    val = annbatch.Collection(root / f"{name}_val.zarr").add_adatas([adata[n_obs:].copy()], seed=0)
    return train, val


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory):
    return _collections(tmp_path_factory.mktemp("sparse"), "sparse", dense=False, n_obs=3000, n_val=768)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory):
    return _collections(tmp_path_factory.mktemp("dense"), "dense", dense=True, n_obs=1536, n_val=512)


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory: pytest.TempPathFactory):
    return _collections(
        tmp_path_factory.mktemp("missing"), "missing", dense=False, n_obs=1536, n_val=512, missing=0.4
    )


def _loader(coll: annbatch.Collection, seed: int = 0, **kw: Any) -> annbatch.Loader:
    kw = {"obs_keys": ["cell_type"], "batch_key": "donor", **kw}
    return coll.loader(batch_size=BATCH, chunk_size=32, preload_nchunks=8, seed=seed, to="torch", **kw)


class _DataModule(L.LightningDataModule):
    """A minimal datamodule with the attributes the models read (as the lead's DataModule has)."""

    def __init__(self, train: annbatch.Collection, val: annbatch.Collection, seed: int = 0):
        super().__init__()
        self.train, self.val, self.seed = train, val, seed
        probe = _loader(train)
        self.n_vars: int = probe.n_vars
        self.var_names: pd.Index = probe.var.index
        self.categories: dict[str, pd.Index] = probe.categories
        self.obs_keys: list[str] = ["cell_type"]
        self.batch_key: str | None = "donor"

    def train_dataloader(self) -> annbatch.Loader:
        return _loader(self.train, self.seed)

    def val_dataloader(self) -> annbatch.Loader:
        return _loader(self.val, self.seed, shuffle=False)


class _Losses(L.Callback):
    """Records the loss every training step returned."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def _trainer(max_steps: int, **kw: Any) -> L.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, **kw}
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )  # fmt: skip


def _fit(model: L.LightningModule, train, val=None, *, steps: int, seed: int = 0, loader_kw=None, **kw: Any):
    L.seed_everything(seed, verbose=False)
    losses = _Losses()
    trainer = _trainer(steps, callbacks=[losses], **kw)
    if isinstance(train, L.LightningDataModule):
        trainer.fit(model, datamodule=train)
    else:
        trainer.fit(model, train_dataloaders=_loader(train, seed, **(loader_kw or {})), val_dataloaders=val)
    return trainer, losses.values


def _chance(coll: annbatch.Collection) -> float:
    return float(coll.obs(["cell_type"])["cell_type"].value_counts(normalize=True).max())


# -- preprocessing and the sparse path ------------------------------------------------------------------------
def _sparse_batch(coll: annbatch.Collection) -> torch.Tensor:
    x = next(iter(_loader(coll)))["X"]
    assert x.layout == torch.sparse_csr
    return x


def test_normalize_log1p_sparse_equals_dense(sparse):
    x = _sparse_batch(sparse[0])
    # An all-zero row must stay zero rather than become NaN.
    crow = x.crow_indices().clone()
    start, end = int(crow[3]), int(crow[4])
    keep = torch.ones(x.values().numel(), dtype=torch.bool)
    keep[start:end] = False
    crow[4:] -= end - start
    x = torch.sparse_csr_tensor(crow, x.col_indices()[keep], x.values()[keep], x.shape, check_invariants=True)
    dense_x = _densify(x)
    assert torch.equal(dense_x, x.to_dense())

    out = _normalize_log1p(x, 1e4)
    assert out.layout == torch.sparse_csr
    assert torch.equal(out.crow_indices(), x.crow_indices())
    reference = torch.log1p(dense_x / dense_x.sum(1, keepdim=True).clamp_min(1) * 1e4)
    torch.testing.assert_close(out.to_dense(), reference)
    torch.testing.assert_close(_normalize_log1p(dense_x, 1e4), reference)
    assert not out.to_dense()[3].any()
    np.testing.assert_allclose(np.expm1(reference.numpy()).sum(1)[[0, 1, 2, 5]], 1e4, rtol=1e-4)

    # Integer counts (e.g. an int32 collection) are cast to the model's dtype, keeping the layout.
    counts = torch.sparse_csr_tensor(
        x.crow_indices(), x.col_indices(), x.values().int(), x.shape, check_invariants=True
    )
    cast = Classifier(N_VARS, N_TYPES)._x({"X": counts})
    assert cast.layout == torch.sparse_csr and cast.dtype == torch.float32
    torch.testing.assert_close(cast.to_dense(), dense_x)


@pytest.mark.parametrize("hidden_dims", [(), (32,)], ids=["linear", "mlp"])
def test_mlp_sparse_input_equals_dense(sparse, hidden_dims):
    x = _normalize_log1p(_sparse_batch(sparse[0]), 1e4)
    codes = torch.randint(-1, N_DONORS, (x.shape[0],))
    torch.manual_seed(0)
    net = MLP(N_VARS, N_TYPES, hidden_dims, n_covariates=N_DONORS)
    torch.nn.init.normal_(net.covariate.weight)  # zero-initialised: make the covariate path count
    grads = []
    outs = []
    for inp in (x, x.to_dense()):
        net.zero_grad()
        out = net(inp, codes)
        (out.pow(2).sum()).backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in net.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-4)
    for g_sparse, g_dense in zip(*grads, strict=True):
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-3)
    assert len(net.body) == (0 if not hidden_dims else 2)  # no dropout layer at dropout=0
    assert MLP(10, 3)(torch.rand(4, 10)).shape == (4, 3)
    with pytest.raises(ValueError, match="covariate"):
        net(x)


def test_nb_likelihood_sparse_equals_dense(sparse):
    x = _sparse_batch(sparse[0])
    torch.manual_seed(0)
    log_mu = torch.randn(x.shape, requires_grad=True)
    log_theta = torch.randn(N_VARS, requires_grad=True)
    results = []
    for inp in (x, x.to_dense()):
        value = _nb_log_likelihood(inp, log_mu, log_theta)
        value.sum().backward()
        results.append((value.detach(), log_mu.grad.clone(), log_theta.grad.clone()))
        log_mu.grad = log_theta.grad = None
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    # Against the textbook NB pmf (scipy parameterises by n = theta, p = theta / (theta + mu)).
    from scipy.stats import nbinom

    theta, mu = log_theta.detach().exp().double().numpy(), log_mu.detach().exp().double().numpy()
    expected = nbinom.logpmf(x.to_dense().numpy(), theta, theta / (theta + mu)).sum(1)
    np.testing.assert_allclose(results[0][0].numpy(), expected, rtol=1e-4)


# -- classifier -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("hidden_dims", "lr"), [((), 1e-2), ((64,), 3e-3)], ids=["logreg", "mlp"])
def test_classifier_trains(sparse, hidden_dims, lr):
    train, val = sparse
    model = Classifier(N_VARS, N_TYPES, label_key="cell_type", hidden_dims=hidden_dims, lr=lr)
    trainer, losses = _fit(model, train, _loader(val, shuffle=False), steps=60)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    metrics = trainer.callback_metrics
    assert {"train/loss_step", "train/acc_step", "train/loss_epoch", "val/loss", "val/acc"} <= set(metrics)
    assert float(metrics["train/cells_per_s_step"]) > 0
    (result,) = trainer.validate(model, _loader(val, shuffle=False), verbose=False)
    assert result["val/acc"] > 0.85 > _chance(val) + 0.4


def test_classifier_dense_collection(dense):
    train, val = dense
    x = next(iter(_loader(train)))["X"]
    assert x.layout == torch.strided
    model = Classifier(N_VARS, N_TYPES, label_key="cell_type", lr=1e-2)
    trainer, losses = _fit(model, train, steps=30)
    assert losses[-1] < losses[0]
    (result,) = trainer.validate(model, _loader(val, shuffle=False), verbose=False)
    assert result["val/acc"] > _chance(val) + 0.2


def test_missing_labels_are_ignored(unlabelled):
    train, val = unlabelled
    codes = val.obs(["cell_type"])["cell_type"].cat.codes.to_numpy()
    assert 0.3 < (codes < 0).mean() < 0.5
    model = Classifier(N_VARS, N_TYPES, label_key="cell_type", lr=1e-2)
    trainer, losses = _fit(model, train, steps=24)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]

    # val/loss is the cross-entropy over the labelled cells only (weighted by labelled cells per batch).
    (result,) = trainer.validate(model, _loader(val, shuffle=False), verbose=False)
    model.eval()
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for batch in _loader(val, shuffle=False):
            y = batch["obs"]["cell_type"]
            assert (y < 0).any()
            logits = model(batch["X"])[y >= 0]
            total += float(torch.nn.functional.cross_entropy(logits, y[y >= 0], reduction="sum"))
            correct += int((logits.argmax(1) == y[y >= 0]).sum())
            n += int((y >= 0).sum())
    assert result["val/loss"] == pytest.approx(total / n, rel=1e-5)
    assert result["val/acc"] == pytest.approx(correct / n, rel=1e-5)

    # Batches without any label train nothing (zero gradients, so AdamW leaves the weights) and log no NaNs.
    model = Classifier(N_VARS, N_TYPES, label_key="unlabelled", lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    trainer, losses = _fit(model, train, steps=3, loader_kw={"obs_keys": ["unlabelled"]})
    assert losses == [0.0, 0.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert "train/loss_step" not in trainer.callback_metrics


# -- sizes from a datamodule, checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Classifier, VAE])
def test_sizes_from_datamodule_and_checkpoint(sparse, tmp_path, cls):
    dm = _DataModule(*sparse)
    model = cls(hidden_dims=(16,))
    assert model.hparams.n_vars is None
    trainer, _ = _fit(model, dm, steps=3)
    assert model.hparams.n_vars == N_VARS
    if cls is Classifier:
        assert (model.hparams.label_key, model.hparams.n_classes) == ("cell_type", N_TYPES)
        assert list(model.classes) == list(dm.categories["cell_type"])
    else:
        assert (model.hparams.batch_key, model.hparams.n_batches) == ("donor", N_DONORS)
        assert list(model.batch_categories) == list(dm.categories["donor"])
    assert list(model.var_names) == list(dm.var_names)

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)  # plain types only: loads without unpickling classes
    assert saved["hyper_parameters"]["n_vars"] == N_VARS
    restored = cls.load_from_checkpoint(path)
    assert dict(restored.hparams) == dict(model.hparams)
    assert list(restored.var_names) == list(model.var_names)
    batch = next(iter(_loader(sparse[1], shuffle=False)))
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored.predict_step(batch, 0), model.predict_step(batch, 0))

    other = _DataModule(*sparse)
    other.var_names = dm.var_names[::-1]
    with pytest.raises(ValueError, match="other genes"):
        _trainer(1).validate(restored, datamodule=other, verbose=False)

    # Resuming training: the network is built in setup before the checkpoint's state is restored.
    resumed = cls(hidden_dims=(16,))
    trainer2 = _trainer(5)
    trainer2.fit(resumed, datamodule=dm, ckpt_path=path)
    assert trainer2.global_step == 5


def test_missing_sizes_raise_clear_errors(sparse):
    train, _ = sparse
    with pytest.raises(ValueError, match=r"needs `label_key`"):
        _fit(Classifier(), train, steps=1)
    with pytest.raises(ValueError, match=r"needs `n_vars`"):
        _fit(Classifier(label_key="cell_type"), train, steps=1)
    with pytest.raises(ValueError, match=r"needs `n_vars`"):
        _fit(VAE(), train, steps=1)
    with pytest.raises(ValueError, match=r"given `n_classes=3` but the datamodule has 6"):
        _fit(Classifier(n_classes=3), _DataModule(*sparse), steps=1)
    with pytest.raises(ValueError, match=r"`label_key='donor'` is not one of the datamodule's obs_keys"):
        _fit(Classifier(label_key="donor"), _DataModule(*sparse), steps=1)
    with pytest.raises(RuntimeError, match="not built"):
        Classifier()(torch.rand(2, N_VARS))
    with pytest.raises(KeyError, match="obs_keys"):
        _fit(Classifier(N_VARS, N_TYPES, label_key="donor"), train, steps=1)


# -- VAE ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_batches", [N_DONORS, 0], ids=["batch-covariate", "no-covariate"])
def test_vae_trains(sparse, n_batches):
    train, val = sparse
    model = VAE(N_VARS, n_batches, n_latent=8, hidden_dims=(64,), lr=3e-3)
    assert (model.encoder.covariate is None) == (n_batches == 0)
    val_loader = _loader(val, shuffle=False)
    (untrained,) = _trainer(1).validate(model, val_loader, verbose=False)
    trainer, losses = _fit(model, train, steps=40)
    # The loss is the negative ELBO per cell here (kl_weight=1, no warm-up); it falls ~17 % in 40 steps.
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    metrics = trainer.callback_metrics
    step_elbo = float(metrics["train/elbo_step"])
    assert step_elbo == pytest.approx(float(metrics["train/reconstruction_step"] + metrics["train/kl_step"]))
    assert float(metrics["train/kl_step"]) > 0
    assert float(metrics["train/cells_per_s_step"]) > 0
    (result,) = trainer.validate(model, val_loader, verbose=False)
    assert {"val/elbo", "val/reconstruction", "val/kl"} <= set(result)
    assert result["val/elbo"] < 0.9 * untrained["val/elbo"]
    if n_batches:
        assert model.encoder.covariate.weight.abs().sum() > 0  # the covariate was used and learned
    embedding = model.predict_step(next(iter(_loader(val))), 0)
    assert embedding.shape == (BATCH, 8)


def test_vae_dense_collection_matches_sparse(sparse, dense):
    # The same model state gives the same loss on a CSR batch and on its dense copy.
    model = VAE(N_VARS, N_DONORS, hidden_dims=(16,), dropout=0.0)
    batch = next(iter(_loader(sparse[0])))
    results = []
    for x in (batch["X"], batch["X"].to_dense()):
        torch.manual_seed(0)
        out = model(x, batch["batch"])
        results.append((out["reconstruction"], out["kl"]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-2)
    _, losses = _fit(VAE(N_VARS, hidden_dims=(32,), lr=3e-3), dense[0], steps=12)
    assert losses[-1] < losses[0]


# -- determinism ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Classifier, VAE])
def test_same_seed_same_losses(sparse, cls):
    def run(seed: int) -> list[float]:
        L.seed_everything(seed, verbose=False)  # parameters are initialised from the global seed
        if cls is Classifier:
            model = Classifier(N_VARS, N_TYPES, label_key="cell_type", hidden_dims=(16,), dropout=0.2)
        else:
            model = VAE(N_VARS, N_DONORS, hidden_dims=(16,), dropout=0.2)
        return _fit(model, sparse[0], steps=8, seed=seed)[1]

    first = run(0)
    assert run(0) == first
    assert run(1) != first


# -- packaging ------------------------------------------------------------------------------------------------
def test_core_import_does_not_load_torch_or_lightning():
    code = (
        "import sys, annbatch, annbatch.synthetic\n"
        "bad = [m for m in ('torch', 'lightning', 'annbatch.models') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hydra_instantiation_gives_plain_hyperparameters(sparse, tmp_path):
    hydra_utils = pytest.importorskip("hydra.utils")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "annbatch.models.VAE", "hidden_dims": [16, 8], "n_latent": 4})
    model = hydra_utils.instantiate(cfg)
    assert isinstance(model, VAE) and model.hparams.hidden_dims == (16, 8)
    trainer, _ = _fit(model, _DataModule(*sparse), steps=1)
    trainer.save_checkpoint(tmp_path / "vae.ckpt")
    torch.load(tmp_path / "vae.ckpt", weights_only=True)  # no omegaconf objects inside
    assert VAE.load_from_checkpoint(tmp_path / "vae.ckpt").decoder.input.in_features == 4
