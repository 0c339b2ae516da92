"""CollectionDataModule in a real lightning.Trainer: split, epochs, resumption from checkpoints, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lightning")
import lightning as L
import torch

import annbatch
from annbatch.collection import CollectionError
from annbatch.lightning import CollectionDataModule
from annbatch.synthetic import make_adata

N_OBS = 1_500


@pytest.fixture(scope="module")
def coll_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lightning") / "cells.zarr"
    adata = make_adata(N_OBS, 40, n_cell_types=4, n_donors=4, seed=3)
    annbatch.Collection(path).add_adatas([adata], seed=0, groupby="donor", progress=False)
    return path


def _dm(path, **kw) -> CollectionDataModule:
    args = {"batch_size": 64, "chunk_size": 16, "preload_nchunks": 8, "return_index": True,
            "obs_keys": ["cell_type"], "batch_key": "donor"}  # fmt: skip
    return CollectionDataModule(path, **{**args, **kw})


def _rows(loader) -> list[np.ndarray]:
    return [np.asarray(b["index"]) for b in loader]


class Recorder(L.LightningModule):
    """A linear model on X that records the rows of every training batch it sees."""

    def __init__(self, n_vars: int):
        super().__init__()
        self.layer = torch.nn.Linear(n_vars, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(np.asarray(batch["index"]).tolist())
        x = batch["X"].to_dense() if batch["X"].layout != torch.strided else batch["X"]
        loss = self.layer(x).pow(2).mean()
        self.log("train/loss", loss, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        x = batch["X"].to_dense()
        self.log("val/loss", self.layer(x).pow(2).mean(), batch_size=x.shape[0], sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def _trainer(tmp_path, **kw) -> L.Trainer:
    args = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": tmp_path, "num_sanity_val_steps": 0}  # fmt: skip
    return L.Trainer(**{**args, **kw})


def test_fraction_split_is_disjoint_and_covering(coll_path):
    dm = _dm(coll_path, val_fraction=0.2)
    assert len(np.intersect1d(dm.train_rows, dm.val_rows)) == 0
    assert np.array_equal(np.union1d(dm.train_rows, dm.val_rows), np.arange(N_OBS))
    assert abs(len(dm.val_rows) / N_OBS - 0.2) < 0.02
    assert dm.n_vars == 40 and len(dm.var_names) == 40
    assert list(dm.categories) == ["cell_type", "donor"]
    dm.setup("fit")
    val = np.concatenate(_rows(dm.val_dataloader()))
    assert np.array_equal(val, dm.val_rows), "validation is unshuffled and reads every row once"
    assert np.array_equal(np.concatenate(_rows(dm.val_dataloader())), val), "the same rows every evaluation"
    train = dm.train_dataloader()
    epoch0, epoch1 = np.concatenate(_rows(train)), np.concatenate(_rows(train))
    for rows in (epoch0, epoch1):
        assert np.array_equal(np.sort(rows), dm.train_rows)
    assert not np.array_equal(epoch0, epoch1), "each epoch a new order"
    again = _dm(coll_path, val_fraction=0.2)
    assert np.array_equal(np.concatenate(_rows(again.train_dataloader())), epoch0), "seeded"
    assert not np.array_equal(np.concatenate(_rows(_dm(coll_path, seed=1).train_dataloader())), epoch0)


def test_split_by_obs_values(coll_path):
    donors = annbatch.Collection(coll_path, mode="r").obs(["donor"])["donor"].to_numpy()
    held = sorted(set(donors))[:1]
    dm = _dm(coll_path, split_key="donor", val_values=held)
    assert set(donors[dm.val_rows]) == set(held)
    assert held[0] not in set(donors[dm.train_rows])
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    codes = torch.cat([b["batch"] for b in batches])
    assert set(dm.categories["donor"][codes.numpy()]) == set(held)
    train_rows = np.concatenate([np.asarray(b["index"]) for b in dm.train_dataloader()])
    assert np.array_equal(np.sort(train_rows), dm.train_rows)
    homogeneous = _dm(coll_path, split_key="donor", val_values=held, batch_sampler="homogeneous")
    for b in homogeneous.train_dataloader():
        assert len(set(b["batch"].tolist())) == 1 and held[0] not in set(donors[b["index"]])


def test_no_validation(coll_path, tmp_path):
    dm = _dm(coll_path, val_fraction=0)
    assert len(dm.val_rows) == 0 and len(dm.train_rows) == N_OBS
    model = Recorder(dm.n_vars)
    _trainer(tmp_path, max_epochs=1).fit(model, datamodule=dm)
    assert len(model.seen) == len(dm.train_dataloader())


def test_errors_name_the_problem(coll_path, tmp_path):
    with pytest.raises(CollectionError, match="nope.zarr"):
        CollectionDataModule(tmp_path / "nope.zarr")
    with pytest.raises(KeyError, match="celltype.*available.*cell_type"):
        _dm(coll_path, obs_keys=["celltype"])
    with pytest.raises(ValueError, match="D9.*donor"):
        _dm(coll_path, split_key="donor", val_values=["D9"])
    with pytest.raises(ValueError, match="val_fraction"):
        _dm(coll_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_key"):
        _dm(coll_path, batch_key=None, batch_sampler="homogeneous")


def test_trainer_fit_and_validate(coll_path, tmp_path):
    dm = _dm(coll_path)
    model = Recorder(dm.n_vars)
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=dm)
    n = len(dm.train_dataloader())
    assert len(model.seen) == 2 * n
    first = np.concatenate(model.seen[:n])
    second = np.concatenate(model.seen[n:])
    assert np.array_equal(np.sort(first), dm.train_rows) and np.array_equal(np.sort(second), dm.train_rows)
    assert not np.array_equal(first, second)
    assert "val/loss" in trainer.callback_metrics


@pytest.mark.parametrize("stop_at", [5, 23])
def test_trainer_resumes_mid_epoch_from_checkpoint(coll_path, tmp_path, stop_at):
    # the uninterrupted reference: two epochs
    dm = _dm(coll_path)
    reference = Recorder(dm.n_vars)
    _trainer(tmp_path / "ref", max_epochs=2).fit(reference, datamodule=dm)
    n = len(dm.train_dataloader())
    assert stop_at < 2 * n
    # interrupted after `stop_at` steps, with a checkpoint written there
    ckpt_dir = tmp_path / "ckpt"
    first = Recorder(dm.n_vars)
    callback = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=stop_at, save_top_k=-1)
    _trainer(tmp_path / "a", max_steps=stop_at, callbacks=[callback]).fit(first, datamodule=_dm(coll_path))
    (ckpt,) = ckpt_dir.glob("*.ckpt")
    assert first.seen == reference.seen[:stop_at]
    # a fresh process-like start: new module, new data module, resumed from the checkpoint
    resumed = Recorder(dm.n_vars)
    _trainer(tmp_path / "b", max_epochs=2).fit(resumed, datamodule=_dm(coll_path), ckpt_path=ckpt)
    assert resumed.seen == reference.seen[stop_at:], "resumption continues batch for batch"
    seen_epoch = [r for batch in first.seen + resumed.seen for r in batch]
    assert len(seen_epoch) == len(np.concatenate(reference.seen))


def test_datamodule_state_roundtrip(coll_path):
    dm = _dm(coll_path)
    it = iter(dm.train_dataloader())
    for _ in range(3):
        next(it)
    state = dm.state_dict()
    assert state == {"train": {"version": 1, "epoch": 0, "runs": [[1, 3]]}}
    json.dumps(state)  # plain integers
    other = _dm(coll_path)
    other.load_state_dict(state)
    rest = _rows(other.train_dataloader())
    expected = _rows(_dm(coll_path).train_dataloader())[3:]
    assert all(np.array_equal(a, b) for a, b in zip(rest, expected, strict=True))


_DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, torch, lightning as L
    from annbatch.lightning import CollectionDataModule

    class Recorder(L.LightningModule):
        def __init__(self, n_vars):
            super().__init__()
            self.layer = torch.nn.Linear(n_vars, 1)
            self.seen = {}
        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).extend(np.asarray(batch["index"]).tolist())
            self.seen.setdefault(f"steps{self.current_epoch}", []).append(len(batch["index"]))
            loss = self.layer(batch["X"].to_dense()).pow(2).mean()
            self.log("train/loss", loss, batch_size=batch["X"].shape[0], sync_dist=True)
            return loss
        def validation_step(self, batch, batch_idx):
            self.seen.setdefault("val", []).extend(np.asarray(batch["index"]).tolist())
            self.log("val/loss", self.layer(batch["X"].to_dense()).pow(2).mean(), batch_size=batch["X"].shape[0],
                     sync_dist=True)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    path, out = sys.argv[1], sys.argv[2]
    dm = CollectionDataModule(path, batch_size=64, chunk_size=16, preload_nchunks=4, return_index=True)
    model = Recorder(dm.n_vars)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=1.0)
    trainer.fit(model, datamodule=dm)
    seen = {str(k): v for k, v in model.seen.items()}
    # the reference classifier under DDP too: its metrics sync across the ranks
    from annbatch.models import Classifier
    dm2 = CollectionDataModule(path, batch_size=64, chunk_size=16, preload_nchunks=4, obs_keys=["cell_type"])
    clf = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=6, val_check_interval=3, logger=False,
                    enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    clf.fit(Classifier(hidden_dims=[8]), datamodule=dm2)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"seen": seen, "train_rows": dm.train_rows.tolist(), "val_rows": dm.val_rows.tolist(),
                   "clf_val_acc": float(clf.callback_metrics["val/acc"])}, f)
    """
)


def test_ddp_two_cpu_processes(coll_path, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(coll_path), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    train_rows = np.array(ranks[0]["train_rows"])
    for epoch in ("0", "1"):
        a, b = (np.array(r["seen"][epoch]) for r in ranks)
        steps = [r["seen"][f"steps{epoch}"] for r in ranks]
        assert len(steps[0]) == len(steps[1]), "equal-length shards: the same number of batches"
        assert all(n == 64 for n in steps[0][:-1] + steps[1][:-1]), "full batches but the last"
        assert not np.intersect1d(a, b).size, "disjoint shards"
        both = np.concatenate([a, b])
        assert len(np.unique(both)) == len(both) and np.isin(both, train_rows).all()
        # covering: only the equal-batches truncation (at most about a load per rank) is left out
        assert len(both) >= len(train_rows) - 2 * (64 + 16 * 4)
    assert not np.array_equal(ranks[0]["seen"]["0"], ranks[0]["seen"]["1"]), "a new order each epoch"
    val = np.concatenate([np.array(r["seen"]["val"]) for r in ranks])
    # two evaluations (one per epoch), each reading every validation row once over both ranks
    assert np.array_equal(np.sort(val), np.sort(np.repeat(ranks[0]["val_rows"], 2)))
    assert ranks[0]["clf_val_acc"] == ranks[1]["clf_val_acc"], "validation metrics are synced across ranks"


@pytest.mark.parametrize("model_name", ["classifier", "mlp", "vae"])
def test_reference_models_through_the_datamodule(coll_path, tmp_path, model_name):
    from annbatch.models import VAE, Classifier

    dm = _dm(coll_path, return_index=False)
    model = {"classifier": lambda: Classifier(), "mlp": lambda: Classifier(hidden_dims=[16]),
             "vae": lambda: VAE(n_latent=4, hidden_dims=[16])}[model_name]()  # fmt: skip
    trainer = _trainer(tmp_path, max_steps=6, val_check_interval=3, limit_val_batches=2)
    trainer.fit(model, datamodule=dm)
    # sized from the data module: genes, labels (first obs key) and donors
    assert model.hparams.n_vars == dm.n_vars
    if model_name == "vae":
        assert model.hparams.n_batches == len(dm.categories["donor"])
        assert {"train/elbo", "val/elbo", "val/kl"} <= set(trainer.callback_metrics)
    else:
        assert model.hparams.n_classes == len(dm.categories["cell_type"])
        assert {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    assert trainer.global_step == 6


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"chunk_size": 0}, ValueError, r"`chunk_size` must be at least 1, got 0"),
        ({"chunk_size": -4}, ValueError, r"`chunk_size` must be at least 1, got -4"),
        ({"batch_size": "64"}, TypeError, r"`batch_size` must be an int"),
        ({"val_batch_size": -1}, ValueError, r"`val_batch_size` must be at least 1"),
        ({"val_batch_size": 0}, ValueError, r"`val_batch_size` must be at least 1"),
        ({"seed": -1}, ValueError, r"`seed` must be at least 0"),
        ({"prefetch": -1}, ValueError, r"`prefetch` must be at least 0"),
        ({"batch_size": 512}, ValueError, r"`batch_size=512` is more than the rows of one load"),
        ({"to": "tensorflow"}, ValueError, r"`to` must be"),
        ({"batch_sampler": 42}, TypeError, r"`batch_sampler` must be None, 'homogeneous', 'balanced' or"),
        ({"batch_key": "nope"}, KeyError, r"`batch_key='nope'`: no such obs column.*available.*donor"),
        ({"split_key": "nope", "val_values": ["x"]}, KeyError, r"`split_key='nope'`: no such obs column"),
        ({"layer": "counts"}, KeyError, r"`layer='counts'`: no such layer"),
        ({"batch_key": "n_counts", "batch_sampler": "homogeneous"}, ValueError,
         r"`batch_key='n_counts'` must be a categorical obs column"),
    ],
)
def test_errors_name_the_datamodules_parameter(coll_path, kwargs, error, pattern):
    """Raised when the data module is made (not later, in the Trainer), naming its own parameters."""
    with pytest.raises(error, match=pattern):
        _dm(coll_path, **kwargs)


def test_one_column_or_value_is_a_list_of_one(coll_path):
    dm = _dm(coll_path, obs_keys="cell_type", split_key="donor", val_values="donor_0")
    assert dm.obs_keys == ["cell_type"] and len(dm.val_rows) > 0


def test_a_missing_collection_says_how_to_make_one(tmp_path):
    with pytest.raises(CollectionError, match=r"nope\.zarr.*annbatch convert") as info:
        CollectionDataModule(tmp_path / "nope.zarr")
    assert "mode=" not in str(info.value)
